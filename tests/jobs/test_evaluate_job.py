"""jobs/evaluate_wsol.py and pipeline/evaluation/evaluate.py on small fixture runs.

Maps are 14 x 14 with a block of 255 on cells [2, 6) x [2, 6) and 0 elsewhere; at the
224 x 224 evaluation size the block is exactly the box [32, 32, 96, 96] at tau 0.5, and
[24, 24, 104, 104] at tau 0.091 (IoU 0.64 with the block's box), so the numbers below are
worked out by hand. Below tau 0.091 the box is the whole image: the bicubic resize
undershoots next to the block, so after the min-max normalisation the background sits at
level 23 of 255 (wsolevaluation's rule: foreground ``q > int(tau * 255)``).
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

from pipeline.evaluation.evaluate import evaluate_run
from pipeline.results.schema import localize_schema
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
    assert r["best_taus"]["maxboxacc"] == 0.091 and r["chosen_threshold"] == 0.091
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
    assert result["threshold"] == 0.091  # val's choice, not the test run's own 0.3
    assert "chosen on" in result["threshold_source"]
    # A run directory works as the source too (it is evaluated on the fly).
    assert evaluate_run(test, threshold_from=val)["threshold"] == 0.091


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
    os.makedirs(tmp_path / "gt")
    shard = write_shard(  # the shard the rows came from (data/shard-000000.tar), copied elsewhere
        str(tmp_path / "gt" / "shard-000000.tar"),
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

    from pipeline.evaluation.pseudo_boxes import export_pseudo_boxes

    run = write_run(str(tmp_path), "val", {"shard-000000": _labelled_rows()})
    fs = fsspec.filesystem("memory")
    for name in os.listdir(run):
        fs.pipe_file(f"/satloc-test/val/{name}", open(os.path.join(run, name), "rb").read())
    try:
        r = evaluate_run("memory://satloc-test/val")
        assert r["run_id"] == "val" and r["gt_known_loc"] == pytest.approx(200 / 3)
        export_pseudo_boxes("memory://satloc-test/val", "yolo", "memory://satloc-test/yolo")
        assert fs.cat_file("/satloc-test/yolo/shard-000000__a.txt").decode().startswith("1 ")
    finally:
        fs.rm("/satloc-test", recursive=True)


# --- --protocol sat: the official SAT evaluator ------------------------------------------
#
# The run was localized with --resize-crop 256,224, so the maps cover the 224 centre crop of
# the 256 x 256 resize. A 14 x 14 block of cells [a, b) gives the official box
# [16 a - 2, 16 b + 2) clipped to [0, 224] at threshold 0.4 (tests/pipeline/evaluation/test_sat_protocol.py
# derives it); GT boxes map by x / W * 256 - 16, clipped to [0, 223], truncated.


def _sat_rows() -> list[dict]:
    def block(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        return blob_map((14, 14), (x0, y0, x1, y1))

    return [
        # a: 512 x 256; box [14, 14, 146, 146]; GT [64, 32, 320, 160] -> [16, 16, 144, 144];
        # IoU (+1) = 129^2 / 133^2 = 0.941: located; right class.
        make_row("a", loc_map=block(1, 1, 9, 9), label=1, gt_label=1, gt_boxes=[[64.0, 32.0, 320.0, 160.0]],
                 width=512, height=256),
        # b: 256 x 256 (x - 16); box [0, 0, 18, 18]; GT [16, 16, 34, 53] -> [0, 0, 18, 37];
        # IoU (+1) = 19 * 19 / (19 * 38) = 0.5 exactly: located (0.486 without the +1);
        # wrong top-1, true class second in the top-5.
        make_row("b", loc_map=block(0, 0, 1, 1), label=2, topk=[2, 1, 7, 8, 9], gt_label=1,
                 gt_boxes=[[16.0, 16.0, 34.0, 53.0]], width=256, height=256),
        # c: a constant map -> the whole frame [0, 0, 224, 224]; GT the whole image -> clipped to
        # [0, 0, 223, 223]; IoU (+1) = 224^2 / 225^2 = 0.991: located; true class not in the top-5.
        make_row("c", loc_map=np.full((14, 14), 7, dtype=np.uint8), label=3, topk=[3, 5, 6, 7, 8], gt_label=4,
                 gt_boxes=[[0.0, 0.0, 256.0, 256.0]], width=256, height=256),
        # d: box [158, 158, 224, 224] misses a's GT [16, 16, 144, 144]: IoU 0; right class.
        make_row("d", loc_map=block(10, 10, 14, 14), label=1, gt_label=1, gt_boxes=[[64.0, 32.0, 320.0, 160.0]],
                 width=512, height=256),
        make_row("e", status="error", error="undecodable image: cannot identify image file"),
    ]


def test_sat_protocol_figures_by_hand(tmp_path):
    run = write_run(str(tmp_path), "crop", {"shard-000000": _sat_rows()}, resize_crop=(256, 224))
    r = evaluate_run(run, protocol="sat")
    assert (r["protocol"], r["num_images"], r["num_errors"], r["num_loc_images"]) == ("sat", 4, 1, 4)
    assert (r["threshold"], r["input_frame"], r["eval_size"]) == (0.4, {"resize": 256, "crop": 224}, [224, 224])
    assert r["gt_known_loc"] == 75.0  # a, b, c
    assert r["top1"] == 50.0 and r["top5"] == 75.0  # a, d | a, b, d
    assert r["top1_loc"] == 25.0  # a
    assert r["top5_loc"] == 50.0  # a, b
    for key in ("maxboxacc", "maxboxacc_v2", "best_taus", "chosen_threshold", "pxap"):
        assert r[key] is None, key
    assert r["per_class"]["1"] == pytest.approx(
        {"label": 1, "num_images": 3, "top1": 200 / 3, "top5": 100.0, "gt_known_loc": 200 / 3,
         "top1_loc": 100 / 3, "top5_loc": 200 / 3, "boxacc_at_best_tau": None}
    )
    assert any("ten-crop" in n for n in r["notes"])
    # --threshold overrides the CUB default (0.3 is ImageNet's): b's box grows to [0, 0, 19, 19],
    # IoU 19 * 20 / (400 + 722 - 380) = 0.512, the others keep their outcome.
    r3 = evaluate_run(run, protocol="sat", threshold=0.3)
    assert (r3["threshold"], r3["threshold_source"], r3["gt_known_loc"]) == (0.3, "given", 75.0)


def test_sat_protocol_cli_and_its_errors(tmp_path):
    crop = write_run(str(tmp_path), "crop", {"shard-000000": _sat_rows()}, resize_crop=(256, 224))
    proc = _run_cli("--predictions", crop, "--protocol", "sat", "--output", str(tmp_path / "sat.json"))
    assert proc.returncode == 0, proc.stderr
    assert "official SAT evaluator" in proc.stdout and "Top-1 Loc" in proc.stdout and "MaxBoxAcc" not in proc.stdout
    assert json.loads((tmp_path / "sat.json").read_text())["top1_loc"] == 25.0
    # A run localized on the whole image: the SAT protocol says how to get the frame.
    whole = write_run(str(tmp_path), "whole", {"shard-000000": _labelled_rows()})
    proc = _run_cli("--predictions", whole, "--protocol", "sat")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "rerun jobs/localize_shards.py with --resize-crop 256,224" in proc.stderr
    # The default (Choe et al.) protocol refuses a crop-frame run rather than misplace its maps.
    with pytest.raises(ValueError, match="localized with --resize-crop 256,224.*--protocol sat"):
        evaluate_run(crop)
    with pytest.raises(ValueError, match="fixed threshold.*not --threshold-from"):
        evaluate_run(crop, protocol="sat", threshold_from=whole)
    with pytest.raises(ValueError, match="--protocol must be one of choe, sat"):
        evaluate_run(crop, protocol="official")


def test_frame_disagreeing_between_files_and_manifest_is_an_error(tmp_path):
    run = write_run(str(tmp_path), "r", {"shard-000000": _sat_rows()[:1]}, resize_crop=(256, 224),
                    manifest={"input_frame": {"kind": "resize", "size": 224}})
    with pytest.raises(ValueError, match="records whole image .* but the Parquet files --resize-crop 256,224"):
        evaluate_run(run, protocol="sat")
    other = localize_schema(14, 14, "r")
    table = pa.Table.from_pydict({n: [make_row("z", loc_map=BLOB).get(n)] for n in other.names}, schema=other)
    pq.write_table(table, os.path.join(run, "shard-000001.parquet"))
    with pytest.raises(ValueError, match="different input frames"):
        evaluate_run(run, protocol="sat")


def test_a_manifest_in_the_old_test_only_shape_says_what_to_do(tmp_path):
    """Plain-string shards, a top-level config and threshold: a shape localize never wrote."""
    run = write_run(str(tmp_path), "r", {"shard-000000": _labelled_rows()}, with_manifest=False)
    legacy = {"run_id": "r", "shards": ["data/shard-000000.tar"], "config": {}, "threshold": 0.5}
    with open(os.path.join(run, "_manifest.json"), "w") as f:
        json.dump(legacy, f)
    with pytest.raises(ValueError, match="old shape .* rerun jobs/localize_shards.py with the same --run-id .* or delete"):
        evaluate_run(run)
    proc = _run_cli("--predictions", run)
    assert proc.returncode == 2 and "old shape" in proc.stderr and "Traceback" not in proc.stderr
    os.remove(os.path.join(run, "_manifest.json"))  # what the message offers: the files alone
    assert evaluate_run(run)["gt_known_loc"] == pytest.approx(200 / 3)


# --- issue 14 (5): --gt-shards joins on (shard, key) ---------------------------------------------


def _gt_shard(path, boxes_by_key: dict[str, list[float]], mask_box: tuple[int, int, int, int] | None = None) -> str:
    image = np.zeros((224, 224, 3), dtype=np.uint8)
    samples = []
    for key, box in boxes_by_key.items():
        sample = {"key": key, "image": image, "json": {"label": 1, "boxes": [box]}}
        if mask_box is not None:
            mask = np.zeros((224, 224), dtype=np.uint8)
            x0, y0, x1, y1 = mask_box
            mask[y0:y1, x0:x1] = 255
            sample["mask"] = mask
        samples.append(sample)
    return write_shard(str(path), samples)


def test_gt_shards_join_on_shard_and_key(tmp_path):
    """Both shards number their samples a, b: each row gets the truth of its own shard."""
    rows = {
        "part-000000": [make_row(k, loc_map=BLOB, label=1, shard="data/part-000000.tar") for k in "ab"],
        "part-000001": [make_row(k, loc_map=BLOB, label=1, shard="data/part-000001.tar") for k in "ab"],
    }
    run = write_run(str(tmp_path), "r", rows)
    gt = tmp_path / "gt"
    gt.mkdir()
    _gt_shard(gt / "part-000000.tar", {"a": BLOB_BOX, "b": BLOB_BOX})  # on the blob: located
    _gt_shard(gt / "part-000001.tar", {"a": [150.0, 150.0, 200.0, 200.0], "b": [150.0, 150.0, 200.0, 200.0]})
    r = evaluate_run(run, gt_shards=str(gt) + "/")
    assert r["num_loc_images"] == 4 and r["gt_known_loc"] == 50.0


def test_gt_shards_of_another_data_set_with_the_same_keys_are_refused(tmp_path):
    """The same key names in shards of another name: refused, never a PxAP against the wrong masks."""
    rows = [make_row(k, loc_map=BLOB, label=1, shard="data/val-000000.tar") for k in "ab"]
    run = write_run(str(tmp_path), "r", {"val-000000": rows})
    other = _gt_shard(tmp_path / "train-000000.tar", {"a": [0.0, 0.0, 50.0, 50.0], "b": [0.0, 0.0, 50.0, 50.0]},
                      mask_box=(0, 0, 50, 50))
    with pytest.raises(ValueError, match="the row of key 'a' comes from shard val-000000 but the ground truth has "
                                         "that key only in train-000000; .* point --gt-shards at the shards"):
        evaluate_run(run, gt_shards=other)


def test_gt_shards_with_one_shard_name_twice_are_ambiguous(tmp_path):
    rows = [make_row("a", loc_map=BLOB, label=1, shard="data/val-000000.tar")]
    run = write_run(str(tmp_path), "r", {"val-000000": rows})
    for d in ("x", "y"):
        os.makedirs(tmp_path / d)
        _gt_shard(tmp_path / d / "val-000000.tar", {"a": BLOB_BOX})
    with pytest.raises(ValueError, match="key 'a' is twice in shards named val-000000 .* ambiguous"):
        evaluate_run(run, gt_shards=f"{tmp_path}/{{x,y}}/val-000000.tar")


# --- issue 14 (7): S3 without credentials or endpoint: clear errors, exit 2 ---------------------


def test_s3_predictions_without_credentials_or_endpoint_are_clear_errors(tmp_path, monkeypatch, no_s3_credentials,
                                                                        closed_port):
    import time

    from pipeline.data.storage import StorageError
    from pipeline.evaluation.pseudo_boxes import export_pseudo_boxes

    endpoint = f"http://127.0.0.1:{closed_port}"
    no_s3_credentials(endpoint)
    no_keys = "no S3 credentials for bucket 'satloc' .* set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    with pytest.raises(StorageError, match=no_keys):
        evaluate_run("s3://satloc/out/run1")
    with pytest.raises(StorageError, match=no_keys):
        export_pseudo_boxes("s3://satloc/out/run1", "coco", str(tmp_path / "p.json"))
    proc = subprocess.run(
        [sys.executable, "jobs/evaluate_wsol.py", "--predictions", "s3://satloc/out/run1"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert proc.returncode == 2 and "set AWS_ACCESS_KEY_ID" in proc.stderr and "Traceback" not in proc.stderr
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"at endpoint {endpoint} does not answer .* check AWS_ENDPOINT_URL"):
        evaluate_run("s3://satloc/out/run1")
    assert time.monotonic() - started < 10
    assert not (tmp_path / "p.json").exists()


# --- issue 14 (6): evaluation memory does not grow with the largest GT-box count ------------------


def test_one_image_with_many_gt_boxes_does_not_blow_up_evaluation_memory(tmp_path):
    """600 images, one with 30,000 GT boxes: padding every image to 30,000 boxes would take
    600 x 30,000 x 4 int64 = 576 MB (and a float64 copy per chunk); the traced peak stays far below."""
    import tracemalloc

    rows = [make_row(f"k{i:04d}", loc_map=BLOB, label=1, gt_label=1, gt_boxes=[BLOB_BOX]) for i in range(600)]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 150, (30_000, 2))
    rows[7]["gt_boxes"] = np.concatenate([xy, xy + 60], axis=1).tolist()
    rows[7]["gt_boxes"][0] = BLOB_BOX
    run = write_run(str(tmp_path), "many", {"shard-000000": rows})
    tracemalloc.start()
    try:
        r = evaluate_run(run, workers=1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r["num_loc_images"] == 600 and r["gt_known_loc"] == 100.0
    assert peak < 150 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_labels_outside_the_classes_are_scored_as_misses_and_listed(tmp_path):
    """-7 and 12 (a 10-class checkpoint) stay in the figures and the per-class table."""
    rows = [
        make_row("a", loc_map=BLOB, label=1, class_name="cat", gt_label=1, gt_boxes=[BLOB_BOX]),
        make_row("b", loc_map=BLOB, label=1, class_name="cat", gt_label=-7, gt_boxes=[BLOB_BOX]),
        make_row("c", loc_map=BLOB, label=1, class_name="cat", gt_label=12, gt_boxes=[BLOB_BOX]),
        make_row("d", loc_map=BLOB, label=1, class_name="cat"),  # no label: not in top-1
    ]
    r = evaluate_run(write_run(str(tmp_path), "odd", {"shard-000000": rows}))
    assert r["num_cls_images"] == 3
    assert r["top1"] == pytest.approx(100 / 3)
    assert r["per_class"]["-7"] == pytest.approx(
        {"label": -7, "num_images": 1, "top1": 0.0, "top5": 0.0, "gt_known_loc": 100.0,
         "top1_loc": 0.0, "top5_loc": 0.0, "boxacc_at_best_tau": 100.0}
    )
    assert r["per_class"]["12"]["num_images"] == 1 and r["per_class"]["12"]["top1"] == 0.0
    assert sorted(c["label"] for c in r["per_class"].values()) == [-7, 1, 12]
