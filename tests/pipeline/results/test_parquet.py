"""pipeline/results/parquet.py: done means readable (issue 14), and readers name a bad file."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.results.parquet import unfinished_reason, written_by


def _write(path, rows=3):
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(rows)], "status": ["ok"] * rows}), path)
    return str(path)


def test_only_a_readable_file_with_the_expected_rows_is_done(tmp_path):
    good = _write(tmp_path / "good.parquet")
    (tmp_path / "zero.parquet").write_bytes(b"")
    (tmp_path / "cut.parquet").write_bytes((tmp_path / "good.parquet").read_bytes()[:-20])
    assert unfinished_reason(good) is None and unfinished_reason(good, expected_rows=3) is None
    assert "holds 3 rows but the run's manifest records 5" in unfinished_reason(good, expected_rows=5)
    for name in ("zero.parquet", "cut.parquet"):
        reason = unfinished_reason(str(tmp_path / name))
        assert reason.startswith(f"{tmp_path / name} does not read as Parquet")
        assert written_by(str(tmp_path / name)) is None


def test_evaluate_and_export_name_a_file_they_cannot_read(tmp_path):
    """Both read a run through ``read_run``: its error names the cut file."""
    from pipeline.evaluation.evaluate import read_run

    run = tmp_path / "run"
    run.mkdir()
    _write(run / "a.parquet")  # columns evaluate does not need are absent: named too
    (run / "b.parquet").write_bytes(b"")
    with pytest.raises(ValueError, match=f"cannot read Parquet file {run / 'a.parquet'}: No match"):
        read_run(str(run))
    (run / "a.parquet").unlink()
    with pytest.raises(ValueError, match=f"cannot read Parquet file {run / 'b.parquet'}: .*zero-byte or cut"):
        read_run(str(run))
