"""pipeline/results/run_dir.py: the layout of a run directory."""
from __future__ import annotations

from pipeline.results.run_dir import file_names, is_run_dir, output_url, parquet_files, shard_stem


def test_shard_stem():
    assert shard_stem("s3://b/wds/train-000001.tar") == "train-000001"
    assert shard_stem("/data/x.tar.gz") == "x" and shard_stem("file:///d/y.tgz") == "y"


def test_output_url_and_listing(tmp_path):
    run = str(tmp_path / "run")
    assert output_url(run, "s3://b/wds/val-000003.tar") == f"{run}/val-000003.parquet"
    assert file_names(run) == set() and not is_run_dir(run)
    (tmp_path / "run").mkdir()
    for name in ("b.parquet", "a.parquet", ".a.parquet.tmp.parquet", "_manifest.json"):
        (tmp_path / "run" / name).write_bytes(b"")
    assert is_run_dir(run) and parquet_files(run) == ["a.parquet", "b.parquet"]
    assert "_manifest.json" in file_names(run)
