"""pipeline/evaluation/metrics.py: hand-computed cases; the SAT rule's sweep against a brute force
and against model.boxes; the wsolevaluation sweep against a transcription of its code that
calls OpenCV."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline.evaluation import metrics
from pipeline.evaluation.metrics import BoxSweep
from pipeline.evaluation.metrics import PERCENT_TAUS as TAUS  # the SAT rule's sweep_boxes grid

EIGHT = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------- brute-force reference


def _ref_iou(box, gt) -> float:
    iw = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
    ih = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - inter
    return inter / union if union > 0 else 0.0


def brute_force_sweep(scores: np.ndarray, gt_eval: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops: one ndimage.label per image per tau, foreground ``score > tau`` in
    float32 (as model.boxes compares). Returns (largest_iou, best_iou)."""
    n, h, w = scores.shape
    largest = np.zeros((n, len(taus)))
    best = np.zeros((n, len(taus)))
    for i in range(n):
        for k, tau in enumerate(taus):
            labels, count = ndimage.label(scores[i] > np.float32(tau), structure=EIGHT)
            comps = []  # (-area, label, box): labels follow the raster order of first pixels
            for j, sl in enumerate(ndimage.find_objects(labels)):
                area = int((labels[sl] == j + 1).sum())
                comps.append((-area, j, (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)))
            if not comps:
                comps = [(0, 0, (0, 0, w, h))]
            ious = [max(_ref_iou(c[2], g) for g in gt_eval[i]) for c in comps]
            largest[i, k] = ious[comps.index(min(comps))]
            best[i, k] = max(ious)
    return largest, best


def _random_gt(rng, n, h, w, count=2) -> np.ndarray:
    gt = np.zeros((n, count, 4))
    for i in range(n):
        for j in range(count):
            x0, y0 = rng.integers(0, w - 1), rng.integers(0, h - 1)
            gt[i, j] = [x0, y0, min(w, x0 + rng.integers(1, w)), min(h, y0 + rng.integers(1, h))]
    return gt


def _assert_same(scores, gt, taus=TAUS):
    fast = metrics.sweep_boxes(scores, gt, taus)
    largest, best = brute_force_sweep(scores, gt, taus)
    np.testing.assert_array_equal(fast.largest_iou, largest.astype(np.float32))
    np.testing.assert_array_equal(fast.best_iou, best.astype(np.float32))


@pytest.mark.parametrize("seed", range(4))
def test_sweep_matches_brute_force_on_random_upsampled_maps(seed):
    rng = np.random.default_rng(seed)
    grid = (4, 7, 14, 14)[seed]
    maps = rng.integers(0, 256, (5, grid, grid), dtype=np.uint8)
    maps[0] = 9  # a flat map: all zeros, nothing > tau at any tau, the whole image as box
    scores = metrics.score_maps(maps, (48, 40))
    _assert_same(scores, _random_gt(rng, 5, 48, 40))


@pytest.mark.parametrize("seed", range(6))
def test_sweep_matches_brute_force_on_plateaus_and_noise(seed):
    """Few grey levels give large flat regions and many equal-area ties."""
    rng = np.random.default_rng(100 + seed)
    h, w = rng.integers(3, 30, 2)
    levels = int(rng.integers(2, 6))
    scores = (rng.integers(0, levels, (4, h, w)) / (levels - 1)).astype(np.float32)
    if seed % 2:
        scores = rng.random((4, h, w)).astype(np.float32)
    _assert_same(scores, _random_gt(rng, 4, h, w, count=3))


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1), (2, 9), (9, 2)])
def test_sweep_matches_brute_force_on_thin_images(shape):
    rng = np.random.default_rng(sum(shape))
    scores = (rng.integers(0, 4, (5, *shape)) / 3).astype(np.float32)
    scores[1:3] = rng.random((2, *shape))
    _assert_same(scores, _random_gt(rng, 5, max(shape[0], 2), max(shape[1], 2)))


def test_sweep_matches_brute_force_on_scores_exactly_at_grid_taus():
    """Scores equal to a grid tau (as float32) and one float32 step either side: the
    strict rule leaves a pixel out at its own tau and takes it in at the tau below."""
    rng = np.random.default_rng(11)
    grid32 = TAUS.astype(np.float32)
    values = np.concatenate([grid32, np.nextafter(grid32, np.float32(0)), np.nextafter(grid32, np.float32(1))])
    scores = rng.choice(np.clip(values, 0, 1), (4, 17, 13)).astype(np.float32)
    scores[0] = rng.choice(grid32[[30, 40, 41]], (17, 13))  # three plateaus exactly at grid values
    _assert_same(scores, _random_gt(rng, 4, 17, 13, count=3))


def test_sweep_matches_brute_force_at_224_with_extra_thresholds():
    rng = np.random.default_rng(7)
    maps = rng.integers(0, 256, (2, 14, 14), dtype=np.uint8)
    scores = metrics.score_maps(maps)
    gt = _random_gt(rng, 2, 224, 224)
    _assert_same(scores, gt, np.union1d(TAUS, [0.375]))
    _assert_same(scores, gt, np.array([0.37]))


