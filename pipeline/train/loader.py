"""Training input in parallel processes: one Ray Train worker's raw samples -> N decode
processes -> exactly ``steps`` augmented batches per epoch (docs/architecture.md,
"Training input").

- **The main process reads.** It streams the worker's share exactly as
  ``pipeline.train.data`` defines it (``worker_share``, ``share_samples``,
  ``shuffle_buffer``): undecoded bytes, cheap. It cuts the stream into chunks of raw
  samples, each sample carrying its own augmentation seed.
- **N loader processes decode and augment.** A torch ``DataLoader`` whose "indices" are
  those chunks sends each chunk to one of N worker processes, which decode the JPEGs and
  run ``train_transform``; results come back in order (shared memory), so the batches do
  not depend on N. N = 0 runs the same chunk function in one background thread (the old
  path).
- **Deterministic per sample.** The augmentation RNG of a sample is seeded from (seed,
  epoch, rank, pass, position in the pass), not drawn from one sequential RNG, so an
  epoch's batches are identical for every N and in an uninterrupted and a resumed run.
- **Exactly ``steps`` full batches.** A sample that does not decode is dropped by its
  process and counted; the main process re-cuts the decoded images into batches of exactly
  ``batch_size``. The raw stream is endless (another shuffled pass over the share when it
  runs out), so every rank yields the same number of full batches.
- **One loader for the whole run.** The processes start once (``forkserver``: Ray's worker
  processes have threads, so plain ``fork`` is unsafe) and persist across epochs;
  ``close()`` (or leaving the ``with`` block, also on an error) stops them.
"""
from __future__ import annotations

import itertools
import multiprocessing
import random
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from pipeline.data.batches import batches
from pipeline.data.preprocess import train_transform
from pipeline.data.reader import Sample, decode_sample
from pipeline.train.data import (
    SplitIndex,
    TrainDataError,
    _epoch_rng,
    prefetched,
    share_samples,
    shuffle_buffer,
    worker_share,
)

AUTO = "auto"
# Chunks queued ahead per loader process (the DataLoader's prefetch_factor).
CHUNKS_AHEAD = 2


# --- how many processes ----------------------------------------------------------------


def parse_loader_workers(value: str | int) -> int | None:
    """``--loader-workers``: ``auto`` (None) or a count >= 0; ValueError naming the flag."""
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"--loader-workers must be 'auto' or a number of processes >= 0, got {value!r}") from None
    if isinstance(value, float) and value != n or n < 0:
        raise ValueError(f"--loader-workers must be 'auto' or a number of processes >= 0, got {value!r}")
    return n


def auto_loader_workers(cpus: float, use_gpu: bool) -> int:
    """The loader processes of one Ray Train worker with ``cpus`` CPUs (``--cpus-per-worker``).

    On a GPU worker the model runs on the GPU, so every CPU but one (the main process:
    reading, batching, the host-to-device copy) decodes. On a CPU-only worker the model's
    threads need the cores: a quarter of them decode (decoding and augmenting a 500x375
    JPEG costs a few ms, a CPU training step tens of ms per image), none below 4 CPUs,
    where the old in-thread path overlaps decoding with compute at no start-up cost.
    """
    whole = max(1, int(cpus))
    return max(1, whole - 1) if use_gpu else whole // 4


# --- what travels to a loader process and back -----------------------------------------


class RawSample(NamedTuple):
    """One undecoded training sample, with everything its process needs."""

    key: str
    shard: str
    image_bytes: bytes
    label: int
    rep: int  # the pass over the share it comes from
    seed: str  # its augmentation RNG's seed
    unreadable_before: int  # unreadable samples of the shards between the previous one and this one


