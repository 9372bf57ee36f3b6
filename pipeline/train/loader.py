"""Training input in parallel processes: one Ray Train worker's raw samples -> N decode
processes -> exactly ``steps`` augmented batches per epoch (docs/architecture.md,
"Training input").

- **The main process reads.** It streams the worker's share exactly as
  ``pipeline.train.data`` defines it (``worker_share``, ``share_samples``,
  ``shuffle_buffer``): undecoded bytes, cheap. It cuts the stream into chunks of raw
  samples, each sample carrying its own augmentation seed.
- **N loader processes decode and augment.** A torch ``DataLoader`` whose "indices" are
  those chunks sends each chunk to one of N worker processes, which decode the JPEGs and
  run ``train_transform``; results come back in order, so the batches do not depend on N.
  A chunk's bytes and its images travel in reused shared-memory slots (``ChunkSlots``),
  not through the DataLoader's pipe and fresh segments. N = 0 runs the same chunk
  function in one background thread (the old path).
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
import os
import random
import sys
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
# A slot's input buffer holds a chunk of JPEGs up to this size per image on average
# (ImageNet's mean is about 110 KB); a larger chunk travels through the pipe instead.
SLOT_INPUT_BYTES_PER_IMAGE = 192 * 1024
SHARED_MEMORY = "/dev/shm"


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
    """A chunk of raw samples as it travels to a process. Its image bytes lie back to back
    in its slot's input buffer (``slot`` >= 0, ``data`` empty), or, when no slot is free or
    they do not fit, in ``data``, pickled through the DataLoader's pipe."""

    data: bytes
    ends: list[int]  # where each sample's bytes end, in ``data`` or the slot's input
    labels: list[int]
    reps: list[int]
    seeds: list[str]
    unreadable: int  # unreadable samples of the shards read before the chunk's ones
    slot: int = -1  # its shared-memory slot (ChunkSlots), -1 for none
    in_slot: bool = False  # whether its bytes are in the slot's input buffer
    ticket: int = -1  # its number among the chunks handed out with a slot


def pack_chunk(samples: list[RawSample], slot: int = -1, inputs: torch.Tensor | None = None,
               ticket: int = -1) -> RawChunk:
    """A chunk of ``samples``; with a ``slot``, its bytes go into ``inputs[slot]`` if they fit."""
    ends = np.cumsum([len(s.image_bytes) for s in samples]).tolist()
    meta = ([s.label for s in samples], [s.rep for s in samples], [s.seed for s in samples],
            sum(s.unreadable_before for s in samples))
    if slot >= 0 and inputs is not None and ends and ends[-1] <= inputs.shape[1]:
        buffer, start = inputs[slot].numpy(), 0
        for s, end in zip(samples, ends):
            buffer[start:end] = np.frombuffer(s.image_bytes, np.uint8)
            start = end
        return RawChunk(b"", ends, *meta, slot=slot, in_slot=True, ticket=ticket)
    return RawChunk(b"".join(s.image_bytes for s in samples), ends, *meta, slot=slot, ticket=ticket)


class DecodedChunk(NamedTuple):
    images: torch.Tensor  # uint8 k x 3 x S x S, the decodable samples of the chunk, in order
    labels: list[int]  # k (a list: a tensor would cost one more shared-memory hand-over)
    reps: list[int]  # the pass of every sample of the chunk, decoded or not, in order
    decoded: list[bool]  # whether it decoded
    unreadable: int  # samples of the shards skipped before the chunk's ones (read errors)
    slot: int = -1  # >= 0: the images are in that slot's output buffer, ``images`` is empty


def augment_chunk(chunk: RawChunk, image_size: int, slots: "ChunkSlots | None" = None) -> DecodedChunk:
    """Decode and augment a chunk (in a loader process, or the prefetch thread). A chunk
    with a slot is read from and written into that slot's buffers."""
    has_slot = slots is not None and chunk.slot >= 0
    data = memoryview(slots.inputs[chunk.slot].numpy() if has_slot and chunk.in_slot else chunk.data)
    out = slots.outputs[chunk.slot] if has_slot else None
    images, labels, decoded = [], [], []
    start = 0
    for end, label, seed in zip(chunk.ends, chunk.labels, chunk.seeds):
        sample = decode_sample(Sample(key="", shard="", label=label, image_bytes=bytes(data[start:end])))
        start = end
        decoded.append(sample.error is None)
        if sample.error is None:
            image = train_transform(sample.image, image_size, random.Random(seed))
            if out is not None:
                out[len(labels)].copy_(image)
            else:
                images.append(image)
            labels.append(label)
    if out is not None:
        slots.finished[chunk.slot] = chunk.ticket  # after the last write into the slot
        return DecodedChunk(torch.empty(0, dtype=torch.uint8), labels, chunk.reps, decoded, chunk.unreadable, chunk.slot)
    if not images:
        stacked = torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    elif get_worker_info() is not None:  # in a process: stacked straight into shared memory, as
        first = images[0]                 # torch's default_collate does, so nothing is copied on the way back
        storage = first._typed_storage()._new_shared(len(images) * first.numel(), device=first.device)
        stacked = torch.stack(images, out=first.new(storage).resize_(len(images), *first.shape))
    else:
        stacked = torch.stack(images)
    return DecodedChunk(stacked, labels, chunk.reps, decoded, chunk.unreadable)


