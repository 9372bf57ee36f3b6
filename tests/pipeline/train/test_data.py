"""pipeline/train/data.py and pipeline/evaluation/threshold.py: indexing, few-shot, per-worker
shares, shuffling, batches and the val threshold choice. No Ray here (tests/jobs has it)."""
from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.reader import read_samples
from pipeline.datasets.webdataset_writer import ShardWriter
from pipeline.datasets.synthetic import write_synthetic_shards
from pipeline.train.data import (
    SplitIndex,
    TrainDataError,
    check_classes,
    index_split,
    share_samples,
    shuffle_buffer,
    val_batches,
    worker_share,
)
from pipeline.train.loader import train_batches
from pipeline.evaluation.threshold import LocCounts, choose_threshold, count_hits, tau_grid

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_data")
    train = write_synthetic_shards(f"{root}/train/", "train", 60, seed=1, shard_size=20, num_classes=NUM_CLASSES)
    val = write_synthetic_shards(f"{root}/val/", "val", 12, seed=1, shard_size=12, num_classes=NUM_CLASSES)
    return root, train, val


def _jpeg(color, size=16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG")
    return buf.getvalue()


def _write(url_dir, prefix, samples):
    """samples: (key, label or None, boxes or None)."""
    with ShardWriter(url_dir, prefix=prefix, max_count=100) as writer:
        for key, label, boxes in samples:
            members = {"jpg": _jpeg((label or 0) * 40 % 255)}
            meta = {}
            if label is not None:
                meta["label"] = label
                meta["class_name"] = f"c{label}"
            if boxes is not None:
                meta["boxes"] = boxes
            members["json"] = json.dumps(meta).encode()
            writer.write(key, members)
    return writer.urls


def test_index_counts_classes_and_names(shards):
    root, train, _ = shards
    index = index_split(f"{root}/train/", "train")
    assert index.urls == train
    assert index.counts == [20, 20, 20]
    assert index.total == 60
    assert sum(index.class_counts.values()) == 60 and set(index.class_counts) == set(range(NUM_CLASSES))
    truth = {s.label: s.class_name for u in train for s in read_samples(u, decode=False)}
    assert index.class_names == truth
    num_classes, names = check_classes(index, None, None)
    assert num_classes == NUM_CLASSES and names == [truth[c] for c in range(NUM_CLASSES)]
    assert SplitIndex.from_dict(json.loads(json.dumps(index.to_dict()))) == index


def test_few_shot_subset_is_first_sorted_keys_per_class_and_deterministic(shards, tmp_path):
    root, train, _ = shards
    index = index_split(f"{root}/train/", "train", images_per_class=3)
    by_class: dict[int, list] = {}
    for url in train:
        for s in read_samples(url, decode=False):
            by_class.setdefault(s.label, []).append((s.key, url))
    expected = sorted((url, key) for items in by_class.values() for key, url in sorted(items)[:3])
    assert index.selection == expected
    assert index.total == 3 * NUM_CLASSES
    # Independent of the order the shards are listed in.
    listing = tmp_path / "reversed.txt"
    listing.write_text("\n".join(reversed(train)))
    assert index_split(f"@{listing}", "train", images_per_class=3).selection == expected
    # Every worker layout sees exactly the subset, each sample once.
    for world in (1, 2, 3):
        seen = [(s.shard, s.key) for r in range(world) for s in share_samples(worker_share(index, r, world, 0, 0))]
        assert sorted(seen) == expected


def test_unlabelled_shards_are_refused(tmp_path):
    _write(f"{tmp_path}/nolabel/", "train", [("a", 0, None), ("b", None, None)])
    with pytest.raises(TrainDataError, match=r"--train-shards: 1 sample\(s\) of shard .* no label .*key 'b'"):
        index_split(f"{tmp_path}/nolabel/", "train")


def test_val_without_boxes_is_refused(tmp_path):
    _write(f"{tmp_path}/val/", "val", [("a", 0, None), ("b", 1, None)])
    with pytest.raises(TrainDataError, match="--val-shards: no sample has GT boxes"):
        index_split(f"{tmp_path}/val/", "val", require_boxes=True)


def test_empty_few_shot_class_is_refused(tmp_path):
    _write(f"{tmp_path}/train/", "train", [("a", 0, None), ("b", 1, None), ("c", 3, None)])
    index = index_split(f"{tmp_path}/train/", "train", images_per_class=2)
    with pytest.raises(TrainDataError, match=r"class\(es\) 2 have no training image"):
        check_classes(index, None, 2)
    with pytest.raises(TrainDataError, match="--images-per-class must be >= 1"):
        index_split(f"{tmp_path}/train/", "train", images_per_class=0)


def test_conflicting_class_names_are_refused(tmp_path):
    _write(f"{tmp_path}/a/", "train", [("a", 0, [[0, 0, 4, 4]])])
    with ShardWriter(f"{tmp_path}/b/", prefix="val", max_count=10) as w:
        w.write("x", {"jpg": _jpeg((0, 0, 0)), "json": json.dumps({"label": 0, "class_name": "other", "boxes": [[0, 0, 4, 4]]}).encode()})
    with pytest.raises(TrainDataError, match="class id 0 is 'c0' in --train-shards but 'other' in --val-shards"):
        check_classes(index_split(f"{tmp_path}/a/", "train"), index_split(f"{tmp_path}/b/", "val"), None)


def test_shares_split_shards_by_rank_and_samples_by_modulo(shards):
    root, train, _ = shards
    index = index_split(f"{root}/train/", "train")
    everything = sorted((s.shard, s.key) for u in train for s in read_samples(u, decode=False))
    for world in (1, 2, 3, 4, 5):  # 3 shards: by shard up to 3 workers, by sample index above
        shares = [worker_share(index, r, world, epoch=0, seed=0) for r in range(world)]
        assert all(s.by_modulo == (world > 3) for s in shares)
        seen = [(s.shard, s.key) for share in shares for s in share_samples(share)]
        assert sorted(seen) == everything  # disjoint and complete
    # Reshuffled every epoch, deterministically.
    orders = {tuple(worker_share(index, 0, 1, epoch=e, seed=0).urls) for e in range(6)}
    assert len(orders) > 1
    assert worker_share(index, 0, 1, epoch=3, seed=0) == worker_share(index, 0, 1, epoch=3, seed=0)


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(50))
    a = list(shuffle_buffer(items, 8, random.Random(1)))
    assert sorted(a) == items and a != items
    assert a == list(shuffle_buffer(items, 8, random.Random(1)))
    assert a != list(shuffle_buffer(items, 8, random.Random(2)))
    assert list(shuffle_buffer(items, 1, random.Random(1))) == items


