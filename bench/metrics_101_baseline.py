"""Frozen copy of pipeline/metrics.py as of commit d954e12 (before the wsolevaluation sweep):
the 101-tau sweep that bench/bench_metrics.py times as its baseline. Not used by satloc.

Its original docstring follows.

WSOL metrics (DESIGN §6, Choe et al. CVPR 2020), vectorised over images and thresholds.

Evaluation size. DESIGN §6 says "resized to the image"; like Choe et al.'s evaluator we
resize every map to the model input size (224 x 224) instead and scale the GT boxes to
that size. IoU does not change under a per-axis scaling, so the only effect is that
components are found on a 224 x 224 grid rather than on the original pixels: every image
costs the same, and a 10,000-image sweep fits in seconds. Masks for PxAP are resized to
the same grid (nearest neighbour).

Conventions, the same as ``model.boxes`` (what the localize job writes):

- score map = ``loc_map`` (uint8 on the patch grid) upsampled bilinearly
  (half-pixel centres, like ``torch.nn.functional.interpolate(align_corners=False)``) and
  min-max normalised; a constant map becomes all zeros;
- foreground at tau is ``score >= tau``; 8-connected components; the "largest" component
  is the one with most pixels, ties broken by the raster order of its first pixel;
- a box is ``[x0, y0, x1, y1]`` with x1/y1 exclusive; an empty foreground gives the whole
  image as the box.

How the whole tau sweep stays array work. A component of ``{score >= tau}`` never needs a
per-threshold labelling: every pixel is linked to its highest 8-neighbour (ties by pixel
index), and pointer jumping sends each pixel to the local maximum it climbs to. Each such
*basin* meets every superlevel set in one connected piece (the climb never goes down), so
the components at a threshold are unions of basin pieces, joined where two basins touch at
a level >= the threshold. Per (basin, level) pixel statistics (area, box) come from one
scatter pass over the pixels; one graph labelling over (basin, level) nodes then gives the
components of every threshold at once. ``tests/pipeline/test_metrics.py`` holds the
brute-force reference (one ``ndimage.label`` per image per tau) that this matches exactly;
``bench/bench_metrics.py`` measures both.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

TAUS = np.arange(101) / 100.0  # 0.00, 0.01, ..., 1.00 (Choe et al.'s grid, both ends kept)
IOU_DELTAS = (0.3, 0.5, 0.7)
MAXBOXACC_DELTA = 0.5
EVAL_SIZE = (224, 224)  # (height, width): the model input size, as Choe et al.

# The smallest float32 >= each grid tau: for float32 scores, s >= TAUS[k] <=> s >= _TAUS32[k].
_TAUS32 = np.where(
    TAUS.astype(np.float32).astype(np.float64) >= TAUS,
    TAUS.astype(np.float32),
    np.nextafter(TAUS.astype(np.float32), np.float32(np.inf)),
).astype(np.float32)
_ASCENT_BATCH = 4  # images per pixel pass: keeps the working arrays in cache


# --------------------------------------------------------------------------- score maps


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D bilinear weights, half-pixel centres, edges clamped."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    out = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(out, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(out, (np.arange(n_out), hi), frac)
    return out


def score_maps(loc_maps: np.ndarray, size: tuple[int, int] = EVAL_SIZE) -> np.ndarray:
    """(n, h, w) maps -> (n, H, W) float32 in [0, 1]: bilinear upsampling, min-max per map."""
    maps = np.asarray(loc_maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"loc_maps must be (n, h, w), got shape {maps.shape}")
    rows = bilinear_matrix(maps.shape[1], size[0]).astype(np.float32)
    cols = bilinear_matrix(maps.shape[2], size[1]).astype(np.float32)
    up = np.einsum("yi,nij,xj->nyx", rows, maps, cols, optimize=True)
    lo = up.min(axis=(1, 2), keepdims=True)
    span = up.max(axis=(1, 2), keepdims=True) - lo
    flat = span <= 1e-12
    up -= lo
    up /= np.where(flat, 1.0, span)
    if flat.any():
        up[flat[:, 0, 0]] = 0.0
    return np.ascontiguousarray(up)


def quantise(scores: np.ndarray, taus: np.ndarray = TAUS) -> np.ndarray:
    """Per pixel the number of taus <= score (intp): ``score >= taus[k]`` <=> level > k.

    The default grid takes a fast path (one multiply, one lookup); extra thresholds
    merged into it add one comparison each.
    """
    taus = np.asarray(taus, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float32)
    extras = np.setdiff1d(taus, TAUS)
    if len(extras) + len(TAUS) == len(taus) and s.size:
        if s.min() < 0 or s.max() > 1:
            raise ValueError("scores must lie in [0, 1] (use score_maps)")
        guess = (s * np.float32(100.0)).astype(np.intp)  # floor, within one of the answer
        level = guess + (s >= _TAUS32[guess])
        for tau in extras:
            level += s >= tau
        return level
    return np.searchsorted(taus, s, side="right").astype(np.intp)


# --------------------------------------------------------------------------- boxes


def box_iou(boxes: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of ``boxes`` (..., 4) with ``gts`` (..., G, 4) -> (..., G); x1/y1 exclusive."""
    b = np.asarray(boxes, dtype=np.float64)[..., None, :]
    g = np.asarray(gts, dtype=np.float64)
    iw = np.clip(np.minimum(b[..., 2], g[..., 2]) - np.maximum(b[..., 0], g[..., 0]), 0, None)
    ih = np.clip(np.minimum(b[..., 3], g[..., 3]) - np.maximum(b[..., 1], g[..., 1]), 0, None)
    inter = iw * ih
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    area_g = (g[..., 2] - g[..., 0]) * (g[..., 3] - g[..., 1])
    union = area_b + area_g - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def gt_boxes_to_eval(
    gt_boxes: Sequence[np.ndarray | Sequence | None],
    widths: np.ndarray,
    heights: np.ndarray,
    size: tuple[int, int] = EVAL_SIZE,
) -> np.ndarray:
    """GT boxes in original pixels -> (n, G, 4) float64 on the evaluation grid.

    Images with fewer boxes are padded with an empty box far outside the image (IoU 0).
    """
    n = len(gt_boxes)
    count = max([len(b) for b in gt_boxes if b is not None] + [1])
    out = np.tile(np.array([-2.0, -2.0, -1.0, -1.0]), (n, count, 1))
    sx = size[1] / np.asarray(widths, dtype=np.float64)
    sy = size[0] / np.asarray(heights, dtype=np.float64)
    for i, boxes in enumerate(gt_boxes):
        if boxes is None or len(boxes) == 0:
            continue
        arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        out[i, : len(arr)] = arr * np.array([sx[i], sy[i], sx[i], sy[i]])
    return out


