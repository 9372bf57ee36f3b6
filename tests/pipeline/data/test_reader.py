import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image
from tarfixtures import good_sample, image_bytes, mask_bytes, tar_bytes

from pipeline.data.reader import ShardFormatError, decode_sample, read_samples, split_member_name
from pipeline.data.storage import write_bytes_atomic


def write(tmp_path, members, name="shard.tar"):
    path = tmp_path / name
    path.write_bytes(tar_bytes(members))
    return str(path)


def by_key(samples):
    return {s.key: s for s in samples}


def test_split_member_name_follows_webdataset():
    assert split_member_name("a/b/x001.mask.png") == ("a/b/x001", "mask.png")
    assert split_member_name("dir.v2/img_1.jpg") == ("dir.v2/img_1", "jpg")
    assert split_member_name("README") == ("README", "")


def test_good_sample_has_every_field(tmp_path):
    url = write(tmp_path, good_sample("k0", label=3) + good_sample("k1", label=4, fmt="PNG", ext="png"))
    samples = list(read_samples(url))
    assert [s.key for s in samples] == ["k0", "k1"]
    s = samples[0]
    assert s.error is None and s.ok and s.shard == url
    assert (s.width, s.height) == (8, 6) and s.image.mode == "RGB" and s.image.size == (8, 6)
    assert s.label == 3 and s.class_name == "class3"
    assert s.gt_boxes == [[2.0, 1.0, 6.0, 4.0]]
    assert s.mask.dtype == np.uint8 and s.mask.shape == (6, 8)
    assert set(np.unique(s.mask)) == {0, 255} and s.mask[1:4, 2:6].min() == 255 and s.mask.sum() == 12 * 255
    assert s.image_bytes is None
    png = samples[1]
    assert png.error is None and png.label == 4
    assert np.asarray(png.image)[3, 3].tolist() == [200, 30, 40]  # PNG is lossless


def test_cls_wins_over_json_label_and_json_alone_gives_label(tmp_path):
    members = [("a.cls", b" 7\n"), ("a.json", b'{"label": 2}'), ("a.jpg", image_bytes())]
    members += [("b.json", b'{"label": 5, "class_name": "cat"}'), ("b.jpg", image_bytes())]
    samples = by_key(read_samples(write(tmp_path, members)))
    assert samples["a"].label == 7
    assert samples["b"].label == 5 and samples["b"].class_name == "cat" and samples["b"].gt_boxes is None


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    if mode == "CMYK":
        data = image_bytes(mode="CMYK", fmt="JPEG", quality=100)
    elif mode == "I;16":
        arr = np.full((6, 8), 65535, np.uint16)
        arr[0, 0] = 0
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        data = buf.getvalue()
    else:
        data = image_bytes(mode=mode, fmt="PNG")
    (s,) = read_samples(write(tmp_path, [("x.png", data)]))
    assert s.error is None and s.image.mode == "RGB" and s.image.size == (8, 6)
    if mode == "I;16":  # 16-bit is scaled to 8-bit, not clipped
        assert np.asarray(s.image)[0, 0].tolist() == [0, 0, 0]
        assert np.asarray(s.image)[3, 3].tolist() == [255, 255, 255]
    elif mode == "L":
        grey = round(0.299 * 200 + 0.587 * 30 + 0.114 * 40)
        assert abs(int(np.asarray(s.image)[3, 3, 0]) - grey) <= 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    arr = np.zeros((6, 8, 3), np.uint8)
    arr[:, :4] = 255  # left half white
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, format=fmt, exif=exif, quality=100)
    (s,) = read_samples(write(tmp_path, [(f"r.{fmt.lower()}", buf.getvalue())]))
    assert (s.width, s.height) == (6, 8) and s.image.size == (6, 8)
    out = np.asarray(s.image).mean(axis=(1, 2))
    assert out[:3].mean() > 200 and out[-3:].mean() < 50  # white half is now on top


