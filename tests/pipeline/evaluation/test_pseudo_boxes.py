"""pipeline/evaluation/pseudo_boxes.py and jobs/export_pseudo_boxes.py on small fixture runs."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO

from pipeline.evaluation.pseudo_boxes import BoxFilter, export_pseudo_boxes, resolve_classes, safe_file_stem
from run_factory import make_row, write_run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
NAMES = ["cat", "dog", "bird"]


def _rows() -> list[dict]:
    return [
        make_row("img-b", label=1, score=0.95, class_name="dog", width=640, height=480, fg_ratio=0.2,
                 boxes=[(10.3, 20.7, 300.9, 400.1, 0.8), (400.5, 10.25, 600.75, 90.5, 0.4)],
                 gt_label=1, gt_boxes=[[10.3, 20.7, 300.9, 400.1]]),
        make_row("img-a", label=0, score=0.6, class_name="cat", width=320, height=200, fg_ratio=0.5,
                 boxes=[(1.5, 2.5, 101.25, 151.75, 0.9)], gt_label=0, gt_boxes=[[1.5, 2.5, 101.25, 151.75]]),
        make_row("img-c", label=2, score=0.3, class_name="bird", width=100, height=100, fg_ratio=0.95,
                 boxes=[(0.0, 0.0, 100.0, 100.0, 0.3)], gt_label=2, gt_boxes=[[60.0, 60.0, 90.0, 90.0]]),
        make_row("../../escape", label=0, score=0.9, class_name="cat", width=50, height=40, fg_ratio=0.3,
                 boxes=[(5.0, 4.0, 25.0, 24.0, 0.7)]),
        make_row("img-err", status="error"),
    ]


@pytest.fixture
def run(tmp_path):
    return write_run(str(tmp_path), "r1", {"shard-000000": _rows()}, manifest={"model_config": {"class_names": NAMES}})


def test_coco_loads_in_pycocotools_and_round_trips_exactly(run, tmp_path):
    out = str(tmp_path / "pseudo.json")
    summary = export_pseudo_boxes(run, "coco", out)
    coco = COCO(out)
    assert summary["images"] == 4 and summary["boxes"] == 5
    images = {im["file_name"]: im for im in coco.dataset["images"]}
    # Ids follow key order over all good rows: ../../escape, img-a, img-b, img-c.
    assert [images[k]["id"] for k in ("../../escape", "img-a", "img-b", "img-c")] == [1, 2, 3, 4]
    assert (images["img-b"]["width"], images["img-b"]["height"]) == (640, 480)
    assert {c["id"]: c["name"] for c in coco.dataset["categories"]} == {0: "cat", 1: "dog", 2: "bird"}
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[images["img-b"]["id"]]))
    assert [a["id"] for a in anns] == [3, 4] and all(a["iscrowd"] == 0 and a["category_id"] == 1 for a in anns)
    expected = [tuple(b.values()) for b in _rows()[0]["boxes"]]
    for ann, (x0, y0, x1, y1, score) in zip(anns, expected):
        bx, by, bw, bh = ann["bbox"]
        # Exact to the float32 the Parquet holds: x + w gives back x1 bit for bit.
        assert (bx, by, bx + bw, by + bh) == tuple(float(np.float32(v)) for v in (x0, y0, x1, y1))
        assert ann["area"] == pytest.approx(bw * bh)
        assert ann["score"] == pytest.approx(score)


def test_ids_are_deterministic_and_do_not_depend_on_filters(run, tmp_path):
    a, b, c = (str(tmp_path / f"{n}.json") for n in "abc")
    export_pseudo_boxes(run, "coco", a)
    export_pseudo_boxes(run, "coco", b)
    assert open(a, "rb").read() == open(b, "rb").read()
    export_pseudo_boxes(run, "coco", c, BoxFilter(min_score=0.9))
    kept = {im["file_name"]: im["id"] for im in json.load(open(c))["images"]}
    assert kept == {"../../escape": 1, "img-b": 3}


def test_filters(run, tmp_path):
    def keys(filt, classes=None):
        out = str(tmp_path / "f.json")
        export_pseudo_boxes(run, "coco", out, filt, classes)
        doc = json.load(open(out))
        return sorted(im["file_name"] for im in doc["images"]), len(doc["annotations"])

    assert keys(BoxFilter(min_score=0.5)) == (["../../escape", "img-a", "img-b"], 4)
    assert keys(BoxFilter(min_fg_ratio=0.25, max_fg_ratio=0.6)) == (["../../escape", "img-a"], 2)
    assert keys(BoxFilter(max_boxes=1)) == (["../../escape", "img-a", "img-b", "img-c"], 4)
    assert keys(BoxFilter(), ["dog", "2"]) == (["img-b", "img-c"], 3)


def test_unknown_class_name_lists_the_valid_ones(run, tmp_path):
    with pytest.raises(ValueError, match=r"unknown class 'zebra'; valid classes: cat \(0\), dog \(1\), bird \(2\)"):
        export_pseudo_boxes(run, "coco", str(tmp_path / "x.json"), classes=["zebra"])
    assert resolve_classes(["cat", " 2"], {0: "cat", 2: "bird"}) == {0, 2}


def test_bad_filter_values_are_rejected():
    with pytest.raises(ValueError, match="min-fg-ratio"):
        BoxFilter(min_fg_ratio=0.8, max_fg_ratio=0.2)
    with pytest.raises(ValueError, match="max-boxes"):
        BoxFilter(max_boxes=0)


def test_yolo_one_file_per_image_normalised_and_never_outside_the_output(run, tmp_path):
    out = tmp_path / "yolo"
    summary = export_pseudo_boxes(run, "yolo", str(out))
    files = sorted(os.listdir(out))
    assert summary["files"] == 5 and len(files) == 5  # 4 images + classes.txt
    assert not (tmp_path.parent / "escape.txt").exists() and not any(tmp_path.parent.glob("*escape*"))
    escaped = [f for f in files if "escape" in f]
    assert len(escaped) == 1 and "/" not in escaped[0] and not escaped[0].startswith(".")
    lines = (out / "img-b.txt").read_text().splitlines()
    cls, cx, cy, w, h = lines[0].split()
    assert cls == "1"
    assert float(cx) == pytest.approx((10.3 + 300.9) / 2 / 640, abs=1e-6)
    assert float(cy) == pytest.approx((20.7 + 400.1) / 2 / 480, abs=1e-6)
    assert float(w) == pytest.approx((300.9 - 10.3) / 640, abs=1e-6)
    assert float(h) == pytest.approx((400.1 - 20.7) / 480, abs=1e-6)
    assert len(lines) == 2
    assert (out / "classes.txt").read_text() == "cat\ndog\nbird\n"


def test_safe_file_stem():
    assert safe_file_stem("img_001") == "img_001"
    for key in ("../../x", "/etc/passwd", "..", "a/b", "a\\b", "", "ü"):
        stem = safe_file_stem(key)
        assert stem and "/" not in stem and "\\" not in stem and not stem.startswith(".")
    assert safe_file_stem("a/b") != safe_file_stem("a_b")  # a changed key gets a hash suffix


def test_cli_prints_coco_ap_against_ground_truth(run, tmp_path):
    proc = subprocess.run(
        [sys.executable, "jobs/export_pseudo_boxes.py", "--predictions", run, "--format", "coco",
         "--output", str(tmp_path / "p.json"), "--max-boxes", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # img-a and img-b: first box == GT; img-c: a whole-image box on a small GT -> a miss.
    # Per class AP: cat 100, dog 100, bird 0 -> AP 66.67 at every IoU level.
    line = next(l for l in proc.stdout.splitlines() if l.startswith("COCOeval"))
    assert "AP 66.67  AP50 66.67" in line, proc.stdout
    bad = subprocess.run(
        [sys.executable, "jobs/export_pseudo_boxes.py", "--predictions", run, "--format", "yolo",
         "--output", str(tmp_path / "y"), "--classes", "zebra"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "valid classes: cat (0), dog (1), bird (2)" in bad.stderr