# --------------------------------------------------------------------------- the sweep


@dataclass
class BoxSweep:
    """Per image and threshold, the IoUs the box metrics count.

    ``largest_iou[i, k]``: IoU of the largest component's box at ``taus[k]`` with the
    best-matching GT box (MaxBoxAcc, GT-known Loc). ``best_iou[i, k]``: the best IoU over
    every (component box, GT box) pair (MaxBoxAccV2).
    """

    taus: np.ndarray
    largest_iou: np.ndarray  # (n, T) float32
    best_iou: np.ndarray  # (n, T) float32

    @staticmethod
    def concat(parts: Sequence["BoxSweep"]) -> "BoxSweep":
        taus = parts[0].taus
        return BoxSweep(
            taus,
            np.concatenate([p.largest_iou for p in parts]),
            np.concatenate([p.best_iou for p in parts]),
        )


@dataclass
class _Basins:
    """Basins of a batch of score maps and what the per-threshold unions need of them.

    Statistics are per basin and level L, over the basin's pixels with level >= L.
    """

    image: np.ndarray  # (B,) image index of each basin
    top: np.ndarray  # (B,) highest level in the basin (its root's)
    area: np.ndarray  # (B, T + 1) pixel count
    first: np.ndarray  # (B, T + 1) smallest raster index (gives the box top)
    last: np.ndarray  # (B, T + 1) largest raster index (gives the box bottom)
    xmin: np.ndarray  # (B, T + 1)
    xmax: np.ndarray  # (B, T + 1)
    edge_a: np.ndarray  # (E,) adjacent basin pairs ...
    edge_b: np.ndarray
    edge_level: np.ndarray  # (E,) ... and the highest level at which they touch

    @staticmethod
    def concat(parts: Sequence["_Basins"], image_offsets: Sequence[int]) -> "_Basins":
        starts = np.cumsum([0] + [len(p.top) for p in parts])
        cat = np.concatenate
        return _Basins(
            image=cat([p.image + off for p, off in zip(parts, image_offsets)]),
            top=cat([p.top for p in parts]),
            area=cat([p.area for p in parts]),
            first=cat([p.first for p in parts]),
            last=cat([p.last for p in parts]),
            xmin=cat([p.xmin for p in parts]),
            xmax=cat([p.xmax for p in parts]),
            edge_a=cat([p.edge_a + s for p, s in zip(parts, starts)]),
            edge_b=cat([p.edge_b + s for p, s in zip(parts, starts)]),
            edge_level=cat([p.edge_level for p in parts]),
        )


