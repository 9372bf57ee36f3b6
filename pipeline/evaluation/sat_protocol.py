"""The official SAT evaluator's protocol (DESIGN §5), for ``evaluate_wsol.py --protocol sat``.

Everything happens in the official test frame, the ``crop`` x ``crop`` centre crop of the
``resize`` x ``resize`` resize (224 of 256), which a run localized with
``--resize-crop 256,224`` records:

* box: the official SAT rule on the map (min-max normalised on the patch grid with
  ``max - min + 1e-5``, bilinear to ``crop`` x ``crop``, ``> threshold``, largest
  8-connected component, its bounding box with x1/y1 exclusive as skimage gives them; an
  empty map gives the whole frame ``[0, 0, crop, crop]``), i.e. ``model.boxes`` at image
  size ``(crop, crop)``;
* GT boxes: ``x / W * resize - offset`` (y likewise), clipped to ``[0, crop - 1]`` and
  truncated to whole pixels (the official loaders' ``int(...)``);
* IoU with the +1-pixel convention: both boxes are taken as inclusive pixel ranges, so a
  box ``[x0, x1]`` is ``x1 - x0 + 1`` wide (the predicted box's exclusive x1 is used as it
  is, as the official code does);
* at one fixed threshold (0.4 on CUB, 0.3 on ImageNet in the official code): GT-known Loc
  is IoU >= 0.5 with the best-matching GT box, Top-1/Top-5 Loc add the true class in the
  top-1/top-5.

The protocol's figures are what the SAT paper reports; ``pipeline.evaluation.metrics`` (Choe et al.)
stays the default, because its thresholds are chosen on a validation split.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from model.boxes import boxes_from_maps
from pipeline.data.preprocess import ResizeCrop

OFFICIAL_FRAME = ResizeCrop(256, 224)
CUB_THRESHOLD = 0.4
IMAGENET_THRESHOLD = 0.3
GT_KNOWN_IOU = 0.5


def official_boxes(loc_maps: np.ndarray, crop: int, threshold: float) -> np.ndarray:
    """(n, h, w) maps on the patch grid (any scale: the rule min-max normalises) ->
    (n, 4) float64 boxes ``x0, y0, x1, y1`` in the ``crop`` x ``crop`` frame, x1/y1 exclusive."""
    maps = np.asarray(loc_maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"loc_maps must be (n, h, w), got shape {maps.shape}")
    if len(maps) == 0:
        return np.zeros((0, 4))
    boxes = boxes_from_maps(torch.from_numpy(maps).unsqueeze(1), [(crop, crop)] * len(maps), threshold, "largest")
    return np.stack([b[0, :4].double().numpy() for b in boxes])


def gt_boxes_to_crop(boxes: Sequence[Sequence[float]], width: float, height: float,
                     frame: ResizeCrop = OFFICIAL_FRAME) -> np.ndarray:
    """GT boxes ``[x0, y0, x1, y1]`` in original pixels -> (k, 4) whole pixels in the crop frame."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    # x / W * R in the official order of operations (x * R / W can round the other way).
    mapped = b / np.array([width, height] * 2, dtype=np.float64) * frame.resize - frame.offset
    # Clipped, then truncated (int() of a value >= 0 is its floor).
    return np.floor(np.clip(mapped, 0, frame.crop - 1))


def iou_plus_one(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes ``(..., 4)`` taken as inclusive pixel ranges (each side + 1), broadcast."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    iw = np.maximum(0.0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
    ih = np.maximum(0.0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    return inter / (area_a + area_b - inter)


def best_ious(
    loc_maps: np.ndarray,
    gt_boxes: Sequence[Sequence[Sequence[float]]],
    widths: Sequence[float],
    heights: Sequence[float],
    threshold: float,
    frame: ResizeCrop = OFFICIAL_FRAME,
) -> tuple[np.ndarray, np.ndarray]:
    """Per image: (its official box in the crop frame, IoU+1 with its best-matching GT box).

    ``gt_boxes[i]`` (at least one box each) are in original pixels of a
    ``widths[i]`` x ``heights[i]`` image.
    """
    n = len(loc_maps)
    if not (len(gt_boxes) == len(widths) == len(heights) == n):
        raise ValueError(f"{n} maps but {len(gt_boxes)} GT box lists and {len(widths)}/{len(heights)} sizes")
    boxes = official_boxes(loc_maps, frame.crop, threshold)
    ious = np.zeros(n)
    for i in range(n):
        if not len(gt_boxes[i]):
            raise ValueError(f"image {i} has no GT box")
        ious[i] = iou_plus_one(boxes[i], gt_boxes_to_crop(gt_boxes[i], widths[i], heights[i], frame)).max()
    return boxes, ious
