"""pipeline/train/loader.py: training batches decoded in N processes are the same for every
N and in a resumed run, every rank yields the same steps, few-shot keeps its subset, bad
samples are skipped and counted, and the processes are gone after close. No Ray here
(tests/jobs/test_train_job.py runs the loader inside Ray Train workers)."""
from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.datasets.synthetic import write_synthetic_shards
from pipeline.datasets.webdataset_writer import ShardWriter
from pipeline.train.data import TrainDataError, index_split
from pipeline.train.loader import TrainLoader, auto_loader_workers, parse_loader_workers, train_batches
from pipeline.train.loop import TrainConfig, build_model, build_optimizer, train_epoch
from pipeline.train.worker import format_metrics, reduce_train_metrics

NUM_CLASSES = 4


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    # Unequal shards: with 2 workers, rank 0 streams 2 shards (35 samples), rank 1 one (15 or 20).
    write_synthetic_shards(f"{root}/train/", "train", 55, seed=2, shard_size=20, num_classes=NUM_CLASSES)
    return index_split(f"{root}/train/", "train")


def _epochs(index, workers: int, epochs: list[int], steps: int = 4, rank: int = 0, world: int = 2) -> list:
    with TrainLoader(index, rank=rank, world=world, seed=5, batch_size=6, image_size=32, buffer_size=7,
                     workers=workers) as loader:
        return [list(loader.epoch(e, steps)) for e in epochs]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def test_batches_are_identical_for_0_1_and_2_processes(index):
    runs = {n: _epochs(index, n, [0, 1]) for n in (0, 1, 2)}
    for epoch in (0, 1):
        base = runs[0][epoch]
        assert len(base) == 4 and all(x.shape == (6, 3, 32, 32) and x.dtype == torch.uint8 for x, _ in base)
        assert _same(runs[1][epoch], base) and _same(runs[2][epoch], base)
    assert not _same(runs[0][0], runs[0][1])  # another epoch, other batches
    # Augmentation is per sample and not constant: some images of the epoch are flipped or
    # cropped differently from their unaugmented neighbours' pattern, i.e. not all equal.
    assert len({x.float().mean().item() for x, _ in runs[0][0]}) > 1


def test_a_resumed_loader_gives_the_uninterrupted_epoch(index):
    uninterrupted = _epochs(index, 2, [0, 1, 2])
    resumed = _epochs(index, 2, [1, 2])  # a fresh loader (new processes) starting at epoch 1
    assert _same(resumed[0], uninterrupted[1]) and _same(resumed[1], uninterrupted[2])
    # The one-epoch helper agrees with the run-long loader.
    assert _same(list(train_batches(index, rank=0, world=2, epoch=2, seed=5, batch_size=6, steps=4,
                                    image_size=32, buffer_size=7, loader_workers=1)), uninterrupted[2])


def test_every_rank_yields_the_same_steps_with_unequal_shares(index):
    # 55 samples in shards of 20, 20, 15; world 2: one rank has 1 shard, the other 2.
    steps = 9  # 54 images a rank: more than either share, so both make further passes
    sizes = [[len(lab) for _, lab in _epochs(index, 2, [0], steps=steps, rank=r)[0]] for r in (0, 1)]
    assert sizes == [[6] * steps, [6] * steps]


