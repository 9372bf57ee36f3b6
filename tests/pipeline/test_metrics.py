"""pipeline/metrics.py: hand-computed cases, and the vectorised sweep against a brute force."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from pipeline import metrics
from pipeline.metrics import BoxSweep, TAUS

EIGHT = np.ones((3, 3), dtype=bool)


# ----------------------------------------------------------------- brute-force reference


def _ref_iou(box, gt) -> float:
    iw = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
    ih = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
    inter = iw * ih
    union = (box[2] - box[0]) * (box[3] - box[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1]) - inter
    return inter / union if union > 0 else 0.0


def brute_force_sweep(scores: np.ndarray, gt_eval: np.ndarray, taus: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Plain loops: one ndimage.label per image per tau. Returns (largest_iou, best_iou)."""
    n, h, w = scores.shape
    largest = np.zeros((n, len(taus)))
    best = np.zeros((n, len(taus)))
    for i in range(n):
        for k, tau in enumerate(taus):
            labels, count = ndimage.label(scores[i] >= tau, structure=EIGHT)
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
    maps[0] = 9  # a flat map: empty foreground above tau 0, the whole image as box
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
    # tau 0: everything is foreground, the box is the whole image: IoU 9/100.
    assert sweep.largest_iou[0, at[0.0]] == pytest.approx(0.09)
    assert sweep.best_iou[0, at[0.0]] == pytest.approx(0.09)
    # tau 0.5: both blobs; B is larger (IoU 0 with A's box) but A is a component (IoU 1).
    assert sweep.largest_iou[0, at[0.5]] == 0.0
    assert sweep.best_iou[0, at[0.5]] == 1.0
    # tau 0.6 still has B (score >= tau); tau 0.61 only A.
    assert sweep.largest_iou[0, at[0.6]] == 0.0
    assert sweep.largest_iou[0, at[0.61]] == 1.0
    assert sweep.largest_iou[0, at[1.0]] == 1.0
    value, tau = metrics.max_box_acc(sweep)
    assert (value, tau) == (100.0, 0.61)
    v2, by_delta = metrics.max_box_acc_v2(sweep)
    assert v2 == 100.0
    assert by_delta[0.3] == (100.0, 0.01)  # each delta its own best tau: the first that reaches it


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
    labels, count = ndimage.label(s3[0] >= 0.5, structure=EIGHT)
    assert count == 2 and np.bincount(labels.ravel())[1:].tolist() == [9, 9]


def test_flat_map_gives_the_whole_image_and_best_gt_box_counts():
    scores = metrics.score_maps(np.full((1, 14, 14), 77, dtype=np.uint8))
    assert not scores.any()
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


def test_quantise_equals_searchsorted_including_grid_values():
    rng = np.random.default_rng(0)
    s = np.concatenate([rng.random(20000), TAUS, np.nextafter(TAUS, -1), [0.0, 1.0]]).astype(np.float32)
    s = np.clip(s, 0, 1)
    np.testing.assert_array_equal(metrics.quantise(s), np.searchsorted(TAUS, s, side="right"))
    taus = np.union1d(TAUS, [0.333, 0.777])
    np.testing.assert_array_equal(metrics.quantise(s, taus), np.searchsorted(taus, s, side="right"))


def test_score_maps_match_the_pipelines_upsampling():
    import torch

    from model.boxes import normalized_upsampled_maps

    maps = np.random.default_rng(1).integers(0, 256, (3, 14, 14), dtype=np.uint8)
    ours = metrics.score_maps(maps)
    theirs = normalized_upsampled_maps(torch.from_numpy(maps[:, None].astype(np.float32)), [(224, 224)] * 3)
    np.testing.assert_allclose(ours, np.stack(theirs), atol=1e-5)
    assert ours.min() == 0.0 and ours.max() == 1.0


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
    inline = metrics.sweep_loc_maps(maps, gt, size=(64, 64), workers=1, chunk=2)
    pooled = metrics.sweep_loc_maps(maps, gt, size=(64, 64), workers=2, chunk=2)
    np.testing.assert_array_equal(inline.largest_iou, pooled.largest_iou)
    np.testing.assert_array_equal(inline.best_iou, pooled.best_iou)


def test_bad_taus_are_rejected():
    with pytest.raises(ValueError, match="strictly increasing"):
        metrics.sweep_boxes(np.zeros((1, 4, 4), np.float32), np.zeros((1, 1, 4)), np.array([0.5, 0.2]))
