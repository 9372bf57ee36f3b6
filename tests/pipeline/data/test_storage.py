import os

import pytest

from pipeline.data import storage
from pipeline.data.shards import expand_shards
from pipeline.data.storage import StorageError


def test_join_url():
    assert storage.join_url("s3://b/out/", "run", "x.parquet") == "s3://b/out/run/x.parquet"
    assert storage.join_url("s3://b/out", "/run/", "x") == "s3://b/out/run/x"
    assert storage.join_url("/data", "a") == "/data/a"
    assert storage.join_url("memory://m", "", "a") == "memory://m/a"


def test_protocol_of():
    assert storage.protocol_of("/x/y.tar") == "file"
    assert storage.protocol_of("file:///x") == "file"
    assert storage.protocol_of("S3://b/k") == "s3"


def test_url_to_fs_reads_s3_settings_from_env(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "kid")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "sec")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    fs, path = storage.url_to_fs("s3://bucket/a/b.tar")
    assert path == "bucket/a/b.tar"
    assert fs.client_kwargs["region_name"] == "eu-west-3"
    assert fs.endpoint_url == "http://127.0.0.1:1" and fs.key == "kid"


def test_write_bytes_atomic_local(tmp_path):
    url = str(tmp_path / "deep" / "dir" / "f.bin")
    storage.write_bytes_atomic(url, b"one")
    storage.write_bytes_atomic(url, b"two")
    assert open(url, "rb").read() == b"two"
    assert os.listdir(tmp_path / "deep" / "dir") == ["f.bin"]  # no temp files left
    assert storage.exists(url) and not storage.exists(url + ".nope")
    assert storage.read_bytes(f"file://{url}") == b"two"


def test_write_bytes_atomic_leaves_nothing_on_failure(tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        storage.write_bytes_atomic(str(tmp_path / "f.bin"), b"x")
    assert os.listdir(tmp_path) == []


def test_write_bytes_atomic_memory():
    storage.write_bytes_atomic("memory://storage-test/a.bin", b"abc")
    assert storage.read_bytes("memory://storage-test/a.bin") == b"abc"


def test_local_checks(tmp_path):
    storage.check_writable(str(tmp_path / "new" / "out"))
    assert (tmp_path / "new" / "out").is_dir()
    storage.check_readable(str(tmp_path / "new"))
    with pytest.raises(StorageError, match="no such file"):
        storage.check_readable(str(tmp_path / "missing.tar"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="cannot write"):
        storage.check_writable(str(tmp_path / "file" / "sub"))


def test_s3_round_trip_and_checks(s3_env):
    url = f"s3://{s3_env.bucket}/test_storage/x.bin"
    storage.write_bytes_atomic(url, b"payload")
    assert storage.exists(url) and storage.read_bytes(url) == b"payload"
    storage.check_readable(url)
    storage.check_writable(f"s3://{s3_env.bucket}/test_storage/out/")
    fs, path = storage.url_to_fs(f"s3://{s3_env.bucket}/test_storage/")
    assert fs.find(path) == [f"{s3_env.bucket}/test_storage/x.bin"]  # the write probe is gone
    with pytest.raises(StorageError, match="no such file"):
        storage.check_readable(f"s3://{s3_env.bucket}/test_storage/absent.bin")


def test_missing_bucket_names_endpoint_and_bucket(s3_env):
    for check in (storage.check_readable, storage.check_writable):
        with pytest.raises(StorageError) as err:
            check("s3://no-such-bucket/x/")
        text = str(err.value)
        assert "'no-such-bucket'" in text and s3_env.endpoint in text and "does not exist" in text
    with pytest.raises(StorageError, match="no-such-bucket.*does not exist"):
        expand_shards("s3://no-such-bucket/wds/")


def test_wrong_credentials_name_endpoint_and_bucket_not_secret(s3_env, monkeypatch):
    wrong = "wrong-secret-value-123"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    for call in (storage.check_readable, storage.check_writable, expand_shards):
        with pytest.raises(StorageError) as err:
            call(f"s3://{s3_env.bucket}/test_storage/")
        text = str(err.value)
        assert f"'{s3_env.bucket}'" in text and s3_env.endpoint in text and "access denied" in text
        assert wrong not in text and s3_env.secret_key not in text


def test_unreachable_endpoint(monkeypatch):
    from infra.local.s3_store import free_ports

    (port,) = free_ports(1)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(StorageError, match=f"127.0.0.1:{port} does not answer"):
        storage.check_readable("s3://bucket/x")


def test_read_parquet_columns_metadata_and_a_clean_exit(tmp_path):
    """read_parquet reads the asked columns and footer metadata; a process that used it exits 0.

    pyarrow 26 reading a Python file object on its thread pool aborted the interpreter
    at exit about one run in three (exit 134); five clean exits in a row rule that out
    with probability ~1 - (2/3)**5.
    """
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "t.parquet")
    table = pa.table({"key": ["a", "b"], "status": ["ok", "error"]}).replace_schema_metadata({"run_id": "r1"})
    pq.write_table(table, path)
    assert storage.read_parquet(path, columns=["status"]).column("status").to_pylist() == ["ok", "error"]
    assert storage.read_parquet_metadata("file://" + path)[b"run_id"] == b"r1"
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    code = f"from pipeline.data.storage import read_parquet; print(read_parquet({path!r}).num_rows)"
    for _ in range(5):
        proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=60)
        assert (proc.returncode, proc.stdout.strip()) == (0, "2"), proc.stderr


def test_an_unreadable_parquet_file_is_named(tmp_path):
    """Issue 14: not pyarrow's "Could not open Parquet input source '<Buffer>'" without a name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"status": ["ok"] * 100}), good)
    (tmp_path / "empty.parquet").write_bytes(b"")
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    for name in ("empty.parquet", "cut.parquet"):
        url = str(tmp_path / name)
        for read in (storage.read_parquet, storage.read_parquet_metadata, storage.parquet_row_count):
            with pytest.raises(ValueError, match=f"cannot read Parquet file {url}: .*rerun") as info:
                read(url)
            assert isinstance(info.value, storage.ParquetReadError) and info.value.url == url
    assert storage.parquet_row_count(str(good)) == 100