def _flat_jpeg(value: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _grey(i: int) -> int:
    return 20 + 9 * i  # samples told apart by their (flat, so augmentation-proof) grey level


def _keys_of(images: torch.Tensor) -> list[int]:
    means = images.float().mean(dim=(1, 2, 3)).numpy()
    keys = np.rint((means - 20) / 9).astype(int)
    assert np.allclose(means, 20 + 9 * keys, atol=2.5)
    return keys.tolist()


def _write_flat(url: str, n: int, *, corrupt=(), no_image=()) -> None:
    with ShardWriter(url, prefix="train", max_count=1000) as writer:
        for i in range(n):
            members = {"json": json.dumps({"label": i % NUM_CLASSES}).encode()}
            if i in corrupt:
                members["jpg"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
            elif i not in no_image:
                members["jpg"] = _flat_jpeg(_grey(i))
            writer.write(f"{i:03d}", members)


def test_few_shot_selection_is_unchanged_with_loader_processes(tmp_path):
    _write_flat(f"{tmp_path}/fs/", 20)
    index = index_split(f"{tmp_path}/fs/", "train", images_per_class=2)
    selected = sorted(int(key) for _, key in index.selection)
    assert selected == [0, 1, 2, 3, 4, 5, 6, 7]  # the first 2 sorted keys of each of the 4 classes
    for workers in (0, 2):
        seen = []
        for rank in (0, 1):  # 2 ranks x 2 steps x batch 2: one pass over the 8 selected samples
            with TrainLoader(index, rank=rank, world=2, seed=1, batch_size=2, image_size=32, buffer_size=4,
                             workers=workers) as loader:
                seen += [k for images, _ in loader.epoch(0, 2) for k in _keys_of(images)]
        assert sorted(seen) == selected, workers


def test_bad_samples_are_skipped_counted_and_batches_stay_full(tmp_path):
    # Key 2's JPEG is corrupt (decodes in a loader process: undecodable), key 5 has no image
    # (a read error). No shuffling (buffer 1), one shard, one worker: the stream is 0..8.
    _write_flat(f"{tmp_path}/bad/", 9, corrupt={2}, no_image={5})
    index = index_split(f"{tmp_path}/bad/", "train")
    assert index.total == 8  # the read error is known to the index, the corrupt JPEG is not
    for workers in (0, 2):
        with TrainLoader(index, rank=0, world=1, seed=0, batch_size=4, image_size=32, buffer_size=1,
                         workers=workers) as loader:
            batches = list(loader.epoch(0, 1))
            assert [_keys_of(x) for x, _ in batches] == [[0, 1, 3, 4]]
            assert (loader.skipped.undecodable, loader.skipped.unreadable) == (1, 1)  # both chunks read
            batches = list(loader.epoch(0, 2))  # into the second chunk (5 unreadable), then the next pass
            assert [_keys_of(x) for x, _ in batches] == [[0, 1, 3, 4], [6, 7, 8, 0]]
            assert all(len(labels) == 4 for _, labels in batches)
            assert (loader.skipped.undecodable, loader.skipped.unreadable) == (2, 1), workers
            assert loader.skipped.total == 3


def test_a_share_with_no_decodable_image_is_an_error(tmp_path):
    _write_flat(f"{tmp_path}/allbad/", 3, corrupt={0, 1, 2})
    index = index_split(f"{tmp_path}/allbad/", "train")
    for workers in (0, 1):
        with pytest.raises(TrainDataError, match=r"worker 0 of 1 found no decodable training image .*--train-shards"):
            list(train_batches(index, rank=0, world=1, epoch=0, seed=0, batch_size=2, steps=2, image_size=32,
                               buffer_size=1, loader_workers=workers))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_loader_processes_persist_across_epochs_and_exit_on_close_and_on_error(index):
    loader = TrainLoader(index, rank=0, world=1, seed=0, batch_size=6, image_size=32, buffer_size=7, workers=2)
    assert loader.loader_pids() == []
    next(iter(loader.epoch(0, 3)))  # abandoned mid-epoch, as a failing step would
    pids = loader.loader_pids()
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    assert len(list(loader.epoch(1, 3))) == 3
    assert loader.loader_pids() == pids  # the same processes: started once per run
    loader.close()
    assert loader.loader_pids() == [] and _gone(pids)
    with pytest.raises(RuntimeError, match="a step failed"):
        with TrainLoader(index, rank=0, world=1, seed=0, batch_size=6, image_size=32, buffer_size=7,
                         workers=1) as loader:
            next(iter(loader.epoch(0, 3)))
            pids = loader.loader_pids()
            raise RuntimeError("a step failed")
    assert len(pids) == 1 and _gone(pids)


def test_loader_workers_flag_values_and_the_auto_rule():
    assert parse_loader_workers("auto") is None and parse_loader_workers("AUTO") is None
    assert parse_loader_workers("0") == 0 and parse_loader_workers(3) == 3
    for bad in ("-1", "x", "1.5", -2, 1.5):
        with pytest.raises(ValueError, match=r"--loader-workers must be 'auto' or a number of processes >= 0"):
            parse_loader_workers(bad)
    # GPU workers: every CPU but the main process's; CPU-only: a quarter, none below 4.
    assert [auto_loader_workers(c, True) for c in (1, 2, 8, 8.5)] == [1, 1, 7, 7]
    assert [auto_loader_workers(c, False) for c in (1, 2, 3, 4, 8, 16)] == [0, 0, 0, 1, 2, 4]


def test_train_epoch_measures_the_input_wait_and_the_epoch_line_shows_it():
    cfg = TrainConfig(model="sat_vit_micro_patch8_64", num_classes=NUM_CLASSES, epochs=1, batch_size=4,
                      model_kwargs=dict(img_size=32, patch_size=8, depth=1, embed_dim=16, num_heads=2,
                                        reweight_blocks=1))
    model = build_model(cfg)

    def slow_batches():
        for _ in range(3):
            time.sleep(0.2)
            yield torch.zeros(4, 3, 32, 32, dtype=torch.uint8), torch.arange(4) % NUM_CLASSES

    m = train_epoch(model, slow_batches(), build_optimizer(model, cfg), cfg, 0, 3)
    assert m["images"] == 12
    assert 0.6 <= m["input_wait"] * m["seconds"] <= m["seconds"]  # at least the 3 sleeps
    reduced = reduce_train_metrics(dict(m, skipped=3))  # one worker: the sum is its own count
    assert reduced["skipped"] == 3 and reduced["input_wait"] == pytest.approx(m["input_wait"])
    line = format_metrics(dict(reduced, input_wait=0.123, epoch=1, val_top1=50.0, val_gt_known_loc=40.0,
                               val_maxboxacc_v2=30.0, val_threshold=0.2), epochs=3)
    assert line.endswith("img/s, input wait 12%, 3 sample(s) skipped")
    assert format_metrics(dict(reduced, skipped=0, input_wait=0.05, epoch=1, val_top1=50.0, val_gt_known_loc=40.0,
                               val_maxboxacc_v2=30.0, val_threshold=0.2), epochs=3).endswith("input wait 5%")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX only")
def test_the_loader_starts_its_processes_with_forkserver():
    with TrainLoader(None, rank=0, world=1, seed=0, batch_size=2, image_size=32, workers=1) as loader:
        assert loader._loader.multiprocessing_context.get_start_method() == "forkserver"


def test_the_loader_leaves_the_global_torch_rng_alone(index):
    # The model's dropout and drop path draw from it: a loader must not shift it with N.
    draws = {}
    for workers in (0, 1):
        torch.manual_seed(0)
        with TrainLoader(index, rank=0, world=1, seed=0, batch_size=6, image_size=32, buffer_size=7,
                         workers=workers) as loader:
            for epoch in (0, 1):
                list(loader.epoch(epoch, 2))
                draws.setdefault(workers, []).append(torch.rand(3))
    assert all(torch.equal(a, b) for a, b in zip(draws[0], draws[1]))


def test_chunks_travel_in_reused_shared_memory_slots(index):
    base = _epochs(index, 0, [0, 1])
    with TrainLoader(index, rank=0, world=2, seed=5, batch_size=6, image_size=32, buffer_size=7,
                     workers=2) as loader:
        runs = [list(loader.epoch(e, 4)) for e in (0, 1)]
        in_slots, sent = loader.chunks_in_slots()
        count = len(loader.slots.outputs)
        assert count == 2 * 2 + 1  # processes x chunks queued ahead, + the one being copied out
        assert sent >= 8 and in_slots == sent  # every chunk, both ways, in a slot: none through the pipe
        assert loader.slots.free() == count  # every slot given back
    assert _same(runs[0], base[0]) and _same(runs[1], base[1])


def test_without_a_slot_or_room_in_it_a_chunk_travels_the_old_way(index, monkeypatch):
    base = _epochs(index, 0, [0])[0]
    import pipeline.train.loader as loader_module

    # Bytes too big for the slot's input: through the pipe; the images still come back in the slot.
    monkeypatch.setattr(loader_module, "SLOT_INPUT_BYTES_PER_IMAGE", 16)
    with TrainLoader(index, rank=0, world=2, seed=5, batch_size=6, image_size=32, buffer_size=7,
                     workers=2) as loader:
        assert _same(list(loader.epoch(0, 4)), base)
        in_slots, sent = loader.chunks_in_slots()
        assert in_slots == 0 and sent >= 4 and loader.slots.free() == len(loader.slots.outputs)
    monkeypatch.undo()
    # No free slot at all: fresh shared-memory segments, as before the slots.
    with TrainLoader(index, rank=0, world=2, seed=5, batch_size=6, image_size=32, buffer_size=7,
                     workers=1) as loader:
        loader.slots._free.clear()
        assert _same(list(loader.epoch(0, 4)), base)
        assert loader.chunks_in_slots()[0] == 0


def test_too_little_shared_memory_for_the_slots_is_said_and_the_batches_stay(index, monkeypatch, capsys):
    import pipeline.train.loader as loader_module

    monkeypatch.setattr(loader_module.ChunkSlots, "nbytes", staticmethod(lambda *a: 2**62))
    with TrainLoader(index, rank=0, world=2, seed=5, batch_size=6, image_size=32, buffer_size=7,
                     workers=1) as loader:
        assert loader.slots is None
        batches = list(loader.epoch(0, 4))
    err = capsys.readouterr().err
    assert "/dev/shm has" in err and "--shm-size" in err and "fresh segment" in err
    assert _same(batches, _epochs(index, 0, [0])[0])


def test_an_abandoned_epoch_loses_no_slot_and_changes_no_batch(index):
    base = _epochs(index, 0, [0, 1, 2])
    with TrainLoader(index, rank=0, world=2, seed=5, batch_size=6, image_size=32, buffer_size=7,
                     workers=2) as loader:
        epoch0 = loader.epoch(0, 4)
        assert _same([next(epoch0)], base[0][:1])  # left after one batch: chunks still in flight
        before = loader.chunks_in_slots()
        assert _same(list(loader.epoch(1, 4)), base[1])
        assert _same(list(loader.epoch(2, 4)), base[2])
        in_slots, sent = loader.chunks_in_slots()
        # The abandoned chunks' slots were taken back once their processes had finished them:
        # every later chunk found a slot, and all are free again.
        assert in_slots - before[0] == sent - before[1] >= 8
        assert loader.slots.free() == len(loader.slots.outputs)


def test_pinned_batches_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: test_pinned_batches_equal_the_unpinned_ones covers it")
    with pytest.raises(ValueError, match="pin_memory=True is for a training step on a CUDA GPU"):
        TrainLoader(None, rank=0, world=1, seed=0, batch_size=2, image_size=32, workers=0, pin_memory=True)


@pytest.mark.cuda
def test_pinned_batches_equal_the_unpinned_ones(index):
    base = _epochs(index, 0, [0])[0]
    for workers in (0, 2):
        with TrainLoader(index, rank=0, world=2, seed=5, batch_size=6, image_size=32, buffer_size=7,
                         workers=workers, pin_memory=True) as loader:
            batches = list(loader.epoch(0, 4))
        assert _same(batches, base)
        assert all(images.is_pinned() for images, _ in batches)