def _suffix(values: np.ndarray, ufunc: np.ufunc) -> np.ndarray:
    """Accumulate along the level axis from the top level down (levels >= L)."""
    return ufunc.accumulate(values[:, ::-1], axis=1)[:, ::-1]


class _Workspace:
    """Pixel buffers for one batch of ``m`` maps of h x w, reused batch after batch.

    Fresh multi-megabyte temporaries cost page faults on every batch (measured: the
    neighbourhood maximum took 7x longer with temporaries than with these buffers).
    """

    def __init__(self, m: int, h: int, w: int, taus: np.ndarray):
        self.m, self.h, self.w = m, h, w
        extras = np.setdiff1d(taus, TAUS)
        # Thresholds beyond the default grid (None: not a superset of it, use searchsorted).
        self.extra_taus = extras if len(extras) + len(TAUS) == len(taus) else None
        npix = h * w
        size = m * npix
        self.key = np.full((m, h + 2, w + 2), -1, dtype=np.int64)  # border stays -1
        self.across = np.empty((m, h + 2, w), dtype=np.int64)
        self.best = np.empty((m, h, w), dtype=np.int64)
        self.jumped = np.empty(size, dtype=np.int64)
        self.index = np.arange(size, dtype=np.int64)
        self.image_start = (np.arange(m, dtype=np.int64) * npix)[:, None, None]
        self.pix = np.tile(np.arange(npix, dtype=np.int64), m)  # raster index within the image
        self.col = self.pix % w
        self.local_pix = self.pix[:npix].reshape(h, w)
        self.real = np.empty(size, dtype=np.float32)
        self.level = np.empty(size, dtype=np.intp)
        self.basin = np.empty(size, dtype=np.intp)
        self.group = np.empty(size, dtype=np.intp)
        self.flag = np.empty(size, dtype=bool)


def _levels_into(ws: _Workspace, scores: np.ndarray, taus: np.ndarray, size: int) -> np.ndarray:
    """``quantise`` without temporaries, for scores already known to lie in [0, 1]."""
    level, real, flag = ws.level[:size], ws.real[:size], ws.flag[:size]
    s = scores.reshape(-1)
    extras = ws.extra_taus
    if extras is None:
        level[:] = np.searchsorted(taus, s, side="right")
        return level
    np.multiply(s, np.float32(100.0), out=real)
    np.copyto(level, real, casting="unsafe")  # truncation = floor: within one of the answer
    np.take(_TAUS32, level, out=real)
    np.greater_equal(s, real, out=flag)
    level += flag
    for tau in extras:
        np.greater_equal(s, tau, out=flag)
        level += flag
    return level


