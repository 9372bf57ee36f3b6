"""One shard -> one Parquet file: the work a localize actor does, free of Ray.

Flow: ``read_samples(decode=False)`` streams raw samples in a reader thread, which hands
each one to a decode pool (decode + resize to the model input, ``pipeline.data.preprocess``).
Futures wait in a bounded queue in shard order, so decoding runs ahead of the model by at
most ``prefetch_batches`` batches while the model (which releases the GIL) works on the
current one. Good samples are batched, run under autocast, turned into rows
(``localize_rows``) and the whole shard is written as one Parquet file with a single
atomic write (``write_bytes_atomic``): the file's existence means the shard is done.
"""
from __future__ import annotations

import io
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from model.factory import model_kwargs
from model.precision import PRECISIONS, autocast_for
from pipeline.data.handoff import Handoff
from pipeline.localize.rows import RowSettings, localize_rows
from pipeline.localize.messages import ShardJob, ShardResult
from pipeline.data.preprocess import ResizeCrop, normalize, resize_to_input, stack_uint8
from pipeline.data.reader import Sample, decode_sample, read_samples
from pipeline.results.schema import localize_schema
from pipeline.data.storage import exists, read_parquet, read_parquet_metadata, write_bytes_atomic

# Parquet key-value metadata: the run attempt that wrote the file (see ShardJob.write_token).
WRITE_TOKEN_KEY = b"satloc.write_token"
# Dictionary encoding pays for the repeated strings only, not for the map or the floats.
_DICTIONARY_COLUMNS = ["shard", "status", "error", "class_name", "model_sha256", "threshold"]


@dataclass(frozen=True)
class WorkerSettings:
    batch_size: int = 64
    precision: str = "fp32"
    decode_threads: int = 1
    prefetch_batches: int = 2
    run_id: str = ""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.decode_threads < 1 or self.prefetch_batches < 1:
            raise ValueError("decode_threads and prefetch_batches must be >= 1")


def input_size(config: dict) -> int:
    """Side of the square model input, from the checkpoint config."""
    return int(model_kwargs(config["model"], **config.get("model_kwargs", {}))["img_size"])


def grid_shape(config: dict) -> tuple[int, int]:
    kwargs = model_kwargs(config["model"], **config.get("model_kwargs", {}))
    side = int(kwargs["img_size"]) // int(kwargs["patch_size"])
    return side, side


@dataclass
class _Prepared:
    sample: Sample  # image dropped once resized
    pixels: torch.Tensor | None  # 3 x S x S uint8, None for bad samples


def prepare_sample(sample: Sample, size: int, resize_crop: ResizeCrop | None = None) -> _Prepared:
    """Decode (JPEG drafted near ``size``) and resize one raw sample; thread-safe.

    With ``resize_crop`` the input is its centre crop (``size`` must be its crop size).
    """
    decoded = decode_sample(sample, draft_size=resize_crop.resize if resize_crop else size)
    if not decoded.ok:
        return _Prepared(replace(decoded, image=None, mask=None), None)
    try:
        pixels = resize_crop.to_input(decoded.image) if resize_crop else resize_to_input(decoded.image, size)
    except Exception as e:  # a decoded image PIL cannot resize is still one bad sample
        return _Prepared(replace(decoded, image=None, mask=None, error=f"unusable image: {e}"), None)
    return _Prepared(replace(decoded, image=None, mask=None), pixels)


def prepared_samples(
    url: str, size: int, pool: ThreadPoolExecutor, max_pending: int, resize_crop: ResizeCrop | None = None
) -> Iterator[_Prepared]:
    """Samples of ``url`` decoded by ``pool``, in shard order, at most ``max_pending`` ahead.

    A reader thread streams the tar and submits decode work; errors reading the shard
    (missing, not a tar, network) are raised here, in the consumer.
    """
    pending = Handoff(max_pending)

    def read() -> None:
        try:
            for raw in read_samples(url, decode=False):
                if not pending.put(pool.submit(prepare_sample, raw, size, resize_crop)):
                    return
            pending.finish()
        except BaseException as e:  # handed to the consumer, which raises it
            pending.fail(e)

    reader = threading.Thread(target=read, name=f"read {url}", daemon=True)
    reader.start()
    try:
        for future in pending.items():
            yield future.result()
    finally:
        pending.close(reader, timeout=30)