class RawChunk(NamedTuple):
    """A chunk of raw samples as it travels to a process: the image bytes back to back in
    one ``bytes`` (pickled through the DataLoader's pipe: cheaper here than a shared-memory
    segment per chunk, bench/bench_ingest.py)."""

    data: bytes
    ends: list[int]  # where each sample's bytes end in ``data``
    labels: list[int]
    reps: list[int]
    seeds: list[str]
    unreadable: int  # unreadable samples of the shards read before the chunk's ones


def pack_chunk(samples: list[RawSample]) -> RawChunk:
    return RawChunk(b"".join(s.image_bytes for s in samples),
                    np.cumsum([len(s.image_bytes) for s in samples]).tolist(),
                    [s.label for s in samples], [s.rep for s in samples], [s.seed for s in samples],
                    sum(s.unreadable_before for s in samples))


class DecodedChunk(NamedTuple):
    images: torch.Tensor  # uint8 k x 3 x S x S, the decodable samples of the chunk, in order
    labels: list[int]  # k (a list: a tensor would cost one more shared-memory hand-over)
    reps: list[int]  # the pass of every sample of the chunk, decoded or not, in order
    decoded: list[bool]  # whether it decoded
    unreadable: int  # samples of the shards skipped before the chunk's ones (read errors)


def augment_chunk(chunk: RawChunk, image_size: int) -> DecodedChunk:
    """Decode and augment a chunk (in a loader process, or the prefetch thread)."""
    data = memoryview(chunk.data)
    images, labels, decoded = [], [], []
    start = 0
    for end, label, seed in zip(chunk.ends, chunk.labels, chunk.seeds):
        sample = decode_sample(Sample(key="", shard="", label=label, image_bytes=bytes(data[start:end])))
        start = end
        decoded.append(sample.error is None)
        if sample.error is None:
            images.append(train_transform(sample.image, image_size, random.Random(seed)))
            labels.append(label)
    if not images:
        out = torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    elif get_worker_info() is not None:  # in a process: stacked straight into shared memory, as
        first = images[0]                 # torch's default_collate does, so nothing is copied on the way back
        storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
        out = torch.stack(images, out=first.new(storage).resize_(len(images), *first.shape))
    else:
        out = torch.stack(images)
    return DecodedChunk(out, labels, chunk.reps, decoded, chunk.unreadable)