def _basins(ws: _Workspace, scores: np.ndarray, taus: np.ndarray) -> _Basins:
    """Basins of a batch of at most ``ws.m`` score maps, and their per-level statistics."""
    m, h, w = scores.shape
    npix = h * w
    size = m * npix
    # A non-negative float32's bits order like its value; the pixel index breaks ties, so
    # every climb is strictly upwards and ends at a local maximum.
    key, across, best = ws.key[:m], ws.across[:m], ws.best[:m]
    inner = key[:, 1:-1, 1:-1]
    inner[...] = scores.view(np.int32)
    inner <<= 32
    inner |= ws.local_pix
    np.maximum(key[:, :, :-2], key[:, :, 1:-1], out=across)
    np.maximum(across, key[:, :, 2:], out=across)
    np.maximum(across[:, :-2], across[:, 1:-1], out=best)
    np.maximum(best, across[:, 2:], out=best)
    best &= 0xFFFFFFFF  # the winner's pixel index ...
    best += ws.image_start[:m]  # ... within the batch
    parent, jumped, flag = best.reshape(-1), ws.jumped[:size], ws.flag[:size]
    roots = np.flatnonzero(np.equal(parent, ws.index[:size], out=flag))
    # Pointer jumping: each round doubles how far a pointer reaches. Climbs are rarely
    # shorter than 32 pixels, so the first rounds run blind on every pixel; then only the
    # pixels still moving (about half, then a fifth, ...) are followed.
    for _ in range(5):
        np.take(parent, parent, out=jumped)
        parent, jumped = jumped, parent
    moving = np.flatnonzero(np.not_equal(np.take(parent, parent, out=jumped), parent, out=flag))
    while moving.size:
        ahead = parent[moving]
        further = parent[ahead]
        parent[moving] = further
        moving = moving[further != ahead]
    n_basins = len(roots)
    basin = ws.basin[:size]
    basin[roots] = np.arange(n_basins)
    np.take(basin, parent, out=ws.group[:size])  # group is free until below
    basin[:] = ws.group[:size]
    level = _levels_into(ws, scores, taus, size)
    n_levels = len(taus) + 1

    group = ws.group[:size]
    np.multiply(basin, n_levels, out=group)
    group += level
    pix, col = ws.pix[:size], ws.col[:size]
    cells = n_basins * n_levels
    area = np.bincount(group, minlength=cells).reshape(n_basins, n_levels)
    first = np.full(cells, npix, dtype=np.int64)
    np.minimum.at(first, group, pix)
    last = np.full(cells, -1, dtype=np.int64)
    np.maximum.at(last, group, pix)
    xmin = np.full(cells, w, dtype=np.int64)
    np.minimum.at(xmin, group, col)
    xmax = np.full(cells, -1, dtype=np.int64)
    np.maximum.at(xmax, group, col)

    edge_a, edge_b, edge_level = _basin_edges(ws, basin, level, h, w, n_basins)
    return _Basins(
        image=roots // npix,
        top=level[roots],
        area=_suffix(area, np.add),
        first=_suffix(first.reshape(n_basins, n_levels), np.minimum),
        last=_suffix(last.reshape(n_basins, n_levels), np.maximum),
        xmin=_suffix(xmin.reshape(n_basins, n_levels), np.minimum),
        xmax=_suffix(xmax.reshape(n_basins, n_levels), np.maximum),
        edge_a=edge_a,
        edge_b=edge_b,
        edge_level=edge_level,
    )


