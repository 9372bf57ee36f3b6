"""A run's boxes as pseudo-labels for detector training: COCO JSON or YOLO text.

Boxes are the Parquet ``boxes`` column (original pixels, best first), class = the
predicted ``label``. Filters pick trusted images (``min_score`` on the top-1 class
probability, a foreground share in [min_fg_ratio, max_fg_ratio], some classes) and cap the
boxes per image. An annotation's score is its box's own score when the run wrote one,
else the image's class probability.

Ids are deterministic: images are numbered 1..N in (key, shard) order over *all* good
rows, before filtering, so an image keeps its id whatever the filters; annotations are
numbered in (image id, box rank) order. COCO category ids are the model's class ids.

Names are unique across shards, since keys repeat between shards (``000001`` in every
shard of many data sets): a COCO image's ``file_name`` is ``<shard-stem>/<key>`` (the shard's
file name without ``.tar``), a YOLO label file is ``<shard-stem>__<key>.txt``. Keys are data:
YOLO names are reduced to ``[A-Za-z0-9._-]`` with a hash suffix whenever that changed them, so
a key like ``../../x`` can never write outside the output directory. A name that would still
repeat (the same key twice in one shard) gets ``-2``, ``-3``, ... in image-id order, and no
image can take ``classes.txt``, the class list.

An existing output (the COCO file, or a YOLO directory that is not empty) is refused unless
``overwrite``; the output is checked before anything is written.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.evaluation.evaluate import Run, read_run
from pipeline.data.storage import StorageError, check_writable, join_url, protocol_of, url_to_fs, write_bytes_atomic
from pipeline.results.run_dir import shard_stem

FORMATS = ("coco", "yolo")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_STEM = 120
CLASSES_FILE = "classes.txt"


@dataclass(frozen=True)
class BoxFilter:
    min_score: float = 0.0
    min_fg_ratio: float = 0.0
    max_fg_ratio: float = 1.0
    max_boxes: int | None = None
    classes: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"--min-score is a class probability in [0, 1], got {self.min_score}")
        if not 0.0 <= self.min_fg_ratio <= self.max_fg_ratio <= 1.0:
            raise ValueError(
                f"need 0 <= --min-fg-ratio <= --max-fg-ratio <= 1, got {self.min_fg_ratio} and {self.max_fg_ratio}"
            )
        if self.max_boxes is not None and self.max_boxes < 1:
            raise ValueError(f"--max-boxes must be >= 1, got {self.max_boxes}")


def resolve_classes(tokens: Sequence[str], names: dict[int, str]) -> frozenset[int]:
    """Class names or ids -> ids; an unknown name is an error that lists the valid ones."""
    by_name = {name: i for i, name in names.items()}
    ids = set()
    for token in tokens:
        token = token.strip()
        if token in by_name:
            ids.add(by_name[token])
        elif re.fullmatch(r"-?\d+", token):
            ids.add(int(token))
        else:
            valid = ", ".join(f"{n} ({i})" for i, n in sorted(names.items())) or "none: the run records no class names"
            raise ValueError(f"--classes: unknown class {token!r}; valid classes: {valid}")
    return frozenset(ids)


def safe_file_stem(key: str) -> str:
    """A file name stem from a sample key that stays inside its directory, unique per key."""
    stem = _UNSAFE.sub("_", key).lstrip(".")[:_MAX_STEM]
    if stem != key or not stem:
        stem = f"{stem or 'sample'}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    return stem


@dataclass
class _Image:
    id: int
    key: str
    shard: str
    width: int
    height: int
    label: int
    score: float
    boxes: list[tuple[float, float, float, float, float]]  # x0, y0, x1, y1, score
    gt_label: int | None
    gt_boxes: list[list[float]] | None
    fg_ratio: float | None


def _images(run: Run) -> list[_Image]:
    """Good rows as images with deterministic ids (ordered by key, then shard)."""
    t = run.table
    status = np.array(t.column("status").to_pylist(), dtype=object)
    ok = t.filter(pa.array(status == "ok"))
    names = ("key", "shard", "width", "height", "label", "score", "boxes", "gt_label", "gt_boxes", "fg_ratio")
    cols = {name: ok.column(name).to_pylist() for name in names}
    order = sorted(range(ok.num_rows), key=lambda i: (cols["key"][i], cols["shard"][i]))
    out = []
    for image_id, i in enumerate(order, start=1):
        score = float(cols["score"][i] or 0.0)
        boxes = [
            (b["x0"], b["y0"], b["x1"], b["y1"], score if b.get("score") is None else float(b["score"]))
            for b in cols["boxes"][i] or []
        ]
        out.append(
            _Image(
                image_id, cols["key"][i], cols["shard"][i] or "", int(cols["width"][i]), int(cols["height"][i]),
                int(cols["label"][i]), score, boxes, cols["gt_label"][i], cols["gt_boxes"][i], cols["fg_ratio"][i],
            )
        )
    return out


def _unique(names: list[str], reserved: frozenset[str] = frozenset()) -> list[str]:
    """``names`` with repeats (and ``reserved`` names) made unique by ``-2``, ``-3``, ... in order."""
    taken = set(reserved) | set(names)
    seen: set[str] = set(reserved)
    out = []
    for name in names:
        if name in seen:
            stem, dot, ext = name.rpartition(".") if name.endswith(".txt") else (name, "", "")
            n = 2
            while f"{stem}-{n}{dot}{ext}" in taken:
                n += 1
            name = f"{stem}-{n}{dot}{ext}"
            taken.add(name)
        seen.add(name)
        out.append(name)
    return out


def coco_file_names(images: list[_Image]) -> dict[int, str]:
    """Image id -> ``<shard-stem>/<key>``: unique across shards."""
    names = _unique([f"{shard_stem(i.shard)}/{i.key}" for i in images])
    return {i.id: name for i, name in zip(images, names)}


def yolo_file_names(images: list[_Image]) -> dict[int, str]:
    """Image id -> ``<shard-stem>__<key>.txt`` (made safe): unique, never ``classes.txt``."""
    names = _unique([safe_file_stem(f"{shard_stem(i.shard)}__{i.key}") + ".txt" for i in images],
                    reserved=frozenset({CLASSES_FILE}))
    return {i.id: name for i, name in zip(images, names)}


def _selected(images: list[_Image], filt: BoxFilter) -> list[_Image]:
    keep = []
    f32 = np.float32  # the columns are float32: compare there, so --min-score 0.9 keeps a stored 0.9
    for image in images:
        fg = image.fg_ratio
        if f32(image.score) < f32(filt.min_score):
            continue
        if fg is not None and not f32(filt.min_fg_ratio) <= f32(fg) <= f32(filt.max_fg_ratio):
            continue
        if filt.classes is not None and image.label not in filt.classes:
            continue
        keep.append(image)
    return keep


def _boxes(image: _Image, filt: BoxFilter) -> list[tuple[float, float, float, float, float]]:
    boxes = [b for b in image.boxes if b[2] > b[0] and b[3] > b[1]]
    return boxes[: filt.max_boxes] if filt.max_boxes else boxes


def _categories(names: dict[int, str], used: set[int]) -> list[dict]:
    ids = sorted(set(names) | used)
    return [{"id": i, "name": names.get(i, str(i)), "supercategory": "object"} for i in ids]


def coco_predictions(run: Run, filt: BoxFilter, images: list[_Image] | None = None) -> dict:
    """The run's pseudo-boxes as a COCO detection dataset (with a ``score`` per box)."""
    names = run.class_names()
    images = images if images is not None else _images(run)
    file_names = coco_file_names(images)  # over all images, so a name does not depend on the filters
    images = _selected(images, filt)
    annotations = []
    for image in images:
        for x0, y0, x1, y1, score in _boxes(image, filt):
            w, h = float(x1) - float(x0), float(y1) - float(y0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image.id,
                    "category_id": image.label,
                    "bbox": [float(x0), float(y0), w, h],
                    "area": w * h,
                    "score": float(score),
                    "iscrowd": 0,
                }
            )
    return {
        "info": {"description": f"satloc pseudo-boxes of run {run.run_id or run.url}", "run_id": run.run_id},
        "images": [{"id": i.id, "file_name": file_names[i.id], "width": i.width, "height": i.height}
                   for i in images],
        "categories": _categories(names, {i.label for i in images}),
        "annotations": annotations,
    }


