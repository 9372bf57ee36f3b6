"""Model outputs -> Parquet rows (DESIGN §3): pure, batched, no Ray, no storage.

``localize_rows(samples, logits, loc_maps, settings, schema)`` turns one batch into a
pyarrow Table in the run's schema. ``samples`` is the batch in shard order, bad samples
included; ``logits``/``loc_maps`` hold one row per good sample (``sample.ok``), in the
same order. Bad samples become ``status='error'`` rows that still carry what is known
(key, shard, size, ground truth) and the provenance columns.

Boxes and ``fg_ratio`` come from the float map upsampled to each image's ORIGINAL size
(``model.boxes``); the stored ``loc_map`` is the map on the patch grid quantised to
``round(map * 255)`` as uint8.

With ``RowSettings.resize_crop`` (the official SAT frame, ``--resize-crop 256,224``) the
map covers only the centre crop, i.e. the window ``[16 W/256, 240 W/256) x
[16 H/256, 240 H/256)`` of a W x H image (``ResizeCrop.window``). The box is then the SAT
rule applied to the map upsampled to that window at original resolution: the window's
size rounded to whole pixels (``crop_region_size``, 437.5 -> 438), boxes found there, and
mapped back exactly, ``x = wx0 + bx * (wx1 - wx0) / region_w`` (same for y). So boxes
are still in original pixels, lie inside the window (never on the unseen border), and may
be fractional (the window's edges are, e.g. 31.25 for W = 500); ``fg_ratio`` is the share
of the window. ``jobs/evaluate_wsol.py --protocol sat`` does not use these boxes: it
redoes the official rule in the official 224 x 224 frame from the stored map.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from model.boxes import boxes_from_normalized, foreground_ratio, normalized_upsampled_maps
from pipeline.data.preprocess import ResizeCrop
from pipeline.data.reader import Sample


@dataclass(frozen=True)
class RowSettings:
    """What turns model outputs into rows; recorded in the manifest.

    Built by ``pipeline.localize.run.row_settings`` from a checked ``LocalizeConfig``.
    """

    threshold: float
    model_sha256: str
    topk: int = 5
    box_mode: str = "largest"
    max_boxes: int | None = None
    class_names: tuple[str, ...] | None = None
    resize_crop: ResizeCrop | None = None  # None: the map covers the whole image


def crop_region_size(window: tuple[float, float, float, float]) -> tuple[int, int]:
    """(width, height) in whole pixels of a crop window in original pixels (at least 1 x 1)."""
    x0, y0, x1, y1 = window
    return max(1, int(round(x1 - x0))), max(1, int(round(y1 - y0)))


def boxes_to_original(
    boxes: torch.Tensor, window: tuple[float, float, float, float], region: tuple[int, int]
) -> torch.Tensor:
    """n x 5 boxes on a ``region``-sized grid of the crop ``window`` -> original pixels."""
    x0, y0, x1, y1 = window
    sx, sy = (x1 - x0) / region[0], (y1 - y0) / region[1]
    out = boxes.double().clone()
    out[:, [0, 2]] = x0 + out[:, [0, 2]] * sx
    out[:, [1, 3]] = y0 + out[:, [1, 3]] * sy
    return out.to(boxes.dtype)


def quantize_loc_maps(loc_maps: torch.Tensor) -> np.ndarray:
    """B x 1 x h x w maps in [0, 1] -> B x (h*w) uint8, ``round(map * 255)``, row-major."""
    flat = loc_maps.detach().float().cpu().flatten(1).clamp(0.0, 1.0)
    return torch.round(flat * 255.0).to(torch.uint8).numpy()


def _topk(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    probs = torch.softmax(logits.detach().float().cpu(), dim=1)
    scores, labels = probs.topk(min(k, probs.shape[1]), dim=1)
    return labels.to(torch.int32).numpy(), scores.numpy()


def gt_label_check(gt_label: pa.ChunkedArray | pa.Array, num_classes: int) -> tuple[int, tuple[int, int] | None]:
    """(rows whose ground-truth label is outside ``0..num_classes-1``, (min, max) label or None)."""
    labels = pc.drop_null(gt_label)
    if len(labels) == 0:
        return 0, None
    outside = pc.sum(pc.or_(pc.less(labels, 0), pc.greater_equal(labels, num_classes))).as_py() or 0
    low_high = pc.min_max(labels)
    return int(outside), (int(low_high["min"].as_py()), int(low_high["max"].as_py()))


def _size_or_none(value: int) -> int | None:
    return int(value) if value else None


def localize_rows(
    samples: Sequence[Sample],
    logits: torch.Tensor,
    loc_maps: torch.Tensor,
    settings: RowSettings,
    schema: pa.Schema,
) -> pa.Table:
    """One Table in ``schema`` with a row per sample, in the order of ``samples``."""
    ok_index = [i for i, s in enumerate(samples) if s.ok]
    if logits.shape[0] != len(ok_index) or loc_maps.shape[0] != len(ok_index):
        raise ValueError(
            f"{len(ok_index)} good samples but {logits.shape[0]} logits and {loc_maps.shape[0]} maps"
        )
    grid_cells = schema.field("loc_map").type.list_size
    if ok_index and loc_maps.shape[2] * loc_maps.shape[3] != grid_cells:
        raise ValueError(
            f"model maps are {loc_maps.shape[2]}x{loc_maps.shape[3]} but the schema holds {grid_cells} cells"
        )

    n = len(samples)
    columns: dict[str, list] = {name: [None] * n for name in schema.names}
    for i, s in enumerate(samples):
        columns["key"][i] = s.key
        columns["shard"][i] = s.shard
        columns["status"][i] = "ok" if s.ok else "error"
        columns["error"][i] = s.error
        columns["width"][i] = _size_or_none(s.width)
        columns["height"][i] = _size_or_none(s.height)
        columns["gt_label"][i] = s.label
        columns["gt_boxes"][i] = s.gt_boxes
        columns["model_sha256"][i] = settings.model_sha256
        columns["threshold"][i] = settings.threshold

    if ok_index:
        ok_samples = [samples[i] for i in ok_index]
        labels, scores = _topk(logits, settings.topk)
        maps_u8 = quantize_loc_maps(loc_maps)
        sizes = [(s.width, s.height) for s in ok_samples]
        frame = settings.resize_crop
        windows = [frame.window(w, h) for w, h in sizes] if frame else []
        regions = [crop_region_size(w) for w in windows] if frame else sizes
        norm_maps = normalized_upsampled_maps(loc_maps.float(), regions)
        boxes = boxes_from_normalized(norm_maps, settings.threshold, settings.box_mode, settings.max_boxes)
        if frame:
            boxes = [boxes_to_original(b, w, r) for b, w, r in zip(boxes, windows, regions)]
        fg_ratio = foreground_ratio(norm_maps, settings.threshold)
        names = settings.class_names
        for j, i in enumerate(ok_index):
            label = int(labels[j, 0])
            columns["label"][i] = label
            columns["score"][i] = float(scores[j, 0])
            columns["topk_labels"][i] = labels[j].tolist()
            columns["topk_scores"][i] = scores[j].tolist()
            columns["class_name"][i] = names[label] if names else None
            columns["loc_map"][i] = maps_u8[j]
            box_rows = boxes[j].tolist()
            columns["boxes"][i] = [dict(zip(("x0", "y0", "x1", "y1", "score"), b)) for b in box_rows]
            x0, y0, x1, y1, _ = box_rows[0]
            columns["box_x0"][i], columns["box_y0"][i] = x0, y0
            columns["box_x1"][i], columns["box_y1"][i] = x1, y1
            columns["fg_ratio"][i] = float(fg_ratio[j])

    return _table(columns, schema, n)


def _printable(text: object) -> str | None:
    """``text`` as a string Arrow can store (lone surrogates from odd bytes escaped)."""
    if text is None:
        return None
    text = str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


_CONVERSION_ERRORS = (pa.ArrowException, UnicodeError, OverflowError, TypeError, ValueError)


def _table(columns: dict[str, list], schema: pa.Schema, n: int) -> pa.Table:
    """The batch's table; a row whose values Arrow cannot store becomes that sample's error
    row (naming the key and the column) instead of failing the whole shard."""
    try:
        return pa.Table.from_arrays([_array(columns[f.name], f.type) for f in schema], schema=schema)
    except _CONVERSION_ERRORS:
        pass
    for i in range(n):
        bad = None
        for f in schema:
            try:
                _array([columns[f.name][i]], f.type)
            except _CONVERSION_ERRORS as e:
                bad = f"{f.name}: {type(e).__name__}: {e}"
                break
        if bad is None:
            continue
        key = _printable(columns["key"][i])
        keep = {"shard": _printable(columns["shard"][i]), "model_sha256": columns["model_sha256"][i],
                "threshold": columns["threshold"][i]}
        for name in schema.names:
            columns[name][i] = keep.get(name)
        columns["key"][i], columns["status"][i] = key, "error"
        columns["error"][i] = _printable(f"row for sample '{key}' cannot be stored: {bad}")[:1000]
    return pa.Table.from_arrays([_array(columns[f.name], f.type) for f in schema], schema=schema)


def _array(values: list, type_: pa.DataType) -> pa.Array:
    if pa.types.is_fixed_size_list(type_):
        # Build from one flat uint8 buffer: much faster than per-row Python lists.
        size = type_.list_size
        valid = np.array([v is not None for v in values], dtype=bool)
        flat = np.zeros((len(values), size), dtype=np.uint8)
        for i, v in enumerate(values):
            if v is not None:
                flat[i] = v
        mask = pa.array(~valid) if not valid.all() else None
        return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel(), pa.uint8()), size, mask=mask)
    return pa.array(values, type=type_)
