import io
import os
import tarfile

import pytest

from pipeline.data.reader import read_samples
from pipeline.datasets.webdataset_writer import ShardWriter
from pipeline.data.storage import read_bytes


def test_rolls_by_count_sorts_members_and_reports_progress(tmp_path):
    out = io.StringIO()
    with ShardWriter(str(tmp_path), "part", max_count=2, progress=out) as w:
        for i in range(5):
            w.write(f"k{i}", {"txt": b"x", "cls": b"1", "jpg": b"data"})
    assert [os.path.basename(u) for u in w.urls] == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    assert sorted(os.listdir(tmp_path)) == ["part-000000.tar", "part-000001.tar", "part-000002.tar"]
    with tarfile.open(w.urls[0]) as tf:
        assert tf.getnames() == ["k0.cls", "k0.jpg", "k0.txt", "k1.cls", "k1.jpg", "k1.txt"]
    assert out.getvalue().count("wrote ") == 3 and "2 samples" in out.getvalue()
    assert w.total_samples == 5


def test_rolls_by_bytes(tmp_path):
    with ShardWriter(str(tmp_path), "b", max_count=100, max_bytes=5000, progress=None) as w:
        for i in range(6):
            w.write(f"s{i}", {"bin": bytes(1500)})
    # 512 header + 1536 padded data = 2048 bytes a sample: two samples fit in 5000.
    assert len(w.urls) == 3
    assert all(os.path.getsize(u) < 10240 + 5000 for u in w.urls)


def test_identical_input_gives_identical_bytes(tmp_path):
    for name in ("a", "b"):
        with ShardWriter(str(tmp_path / name), "s", progress=None) as w:
            w.write("k", {"jpg": b"123"})
    assert (tmp_path / "a" / "s-000000.tar").read_bytes() == (tmp_path / "b" / "s-000000.tar").read_bytes()


def test_failure_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path), "s", progress=None) as w:
            w.write("k", {"jpg": b"123"})
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_bad_names_are_rejected(tmp_path):
    with ShardWriter(str(tmp_path), "s", progress=None) as w:
        with pytest.raises(ValueError, match="key 'a.b' must be non-empty and hold no '.'"):
            w.write("a.b", {"jpg": b""})
        with pytest.raises(ValueError, match="extension '.jpg'"):
            w.write("a", {".jpg": b""})
        with pytest.raises(ValueError, match="no members"):
            w.write("a", {})
    with pytest.raises(ValueError, match="positive"):
        ShardWriter(str(tmp_path), "s", max_count=0)


def test_writes_to_s3(s3_env):
    base = f"s3://{s3_env.bucket}/test_shard_writer"
    with ShardWriter(base, "s", max_count=1, progress=None) as w:
        w.write("a", {"cls": b"3", "txt": b"hello"})
        w.write("b", {"cls": b"4", "txt": b"world"})
    assert w.urls == [f"{base}/s-000000.tar", f"{base}/s-000001.tar"]
    with tarfile.open(fileobj=io.BytesIO(read_bytes(w.urls[1]))) as tf:
        assert tf.extractfile("b.txt").read() == b"world"
    (s,) = read_samples(w.urls[0])
    assert s.key == "a" and s.label == 3 and "no image member" in s.error


def test_failed_s3_shard_is_not_uploaded(s3_env):
    from pipeline.data.storage import exists

    base = f"s3://{s3_env.bucket}/test_shard_writer_abort"
    with pytest.raises(RuntimeError):
        with ShardWriter(base, "s", progress=None) as w:
            w.write("a", {"txt": b"partial"})
            raise RuntimeError("boom")
    assert not exists(f"{base}/s-000000.tar")
