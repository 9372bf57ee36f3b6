"""Where bytes live: one small API over local disk and object stores (DESIGN §2, §3).

Every URL goes through fsspec. S3 settings come only from the standard AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``),
read at call time, so a test that monkeypatches them gets a matching filesystem (fsspec
caches one instance per distinct set of options).
"""
from __future__ import annotations

import os
import tempfile
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

_S3_PROTOCOLS = ("s3", "s3a")
# Environment variables that configure storage. Ray workers get them as a call argument
# (``storage_env()`` -> ``apply_storage_env``), never through a runtime_env: Ray writes
# every runtime_env in plain text to runtime_env_agent.log, secret keys included.
STORAGE_ENV_PREFIXES = ("AWS_",)


class StorageError(OSError):
    """A URL cannot be read or written; the message says which endpoint/bucket and why."""


class ParquetReadError(ValueError):
    """A Parquet file that does not read (zero bytes, cut, not Parquet); names the file."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = url, reason
        super().__init__(
            f"cannot read Parquet file {url}: {reason} (a zero-byte or cut file, e.g. from an interrupted "
            "copy; rerun jobs/localize_shards.py with the same --run-id to redo it, or delete it)"
        )

    def __reduce__(self):  # pickles (Ray) with both arguments
        return type(self), (self.url, self.reason)


def _unreadable_parquet(url: str, e: Exception) -> ParquetReadError:
    return ParquetReadError(url, str(e))


def protocol_of(url: str) -> str:
    """``'s3'`` for ``s3://b/k``, ``'file'`` for plain paths and ``file://`` URLs."""
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def s3_endpoint() -> str | None:
    """The S3 endpoint URL from the environment, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def s3_storage_options() -> dict[str, Any]:
    """s3fs options built from the AWS variables.

    Listings are not cached: an incremental run must see shards that appeared since the
    filesystem object was created. A custom endpoint gets path-style addressing, which
    every S3-compatible server (SeaweedFS, MinIO, Ceph) accepts.
    """
    options: dict[str, Any] = {"use_listings_cache": False}
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        options["key"] = key
        options["secret"] = secret
        token = os.environ.get("AWS_SESSION_TOKEN")
        if token:
            options["token"] = token
    endpoint = s3_endpoint()
    if endpoint:
        options["endpoint_url"] = endpoint
        options["config_kwargs"] = {"s3": {"addressing_style": "path"}}
    region = _s3_region()
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def storage_env() -> dict[str, str]:
    """This process's storage variables (AWS_*), to hand to a Ray task or actor as an argument."""
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


def apply_storage_env(env: dict[str, str] | None) -> None:
    """Set the storage variables a Ray worker was handed (see ``storage_env``)."""
    os.environ.update(env or {})


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path inside it (no protocol)."""
    options = s3_storage_options() if protocol_of(url) in _S3_PROTOCOLS else {}
    return fsspec.core.url_to_fs(url, **options)


def join_url(base: str, *parts: str) -> str:
    """``join_url('s3://b/out/', 'run', 'x.parquet') == 's3://b/out/run/x.parquet'``."""
    url = base
    for part in parts:
        if not part:
            continue
        url = url.rstrip("/") + "/" + part.lstrip("/") if url else part
    return url


def exists(url: str) -> bool:
    fs, path = url_to_fs(url)
    return fs.exists(path)


def read_bytes(url: str) -> bytes:
    fs, path = url_to_fs(url)
    return fs.cat_file(path)


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file (any URL) as a table; reads only ``columns`` when given.

    Always single-threaded: pyarrow 26 reading through a Python file object (all of
    fsspec) on its thread pool aborts the interpreter at exit about one run in three
    ("terminate called without an active exception", exit 134), even after a clean
    return. One small file per call gains nothing from threads anyway.
    """
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        try:
            return pq.read_table(f, columns=columns, use_threads=False)
        except pa.ArrowException as e:
            error = e
        try:  # why: a footer that does not read is a zero-byte or cut file
            f.seek(0)
            pq.ParquetFile(f)
        except pa.ArrowException:
            raise _unreadable_parquet(url, error) from None
        raise ValueError(f"cannot read Parquet file {url}: {error}") from None


