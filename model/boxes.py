"""Localization map -> boxes (DESIGN §5): pure, batched post-processing.

For each image: upsample its patch-grid map bilinearly to the image's original size
(align_corners=False, the same sampling as cv2.INTER_LINEAR), min-max normalise, keep pixels
``>= threshold``, label 8-connected components and take their bounding boxes (x1, y1
exclusive). ``largest`` keeps the largest component (the official rule); ``all`` keeps every
component. An empty (constant) map gives the whole image.

Speed comes from doing the per-image work in a few vectorised calls: maps of the same size
are upsampled in one ``interpolate`` call, and the images of the batch are labelled together
on a canvas where they sit side by side, separated by a background column, so components
never touch across images. Labelling works on foreground runs (one pass over the canvas
finds them; runs of neighbouring rows that touch are joined with a sparse connected-
components call), so areas, boxes and score sums are sums over runs, not over pixels.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

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
        for j, i in enumerate(idx):
            # In place, in numpy: the same (up - lo) / span as float32 tensors, without
            # full-size temporaries or a thread pool round trip per op.
            norm = up[j, 0].numpy()
            lo, hi = norm.min(), norm.max()
            if hi - lo > 1e-12:
                np.subtract(norm, lo, out=norm)
                np.divide(norm, hi - lo, out=norm)
            else:
                norm.fill(0.0)
            out[i] = norm
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
    (largest first; equal areas in raster order of their first pixel, as label order
    gives); ``score`` is the mean normalised map inside the component. ``largest``
    returns one box per image.
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
    if len(norm_maps) == 0:
        return []
    limit = 1 if mode == "largest" else max_boxes
    mask, offsets = _masks_side_by_side(norm_maps, threshold)
    runs = _components_of_runs(mask)
    results: list[torch.Tensor] = []
    if runs.count:
        lengths = runs.ends - runs.starts
        run_sums = _run_sums(norm_maps, offsets, runs)
        # Group runs by component; a stable sort keeps raster order inside each group, so a
        # group's first run holds its first pixel and top row, its last run its bottom row.
        by_comp = np.argsort(runs.component, kind="stable")
        group_starts = np.flatnonzero(np.diff(runs.component[by_comp], prepend=-1))
        group_ends = np.append(group_starts[1:], len(by_comp)) - 1
        first_run, last_run = by_comp[group_starts], by_comp[group_ends]
        areas = np.add.reduceat(lengths[by_comp], group_starts)
        sums = np.add.reduceat(run_sums[by_comp], group_starts)
        x0 = np.minimum.reduceat(runs.starts[by_comp], group_starts)
        x1 = np.maximum.reduceat(runs.ends[by_comp], group_starts)
        y0, y1 = runs.rows[first_run], runs.rows[last_run] + 1
        owner = np.searchsorted(offsets, x0, side="right") - 1  # which image each component is in
        by_owner = np.argsort(owner, kind="stable")
        owner_bounds = np.searchsorted(owner[by_owner], np.arange(len(norm_maps) + 1))
    for i, m in enumerate(norm_maps):
        height, width = m.shape
        comps = by_owner[owner_bounds[i]:owner_bounds[i + 1]] if runs.count else np.array([], dtype=int)
        if comps.size == 0:
            results.append(torch.tensor([[0.0, 0.0, width, height, 0.0]], dtype=torch.float32))
            continue
        # Largest first; equal areas keep label order (raster order of the first pixel),
        # which is what max-by-area over skimage/scipy labels picks in the official rule.
        comps = comps[np.lexsort((first_run[comps], -areas[comps]))]
        if limit is not None:
            comps = comps[:limit]
        off = offsets[i]
        rows = np.stack([x0[comps] - off, y0[comps], x1[comps] - off, y1[comps], sums[comps] / areas[comps]], 1)
        results.append(torch.from_numpy(rows.astype(np.float32)))
    return results


class _Runs(NamedTuple):
    rows: np.ndarray  # per run: canvas row, first column, column after the last
    starts: np.ndarray
    ends: np.ndarray
    component: np.ndarray  # 8-connected component id of each run
    count: int  # number of runs


def _components_of_runs(mask: np.ndarray) -> _Runs:
    """8-connected components of a 2-D mask whose last column is background, as runs.

    Labelling foreground runs instead of pixels: runs come from one pass over the mask,
    runs of neighbouring rows that overlap or touch diagonally are joined, and the
    components of that small graph are the mask's components. Runs are in raster order.
    """
    width = mask.shape[1]
    flat = mask.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        changes = np.concatenate([[0], changes])
    # Every row ends in background, so runs never wrap and changes pair up as start, end.
    run_starts, run_ends = changes[0::2], changes[1::2]
    rows = run_starts // width
    starts, ends = run_starts - rows * width, run_ends - rows * width
    n = len(starts)
    if n == 0:
        return _Runs(rows, starts, ends, np.zeros(0, dtype=np.int64), 0)
    # Run b (row r) touches run a (row r - 1) when a.start <= b.end and b.start <= a.end
    # (ends exclusive, diagonal contact included). Keys row * width + column are sorted, so
    # the touching runs of the row above form one slice [lo, hi) of the run list.
    above = (rows - 1) * width
    lo = np.searchsorted(run_ends, above + starts, side="left")
    hi = np.searchsorted(run_starts, above + ends + 1, side="left")
    counts = np.maximum(hi - lo, 0)
    total = int(counts.sum())
    if total == 0:
        return _Runs(rows, starts, ends, np.arange(n), n)
    b = np.repeat(np.arange(n), counts)
    a = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)
    graph = coo_matrix((np.ones(total, dtype=np.int8), (a, b)), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    return _Runs(rows, starts, ends, component, n)


def foreground_ratio(norm_maps: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """Share of each image's normalised map at or above the threshold."""
    return np.array([float((m >= threshold).mean()) for m in norm_maps], dtype=np.float32)