class ChunkAugmenter(Dataset):
    """A map-style dataset whose "index" is a chunk of raw samples (pickled to the process)."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __getitem__(self, chunk: RawChunk) -> DecodedChunk:
        return augment_chunk(chunk, self.image_size)


class ChunkSource:
    """The DataLoader's sampler: the epoch's chunks, ``budget`` at a time (iterated in the
    main process). When the budget is spent it stops, so the DataLoader's iterator ends
    after those chunks; the next ``iter(loader)`` goes on with a new budget."""

    def __init__(self) -> None:
        self.chunks: Iterator[RawChunk] = iter(())
        self.budget = 0

    def __iter__(self) -> "ChunkSource":
        return self

    def __next__(self) -> RawChunk:
        if self.budget <= 0:
            raise StopIteration
        self.budget -= 1
        return next(self.chunks)


def _as_is(item):
    return item


# --- the main process's side -----------------------------------------------------------


class SkipCounter:
    """Samples skipped in the current epoch: unreadable in the shard, or undecodable."""

    def __init__(self) -> None:
        self.unreadable = 0
        self.undecodable = 0

    @property
    def total(self) -> int:
        return self.unreadable + self.undecodable


def raw_samples(index: SplitIndex, *, rank: int, world: int, epoch: int, seed: int,
                buffer_size: int) -> Iterator[RawSample]:
    """The worker's share, pass after pass (each reshuffled), endlessly, undecoded. Each
    sample carries the count of unreadable ones read before it, so that counting follows
    the batches, not how far the reading ran ahead."""
    rep = 0
    unreadable = [0]

    def count_unreadable(_: Sample) -> None:
        unreadable[0] += 1

    while True:
        share = worker_share(index, rank, world, epoch * 1000 + rep, seed)
        rng = _epoch_rng("train", seed, epoch, rank, rep)
        got = 0
        for sample in shuffle_buffer(share_samples(share, on_error=count_unreadable), buffer_size, rng):
            yield RawSample(sample.key, sample.shard, sample.image_bytes, sample.label, rep,
                            f"augment-{seed}-{epoch}-{rank}-{rep}-{got}", unreadable[0])
            unreadable[0] = 0
            got += 1
        if got == 0:
            raise TrainDataError(
                f"worker {rank} of {world} found no readable training sample in its share of "
                f"--train-shards ({len(share.urls)} shard(s)): check the shards"
            )
        rep += 1


def full_batches(decode: Callable[[int], Iterator[DecodedChunk]], chunk_size: int, batch_size: int, steps: int,
                 skipped: SkipCounter, rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``steps`` batches of ``batch_size``; ``decode(n)`` gives the next ``n`` decoded
    chunks of ``chunk_size`` raw samples (fewer images where samples did not decode).

    Asks for just the chunks the missing batches need if every sample decodes, then again
    for what skipped samples left missing, so no process decodes past the epoch's end.
    Counts the skipped samples; a pass over the share with no decodable sample at all is an
    error (the stream would otherwise never fill a batch).
    """
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    have = done = 0
    rep, decoded_in_rep = 0, 0
    while done < steps:
        missing = (steps - done) * batch_size - have
        chunks = decode(-(-missing // chunk_size))
        try:
            for chunk in chunks:
                rep, decoded_in_rep = _check_pass(chunk, rep, decoded_in_rep, skipped, rank, world)
                if len(chunk.labels):
                    images.append(chunk.images)
                    labels.append(torch.tensor(chunk.labels, dtype=torch.int64))
                    have += len(chunk.labels)
                while have >= batch_size:
                    if len(images) == 1 and have == batch_size:  # the usual case: no copy
                        batch_images, batch_labels = images[0], labels[0]
                        images, labels = [], []
                    else:
                        all_images, all_labels = torch.cat(images), torch.cat(labels)
                        batch_images, batch_labels = all_images[:batch_size], all_labels[:batch_size]
                        images, labels = [all_images[batch_size:]], [all_labels[batch_size:]]
                    have -= batch_size
                    done += 1
                    yield batch_images, batch_labels
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()  # a prefetch thread: stopped and joined


def _check_pass(chunk: DecodedChunk, rep: int, decoded_in_rep: int, skipped: SkipCounter, rank: int,
                world: int) -> tuple[int, int]:
    """Count the chunk's skipped samples; fail on a whole pass over the share without an image."""
    skipped.unreadable += chunk.unreadable
    for r, ok in zip(chunk.reps, chunk.decoded):
        if r != rep:
            if decoded_in_rep == 0:
                raise TrainDataError(
                    f"worker {rank} of {world} found no decodable training image in a whole pass "
                    f"over its share of --train-shards ({skipped.undecodable} undecodable): check the shards"
                )
            rep, decoded_in_rep = r, 0
        decoded_in_rep += ok
        skipped.undecodable += not ok
    return rep, decoded_in_rep


class TrainLoader:
    """One Ray Train worker's training input for a whole run (the module docstring says how).

    ``epoch(e, steps)`` gives epoch ``e``'s batches; ``skipped`` counts the epoch's skipped
    samples. Use as a context manager, or call ``close()``: it stops the loader processes.
    """

    def __init__(self, index: SplitIndex, *, rank: int, world: int, seed: int, batch_size: int,
                 image_size: int, buffer_size: int = 1000, workers: int = 0, prefetch: int = 2,
                 mp_context: str = "forkserver") -> None:
        if workers < 0:
            raise ValueError(f"--loader-workers must be >= 0, got {workers}")
        self.index, self.rank, self.world, self.seed = index, rank, world, seed
        self.batch_size, self.image_size, self.buffer_size = batch_size, image_size, buffer_size
        self.workers, self.prefetch = workers, prefetch
        self.chunk_size = batch_size  # a clean chunk is a batch: no copy in full_batches
        self.skipped = SkipCounter()
        self._raw: Iterator | None = None
        self._batches: Iterator | None = None  # the current epoch's, closed before its reader
        self._loader: DataLoader | None = None
        self._source = ChunkSource()
        if workers > 0:
            self._loader = DataLoader(
                ChunkAugmenter(image_size), batch_size=None, sampler=self._source, num_workers=workers,
                collate_fn=_as_is, persistent_workers=True, prefetch_factor=CHUNKS_AHEAD,
                multiprocessing_context=_mp_context(mp_context),
                # Its own generator: the DataLoader draws a base seed on every epoch's reset, which
                # from the global one would shift the model's dropout/drop-path RNG with N.
                generator=torch.Generator().manual_seed(seed),
            )

    def epoch(self, epoch: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Exactly ``steps`` (uint8 B x 3 x S x S, int64 B) batches of epoch ``epoch``."""
        self._close_raw()
        self.skipped = SkipCounter()
        self._raw = raw_samples(self.index, rank=self.rank, world=self.world, epoch=epoch, seed=self.seed,
                                buffer_size=self.buffer_size)  # closed by the next epoch or close()
        chunks = (pack_chunk(c) for c in batches(self._raw, self.chunk_size))

        def decode(n: int) -> Iterator[DecodedChunk]:
            """The next ``n`` chunks, decoded; one round of reading and decoding."""
            if self._loader is None:
                decoded = (augment_chunk(c, self.image_size) for c in itertools.islice(chunks, n))
                return prefetched(decoded, self.prefetch) if self.prefetch > 0 else decoded
            self._source.chunks, self._source.budget = chunks, n
            return iter(self._loader)  # persistent processes: a reset, not a restart

        self._batches = full_batches(decode, self.chunk_size, self.batch_size, steps, self.skipped, self.rank,
                                     self.world)
        return self._batches

    def loader_pids(self) -> list[int]:
        """The loader processes' ids (empty before the first epoch and after ``close``)."""
        iterator = getattr(self._loader, "_iterator", None) if self._loader is not None else None
        return [w.pid for w in getattr(iterator, "_workers", [])] if iterator is not None else []

    def close(self) -> None:
        """Stop the loader processes (joined, terminated if they do not exit) and the reader."""
        self._close_raw()
        if self._loader is not None:
            iterator = getattr(self._loader, "_iterator", None)
            if iterator is not None:
                iterator._shutdown_workers()  # what DataLoader does on garbage collection
                self._loader._iterator = None
            self._loader = None

    def _close_raw(self) -> None:
        if self._batches is not None:
            self._batches.close()  # an abandoned epoch: its prefetch thread stops reading first
            self._batches = None
        if self._raw is not None:
            self._raw.close()  # closes the shard being read
            self._raw = None

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _mp_context(name: str):
    """A multiprocessing context whose processes start clean (no copied threads or locks)."""
    if name == "forkserver" and "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # Import torch and this module once in the server; each loader process forks from it.
        ctx.set_forkserver_preload(["pipeline.train.loader"])
        return ctx
    return multiprocessing.get_context("spawn" if name == "forkserver" else name)


def train_batches(index: SplitIndex, *, rank: int, world: int, epoch: int, seed: int, batch_size: int,
                  steps: int, image_size: int, buffer_size: int = 1000, prefetch: int = 2,
                  loader_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch's exactly ``steps`` augmented batches; the loader lives as long as the iterator."""
    with TrainLoader(index, rank=rank, world=world, seed=seed, batch_size=batch_size, image_size=image_size,
                     buffer_size=buffer_size, workers=loader_workers, prefetch=prefetch) as loader:
        yield from loader.epoch(epoch, steps)
