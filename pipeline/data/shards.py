"""Shard spec -> shard URLs (DESIGN §2).

Accepted specs, and the order of the result (always deterministic):

- brace pattern ``s3://b/wds/train-{000000..000127}.tar`` or ``{a,b}``: pattern order,
  which is sorted order for zero-padded ranges; every named shard must exist;
- prefix ending in ``/``: every ``*.tar``, ``*.tar.gz`` and ``*.tgz`` below it, recursively,
  sorted (the reader opens compressed tars too); every other file below it is named in
  ``ShardListing.skipped``, which the localize job prints, so none is passed over unsaid;
- glob (``*``, ``?``, ``[``): matches, sorted;
- ``@list.txt`` (a local path or any URL): one spec a line, ``#`` comments, in file order;
- a single local path, ``file://``, ``s3://``, ``memory://`` ... URL of a tar file.

URLs come back in the form the spec used (a local spec gives local paths, an s3 spec
s3:// URLs), because the Parquet ``shard`` column records the shard "as given".
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.data.storage import check_bucket, protocol_of, read_bytes, url_to_fs

_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_BRACE = re.compile(r"\{([^{}]*)\}")
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class ShardListing:
    """The shard URLs of a spec and the files below its prefixes that are not shards."""

    urls: list[str]
    skipped: list[str] = field(default_factory=list)


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion: ``{000..003}`` (zero padding kept) and ``{a,b,c}``."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = _RANGE.fullmatch(m.group(0))
    if r:
        lo_text, hi_text = r.group(1), r.group(2)
        lo, hi = int(lo_text), int(hi_text)
        if hi < lo:
            raise ValueError(f"brace range {m.group(0)!r} in shard spec {pattern!r} runs backwards")
        width = len(lo_text) if lo_text.startswith("0") and len(lo_text) > 1 else 0
        choices = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        choices = body.split(",")
    else:
        raise ValueError(
            f"shard spec {pattern!r}: braces must hold a range {{000..127}} or a list {{a,b}}"
        )
    return [e for c in choices for e in expand_braces(head + c + tail)]


def _with_prefix(spec_root: str, fs_root: str, found: str) -> str:
    """Rebuild a listed path in the spec's own form: spec root + the part below it."""
    rel = found[len(fs_root) :].lstrip("/") if found.startswith(fs_root) else found
    return spec_root.rstrip("/") + "/" + rel


def _list_tars(spec: str) -> ShardListing:
    fs, root = url_to_fs(spec)
    root = root.rstrip("/")
    if not fs.isdir(root):
        return ShardListing([])
    files = sorted(fs.find(root))
    found = [p for p in files if p.lower().endswith(SHARD_SUFFIXES)]
    skipped = [p for p in files if not p.lower().endswith(SHARD_SUFFIXES)]
    return ShardListing([_with_prefix(spec, root, p) for p in found], [_with_prefix(spec, root, p) for p in skipped])


def _glob(spec: str) -> list[str]:
    fs, path = url_to_fs(spec)
    found = sorted(fs.glob(path))
    if protocol_of(spec) == "file" and "://" not in spec:
        return found
    # Keep the spec's scheme: the part of the spec before the first wildcard is literal.
    literal = re.split(r"[*?\[]", spec, maxsplit=1)[0]
    literal_root = literal.rsplit("/", 1)[0]
    _, fs_root = url_to_fs(literal_root + "/x")
    fs_root = fs_root[:-1].rstrip("/")
    return [_with_prefix(literal_root, fs_root, p) for p in found]


def _existing(urls: list[str]) -> list[str]:
    """The URLs that exist, checked with one listing per parent directory."""
    listings: dict[str, set[str]] = {}
    result = []
    for url in urls:
        fs, path = url_to_fs(url)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        cache_key = f"{id(fs)}:{parent}"
        if cache_key not in listings:
            try:
                names = fs.ls(parent or ".", detail=False) if fs.isdir(parent or ".") else []
            except (FileNotFoundError, NotADirectoryError):
                names = []
            listings[cache_key] = {n.rstrip("/").rsplit("/", 1)[-1] for n in names}
        if path.rsplit("/", 1)[-1] in listings[cache_key]:
            result.append(url)
    return result


def _read_list(spec: str) -> ShardListing:
    list_url = spec[1:]
    try:
        text = read_bytes(list_url).decode("utf-8")
    except FileNotFoundError:
        raise ValueError(f"shard spec {spec!r}: list file {list_url!r} does not exist") from None
    listing = ShardListing([])
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            part = find_shard_files(line)
            listing.urls.extend(part.urls)
            listing.skipped.extend(part.skipped)
    return listing


def expand_shards(spec: str) -> list[str]:
    """Shard URLs named by ``spec``; ValueError naming the spec when none exist.

    StorageError (naming endpoint and bucket) when an S3 bucket is missing or refuses
    the credentials.
    """
    return find_shard_files(spec).urls


def find_shard_files(spec: str) -> ShardListing:
    """``expand_shards``, plus the files below the spec's prefixes that are not shards."""
    try:
        return _expand(spec.strip())
    except PermissionError:
        check_bucket(spec.strip().lstrip("@"))
        raise


def _expand(spec: str) -> ShardListing:
    if not spec:
        raise ValueError("empty shard spec: give a path, URL, prefix/, brace pattern or @list.txt")
    skipped: list[str] = []
    if spec.startswith("@"):
        listing = _read_list(spec)
        urls, skipped = listing.urls, listing.skipped
    elif _BRACE.search(spec):
        named = expand_braces(spec)
        urls = _existing(named)
        missing = [u for u in named if u not in set(urls)]
        if urls and missing:
            raise ValueError(
                f"shard spec {spec!r}: {len(missing)} of {len(named)} shards do not exist "
                f"(first: {missing[0]}); fix the range or write the missing shards"
            )
    elif spec.endswith("/"):
        listing = _list_tars(spec)
        urls, skipped = listing.urls, listing.skipped
    elif re.search(r"[*?\[]", spec):
        urls = _glob(spec)
    else:
        fs, path = url_to_fs(spec)
        if fs.isdir(path):
            listing = _list_tars(spec + "/")
            urls, skipped = listing.urls, listing.skipped
        else:
            urls = [spec] if fs.exists(path) else []
    if not urls:
        if protocol_of(spec.lstrip("@")) in ("s3", "s3a"):
            check_bucket(spec.lstrip("@"))  # a missing bucket or bad keys say so, by name
        raise ValueError(
            f"shard spec {spec!r} matches no shard: check the path or URL (a prefix must end "
            "in '/' and hold *.tar, *.tar.gz or *.tgz files; S3 endpoints come from AWS_ENDPOINT_URL)"
            + (f"; files found that are not shards: {', '.join(skipped[:5])}" if skipped else "")
        )
    return ShardListing(urls, skipped)