def _masks_side_by_side(maps: Sequence[np.ndarray], threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One boolean canvas holding each map's ``>= threshold`` mask, left to right, with a
    background column after each image (so every canvas row ends in background)."""
    height = max(m.shape[0] for m in maps)
    widths = np.array([m.shape[1] for m in maps])
    offsets = np.concatenate([[0], np.cumsum(widths + 1)[:-1]])
    mask = np.zeros((height, int(widths.sum() + len(maps))), dtype=bool)
    for m, off in zip(maps, offsets):
        np.greater_equal(m, threshold, out=mask[: m.shape[0], off: off + m.shape[1]])
    return mask, offsets


def _run_sums(maps: Sequence[np.ndarray], offsets: np.ndarray, runs: "_Runs") -> np.ndarray:
    """Sum of each image's map over each of its runs: one reduceat pass per image."""
    sums = np.empty(runs.count, dtype=np.float64)
    owner = np.searchsorted(offsets, runs.starts, side="right") - 1
    by_owner = np.argsort(owner, kind="stable")
    bounds_of = np.searchsorted(owner[by_owner], np.arange(len(maps) + 1))
    for i, m in enumerate(maps):
        sel = by_owner[bounds_of[i]:bounds_of[i + 1]]
        if sel.size == 0:
            continue
        flat = np.ascontiguousarray(m).ravel()
        width = m.shape[1]
        bounds = np.empty(2 * sel.size, dtype=np.int64)  # start, end, start, end, ...: odd slots are gaps
        bounds[0::2] = runs.rows[sel] * width + runs.starts[sel] - offsets[i]
        bounds[1::2] = runs.rows[sel] * width + runs.ends[sel] - offsets[i]
        if bounds[-1] == flat.size:  # the last run ends at the image's last pixel
            bounds = bounds[:-1]
        sums[sel] = np.add.reduceat(flat, bounds)[0::2]
    return sums


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