def test_decode_false_then_decode_sample_matches(tmp_path):
    url = write(tmp_path, good_sample("a") + good_sample("b", 2))
    raw = list(read_samples(url, decode=False))
    assert all(s.image is None and s.mask is None and s.image_bytes for s in raw)
    assert raw[0].mask_bytes == mask_bytes() and raw[0].width == 0
    decoded = [decode_sample(s) for s in raw]
    direct = list(read_samples(url))
    for a, b in zip(decoded, direct):
        assert a.key == b.key and a.error is None and (a.width, a.height) == (b.width, b.height)
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert np.array_equal(a.mask, b.mask) and a.image_bytes is None


def test_draft_size_decodes_smaller_but_reports_original_size(tmp_path):
    big = image_bytes(width=400, height=300)
    (s,) = read_samples(write(tmp_path, [("big.jpg", big)]), draft_size=64)
    assert (s.width, s.height) == (400, 300)
    assert 64 <= min(s.image.size) < 300


# Each corrupt case: exactly one error sample, the samples around it intact.
CORRUPT_CASES = {
    "undecodable image": ([("bad.jpg", b"\xff\xd8 not really a jpeg")], "undecodable image"),
    "no image member": ([("bad.cls", b"1"), ("bad.json", b"{}")], "no image member"),
    "malformed json": ([("bad.jpg", image_bytes()), ("bad.json", b"{nope")], "malformed .json"),
    "json not an object": ([("bad.jpg", image_bytes()), ("bad.json", b"[1, 2]")], "expected an object"),
    "bad cls": ([("bad.cls", b"cat"), ("bad.jpg", image_bytes())], "not an integer"),
    "bad boxes": ([("bad.jpg", image_bytes()), ("bad.json", b'{"boxes": [[1, 2]]}')], "boxes"),
    "mask size mismatch": ([("bad.jpg", image_bytes()), ("bad.mask.png", mask_bytes(3, 3))], "mask is 3x3"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT_CASES))
def test_each_corrupt_sample_gives_one_error(tmp_path, case):
    bad, message = CORRUPT_CASES[case]
    url = write(tmp_path, good_sample("a") + bad + good_sample("z"))
    samples = list(read_samples(url))
    assert [s.key for s in samples] == ["a", "bad", "z"]
    assert samples[0].ok and samples[2].ok and samples[2].image is not None
    assert samples[1].error is not None and message in samples[1].error
    assert samples[1].image is None


def test_non_contiguous_members_give_one_error(tmp_path):
    members = good_sample("a") + [("b.jpg", image_bytes())] + [("a.txt", b"late")] + good_sample("c")
    samples = list(read_samples(write(tmp_path, members)))
    assert [s.key for s in samples] == ["a", "b", "a", "c"]
    assert [s.ok for s in samples] == [True, True, False, True]
    assert "not contiguous" in samples[2].error and "txt" in samples[2].error


def _truncate(data: bytes, at: int) -> bytes:
    return data[:at]


def test_truncated_inside_member_yields_readable_then_one_error(tmp_path):
    members = good_sample("a") + good_sample("b") + good_sample("c")
    data = tar_bytes(members)
    # Cut inside the image data of 'c': find where its .jpg member's data starts.
    offset = 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        for m in tf.getmembers():
            if m.name == "c.jpg":
                offset = m.offset_data + 10
    path = tmp_path / "cut.tar"
    path.write_bytes(_truncate(data, offset))
    samples = list(read_samples(str(path)))
    assert [s.key for s in samples] == ["a", "b", "c"]
    assert samples[0].ok and samples[1].ok
    assert "truncated" in samples[2].error and str(path) in samples[2].error


