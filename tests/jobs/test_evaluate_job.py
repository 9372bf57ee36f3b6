"""jobs/evaluate_wsol.py and pipeline/evaluate.py on small fixture runs.

Maps are 14 x 14 with a block of 255 on cells [2, 6) x [2, 6) and 0 elsewhere; at the
224 x 224 evaluation size the block is exactly the box [32, 32, 96, 96] at tau 0.5, and
[24, 24, 104, 104] at tau 0.01 (IoU 0.64 with the block's box), so the numbers below are
worked out by hand.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.evaluate import evaluate_run
from pipeline.schema import localize_schema
from run_factory import blob_map, make_row, write_run, write_shard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOB = blob_map((14, 14), (2, 2, 6, 6))
BLOB_BOX = [32.0, 32.0, 96.0, 96.0]


def _labelled_rows() -> list[dict]:
    return [
        # a: right class, box on the object.
        make_row("a", loc_map=BLOB, label=1, class_name="cat", gt_label=1, gt_boxes=[BLOB_BOX]),
        # b: wrong top-1 (true class second in top-5), GT box far from the map.
        make_row("b", loc_map=BLOB, label=2, topk=[2, 1, 7, 8, 9], class_name="dog", gt_label=1,
                 gt_boxes=[[150.0, 150.0, 200.0, 200.0]]),
        # c: a 448 x 224 image (the GT box scales to the block), true class not in the top-5.
        make_row("c", loc_map=BLOB, label=3, topk=[3, 5, 6, 7, 8], class_name="bird", gt_label=4,
                 gt_boxes=[[64.0, 32.0, 192.0, 96.0]], width=448, height=224),
        make_row("d", status="error", error="undecodable image: cannot identify image file"),
    ]


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "jobs/evaluate_wsol.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_metrics_of_a_labelled_run_by_hand(tmp_path):
    run = write_run(str(tmp_path), "val", {"shard-000000": _labelled_rows()[:2], "shard-000001": _labelled_rows()[2:]})
    r = evaluate_run(run)
    assert (r["run_id"], r["num_images"], r["num_errors"], r["threshold"]) == ("val", 3, 1, 0.5)
    assert r["threshold_source"] == "manifest"
    assert r["gt_known_loc"] == pytest.approx(200 / 3)
    assert r["top1"] == pytest.approx(100 / 3)
    assert r["top5"] == pytest.approx(200 / 3)
    assert r["top1_loc"] == pytest.approx(100 / 3)  # only a
    assert r["top5_loc"] == pytest.approx(100 / 3)  # b's class is in the top-5 but its box misses
    assert r["maxboxacc"] == pytest.approx(200 / 3)
    assert r["best_taus"]["maxboxacc"] == 0.01 and r["chosen_threshold"] == 0.01
    assert r["maxboxacc_v2"] == pytest.approx(200 / 3)
    assert r["maxboxacc_v2_by_delta"] == pytest.approx({"0.3": 200 / 3, "0.5": 200 / 3, "0.7": 200 / 3})
    assert r["pxap"] is None
    assert r["per_class"]["cat"] == pytest.approx(
        {"label": 1, "num_images": 2, "top1": 50.0, "top5": 100.0, "gt_known_loc": 50.0,
         "top1_loc": 50.0, "top5_loc": 50.0, "boxacc_at_best_tau": 50.0}
    )
    assert r["per_class"]["4"]["gt_known_loc"] == 100.0 and r["per_class"]["4"]["top1"] == 0.0
    assert r["errors"] == [
        {"key": "d", "shard": "data/shard-000000.tar", "error": "undecodable image: cannot identify image file"}
    ]
    assert any("1 error rows" in n for n in r["notes"])
    assert any("pxap is null" in n for n in r["notes"])


def test_cli_writes_json_and_table_and_threshold_transfers(tmp_path):
    val = write_run(str(tmp_path), "val", {"shard-000000": _labelled_rows()})
    test = write_run(str(tmp_path), "test", {"shard-000000": _labelled_rows()[:1]}, threshold=0.3)
    out = tmp_path / "val.json"
    proc = _run_cli("--predictions", val, "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "GT-known Loc" in proc.stdout and "MaxBoxAccV2" in proc.stdout and "cat" in proc.stdout
    saved = json.loads(out.read_text())
    for key in ("num_images", "threshold", "top1", "top5", "top1_loc", "top5_loc", "gt_known_loc", "maxboxacc",
                "maxboxacc_v2", "maxboxacc_v2_by_delta", "best_taus", "pxap", "per_class"):
        assert key in saved
    proc = _run_cli("--predictions", test, "--threshold-from", str(out), "--output", str(tmp_path / "test.json"))
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "test.json").read_text())
    assert result["threshold"] == 0.01  # val's choice, not the test run's own 0.3
    assert "chosen on" in result["threshold_source"]
    # A run directory works as the source too (it is evaluated on the fly).
    assert evaluate_run(test, threshold_from=val)["threshold"] == 0.01


def test_run_without_ground_truth_reports_nulls_and_a_note(tmp_path):
    rows = [make_row(k, loc_map=BLOB) for k in ("a", "b")]
    run = write_run(str(tmp_path), "nogt", {"shard-000000": rows})
    proc = _run_cli("--predictions", run)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert result["num_images"] == 2
    for key in ("top1", "top5", "gt_known_loc", "top1_loc", "maxboxacc", "maxboxacc_v2", "pxap", "chosen_threshold"):
        assert result[key] is None, key
    assert any("no ground-truth boxes" in n for n in result["notes"])
    assert any("no ground-truth labels" in n for n in result["notes"])
    assert "note: no ground-truth boxes" in proc.stdout
    # ... and it cannot be a threshold source.
    with pytest.raises(ValueError, match="chose no threshold"):
        evaluate_run(run, threshold_from=run)


def test_mixed_runs_in_one_directory_are_an_error(tmp_path):
    run = write_run(str(tmp_path), "r1", {"shard-000000": _labelled_rows()[:1]})
    other = localize_schema(14, 14, "r2")
    table = pa.Table.from_pydict({n: [make_row("z", loc_map=BLOB).get(n)] for n in other.names}, schema=other)
    pq.write_table(table, os.path.join(run, "shard-000001.parquet"))
    proc = _run_cli("--predictions", run)
    assert proc.returncode == 2
    assert "mixes files of 2 runs" in proc.stderr and "'r1'" in proc.stderr and "'r2'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_manifest_is_a_note_and_the_rows_give_the_threshold(tmp_path):
    rows = [{**row, "threshold": 0.4} for row in _labelled_rows()]
    run = write_run(str(tmp_path), "r", {"shard-000000": rows}, with_manifest=False)
    r = evaluate_run(run)
    assert (r["threshold"], r["threshold_source"]) == (pytest.approx(0.4), "rows")
    assert any("no _manifest.json" in n for n in r["notes"])
    assert r["gt_known_loc"] == pytest.approx(200 / 3)


def test_not_a_run_directory_is_a_clear_error(tmp_path):
    proc = _run_cli("--predictions", str(tmp_path / "nothing"))
    assert proc.returncode == 2 and "not a directory" in proc.stderr
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .parquet files"):
        evaluate_run(str(tmp_path / "empty"))


def test_gt_shards_give_boxes_labels_and_masks(tmp_path):
    rows = [make_row("a", loc_map=BLOB, label=1), make_row("b", loc_map=BLOB, label=1)]
    run = write_run(str(tmp_path), "r", {"shard-000000": rows})
    mask = np.zeros((224, 224), dtype=np.uint8)
    mask[32:96, 32:96] = 255
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    shard = write_shard(
        str(tmp_path / "gt-000000.tar"),
        [
            {"key": "a", "image": image, "json": {"label": 1, "class_name": "cat", "boxes": [BLOB_BOX]}, "mask": mask},
            {"key": "b", "image": image, "json": {"label": 2, "boxes": [[150, 150, 200, 200]]}},
        ],
    )
    r = evaluate_run(run, gt_shards=shard)
    assert r["num_loc_images"] == 2 and r["gt_known_loc"] == 50.0
    assert r["top1"] == 50.0  # a is class 1, b is class 2; both predicted 1
    assert r["num_pxap_images"] == 1
    # The mask is the block; only the block's rounded corners score below pixels outside it.
    assert 99.0 < r["pxap"] < 100.0
    assert "cat" in r["per_class"]


def test_manifest_in_the_localize_jobs_layout(tmp_path):
    """Shards as objects with a status, the threshold under settings, names in model_config."""
    rows = [{**row, "class_name": None} for row in _labelled_rows()]
    run = write_run(str(tmp_path), "r", {"shard-000000": rows}, with_manifest=False)
    manifest = {
        "run_id": "r",
        "model_sha256": "f" * 64,
        "model_config": {"class_names": ["zero", "one", "two", "three", "four"]},
        "settings": {"threshold": 0.45, "topk": 5},
        "rows": 4,
        "error_rows": 1,
        "shards": [
            {"shard": "data/shard-000000.tar", "output": f"{run}/shard-000000.parquet", "status": "done"},
            {"shard": "data/shard-000001.tar", "output": f"{run}/shard-000001.parquet", "status": "failed"},
        ],
    }
    with open(os.path.join(run, "_manifest.json"), "w") as f:
        json.dump(manifest, f)
    r = evaluate_run(run)
    assert (r["threshold"], r["threshold_source"]) == (0.45, "manifest")
    assert set(r["per_class"]) == {"one", "four"}
    assert any("1 shards of the run are not done (first: data/shard-000001.tar (failed))" in n for n in r["notes"])


def test_any_fsspec_url_works(tmp_path):
    import fsspec

    from pipeline.pseudo_boxes import export_pseudo_boxes

    run = write_run(str(tmp_path), "val", {"shard-000000": _labelled_rows()})
    fs = fsspec.filesystem("memory")
    for name in os.listdir(run):
        fs.pipe_file(f"/satloc-test/val/{name}", open(os.path.join(run, name), "rb").read())
    try:
        r = evaluate_run("memory://satloc-test/val")
        assert r["run_id"] == "val" and r["gt_known_loc"] == pytest.approx(200 / 3)
        export_pseudo_boxes("memory://satloc-test/val", "yolo", "memory://satloc-test/yolo")
        assert fs.cat_file("/satloc-test/yolo/a.txt").decode().startswith("1 ")
    finally:
        fs.rm("/satloc-test", recursive=True)
