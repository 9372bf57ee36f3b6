"""Localization map -> boxes (DESIGN §5): pure, batched post-processing.

The official SAT rule, for each image: min-max normalise its patch-grid map *on the grid*,
``(M - min) / (max - min + 1e-5)`` in float32, upsample that bilinearly to the image's
original size (align_corners=False, the same sampling as cv2.INTER_LINEAR), keep pixels
``> threshold`` (the threshold as float32, as torch and numpy compare), label 8-connected
components and take their bounding boxes (x1, y1 exclusive). ``largest`` keeps the largest
component by pixel count (the official rule; ties: raster order of the first pixel, the
lowest skimage label); ``all`` keeps every component. A map with no pixel above the
threshold (a constant map among them: it normalises to zeros) gives the whole image.
Normalising after upsampling instead would move ~5% of boxes by a pixel or more.

How it is fast (the result is the per-image path's, box for box):

* Components come from foreground runs (maximal horizontal pixel intervals), labelled for
  the whole batch in one sparse connected-components call (``model.box_runs``).
* :func:`boxes_from_normalized` gets the runs from the pixels of maps at image size.
* :func:`boxes_from_maps` gets them without making the full-size maps: from the bilinear
  upsampling's per-row lines of the grid-normalised map, with torch's exact values
  computed (bit for bit) only next to the threshold (``model.upsampled_runs``).
* The pixel path is used instead for images with width + height <= 128 (torch has another
  kernel there), images with a near cell that is not monotone (rounding on a stretch flat
  at the threshold), and everything if the emulation ever differs from torch (checked once).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from model.box_runs import boxes_from_runs, pixel_runs
from model.upsampled_runs import emulation_matches_torch, line_runs

MODES = ("largest", "all")
_GENERIC_KERNEL_MIN = 129  # torch's generic bilinear kernel runs when out height + width >= this
NORM_EPS = 1e-5  # the official normalisation's (max - min + 1e-5)


def check_threshold(value: float, name: str = "threshold") -> float:
    """``value`` as a float if it is a valid map threshold, else ValueError naming ``name`` (a flag).

    Thresholds are relative to each map's min-max range, so they lie in [0, 1].
    """
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} is relative to each map's min-max range and must be in [0, 1], got {value}")
    return float(value)


def normalize_on_grid(loc_maps: torch.Tensor) -> torch.Tensor:
    """Per map (B x 1 x h x w, float32) ``(M - min) / (max - min + 1e-5)``, values in [0, 1):
    the official order of float32 operations. A constant map becomes all zeros."""
    lo = loc_maps.amin(dim=(1, 2, 3), keepdim=True)
    hi = loc_maps.amax(dim=(1, 2, 3), keepdim=True)
    return (loc_maps - lo) / (hi - lo + NORM_EPS)


def normalized_upsampled_maps(
    loc_maps: torch.Tensor, image_sizes: Sequence[tuple[int, int]]
) -> list[np.ndarray]:
    """Each map (B x 1 x h x w) normalised on its grid (:func:`normalize_on_grid`), then
    upsampled bilinearly to its (width, height): the map the official rule thresholds.

    A constant map comes back as all zeros (no evidence anywhere).
    """
    _check_maps(loc_maps, image_sizes)
    return _upsampled(normalize_on_grid(loc_maps.detach().float().cpu()), image_sizes)


def _upsampled(norm: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> list[np.ndarray]:
    out: list[np.ndarray | None] = [None] * len(image_sizes)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(image_sizes):
        by_size.setdefault((int(size[0]), int(size[1])), []).append(i)
    for (width, height), idx in by_size.items():
        up = F.interpolate(norm[idx], size=(height, width), mode="bilinear", align_corners=False)
        for j, i in enumerate(idx):
            out[i] = up[j, 0].numpy()
    return out  # type: ignore[return-value]


def boxes_from_maps(
    loc_maps: torch.Tensor,
    image_sizes: Sequence[tuple[int, int]],
    threshold: float,
    mode: str = "largest",
    max_boxes: int | None = None,
) -> list[torch.Tensor]:
    """Per image an (n x 5) float32 tensor ``x0, y0, x1, y1, score``, best first.

    ``image_sizes`` are original (width, height); ``threshold`` is relative to the map's
    range (pixels ``>`` it are foreground). Components are ordered by area (largest first;
    equal areas in raster order of their first pixel, as label order gives); ``score`` is
    the mean normalised map inside the component. ``largest`` returns one box per image:
    the official SAT box. The boxes are those of :func:`boxes_from_normalized` on
    :func:`normalized_upsampled_maps` (scores agree to float32 rounding).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    check_threshold(threshold)
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
    _check_maps(loc_maps, image_sizes)
    sizes = [(int(s[0]), int(s[1])) for s in image_sizes]
    maps = normalize_on_grid(loc_maps.detach().float().cpu())
    fast = [i for i, (w, h) in enumerate(sizes) if w + h >= _GENERIC_KERNEL_MIN]
    if not emulation_matches_torch():
        fast = []
    slow = set(range(len(sizes))) - set(fast)
    parts = []
    if fast:
        runs, unsettled = line_runs(maps.numpy()[fast, 0], [sizes[i] for i in fast], threshold, np.array(fast))
        parts.append(runs)
        slow |= set(unsettled.tolist())
    slow = sorted(slow)
    if slow:
        norms = _upsampled(maps[slow], [sizes[i] for i in slow])
        parts.append(pixel_runs(norms, threshold, np.array(slow)))
    return boxes_from_runs(parts, sizes, 1 if mode == "largest" else max_boxes)


def boxes_from_normalized(
    norm_maps: Sequence[np.ndarray], threshold: float, mode: str = "largest", max_boxes: int | None = None
) -> list[torch.Tensor]:
    """The labelling half of :func:`boxes_from_maps`, on maps already at image size in [0, 1]
    (pixels ``> threshold`` are foreground)."""
    if len(norm_maps) == 0:
        return []
    sizes = [(m.shape[1], m.shape[0]) for m in norm_maps]
    runs = pixel_runs(norm_maps, threshold, np.arange(len(norm_maps)))
    return boxes_from_runs([runs], sizes, 1 if mode == "largest" else max_boxes)


def foreground_ratio(norm_maps: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """Share of each image's normalised map above the threshold (the pixels the boxes use)."""
    t = np.float32(threshold)
    return np.array([float((m > t).mean()) for m in norm_maps], dtype=np.float32)


def _check_maps(loc_maps: torch.Tensor, image_sizes: Sequence[tuple[int, int]]) -> None:
    if not isinstance(loc_maps, torch.Tensor) or loc_maps.ndim != 4 or loc_maps.shape[1] != 1:
        shape = tuple(loc_maps.shape) if isinstance(loc_maps, torch.Tensor) else type(loc_maps).__name__
        raise ValueError(f"loc_maps must be a B x 1 x h x w tensor, got {shape}")
    if loc_maps.shape[0] == 0:
        raise ValueError("loc_maps is empty: pass at least one map")
    if len(image_sizes) != loc_maps.shape[0]:
        raise ValueError(f"got {loc_maps.shape[0]} maps but {len(image_sizes)} image sizes")
    finite = torch.isfinite(loc_maps)
    if not finite.all():
        bad = (~finite).flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"loc_maps contain NaN or inf (images {bad[:5]}): check the model's outputs")
    for i, size in enumerate(image_sizes):
        if len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1:
            raise ValueError(f"image {i} has size {tuple(size)}: width and height must be >= 1")