def _basin_edges(
    ws: _Workspace, basin: np.ndarray, level: np.ndarray, h: int, w: int, n_basins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs of 8-adjacent basins and the highest level at which they touch (both >= it).

    ``basin``/``level`` are flat over a batch of h x w images. Right and down neighbours
    are compared on the whole arrays; a diagonal pair can only differ where a right or a
    down pair next to it differs (p and p+w+1 differ => p, p+1 or p+1, p+1+w do), so
    diagonals are only checked there.
    """
    npix = h * w
    size = len(basin)
    flag = ws.flag[: size - 1]
    right = np.flatnonzero(np.not_equal(basin[:-1], basin[1:], out=flag))
    right = right[right % w != w - 1]  # not across a row end
    flag = ws.flag[: size - w]
    down = np.flatnonzero(np.not_equal(basin[:-w], basin[w:], out=flag))
    down = down[down % npix < npix - w]  # not across an image end
    not_last_row = lambda p: p[p % npix < npix - w]  # noqa: E731
    # p -> p+w+1 from a right pair (p, p+1) or a down pair (p+1, p+1+w).
    diag = not_last_row(np.concatenate([right, (down - 1)[down % w != 0]]))
    # p -> p+w-1 from a right pair (p-1, p) or a down pair (p-1, p-1+w).
    anti = not_last_row(np.concatenate([right + 1, (down + 1)[down % w != w - 1]]))
    diag = diag[basin[diag] != basin[diag + w + 1]]
    anti = anti[basin[anti] != basin[anti + w - 1]]
    pa = np.concatenate([right, down, diag, anti])
    pb = np.concatenate([right + 1, down + w, diag + w + 1, anti + w - 1])
    a, b = basin[pa], basin[pb]
    weight = np.minimum(level[pa], level[pb])
    pair = np.minimum(a, b) * n_basins + np.maximum(a, b)
    if n_basins <= 2048:  # a dense table: no sort (pairs repeat all along each border)
        table = np.zeros(n_basins * n_basins, dtype=np.intp)
        np.maximum.at(table, pair, weight)
        pair = np.flatnonzero(table)
        weight = table[pair]
    else:
        top = int(weight.max(initial=0)) + 1
        keyed = np.unique(pair * top + weight)
        pair = keyed // top
        last = np.r_[pair[1:] != pair[:-1], True][: len(pair)]  # the last of each pair has the max level
        pair, weight = pair[last], (keyed % top)[last]
        pair, weight = pair[weight > 0], weight[weight > 0]
    return pair // n_basins, pair % n_basins, weight


def _components(basins: _Basins) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Connected components at every level, in one graph labelling.

    A node is a (basin, level) pair for every level the basin reaches (its piece of the
    superlevel set); an edge joins two basins' nodes at every level up to the level where
    the basins touch. Returns per node its basin, its level and its component label: a
    component label is one connected component at one level.
    """
    top = basins.top
    start = np.cumsum(top) - top  # first node of each basin; its nodes are levels 1..top
    n_nodes = int(top.sum())
    node_basin = np.repeat(np.arange(len(top)), top)
    node_level = np.arange(n_nodes) - start[node_basin] + 1
    weight = basins.edge_level
    edge = np.repeat(np.arange(len(weight)), weight)
    edge_level = np.arange(len(edge)) - np.repeat(np.cumsum(weight) - weight, weight) + 1
    graph = coo_matrix(
        (
            np.ones(len(edge), dtype=np.int8),
            (start[basins.edge_a[edge]] + edge_level - 1, start[basins.edge_b[edge]] + edge_level - 1),
        ),
        shape=(n_nodes, n_nodes),
    )
    label = connected_components(graph, directed=False)[1]
    return node_basin, node_level, label


def sweep_boxes(scores: np.ndarray, gt_eval: np.ndarray, taus: np.ndarray = TAUS) -> BoxSweep:
    """IoUs of the thresholded boxes of each score map, for every tau at once.

    ``scores``: (n, H, W) float32 in [0, 1] (``score_maps``); ``gt_eval``: (n, G, 4) boxes
    on the same grid (``gt_boxes_to_eval``); ``taus`` strictly increasing.
    """
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    taus = np.asarray(taus, dtype=np.float64)
    if taus.ndim != 1 or len(taus) == 0 or np.any(np.diff(taus) <= 0):
        raise ValueError("taus must be a non-empty, strictly increasing 1-D array")
    n, h, w = scores.shape
    npix = h * w
    n_taus = len(taus)
    if n == 0:
        return BoxSweep(taus, np.zeros((0, n_taus), np.float32), np.zeros((0, n_taus), np.float32))
    if gt_eval.shape[0] != n:
        raise ValueError(f"{n} score maps but GT boxes for {gt_eval.shape[0]} images")
    whole_iou = box_iou(np.array([0.0, 0.0, w, h]), gt_eval).max(axis=-1)

    starts = range(0, n, _ASCENT_BATCH)
    ws = _Workspace(min(n, _ASCENT_BATCH), h, w, taus)
    parts = [_basins(ws, scores[s : s + _ASCENT_BATCH], taus) for s in starts]
    basins = _Basins.concat(parts, list(starts))
    node_basin, node_level, comp = _components(basins)
    n_comp = int(comp.max()) + 1 if comp.size else 0
    c_area = np.bincount(comp, weights=basins.area[node_basin, node_level], minlength=n_comp).astype(np.int64)
    c_first = np.full(n_comp, npix, dtype=np.int64)
    np.minimum.at(c_first, comp, basins.first[node_basin, node_level])
    c_last = np.full(n_comp, -1, dtype=np.int64)
    np.maximum.at(c_last, comp, basins.last[node_basin, node_level])
    c_x0 = np.full(n_comp, w, dtype=np.int64)
    np.minimum.at(c_x0, comp, basins.xmin[node_basin, node_level])
    c_x1 = np.full(n_comp, -1, dtype=np.int64)
    np.maximum.at(c_x1, comp, basins.xmax[node_basin, node_level])
    c_image = np.zeros(n_comp, dtype=np.int64)
    c_image[comp] = basins.image[node_basin]
    c_tau = np.zeros(n_comp, dtype=np.int64)
    c_tau[comp] = node_level - 1  # foreground at taus[k] is level >= k + 1
    c_y0 = c_first // w
    boxes = np.stack([c_x0, c_y0, c_x1 + 1, c_last // w + 1], axis=1).astype(np.float64)
    iou = box_iou(boxes, gt_eval[c_image]).max(axis=-1)

    # Per (image, tau): the best component, and the largest one. An image with no pixel
    # at a tau gets the whole image as its box.
    slot = c_image * n_taus + c_tau
    best = np.full(n * n_taus, -1.0)
    np.maximum.at(best, slot, iou)
    # Largest: most pixels, then the first pixel in raster order (as model.boxes orders
    # them), packed into one integer per component; smaller is better.
    rank = (npix - c_area) * (npix + 1) + c_first
    image_best = np.full(n * n_taus, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(image_best, slot, rank)
    winner = rank == image_best[slot]
    largest = np.full(n * n_taus, -1.0)
    largest[slot[winner]] = iou[winner]
    fallback = np.repeat(whole_iou, n_taus)
    empty = best < 0
    best[empty] = fallback[empty]
    largest[empty] = fallback[empty]
    return BoxSweep(
        taus, largest.reshape(n, n_taus).astype(np.float32), best.reshape(n, n_taus).astype(np.float32)
    )


def _sweep_chunk(loc_maps: np.ndarray, gt_eval: np.ndarray, taus: np.ndarray, size: tuple[int, int]) -> BoxSweep:
    return sweep_boxes(score_maps(loc_maps, size), gt_eval, taus)


def sweep_loc_maps(
    loc_maps: np.ndarray,
    gt_eval: np.ndarray,
    taus: np.ndarray = TAUS,
    size: tuple[int, int] = EVAL_SIZE,
    workers: int = 1,
    chunk: int = 256,
) -> BoxSweep:
    """``sweep_boxes`` over stored maps (n, h, w), in chunks, on ``workers`` processes.

    Chunks keep memory flat (a 224 x 224 score map is 200 KB); processes, not threads,
    because the pixel work is many short numpy calls that hold the GIL between them.
    """
    n = len(loc_maps)
    bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)] or [(0, 0)]
    jobs = [(loc_maps[a:b], gt_eval[a:b], taus, size) for a, b in bounds]
    if workers <= 1 or len(jobs) == 1:
        return BoxSweep.concat([_sweep_chunk(*job) for job in jobs])
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: the caller may hold threads (pyarrow, torch) that fork would copy mid-flight.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return BoxSweep.concat(list(pool.map(_sweep_chunk, *zip(*jobs))))


# --------------------------------------------------------------------------- summaries


def box_accuracy(ious: np.ndarray, delta: float) -> np.ndarray:
    """BoxAcc per tau, in percent: share of images whose IoU reaches ``delta``."""
    if ious.shape[0] == 0:
        return np.full(ious.shape[1], np.nan)
    return (ious >= delta).mean(axis=0) * 100.0


def max_box_acc(sweep: BoxSweep, delta: float = MAXBOXACC_DELTA) -> tuple[float, float]:
    """(MaxBoxAcc in percent, the tau that reaches it; the smallest such tau on ties)."""
    curve = box_accuracy(sweep.largest_iou, delta)
    k = int(np.argmax(curve))
    return float(curve[k]), float(sweep.taus[k])


def max_box_acc_v2(
    sweep: BoxSweep, deltas: Sequence[float] = IOU_DELTAS
) -> tuple[float, dict[float, tuple[float, float]]]:
    """(MaxBoxAccV2 = mean over deltas, {delta: (MaxBoxAcc at delta, its own best tau)})."""
    per_delta = {}
    for delta in deltas:
        curve = box_accuracy(sweep.best_iou, delta)
        k = int(np.argmax(curve))
        per_delta[float(delta)] = (float(curve[k]), float(sweep.taus[k]))
    return float(np.mean([v for v, _ in per_delta.values()])), per_delta


def tau_index(taus: np.ndarray, tau: float) -> int:
    """Index of ``tau`` in ``taus`` (equal within 1e-9)."""
    hits = np.flatnonzero(np.abs(np.asarray(taus) - tau) < 1e-9)
    if hits.size == 0:
        raise ValueError(f"threshold {tau} is not among the swept taus")
    return int(hits[0])


def topk_hits(gt_labels: np.ndarray, topk_labels: Sequence[Sequence[int] | None], k: int) -> np.ndarray:
    """Per image: is the true class among the first ``k`` predicted labels."""
    out = np.zeros(len(gt_labels), dtype=bool)
    for i, (gt, labels) in enumerate(zip(gt_labels, topk_labels)):
        out[i] = labels is not None and int(gt) in list(labels)[:k]
    return out


class PxapAccumulator:
    """Pixel average precision over a whole set (Choe et al.): add batches, read ``value``.

    Per tau, predicted foreground is ``score >= tau``; precision and recall count every
    pixel of every image. The area under the precision-recall curve is summed as
    ``precision(tau) * (recall(tau) - recall(next higher tau))`` over taus that predict
    at least one pixel, from tau = 1 down to tau = 0, as Choe et al.'s evaluator does.
    """

    def __init__(self, taus: np.ndarray = TAUS):
        self.taus = np.asarray(taus, dtype=np.float64)
        self.positive = np.zeros(len(self.taus) + 1, dtype=np.int64)
        self.negative = np.zeros(len(self.taus) + 1, dtype=np.int64)
        self.images = 0

    def add(self, scores: np.ndarray, masks: np.ndarray) -> None:
        """``scores`` (n, H, W) in [0, 1]; ``masks`` (n, H, W) bool foreground."""
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != scores.shape:
            raise ValueError(f"masks {masks.shape} and score maps {scores.shape} differ in shape")
        level = quantise(scores, self.taus)
        bins = len(self.taus) + 1
        self.positive += np.bincount(level[masks], minlength=bins)
        self.negative += np.bincount(level[~masks], minlength=bins)
        self.images += len(scores)

    def value(self) -> float | None:
        """PxAP in percent, or None when no foreground pixel was seen."""
        total_pos = int(self.positive.sum())
        if total_pos == 0:
            return None
        # Pixels at level > k are foreground at taus[k]: suffix sums over levels.
        tp = np.cumsum(self.positive[::-1])[::-1][1:].astype(np.float64)
        fp = np.cumsum(self.negative[::-1])[::-1][1:].astype(np.float64)
        predicted = tp + fp
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1.0), 0.0)
        recall = tp / total_pos
        # From the highest tau down: recall grows.
        precision, recall, predicted = precision[::-1], recall[::-1], predicted[::-1]
        gain = np.diff(np.r_[0.0, recall])
        return float(np.sum((precision * gain)[predicted > 0]) * 100.0)
