"""rows -> Parquet: a shard's finished Table becomes one file, written in one atomic step.

``write_shard_table(url, table, write_token)`` is the stage; ``parquet_bytes`` the
encoding (zstd, dictionary-encoded strings, statistics on the columns people filter on).
The file's existence means the shard is done (DESIGN §3), so it is written whole or not
at all (``pipeline.data.storage.write_bytes_atomic``). ``written_by`` and
``output_counts`` read back what a finished file says about itself; ``unfinished_reason``
says why a file present in the run directory does not count as done (DESIGN §3: done
means readable, with the rows its manifest entry records).
"""
from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.storage import (
    ParquetReadError,
    parquet_row_count,
    read_parquet,
    read_parquet_metadata,
    write_bytes_atomic,
)

# Parquet key-value metadata: the run attempt that wrote the file (see ShardJob.write_token).
WRITE_TOKEN_KEY = b"satloc.write_token"
# Dictionary encoding pays for the repeated strings only, not for the map or the floats.
_DICTIONARY_COLUMNS = ["shard", "status", "error", "class_name", "model_sha256", "threshold"]
_STATISTICS_COLUMNS = ["key", "status", "label", "score", "fg_ratio", "gt_label"]


def parquet_bytes(table: pa.Table, write_token: str = "") -> bytes:
    """The finished Parquet file (zstd, dictionary-encoded strings) as bytes."""
    if write_token:
        meta = dict(table.schema.metadata or {})
        meta[WRITE_TOKEN_KEY] = write_token.encode()
        table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(
        table, buf, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS, write_statistics=_STATISTICS_COLUMNS
    )
    return buf.getvalue()


def write_shard_table(url: str, table: pa.Table, write_token: str = "") -> int:
    """Write one shard's rows to ``url`` atomically; the number of bytes written."""
    data = parquet_bytes(table, write_token)
    write_bytes_atomic(url, data)
    return len(data)


def error_count(status: pa.ChunkedArray) -> int:
    return int(pc.sum(pc.not_equal(status, "ok")).as_py() or 0)


def written_by(url: str) -> str | None:
    """The write token stored in an output file's footer, or None (also when it does not read)."""
    try:
        token = read_parquet_metadata(url).get(WRITE_TOKEN_KEY)
    except ParquetReadError:
        return None
    return token.decode() if token else None


def unfinished_reason(url: str, expected_rows: int | None = None) -> str | None:
    """None when the output file at ``url`` is done: its footer reads and, when
    ``expected_rows`` (the manifest's count) is given, records that many rows. Otherwise
    why it must be redone."""
    try:
        rows = parquet_row_count(url)
    except ParquetReadError as e:
        return f"{e.url} does not read as Parquet: {e.reason}"
    except FileNotFoundError:
        return f"{url} does not exist"
    if expected_rows is not None and rows != expected_rows:
        return f"{url} holds {rows} rows but the run's manifest records {expected_rows}"
    return None


def output_counts(url: str) -> tuple[int, int]:
    """(rows, error rows) of a finished output file (reads only its status column)."""
    status = read_parquet(url, columns=["status"])["status"]
    return len(status), error_count(status)