# ----------------------------------------------------------------- hand-computed cases


def _two_blobs() -> np.ndarray:
    s = np.zeros((1, 10, 10), dtype=np.float32)
    s[0, 1:4, 1:4] = 1.0  # A: 9 pixels, box [1, 1, 4, 4]
    s[0, 6:9, 5:10] = 0.6  # B: 15 pixels, box [5, 6, 10, 9]
    return s


def test_hand_case_largest_and_best_component():
    gt = np.array([[[1.0, 1.0, 4.0, 4.0]]])  # exactly blob A
    sweep = metrics.sweep_boxes(_two_blobs(), gt)
    at = {round(t, 2): k for k, t in enumerate(sweep.taus)}
    # Foreground is score > tau. tau 0: the zero background is not > 0, so the
    # foreground is A (9 px) and B (15 px); B is larger (IoU 0 with A's box), A is a
    # component (IoU 1). The same at tau 0.5 and 0.59 (0.6 > 0.59).
    for tau in (0.0, 0.5, 0.59):
        assert sweep.largest_iou[0, at[tau]] == 0.0
        assert sweep.best_iou[0, at[tau]] == 1.0
    # tau 0.6: B's 0.6 is not > 0.6 (the same float32), so only A: IoU 1, up to 0.99.
    assert sweep.largest_iou[0, at[0.6]] == 1.0
    assert sweep.largest_iou[0, at[0.99]] == 1.0
    # tau 1: A's 1.0 is not > 1, the foreground is empty: the whole 10 x 10 image, IoU 9/100.
    assert sweep.largest_iou[0, at[1.0]] == pytest.approx(0.09)
    assert sweep.best_iou[0, at[1.0]] == pytest.approx(0.09)
    # MaxBoxAcc (IoU 0.5): 0 for taus 0 .. 0.59, 100 for 0.6 .. 0.99, 0 at 1: the first is 0.6.
    value, tau = metrics.max_box_acc(sweep)
    assert (value, tau) == (100.0, 0.6)
    # best IoU is 1 for taus 0 .. 0.99: each delta's own best tau is the first, 0.
    v2, by_delta = metrics.max_box_acc_v2(sweep)
    assert v2 == 100.0
    assert by_delta == {0.3: (100.0, 0.0), 0.5: (100.0, 0.0), 0.7: (100.0, 0.0)}


def test_hand_case_diagonal_pixels_are_one_component():
    s = np.zeros((1, 6, 6), dtype=np.float32)
    s[0, 1, 1] = s[0, 2, 2] = s[0, 3, 3] = 1.0
    s[0, 5, 0] = 1.0  # a separate single pixel
    gt = np.array([[[1.0, 1.0, 4.0, 4.0]]])
    sweep = metrics.sweep_boxes(s, gt, np.array([0.5]))
    assert sweep.largest_iou[0, 0] == 1.0  # the diagonal run [1, 1, 4, 4] is one 3-pixel component


def test_hand_case_ties_pick_the_first_component_in_raster_order():
    s = np.zeros((1, 8, 8), dtype=np.float32)
    s[0, 4:6, 0:2] = 1.0  # lower-left, 4 px
    s[0, 0:2, 5:7] = 1.0  # top-right, 4 px: higher, so it wins
    gt = np.array([[[5.0, 0.0, 7.0, 2.0]]])
    assert metrics.sweep_boxes(s, gt, np.array([0.5])).largest_iou[0, 0] == 1.0
    s2 = np.zeros((1, 8, 8), dtype=np.float32)
    s2[0, 0:2, 5:7] = 1.0
    s2[0, 0:2, 0:2] = 1.0  # same top: the left one wins
    gt2 = np.array([[[0.0, 0.0, 2.0, 2.0]]])
    assert metrics.sweep_boxes(s2, gt2, np.array([0.5])).largest_iou[0, 0] == 1.0
    # Equal areas and tops: A reaches further left, but B's first pixel comes first in
    # raster order, and that decides (as model.boxes; a bounding-box rule would pick A).
    s3 = np.zeros((1, 9, 10), dtype=np.float32)
    s3[0, 0:2, 1:5] = s3[0, 0, 5] = 1.0  # B: 9 px, first pixel (0, 1), box [1, 0, 6, 2]
    for i in range(9):
        s3[0, i, 8 - i] = 1.0  # A: a diagonal of 9 px from (0, 8) to (8, 0)
    gt3 = np.array([[[1.0, 0.0, 6.0, 2.0]]])
    assert metrics.sweep_boxes(s3, gt3, np.array([0.5])).largest_iou[0, 0] == 1.0
    labels, count = ndimage.label(s3[0] > 0.5, structure=EIGHT)
    assert count == 2 and np.bincount(labels.ravel())[1:].tolist() == [9, 9]