def test_truncated_between_members_flags_the_last_sample(tmp_path):
    data = tar_bytes(good_sample("a") + good_sample("b"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        end_of_b = max(m.offset_data + ((m.size + 511) // 512) * 512 for m in tf.getmembers())
    path = tmp_path / "noeof.tar"
    path.write_bytes(data[:end_of_b])  # all members whole, end-of-archive blocks missing
    samples = list(read_samples(str(path)))
    assert [s.key for s in samples] == ["a", "b"]
    assert samples[0].ok and "truncated" in samples[1].error


def test_truncated_in_next_header_keeps_previous_samples(tmp_path):
    data = tar_bytes(good_sample("a") + good_sample("b"))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        first_b = min(m.offset for m in tf.getmembers() if m.name.startswith("b."))
    path = tmp_path / "halfheader.tar"
    path.write_bytes(data[: first_b + 100])
    samples = list(read_samples(str(path)))
    assert [s.ok for s in samples] == [False]  # 'a' cannot be known complete: flagged
    assert samples[0].key == "a" and "truncated" in samples[0].error


def test_non_tar_file_is_a_clear_error(tmp_path):
    path = tmp_path / "notes.tar"
    path.write_bytes(b"this is plain text, not a tar archive\n" * 40)
    with pytest.raises(ShardFormatError, match="notes.tar is not a tar file"):
        list(read_samples(str(path)))


def test_missing_shard_names_the_url(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.tar"):
        list(read_samples(str(tmp_path / "nothere.tar")))


def test_gzipped_tar_is_read(tmp_path):
    import gzip

    path = tmp_path / "s.tar.gz"
    path.write_bytes(gzip.compress(tar_bytes(good_sample("a"))))
    (s,) = read_samples(str(path))
    assert s.ok and s.label == 1


def test_memory_url(tmp_path):
    url = "memory://reader-test/shard.tar"
    write_bytes_atomic(url, tar_bytes(good_sample("m")))
    (s,) = read_samples(url)
    assert s.ok and s.shard == url and s.key == "m"


def _as_comparable(s):
    return (s.key, s.label, s.class_name, s.gt_boxes, s.width, s.height, s.error,
            np.asarray(s.image).tobytes() if s.image else None, None if s.mask is None else s.mask.tobytes())


def test_same_samples_from_local_disk_and_s3(tmp_path, s3_env):
    members = good_sample("a") + [("bad.jpg", b"garbage")] + good_sample("b", 2, "PNG", "png")
    local = write(tmp_path, members)
    s3_url = f"s3://{s3_env.bucket}/test_reader/shard.tar"
    write_bytes_atomic(s3_url, tar_bytes(members))
    from_disk = [_as_comparable(s) for s in read_samples(local)]
    # A small block size makes the S3 file object fetch many ranges: streaming, not one GET.
    from_s3 = [_as_comparable(s) for s in read_samples(s3_url, block_size=4096)]
    assert from_disk == from_s3
    assert len(from_disk) == 3 and from_disk[1][-3] is not None


def test_reads_shards_written_by_webdataset(tmp_path):
    import webdataset as wds

    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=2, verbose=0) as sink:
        for i in range(5):
            sink.write({"__key__": f"s{i:03d}", "jpg": image_bytes(), "cls": str(i).encode(),
                        "json": json.dumps({"boxes": [[0, 0, 4, 4]]}).encode()})
    samples = [s for i in range(3) for s in read_samples(str(tmp_path / f"wds-{i:06d}.tar"))]
    assert [s.key for s in samples] == [f"s{i:03d}" for i in range(5)]
    assert [s.label for s in samples] == list(range(5))
    assert all(s.ok and s.gt_boxes == [[0.0, 0.0, 4.0, 4.0]] for s in samples)


class _CountingFile:
    """Proxy of a file object that counts the bytes read through it."""

    def __init__(self, inner, counter):
        self._inner, self._counter = inner, counter

    def read(self, size=-1):
        data = self._inner.read(size)
        self._counter["bytes"] += len(data)
        return data

    def close(self):
        self._inner.close()


def test_streams_without_reading_the_whole_shard(tmp_path, monkeypatch):
    import threading

    import pipeline.data.reader as reader

    rng = np.random.default_rng(0)
    members = []
    for i in range(20):  # 20 samples of 100 KB of incompressible data: a 2 MB shard
        members += [(f"k{i:02d}.jpg", image_bytes()), (f"k{i:02d}.bin", rng.bytes(100_000))]
    url = write(tmp_path, members)
    counter = {"bytes": 0}
    real_url_to_fs = reader.url_to_fs

    def counting_url_to_fs(u):
        fs, path = real_url_to_fs(u)

        class CountingFS:
            def open(self, p, mode, **kw):
                return _CountingFile(fs.open(p, mode), counter)

        return CountingFS(), path

    monkeypatch.setattr(reader, "url_to_fs", counting_url_to_fs)
    samples = read_samples(url, block_size=64 * 1024, prefetch=2)
    first = next(samples)
    assert first.key == "k00" and first.ok
    samples.close()  # the consumer stops early: the prefetch thread must stop too
    assert counter["bytes"] <= 4 * 64 * 1024 + 200_000  # a few blocks, not 2 MB
    assert not [t for t in threading.enumerate() if t.name == "shard-prefetch"]


# --- issue 14: per-sample isolation, bounded metadata, sample identity ------------------


def _member(name, data=b"", kind=tarfile.REGTYPE, linkname=""):
    return name, data, kind, linkname


def typed_tar(members) -> bytes:
    """A tar whose members may be links, directories or FIFOs: (name, data, type, linkname)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data, kind, linkname in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, linkname
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def test_labels_outside_int32_or_not_integers_are_error_rows_naming_the_member(tmp_path):
    def with_json(key, meta):
        return [(f"{key}.jpg", image_bytes()), (f"{key}.json", json.dumps(meta).encode())]

    members = (
        good_sample("a")
        + [("b.cls", b"99999999999999999999"), ("b.jpg", image_bytes())]
        + [("c.cls", b"3000000000"), ("c.jpg", image_bytes())]
        + with_json("d", {"label": 1e30})
        + with_json("e", {"label": 1.5})
        + with_json("f", {"label": True})
        + with_json("g", {"label": 4.0})  # an integer written as a float is that integer
        + [("h.cls", b"-2147483648"), ("h.jpg", image_bytes())]
        + good_sample("z")
    )
    samples = by_key(read_samples(write(tmp_path, members)))
    assert list(samples) == ["a", "b", "c", "d", "e", "f", "g", "h", "z"]
    assert [k for k, s in samples.items() if s.ok] == ["a", "g", "h", "z"]
    assert samples["g"].label == 4 and samples["h"].label == -(2**31)
    assert "member 'b.cls'" in samples["b"].error and "int32" in samples["b"].error
    assert "member 'c.cls'" in samples["c"].error and "3000000000" in samples["c"].error
    assert "member 'd.json'" in samples["d"].error and "int32" in samples["d"].error
    assert "member 'e.json'" in samples["e"].error and "not an integer" in samples["e"].error
    assert "not an integer" in samples["f"].error


def test_deep_or_huge_json_is_an_error_row_not_a_lost_shard(tmp_path, monkeypatch):
    from pipeline.data import reader

    deep = b"[" * 100_000 + b"]" * 100_000
    tricky = json.dumps({"label": 1, "note": "[[[[" * 50}).encode()  # brackets in strings do not count
    members = (
        [("a.jpg", image_bytes()), ("a.json", deep)]
        + [("b.jpg", image_bytes()), ("b.json", tricky)]
        + [("c.jpg", image_bytes()), ("c.json", b'{"pad": "' + b"x" * 400_000 + b'"}')]
        + good_sample("d")
    )
    monkeypatch.setattr(reader, "MAX_JSON_BYTES", 300_000)
    samples = by_key(read_samples(write(tmp_path, members)))
    assert list(samples) == ["a", "b", "c", "d"]
    assert "member 'a.json' nests 100000 levels" in samples["a"].error
    assert samples["b"].ok and samples["b"].label == 1
    assert "member 'c.json'" in samples["c"].error and "300,000-byte limit" in samples["c"].error
    assert samples["d"].ok


def test_non_finite_or_inverted_boxes_are_error_rows(tmp_path):
    def with_boxes(key, text):
        return [(f"{key}.jpg", image_bytes()), (f"{key}.json", b'{"boxes": ' + text + b"}")]

    members = (
        with_boxes("nan", b"[[0, 0, NaN, 4]]")
        + with_boxes("inf", b"[[0, 0, Infinity, 4]]")
        + with_boxes("big", b"[[0, 0, 1e39, 4]]")  # finite in Python, infinite as float32
        + with_boxes("inverted", b"[[6, 1, 2, 4]]")
        + with_boxes("flat", b"[[2, 1, 2, 4]]")  # zero width is a box, not an inverted one
        + with_boxes("ok", b"[[0, 0, 8, 6]]")
    )
    samples = by_key(read_samples(write(tmp_path, members)))
    for key in ("nan", "inf", "big"):
        assert f"member '{key}.json'" in samples[key].error and "not finite" in samples[key].error
    assert "inverted" in samples["inverted"].error
    assert samples["flat"].ok and samples["ok"].ok and samples["ok"].gt_boxes == [[0.0, 0.0, 8.0, 6.0]]


def test_any_failure_parsing_one_sample_is_its_error_row(tmp_path, monkeypatch):
    from pipeline.data import reader

    real = reader._parse_metadata

    def parse(sample, members):
        if sample.key == "b":
            raise MemoryError("pretend")
        return real(sample, members)

    monkeypatch.setattr(reader, "_parse_metadata", parse)
    samples = list(read_samples(write(tmp_path, good_sample("a") + good_sample("b") + good_sample("c"))))
    assert [(s.key, s.ok) for s in samples] == [("a", True), ("b", False), ("c", True)]
    assert "sample 'b'" in samples[1].error and "cls" in samples[1].error and "MemoryError: pretend" in samples[1].error


def test_a_repeated_key_is_a_row_per_occurrence_never_an_overwrite(tmp_path):
    first = [("a.cls", b"1"), ("a.jpg", image_bytes(color=(255, 0, 0)))]
    again = [("a.cls", b"2"), ("a.jpg", image_bytes(color=(0, 0, 255)))]
    samples = list(read_samples(write(tmp_path, first + again + good_sample("b") + [("a.cls", b"3")])))
    assert [s.key for s in samples] == ["a", "a", "b", "a"]
    assert samples[0].ok and samples[0].label == 1  # the first occurrence is the sample
    assert not samples[1].ok and "occurs again" in samples[1].error and "right after" in samples[1].error
    assert "occurrence 2" in samples[1].error
    assert "not contiguous" in samples[3].error and "occurrence 3" in samples[3].error


def test_link_device_and_directory_members_are_named_in_an_error_row(tmp_path):
    members = [
        _member("a.jpg", image_bytes()),
        _member("a.cls", b"1"),
        _member("only_link.jpg", kind=tarfile.SYMTYPE, linkname="a.jpg"),  # a sample made only of a link
        _member("h.cls", b"2"),
        _member("h.jpg", kind=tarfile.LNKTYPE, linkname="a.jpg"),
        _member("dir.jpg", kind=tarfile.DIRTYPE),
        _member("fifo.png", kind=tarfile.FIFOTYPE),
        _member("sub", kind=tarfile.DIRTYPE),  # a plain folder entry: no sample
        _member("sub/b.jpg", image_bytes()),
    ]
    path = tmp_path / "links.tar"
    path.write_bytes(typed_tar(members))
    samples = list(read_samples(str(path)))
    assert [(s.key, s.ok) for s in samples] == [
        ("a", True), ("only_link", False), ("h", False), ("dir", False), ("fifo", False), ("sub/b", True)
    ]
    errors = {s.key: s.error for s in samples}
    assert "member 'only_link.jpg' is a symbolic link" in errors["only_link"]
    assert "member 'h.jpg' is a hard link" in errors["h"]
    assert "member 'dir.jpg' is a directory" in errors["dir"]
    assert "member 'fifo.png' is a device or FIFO" in errors["fifo"]


def test_an_empty_or_non_tar_shard_is_a_format_error_that_retrying_cannot_fix(tmp_path):
    for name, data in (("empty.tar", b""), ("text.tar", b"not a tar at all " * 64)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ShardFormatError, match=name) as info:
            list(read_samples(str(tmp_path / name)))
        assert info.value.retryable is False