def test_train_batches_exact_steps_deterministic_per_epoch(shards):
    root, _, _ = shards
    index = index_split(f"{root}/train/", "train")
    kw = dict(rank=1, world=2, seed=3, batch_size=8, image_size=32, buffer_size=10)
    # 2 workers over 3 shards: rank 1 streams one shard of 20 images per pass, so 5 steps
    # of 8 (40 images) need a second pass over the share.
    first = list(train_batches(index, epoch=0, steps=5, **kw))
    assert len(first) == 5
    for images, labels in first:
        assert images.dtype == torch.uint8 and images.shape == (8, 3, 32, 32)
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() < NUM_CLASSES
    again = list(train_batches(index, epoch=0, steps=5, **kw))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    other = list(train_batches(index, epoch=1, steps=5, **kw))
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # Without prefetching the batches are the same.
    plain = list(train_batches(index, epoch=0, steps=5, prefetch=0, **kw))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, plain))


def test_val_batches_resize_and_scale_boxes(shards):
    root, _, val = shards
    index = index_split(f"{root}/val/", "val", require_boxes=True)
    batches = list(val_batches(index, rank=0, world=1, batch_size=5, image_size=32))
    assert [len(b.labels) for b in batches] == [5, 5, 2]
    samples = list(read_samples(val[0]))
    boxes = [g for b in batches for g in b.gt_boxes]
    for s, g in zip(samples, boxes):
        np.testing.assert_allclose(g, np.array(s.gt_boxes) * 32 / 64)  # 64 px images -> 32 px input
    # Two workers split the val samples between them.
    halves = [sum(len(b.labels) for b in val_batches(index, rank=r, world=2, batch_size=4, image_size=32)) for r in (0, 1)]
    assert halves == [6, 6]


