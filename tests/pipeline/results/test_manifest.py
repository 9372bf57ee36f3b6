"""pipeline/results/manifest.py: one writer, one reader, old manifests."""
from __future__ import annotations

import json

import pytest

from pipeline.results.manifest import (
    MANIFEST_NAME,
    MANIFEST_VERSION,
    Manifest,
    ManifestError,
    ShardEntry,
    read_manifest,
    write_manifest,
)


def _manifest(**kw) -> Manifest:
    return Manifest(**{
        "run_id": "r1",
        "spec": "data/val-{000000..000002}.tar",
        "output": "out/r1",
        "model_sha256": "ab" * 32,
        "checkpoint": "m.safetensors",
        "model_config": {"model": "sat_vit_micro_patch8_64", "class_names": ["cat", "dog"]},
        "input_frame": {"kind": "resize_crop", "resize": 256, "crop": 224, "offset": 16},
        "settings": {"threshold": 0.35, "topk": 5, "resize_crop": {"resize": 256, "crop": 224}, "precision": "fp32"},
        "shards": [
            ShardEntry("data/val-000000.tar", "out/r1/val-000000.parquet", "done", rows=10, errors=1, attempts=1),
            ShardEntry("data/val-000001.tar", "out/r1/val-000001.parquet", "failed", errors_by_attempt=["boom"],
                       attempts=3),
            ShardEntry("data/val-000002.tar", "out/r1/val-000002.parquet"),
        ],
        "history": [{"seconds": 1.0}, {"seconds": 2.0}],
        **kw,
    })


def test_round_trip_through_the_one_writer_and_reader(tmp_path):
    run = str(tmp_path / "r1")
    url = write_manifest(run, _manifest())
    assert url == f"{run}/{MANIFEST_NAME}"
    doc = json.loads((tmp_path / "r1" / MANIFEST_NAME).read_text())
    assert doc["manifest_version"] == MANIFEST_VERSION
    assert (doc["shards_total"], doc["shards_done"], doc["rows"], doc["error_rows"]) == (3, 1, 10, 1)
    assert doc["timings"] == {"seconds": 2.0}
    assert doc["shards"][1] == {"shard": "data/val-000001.tar", "output": "out/r1/val-000001.parquet",
                                "status": "failed", "errors_by_attempt": ["boom"], "attempts": 3}
    assert doc["shards"][2] == {"shard": "data/val-000002.tar", "output": "out/r1/val-000002.parquet",
                                "status": "not run", "attempts": 0}
    back = read_manifest(run)
    assert back == _manifest()
    assert (back.threshold, back.class_names, back.resize_crop) == (0.35, ["cat", "dog"], (256, 224))


def test_no_manifest_is_none_and_bad_json_a_clear_error(tmp_path):
    assert read_manifest(str(tmp_path)) is None
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ManifestError, match="is not valid JSON"):
        read_manifest(str(tmp_path))


def test_a_manifest_from_before_input_frame_and_versions_still_reads(tmp_path):
    """What localize wrote before --resize-crop: no manifest_version, input_frame or precision."""
    doc = _manifest().to_json()
    for key in ("manifest_version", "input_frame"):
        doc.pop(key)
    doc["settings"] = {"threshold": 0.4, "model_sha256": "ab" * 32, "topk": 5, "box_mode": "largest",
                       "max_boxes": None, "batch_size": 64, "max_retries": 2, "limit": None}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    old = read_manifest(str(tmp_path))
    assert old.input_frame is None and old.resize_crop is None and old.threshold == 0.4
    assert [s.status for s in old.shards] == ["done", "failed", "not run"] and old.done[0].rows == 10


def test_the_old_test_only_shape_says_what_to_do(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({
        "run_id": "r", "shards": ["data/shard-000000.tar"], "config": {}, "threshold": 0.5,
    }))
    with pytest.raises(ManifestError, match="old shape .* rerun jobs/localize_shards.py with the same --run-id"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(["not", "a", "manifest"]))
    with pytest.raises(ManifestError, match="not a satloc run manifest"):
        read_manifest(str(tmp_path))
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**_manifest().to_json(), "manifest_version": 99}))
    with pytest.raises(ManifestError, match="newer than this satloc reads"):
        read_manifest(str(tmp_path))