class ChunkSlots:
    """Shared-memory buffers a chunk travels in, reused chunk after chunk: slot ``i`` has an
    input (the chunk's JPEG bytes, ``input_bytes`` at most) and an output (its images).

    Why: a fresh shared-memory segment per batch costs a page fault on every page of it, and
    a chunk's bytes through the DataLoader's pipe cost dozens of 64 KiB round trips between
    the processes: together about 0.1 ms of CPU per image, 4% of decoding one
    (bench/bench_ingest.py). The loader processes receive the buffers once, when they start.

    Which slot is whose is the main process's bookkeeping. A chunk takes a slot when it is
    handed to the DataLoader (``acquire``) and gives it back once the main process has
    copied its images out (``release``), so no process writes into a slot something still
    reads. A chunk of an abandoned round (an epoch left early) never comes back; its slot
    is taken again only once its process has marked the chunk finished (``finished``, in
    shared memory), so nothing late can overwrite a reused slot. When no slot is free, a
    chunk travels the old way (pipe, fresh segment), which is always correct.
    """

    def __init__(self, count: int, chunk_size: int, image_size: int, input_bytes: int) -> None:
        self.inputs = torch.empty((count, input_bytes), dtype=torch.uint8).share_memory_()
        self.outputs = torch.empty((count, chunk_size, 3, image_size, image_size), dtype=torch.uint8).share_memory_()
        self.finished = torch.full((count,), -1, dtype=torch.int64).share_memory_()  # the ticket last done there
        self._free = list(range(count))
        self._holder = [-1] * count  # the ticket of the chunk holding each slot

    @staticmethod
    def nbytes(count: int, chunk_size: int, image_size: int, input_bytes: int) -> int:
        return count * (input_bytes + chunk_size * 3 * image_size * image_size)

    def acquire(self, ticket: int, round_start: int) -> int:
        """A free slot for chunk ``ticket``, or -1. Slots of chunks handed out before
        ``round_start`` (an earlier round, which can no longer deliver them) are reclaimed
        once their process has finished them."""
        for i, held in enumerate(self._holder):
            if 0 <= held < round_start and int(self.finished[i]) == held:
                self.release(i)
        if not self._free:
            return -1
        slot = self._free.pop(0)
        self._holder[slot] = ticket
        return slot

    def release(self, slot: int) -> None:
        self._holder[slot] = -1
        self._free.append(slot)

    def free(self) -> int:
        return len(self._free)

    def __getstate__(self) -> dict:  # to a loader process: the buffers, not the bookkeeping
        return {"inputs": self.inputs, "outputs": self.outputs, "finished": self.finished, "_free": [],
                "_holder": []}


class ChunkAugmenter(Dataset):
    """A map-style dataset whose "index" is a chunk of raw samples (pickled to the process)."""

    def __init__(self, image_size: int, slots: ChunkSlots | None = None) -> None:
        self.image_size, self.slots = image_size, slots

    def __getitem__(self, chunk: RawChunk) -> DecodedChunk:
        return augment_chunk(chunk, self.image_size, self.slots)


