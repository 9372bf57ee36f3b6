"""A run directory, ``<output>/<run_id>/``: one ``<shard-stem>.parquet`` per input shard
plus ``_manifest.json`` (``pipeline.results.manifest``). Only this module knows the layout.
"""
from __future__ import annotations

import posixpath

from pipeline.data.storage import join_url, url_to_fs

_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".parquet")  # a shard, or its output file


def shard_stem(url: str) -> str:
    """``s3://b/val-000003.tar`` (or its ``.parquet``) -> ``val-000003``: the stem of the
    shard's output file."""
    name = posixpath.basename(url.rstrip("/"))
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def output_url(run_url: str, shard_url: str) -> str:
    """Where the rows of ``shard_url`` go in the run directory ``run_url``."""
    return join_url(run_url, f"{shard_stem(shard_url)}.parquet")


def file_names(run_url: str) -> set[str]:
    """Names of the entries in the run directory; empty when it does not exist yet."""
    fs, path = url_to_fs(run_url)
    try:
        return {posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def is_run_dir(run_url: str) -> bool:
    fs, path = url_to_fs(run_url)
    return fs.isdir(path.rstrip("/"))


def parquet_files(run_url: str) -> list[str]:
    """Sorted names of the run's Parquet files (hidden temp files excluded)."""
    return sorted(n for n in file_names(run_url) if n.endswith(".parquet") and not n.startswith("."))
