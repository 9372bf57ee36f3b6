"""Foreground runs straight from bilinear upsampling's lines, without full-size maps.

On one output row, between two source columns (a "cell"), bilinear upsampling
(align_corners=False) is a line ``alpha + beta * x`` (float64, torch's float32 weights),
within ``delta / 2`` of torch's float32 value. A cell's foreground is the columns past the
line's crossing of the threshold, unless the column nearest the crossing is within
``delta`` of it: those few "near" cells are settled on torch's exact values, computed as
torch does (same weights, same fused multiply-adds, bit for bit; checked against
``F.interpolate`` once per process by :func:`emulation_matches_torch`). The maps come
normalised on their grid (the official rule), so the threshold is one float32 for all;
score sums are the lines summed in closed form. The work is on (row, cell) arrays in
chunks of rows.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from model.box_runs import Runs

_CHUNK = 16384  # (row, cell) entries per chunk: small temporaries (fresh large ones page-fault)
_ULP = 2.0 ** -24  # float32 unit roundoff


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


def upsample_exact(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """torch's generic bilinear kernel (align_corners=False), float32 bit for bit: the
    horizontal pass, then the vertical one, each a fused multiply-add."""
    y, x = _sampling(m.shape[0], np.array([height])), _sampling(m.shape[1], np.array([width]))
    a = _fma32(m[:, x.i0], x.w0, m[:, x.i1] * x.w1)
    return _fma32(a[y.i0], y.w0[:, None], a[y.i1] * y.w1[:, None])


@lru_cache(maxsize=1)
def emulation_matches_torch() -> bool:
    rng = np.random.default_rng(0)
    for grid, size in (((14, 14), (333, 451)), ((7, 12), (96, 40)), ((14, 14), (129, 1)), ((3, 20), (2, 700))):
        m = rng.random(grid, dtype=np.float32) * 3 - 1
        ref = F.interpolate(torch.from_numpy(m)[None, None], size=size, mode="bilinear", align_corners=False)
        if not np.array_equal(upsample_exact(m, *size), ref[0, 0].numpy()):
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


def line_runs(
    maps: np.ndarray, sizes: list[tuple[int, int]], threshold: float, ids: np.ndarray
) -> tuple[Runs, np.ndarray]:
    """Runs of the upsampled maps ``> threshold`` (images ``ids``; ``maps`` already
    normalised on the grid, so the score sums are sums of the upsampled values) from the
    lines, and the ids of images this cannot settle (a near cell that is not monotone:
    rounding on a stretch flat at the threshold), which the caller labels from their pixels."""
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

    # value > threshold (float32, as torch compares) <=> value >= the next float32 up.
    t32 = np.full(n, np.nextafter(np.float32(threshold), np.float32(np.inf)), dtype=np.float32)
    t = t32.astype(np.float64)

    # Every row of the bands that may hold foreground, against every cell, in chunks.
    keep = np.flatnonzero((b_max >= (t - delta)[b_img][:, None]).any(1))
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
    row_start = np.cumsum([0] + [h for _, h in sizes])
    return Runs(ids[run_img], run_row - row_start[run_img], start, end, total), ids[np.flatnonzero(bad)]


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
