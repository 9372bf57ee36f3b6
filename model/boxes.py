"""Localization map -> boxes (DESIGN §5): pure, batched post-processing.

For each image: upsample its patch-grid map bilinearly to the image's original size
(align_corners=False, the same sampling as cv2.INTER_LINEAR), min-max normalise, keep pixels
``>= threshold``, label 8-connected components and take their bounding boxes (x1, y1
exclusive). ``largest`` keeps the largest component (the official rule); ``all`` keeps every
component. An empty (constant) map gives the whole image.

How it is fast (the result is the per-image path's, box for box):

* Components come from foreground runs (maximal horizontal pixel intervals), never from a
  label image. The runs of a batch sit on a virtual canvas (images stacked, a background row
  and column between them, so nothing joins across images); a run's touching runs in the
  row above (overlap or diagonal contact) are one slice of the sorted run list, and one
  sparse connected-components call labels the batch. Areas, boxes and score sums are sums
  over runs.
* :func:`boxes_from_normalized` gets the runs from the pixels of maps at image size.
* :func:`boxes_from_maps` gets them without making the full-size maps. On one output row,
  between two source columns (a "cell"), bilinear upsampling is a line
  ``alpha + beta * x`` (float64, torch's float32 weights), within ``delta / 2`` of torch's
  float32 value (``delta`` bounds torch's rounding). So a cell's foreground is the columns
  past the line's crossing of the threshold, unless the column nearest the crossing is
  within ``delta`` of it: those few "near" cells are settled on torch's exact values,
  computed as torch does (same weights, same fused multiply-adds, bit for bit). The min and
  max of the map, and the threshold in map units, are exact the same way; score sums are
  the lines summed in closed form. The work is on (row, cell) arrays in chunks of rows.
* The pixel path is used instead for images with width + height <= 128 (torch has another
  kernel there), maps whose offset is huge next to their range (for the score sums),
  images with a near cell that is not monotone (rounding on a stretch flat at the
  threshold), and everything if the emulation ever differs from torch (checked once).
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

MODES = ("largest", "all")
_GENERIC_KERNEL_MIN = 129  # torch's generic bilinear kernel runs when out height + width >= this
_MAX_OFFSET = 16.0  # the model path only for maps with max |value| <= this x (max - min)
_CHUNK = 16384  # (row, cell) entries per chunk: small temporaries (fresh large ones page-fault)
_ULP = 2.0 ** -24  # float32 unit roundoff


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
    returns one box per image. The boxes are those of :func:`boxes_from_normalized` on
    :func:`normalized_upsampled_maps` (scores agree to float32 rounding).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold is relative to the map's range and must be in [0, 1], got {threshold}")
    if max_boxes is not None and max_boxes < 1:
        raise ValueError(f"max_boxes must be >= 1 or None, got {max_boxes}")
    _check_maps(loc_maps, image_sizes)
    sizes = [(int(s[0]), int(s[1])) for s in image_sizes]
    maps = loc_maps.detach().float().cpu()
    flat = maps.flatten(1)
    top, bottom = flat.amax(1), flat.amin(1)
    offset_ok = (flat.abs().amax(1) <= _MAX_OFFSET * (top - bottom)) | (top == bottom)
    fast = [i for i, (w, h) in enumerate(sizes) if w + h >= _GENERIC_KERNEL_MIN and offset_ok[i]]
    if not _emulation_matches_torch():
        fast = []
    slow = sorted(set(range(len(sizes))) - set(fast))
    parts = []
    if fast:
        parts += _model_runs(maps.numpy()[fast, 0], [sizes[i] for i in fast], threshold, np.array(fast))
    if slow:
        norms = normalized_upsampled_maps(maps[slow], [sizes[i] for i in slow])
        parts.append(_pixel_runs(norms, threshold, np.array(slow)))
    return _boxes_from_runs(parts, sizes, 1 if mode == "largest" else max_boxes)


def boxes_from_normalized(
    norm_maps: Sequence[np.ndarray], threshold: float, mode: str = "largest", max_boxes: int | None = None
) -> list[torch.Tensor]:
    """The labelling half of :func:`boxes_from_maps`, on maps already at image size in [0, 1]."""
    if len(norm_maps) == 0:
        return []
    sizes = [(m.shape[1], m.shape[0]) for m in norm_maps]
    runs = _pixel_runs(norm_maps, threshold, np.arange(len(norm_maps)))
    return _boxes_from_runs([runs], sizes, 1 if mode == "largest" else max_boxes)


def foreground_ratio(norm_maps: Sequence[np.ndarray], threshold: float) -> np.ndarray:
    """Share of each image's normalised map at or above the threshold."""
    return np.array([float((m >= threshold).mean()) for m in norm_maps], dtype=np.float32)


