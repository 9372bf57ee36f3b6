"""One shard -> samples, streamed (DESIGN §2).

Stages, each a small generator: ``tar_members`` (fsspec file -> (name, bytes)) ->
``group_members`` (contiguous members of one key) -> ``sample_from_members`` ->
``decode_sample``. The tar is read with ``tarfile`` in stream mode ('r|*') from an fsspec
file object, so nothing is downloaded whole and memory stays near one sample plus a few
read blocks. From object stores the next blocks are fetched in a background thread
(``PrefetchingReader``), so network waits overlap decoding.

Every problem becomes exactly one error sample (``error`` set) and reading goes on, so
rows can say why a sample failed instead of dropping it. A truncated or corrupt tar
yields what was readable, then one error sample whose message contains 'truncated'.
A file that is not a tar at all (or is empty) raises ShardFormatError, which retrying
cannot fix (``retryable = False``).

Sample identity (docs/architecture.md, "Sample identity"): a key's first run of
contiguous members is its sample; every later occurrence of the key (its members again
right after, i.e. an extension repeats, or after other keys) is one error sample of its
own, never merged into or overwriting the first. Link, device and directory members are
not read: the sample they belong to is an error sample naming them, even when they are
all it has. A folder entry without an extension (``train/``) is not a sample member and
is passed over. Metadata is bounded (``_parse_metadata``): labels are integers within
int32, ``.json`` at most ``MAX_JSON_BYTES`` and ``MAX_JSON_DEPTH`` levels, boxes finite
and not inverted. Any other exception while turning one sample's members into a
``Sample`` becomes that sample's error, naming the key.
"""
from __future__ import annotations

import dataclasses
import io
import json
import re
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import ExifTags, Image, ImageOps

from pipeline.data.handoff import Finished, Handoff
from pipeline.data.storage import url_to_fs

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
MASK_EXTENSION = "mask.png"
# Bytes per ranged read: large enough for throughput from S3, small enough that the
# read buffers stay a small multiple of one sample.
DEFAULT_BLOCK_SIZE = 2 * 2**20

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38
# Metadata bounds: far above any real annotation (300,000 boxes is about 10 MB), far
# below what would exhaust a worker or Python's recursion limit.
MAX_JSON_BYTES = 64 * 2**20
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


class PrefetchingReader(io.RawIOBase):
    """Read-only file wrapper that fetches the next chunks in a background thread.

    Object-store reads wait on the network; fetching ahead overlaps that wait with
    decoding. Memory is bounded: at most ``depth`` chunks of ``chunk_size`` are queued.
    Errors of the fetching thread are raised by ``read``.
    """

    def __init__(self, fileobj, chunk_size: int = 1 << 20, depth: int = 4):
        super().__init__()
        self._src = fileobj
        self._chunk_size = chunk_size
        self._chunks = Handoff(depth)
        self._buf = memoryview(b"")
        self._pos = 0
        self._eof = False
        self._thread = threading.Thread(target=self._fill, name="shard-prefetch", daemon=True)
        self._thread.start()

    def _fill(self) -> None:
        try:
            while True:
                data = self._src.read(self._chunk_size)
                if not data:
                    self._chunks.finish()
                    return
                if not self._chunks.put(data):
                    return
        except BaseException as e:  # handed to the reading thread
            self._chunks.fail(e)

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        parts = []
        wanted = size if size is not None and size >= 0 else None
        got = 0
        while wanted is None or got < wanted:
            if self._pos >= len(self._buf):
                if self._eof:
                    break
                try:
                    item = self._chunks.get()
                except Finished:
                    self._eof = True
                    break
                except BaseException:
                    self._eof = True
                    raise
                self._buf, self._pos = memoryview(item), 0
            take = len(self._buf) - self._pos if wanted is None else min(wanted - got, len(self._buf) - self._pos)
            parts.append(self._buf[self._pos : self._pos + take])
            self._pos += take
            got += take
        return b"".join(parts)

    def close(self) -> None:
        if not self.closed:
            self._chunks.close(self._thread)
        super().close()


class ShardFormatError(ValueError):
    """The shard is not a (possibly compressed) tar file, or is empty."""

    retryable = False  # the same bytes fail the same way: the scheduler does not retry


@dataclass(frozen=True)
class _Unusable:
    """A link, device or directory member: named in its sample's error, never read."""

    name: str
    kind: str