def test_flat_map_gives_the_whole_image_and_best_gt_box_counts():
    scores = metrics.score_maps(np.full((1, 14, 14), 77, dtype=np.uint8))
    assert not scores.any()  # all zeros: nothing is > tau, not even at tau 0
    gt = np.array([[[0.0, 0.0, 112.0, 224.0], [0.0, 0.0, 224.0, 224.0]]])  # the second covers the image
    sweep = metrics.sweep_boxes(scores, gt)
    assert np.all(sweep.largest_iou == 1.0) and np.all(sweep.best_iou == 1.0)


def test_box_iou_by_hand():
    assert metrics.box_iou([0, 0, 2, 2], [[1, 1, 3, 3]])[0] == pytest.approx(1 / 7)
    assert metrics.box_iou([0, 0, 2, 2], [[2, 0, 4, 2]])[0] == 0.0  # touching edges: x1 is exclusive
    assert metrics.box_iou([0, 0, 0, 0], [[0, 0, 0, 0]])[0] == 0.0


def test_max_box_acc_v2_averages_each_deltas_own_best_tau():
    best = np.array([[0.35, 0.8, 0.6], [0.2, 0.4, 0.75], [0.1, 0.1, 0.1], [0.9, 0.9, 0.2]], dtype=np.float32)
    sweep = BoxSweep(np.array([0.1, 0.2, 0.3]), best, best)
    v2, by_delta = metrics.max_box_acc_v2(sweep)
    # delta 0.3: taus -> 2/4, 3/4, 2/4 -> 75 at 0.2; 0.5: 1/4, 2/4, 2/4 -> 50 at 0.2;
    # 0.7: 1/4, 2/4, 1/4 -> 50 at 0.2.
    assert by_delta == {0.3: (75.0, 0.2), 0.5: (50.0, 0.2), 0.7: (50.0, 0.2)}
    assert v2 == pytest.approx((75 + 50 + 50) / 3)


def test_pxap_by_hand():
    # fg pixels score 1.0 and 0.5; bg pixels 0.75 and 0.0. From tau 1 down:
    # {1.0}: P 1, R 0.5 -> +0.5; add 0.75: P 0.5, R 0.5 -> +0; add 0.5: P 2/3, R 1 -> +1/3.
    acc = metrics.PxapAccumulator()
    acc.add(np.array([[[1.0, 0.5, 0.75, 0.0]]], dtype=np.float32), np.array([[[True, True, False, False]]]))
    assert acc.value() == pytest.approx(100 * (0.5 + 1 / 3))
    perfect = metrics.PxapAccumulator()
    perfect.add(np.array([[[1.0, 0.9, 0.1, 0.0]]], dtype=np.float32), np.array([[[True, True, False, False]]]))
    assert perfect.value() == pytest.approx(100.0)
    assert metrics.PxapAccumulator().value() is None


def _taus_below(s: np.ndarray, taus: np.ndarray) -> np.ndarray:
    """The definition: per score, how many taus it is > (in float32, as model.boxes)."""
    return (s[:, None] > taus.astype(np.float32)[None, :]).sum(axis=1)


def test_quantise_counts_the_taus_strictly_below_including_grid_values():
    rng = np.random.default_rng(0)
    grid32 = TAUS.astype(np.float32)
    s = np.concatenate([
        rng.random(20000), TAUS, grid32, np.nextafter(grid32, np.float32(-1)), np.nextafter(grid32, np.float32(2)),
        [0.0, 1.0],
    ]).astype(np.float32)
    s = np.clip(s, 0, 1)
    np.testing.assert_array_equal(metrics.quantise(s), _taus_below(s, TAUS))
    taus = np.union1d(TAUS, [0.333, 0.777])
    np.testing.assert_array_equal(metrics.quantise(s, taus), _taus_below(s, taus))
    odd = np.array([0.005, 0.4, 0.41, 0.9])  # off the default grid: the general path
    np.testing.assert_array_equal(metrics.quantise(s, odd), _taus_below(s, odd))
    # By hand: 0.4 (as float32) is above 0.00 .. 0.39 (40 taus), not above 0.40; the
    # next float32 up is above 0.40 too; 0 is above none; 1 above 0.00 .. 0.99 (100).
    four = np.float32(0.4)
    by_hand = np.array([four, np.nextafter(four, np.float32(1)), 0, 1], np.float32)
    assert metrics.quantise(by_hand).tolist() == [40, 41, 0, 100]
    # The comparison is in float32: 0.3 as float32 (0.30000001...) is above the double 0.3
    # but not above tau 0.3, as model.boxes compares (the box rule's > float32(threshold)).
    three = np.float32(0.3)
    assert float(three) > 0.3 and metrics.quantise(np.array([three]), np.array([0.3])).tolist() == [0]
    assert metrics.quantise(np.array([three])).tolist() == [30]  # above 0.00 .. 0.29