def coco_ground_truth(run: Run, image_ids: set[int], images: list[_Image] | None = None) -> dict | None:
    """GT boxes of the same images as a COCO dataset, or None when the rows carry none."""
    names = run.class_names()
    images = images if images is not None else _images(run)
    file_names = coco_file_names(images)
    images = [
        i for i in images
        if i.id in image_ids and i.gt_boxes and i.gt_label is not None
    ]
    if not images:
        return None
    annotations = []
    for image in images:
        for x0, y0, x1, y1 in image.gt_boxes:
            w, h = float(x1) - float(x0), float(y1) - float(y0)
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image.id, "category_id": int(image.gt_label),
                 "bbox": [float(x0), float(y0), w, h], "area": w * h, "iscrowd": 0}
            )
    return {
        "images": [{"id": i.id, "file_name": file_names[i.id], "width": i.width, "height": i.height}
                   for i in images],
        "categories": _categories(names, {int(i.gt_label) for i in images}),
        "annotations": annotations,
    }


def coco_ap(ground_truth: dict, predictions: dict) -> dict[str, float]:
    """COCOeval bbox AP and AP50 (in percent) of ``predictions`` on ``ground_truth``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_ids = {im["id"] for im in ground_truth["images"]}
    detections = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": a["score"]}
        for a in predictions["annotations"]
        if a["image_id"] in gt_ids
    ]
    if not detections:
        return {"ap": 0.0, "ap50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = json.loads(json.dumps(ground_truth))
        gt.createIndex()
        dt = gt.loadRes(detections)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ap, ap50 = (max(float(v), 0.0) * 100.0 for v in ev.stats[:2])  # -1 means "no GT": count as 0
    return {"ap": ap, "ap50": ap50}


def yolo_files(run: Run, filt: BoxFilter, images: list[_Image] | None = None) -> dict[str, str]:
    """File name -> content: one ``<shard-stem>__<key>.txt`` per image (``cls cx cy w h``,
    normalised), and ``classes.txt``."""
    files: dict[str, str] = {}
    images = images if images is not None else _images(run)
    file_names = yolo_file_names(images)
    for image in _selected(images, filt):
        lines = []
        for x0, y0, x1, y1, _ in _boxes(image, filt):
            cx, cy = (x0 + x1) / 2 / image.width, (y0 + y1) / 2 / image.height
            w, h = (x1 - x0) / image.width, (y1 - y0) / image.height
            lines.append(f"{image.label} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        files[file_names[image.id]] = "".join(line + "\n" for line in lines)
    names = run.class_names()
    if names:
        files[CLASSES_FILE] = "".join(f"{names.get(i, str(i))}\n" for i in range(max(names) + 1))
    return files


def _checked_target(output_url: str, name: str) -> str:
    """Join a generated file name to the output dir, refusing anything that leaves it."""
    if "/" in name or "\\" in name or name in ("", ".", ".."):
        raise ValueError(f"refusing to write {name!r}: file names must not hold path separators")
    target = join_url(output_url, name)
    if protocol_of(output_url) == "file" and "://" not in output_url:
        root = os.path.realpath(output_url)
        if os.path.commonpath([root, os.path.realpath(target)]) != root:
            raise ValueError(f"refusing to write {target}: it is outside the output directory {output_url}")
    return target


def check_export_output(output_url: str, fmt: str, overwrite: bool = False) -> None:
    """Refuse an existing output (unless ``overwrite``) or one that cannot be written, before any work.

    COCO writes one file, YOLO a directory of files. ValueError (exists, or the wrong kind)
    or StorageError (cannot write there), each naming ``--output``.
    """
    fs, path = url_to_fs(output_url)
    try:
        is_dir, found = fs.isdir(path), fs.exists(path)
    except PermissionError:
        raise StorageError(f"--output {output_url}: permission denied") from None
    if fmt == "coco":
        if is_dir:
            raise ValueError(f"--output {output_url} is a directory; --format coco writes one JSON file: name the file")
        if found and not overwrite:
            raise ValueError(f"--output {output_url} exists; pass --overwrite to replace it, or choose another name")
        parent = output_url.rstrip("/").rsplit("/", 1)[0] if "/" in output_url.rstrip("/") else "."
        target = parent
    else:
        if found and not is_dir:
            raise ValueError(f"--output {output_url} is a file; --format yolo writes a directory: name a directory")
        if is_dir and fs.ls(path, detail=False) and not overwrite:
            raise ValueError(
                f"--output {output_url} is a directory that is not empty; pass --overwrite to write into it "
                "(files of the same name are replaced, others are kept), or choose a new directory"
            )
        target = output_url
    try:
        check_writable(target)
    except StorageError as e:
        raise StorageError(f"--output: {e}") from None


def export_pseudo_boxes(
    predictions_url: str,
    fmt: str,
    output_url: str,
    filt: BoxFilter = BoxFilter(),
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the pseudo-boxes; return a summary (counts, and COCO AP where GT exists).

    ``classes``: names or ids (``--classes``), resolved against the run's class names.
    ``overwrite``: replace an existing output (else ValueError, before any work).
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run = read_run(predictions_url)
    check_export_output(output_url, fmt, overwrite)
    if classes:
        filt = dataclasses.replace(filt, classes=resolve_classes(classes, run.class_names()))
    summary: dict = {"run_id": run.run_id, "format": fmt, "output": output_url}
    images = _images(run)
    coco = coco_predictions(run, filt, images)
    summary["images"] = len(coco["images"])
    summary["boxes"] = len(coco["annotations"])
    if fmt == "coco":
        write_bytes_atomic(output_url, json.dumps(coco).encode())
        summary["files"] = 1
    else:
        files = yolo_files(run, filt, images)
        targets = {_checked_target(output_url, name): text for name, text in files.items()}
        if len(targets) != len(files):  # yolo_file_names makes names unique; this guards the guarantee
            raise AssertionError("two YOLO files would share a name")
        written = 0
        for target, text in targets.items():
            write_bytes_atomic(target, text.encode())
            written += 1
        summary["files"] = written
    gt = coco_ground_truth(run, {im["id"] for im in coco["images"]}, images)
    summary["coco_eval"] = coco_ap(gt, coco) if gt is not None else None
    return summary
