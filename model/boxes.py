"""Localization map -> boxes (DESIGN §5): pure, batched post-processing.

For each image: upsample its patch-grid map bilinearly to the image's original size
(align_corners=False, the same sampling as cv2.INTER_LINEAR), min-max normalise, keep pixels
``>= threshold``, label 8-connected components and take their bounding boxes (x1, y1
exclusive). ``largest`` keeps the largest component (the official rule); ``all`` keeps every
component. An empty (constant) map gives the whole image.

Speed comes from doing the per-image work in a few C calls: maps of the same size are
upsampled in one ``interpolate`` call, and every image of the batch is labelled in one
``scipy.ndimage.label`` call on a canvas where the images sit side by side, separated by
a background column, so components never touch across images. Areas, boxes and score sums
then come out of one ``bincount``/``find_objects`` pass for the whole batch.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
MODES = ("largest", "all")


def normalized_upsampled_maps(
    loc_maps: torch.Tensor, image_sizes: Sequence[tuple[int, int]]
) -> list[np.ndarray]:
    """Each map (B x 1 x h x w) upsampled to its (width, height) and min-max normalised.

    A constant map comes back as all zeros (no evidence anywhere).
    """
    _check_maps(loc_maps, image_sizes)
    maps = loc_maps.detach().float().cpu()
    out: list[np.ndarray | None] = [None] * len(image_sizes)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(image_sizes):
        by_size.setdefault((int(size[0]), int(size[1])), []).append(i)
    for (width, height), idx in by_size.items():
        up = F.interpolate(maps[idx], size=(height, width), mode="bilinear", align_corners=False)
        flat = up.flatten(1)
        lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
        span = (flat.max(dim=1).values.view(-1, 1, 1, 1) - lo)
        norm = torch.where(span > 1e-12, (up - lo) / span.clamp(min=1e-12), torch.zeros_like(up))
        for j, i in enumerate(idx):
            out[i] = norm[j, 0].numpy()
    return out  # type: ignore[return-value]


def boxes_from_maps(
    loc_maps: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    threshold: float,
    mode: str = "largest",
    max_boxes: int | None = None,
) -> list[torch.Tensor]:
    """Per image an (n x 5) float32 tensor ``x0, y0, x1, y1, score``, best first.

    ``image_sizes`` are original (width, height). Components are ordered by area
    (largest first, ties by position); ``score`` is the mean normalised map inside the
    component. ``largest`` returns one box per image.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold is relative to the map's range and must be in [0, 1], got {threshold}")
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
    norm_maps = normalized_upsampled_maps(loc_maps, image_sizes)
    return boxes_from_normalized(norm_maps, threshold, mode, max_boxes)


def boxes_from_normalized(
    norm_maps: Sequence[np.ndarray], threshold: float, mode: str = "largest", max_boxes: int | None = None
) -> list[torch.Tensor]:
    """The labelling half of :func:`boxes_from_maps`, on maps already at image size in [0, 1]."""
    limit = 1 if mode == "largest" else max_boxes
    canvas, offsets = _side_by_side(norm_maps)
    mask = canvas >= threshold
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    results: list[torch.Tensor] = []
    if count:
        flat_labels = labels.ravel()
        areas = np.bincount(flat_labels, minlength=count + 1)
        sums = np.bincount(flat_labels, weights=canvas.ravel(), minlength=count + 1)
        slices = ndimage.find_objects(labels)
        # x0 of each component on the canvas tells which image it belongs to.
        x0_canvas = np.array([s[1].start for s in slices])
        owner = np.searchsorted(offsets, x0_canvas, side="right") - 1
    for i, m in enumerate(norm_maps):
        height, width = m.shape
        comps = np.nonzero(owner == i)[0] if count else np.array([], dtype=int)
        if comps.size == 0:
            results.append(torch.tensor([[0.0, 0.0, width, height, 0.0]], dtype=torch.float32))
            continue
        comp_areas = areas[comps + 1]
        y0 = np.array([slices[c][0].start for c in comps])
        x0 = np.array([slices[c][1].start for c in comps]) - offsets[i]
        order = np.lexsort((x0, y0, -comp_areas))
        if limit is not None:
            order = order[:limit]
        rows = []
        for c in comps[order]:
            sy, sx = slices[c]
            rows.append(
                [sx.start - offsets[i], sy.start, sx.stop - offsets[i], sy.stop, sums[c + 1] / areas[c + 1]]
            )
        results.append(torch.tensor(rows, dtype=torch.float32))
    return results


def foreground_ratio(norm_maps: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """Share of each image's normalised map at or above the threshold."""
    return np.array([float((m >= threshold).mean()) for m in norm_maps], dtype=np.float32)


def _side_by_side(maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """One canvas with the maps left to right, a zero column between them."""
    height = max(m.shape[0] for m in maps)
    widths = np.array([m.shape[1] for m in maps])
    offsets = np.concatenate([[0], np.cumsum(widths + 1)[:-1]])
    canvas = np.full((height, int(widths.sum() + len(maps))), -1.0, dtype=np.float32)
    for m, off in zip(maps, offsets):
        canvas[: m.shape[0], off: off + m.shape[1]] = m
    return canvas, offsets


def _check_maps(loc_maps: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> None:
    if not isinstance(loc_maps, torch.Tensor) or loc_maps.ndim != 4 or loc_maps.shape[1] != 1:
        shape = tuple(loc_maps.shape) if isinstance(loc_maps, torch.Tensor) else type(loc_maps).__name__
        raise ValueError(f"loc_maps must be a B x 1 x h x w tensor, got {shape}")
    if loc_maps.shape[0] == 0:
        raise ValueError("loc_maps is empty: pass at least one map")
    if len(image_sizes) != loc_maps.shape[0]:
        raise ValueError(f"got {loc_maps.shape[0]} maps but {len(image_sizes)} image sizes")
    if torch.isnan(loc_maps).any():
        bad = torch.isnan(loc_maps).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"loc_maps contain NaN (images {bad[:5]}): check the model's outputs")
    for i, size in enumerate(image_sizes):
        if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
            raise ValueError(f"image {i} has size {tuple(size)}: width and height must be >= 1")