def test_threshold_choice_from_summed_counts():
    size = 32
    taus = tau_grid(0.05)
    # A bright 3x3-cell block and, two cells away, a dimmer 2x2-cell block (4 px a cell).
    # The SAT rule: normalised on the grid (big 1 / (1 + 1e-5) ~ 0.99999, small ~ 0.499995),
    # upsampled x4 (per axis, the big block's pixels 2 .. 17 weigh .125 .375 .625 .875
    # 1 x 8 .875 .625 .375 .125; the small one's 22 .. 31 weigh .125 .375 .625 .875 1 x 6),
    # foreground > tau. GT: image 0 the big block's cells [4, 4, 16, 16] (144 px), image 1
    # the small one's [24, 24, 32, 32] (64 px).
    loc = torch.zeros(2, 1, 8, 8)
    loc[:, 0, 1:4, 1:4] = 1.0
    loc[:, 0, 6:8, 6:8] = 0.5
    gt = [np.array([[4.0, 4.0, 16.0, 16.0]]), np.array([[24.0, 24.0, 32.0, 32.0]])]
    counts = count_hits(loc[:1], gt[:1], size, taus) + count_hits(loc[1:], gt[1:], size, taus)
    assert counts.images == 2
    # At 0.7 the only component is the big block's pixels weighing > 0.7 (.875 x .875 too):
    # [5, 5, 15, 15], IoU 100/144 = 0.69 with image 0's box, 0 with image 1's.
    assert counts.gt_known[taus.tolist().index(0.7)] == 1
    assert counts.box_hits[:, taus.tolist().index(0.7)].tolist() == [1, 1, 0]
    # At tau 0 the zeros are not > 0: both blocks, blurred: the big one [2, 2, 18, 18]
    # (256 px, the largest; IoU 144/256 = 0.56 for image 0), the small one [22, 22, 32, 32]
    # (IoU 64/100 for image 1): IoU >= 0.3 and 0.5 for each image, 0.7 for none.
    assert counts.gt_known[0] == 1 and counts.box_hits[:, 0].tolist() == [2, 2, 0]
    # At 0.3: big [3, 3, 17, 17] (IoU 144/196 = 0.73), small > 0.3 where its weight > 0.6:
    # [24, 24, 32, 32], image 1's box exactly; the largest (big) fits image 0 only.
    assert counts.gt_known[taus.tolist().index(0.3)] == 1
    assert counts.box_hits[:, taus.tolist().index(0.3)].tolist() == [2, 2, 2]
    # At 1 nothing is > 1 (the top is 0.99999): the whole image, IoU 144/1024 and 64/1024.
    assert counts.gt_known[-1] == 0 and counts.box_hits[:, -1].tolist() == [0, 0, 0]
    chosen = choose_threshold(counts, "gt_known")
    assert chosen["gt_known_loc"] == 50.0
    assert chosen["threshold"] == 0.0  # the smallest tau reaching the best (IoU 0.56 there)
    v2 = choose_threshold(counts, "maxboxacc_v2")
    assert v2["maxboxacc_v2"] == 100.0 and 0.0 < v2["threshold"] <= 0.5
    # The vector form survives an all-reduce (a sum) of two halves.
    half = count_hits(loc[:1], gt[:1], size, taus)
    summed = LocCounts.from_vector(taus, half.to_vector() + count_hits(loc[1:], gt[1:], size, taus).to_vector())
    assert np.array_equal(summed.gt_known, counts.gt_known) and summed.images == 2
    with pytest.raises(ValueError, match="threshold metric"):
        choose_threshold(counts, "iou")
