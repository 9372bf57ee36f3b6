"""Tiny localize-run directories for tests: Parquet files and manifest through the real writers.

Importable from any test (tests/ is on sys.path through tests/conftest.py).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.results.manifest import Manifest, ShardEntry, write_manifest
from pipeline.results.parquet import write_shard_table
from pipeline.results.schema import localize_schema


def blob_map(grid: tuple[int, int], box: tuple[int, int, int, int], peak: int = 255, floor: int = 0) -> np.ndarray:
    """A uint8 map on the patch grid: ``peak`` inside cells [x0, x1) x [y0, y1), ``floor`` elsewhere."""
    m = np.full(grid, floor, dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = peak
    return m


def make_row(
    key: str,
    *,
    loc_map: np.ndarray | None = None,
    grid: tuple[int, int] = (14, 14),
    label: int = 0,
    score: float = 0.9,
    topk: list[int] | None = None,
    class_name: str | None = None,
    boxes: list[tuple[float, float, float, float, float]] | None = None,
    gt_label: int | None = None,
    gt_boxes: list[list[float]] | None = None,
    width: int = 224,
    height: int = 224,
    fg_ratio: float = 0.25,
    threshold: float = 0.5,
    status: str = "ok",
    error: str | None = None,
    shard: str = "data/shard-000000.tar",
) -> dict:
    """One row; ``boxes`` default to one box covering the image."""
    if status != "ok":
        return {
            "key": key, "shard": shard, "status": status, "error": error or "undecodable image",
            "width": None, "height": None, "gt_label": gt_label, "gt_boxes": gt_boxes,
            "model_sha256": "f" * 64, "threshold": threshold,
        }
    if loc_map is None:
        loc_map = blob_map(grid, (0, 0, grid[1], grid[0]))
    boxes = boxes if boxes is not None else [(0.0, 0.0, float(width), float(height), score)]
    topk = topk if topk is not None else [label] + [(label + i) % 1000 for i in range(1, 5)]
    return {
        "key": key,
        "shard": shard,
        "status": "ok",
        "error": None,
        "width": width,
        "height": height,
        "label": label,
        "score": score,
        "topk_labels": topk,
        "topk_scores": [score] + [0.01] * (len(topk) - 1),
        "class_name": class_name,
        "loc_map": np.asarray(loc_map, dtype=np.uint8).ravel().tolist(),
        "boxes": [dict(zip(("x0", "y0", "x1", "y1", "score"), b)) for b in boxes],
        "box_x0": boxes[0][0],
        "box_y0": boxes[0][1],
        "box_x1": boxes[0][2],
        "box_y1": boxes[0][3],
        "fg_ratio": fg_ratio,
        "gt_label": gt_label,
        "gt_boxes": gt_boxes,
        "model_sha256": "f" * 64,
        "threshold": threshold,
    }


def write_run(
    root: str,
    run_id: str,
    shards: dict[str, list[dict]],
    grid: tuple[int, int] = (14, 14),
    manifest: dict | None = None,
    with_manifest: bool = True,
    threshold: float = 0.5,
    resize_crop: tuple[int, int] | None = None,
) -> str:
    """Write ``root/run_id/<stem>.parquet`` per shard (+ ``_manifest.json``); return the run dir.

    Both go through the localize job's own writers (``pipeline.results``). ``manifest``
    overrides fields of the ``Manifest`` (e.g. ``model_config``, ``input_frame``).
    ``resize_crop`` (resize, crop): the run was localized with ``--resize-crop`` (recorded in
    the files' metadata and the manifest's ``input_frame``, as the localize job does).
    """
    run_dir = os.path.join(root, run_id)
    os.makedirs(run_dir, exist_ok=True)
    schema = localize_schema(grid[0], grid[1], run_id, resize_crop=resize_crop)
    entries = []
    for stem, rows in shards.items():
        columns = {name: [r.get(name) for r in rows] for name in schema.names}
        out = os.path.join(run_dir, f"{stem}.parquet")
        size = write_shard_table(out, pa.Table.from_pydict(columns, schema=schema), "test")
        errors = sum(r["status"] != "ok" for r in rows)
        entry = ShardEntry(f"data/{stem}.tar", out, "done", rows=len(rows), errors=errors, bytes=size, attempts=1)
        entries.append(entry)
    if with_manifest:
        if resize_crop is None:
            frame = {"kind": "resize", "size": grid[0] * 16}
        else:
            resize, crop = resize_crop
            frame = {"kind": "resize_crop", "resize": resize, "crop": crop, "offset": (resize - crop) // 2}
        doc = Manifest(
            run_id=run_id,
            spec=f"data/{{{','.join(shards)}}}.tar",
            output=run_dir,
            model_sha256="f" * 64,
            checkpoint="test.safetensors",
            model_config={},
            input_frame=frame,
            settings={"threshold": threshold, "model_sha256": "f" * 64, "topk": 5, "box_mode": "largest",
                      "max_boxes": None, "resize_crop": None, "precision": "fp32", "precision_requested": "auto",
                      "batch_size": 64, "max_retries": 2, "limit": None},
            shards=entries,
        )
        write_manifest(run_dir, dataclasses.replace(doc, **(manifest or {})))
    return run_dir


def write_shard(path: str, samples: list[dict]) -> str:
    """A WebDataset tar: each sample {key, image (HxWx3 uint8), json (dict), mask (HxW uint8)}."""

    def add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))

    def png(array: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    with tarfile.open(path, "w") as tf:
        for s in samples:
            if "image" in s:
                add(tf, f"{s['key']}.png", png(s["image"]))
            if "json" in s:
                add(tf, f"{s['key']}.json", json.dumps(s["json"]).encode())
            if "mask" in s:
                add(tf, f"{s['key']}.mask.png", png(s["mask"]))
    return path