class ShardLocalizer:
    """Holds one model replica; ``localize(job)`` does one whole shard."""

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
        self.size = input_size(config)
        self.grid = grid_shape(config)
        frame = row_settings.resize_crop
        if frame is not None and frame.crop != self.size:
            raise ValueError(
                f"--resize-crop {frame.resize},{frame.crop}: the crop must be the model input ({self.size})"
            )
        self.schema = localize_schema(
            *self.grid, run_id=settings.run_id, resize_crop=(frame.resize, frame.crop) if frame else None
        )
        self.mean = tuple(config.get("mean", (0.485, 0.456, 0.406)))
        self.std = tuple(config.get("std", (0.229, 0.224, 0.225)))
        self.pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode")
        self.rows_pool = ThreadPoolExecutor(1, thread_name_prefix="rows")
        self.images_done = 0  # live progress inside the current shard

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.rows_pool.shutdown(wait=False, cancel_futures=True)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """B x 3 x S x S uint8 -> (logits, loc_maps) as float32 on the CPU."""
        if self.device.type == "cpu":
            x = normalize(pixels, self.mean, self.std)
        else:  # the same maths on the device: moving uint8 is 4x cheaper than float
            m = torch.tensor(self.mean, device=self.device).view(-1, 1, 1) * 255.0
            s = torch.tensor(self.std, device=self.device).view(-1, 1, 1) * 255.0
            x = (pixels.to(self.device, non_blocking=True).to(torch.float32) - m) / s
        with autocast_for(self.settings.precision, self.device):
            out = self.model(x)
        return out.logits.float().cpu(), out.loc_map.float().cpu()

    def already_written(self, job: ShardJob) -> bool:
        if not exists(job.out_url):
            return False
        if not job.overwrite:
            return True
        return bool(job.write_token) and written_by(job.out_url) == job.write_token

    def localize(self, job: ShardJob) -> ShardResult:
        start = time.perf_counter()
        result = ShardResult(job.shard_url, job.out_url)
        self.images_done = 0
        if self.already_written(job):
            rows, errors = output_counts(job.out_url)
            result.rows, result.errors, result.skipped = rows, errors, True
            result.seconds = time.perf_counter() - start
            return result
        # Rows (boxes at full image size) of batch k are built in the rows thread while
        # the model runs batch k+1; at most two batches wait there.
        row_futures: deque[Future] = deque()
        tables: list[pa.Table] = []
        batch: list[_Prepared] = []

        def flush() -> None:
            ok = [p.pixels for p in batch if p.pixels is not None]
            t0 = time.perf_counter()
            if ok:
                logits, maps = self.forward(stack_uint8(ok))
            else:
                logits, maps = torch.zeros(0, 1), torch.zeros(0, 1, *self.grid)
            result.model_seconds += time.perf_counter() - t0
            samples = [p.sample for p in batch]
            row_futures.append(
                self.rows_pool.submit(localize_rows, samples, logits, maps, self.row_settings, self.schema)
            )
            while len(row_futures) > 2:
                tables.append(row_futures.popleft().result())
            self.images_done += len(ok)

        max_pending = self.settings.batch_size * self.settings.prefetch_batches
        stream = prepared_samples(job.shard_url, self.size, self.pool, max_pending, self.row_settings.resize_crop)
        good = 0
        while True:
            t0 = time.perf_counter()
            item = next(stream, None)
            result.decode_wait_seconds += time.perf_counter() - t0
            if item is None:
                break
            batch.append(item)
            good += item.pixels is not None
            if good >= self.settings.batch_size:
                flush()
                batch, good = [], 0
        if batch:
            flush()
        tables.extend(f.result() for f in row_futures)

        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        t0 = time.perf_counter()
        data = parquet_bytes(table, job.write_token)
        write_bytes_atomic(job.out_url, data)
        result.write_seconds = time.perf_counter() - t0
        result.rows = table.num_rows
        result.errors = error_count(table["status"])
        result.bytes_written = len(data)
        result.seconds = time.perf_counter() - start
        return result


def parquet_bytes(table: pa.Table, write_token: str = "") -> bytes:
    """The finished Parquet file (zstd, dictionary-encoded strings) as bytes."""
    if write_token:
        meta = dict(table.schema.metadata or {})
        meta[WRITE_TOKEN_KEY] = write_token.encode()
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression="zstd",
        use_dictionary=_DICTIONARY_COLUMNS,
        write_statistics=["key", "status", "label", "score", "fg_ratio", "gt_label"],
    )
    return buf.getvalue()


def error_count(status: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.not_equal(status, "ok")).as_py() or 0)


def written_by(url: str) -> str | None:
    """The write token stored in an output file's footer, or None."""
    token = read_parquet_metadata(url).get(WRITE_TOKEN_KEY)
    return token.decode() if token else None


def output_counts(url: str) -> tuple[int, int]:
    """(rows, error rows) of a finished output file (reads only its status column)."""
    status = read_parquet(url, columns=["status"])["status"]
    return len(status), error_count(status)
