"""Samples -> WebDataset shards on any fsspec URL (DESIGN §2).

Shards are named ``{prefix}-{index:06d}.tar`` and rolled by sample count and by bytes.
Members of a sample are written together in sorted extension order, with fixed
metadata (mtime, owner), so the same samples give byte-identical shards. A shard becomes
visible only when complete: locally through a temp file and ``os.replace``, on object
stores because an upload appears only when it is finished.
"""
from __future__ import annotations

import io
import os
import sys
import tarfile
import tempfile
from typing import TextIO

from fsspec.implementations.local import LocalFileSystem

from pipeline.data.storage import join_url, url_to_fs

_MTIME = 1_700_000_000  # fixed, so that shards are reproducible


def _check_name(key: str, ext: str) -> None:
    if not key or "." in key.rsplit("/", 1)[-1]:
        raise ValueError(f"sample key {key!r} must be non-empty and hold no '.' (WebDataset splits on it)")
    if not ext or ext.startswith("."):
        raise ValueError(f"member extension {ext!r} of key {key!r} must be non-empty, without a leading '.'")


class ShardWriter:
    """Write samples (key + {ext: bytes}) into numbered shards under ``out_url``.

    Use as a context manager; ``urls`` lists the finished shards in order.
    """

    def __init__(
        self,
        out_url: str,
        prefix: str,
        max_count: int = 1000,
        max_bytes: int = 1 << 30,
        start_index: int = 0,
        progress: TextIO | None = sys.stdout,
    ):
        if max_count < 1 or max_bytes < 1:
            raise ValueError(f"shard size limits must be positive, got count {max_count}, bytes {max_bytes}")
        self.out_url = out_url
        self.prefix = prefix
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.index = start_index
        self.progress = progress
        self.urls: list[str] = []
        self.total_samples = 0
        self._fs, self._root = url_to_fs(out_url)
        self._local = isinstance(self._fs, LocalFileSystem)
        self._file = None
        self._tar: tarfile.TarFile | None = None
        self._tmp: str | None = None
        self._url: str | None = None
        self._count = 0
        self._bytes = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._abort()

    def _open_next(self) -> None:
        name = f"{self.prefix}-{self.index:06d}.tar"
        self.index += 1
        self._url = join_url(self.out_url, name)
        path = self._root.rstrip("/") + "/" + name
        if self._local:
            os.makedirs(self._root, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", dir=self._root)
            self._file = os.fdopen(fd, "wb")
        else:
            self._file = self._fs.open(path, "wb")
            self._final_path = path
        self._tar = tarfile.open(fileobj=self._file, mode="w|")
        self._count = 0
        self._bytes = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        if self._local:
            os.replace(self._tmp, os.path.join(self._root, os.path.basename(self._url)))
            self._tmp = None
        self.urls.append(self._url)
        if self.progress is not None:
            print(
                f"wrote {self._url}: {self._count} samples, {self._bytes / 2**20:.1f} MiB",
                file=self.progress,
                flush=True,
            )
        self._tar = None
        self._file = None

    def _abort(self) -> None:
        """Drop the shard in progress so a failed run leaves no half-written shard."""
        if self._tar is None:
            return
        # Drop tarfile's buffer instead of flushing it: closing would finish the archive.
        self._tar.fileobj.closed = True
        self._tar.closed = True
        try:
            if self._local:
                self._file.close()
            else:  # an unfinished upload is thrown away (S3 aborts the multipart upload)
                self._file.discard()
                try:
                    self._file.closed = True
                except AttributeError:
                    pass
        finally:
            if self._local and self._tmp and os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._tar = None
            self._file = None

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        for ext in members:
            _check_name(key, ext)
        size = sum(512 + -(-len(v) // 512) * 512 for v in members.values())  # header + padded data
        if self._tar is not None and (
            self._count >= self.max_count or (self._count > 0 and self._bytes + size > self.max_bytes)
        ):
            self._finish()
        if self._tar is None:
            self._open_next()
        for ext in sorted(members):
            data = members[ext]
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = _MTIME
            info.mode = 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self.total_samples += 1

    def close(self) -> list[str]:
        self._finish()
        return self.urls