def test_score_maps_are_the_sat_rules_maps():
    """The maps the threshold is chosen on are model.boxes' own: normalised on the patch
    grid with the 1e-5, then upsampled (not upsampled, then normalised)."""
    import torch

    from model.boxes import normalized_upsampled_maps

    rng = np.random.default_rng(1)
    maps = rng.integers(0, 256, (3, 14, 14), dtype=np.uint8)
    ours = metrics.score_maps(maps)
    theirs = normalized_upsampled_maps(torch.from_numpy(maps[:, None].astype(np.float32)), [(224, 224)] * 3)
    np.testing.assert_array_equal(ours, np.stack(theirs))
    # In [0, 1): the grid max becomes (max - min) / (max - min + 1e-5); bilinear stays in between.
    assert ours.dtype == np.float32 and ours.min() >= 0.0 and ours.max() < 1.0
    # Another size, (height, width) here and (width, height) there, float maps.
    floats = rng.random((2, 7, 9)).astype(np.float32)
    theirs = normalized_upsampled_maps(torch.from_numpy(floats[:, None]), [(40, 48)] * 2)
    np.testing.assert_array_equal(metrics.score_maps(floats, (48, 40)), np.stack(theirs))
    # Upsampling first, then normalising (the rule this sweep used before) gives other maps.
    up = torch.nn.functional.interpolate(torch.from_numpy(floats[:, None]), size=(48, 40), mode="bilinear")
    lo, hi = up.amin(dim=(2, 3), keepdim=True), up.amax(dim=(2, 3), keepdim=True)
    assert not np.allclose(((up - lo) / (hi - lo))[:, 0].numpy(), metrics.score_maps(floats, (48, 40)), atol=1e-4)
    assert metrics.score_maps(np.zeros((0, 14, 14))).shape == (0, 224, 224)


def _smooth_maps(rng, n: int, grid: tuple[int, int]) -> np.ndarray:
    """Random maps with a few blobs (several components at mid thresholds)."""
    noise = rng.random((n, *grid))
    return np.stack([ndimage.gaussian_filter(m, sigma=1.0) for m in noise]).astype(np.float32)


@pytest.mark.parametrize("size", [(224, 224), (40, 48), (96, 160)])
def test_sweep_largest_box_is_the_localize_jobs_box(size):
    """At every tau, sweep_boxes' largest component is model.boxes.boxes_from_maps' box at
    that threshold (the Parquet primary box): with that box as the GT, IoU 1 exactly.
    (224, 224) and (96, 160) take boxes_from_maps' run path, (40, 48) its pixel path."""
    import torch

    from model.boxes import boxes_from_maps

    rng = np.random.default_rng(size[1])
    maps = _smooth_maps(rng, 12, (14, 14))
    maps[11] = 0.5  # constant: no foreground at any tau, the whole image
    height, width = size
    scores = metrics.score_maps(maps, size)
    for tau in np.union1d(TAUS, [0.375]):  # the grid the train job sweeps, and one off it
        primary = boxes_from_maps(torch.from_numpy(maps[:, None]), [(width, height)] * len(maps), float(tau))
        gt = np.stack([b[:1, :4].numpy().astype(np.float64) for b in primary])  # (n, 1, 4)
        assert np.all(gt[:, 0, 2] > gt[:, 0, 0]) and np.all(gt[:, 0, 3] > gt[:, 0, 1])  # IoU 1 only for equal boxes
        sweep = metrics.sweep_boxes(scores, gt, np.array([tau]))
        np.testing.assert_array_equal(sweep.largest_iou[:, 0], 1.0, err_msg=f"tau {tau}")
    np.testing.assert_array_equal(gt[11, 0], [0, 0, width, height])


def test_gt_boxes_are_scaled_to_the_evaluation_grid_and_padded():
    gt = metrics.gt_boxes_to_eval([[[0, 0, 448, 112]], None], np.array([448, 100]), np.array([224, 50]))
    np.testing.assert_allclose(gt[0, 0], [0, 0, 224, 112])
    assert metrics.box_iou([0, 0, 224, 224], gt[1])[0] == 0.0  # padding never matches


def test_topk_hits():
    hits = metrics.topk_hits(np.array([3, 3, 3]), [[3, 1], [1, 2, 3], None], 2)
    np.testing.assert_array_equal(hits, [True, False, False])


def test_sweep_in_worker_processes_equals_inline():
    rng = np.random.default_rng(3)
    maps = rng.integers(0, 256, (6, 14, 14), dtype=np.uint8)
    gt = _random_gt(rng, 6, 64, 64)
    gt = gt.astype(np.int64)
    inline = metrics.sweep_loc_maps(maps, gt, size=(64, 64), workers=1, chunk=2)
    pooled = metrics.sweep_loc_maps(maps, gt, size=(64, 64), workers=2, chunk=2)
    assert inline.largest_iou.shape == (6, len(metrics.TAUS))
    np.testing.assert_array_equal(inline.largest_iou, pooled.largest_iou)
    np.testing.assert_array_equal(inline.best_iou, pooled.best_iou)


def test_bad_taus_are_rejected():
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.sweep_boxes(np.zeros((1, 4, 4), np.float32), np.zeros((1, 1, 4)), np.array([0.5, 0.2]))


