"""Shards -> training and validation batches for one Ray Train worker.

Before training, the driver indexes each split once (``index_split``: one pass over the
shards reading labels, class names and keys, not decoding images) so that bad input
fails before any worker starts, the number of steps per epoch is known, and the
few-shot subset is fixed. During training each worker streams its own share:

- **Split by rank.** Each epoch the shard list is shuffled (seed + epoch) and worker
  ``rank`` streams shards ``rank, rank + world, ...``. With fewer shards than workers,
  or a few-shot subset, every worker reads the shards and keeps the samples whose running
  index is ``rank`` modulo ``world``.
- **Shuffle buffer.** Undecoded samples pass through a buffer of ``buffer_size``; each
  output is a random pick from it. Seeds are derived from (seed, epoch, rank), so an
  epoch's batches are the same in an uninterrupted and in a resumed run.
- **Augmentation** (DESIGN §5): square resize to size*256/224, random crop, flip
  (``pipeline.data.preprocess.train_transform``), in N loader processes
  (``pipeline.train.loader``), each sample's RNG seeded from (seed, epoch, rank, pass,
  position), so batches do not depend on N; batches stay uint8 until the model.
- **Equal steps.** Every worker yields exactly ``steps`` batches (DDP needs the same count
  on every rank): a worker whose share runs out starts another shuffled pass over it.
- **Few-shot** (``images_per_class=N``): the first N keys of every class in sorted key
  order (ties by shard URL) over the whole split: deterministic, independent of the
  shard order and of the number of workers.
"""
from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data.batches import batches
from pipeline.data.handoff import Handoff
from pipeline.data.preprocess import resize_to_input
from pipeline.data.reader import Sample, decode_sample, read_samples
from pipeline.data.shards import expand_shards


class TrainDataError(ValueError):
    """The training or validation shards cannot be used; the message says why and what to do."""


# --- the index pass --------------------------------------------------------------------


@dataclass
class ShardSummary:
    """What one pass over a shard learns, without decoding images."""

    url: str
    count: int = 0  # samples usable for training (no read error, labelled)
    errors: int = 0
    first_error: str | None = None
    unlabelled: int = 0
    first_unlabelled: str | None = None
    with_boxes: int = 0
    class_counts: dict[int, int] = field(default_factory=dict)
    class_names: dict[int, str] = field(default_factory=dict)
    first_keys: dict[int, list[str]] = field(default_factory=dict)  # few-shot candidates


def summarize_shard(url: str, keys_per_class: int = 0) -> ShardSummary:
    """One streaming pass; keeps the ``keys_per_class`` smallest keys of every class."""
    summary = ShardSummary(url)
    for sample in read_samples(url, decode=False):
        if sample.error is not None:
            summary.errors += 1
            summary.first_error = summary.first_error or f"{sample.key}: {sample.error}"
            continue
        if sample.label is None:
            summary.unlabelled += 1
            summary.first_unlabelled = summary.first_unlabelled or sample.key
            continue
        label = sample.label
        summary.count += 1
        summary.class_counts[label] = summary.class_counts.get(label, 0) + 1
        if sample.class_name is not None:
            summary.class_names.setdefault(label, sample.class_name)
        if sample.gt_boxes:
            summary.with_boxes += 1
        if keys_per_class:
            keys = summary.first_keys.setdefault(label, [])
            keys.append(sample.key)
            if len(keys) > 4 * keys_per_class:  # trim now and then, keep memory small
                keys.sort()
                del keys[keys_per_class:]
    for keys in summary.first_keys.values():
        keys.sort()
        del keys[keys_per_class:]
    return summary