class ChunkSource:
    """The DataLoader's sampler: the epoch's chunks, ``budget`` at a time (iterated in the
    main process, when the DataLoader hands a chunk to a process: that is when a chunk
    takes a slot and is packed). When the budget is spent it stops, so the DataLoader's
    iterator ends after those chunks; the next ``iter(loader)`` goes on with a new budget."""

    def __init__(self, slots: ChunkSlots | None = None) -> None:
        self.chunks: Iterator[list[RawSample]] = iter(())
        self.budget = 0
        self.slots = slots
        self.sent = self.sent_in_slots = 0  # chunks handed out; of those, bytes in a slot
        self.round_start = 0  # ``sent`` when the current round began

    def __iter__(self) -> "ChunkSource":
        return self

    def __next__(self) -> RawChunk:
        if self.budget <= 0:
            raise StopIteration
        self.budget -= 1
        samples = next(self.chunks)
        if self.slots is None:
            return pack_chunk(samples)
        chunk = pack_chunk(samples, self.slots.acquire(self.sent, self.round_start), self.slots.inputs, self.sent)
        self.sent += 1
        self.sent_in_slots += chunk.in_slot
        return chunk


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
    ``pin_memory`` (for a step on a CUDA GPU) gives batches in page-locked memory, so their
    copy to the GPU runs beside the step.

    ``epoch(e, steps)`` gives epoch ``e``'s batches; ``skipped`` counts the epoch's skipped
    samples. Use as a context manager, or call ``close()``: it stops the loader processes.
    """

    def __init__(self, index: SplitIndex, *, rank: int, world: int, seed: int, batch_size: int,
                 image_size: int, buffer_size: int = 1000, workers: int = 0, prefetch: int = 2,
                 mp_context: str = "forkserver", pin_memory: bool = False) -> None:
        if workers < 0:
            raise ValueError(f"--loader-workers must be >= 0, got {workers}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True is for a training step on a CUDA GPU, and torch sees none here")
        self.pin_memory = pin_memory
        self.index, self.rank, self.world, self.seed = index, rank, world, seed
        self.batch_size, self.image_size, self.buffer_size = batch_size, image_size, buffer_size
        self.workers, self.prefetch = workers, prefetch
        self.chunk_size = batch_size  # a clean chunk is a batch: no copy in full_batches
        self.skipped = SkipCounter()
        self._raw: Iterator | None = None
        self._batches: Iterator | None = None  # the current epoch's, closed before its reader
        self._loader: DataLoader | None = None
        self.slots = _chunk_slots(workers * CHUNKS_AHEAD + 1, self.chunk_size, image_size) if workers > 0 else None
        self._source = ChunkSource(self.slots)
        if workers > 0:
            self._loader = DataLoader(
                ChunkAugmenter(image_size, self.slots), batch_size=None, sampler=self._source, num_workers=workers,
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
        chunks = batches(self._raw, self.chunk_size)

        def decode(n: int) -> Iterator[DecodedChunk]:
            """The next ``n`` chunks, decoded; one round of reading and decoding, in a
            background thread when ``prefetch`` > 0 (see ``_from_processes``)."""
            if self._loader is None:
                decoded = (augment_chunk(pack_chunk(c), self.image_size) for c in itertools.islice(chunks, n))
            else:
                self._source.chunks, self._source.budget, self._source.round_start = chunks, n, self._source.sent
                decoded = self._from_processes()
            if self.pin_memory:
                decoded = (c._replace(images=_pinned(c.images)) for c in decoded)
            return prefetched(decoded, self.prefetch) if self.prefetch > 0 else decoded

        self._batches = full_batches(decode, self.chunk_size, self.batch_size, steps, self.skipped, self.rank,
                                     self.world)
        return self._batches

    def _from_processes(self) -> Iterator[DecodedChunk]:
        """The round's chunks as the loader processes give them back, each one's images
        copied out of its slot (one memcpy), which frees the slot for a later chunk.

        Whoever iterates this also reads and packs the chunks the DataLoader hands out
        (``ChunkSource``): about 0.15 ms of CPU an image, 40 ms for a batch of 256, plus
        the copy-out. With ``prefetch`` > 0 that is the prefetch thread, so it overlaps
        the training step instead of adding to it (a GPU step leaves the thread idle
        while it waits for the GPU).
        """
        for chunk in iter(self._loader):  # persistent processes: a reset, not a restart
            if chunk.slot >= 0:
                view = self.slots.outputs[chunk.slot][: len(chunk.labels)]
                images = torch.empty(view.shape, dtype=view.dtype, pin_memory=self.pin_memory).copy_(view)
                self.slots.release(chunk.slot)
                chunk = chunk._replace(images=images, slot=-1)
            yield chunk

    def chunks_in_slots(self) -> tuple[int, int]:
        """(chunks whose bytes travelled in a shared-memory slot, chunks handed to processes)."""
        return self._source.sent_in_slots, self._source.sent

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


def _pinned(images: torch.Tensor) -> torch.Tensor:
    """``images`` in page-locked memory (a copy unless they are already), so the step's
    ``to(cuda, non_blocking=True)`` overlaps; torch's pinned allocator keeps a block until
    the copies reading it are done."""
    return images if images.is_pinned() else images.pin_memory()


def _chunk_slots(count: int, chunk_size: int, image_size: int) -> ChunkSlots | None:
    """The loader's reusable slots, or None (chunks then travel the old way) where the
    shared-memory file system has too little room for them, with a line saying so."""
    input_bytes = chunk_size * SLOT_INPUT_BYTES_PER_IMAGE
    need = ChunkSlots.nbytes(count, chunk_size, image_size, input_bytes)
    try:
        stat = os.statvfs(SHARED_MEMORY)
        room = stat.f_bavail * stat.f_frsize
    except OSError:
        room = None
    if room is not None and need > room // 2:  # a full /dev/shm kills with SIGBUS, not an error
        print(f"training input: {SHARED_MEMORY} has {room / 2**20:.0f} MiB free, less than twice the "
              f"{need / 2**20:.0f} MiB the loader's reusable buffers need, so each batch uses a fresh "
              "segment (slower); give the container more shared memory (docker --shm-size, or a "
              "memory-backed /dev/shm volume)", file=sys.stderr, flush=True)
        return None
    return ChunkSlots(count, chunk_size, image_size, input_bytes)


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
