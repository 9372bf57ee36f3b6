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


def _key(file_name: str) -> str:
    """The key of a COCO ``file_name`` (``<shard-stem>/<key>``) of the fixture's one shard."""
    assert file_name.startswith("shard-000000/"), file_name
    return file_name[len("shard-000000/"):]


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
    images = {_key(im["file_name"]): im for im in coco.dataset["images"]}
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
    kept = {_key(im["file_name"]): im["id"] for im in json.load(open(c))["images"]}
    assert kept == {"../../escape": 1, "img-b": 3}


def test_filters(run, tmp_path):
    def keys(filt, classes=None):
        out = str(tmp_path / "f.json")
        export_pseudo_boxes(run, "coco", out, filt, classes, overwrite=True)
        doc = json.load(open(out))
        return sorted(_key(im["file_name"]) for im in doc["images"]), len(doc["annotations"])

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
    lines = (out / "shard-000000__img-b.txt").read_text().splitlines()
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


# --- issue 14 (5): names unique across shards, outputs never clobbered, bounds checked ----------


def _repeating_keys_run(tmp_path) -> str:
    """Two shards numbering their samples alike, and a sample whose key is ``classes``."""
    def rows(shard: str, label: int) -> list[dict]:
        return [make_row(key, label=label, class_name=NAMES[label], shard=f"data/{shard}.tar",
                         boxes=[(1.0, 2.0, 11.0, 12.0, 0.8)]) for key in ("000001", "000002", "classes")]

    shards = {"part-000000": rows("part-000000", 0), "part-000001": rows("part-000001", 1)}
    return write_run(str(tmp_path), "rep", shards,
                     manifest={"model_config": {"class_names": NAMES}})


def test_yolo_names_are_unique_across_shards_and_never_the_class_list(tmp_path):
    run = _repeating_keys_run(tmp_path)
    out = tmp_path / "yolo"
    summary = export_pseudo_boxes(run, "yolo", str(out))
    files = sorted(os.listdir(out))
    assert files == ["classes.txt"] + [f"part-00000{s}__{k}.txt" for s in "01" for k in ("000001", "000002", "classes")]
    assert summary["images"] == 6 and summary["boxes"] == 6 and summary["files"] == len(files) == 7
    assert (out / "classes.txt").read_text() == "cat\ndog\nbird\n"
    assert (out / "part-000000__000001.txt").read_text().startswith("0 ")
    assert (out / "part-000001__000001.txt").read_text().startswith("1 ")


def test_coco_file_names_are_unique_across_shards(tmp_path):
    run = _repeating_keys_run(tmp_path)
    doc_path = tmp_path / "p.json"
    export_pseudo_boxes(run, "coco", str(doc_path))
    doc = json.load(open(doc_path))
    names = [im["file_name"] for im in doc["images"]]
    assert sorted(names) == sorted(f"part-00000{s}/{k}" for s in "01" for k in ("000001", "000002", "classes"))
    by_name = {im["file_name"]: im["id"] for im in doc["images"]}
    labels = {a["image_id"]: a["category_id"] for a in doc["annotations"]}
    assert labels[by_name["part-000000/000001"]] == 0 and labels[by_name["part-000001/000001"]] == 1


def test_a_key_repeated_inside_one_shard_still_gets_its_own_file(tmp_path):
    rows = [make_row("k", label=0, boxes=[(1.0, 1.0, 5.0, 5.0, 0.9)]), make_row("k", label=1),
            make_row("k-2", label=2)]
    run = write_run(str(tmp_path), "dup", {"shard-000000": rows})
    summary = export_pseudo_boxes(run, "yolo", str(tmp_path / "y"))
    files = sorted(os.listdir(tmp_path / "y"))
    assert len(files) == summary["files"] == 3 and len(set(files)) == 3
    assert {f.split(" ")[0] for f in (open(tmp_path / "y" / n).read() for n in files)} == {"0", "1", "2"}


def test_existing_output_is_refused_unless_overwrite(run, tmp_path):
    coco = tmp_path / "p.json"
    coco.write_text("precious")
    with pytest.raises(ValueError, match=f"--output {coco} exists; pass --overwrite"):
        export_pseudo_boxes(run, "coco", str(coco))
    assert coco.read_text() == "precious"
    export_pseudo_boxes(run, "coco", str(coco), overwrite=True)
    assert json.load(open(coco))["images"]
    yolo = tmp_path / "y"
    yolo.mkdir()
    (yolo / "old.txt").write_text("0 0.5 0.5 1 1\n")
    with pytest.raises(ValueError, match=f"--output {yolo} is a directory that is not empty; pass --overwrite"):
        export_pseudo_boxes(run, "yolo", str(yolo))
    assert sorted(os.listdir(yolo)) == ["old.txt"]
    assert export_pseudo_boxes(run, "yolo", str(yolo), overwrite=True)["files"] == 5
    with pytest.raises(ValueError, match="is a directory; --format coco writes one JSON file"):
        export_pseudo_boxes(run, "coco", str(yolo), overwrite=True)


def test_min_score_outside_0_1_is_refused():
    for bad in (5.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="--min-score is a class probability in \\[0, 1\\]"):
            BoxFilter(min_score=bad)


def test_output_in_an_unwritable_place_is_refused_before_writing(run, tmp_path):
    from pipeline.data.storage import StorageError

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file; --format yolo writes a directory"):
        export_pseudo_boxes(run, "yolo", str(blocker))
    with pytest.raises(StorageError, match=f"--output: cannot write {blocker}/y"):
        export_pseudo_boxes(run, "yolo", str(blocker / "y"))
    with pytest.raises(StorageError, match=f"--output: cannot write {blocker}"):
        export_pseudo_boxes(run, "coco", str(blocker / "p.json"))
    assert blocker.read_text() == "x"


def test_cli_existing_or_unwritable_output_and_bad_score_exit_2_without_traceback(run, tmp_path):
    existing = tmp_path / "p.json"
    existing.write_text("precious")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cases = [
        (["--format", "coco", "--output", str(existing)], f"--output {existing} exists; pass --overwrite"),
        (["--format", "coco", "--output", str(blocker / "p.json")], f"cannot write {blocker}"),
        (["--format", "coco", "--output", str(tmp_path / "q.json"), "--min-score", "5"], "--min-score"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "jobs/export_pseudo_boxes.py", "--predictions", run, *args],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert existing.read_text() == "precious" and not (tmp_path / "q.json").exists()
