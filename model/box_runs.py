"""Foreground runs -> 8-connected components -> boxes, for a whole batch at once.

A run is a maximal horizontal interval of foreground pixels. The runs of a batch sit on a
virtual canvas (images stacked, a background row and column between them, so nothing joins
across images); a run's touching runs in the row above (overlap or diagonal contact) are one
slice of the sorted run list, and one sparse connected-components call labels the batch.
Areas, boxes and score sums are sums over runs. Runs come from pixels (:func:`pixel_runs`)
or from the upsampling's lines (``model.upsampled_runs``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components


class Runs(NamedTuple):
    """Foreground runs, image by image (ascending ids) and in raster order inside each image."""

    image: np.ndarray  # image id of each run
    row: np.ndarray
    start: np.ndarray  # first column
    end: np.ndarray  # column after the last
    total: np.ndarray  # sum of the normalised map over the run (float64)


def boxes_from_runs(parts: list[Runs], sizes: list[tuple[int, int]], limit: int | None) -> list[torch.Tensor]:
    """Label the runs of each part, then per image its components by area (ties: raster order
    of the first pixel, which is label order), best first, at most ``limit``; an image
    without any gets the whole image with score 0."""
    n = len(sizes)
    width = max(w for w, _ in sizes) + 1  # a background column after every row
    row_offset = np.cumsum([0] + [h + 1 for _, h in sizes])  # and a background row under every image
    wh = np.array(sizes, dtype=np.float64).reshape(n, 2)
    stats = [_components(r, width, row_offset) for r in parts if len(r.start)]
    stats.append((np.arange(n), np.full(n, -1), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), wh[:, 0], wh[:, 1]))
    image, first, area, total, x0, y0, x1, y1 = (np.concatenate(c) for c in zip(*stats))
    # The whole-image rows (area 0) sort last and are kept only where an image has nothing else.
    order = np.lexsort((first, -area, image))
    image = image[order]
    rank = np.arange(len(order)) - np.searchsorted(image, image)
    keep = (rank < (limit or len(order))) & ((area[order] > 0) | (rank == 0))
    order, image = order[keep], image[keep]
    score = total[order] / np.maximum(area[order], 1)
    rows = np.stack([x0[order], y0[order], x1[order], y1[order], score], 1).astype(np.float32)
    return [torch.from_numpy(b) for b in np.split(rows, np.searchsorted(image, np.arange(1, n)))]


def _components(runs: Runs, width: int, row_offset: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per 8-connected component: image, first pixel key, area, score sum and box."""
    row = row_offset[runs.image] + runs.row
    key_start, key_end = row * width + runs.start, row * width + runs.end
    above = (row - 1) * width
    lo = np.searchsorted(key_end, above + runs.start, side="left")
    hi = np.searchsorted(key_start, above + runs.end + 1, side="left")
    counts = np.maximum(hi - lo, 0)
    n = len(row)
    if counts.sum():
        # Run b touches runs lo[b] .. hi[b] - 1: a CSR graph as it stands.
        neighbours = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
        indptr = np.concatenate([[0], np.cumsum(counts)])
        graph = csr_matrix((np.ones(len(neighbours), dtype=np.int8), neighbours, indptr), shape=(n, n))
        _, component = connected_components(graph, directed=False)
    else:
        component = np.arange(n)
    # Sums with bincount, extremes with ufunc.at (no sort). Runs are in raster order: a
    # component's first run holds its first pixel and top row, its last run the bottom row.
    k = int(component.max()) + 1
    first = np.flatnonzero(np.diff(np.maximum.accumulate(component), prepend=-1) > 0)
    if len(first) != k or np.any(component[first] != np.arange(k)):  # not numbered by first run
        first = np.full(k, n)
        np.minimum.at(first, component, np.arange(n))
    last = np.zeros(k, dtype=np.int64)
    np.maximum.at(last, component, np.arange(n))
    x0 = np.full(k, np.iinfo(np.int64).max)
    np.minimum.at(x0, component, runs.start)
    x1 = np.zeros(k, dtype=np.int64)
    np.maximum.at(x1, component, runs.end)
    return (
        runs.image[first],
        key_start[first],
        np.bincount(component, weights=runs.end - runs.start, minlength=k).astype(np.int64),
        np.bincount(component, weights=runs.total, minlength=k),
        x0,
        runs.row[first],
        x1,
        runs.row[last] + 1,
    )


def pixel_runs(maps: Sequence[np.ndarray], threshold: float, ids: np.ndarray) -> Runs:
    """Runs of ``map > threshold`` (as float32, the way torch compares): one pass over a
    canvas of the masks stacked vertically, each row ending in background, then per image
    one reduceat pass for the run sums."""
    heights = np.array([m.shape[0] for m in maps])
    offsets = np.concatenate([[0], np.cumsum(heights)])
    width = max(m.shape[1] for m in maps) + 1
    mask = np.zeros((int(offsets[-1]), width), dtype=bool)
    t = np.float32(threshold)
    for m, off in zip(maps, offsets):
        np.greater(m, t, out=mask[off: off + m.shape[0], : m.shape[1]])
    flat = mask.ravel()
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    if flat[0]:
        changes = np.concatenate([[0], changes])
    # Every row ends in background, so runs never wrap and changes pair up as start, end.
    rows, start = np.divmod(changes[0::2], width)
    end = changes[1::2] - rows * width
    owner = np.searchsorted(offsets, rows, side="right") - 1
    rows = rows - offsets[owner]
    total = np.empty(len(rows), dtype=np.float64)
    bounds = np.searchsorted(owner, np.arange(len(maps) + 1))
    for i, m in enumerate(maps):
        if bounds[i] == bounds[i + 1]:
            continue
        sel = slice(bounds[i], bounds[i + 1])
        flat_m = np.ascontiguousarray(m).ravel()
        pos = np.empty(2 * (bounds[i + 1] - bounds[i]), dtype=np.int64)  # start, end, ...: odd slots are gaps
        pos[0::2] = rows[sel] * m.shape[1] + start[sel]
        pos[1::2] = rows[sel] * m.shape[1] + end[sel]
        if pos[-1] == flat_m.size:  # the last run ends at the image's last pixel
            pos = pos[:-1]
        total[sel] = np.add.reduceat(flat_m, pos)[0::2]
    return Runs(ids[owner], rows, start, end, total)

