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

import multiprocessing
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

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


class DecodedChunk(NamedTuple):
    images: torch.Tensor  # uint8 k x 3 x S x S, the decodable samples of the chunk, in order
    labels: torch.Tensor  # int64 k
    reps: list[int]  # the pass of every sample of the chunk, decoded or not, in order
    decoded: list[bool]  # whether it decoded
    unreadable: int  # samples of the shards skipped before the chunk's ones (read errors)


def augment_chunk(chunk: list[RawSample], image_size: int) -> DecodedChunk:
    """Decode and augment a chunk (in a loader process, or the prefetch thread)."""
    import random

    images, labels, decoded = [], [], []
    for raw in chunk:
        sample = decode_sample(Sample(key=raw.key, shard=raw.shard, label=raw.label, image_bytes=raw.image_bytes))
        decoded.append(sample.error is None)
        if sample.error is None:
            images.append(train_transform(sample.image, image_size, random.Random(raw.seed)))
            labels.append(raw.label)
    stacked = torch.stack(images) if images else torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    return DecodedChunk(stacked, torch.tensor(labels, dtype=torch.int64), [r.rep for r in chunk], decoded,
                        sum(r.unreadable_before for r in chunk))


class ChunkAugmenter(Dataset):
    """A map-style dataset whose "index" is a chunk of raw samples (pickled to the process)."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __getitem__(self, chunk: list[RawSample]) -> DecodedChunk:
        return augment_chunk(chunk, self.image_size)


class ChunkSource:
    """The DataLoader's sampler: the current epoch's chunks (iterated in the main process)."""

    def __init__(self) -> None:
        self.chunks: Iterator[list[RawSample]] = iter(())

    def __iter__(self) -> Iterator[list[RawSample]]:
        return self.chunks


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


def chunked(items: Iterator, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def full_batches(chunks: Iterator[DecodedChunk], batch_size: int, steps: int, skipped: SkipCounter,
                 rank: int, world: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Exactly ``steps`` batches of ``batch_size`` from decoded chunks of any size.

    Counts the undecodable samples; a pass over the share with no decodable sample at all
    is an error (the stream would otherwise never fill a batch).
    """
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    have = done = 0
    rep, decoded_in_rep = 0, 0
    for chunk in chunks:
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
        if len(chunk.labels):
            images.append(chunk.images)
            labels.append(chunk.labels)
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
            yield batch_images, batch_labels
            done += 1
            if done == steps:
                return


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
        raw = raw_samples(self.index, rank=self.rank, world=self.world, epoch=epoch, seed=self.seed,
                          buffer_size=self.buffer_size)
        chunks = chunked(raw, self.chunk_size)
        if self._loader is None:
            decoded = (augment_chunk(c, self.image_size) for c in chunks)
            # The prefetch thread reads, and closes the reader when it stops.
            decoded = prefetched(decoded, self.prefetch) if self.prefetch > 0 else decoded
        else:
            self._raw = raw  # read in this thread as the DataLoader asks: closed by the next epoch
            self._source.chunks = chunks
            decoded = iter(self._loader)  # persistent processes: a reset, not a restart
        return self._batches(decoded, steps)

    def _batches(self, decoded: Iterator[DecodedChunk], steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from full_batches(decoded, self.batch_size, steps, self.skipped, self.rank, self.world)
        finally:
            if self._loader is None:
                decoded.close()  # stops the prefetch thread (and its reader)

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
