"""WSOL metrics (DESIGN §6, Choe et al. CVPR 2020), vectorised over images and thresholds.

The default sweep (``sweep_loc_maps``, what ``pipeline.evaluate`` reports as MaxBoxAcc,
MaxBoxAccV2 and PxAP) follows clovaai/wsolevaluation (``inference.py`` and
``evaluation.py`` of its latest version), which is what those numbers in papers mean:

- score map: the patch-grid map resized to the 224 x 224 input frame with bicubic
  interpolation exactly as OpenCV's ``cv2.resize(..., INTER_CUBIC)`` on float32 (a = -0.75,
  source x = (x' + 0.5) * in / out - 0.5, edge taps clamped), then ``normalize_scoremap``:
  minus the min, divided by the new max, in float32; a map with a NaN or a constant map
  becomes all zeros (``wsol_score_maps``);
- boxes: the map quantised as ``(score * 255).astype(uint8)`` and thresholded with ``>``
  at ``int(tau * max)`` (``cv2.threshold`` THRESH_BINARY), tau = ``np.arange(0, 1, 0.001)``;
  every contour of ``cv2.findContours(RETR_TREE)`` gives a box, its ``boundingRect``
  (x, y, w, h) as ``[x, y, min(x + w, W - 1), min(y + h, H - 1)]``; no contour gives
  ``[0, 0, 0, 0]``. MaxBoxAcc takes the contour of largest ``cv2.contourArea`` (ties: the
  first in OpenCV's order), MaxBoxAccV2 every contour, outer and inner (hole) ones, and
  the best (box, GT box) pair;
- GT boxes: resized into the frame as ``int(x * 224 / width)`` (``wsol_gt_boxes``); IoU
  with the +1-pixel convention (``wsol_iou``);
- PxAP: ``MaskEvaluator``: per-pixel histograms over the bins [tau_k, tau_k+1), ...,
  [1, 2), [2, 3) and the area under the precision-recall curve (``PxapAccumulator``).

OpenCV is not used here (it is the tests' independent reference). What replaces it, all
at once for every threshold:

- a contour's bounding rectangle: an outer contour's is its 8-connected component's box;
  an inner contour runs around a hole (a 4-connected background component that does not
  touch the image border) through the foreground pixels next to it, so its rectangle is
  the hole's box grown by one pixel on each side;
- the largest contour: holes never win (an inner contour lies inside its parent's outer
  one), nor do components nested inside a hole. A top-level component's outer contour
  runs through pixel centres around the component with its holes filled, so its area is
  ``#(2 x 2 windows fully inside) + 0.5 * #(windows with exactly 3 inside)`` of the filled
  component. The filled components at threshold t are the components of ``{fill > t}``,
  where ``fill`` is the map with its holes filled (grey-level reconstruction by erosion
  from the border, 4-connected). OpenCV lists top-level contours in reverse raster order
  of their first pixel, so on equal areas the component whose first pixel comes last wins.

``tests/pipeline/evaluation/test_metrics.py`` checks each rule against a transcription of
wsolevaluation's code that calls OpenCV, box by box.

How it is fast: component trees, not a labelling per threshold
(``pipeline.evaluation.component_tree``, compiled with numba, one image at a time). The binary map
changes one grey level at a time, so a union-find over the pixels taken in level order
(a counting sort over the 256 values) holds the components of every threshold in turn;
each root keeps its box, first pixel and contour area, and at each threshold that some
tau maps to (``int(tau * max)``: at most 256 distinct ones for the 1,000 taus) one walk
over the live roots gives the best IoU and the largest contour's IoU. Per image:

- the background tree (4-connected, increasing): the holes and their boxes, the filled
  map (each hole's pixels get the level at which it reaches the border), and, from the
  2 x 2 window patterns, the Euler number of the foreground at each threshold;
- the filled map's tree (8-connected, decreasing): the top-level components, their
  boxes (the same as the unfilled ones') and contour areas;
- the map's own tree only where a component lies inside a hole (components = Euler
  number + holes exceeds the top-level count; a few maps in a hundred): its outer
  contour is not a top-level one.

``sweep_loc_maps`` also normalises and quantises each resized map in one compiled pass
(the same float32 steps as ``quantised(wsol_score_maps(...))``). The first call in a
process loads the compiled code from numba's cache (under ``pipeline/__pycache__``, or
``NUMBA_CACHE_DIR``; well under a second); without a writable cache location it compiles
(seconds) in each process. ``bench/bench_metrics.py`` times it against satloc's earlier
101-tau sweep.

``sweep_boxes`` is the official SAT box rule (DESIGN §5), the one the localize job
applies (``model.boxes``), for the train job's threshold choice on the val split
(``pipeline.evaluation.threshold``): ``score_maps`` min-max normalises each map on its
patch grid, ``(M - min) / (max - min + 1e-5)``, and upsamples it bilinearly (both by
``model.boxes.normalized_upsampled_maps`` itself); the foreground is ``score > tau``
(tau as float32, as ``model.boxes`` compares), the largest 8-connected component by pixel
count (ties: first pixel in raster order), x1/y1 exclusive; an empty foreground gives
the whole image. Its tree is the same union-find, by pixel count. So the threshold the
train job stores is chosen under the rule the localize job applies it with.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.evaluation import component_tree

TAUS = np.arange(0, 1, 0.001)  # wsolevaluation's cam_curve_interval: 0.000, ..., 0.999
PERCENT_TAUS = np.arange(101) / 100.0  # 0.00, ..., 1.00: sweep_boxes' grid (val_threshold)
IOU_DELTAS = (0.3, 0.5, 0.7)
MAXBOXACC_DELTA = 0.5
EVAL_SIZE = (224, 224)  # (height, width): the model input size, as Choe et al.

# The next float32 above each percent tau as float32: for float32 scores,
# s > float32(PERCENT_TAUS[k]) <=> s >= _ABOVE32[k].
_ABOVE32 = np.nextafter(PERCENT_TAUS.astype(np.float32), np.float32(np.inf))


# --------------------------------------------------------------------------- score maps


def score_maps(loc_maps: np.ndarray, size: tuple[int, int] = EVAL_SIZE) -> np.ndarray:
    """(n, h, w) maps -> (n, H, W) float32 in [0, 1): the maps the official SAT rule
    thresholds, those of ``model.boxes.normalized_upsampled_maps`` (min-max normalised on
    the patch grid with its 1e-5, then bilinear, align_corners=False); a constant map
    becomes all zeros. ``size`` is (height, width)."""
    maps = np.asarray(loc_maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"loc_maps must be (n, h, w), got shape {maps.shape}")
    if len(maps) == 0:
        return np.zeros((0, *size), dtype=np.float32)
    # Imported here: the wsolevaluation sweep's spawned workers need neither torch nor model/.
    import torch

    from model.boxes import normalized_upsampled_maps

    height, width = size
    up = normalized_upsampled_maps(torch.from_numpy(maps[:, None]), [(width, height)] * len(maps))
    return np.ascontiguousarray(np.stack(up))


def quantise(scores: np.ndarray, taus: np.ndarray = PERCENT_TAUS) -> np.ndarray:
    """Per pixel the number of taus it lies above (intp): ``score > taus[k]`` <=> level > k.

    As ``model.boxes``, the comparison is in float32 (``score > float32(tau)``), so a score
    equal to a grid tau is not above it. The default grid takes a fast path (one multiply,
    one lookup); extra thresholds merged into it add one comparison each.
    """
    taus = np.asarray(taus, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float32)
    extras = np.setdiff1d(taus, PERCENT_TAUS)
    if len(extras) + len(PERCENT_TAUS) == len(taus) and s.size:
        if s.min() < 0 or s.max() > 1:
            raise ValueError("scores must lie in [0, 1] (use score_maps)")
        # guess = 100 s within rounding: the grid taus before taus[guess] are all below s
        # and those after it all above, so only taus[guess] needs a comparison.
        guess = (s * np.float32(100.0)).astype(np.intp)
        level = guess + (s >= _ABOVE32[guess])
        for tau in extras:
            level += s > np.float32(tau)
        return level
    return np.searchsorted(taus.astype(np.float32), s, side="left").astype(np.intp)


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


# --------------------------------------------------------------------------- wsolevaluation frame


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of OpenCV's INTER_CUBIC resize along one axis.

    As ``cv::resize``: source position ``fx = float((x + 0.5) * n_in / n_out - 0.5)``, its
    floor ``sx``, the four taps ``sx - 1 .. sx + 2`` clamped to the edge, and the float32
    coefficients of ``interpolateCubic`` with A = -0.75 for ``fx - sx``.
    """
    fx = ((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    sx = np.floor(fx)
    x = (fx - sx).astype(np.float32)
    a, one = np.float32(-0.75), np.float32(1.0)
    x1, y = x + one, one - x
    c0 = ((a * x1 - np.float32(5.0) * a) * x1 + np.float32(8.0) * a) * x1 - np.float32(4.0) * a
    c1 = ((a + np.float32(2.0)) * x - (a + np.float32(3.0))) * x * x + one
    c2 = ((a + np.float32(2.0)) * y - (a + np.float32(3.0))) * y * y + one
    c3 = one - c0 - c1 - c2
    taps = np.clip(sx.astype(np.int64)[:, None] + np.arange(-1, 3), 0, n_in - 1)
    out = np.zeros((n_out, n_in), dtype=np.float64)
    for k, c in enumerate((c0, c1, c2, c3)):
        np.add.at(out, (np.arange(n_out), taps[:, k]), c.astype(np.float64))
    return out.astype(np.float32)


def _bicubic_resize(loc_maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    maps = np.asarray(loc_maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"loc_maps must be (n, h, w), got shape {maps.shape}")
    rows = bicubic_matrix(maps.shape[1], size[0])
    cols = bicubic_matrix(maps.shape[2], size[1])
    return np.ascontiguousarray(np.einsum("yi,nij,xj->nyx", rows, maps, cols, optimize=True), dtype=np.float32)


def wsol_score_maps(loc_maps: np.ndarray, size: tuple[int, int] = EVAL_SIZE) -> np.ndarray:
    """(n, h, w) maps -> (n, H, W) float32 in [0, 1], as wsolevaluation's ``inference.py``.

    Bicubic resize (``bicubic_matrix``; equal to ``cv2.resize`` INTER_CUBIC within float32
    rounding), then ``normalize_scoremap`` in float32: a map with a NaN, or a constant one,
    becomes zeros; otherwise ``map -= map.min(); map /= map.max()``.
    """
    up = _bicubic_resize(loc_maps, size)
    if up.size == 0:
        return up
    with np.errstate(invalid="ignore"):
        lo = up.min(axis=(1, 2), keepdims=True)
        up -= lo
        hi = up.max(axis=(1, 2), keepdims=True)
        dead = np.isnan(hi[:, 0, 0]) | (hi[:, 0, 0] == 0)  # NaN anywhere propagates to the max
        up /= np.where(hi > 0, hi, np.float32(1.0))
    up[dead] = 0.0
    return up


def quantised(scores: np.ndarray) -> np.ndarray:
    """wsolevaluation's ``(scoremap * 255).astype(np.uint8)``, for scores in [0, 1]."""
    return (np.asarray(scores, dtype=np.float32) * np.float32(255.0)).astype(np.uint8)


_PAD_BOX = np.array([-2, -2, -1, -1], dtype=np.int64)  # outside the image: IoU 0 with any box in it
# Padded GT boxes per chunk of ``sweep_loc_maps`` (x 32 bytes as float64): a chunk ends before
# it would pad more, and an image with more boxes than this is a chunk of its own.
MAX_PADDED_GT_BOXES = 1 << 14


def wsol_gt_box_list(
    gt_boxes: Sequence[np.ndarray | Sequence | None],
    widths: np.ndarray,
    heights: np.ndarray,
    size: tuple[int, int] = EVAL_SIZE,
) -> list[np.ndarray]:
    """GT boxes in original pixels -> per image (g, 4) int64 in the frame, as ``resize_bbox``.

    Each coordinate becomes ``int(x * new_size / size)`` (float64, truncated); an image
    without boxes gets the one padding box. Not padded to the largest count: memory grows
    with the boxes there are, never images x the largest count (``sweep_loc_maps`` pads
    per chunk).
    """
    scale = np.array([size[1], size[0], size[1], size[0]], dtype=np.float64)
    out = []
    for boxes, width, height in zip(gt_boxes, np.asarray(widths, np.float64), np.asarray(heights, np.float64)):
        if boxes is None or len(boxes) == 0:
            out.append(_PAD_BOX[None].copy())
            continue
        frame = np.array([width, height, width, height])
        out.append(np.trunc(np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale / frame).astype(np.int64))
    return out


def pad_gt_boxes(box_list: Sequence[np.ndarray]) -> np.ndarray:
    """Per-image (g, 4) boxes -> (n, G, 4) int64, padded with a box outside the image."""
    count = max([len(b) for b in box_list] + [1])
    out = np.tile(_PAD_BOX, (len(box_list), count, 1))
    for i, boxes in enumerate(box_list):
        out[i, : len(boxes)] = boxes
    return out


def wsol_gt_boxes(
    gt_boxes: Sequence[np.ndarray | Sequence | None],
    widths: np.ndarray,
    heights: np.ndarray,
    size: tuple[int, int] = EVAL_SIZE,
) -> np.ndarray:
    """GT boxes in original pixels -> (n, G, 4) int64 in the frame, as ``resize_bbox``
    (``wsol_gt_box_list``, padded). For many images use the list: this is n x the largest count."""
    return pad_gt_boxes(wsol_gt_box_list(gt_boxes, widths, heights, size))


def wsol_iou(boxes: np.ndarray, gts: np.ndarray) -> np.ndarray:
    """IoU of ``boxes`` (..., 4) with ``gts`` (..., G, 4) -> (..., G), +1-pixel convention.

    As ``calculate_multiple_iou``: x1/y1 inclusive, a pair whose union is <= 0 scores 0.
    """
    b = np.asarray(boxes, dtype=np.int64)[..., None, :]
    g = np.asarray(gts, dtype=np.int64)
    iw = np.maximum(0, np.minimum(b[..., 2], g[..., 2]) - np.maximum(b[..., 0], g[..., 0]) + 1)
    ih = np.maximum(0, np.minimum(b[..., 3], g[..., 3]) - np.maximum(b[..., 1], g[..., 1]) + 1)
    inter = iw * ih
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    area_g = (g[..., 2] - g[..., 0] + 1) * (g[..., 3] - g[..., 1] + 1)
    union = area_b + area_g - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


# --------------------------------------------------------------------------- the SAT rule's sweep


def sweep_boxes(scores: np.ndarray, gt_eval: np.ndarray, taus: np.ndarray = PERCENT_TAUS) -> BoxSweep:
    """IoUs of the thresholded boxes of each score map under the SAT rule, every tau at once.

    The rule ``model.boxes`` applies (module docstring): foreground ``score > tau`` (in
    float32), 8-connected; the largest component by pixel count (ties: first pixel in
    raster order); x1/y1 exclusive; an empty foreground gives the whole image. So
    ``largest_iou[i, k]`` is the IoU of the box ``model.boxes.boxes_from_maps`` gives at
    ``taus[k]`` for an image of the score map's size (the Parquet primary box).
    ``scores``: (n, H, W) float32 in [0, 1] (``score_maps``); ``gt_eval``: (n, G, 4) boxes
    on the same grid (``gt_boxes_to_eval``); ``taus`` strictly increasing.
    """
    scores, taus = _sweep_inputs(scores, gt_eval, taus, increasing=True, maps_from="score_maps")
    n, h, w = scores.shape
    n_taus = len(taus)
    if n == 0:
        return _empty_sweep(taus)
    whole_iou = box_iou(np.array([0.0, 0.0, w, h]), gt_eval).max(axis=-1)
    levels = quantise(scores, taus)  # foreground at taus[k] (score > tau): level > k
    largest, best = component_tree.satloc_sweep(levels, n_taus, np.asarray(gt_eval, dtype=np.float64), whole_iou)
    return BoxSweep(taus, largest.astype(np.float32), best.astype(np.float32))


# --------------------------------------------------------------------------- wsolevaluation's sweep

def sweep_wsol_boxes(scores: np.ndarray, gt_eval: np.ndarray, taus: np.ndarray = TAUS) -> BoxSweep:
    """wsolevaluation's boxes and IoUs for every tau at once (module docstring).

    ``scores``: (n, H, W) float32 in [0, 1] (``wsol_score_maps``); ``gt_eval``: (n, G, 4)
    int boxes in the same frame (``wsol_gt_boxes``); ``taus`` in [0, 1]. ``largest_iou``
    is the IoU of the largest contour's box (MaxBoxAcc), ``best_iou`` the best over every
    contour's box (MaxBoxAccV2); each the best over GT boxes.
    """
    scores, taus = _sweep_inputs(scores, gt_eval, taus, increasing=False, maps_from="wsol_score_maps")
    if len(scores) == 0:
        return _empty_sweep(taus)
    return _sweep_levels(quantised(scores), gt_eval, taus)


def _sweep_inputs(scores: np.ndarray, gt_eval: np.ndarray, taus: np.ndarray, *, increasing: bool,
                  maps_from: str) -> tuple[np.ndarray, np.ndarray]:
    """Both sweeps' inputs checked: (scores as C-contiguous float32, taus as float64)."""
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    taus = np.asarray(taus, dtype=np.float64)
    if taus.ndim != 1 or len(taus) == 0 or (increasing and np.any(np.diff(taus) <= 0)):
        raise ValueError(f"taus must be a non-empty{', strictly increasing' if increasing else ''} 1-D array")
    n = scores.shape[0]
    if n and gt_eval.shape[0] != n:
        raise ValueError(f"{n} score maps but GT boxes for {gt_eval.shape[0]} images")
    if n and not (scores.min() >= 0 and scores.max() <= 1):  # NaN fails this too
        raise ValueError(f"scores must lie in [0, 1] (use {maps_from})")
    return scores, taus


def _empty_sweep(taus: np.ndarray) -> BoxSweep:
    return BoxSweep(taus, np.zeros((0, len(taus)), np.float32), np.zeros((0, len(taus)), np.float32))


def _sweep_levels(q: np.ndarray, gt_eval: np.ndarray, taus: np.ndarray) -> BoxSweep:
    """``sweep_wsol_boxes`` on the quantised maps (n, H, W) uint8."""
    n = len(q)
    # wsolevaluation: cv2.threshold(q, int(tau * q.max()), THRESH_BINARY) keeps q > t.
    q_max = q.reshape(n, -1).max(axis=1).astype(np.float64)
    thresholds = np.clip((taus[None, :] * q_max[:, None]).astype(np.int64), 0, component_tree.WSOL_LEVELS - 1)
    rows = np.arange(n)[:, None]
    needed = np.zeros((n, component_tree.WSOL_LEVELS), dtype=bool)
    needed[rows, thresholds] = True
    best, largest = component_tree.wsol_sweep(q, needed, np.asarray(gt_eval, dtype=np.float64))
    return BoxSweep(taus, largest[rows, thresholds].astype(np.float32), best[rows, thresholds].astype(np.float32))


def _sweep_chunk(
    loc_maps: np.ndarray, gt_eval: np.ndarray | Sequence[np.ndarray], taus: np.ndarray, size: tuple[int, int]
) -> BoxSweep:
    """``sweep_wsol_boxes(wsol_score_maps(loc_maps, size), gt_eval, taus)``, with the
    normalisation and quantisation fused into one compiled pass (same float32 steps).
    A list of per-image boxes is padded here, for this chunk only."""
    if not isinstance(gt_eval, np.ndarray):
        gt_eval = pad_gt_boxes(gt_eval)
    taus = np.asarray(taus, dtype=np.float64)
    if taus.ndim != 1 or len(taus) == 0:
        raise ValueError("taus must be a non-empty 1-D array")
    if len(gt_eval) != len(loc_maps):
        raise ValueError(f"{len(loc_maps)} maps but GT boxes for {len(gt_eval)} images")
    if len(loc_maps) == 0:
        return BoxSweep(taus, np.zeros((0, len(taus)), np.float32), np.zeros((0, len(taus)), np.float32))
    return _sweep_levels(component_tree.normalized_levels(_bicubic_resize(loc_maps, size)), gt_eval, taus)


def _chunk_bounds(counts: Sequence[int], chunk: int, max_padded: int) -> list[tuple[int, int]]:
    """[a, b) ranges of at most ``chunk`` images whose padded boxes, (b - a) x the largest
    count, stay within ``max_padded`` (an image with more is a range of its own)."""
    bounds, start, widest = [], 0, 0
    for i, count in enumerate(counts):
        wider = max(widest, count)
        if i > start and (i + 1 - start > chunk or (i + 1 - start) * wider > max_padded):
            bounds.append((start, i))
            start, wider = i, count
        widest = wider
    if start < len(counts) or not bounds:
        bounds.append((start, len(counts)))
    return bounds


def sweep_loc_maps(
    loc_maps: np.ndarray,
    gt_eval: np.ndarray | Sequence[np.ndarray],
    taus: np.ndarray = TAUS,
    size: tuple[int, int] = EVAL_SIZE,
    workers: int = 1,
    chunk: int = 256,
) -> BoxSweep:
    """wsolevaluation's sweep over stored maps (n, h, w): ``wsol_score_maps`` then
    ``sweep_wsol_boxes`` (``gt_eval`` from ``wsol_gt_boxes``, or better the per-image list of
    ``wsol_gt_box_list``), in chunks, on ``workers`` processes.

    Chunks keep memory flat (a 224 x 224 score map is 200 KB). With a list, each chunk is
    padded on its own and holds at most ``MAX_PADDED_GT_BOXES`` padded boxes, so one image
    with 300,000 GT boxes costs its own boxes, not every image padded to 300,000. Each
    spawned worker loads the compiled trees from numba's cache on its first chunk (compiles
    them without one).
    """
    n = len(loc_maps)
    if isinstance(gt_eval, np.ndarray):
        bounds = [(s, min(s + chunk, n)) for s in range(0, n, chunk)] or [(0, 0)]
    else:
        gt_eval = list(gt_eval)
        bounds = _chunk_bounds([len(b) for b in gt_eval], chunk, MAX_PADDED_GT_BOXES)
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
    """Pixel average precision over a whole set, as wsolevaluation's ``MaskEvaluator``.

    ``add`` score maps (``wsol_score_maps``) and bool masks batch by batch; ``value`` is
    PxAP in percent. Per pixel a histogram over the bins [tau_0, tau_1), ..., [tau_last, 1),
    [1, 2), [2, 3): from the top bin down, the cumulative counts give TP and FP at each
    threshold (``score >= edge``), and the area under the precision-recall curve is
    ``sum(precision[k] * (recall[k] - recall[k - 1]))`` over the thresholds that predict
    at least one pixel.
    """

    def __init__(self, taus: np.ndarray = TAUS):
        self.taus = np.asarray(taus, dtype=np.float64)
        if self.taus.ndim != 1 or np.any(np.diff(self.taus) <= 0) or self.taus[-1] >= 1.0:
            raise ValueError("PxAP taus must be strictly increasing and below 1")
        self.edges = np.append(self.taus, [1.0, 2.0, 3.0])
        self.positive = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.negative = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.images = 0

    def _histogram(self, values: np.ndarray) -> np.ndarray:
        """``np.histogram(values, bins=self.edges)[0]`` (the last bin closed), by index."""
        bins = np.searchsorted(self.edges, values, side="right") - 1
        bins[values == self.edges[-1]] = len(self.edges) - 2
        keep = (bins >= 0) & (bins < len(self.edges) - 1)
        return np.bincount(bins[keep], minlength=len(self.edges) - 1)

    def add(self, scores: np.ndarray, masks: np.ndarray) -> None:
        """``scores`` (n, H, W) in [0, 1]; ``masks`` (n, H, W) bool foreground."""
        masks = np.asarray(masks, dtype=bool)
        scores = np.asarray(scores)
        if masks.shape != scores.shape:
            raise ValueError(f"masks {masks.shape} and score maps {scores.shape} differ in shape")
        self.positive += self._histogram(scores[masks])
        self.negative += self._histogram(scores[~masks])
        self.images += len(scores)

    def value(self) -> float | None:
        """PxAP in percent, or None when no foreground pixel was seen."""
        total_pos = int(self.positive.sum())
        if total_pos == 0:
            return None
        tp = np.cumsum(self.positive[::-1]).astype(np.float64)  # score >= 2, >= 1, >= tau_last, ...
        fp = np.cumsum(self.negative[::-1]).astype(np.float64)
        predicted = tp + fp
        precision = np.where(predicted > 0, tp / np.where(predicted > 0, predicted, 1.0), 0.0)
        recall = tp / total_pos
        gain = np.diff(recall)
        return float(np.sum((precision[1:] * gain)[predicted[1:] > 0]) * 100.0)
