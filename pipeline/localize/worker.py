"""The localize predictor, free of Ray: a model replica that turns batches into rows.

Ray's batch-inference shape: ``ShardLocalizer.__init__`` holds the model once and
``__call__(batch) -> pa.Table`` turns one batch of prepared samples into rows.
``localize(job)`` runs one whole shard through the stages:

    shard URL -> samples    ``prepared_samples`` (``read_samples(decode=False)`` in a reader
                            thread, decode + resize per sample in a pool, ``--decode cpu``) or
                            ``batch_prepared_samples`` (JPEGs in chunks on the actor's device,
                            the rest per sample in the pool; ``pipeline.localize.decode``)
    samples -> batches      ``pipeline.data.batches.batches`` (``batch_size`` good samples;
                            bad ones ride along in shard order)
    batches -> outputs      ``ShardLocalizer.predict`` (normalize, autocast, the model)
    outputs -> rows         ``ShardLocalizer.rows`` (``localize_rows``)
    rows -> Parquet         ``pipeline.results.parquet.write_shard_table``

Decoding runs ahead of the model by at most ``prefetch_batches`` batches while the model
(which releases the GIL) works on the current one; the time the model stage waits for
decoded samples and the time in the model are kept per shard (``ShardResult``), so the
driver can say which side bounds the run, and the rows of batch k are built in a
rows thread while the model runs batch k+1. The shard is written as one Parquet file with a
single atomic write: the file's existence means the shard is done.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import nn

from model.factory import model_kwargs
from model.precision import autocast_for
from pipeline.data.batches import batches
from pipeline.data.handoff import Handoff
from pipeline.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, ResizeCrop, normalize, stack_uint8
from pipeline.data.reader import Sample, read_samples
from pipeline.data.storage import exists
from pipeline.localize.decode import BatchDecoder, Prepared, prepare_sample, resolve_decode
from pipeline.localize.messages import ShardJob, ShardResult
from pipeline.localize.rows import RowSettings, gt_label_check, localize_rows
from pipeline.results.parquet import error_count, output_counts, unfinished_reason, write_shard_table, written_by
from pipeline.results.schema import localize_schema


@dataclass(frozen=True)
class WorkerSettings:
    """How an actor runs (derived from the checked ``LocalizeConfig``; precision resolved)."""

    batch_size: int = 64
    precision: str = "fp32"
    decode_threads: int = 1
    prefetch_batches: int = 2
    run_id: str = ""
    decode: str = "cpu"  # auto | cpu | gpu | batched (pipeline.localize.decode.resolve_decode)


def model_input_size(config: dict) -> int:
    """Side of the square model input, from the checkpoint config."""
    return int(model_kwargs(config["model"], **config.get("model_kwargs", {}))["img_size"])


def grid_shape(config: dict) -> tuple[int, int]:
    kwargs = model_kwargs(config["model"], **config.get("model_kwargs", {}))
    side = int(kwargs["img_size"]) // int(kwargs["patch_size"])
    return side, side


def prepared_samples(
    url: str, size: int, pool: ThreadPoolExecutor, max_pending: int, resize_crop: ResizeCrop | None = None
) -> Iterator[Prepared]:
    """Samples of ``url`` decoded by ``pool``, in shard order, at most ``max_pending`` ahead.

    A reader thread streams the tar and submits decode work; errors reading the shard
    (missing, not a tar, network) are raised here, in the consumer.
    """
    submitted = (pool.submit(prepare_sample, raw, size, resize_crop) for raw in read_samples(url, decode=False))
    for future in read_ahead(url, submitted, max_pending):
        yield future.result()


def batch_prepared_samples(
    url: str, decoder: BatchDecoder, pool: ThreadPoolExecutor, device_pool: ThreadPoolExecutor,
    chunk_size: int, max_chunks: int,
) -> Iterator[Prepared]:
    """Samples of ``url`` in shard order, decoded ``chunk_size`` at a time by ``decoder`` in
    ``device_pool`` (one thread), CPU fallbacks in ``pool``, at most ``max_chunks`` ahead."""

    submitted = (device_pool.submit(decoder.decode_chunk, chunk, pool.submit)
                 for chunk in batches(read_samples(url, decode=False), chunk_size))
    for chunk_future in read_ahead(url, submitted, max_chunks):
        for item in chunk_future.result():
            yield item.result() if isinstance(item, Future) else item


def read_ahead(url: str, futures: Iterator[Future], max_pending: int) -> Iterator[Future]:
    """``futures`` (which read the shard ``url``) advanced in a reader thread, at most
    ``max_pending`` ahead, in order; an error reading the shard is raised here, in the consumer."""
    pending = Handoff(max_pending)

    def read() -> None:
        try:
            for future in futures:
                if not pending.put(future):
                    return
            pending.finish()
        except BaseException as e:  # handed to the consumer, which raises it
            pending.fail(e)

    reader = threading.Thread(target=read, name=f"read {url}", daemon=True)
    reader.start()
    try:
        yield from pending.items()
    finally:
        pending.close(reader, timeout=30)


@dataclass
class ModelOutputs:
    """One batch after the model: the samples in order and the outputs of the good ones."""

    samples: list[Sample]
    logits: torch.Tensor  # n_good x classes, float32 on the CPU
    loc_maps: torch.Tensor  # n_good x 1 x h x w


class ShardLocalizer:
    """Holds one model replica: ``self(batch)`` -> rows; ``localize(job)`` does one whole shard."""

    def __init__(
        self,
        model: nn.Module,
        config: dict,
        settings: WorkerSettings,
        row_settings: RowSettings,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        autocast_for(settings.precision, self.device)  # fail now, not on the first batch
        self.model = model.to(self.device).eval()
        self.config = config
        self.settings = settings
        self.row_settings = row_settings
        self.size = model_input_size(config)
        self.grid = grid_shape(config)
        frame = row_settings.resize_crop
        if frame is not None and frame.crop != self.size:
            raise ValueError(
                f"--resize-crop {frame.resize},{frame.crop}: the crop must be the model input ({self.size})"
            )
        self.schema = localize_schema(
            *self.grid, run_id=settings.run_id, resize_crop=(frame.resize, frame.crop) if frame else None
        )
        self.mean = tuple(config.get("mean", IMAGENET_MEAN))
        self.std = tuple(config.get("std", IMAGENET_STD))
        self.decode = resolve_decode(settings.decode, self.device)
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.device_pool = ThreadPoolExecutor(1, thread_name_prefix="batch-decode")
        self.decoder = BatchDecoder(self.size, self.device, frame)
        self.rows_pool = ThreadPoolExecutor(1, thread_name_prefix="rows")
        self.images_done = 0  # live progress inside the current shard

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.device_pool.shutdown(wait=False, cancel_futures=True)
        self.rows_pool.shutdown(wait=False, cancel_futures=True)

    def __call__(self, batch: list[Prepared]) -> pa.Table:
        """One batch of prepared samples -> its rows, in the run's schema."""
        return self.rows(self.predict(batch))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x 3 x S x S uint8 -> (logits, loc_maps) as float32 on the CPU."""
        # Normalized on the device: moving uint8 is 4x cheaper than float. From pinned
        # memory (``batch_pixels``) the copy is asynchronous.
        x = normalize(pixels.to(self.device, non_blocking=True), self.mean, self.std)
        with autocast_for(self.settings.precision, self.device):
            out = self.model(x)
        return out.logits.float().cpu(), out.loc_map.float().cpu()

    def predict(self, batch: list[Prepared]) -> ModelOutputs:
        """batches -> outputs: the model on the batch's good samples."""
        ok = [p.pixels for p in batch if p.pixels is not None]
        if ok:
            logits, maps = self.forward(self.batch_pixels(ok))
        else:
            logits, maps = torch.zeros(0, 1), torch.zeros(0, 1, *self.grid)
        return ModelOutputs([p.sample for p in batch], logits, maps)

    def batch_pixels(self, pixels: list[torch.Tensor]) -> torch.Tensor:
        """One uint8 batch: on the device when any sample was decoded there, else on the CPU,
        stacked into pinned memory when the model runs on CUDA (for a non-blocking copy)."""
        if any(p.device != torch.device("cpu") for p in pixels):
            return stack_uint8([p.to(self.device, non_blocking=True) for p in pixels])
        if self.device.type != "cuda":
            return stack_uint8(pixels)
        pinned = torch.empty((len(pixels), *pixels[0].shape), dtype=torch.uint8, pin_memory=True)
        try:
            return torch.stack(pixels, out=pinned)
        except RuntimeError:  # shapes or dtypes differ: stack_uint8 names the sample
            return stack_uint8(pixels)

    def rows(self, outputs: ModelOutputs) -> pa.Table:
        """outputs -> rows (boxes at each image's full size)."""
        return localize_rows(outputs.samples, outputs.logits, outputs.loc_maps, self.row_settings, self.schema)

    def already_written(self, job: ShardJob) -> bool:
        """Done: the output exists and reads (a zero-byte or cut file is redone) and, with
        ``overwrite``, was written by this run's earlier try."""
        if not exists(job.out_url) or unfinished_reason(job.out_url) is not None:
            return False
        if not job.overwrite:
            return True
        return bool(job.write_token) and written_by(job.out_url) == job.write_token

    def localize(self, job: ShardJob) -> ShardResult:
        """One shard -> one Parquet file (or nothing, when its output is already there)."""
        start = time.perf_counter()
        result = ShardResult(job.shard_url, job.out_url)
        self.images_done = 0
        if self.already_written(job):
            result.rows, result.errors = output_counts(job.out_url)
            result.skipped = True
        else:
            table = self.shard_table(job.shard_url, result)
            t0 = time.perf_counter()
            result.bytes_written = write_shard_table(job.out_url, table, job.write_token)
            result.write_seconds = time.perf_counter() - t0
            result.rows, result.errors = table.num_rows, error_count(table["status"])
            result.gt_labels_outside, result.gt_label_range = gt_label_check(
                table["gt_label"], int(self.config["num_classes"])
            )
        result.seconds = time.perf_counter() - start
        return result

    def shard_table(self, shard_url: str, result: ShardResult) -> pa.Table:
        """All rows of one shard; the time spent waiting for decodes and in the model go to ``result``."""
        settings = self.settings
        result.decode = self.decode
        before = dict(self.decoder.counts)
        if self.decode == "batched":
            samples = batch_prepared_samples(
                shard_url, self.decoder, self.pool, self.device_pool, settings.batch_size, settings.prefetch_batches
            )
        else:
            max_pending = settings.batch_size * settings.prefetch_batches
            samples = prepared_samples(shard_url, self.size, self.pool, max_pending, self.row_settings.resize_crop)
        stream = batches(samples, self.settings.batch_size, counts=lambda p: p.pixels is not None)
        # At most two batches wait in the rows thread while the model runs the next one.
        pending: deque[Future] = deque()
        tables: list[pa.Table] = []
        while True:
            t0 = time.perf_counter()
            batch = next(stream, None)
            result.decode_wait_seconds += time.perf_counter() - t0
            if batch is None:
                break
            t0 = time.perf_counter()
            outputs = self.predict(batch)
            result.model_seconds += time.perf_counter() - t0
            pending.append(self.rows_pool.submit(self.rows, outputs))
            while len(pending) > 2:
                tables.append(pending.popleft().result())
            self.images_done += len(outputs.logits)
        tables.extend(f.result() for f in pending)
        if self.decode == "batched":
            result.decode_fallbacks = self.decoder.counts["cpu"] - before["cpu"]
        return pa.concat_tables(tables) if tables else self.schema.empty_table()