# ---------------------------------------------------------------- runs -> boxes


class _Runs(NamedTuple):
    """Foreground runs, image by image (ascending ids) and in raster order inside each image."""

    image: np.ndarray  # image id of each run
    row: np.ndarray
    start: np.ndarray  # first column
    end: np.ndarray  # column after the last
    total: np.ndarray  # sum of the normalised map over the run (float64)


def _boxes_from_runs(parts: list[_Runs], sizes: list[tuple[int, int]], limit: int | None) -> list[torch.Tensor]:
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


def _components(runs: _Runs, width: int, row_offset: np.ndarray) -> tuple[np.ndarray, ...]:
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


# ---------------------------------------------------------------- runs from pixels


def _pixel_runs(maps: Sequence[np.ndarray], threshold: float, ids: np.ndarray) -> _Runs:
    """Runs of ``map >= threshold``: one pass over a canvas of the masks stacked vertically,
    each row ending in background, then per image one reduceat pass for the run sums."""
    heights = np.array([m.shape[0] for m in maps])
    offsets = np.concatenate([[0], np.cumsum(heights)])
    width = max(m.shape[1] for m in maps) + 1
    mask = np.zeros((int(offsets[-1]), width), dtype=bool)
    for m, off in zip(maps, offsets):
        np.greater_equal(m, threshold, out=mask[off: off + m.shape[0], : m.shape[1]])
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
    return _Runs(ids[owner], rows, start, end, total)


# ---------------------------------------------------------------- runs from the upsampling's lines


class _Sampling(NamedTuple):
    """torch's bilinear sampling (align_corners=False) along one axis, for every output pixel
    of a batch of images laid end to end: its image, position, source pair, float32 weights."""

    owner: np.ndarray
    pos: np.ndarray
    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray
    free: np.ndarray  # False where torch clamps the source position to 0 (so w1 = 0)
    scale: np.ndarray  # per image, float32