# ----------------------------------------------------------------- wsolevaluation's sweep
#
# The reference below transcribes clovaai/wsolevaluation (inference.py: normalize_scoremap;
# evaluation.py: compute_bboxes_from_scoremaps, calculate_multiple_iou, MaskEvaluator) and
# calls OpenCV, as that code does. cv2 is a test dependency: without it these tests fail.

import cv2  # noqa: E402

WSOL_TAUS = (0.0, 0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95, 0.999)


def cv2_score_map(cam: np.ndarray, size=(224, 224)) -> np.ndarray:
    cam = cv2.resize(np.asarray(cam, np.float32), (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
    if np.isnan(cam).any() or cam.min() == cam.max():
        return np.zeros_like(cam)
    cam -= cam.min()
    cam /= cam.max()
    return cam


def cv2_boxes(scoremap: np.ndarray, threshold: float, multi_contour_eval: bool) -> np.ndarray:
    height, width = scoremap.shape
    scoremap_image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    _, thr = cv2.threshold(src=scoremap_image, thresh=int(threshold * np.max(scoremap_image)),
                           maxval=255, type=cv2.THRESH_BINARY)
    contours = cv2.findContours(image=thr, mode=cv2.RETR_TREE, method=cv2.CHAIN_APPROX_SIMPLE)[0]
    if len(contours) == 0:
        return np.asarray([[0, 0, 0, 0]])
    if not multi_contour_eval:
        contours = [max(contours, key=cv2.contourArea)]
    boxes = []
    for contour in contours:
        x, y, w, h = cv2.boundingRect(contour)
        boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
    return np.asarray(boxes)


def cv2_multiple_iou(box_a, box_b) -> np.ndarray:
    a = np.asarray(box_a)[:, None, :]
    b = np.asarray(box_b)[None, :, :]
    inter = (np.maximum(0, np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1)
             * np.maximum(0, np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1))
    area_a = (a[..., 2] - a[..., 0] + 1) * (a[..., 3] - a[..., 1] + 1)
    area_b = (b[..., 2] - b[..., 0] + 1) * (b[..., 3] - b[..., 1] + 1)
    den = area_a + area_b - inter
    bad = den <= 0
    iou = inter / np.where(bad, 1, den)
    iou[bad] = 0
    return iou


def cv2_ious(scoremap, gt, taus) -> tuple[np.ndarray, np.ndarray]:
    """Per tau: (IoU of the largest contour's box, best IoU over every contour's box)."""
    largest = [cv2_multiple_iou(cv2_boxes(scoremap, t, False), gt).max() for t in taus]
    best = [cv2_multiple_iou(cv2_boxes(scoremap, t, True), gt).max() for t in taus]
    return np.array(largest, np.float32), np.array(best, np.float32)


def blobby_cams(n: int, seed: int, grid: int = 14) -> np.ndarray:
    """Smooth random patch-grid maps: 1-3 Gaussian blobs, 0-2 pits (rings, holes), noise,
    and a few flat or coarsely quantised maps (plateaus, equal-area ties)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    maps = np.zeros((n, grid, grid))
    for sign, count in ((1.0, 3), (-0.6, 2)):
        for _ in range(count):
            cy, cx = rng.uniform(0, grid, (2, n))
            sigma = rng.uniform(0.6, 3.5, n)
            amp = sign * rng.uniform(0.2, 1.0, n) * (rng.random(n) < 0.7)
            d2 = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2
            maps += amp[:, None, None] * np.exp(-d2 / (2 * sigma[:, None, None] ** 2))
    maps += rng.uniform(0, 0.1, maps.shape) * rng.random((n, 1, 1))
    coarse = rng.random(n) < 0.1
    maps[coarse] = np.round(maps[coarse] * 4)
    maps[rng.random(n) < 0.01] = 3.0
    return maps.astype(np.float32)


def _gt_with_reference_box(rng, scores, tau) -> np.ndarray:
    """Two random GT boxes plus OpenCV's largest box at ``tau``: an IoU of exactly 1 then
    says the box itself is the same."""
    n, h, w = scores.shape
    gt = np.zeros((n, 3, 4), dtype=np.int64)
    for i in range(n):
        for j in range(2):
            x0, y0 = rng.integers(0, w - 8), rng.integers(0, h - 8)
            gt[i, j] = [x0, y0, rng.integers(x0 + 4, w), rng.integers(y0 + 4, h)]
        gt[i, 2] = cv2_boxes(scores[i], tau, False)[0]
    return gt


@pytest.mark.parametrize("seed", range(4))
def test_wsol_sweep_equals_opencv_box_for_box_at_several_thresholds(seed):
    """250 maps a seed, 1,000 in all, on the same score maps: no exception allowed."""
    rng = np.random.default_rng(seed)
    scores = metrics.wsol_score_maps(blobby_cams(250, seed))
    gt = _gt_with_reference_box(rng, scores, WSOL_TAUS[seed + 2])
    sweep = metrics.sweep_wsol_boxes(scores, gt, np.array(WSOL_TAUS))
    for i in range(len(scores)):
        largest, best = cv2_ious(scores[i], gt[i], WSOL_TAUS)
        np.testing.assert_array_equal(sweep.largest_iou[i], largest, err_msg=f"map {i}: MaxBoxAcc IoUs")
        np.testing.assert_array_equal(sweep.best_iou[i], best, err_msg=f"map {i}: MaxBoxAccV2 IoUs")


def test_wsol_full_sweep_equals_opencv_on_a_subset():
    rng = np.random.default_rng(11)
    scores = metrics.wsol_score_maps(blobby_cams(12, 11))
    gt = _gt_with_reference_box(rng, scores, 0.3)
    sweep = metrics.sweep_loc_maps(blobby_cams(12, 11), gt)
    assert len(sweep.taus) == 1000 and sweep.taus[1] == 0.001 and sweep.taus[-1] == 0.999
    for i in range(len(scores)):
        largest, best = cv2_ious(scores[i], gt[i], metrics.TAUS)
        np.testing.assert_array_equal(sweep.largest_iou[i], largest)
        np.testing.assert_array_equal(sweep.best_iou[i], best)


def test_wsol_end_to_end_with_opencv_resize_differs_only_at_quantisation_boundaries():
    """OpenCV's resize sums its taps in another order (SIMD), so a score can differ in the
    last float32 bit; then ``score * 255`` may land on the other side of an integer (about
    one map in five has such a pixel). Each differing pixel must lie within 1e-6 of a
    boundary; boxes must be equal wherever the quantised maps are, and the maps whose
    boxes differ are counted as the exceptions."""
    cams = blobby_cams(200, 21)
    ours = metrics.wsol_score_maps(cams)
    rng = np.random.default_rng(21)
    shifted, exceptions = 0, 0
    for i in range(len(cams)):
        ref = cv2_score_map(cams[i])
        np.testing.assert_allclose(ours[i], ref, rtol=0, atol=1e-6)
        q_ours, q_ref = metrics.quantised(ours[i]), (ref * 255).astype(np.uint8)
        gt = _gt_with_reference_box(rng, ref[None], 0.4)
        sweep = metrics.sweep_wsol_boxes(ours[i : i + 1], gt, np.array(WSOL_TAUS))
        largest, best = cv2_ious(ref, gt[0], WSOL_TAUS)
        same = np.array_equal(sweep.largest_iou[0], largest) and np.array_equal(sweep.best_iou[0], best)
        if np.array_equal(q_ours, q_ref):
            assert same, f"map {i}: same quantised map, different boxes"
            continue
        shifted += 1
        edge = ref[q_ours != q_ref].astype(np.float64) * 255
        assert np.all(np.abs(edge - np.round(edge)) <= 255 * 1e-6), f"map {i}: a pixel differs off a boundary"
        exceptions += not same
    print(f"maps with a pixel across a quantisation boundary: {shifted} of {len(cams)}; "
          f"of them with a different box at the {len(WSOL_TAUS)} taus: {exceptions}")
    assert exceptions <= len(cams) // 20


@pytest.mark.parametrize("shape", [(14, 14), (7, 9), (1, 5), (224, 224), (3, 30)])
def test_bicubic_resize_matches_opencv(shape):
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    cams = (rng.random((4, *shape)) * rng.choice([1e-3, 1.0, 255.0], (4, 1, 1))).astype(np.float32)
    rows, cols = metrics.bicubic_matrix(shape[0], 224), metrics.bicubic_matrix(shape[1], 200)
    for cam in cams:
        ref = cv2.resize(cam, (200, 224), interpolation=cv2.INTER_CUBIC)
        ours = rows @ cam @ cols.T
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_wsol_score_maps_normalise_as_wsolevaluation():
    cams = np.random.default_rng(2).random((4, 14, 14)).astype(np.float32)
    cams[1] = 5.0  # constant: zeros
    cams[2, 3, 3] = np.nan  # a NaN: zeros
    out = metrics.wsol_score_maps(cams)
    assert out.dtype == np.float32 and out.shape == (4, 224, 224)
    assert out[0].min() == 0.0 and out[0].max() == 1.0
    assert not out[1].any() and not out[2].any()
    np.testing.assert_allclose(out[3], cv2_score_map(cams[3]), rtol=0, atol=1e-6)


def test_wsol_gt_boxes_truncate_like_resize_bbox():
    # 100 * 224 / 300 = 74.67 -> 74; 299 * 224 / 300 = 223.25 -> 223; 50 * 224 / 60 = 186.67 -> 186
    gt = metrics.wsol_gt_boxes([[[100, 0, 299, 50]], None], np.array([300, 10]), np.array([60, 10]))
    np.testing.assert_array_equal(gt[0, 0], [74, 0, 223, 186])
    assert metrics.wsol_iou(np.array([0, 0, 223, 223]), gt[1])[0] == 0.0  # padding never matches


def test_wsol_iou_by_hand():
    # +1 convention: [0,0,1,1] is 2x2 = 4 px; [1,1,2,2] too; they share pixel (1,1): 1 / 7.
    assert metrics.wsol_iou(np.array([0, 0, 1, 1]), np.array([[1, 1, 2, 2]]))[0] == pytest.approx(1 / 7)
    # The empty-contour box [0,0,0,0] is one pixel: inside a GT box it scores 1 / area.
    assert metrics.wsol_iou(np.array([0, 0, 0, 0]), np.array([[0, 0, 1, 1]]))[0] == pytest.approx(1 / 4)


def _ring_map() -> np.ndarray:
    s = np.zeros((1, 10, 10), dtype=np.float32)
    s[0, 1:4, 1:4] = 1.0  # A: 3x3 at value 255 (uint8)
    s[0, 5:10, 3:9] = 0.6  # B: rows 5-9, cols 3-8 at value 153 ...
    s[0, 6:9, 4:6] = 0.0  # ... with a hole, rows 6-8, cols 4-5
    return s


def test_wsol_hand_case_ring_and_hole():
    s = _ring_map()
    taus = np.array([0.0, 0.5, 0.6, 0.7, 0.999])
    # Thresholds int(tau * 255): 0, 127, 153, 178, 254. B (value 153) is in for t < 153.
    # A: outer contour through pixel centres (1,1)-(3,3): area 2 * 2 = 4; box x=1, y=1, w=h=3
    #    -> [1, 1, 4, 4].
    # B filled is rows 5-9 x cols 3-8: area 4 * 5 = 20 > 4, so it is the largest; its box
    #    x=3, y=5, w=6, h=5 -> [3, 5, min(9, 9), min(10, 9)] = [3, 5, 9, 9].
    # The hole (cols 4-5, rows 6-8) grown by 1: x=3, y=5, w=4, h=5 -> [3, 5, 7, 9].
    gt = np.array([[[3, 5, 7, 9]]])  # the hole's box
    sweep = metrics.sweep_wsol_boxes(s, gt, taus)
    # B's box vs GT: intersection 5 * 5 = 25; areas 7 * 5 = 35 and 25: IoU 25 / 35.
    np.testing.assert_allclose(sweep.largest_iou[0], [25 / 35, 25 / 35, 0, 0, 0], rtol=1e-6)
    # Every contour: the hole's box is the GT box while B is in.
    np.testing.assert_array_equal(sweep.best_iou[0], [1, 1, 0, 0, 0])
    for k, tau in enumerate(taus):  # and OpenCV agrees
        largest, best = cv2_ious(s[0], gt[0], [tau])
        assert (sweep.largest_iou[0, k], sweep.best_iou[0, k]) == (largest[0], best[0])


def test_wsol_hand_case_max_box_acc_and_v2():
    s = np.concatenate([_ring_map(), np.zeros((1, 10, 10), np.float32)])  # the second: empty
    gt = np.array([[[3, 5, 7, 9]], [[0, 0, 1, 1]]])
    sweep = metrics.sweep_wsol_boxes(s, gt)
    # Map 0 hits IoU 0.5 (and 0.7: 25/35 = 0.714) for tau < 0.6 (t < 153), V2 at every
    # delta (IoU 1). Map 1 has no contour: box [0,0,0,0], IoU 1/4 < 0.3: never. So 1 of 2.
    assert metrics.max_box_acc(sweep) == (50.0, 0.0)
    assert metrics.max_box_acc(sweep, 0.7) == (50.0, 0.0)
    v2, by_delta = metrics.max_box_acc_v2(sweep)
    assert v2 == 50.0 and by_delta == {0.3: (50.0, 0.0), 0.5: (50.0, 0.0), 0.7: (50.0, 0.0)}
    # At tau 0.6 and above B is out and A alone misses: BoxAcc 0.
    assert metrics.box_accuracy(sweep.largest_iou, 0.5)[metrics.tau_index(sweep.taus, 0.6)] == 0.0


def test_wsol_equal_areas_pick_the_contour_opencv_lists_first():
    s = np.zeros((1, 8, 8), dtype=np.float32)
    s[0, 1:3, 5:7] = 1.0  # 2x2, area 1, first pixel (1, 5)
    s[0, 4:6, 1:3] = 1.0  # 2x2, area 1, first pixel (4, 1): found later, listed first
    gt = np.array([[[1, 4, 3, 6]]])  # the second one's box: x=1, y=4, w=h=2 -> [1, 4, 3, 6]
    sweep = metrics.sweep_wsol_boxes(s, gt, np.array([0.5]))
    assert sweep.largest_iou[0, 0] == 1.0
    assert cv2_ious(s[0], gt[0], [0.5])[0][0] == 1.0


def test_pxap_matches_mask_evaluator():
    rng = np.random.default_rng(4)
    scores = metrics.wsol_score_maps(blobby_cams(6, 4))
    masks = scores + rng.normal(0, 0.2, scores.shape) > 0.5
    acc = metrics.PxapAccumulator()
    acc.add(scores[:3], masks[:3])
    acc.add(scores[3:], masks[3:])
    # MaskEvaluator, transcribed.
    edges = np.append(np.arange(0, 1, 0.001), [1.0, 2.0, 3.0])
    t_hist = np.histogram(scores[masks], bins=edges)[0].astype(float)
    f_hist = np.histogram(scores[~masks], bins=edges)[0].astype(float)
    tp, fp = t_hist[::-1].cumsum(), f_hist[::-1].cumsum()
    fn = t_hist.sum() - tp
    nonzero = (tp + fp) != 0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision, recall = tp / (tp + fp), tp / (tp + fn)
    auc = (precision[1:] * np.diff(recall))[nonzero[1:]].sum() * 100
    assert acc.value() == pytest.approx(auc, rel=1e-12)


def test_wsol_component_nested_in_a_hole_is_a_contour_but_never_the_largest():
    """A dot inside a ring's hole: its outer contour counts for MaxBoxAccV2 (the tree of
    the map itself runs only where components nest like this); the ring, filled, stays
    the largest."""
    s = np.zeros((1, 12, 12), dtype=np.float32)
    s[0, 1:10, 1:10] = 0.8  # ring: rows/cols 1-9 ...
    s[0, 3:8, 3:8] = 0.0  # ... around a hole, rows/cols 3-7 ...
    s[0, 5, 5] = 1.0  # ... with a dot in it (255; the ring is 204)
    taus = np.array([0.0, 0.5, 0.79, 0.8, 0.9, 0.999])  # t = 0, 127, 201, 204, 229, 254
    gt = np.array([[[5, 5, 6, 6], [1, 1, 10, 10]]])  # the dot's box (x, y, x + 1, y + 1); the ring's
    sweep = metrics.sweep_wsol_boxes(s, gt, taus)
    largest, best = cv2_ious(s[0], gt[0], taus)
    np.testing.assert_array_equal(sweep.largest_iou[0], largest)
    np.testing.assert_array_equal(sweep.best_iou[0], best)
    assert best[1] == 1.0 and largest[1] == 1.0  # t = 127: the dot's box, and the ring's
    assert best[4] == 1.0  # t = 229: the dot alone


def test_fused_levels_equal_quantised_score_maps():
    """``sweep_loc_maps`` quantises in one compiled pass: the same uint8 maps as
    ``quantised(wsol_score_maps(...))``, NaN and constant maps included."""
    from pipeline.evaluation import component_tree

    rng = np.random.default_rng(5)
    cams = np.concatenate([blobby_cams(200, 5), rng.random((20, 7, 9)).astype(np.float32)[:, :7, :7].repeat(2, 1)
                           .repeat(2, 2)[:, :14, :14] * rng.choice([1e-3, 1.0, 1e4], (20, 1, 1)).astype(np.float32)])
    cams[3, 2, 2] = np.nan
    cams[4] = 7.0
    expected = metrics.quantised(metrics.wsol_score_maps(cams))
    fused = component_tree.normalized_levels(metrics._bicubic_resize(cams, metrics.EVAL_SIZE))
    np.testing.assert_array_equal(fused, expected)
    gt = metrics.wsol_gt_boxes([[[10, 20, 150, 180]]] * len(cams), np.full(len(cams), 224), np.full(len(cams), 224))
    via_maps = metrics.sweep_loc_maps(cams, gt, chunk=64)
    direct = metrics.sweep_wsol_boxes(metrics.wsol_score_maps(cams), gt)
    np.testing.assert_array_equal(via_maps.largest_iou, direct.largest_iou)
    np.testing.assert_array_equal(via_maps.best_iou, direct.best_iou)


def test_per_image_gt_boxes_pad_per_chunk_and_give_the_padded_sweep():
    """Issue 14 (6): the list form pads each chunk on its own (an image with many boxes is a
    chunk of its own) and gives exactly the IoUs of the one padded (n, G, 4) array."""
    rng = np.random.default_rng(5)
    n = 40
    loc_maps = rng.integers(0, 256, (n, 14, 14), dtype=np.uint8)
    gt = [[[10.0, 10.0, 120.0, 90.0]] for _ in range(n)]
    gt[3] = None
    xy = rng.uniform(0, 150, (500, 2))
    gt[17] = np.concatenate([xy, xy + 50], axis=1).tolist()
    widths, heights = np.full(n, 224.0), np.full(n, 200.0)
    as_list = metrics.wsol_gt_box_list(gt, widths, heights)
    padded = metrics.wsol_gt_boxes(gt, widths, heights)
    assert padded.shape == (n, 500, 4) and [len(b) for b in as_list].count(500) == 1
    np.testing.assert_array_equal(metrics.pad_gt_boxes(as_list), padded)
    taus = np.linspace(0, 1, 21)
    a = metrics.sweep_loc_maps(loc_maps, padded, taus, chunk=8)
    b = metrics.sweep_loc_maps(loc_maps, as_list, taus, chunk=8)
    np.testing.assert_array_equal(a.largest_iou, b.largest_iou)
    np.testing.assert_array_equal(a.best_iou, b.best_iou)
    assert metrics._chunk_bounds([len(x) for x in as_list], 8, 999) == [
        (0, 8), (8, 16), (16, 17), (17, 18), (18, 26), (26, 34), (34, 40)]