@dataclass
class SplitIndex:
    """A split's shards, sample counts, classes and (few-shot) the selected samples."""

    name: str  # "train" / "val", for messages
    urls: list[str]
    counts: list[int]
    class_counts: dict[int, int]
    class_names: dict[int, str]
    selection: list[tuple[str, str]] | None = None  # (shard url, key), sorted; few-shot only

    @property
    def total(self) -> int:
        return len(self.selection) if self.selection is not None else sum(self.counts)

    def to_dict(self) -> dict:
        return {
            "name": self.name, "urls": self.urls, "counts": self.counts,
            "class_counts": self.class_counts, "class_names": self.class_names,
            "selection": self.selection,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "SplitIndex":
        sel = d.get("selection")
        return cls(
            d["name"], list(d["urls"]), list(d["counts"]),
            {int(k): v for k, v in d["class_counts"].items()},
            {int(k): v for k, v in d["class_names"].items()},
            [tuple(s) for s in sel] if sel is not None else None,
        )


def index_split(
    spec: str,
    name: str,
    *,
    images_per_class: int | None = None,
    require_boxes: bool = False,
    map_fn: Callable[[Callable, list], list] | None = None,
) -> SplitIndex:
    """Index a split, or raise TrainDataError naming the flag, shard and key at fault.

    ``map_fn(fn, items)`` runs the per-shard pass (Ray tasks in the job; a plain map
    by default).
    """
    flag = f"--{name}-shards"
    try:
        urls = expand_shards(spec)
    except (ValueError, FileNotFoundError) as e:
        raise TrainDataError(f"{flag}: {e}") from None
    keep = images_per_class or 0
    if images_per_class is not None and images_per_class < 1:
        raise TrainDataError(f"--images-per-class must be >= 1, got {images_per_class}")
    mapper = map_fn or (lambda fn, items: [fn(*item) for item in items])
    summaries: list[ShardSummary] = mapper(summarize_shard, [(u, keep) for u in urls])
    for s in summaries:
        if s.unlabelled:
            raise TrainDataError(
                f"{flag}: {s.unlabelled} sample(s) of shard {s.url} have no label "
                f"(first: key '{s.first_unlabelled}'); training needs a class id in a .cls member "
                "or a 'label' in the .json member of every sample"
            )
    total = sum(s.count for s in summaries)
    if total == 0:
        errors = [s.first_error for s in summaries if s.first_error]
        raise TrainDataError(
            f"{flag}: no readable labelled sample in {len(urls)} shard(s) of {spec!r}"
            + (f" (first error: {errors[0]})" if errors else "")
        )
    if require_boxes and not sum(s.with_boxes for s in summaries):
        raise TrainDataError(
            f"{flag}: no sample has GT boxes (a 'boxes' list in its .json member); the box "
            "threshold is chosen on this split, so it needs boxes"
        )
    class_counts: dict[int, int] = {}
    class_names: dict[int, str] = {}
    for s in summaries:
        for label, n in s.class_counts.items():
            if label < 0:
                raise TrainDataError(f"{flag}: shard {s.url} has the negative class id {label}")
            class_counts[label] = class_counts.get(label, 0) + n
        for label, cname in s.class_names.items():
            if class_names.setdefault(label, cname) != cname:
                raise TrainDataError(
                    f"{flag}: class id {label} is called both {class_names[label]!r} and {cname!r} "
                    f"(shard {s.url}); every sample of a class must carry the same class_name"
                )
    selection = None
    if images_per_class is not None:
        selection = few_shot_selection(summaries, images_per_class)
    return SplitIndex(name, urls, [s.count for s in summaries], class_counts, class_names, selection)


def few_shot_selection(summaries: list[ShardSummary], n: int) -> list[tuple[str, str]]:
    """The first ``n`` keys of every class in sorted (key, shard URL) order, sorted."""
    per_class: dict[int, list[tuple[str, str]]] = {}
    for s in summaries:
        for label, keys in s.first_keys.items():
            per_class.setdefault(label, []).extend((k, s.url) for k in keys)
    chosen = [item for items in per_class.values() for item in sorted(items)[:n]]
    return sorted((url, key) for key, url in chosen)


def check_classes(train: SplitIndex, val: SplitIndex | None, images_per_class: int | None) -> tuple[int, list[str] | None]:
    """(number of classes, class names or None) from the indexed splits.

    Class ids are 0..K-1 with K = the largest id + 1. Under few-shot every class must
    have a training image; names must agree between splits.
    """
    labels = set(train.class_counts) | (set(val.class_counts) if val else set())
    num_classes = max(labels) + 1
    if images_per_class is not None:
        empty = [c for c in range(num_classes) if train.class_counts.get(c, 0) == 0]
        if empty:
            shown = ", ".join(f"{c}" + (f" ({val.class_names[c]!r})" if val and c in val.class_names else "")
                              for c in empty[:10])
            raise TrainDataError(
                f"--images-per-class {images_per_class}: class(es) {shown} have no training image "
                f"in --train-shards ({len(empty)} of {num_classes} classes are empty); add images "
                "of every class or renumber the classes"
            )
    names = dict(train.class_names)
    if val:
        for label, cname in val.class_names.items():
            if names.setdefault(label, cname) != cname:
                raise TrainDataError(
                    f"class id {label} is {names[label]!r} in --train-shards but {cname!r} in "
                    "--val-shards: both splits must use the same class list"
                )
    if not names:
        return num_classes, None
    return num_classes, [names.get(c, f"class_{c}") for c in range(num_classes)]


# --- one worker's share ----------------------------------------------------------------


@dataclass(frozen=True)
class WorkerShare:
    """The shards a worker streams and which of their samples it keeps."""

    urls: tuple[str, ...]
    rank: int = 0
    world: int = 1
    by_modulo: bool = False  # keep samples whose running index % world == rank
    keys: frozenset | None = None  # few-shot: keep only these (url, key)


def worker_share(index: SplitIndex, rank: int, world: int, epoch: int = 0, seed: int = 0,
                 shuffle: bool = True) -> WorkerShare:
    """Worker ``rank``'s share of a split for one epoch (the module docstring has the rules)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world}")
    urls = [u for u, n in zip(index.urls, index.counts) if n > 0]
    keys = None
    if index.selection is not None:
        keys = frozenset(index.selection)
        wanted = {u for u, _ in index.selection}
        urls = [u for u in urls if u in wanted]
    if shuffle:
        random.Random(f"shards-{seed}-{epoch}").shuffle(urls)
    if len(urls) >= world and keys is None:
        return WorkerShare(tuple(urls[rank::world]), rank, world)
    return WorkerShare(tuple(urls), rank, world, by_modulo=world > 1, keys=keys)


def share_samples(share: WorkerShare, on_error: Callable[[Sample], None] | None = None) -> Iterator[Sample]:
    """The share's samples, undecoded, in stream order (errors and unlabelled skipped).

    ``on_error`` sees the unreadable samples (read errors); where every worker reads the
    same shards (``by_modulo``), each worker sees its modulo share of them, so that counts
    summed over workers count each once.
    """
    running = errors = 0
    for url in share.urls:
        for sample in read_samples(url, decode=False):
            if sample.error is not None:
                if on_error is not None and (not share.by_modulo or errors % share.world == share.rank):
                    on_error(sample)
                errors += 1
                continue
            if sample.label is None:
                continue
            if share.keys is not None and (url, sample.key) not in share.keys:
                continue
            mine = not share.by_modulo or running % share.world == share.rank
            running += 1
            if mine:
                yield sample


def shuffle_buffer(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Fill ``size`` items, then emit a random one per new item; drain shuffled at the end."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


# --- batches ---------------------------------------------------------------------------


def _epoch_rng(kind: str, seed: int, epoch: int, rank: int, rep: int) -> random.Random:
    return random.Random(f"{kind}-{seed}-{epoch}-{rank}-{rep}")


@dataclass
class ValBatch:
    images: torch.Tensor  # uint8 B x 3 x S x S
    labels: torch.Tensor  # int64 B
    gt_boxes: list[np.ndarray]  # per image, n x 4 in input (S x S) pixels


def val_batches(
    index: SplitIndex, *, rank: int, world: int, batch_size: int, image_size: int, prefetch: int = 2
) -> Iterator[ValBatch]:
    """This worker's share of the val split, resized to the square input, boxes scaled."""

    def examples() -> Iterator[tuple[torch.Tensor, int, np.ndarray]]:
        for sample in share_samples(worker_share(index, rank, world, shuffle=False)):
            decoded = decode_sample(sample)
            if decoded.error is not None:
                continue
            sx, sy = image_size / decoded.width, image_size / decoded.height
            gt = np.asarray(decoded.gt_boxes or [], dtype=np.float64).reshape(-1, 4)
            yield resize_to_input(decoded.image, image_size), decoded.label, gt * np.array([sx, sy, sx, sy])

    def produce() -> Iterator[ValBatch]:
        for batch in batches(examples(), batch_size):
            images, labels, boxes = zip(*batch)
            yield ValBatch(torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(boxes))

    return prefetched(produce(), prefetch) if prefetch > 0 else produce()


def prefetched(items: Iterator, depth: int) -> Iterator:
    """Run ``items`` in a background thread, ``depth`` ahead (decoding overlaps compute)."""
    handoff = Handoff(depth)

    def run() -> None:
        try:
            for item in items:
                if not handoff.put(item):
                    return
            handoff.finish()
        except BaseException as e:  # hand the error to the consumer
            handoff.fail(e)
        finally:  # in this thread, which runs ``items``: close its readers now, not at GC
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name="satloc-prefetch", daemon=True)
    thread.start()
    try:
        yield from handoff.items()
    finally:
        handoff.close(thread)  # the thread ends after its current item: nothing runs ``items`` after this