def _sampling(n_in: int, n_out: np.ndarray) -> _Sampling:
    owner, pos = _segments(n_out)
    scale = np.float32(n_in) / n_out.astype(np.float32)
    # torch: src = scale * (d + 0.5) - 0.5 in one fused multiply-add (exact in float64, then
    # rounded once), clamped at 0; i0 = floor(src), w1 = src - i0, w0 = 1 - w1 in float32.
    raw = (scale.astype(np.float64)[owner] * (pos + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(raw, np.float32(0))
    i0 = np.minimum(src.astype(np.int64), n_in - 1)
    w1 = np.minimum(src - i0.astype(np.float32), np.float32(1))
    return _Sampling(owner, pos, i0, i0 + (i0 < n_in - 1), np.float32(1) - w1, w1, raw > 0, scale)


def _fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, as a fused multiply-add: the product is exact in
    float64; the float64 sum is rounded to odd so that rounding it to float32 is exact."""
    p = a.astype(np.float64) * b
    s = p + c
    bp = s - c
    err = (p - bp) + (c - (s - bp))  # s + err == p + c exactly
    fix = (err != 0) & ((s.view(np.int64) & 1) == 0)
    if fix.any():
        s[fix] = np.nextafter(s[fix], np.where(err[fix] > 0, np.inf, -np.inf))
    return s.astype(np.float32)


def _upsample_exact(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's generic bilinear kernel (align_corners=False), float32 bit for bit: the
    horizontal pass, then the vertical one, each a fused multiply-add."""
    y, x = _sampling(m.shape[0], np.array([height])), _sampling(m.shape[1], np.array([width]))
    a = _fma32(m[:, x.i0], x.w0, m[:, x.i1] * x.w1)
    return _fma32(a[y.i0], y.w0[:, None], a[y.i1] * y.w1[:, None])


@lru_cache(maxsize=1)
def _emulation_matches_torch() -> bool:
    rng = np.random.default_rng(0)
    for grid, size in (((14, 14), (333, 451)), ((7, 12), (96, 40)), ((14, 14), (129, 1)), ((3, 20), (2, 700))):
        m = rng.random(grid, dtype=np.float32) * 3 - 1
        ref = F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="bilinear", align_corners=False)
        if not np.array_equal(_upsample_exact(m, *size), ref[0, 0].numpy()):
            return False
    return True


class _Model:
    """The upsampled maps of a batch as lines, without their pixels.

    Rows are numbered over the batch and grouped in bands (same two source rows); each
    image's columns in cells (same two source columns), padded per image to ``ncell`` with
    empty cells at x = width, so every row ends in one. In band k and cell c, row r is
    ``(a + w1[r] * da) + (b + w1[r] * db) * x`` with ``a, da, b, db = lines[.][k, c]``: the
    lines of the band's two source rows, mixed with weights 1 - w1[r] and w1[r] (torch's w0
    is 1 - w1 rounded to float32). It is within ``delta / 2`` of torch's float32 value.
    """

    def __init__(self, maps: np.ndarray, sizes: list[tuple[int, int]]):
        self.maps = maps
        n, h, w = maps.shape
        widths = np.array([s[0] for s in sizes])
        y = self.y = _sampling(h, np.array([s[1] for s in sizes]))
        x = self.x = _sampling(w, widths)
        self.x_offset = np.cumsum(widths) - widths
        # |torch - line| <= delta / 2: float32 rounding of the x weights (their source
        # position is below w), of w0 and of torch's two multiply-adds (a few ulps).
        self.delta = np.abs(maps).reshape(n, -1).max(1).astype(np.float64) * _ULP * (4 * (h + w) + 32)
        # Cells: columns with the same source pair; clamped columns (w1 = 0) are flat cells.
        first = np.flatnonzero(np.diff(x.owner * (4 * w) + 2 * x.i0 + x.free, prepend=-1))
        img = x.owner[first]
        _, rank = _segments(np.bincount(img, minlength=n))
        self.ncell = int(rank.max()) + 2
        self.x0 = np.broadcast_to(widths[:, None], (n, self.ncell)).astype(np.float64)
        self.x1 = self.x0.copy()
        self.x0[img, rank] = x.pos[first]
        self.x1[img, rank] = np.append(x.pos[first[1:] - 1] + 1, widths[-1])
        j0, free, scale = x.i0[first], x.free[first], x.scale.astype(np.float64)[img]
        cell_j0, cell_j1 = np.zeros((n, self.ncell), dtype=np.int64), np.zeros((n, self.ncell), dtype=np.int64)
        slope, intercept = np.zeros((n, self.ncell)), np.zeros((n, self.ncell))
        cell_j0[img, rank], cell_j1[img, rank] = j0, np.where(free, x.i1[first], j0)
        slope[img, rank] = np.where(free, scale, 0.0)  # w1 = slope * x + intercept, up to rounding
        intercept[img, rank] = np.where(free, 0.5 * scale - 0.5 - j0, 0.0)
        # Bands, and per (band, cell) the line of each of the band's two source rows.
        start = np.flatnonzero(np.diff(y.owner * (4 * h) + 2 * y.i0 + y.free, prepend=-1))
        self.band_start, self.band_len = start, np.diff(np.append(start, len(y.owner)))
        self.band_img = b_img = y.owner[start]
        m, k = maps.astype(np.float64), np.arange(len(start))[:, None]
        lines = []
        for source in (y.i0[start], y.i1[start]):
            row = m[b_img, source]  # (bands, w)
            v0 = row[k, cell_j0[b_img]]
            dv = row[k, cell_j1[b_img]] - v0
            lines += [v0 + dv * intercept[b_img], dv * slope[b_img]]
        a0, b0, a1, b1 = lines
        self.lines = (a0, a1 - a0, b0, b1 - b0)

    def line(self, bands: np.ndarray, rows: np.ndarray, cells: np.ndarray):
        """(alpha, beta) of rows at cells of their bands (broadcast together)."""
        a, da, b, db = (x[bands, cells] for x in self.lines)
        w1 = self.y.w1[rows].astype(np.float64)
        return a + w1 * da, b + w1 * db

    def exact(self, rows: np.ndarray, x: np.ndarray) -> np.ndarray:
        """torch's float32 upsampled value at (row, column)."""
        img, y = self.y.owner[rows], self.y
        col = self.x_offset[img] + x
        i0, i1, w0, w1 = self.x.i0[col], self.x.i1[col], self.x.w0[col], self.x.w1[col]
        m0, m1 = self.maps[img, y.i0[rows]], self.maps[img, y.i1[rows]]  # the two source rows
        k = np.arange(len(x))
        a0 = _fma32(m0[k, i0], w0, m0[k, i1] * w1)
        a1 = _fma32(m1[k, i0], w0, m1[k, i1] * w1)
        return _fma32(a0, y.w0[rows], a1 * y.w1[rows])


def _model_runs(maps: np.ndarray, sizes: list[tuple[int, int]], threshold: float, ids: np.ndarray) -> list[_Runs]:
    """Runs of the normalised upsampled maps ``>= threshold`` (images ``ids``) from the lines;
    images with a near cell that is not monotone get the pixel path's runs instead."""
    n = len(sizes)
    model = _Model(maps, sizes)
    owner, delta = model.y.owner, model.delta
    b_start, b_len, b_img = model.band_start, model.band_len, model.band_img
    b_x0, b_x1 = model.x0[b_img], model.x1[b_img]
    cells = np.arange(model.ncell)

    # A block (band x cell) is bounded by its lines at its corner pixels: linear in x on a
    # row, and linear in w1 (monotone in the row) on a column.
    corners = []
    for r in (b_start, b_start + b_len - 1):
        alpha, beta = model.line(np.arange(len(b_start))[:, None], r[:, None], cells)
        corners += [alpha + beta * b_x0, alpha + beta * (b_x1 - 1)]
    real = b_x1 > b_x0
    b_max = np.where(real, np.maximum.reduce(corners), -np.inf)
    b_min = np.where(real, np.minimum.reduce(corners), np.inf)

    def extreme(sign: int) -> np.ndarray:
        """torch's max (sign 1) or min (-1) per image: exact values at the pixels whose line
        is within 2 delta of the best corner (a pixel reaches that corner within delta / 2)."""
        top = b_max if sign > 0 else -b_min
        level = np.maximum.reduceat(top.max(1), np.searchsorted(b_img, np.arange(n))) - 2 * delta
        band, cell = np.nonzero(top >= (level - delta)[b_img][:, None])
        which, rank = _segments(b_len[band])
        band, cell, rows = band[which], cell[which], b_start[band[which]] + rank
        alpha, beta = model.line(band, rows, cell)
        edge, down = _at_least(sign * alpha, sign * beta, b_x0[band, cell], b_x1[band, cell], level[owner[rows]])
        lo, hi = np.where(down, b_x0[band, cell], edge), np.where(down, edge, b_x1[band, cell])
        which, rank = _segments((hi - lo).astype(np.int64))
        out = np.full(n, -np.inf, dtype=np.float32)
        np.maximum.at(out, owner[rows[which]], sign * model.exact(rows[which], (lo[which] + rank).astype(np.int64)))
        return sign * out

    hi, lo = extreme(1), extreme(-1)
    span = hi - lo
    varies = span > 1e-12  # a constant map normalises to zeros: the whole-image box either way
    span = np.where(varies, span, np.float32(1))
    t32 = _threshold_in_map_units(lo, span, threshold)
    t = t32.astype(np.float64)

    # Every row of the bands that may hold foreground, against every cell, in chunks.
    keep = np.flatnonzero((b_max >= (t - delta)[b_img][:, None]).any(1) & varies[b_img])
    which, rank = _segments(b_len[keep])
    band, rows = keep[which], b_start[keep][which] + rank
    step = max(1, _CHUNK // model.ncell)
    found = [_cell_runs(model, band[i: i + step], rows[i: i + step], t) for i in range(0, len(rows), step)]
    runs = [np.concatenate(x) for x in zip(*(f[0] for f in found))] if found else [np.zeros(0, np.int64)] * 4
    near = [np.concatenate(x) for x in zip(*(f[1] for f in found))] if found else []
    bad = np.zeros(n, dtype=bool)
    if near and len(near[0]):
        # Settle the near cells on exact values; redo the rows where that changes a cell.
        e, rising, changed, bad = _resolve_near(model, t, t32, *near)
        if changed.any():
            redo = np.unique(near[0][changed])
            fix = np.isin(near[0], redo)
            local = np.searchsorted(redo, near[0][fix])
            again, _ = _cell_runs(model, band[np.searchsorted(rows, redo)], redo, t,
                                  (local, near[1][fix], e[fix], rising[fix]))
            kept = ~np.isin(runs[0], redo)
            at = np.searchsorted(runs[0][kept], again[0])
            runs = [np.insert(x[kept], at, y) for x, y in zip(runs, again)]
    run_row, start, end, total = runs
    run_img = owner[run_row]
    if bad.any():
        ok = ~bad[run_img]
        run_img, run_row, start, end, total = run_img[ok], run_row[ok], start[ok], end[ok], total[ok]
    total = (total - (end - start) * lo[run_img].astype(np.float64)) / span[run_img].astype(np.float64)
    row_start = np.cumsum([0] + [h for _, h in sizes])
    parts = [_Runs(ids[run_img], run_row - row_start[run_img], start, end, total)]
    if bad.any():
        redo = np.flatnonzero(bad)
        norms = normalized_upsampled_maps(torch.from_numpy(maps[redo, None]), [sizes[i] for i in redo])
        parts.append(_pixel_runs(norms, threshold, ids[redo]))
    return parts


def _cell_runs(model: _Model, band: np.ndarray, rows: np.ndarray, t: np.ndarray, fix=None):
    """Runs (row, start, end, sum of the lines) of some rows, given their bands, and their
    near cells (row, cell, alpha, beta, e).

    A cell's foreground is [e, x1) where beta >= 0 ("rising"), else [x0, e), e the first
    column past the line's crossing of the threshold: exact unless the line at the column
    nearest the crossing is within delta of the threshold (clipping the crossing keeps
    that column on its side of the cell). ``fix`` = (row index, cell, e, rising) overrides
    cells. Blends and flatnonzero, not where or boolean masks: those are several times
    slower on random masks.
    """
    img = model.y.owner[rows]
    # Rows come band by band (and image by image): repeat per band rather than gather per row.
    bands, per_band = np.unique(band, return_counts=True)
    a, da, b, db = (np.repeat(x[bands], per_band, axis=0) for x in model.lines)
    w1 = model.y.w1[rows, None].astype(np.float64)
    alpha, beta = a + w1 * da, b + w1 * db + 0.0  # + 0.0: no -0.0 slope (it flips room / beta)
    room = t[img][:, None] - alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.fmin(np.fmax(room / beta, -1.0), 1e9)  # fmax: a flat cell at the threshold (0 / 0) gives -1
    e = np.ceil(cross)
    near = np.flatnonzero(np.abs(room - beta * np.rint(cross)) < model.delta[img][:, None])
    rising = beta >= 0
    x0, x1 = (np.repeat(x[model.band_img[bands]], per_band, axis=0) for x in (model.x0, model.x1))
    if fix is not None:
        e[fix[0], fix[1]], rising[fix[0], fix[1]] = fix[2], fix[3]
    # Each cell's foreground [p, q) (none where q <= p: e may lie past the cell) and its
    # sum in closed form; runs are these intervals merged where neighbouring cells touch.
    p = np.maximum(x0, e * rising)
    q = np.minimum(x1, e + rising * 1e12)
    full = np.flatnonzero(q > p)
    p, q = p.ravel()[full], q.ravel()[full]
    sums = (q - p) * (alpha.ravel()[full] + beta.ravel()[full] * ((p + q - 1) * 0.5))
    new = np.ones(len(p), dtype=bool)
    new[1:] = (p[1:] != q[:-1]) | (full[1:] != full[:-1] + 1)
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(p))[: len(first)] - 1
    runs = (rows[full[first] // model.ncell], p[first].astype(np.int64), q[last].astype(np.int64),
            np.add.reduceat(sums, first) if len(first) else np.zeros(0))
    r, c = np.divmod(near, model.ncell)
    e_near = np.minimum(np.maximum(e[r, c], x0[r, c]), x1[r, c])
    return runs, (rows[r], c, alpha[r, c], beta[r, c], e_near)


def _resolve_near(model: _Model, t: np.ndarray, t32: np.ndarray, row, cell, alpha, beta, e_line):
    """Near cells on torch's exact values of their columns within delta of the threshold:
    their e and rising, whether that differs from the line's, and per image whether some
    cell is not monotone (background, foreground, background, or the reverse)."""
    img = model.y.owner[row]
    x0, x1, delta = model.x0[img, cell], model.x1[img, cell], model.delta[img]
    sure, down = _at_least(alpha, beta, x0, x1, t[img] + delta)
    maybe, _ = _at_least(alpha, beta, x0, x1, t[img] - delta)
    up = ~down
    w_lo, w_hi = np.where(up, maybe, sure), np.where(up, sure, maybe)
    which, rank = _segments(w_hi - w_lo)
    fg = model.exact(row[which], w_lo[which] + rank) >= t32[img[which]]
    step = np.diff(fg.astype(np.int8))
    inner = which[1:] == which[:-1]
    ups = np.bincount(which[1:][inner & (step > 0)], minlength=len(row))
    downs = np.bincount(which[1:][inner & (step < 0)], minlength=len(row))
    n_fg = np.bincount(which, weights=fg, minlength=len(row)).astype(np.int64)
    up &= ~((beta == 0) & (downs > 0) & (ups == 0))  # a flat cell may fall rather than rise
    bad = np.zeros(len(t), dtype=bool)
    bad[img[np.where(up, downs > 0, ups > 0)]] = True
    e = np.where(up, w_hi - n_fg, w_lo + n_fg)
    return e, up, (e != e_line) | (up != (beta >= 0)), bad


def _segments(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For groups of ``counts`` items laid end to end: each item's group and rank in it."""
    group = np.repeat(np.arange(len(counts)), counts)
    return group, np.arange(len(group)) - np.repeat(np.cumsum(counts) - counts, counts)


def _at_least(alpha, beta, lo, hi, level) -> tuple[np.ndarray, np.ndarray]:
    """Columns x in [lo, hi) with alpha + beta * x >= level: [lo, edge) where beta < 0
    (``down``), else [edge, hi)."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        q = np.clip((level - alpha) / beta, lo - 1, hi + 1)
        edge = np.where(beta > 0, np.ceil(q), np.where(beta < 0, np.floor(q) + 1, np.where(alpha >= level, lo, hi)))
    return np.clip(edge, lo, hi).astype(np.int64), beta < 0


def _threshold_in_map_units(lo: np.ndarray, span: np.ndarray, threshold: float) -> np.ndarray:
    """Per image the smallest float32 t with (t - lo) / span >= threshold, computed as the
    normalisation computes it: that is monotone in t, so a pixel is kept iff value >= t."""
    def kept(u):
        return np.greater_equal((u - lo) / span, threshold)

    t = (lo + float(threshold) * span.astype(np.float64)).astype(np.float32)
    while (low := ~kept(t)).any():
        t = np.where(low, np.nextafter(t, np.float32(np.inf)), t)
    while (lower := kept(below := np.nextafter(t, np.float32(-np.inf)))).any():
        t = np.where(lower, below, t)
    return t


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