def read_parquet_metadata(url: str) -> dict[bytes, bytes]:
    """The key/value metadata in a Parquet file's footer (reads only the footer)."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        try:
            return dict(pq.ParquetFile(f).schema_arrow.metadata or {})
        except pa.ArrowException as e:
            raise _unreadable_parquet(url, e) from None


def parquet_row_count(url: str) -> int:
    """Rows a Parquet file's footer records (reads only the footer); ParquetReadError
    naming the file when the footer does not read."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as f:
        try:
            return pq.ParquetFile(f).metadata.num_rows
        except pa.ArrowException as e:
            raise _unreadable_parquet(url, e) from None


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file.

    Local: a temp file in the same directory, then ``os.replace`` (atomic on POSIX).
    Object stores: one PUT of the finished bytes, which the store makes visible at once.
    """
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs are shared files
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def _s3_bucket(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


# The bucket check answers within seconds, also when the endpoint does not: one attempt
# with short timeouts instead of botocore's retries with backoff (16 s on a closed port).
S3_CHECK_TIMEOUT_S = 5


def _s3_client():
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        config=Config(connect_timeout=S3_CHECK_TIMEOUT_S, read_timeout=S3_CHECK_TIMEOUT_S,
                      retries={"max_attempts": 1, "mode": "standard"}),
        endpoint_url=s3_endpoint(),
        region_name=_s3_region() or "us-east-1",
        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID") or None,
        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY") or None,
        aws_session_token=os.environ.get("AWS_SESSION_TOKEN") or None,
    )


def _check_s3_bucket(url: str, action: str) -> None:
    """Turn the ways a bucket can be out of reach into one error naming endpoint + bucket."""
    import botocore.exceptions

    bucket = _s3_bucket(url)
    where = f"bucket '{bucket}' at endpoint {s3_endpoint() or 'AWS default'}"
    if not bucket:
        raise StorageError(f"cannot {action} {url}: the URL names no bucket (use s3://BUCKET/path)")
    try:
        _s3_client().head_bucket(Bucket=bucket)
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(
            f"cannot {action} {url}: no S3 credentials for {where}; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        ) from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ReadTimeoutError):
        raise StorageError(
            f"cannot {action} {url}: {where} does not answer (within {S3_CHECK_TIMEOUT_S} s); check "
            "AWS_ENDPOINT_URL and that the object store is running"
        ) from None
    except botocore.exceptions.ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket") or status == 404:
            raise StorageError(
                f"cannot {action} {url}: {where} does not exist; create it or fix the URL"
            ) from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch") or status == 403:
            raise StorageError(
                f"cannot {action} {url}: access denied to {where}; check AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY (wrong or missing credentials)"
            ) from None
        raise StorageError(f"cannot {action} {url}: {where} answered {code or status}") from None


def check_bucket(url: str) -> None:
    """For s3:// URLs, raise StorageError unless the bucket exists and the keys are accepted."""
    if protocol_of(url) in _S3_PROTOCOLS:
        _check_s3_bucket(url, "read")


def check_readable(url: str) -> None:
    """Raise StorageError unless ``url`` (a file or a prefix) exists and can be read."""
    if protocol_of(url) in _S3_PROTOCOLS:
        _check_s3_bucket(url, "read")
    fs, path = url_to_fs(url)
    try:
        found = fs.exists(path)
    except PermissionError:
        raise StorageError(f"cannot read {url}: permission denied") from None
    if not found:
        raise StorageError(f"cannot read {url}: no such file or prefix")
    if isinstance(fs, LocalFileSystem) and not os.access(path, os.R_OK):
        raise StorageError(f"cannot read {url}: permission denied")


def check_writable(url: str) -> None:
    """Raise StorageError unless objects can be written under ``url`` (treated as a prefix).

    Object stores get a tiny probe object that is deleted again: only a real write proves
    the credentials may write.
    """
    if protocol_of(url) in _S3_PROTOCOLS:
        _check_s3_bucket(url, "write")
    fs, path = url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot write {url}: {e.strerror}") from None
        if not os.access(path, os.W_OK):
            raise StorageError(f"cannot write {url}: permission denied")
        return
    probe = join_url(path, f".satloc-write-probe-{uuid.uuid4().hex}")
    try:
        fs.pipe_file(probe, b"")
        fs.rm_file(probe)
    except PermissionError:
        raise StorageError(f"cannot write {url}: permission denied") from None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