@dataclass
class Sample:
    key: str
    shard: str
    image: Image.Image | None = None  # RGB, EXIF orientation applied
    width: int = 0  # original size; 0 when unknown (not decoded yet, or undecodable)
    height: int = 0
    label: int | None = None
    class_name: str | None = None
    gt_boxes: list[list[float]] | None = None  # [x0, y0, x1, y1] in original pixels
    mask: np.ndarray | None = None  # uint8 HxW, 0 or 255
    error: str | None = None  # None when OK
    image_bytes: bytes | None = None  # raw member, only with decode=False
    mask_bytes: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Truncated:
    """End-of-stream marker: the tar ended before its end-of-archive block."""

    message: str
    member: str | None  # the member whose data was cut, when known


class _EndTrackingTarInfo(tarfile.TarInfo):
    """Records whether the archive ended on a proper zero block.

    In stream mode tarfile treats a missing or cut-off header after the first member as a
    normal end of archive; only the end-of-archive zero block proves the tar is whole.
    """

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.satloc_clean_end = True
            raise


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset rule: key = path up to the first dot of the basename, ext = the rest."""
    m = _KEY_EXT.match(name)
    if m is None:
        return name, ""
    return m.group(1), m.group(2)


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.isdir():
        return "a directory"
    if member.isdev():
        return "a device or FIFO"
    return f"not a regular file (tar type {member.type!r})"


def tar_members(fileobj, shard: str) -> Iterator[tuple[str, bytes] | _Unusable | _Truncated]:
    """(member name, data) for each regular file, ``_Unusable`` for links, devices and
    directories with an extension; a final _Truncated if the tar is cut."""
    try:
        tf = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndTrackingTarInfo)
    except tarfile.TarError as e:
        raise ShardFormatError(
            f"shard {shard} is not a tar file ({e}); shards must be WebDataset .tar files"
        ) from None
    name: str | None = None
    try:
        while True:
            name = None
            member = tf.next()
            if member is None:
                break
            tf.members = []  # stream mode keeps every header otherwise: memory would grow
            if not member.isfile():
                if not (member.isdir() and not split_member_name(member.name.rstrip("/"))[1]):
                    yield _Unusable(member.name.rstrip("/"), _member_kind(member))
                continue  # a plain folder entry (``train/``) is no sample member
            name = member.name
            if member.issparse():
                data = tf.extractfile(member).read()
            else:  # in stream mode the data follows the header: read it without a wrapper
                data = tf.fileobj.read(member.size)
            if len(data) != member.size:
                raise tarfile.ReadError("unexpected end of data")
            yield name, data
    except (tarfile.TarError, EOFError, OSError) as e:
        where = f"in member '{name}'" if name else "between members"
        yield _Truncated(f"shard {shard} is truncated or corrupt {where}: {e}", name)
        return
    if not getattr(tf, "satloc_clean_end", False):
        yield _Truncated(
            f"shard {shard} is truncated: it ends without the tar end-of-archive block, "
            "so its last sample may be incomplete",
            None,
        )


def group_members(
    members: Iterable[tuple[str, bytes] | _Unusable | _Truncated], shard: str
) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """(key, {ext: data}, error) per occurrence of a key (module docstring: sample identity).

    An occurrence is a run of contiguous members sharing a key in which no extension
    repeats; a key's second and later occurrences give one error group each. Unusable
    members give an error group naming them. Truncation gives one error group for the
    sample it cut.
    """
    seen: dict[str, int] = {}
    key: str | None = None
    group: dict[str, bytes] = {}
    unusable: list[_Unusable] = []

    def finish() -> tuple[str, dict[str, bytes], str | None]:
        error = None
        occurrence = seen.get(key, 0) + 1
        seen[key] = occurrence
        if occurrence > 1:
            where = "right after its first members" if last[0] == key else "after other keys: its members are not contiguous"
            error = (
                f"key '{key}' occurs again in shard {shard} ({where}; occurrence {occurrence}, members "
                f"{sorted(group) or [u.name for u in unusable]}): a key names one sample, so this repeat "
                "was not read (rewrite the shard with unique keys, each sample's members together)"
            )
        elif unusable:
            error = "; ".join(
                f"member '{u.name}' is {u.kind}: links, devices and directories are not read "
                "(store the file itself in the tar)"
                for u in unusable
            )
        last[0] = key
        return key, group, error

    last: list[str | None] = [None]  # the key of the group finished last
    for item in members:
        if isinstance(item, _Truncated):
            cut_key = split_member_name(item.member)[0] if item.member else key
            if key is not None and cut_key != key:
                yield finish()
            yield (cut_key or ""), {}, item.message
            return
        if isinstance(item, _Unusable):
            member_key, ext = split_member_name(item.name)
        else:
            name, data = item
            member_key, ext = split_member_name(name)
        ext = ext.lower()
        repeat = member_key == key and (ext in group or any(split_member_name(u.name)[1].lower() == ext
                                                            for u in unusable))
        if member_key != key or repeat:
            if key is not None:
                yield finish()
            key, group, unusable = member_key, {}, []
        if isinstance(item, _Unusable):
            unusable.append(item)
        else:
            group[ext] = data
    if key is not None:
        yield finish()


def _label(value: object, member: str) -> int:
    """A class id within int32; ValueError naming ``member`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{member}: label {value!r} is not an integer class id")
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ValueError(f"{member}: {value[:40]!r} is not an integer class id") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{member}: label {value!r} is not an integer class id")
        value = int(value)
    if not INT32_MIN <= value <= INT32_MAX:
        text = str(value)
        text = text if len(text) <= 24 else text[:20] + "..."
        raise ValueError(f"{member}: label {text} is outside the int32 range of class ids")
    return value


def _json_depth(data: bytes) -> int:
    """How deeply arrays and objects nest in ``data`` (strings skipped), without parsing it."""
    skeleton = np.frombuffer(_JSON_STRING.sub(b'""', data), dtype=np.uint8)
    steps = np.isin(skeleton, (ord("["), ord("{"))).astype(np.int64) - np.isin(skeleton, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def _boxes(value: object, member: str) -> list[list[float]]:
    shape = f"{member}: boxes must be a list of [x0, y0, x1, y1]"
    if not isinstance(value, list):
        raise ValueError(shape)
    boxes = []
    for box in value:
        if not isinstance(box, list) or len(box) != 4 or any(isinstance(v, bool) for v in box):
            raise ValueError(shape)
        try:
            box = [float(v) for v in box]
        except (TypeError, ValueError):
            raise ValueError(shape) from None
        if not all(abs(v) <= FLOAT32_MAX for v in box):  # also False for NaN
            raise ValueError(f"{member}: box {box} is not finite (NaN, Infinity or beyond float32)")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"{member}: box {box} is inverted (x1 < x0 or y1 < y0)")
        boxes.append(box)
    return boxes


def _parse_metadata(sample: Sample, members: dict[str, bytes]) -> str | None:
    """Fill label/class_name/gt_boxes from .cls and .json; return an error or None."""
    cls_member, json_member = f"member '{sample.key}.cls'", f"member '{sample.key}.json'"
    try:
        if "cls" in members:
            sample.label = _label(members["cls"].decode("utf-8", "replace"), cls_member)
        if "json" in members:
            data = members["json"]
            if len(data) > MAX_JSON_BYTES:
                return f"{json_member} is {len(data):,} bytes, over the {MAX_JSON_BYTES:,}-byte limit for metadata"
            depth = _json_depth(data)
            if depth > MAX_JSON_DEPTH:
                return f"{json_member} nests {depth} levels deep, over the limit of {MAX_JSON_DEPTH}"
            try:
                meta = json.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                return f"malformed .json member '{sample.key}.json': {e}"
            if not isinstance(meta, dict):
                return f"bad .json {json_member}: expected an object, got {type(meta).__name__}"
            if sample.label is None and meta.get("label") is not None:
                sample.label = _label(meta["label"], f"bad .json {json_member}")
            if meta.get("class_name") is not None:
                sample.class_name = str(meta["class_name"])
            if meta.get("boxes") is not None:
                sample.gt_boxes = _boxes(meta["boxes"], f"bad .json {json_member}")
    except ValueError as e:
        return f"bad .cls {e}" if str(e).startswith(cls_member) else str(e)
    return None


def sample_from_members(
    key: str, members: dict[str, bytes], shard: str, error: str | None = None, decode: bool = True
) -> Sample:
    """One occurrence's members -> a Sample; any failure is the sample's error, naming the key."""
    sample = Sample(key=key, shard=shard, error=error)
    if error is not None:
        return sample
    try:
        return _sample_from_members(sample, members, decode)
    except Exception as e:  # one sample's bad bytes never cost the shard its other samples
        return Sample(key=key, shard=shard, error=f"sample '{key}' (members {sorted(members)}): {_describe(e)}")


def _sample_from_members(sample: Sample, members: dict[str, bytes], decode: bool) -> Sample:
    sample.error = _parse_metadata(sample, members)
    if sample.error is not None:
        return sample
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image_ext is None:
        sample.error = (
            f"no image member (one of .{', .'.join(IMAGE_EXTENSIONS)}); "
            f"members: {sorted(members) or 'none'}"
        )
        return sample
    sample.image_bytes = members[image_ext]
    sample.mask_bytes = members.get(MASK_EXTENSION)
    return decode_sample(sample) if decode else sample


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any mode -> RGB; 16-bit and float grey are scaled, not clipped, to 0..255."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        grey = np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "F":
        grey = np.clip(np.asarray(image, dtype=np.float64), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("P", "PA", "LA") or "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def decode_image(data: bytes, draft_size: int | None = None) -> tuple[Image.Image, int, int]:
    """Bytes -> (RGB image, original width, original height), EXIF orientation applied.

    ``draft_size`` lets libjpeg decode a JPEG at a reduced scale that still covers
    ``draft_size`` px on both sides (much faster for large photos); width and height stay
    the original ones.
    """
    image = Image.open(io.BytesIO(data))
    # Parsing EXIF costs time on every image; most have none (PIL keeps the raw block in info).
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1) if "exif" in image.info else 1
    width, height = image.size
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    image.load()
    if orientation in (2, 3, 4, 5, 6, 7, 8):
        image = ImageOps.exif_transpose(image)
    return _to_rgb(image), width, height


def decode_mask(data: bytes) -> np.ndarray:
    """L-mode PNG -> uint8 0/255. Masks stored as 0/1 are accepted too."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    cut = 128 if arr.max(initial=0) > 1 else 1
    return np.where(arr >= cut, 255, 0).astype(np.uint8)


def _describe(e: Exception) -> str:
    """Exception text without object addresses, so the same bad data gives the same row."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the member data", str(e))
    return f"{type(e).__name__}: {text}"


def decode_sample(sample: Sample, draft_size: int | None = None) -> Sample:
    """Decode ``image_bytes``/``mask_bytes`` of an undecoded sample (thread-safe, pure)."""
    if sample.error is not None or sample.image_bytes is None:
        return sample
    out = dataclasses.replace(sample, image_bytes=None, mask_bytes=None)
    try:
        out.image, out.width, out.height = decode_image(sample.image_bytes, draft_size)
    except Exception as e:  # PIL raises many types for bad data; every one is a bad image
        out.error = f"undecodable image: {_describe(e)}"
        return out
    if sample.mask_bytes is not None:
        out.mask, out.error = checked_mask(sample.mask_bytes, out.width, out.height)
        if out.error is not None:  # an error sample carries no pixels: nothing runs on it
            out.image = out.mask = None
    return out


def checked_mask(data: bytes, width: int, height: int) -> tuple[np.ndarray | None, str | None]:
    """A ``.mask.png`` member for an image of ``width`` x ``height``: (mask, None), or
    (None, the sample's error) when it does not decode or its size differs."""
    try:
        mask = decode_mask(data)
    except Exception as e:
        return None, f"undecodable .mask.png: {_describe(e)}"
    if mask.shape != (height, width):
        return None, f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {width}x{height}"
    return mask, None


def read_samples(
    url: str,
    decode: bool = True,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    draft_size: int | None = None,
    prefetch: int | None = None,
) -> Iterator[Sample]:
    """Stream the samples of one shard; see the module docstring for the error rules.

    ``decode=False`` leaves ``image``/``mask`` None and the raw bytes in
    ``image_bytes``/``mask_bytes``, for ``decode_sample`` in a thread pool.
    ``prefetch``: blocks fetched ahead in a background thread (default: 3 for object
    stores, 0 for local files, where the page cache already reads ahead).
    """
    fs, path = url_to_fs(url)
    if prefetch is None:
        prefetch = 0 if isinstance(fs, LocalFileSystem) else 3
    # With prefetching, each background read is one ranged GET of block_size: fsspec's
    # own read-ahead cache would only hold a second copy.
    options = {"cache_type": "none"} if prefetch > 0 and not isinstance(fs, LocalFileSystem) else {}
    try:
        fileobj = fs.open(path, "rb", block_size=block_size, **options)
    except FileNotFoundError:
        raise FileNotFoundError(f"shard {url} does not exist") from None
    stream = PrefetchingReader(fileobj, chunk_size=block_size, depth=prefetch) if prefetch > 0 else fileobj
    try:
        for key, members, error in group_members(tar_members(stream, url), url):
            sample = sample_from_members(key, members, url, error, decode=False)
            yield decode_sample(sample, draft_size) if decode else sample
    finally:
        stream.close()
        fileobj.close()
