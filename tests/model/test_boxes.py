"""model/boxes.py: maps -> boxes, exact against a per-image reference labelling."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.measure import regionprops

from model.boxes import boxes_from_maps, boxes_from_normalized, foreground_ratio, normalized_upsampled_maps

EIGHT = np.ones((3, 3), dtype=bool)


def reference_boxes(norm: np.ndarray, threshold: float, mode: str, max_boxes: int | None) -> np.ndarray:
    """One image, the textbook way: scipy 8-connected labels, skimage regionprops bboxes.

    Components by area, largest first; equal areas keep label (raster) order, which is
    what ``max(regions, key=area)`` picks in the official per-image evaluation.
    """
    height, width = norm.shape
    labels, count = ndimage.label(norm >= threshold, structure=EIGHT)
    regions = regionprops(labels, intensity_image=norm)
    if count == 0:
        return np.array([[0, 0, width, height, 0]], dtype=np.float32)
    regions = sorted(regions, key=lambda r: -r.area)  # stable: ties stay in label order
    limit = 1 if mode == "largest" else max_boxes
    regions = regions[:limit] if limit else regions
    # regionprops bbox: (min_row, min_col, max_row, max_col), max exclusive
    return np.array(
        [[r.bbox[1], r.bbox[0], r.bbox[3], r.bbox[2], r.intensity_mean] for r in regions], dtype=np.float32
    )


def assert_boxes_equal(got: torch.Tensor, expected: np.ndarray, context: str = "") -> None:
    got = got.numpy()
    assert got.dtype == np.float32
    assert got.shape == expected.shape, f"{context}: {got.shape} boxes vs {expected.shape}\n{got}\n{expected}"
    np.testing.assert_array_equal(got[:, :4], expected[:, :4], err_msg=context)
    np.testing.assert_allclose(got[:, 4], expected[:, 4], rtol=1e-5, atol=1e-6, err_msg=context)


def random_maps(rng: np.random.Generator, batch: int, h: int, w: int) -> torch.Tensor:
    """Noise (many small components) or a few smooth blobs (SAT-like maps), sigmoid range."""
    if rng.random() < 0.5:
        maps = rng.random((batch, 1, h, w))
    else:
        yy, xx = np.mgrid[0:h, 0:w]
        maps = np.zeros((batch, 1, h, w))
        for b in range(batch):
            for _ in range(rng.integers(1, 4)):
                cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.7, 3.5)
                maps[b, 0] += rng.uniform(0.3, 1) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        maps = 1 / (1 + np.exp(-(4 * maps - 2)))
    return torch.from_numpy(maps.astype(np.float32))


def random_sizes(rng: np.random.Generator, batch: int) -> list[tuple[int, int]]:
    pool = [(int(rng.integers(1, 301)), int(rng.integers(1, 301))) for _ in range(batch)]
    if batch > 1 and rng.random() < 0.5:  # some images of the same size share one interpolate call
        pool[-1] = pool[0]
    if rng.random() < 0.2:
        pool[0] = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))  # tiny images, smaller than the grid
    return pool


# ---------------------------------------------------------------- exact against the reference


def test_boxes_equal_reference_on_random_maps():
    rng = np.random.default_rng(20240611)
    checked = 0
    n_boxes = []
    for trial in range(110):
        batch = int(rng.integers(1, 6))
        h, w = int(rng.integers(3, 17)), int(rng.integers(3, 17))
        maps = random_maps(rng, batch, h, w)
        sizes = random_sizes(rng, batch)
        threshold = float(rng.choice([0.0, 0.05, 0.2, 0.3, 0.4, 0.5, 0.65, 0.8, 0.95, 1.0]))
        mode = "largest" if trial % 2 else "all"
        max_boxes = None if mode == "largest" else [None, 1, 2, 5][(trial // 2) % 4]
        got = boxes_from_maps(maps, sizes, threshold, mode=mode, max_boxes=max_boxes)
        norms = normalized_upsampled_maps(maps, sizes)
        assert len(got) == batch
        for i in range(batch):
            context = f"trial {trial} image {i} grid {h}x{w} size {sizes[i]} thr {threshold} {mode} {max_boxes}"
            assert_boxes_equal(got[i], reference_boxes(norms[i], threshold, mode, max_boxes), context)
            n_boxes.append(len(got[i]))
            checked += 1
    assert checked >= 300
    # The random set really exercised several components per image and max_boxes cuts.
    assert max(n_boxes) > 5 and sum(n > 1 for n in n_boxes) > 30


@pytest.mark.parametrize("mode, max_boxes", [("largest", None), ("all", None), ("all", 3)])
def test_boxes_equal_reference_on_odd_even_non_square_sizes(mode, max_boxes):
    rng = np.random.default_rng(7)
    sizes = [(1, 1), (1, 300), (300, 1), (2, 3), (3, 2), (15, 16), (16, 15), (299, 300), (300, 299), (64, 48)]
    for grid in [(3, 3), (14, 14), (16, 5), (4, 13)]:
        maps = random_maps(rng, len(sizes), *grid)
        got = boxes_from_maps(maps, sizes, 0.35, mode=mode, max_boxes=max_boxes)
        norms = normalized_upsampled_maps(maps, sizes)
        for i, size in enumerate(sizes):
            assert norms[i].shape == (size[1], size[0])  # (height, width) from (width, height)
            assert_boxes_equal(got[i], reference_boxes(norms[i], 0.35, mode, max_boxes), f"{grid} {size}")


def test_labelling_equals_reference_on_random_masks():
    # The labelling half alone, on binary masks of every density: spirals, diagonal chains
    # and many tiny components, in batches whose images have different heights.
    rng = np.random.default_rng(11)
    for trial in range(60):
        batch = int(rng.integers(1, 5))
        shapes = [(int(rng.integers(1, 60)), int(rng.integers(1, 60))) for _ in range(batch)]
        masks = [(rng.random(shape) < rng.uniform(0.05, 0.9)).astype(np.float32) for shape in shapes]
        for mode, max_boxes in (("largest", None), ("all", None), ("all", 4)):
            got = boxes_from_normalized(masks, 0.5, mode=mode, max_boxes=max_boxes)
            for i, m in enumerate(masks):
                assert_boxes_equal(got[i], reference_boxes(m, 0.5, mode, max_boxes), f"trial {trial} image {i}")


def plateau_maps(rng: np.random.Generator, batch: int, h: int, w: int) -> torch.Tensor:
    """Maps with stretches exactly at one value (a few levels, or saturated at the max): on
    those, torch's float32 rounding decides the pixels at the threshold."""
    if rng.random() < 0.5:
        maps = np.round(rng.random((batch, 1, h, w)) * 3) / 3
    else:
        maps = np.minimum(rng.random((batch, 1, h, w)) * 1.5, 1.0)
    return torch.from_numpy(maps.astype(np.float32))


@pytest.fixture
def near_cells(monkeypatch):
    """What the line path settled on torch's exact values: near cells, cells whose pixels
    changed, images sent to the pixel path."""
    import model.upsampled_runs as upsampled_runs

    seen = {"near": 0, "redone": 0, "pixel_fallback": 0}
    resolve = upsampled_runs._resolve_near

    def counting(*args):
        e, rising, changed, bad = resolve(*args)
        seen["near"] += len(e)
        seen["redone"] += int(changed.sum())
        seen["pixel_fallback"] += int(bad.sum())
        return e, rising, changed, bad

    monkeypatch.setattr(upsampled_runs, "_resolve_near", counting)
    return seen


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_large_images_equal_reference(seed, near_cells):
    # Where torch upsamples with its generic kernel (width + height > 128), boxes_from_maps
    # never makes the full-size maps: it follows the upsampling's lines and computes torch's
    # exact values only next to the threshold. Same boxes as the per-image reference, also
    # on plateaus at the threshold (thresholds 0 and 1 included).
    seen = near_cells
    rng = np.random.default_rng(seed)
    for trial in range(14):
        batch = int(rng.integers(1, 5))
        h, w = (14, 14) if trial % 2 else (int(rng.integers(2, 17)), int(rng.integers(2, 17)))
        maps = random_maps(rng, batch, h, w) if trial % 3 == 0 else plateau_maps(rng, batch, h, w)
        sizes = [(int(rng.integers(40, 420)), int(rng.integers(90, 420))) for _ in range(batch)]
        threshold = float(rng.choice([0.0, 0.2, 1 / 3, 0.4, 0.5, 2 / 3, 1.0, float(rng.random())]))
        mode, max_boxes = [("largest", None), ("all", None), ("all", 3)][trial % 3]
        got = boxes_from_maps(maps, sizes, threshold, mode=mode, max_boxes=max_boxes)
        norms = normalized_upsampled_maps(maps, sizes)
        for i in range(batch):
            context = f"seed {seed} trial {trial} image {i} grid {h}x{w} size {sizes[i]} thr {threshold} {mode}"
            assert_boxes_equal(got[i], reference_boxes(norms[i], threshold, mode, max_boxes), context)
    assert seen["near"] > 0 and seen["redone"] > 0  # the exact values were needed, and used


def test_speckle_at_the_threshold_stays_exact(near_cells):
    # Source values exactly at the threshold (1/3 here) over whole cells: torch's rounding
    # makes a speckle there (1/3 * w0 + 1/3 * w1 is not always 1/3 in float32) that no line
    # predicts; that image is labelled from its pixels instead. Same boxes as the reference.
    maps = torch.from_numpy((np.round(np.random.default_rng(18).random((1, 1, 14, 14)) * 3) / 3).astype(np.float32))
    maps = torch.cat([maps, random_maps(np.random.default_rng(3), 2, 14, 14)])  # and two ordinary maps
    sizes = [(384, 399), (300, 200), (451, 333)]
    norms = normalized_upsampled_maps(maps, sizes)
    for threshold in (1 / 3, 2 / 3):
        got = boxes_from_maps(maps, sizes, threshold, mode="all")
        for i in range(3):
            assert_boxes_equal(got[i], reference_boxes(norms[i], threshold, "all", None), f"thr {threshold} image {i}")
    assert near_cells["pixel_fallback"] > 0


def test_large_images_many_thresholds_equal_pixel_path():
    # The same maps at many thresholds, against the labelling of the full-size maps.
    rng = np.random.default_rng(5)
    maps = torch.cat([random_maps(rng, 3, 14, 14), plateau_maps(rng, 3, 14, 14)])
    sizes = [(333, 451), (129, 1), (1, 300), (700, 90), (64, 65), (500, 375)]
    norms = normalized_upsampled_maps(maps, sizes)
    for threshold in np.linspace(0, 1, 21).tolist() + [1 / 3, 2 / 3]:
        got = boxes_from_maps(maps, sizes, threshold, mode="all")
        for i, expected in enumerate(boxes_from_normalized(norms, threshold, mode="all")):
            torch.testing.assert_close(got[i][:, :4], expected[:, :4], rtol=0, atol=0)
            torch.testing.assert_close(got[i][:, 4], expected[:, 4], rtol=1e-5, atol=1e-6)


def test_upsampling_emulation_is_bit_exact():
    # boxes_from_maps computes torch's upsampled values itself where they decide a pixel: bit
    # for bit, or a box could move by a pixel. If a torch upgrade changes its kernel, this
    # fails and boxes_from_maps quietly takes the (slower) full-size path.
    from model.upsampled_runs import emulation_matches_torch, upsample_exact

    assert emulation_matches_torch()
    rng = np.random.default_rng(9)
    for _ in range(40):
        h, w = (int(v) for v in rng.integers(1, 20, 2))
        height = int(rng.integers(1, 600))
        width = int(rng.integers(max(1, 129 - height), 600))
        m = (rng.random((h, w)) * rng.choice([1, 30, 1e-3]) - rng.random()).astype(np.float32)
        ref = F.interpolate(torch.from_numpy(m)[None, None], size=(height, width), mode="bilinear", align_corners=False)
        np.testing.assert_array_equal(upsample_exact(m, height, width), ref[0, 0].numpy(), err_msg=f"{(h, w)} {(height, width)}")


def test_normalized_upsampled_maps_by_hand():
    rng = np.random.default_rng(3)
    maps = torch.from_numpy(rng.random((4, 1, 14, 9)).astype(np.float32))
    sizes = [(300, 200), (33, 47), (300, 200), (5, 4)]
    norms = normalized_upsampled_maps(maps, sizes)
    for i, (width, height) in enumerate(sizes):
        up = F.interpolate(maps[i:i + 1], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        expected = ((up - up.min()) / (up.max() - up.min())).numpy()
        assert norms[i].dtype == np.float32 and norms[i].shape == (height, width)
        np.testing.assert_allclose(norms[i], expected, rtol=0, atol=2e-6)
        assert norms[i].min() == 0.0 and norms[i].max() == pytest.approx(1.0, abs=1e-6)


def test_bilinear_upsampling_written_out():
    # align_corners=False, 1 x 2 -> 1 x 4: source x = (x + 0.5) / 2 - 0.5, clamped at the edges.
    norm = normalized_upsampled_maps(torch.tensor([[[[0.2, 0.6]]]]), [(4, 1)])[0]
    np.testing.assert_allclose(norm, [[0.0, 0.25, 0.75, 1.0]], atol=1e-6)
    [box] = boxes_from_maps(torch.tensor([[[[0.2, 0.6]]]]), [(4, 1)], threshold=0.5)
    np.testing.assert_allclose(box.numpy(), [[2, 0, 4, 1, 0.875]], atol=1e-6)


# ---------------------------------------------------------------- hand-computed small cases


def test_hand_computed_4x4_at_4x4():
    loc_map = torch.tensor([[[[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    [box] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.4)
    np.testing.assert_allclose(box.numpy(), [[1, 1, 3, 3, 0.875]], atol=1e-6)  # x0 y0 x1 y1 (exclusive), mean
    [box] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.6)  # the 0.5 drops out; same bbox
    np.testing.assert_allclose(box.numpy(), [[1, 1, 3, 3, 1.0]], atol=1e-6)
    # Values are relative to the map's range: the same shape scaled into (0.2, 0.3) is the same box.
    [box] = boxes_from_maps(0.2 + loc_map / 10, [(4, 4)], threshold=0.4)
    np.testing.assert_allclose(box.numpy(), [[1, 1, 3, 3, 0.875]], atol=1e-5)


def test_hand_computed_components_largest_and_all():
    loc_map = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.8], [0.0, 0.0, 0.9, 0.0]]]])
    [largest] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.5)
    np.testing.assert_allclose(largest.numpy(), [[2, 2, 4, 4, 0.9]], atol=1e-6)
    [every] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.5, mode="all")
    np.testing.assert_allclose(every.numpy(), [[2, 2, 4, 4, 0.9], [0, 0, 1, 1, 1.0]], atol=1e-6)
    [one] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.5, mode="all", max_boxes=1)
    np.testing.assert_allclose(one.numpy(), [[2, 2, 4, 4, 0.9]], atol=1e-6)


def test_diagonal_pixels_are_one_component():
    loc_map = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]])
    [every] = boxes_from_maps(loc_map, [(3, 3)], threshold=0.5, mode="all")
    np.testing.assert_allclose(every.numpy(), [[0, 0, 2, 2, 1.0]], atol=1e-6)  # 8-connected, not 4


def test_equal_areas_keep_raster_order():
    # Two components of 8 pixels. B's first pixel (0, 1) comes before A's (0, 7) in raster
    # order, but A's bbox starts further left (x0 = 0): the official max-by-area picks B.
    mask = np.zeros((8, 8), dtype=np.float32)
    for y in range(8):  # A: the anti-diagonal y + x = 7
        mask[y, 7 - y] = 1
    for y, x in [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1), (1, 2), (2, 1), (3, 1)]:  # B: a corner above it
        mask[y, x] = 1
    labels, count = ndimage.label(mask, structure=EIGHT)
    assert count == 2 and np.bincount(labels.ravel())[1:].tolist() == [8, 8]
    [largest] = boxes_from_normalized([mask], 0.5, mode="largest")
    np.testing.assert_allclose(largest.numpy(), [[1, 0, 5, 4, 1.0]])
    [every] = boxes_from_normalized([mask], 0.5, mode="all")
    np.testing.assert_allclose(every.numpy(), [[1, 0, 5, 4, 1.0], [0, 0, 8, 8, 1.0]])
    assert_boxes_equal(every, reference_boxes(mask, 0.5, "all", None))


def test_images_side_by_side_do_not_merge():
    # Two images whose foreground touches the shared edge: each keeps its own box.
    a = np.zeros((5, 4), dtype=np.float32)
    a[:, 3] = 1  # right edge of image 0
    b = np.zeros((3, 6), dtype=np.float32)
    b[0, 0] = 1  # top-left pixel of image 1, diagonal to a[1, 3] were they adjacent
    boxes = boxes_from_normalized([a, b], 0.5, mode="all")
    np.testing.assert_allclose(boxes[0].numpy(), [[3, 0, 4, 5, 1.0]])
    np.testing.assert_allclose(boxes[1].numpy(), [[0, 0, 1, 1, 1.0]])


def test_threshold_zero_and_one():
    loc_map = torch.tensor([[[[0.1, 0.9, 0.4], [0.3, 0.2, 0.8]]]])
    [box] = boxes_from_maps(loc_map, [(3, 2)], threshold=0.0)  # everything is foreground
    mean = float(((loc_map - 0.1) / 0.8).mean())
    np.testing.assert_allclose(box.numpy(), [[0, 0, 3, 2, mean]], atol=1e-6)
    [box] = boxes_from_maps(loc_map, [(3, 2)], threshold=1.0)  # only the maximum
    np.testing.assert_allclose(box.numpy(), [[1, 0, 2, 1, 1.0]], atol=1e-6)


def test_empty_and_constant_maps_give_the_whole_image():
    maps = torch.stack([torch.full((1, 14, 14), 0.5), torch.zeros(1, 14, 14), torch.ones(1, 14, 14)])
    sizes = [(300, 200), (17, 31), (1, 1)]
    for mode in ("largest", "all"):
        for threshold in (0.0, 0.4, 1.0):
            boxes = boxes_from_maps(maps, sizes, threshold, mode=mode)
            for box, (w, h) in zip(boxes, sizes):
                assert box.shape == (1, 5)
                np.testing.assert_array_equal(box[0, :4].numpy(), [0, 0, w, h])
    norms = normalized_upsampled_maps(maps, sizes)
    assert all(np.all(n == 0) for n in norms)  # no evidence anywhere: all zeros, not NaN


def test_mixed_batch_with_an_empty_map():
    maps = torch.zeros(2, 1, 4, 4)
    maps[1, 0, 0, 0] = 1.0
    boxes = boxes_from_maps(maps, [(8, 8), (4, 4)], 0.5, mode="all")
    np.testing.assert_array_equal(boxes[0].numpy(), [[0, 0, 8, 8, 0]])
    np.testing.assert_allclose(boxes[1].numpy(), [[0, 0, 1, 1, 1.0]])


def test_input_dtypes_and_grad_do_not_matter():
    rng = np.random.default_rng(5)
    maps = torch.from_numpy(rng.random((3, 1, 14, 14)).astype(np.float32)).to(torch.bfloat16).float()
    sizes = [(100, 80), (64, 64), (37, 90)]
    expected = boxes_from_maps(maps, sizes, 0.4, mode="all")
    for variant in (maps.to(torch.bfloat16), maps.double(), maps.clone().requires_grad_(True),
                    maps.transpose(2, 3).contiguous().transpose(2, 3)):
        for got, exp in zip(boxes_from_maps(variant, sizes, 0.4, mode="all"), expected):
            torch.testing.assert_close(got, exp)


def test_foreground_ratio():
    norm = np.array([[0.0, 0.5], [0.4, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(foreground_ratio([norm, np.zeros((3, 3), np.float32)], 0.4), [0.75, 0.0])


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_maps(bad):
    maps = torch.rand(3, 1, 4, 4)
    maps[1, 0, 2, 2] = bad
    with pytest.raises(ValueError, match=r"NaN or inf \(images \[1\]\)"):
        boxes_from_maps(maps, [(4, 4)] * 3, 0.4)
    with pytest.raises(ValueError, match="NaN"):
        normalized_upsampled_maps(maps, [(4, 4)] * 3)


def test_no_maps_no_boxes():
    assert boxes_from_normalized([], 0.4) == []


@pytest.mark.parametrize("size", [(0, 10), (10, 0), (0, 0), (-5, 10), (10,)])
def test_zero_size_image(size):
    with pytest.raises(ValueError, match="image 1 has size"):
        boxes_from_maps(torch.rand(2, 1, 4, 4), [(4, 4), size], 0.4)


@pytest.mark.parametrize(
    "maps, message",
    [
        (torch.rand(1, 4, 4), "B x 1 x h x w tensor, got \\(1, 4, 4\\)"),
        (torch.rand(1, 2, 4, 4), "B x 1 x h x w tensor, got \\(1, 2, 4, 4\\)"),
        (torch.rand(0, 1, 4, 4), "empty"),
        (np.random.rand(1, 1, 4, 4), "B x 1 x h x w tensor, got ndarray"),
    ],
)
def test_wrong_shapes(maps, message):
    with pytest.raises(ValueError, match=message):
        boxes_from_maps(maps, [(4, 4)] * max(len(maps), 1), 0.4)


def test_size_count_mismatch_and_bad_options():
    maps = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match="2 maps but 3 image sizes"):
        boxes_from_maps(maps, [(4, 4)] * 3, 0.4)
    with pytest.raises(ValueError, match="mode must be one of"):
        boxes_from_maps(maps, [(4, 4)] * 2, 0.4, mode="biggest")
    with pytest.raises(ValueError, match="threshold .* must be in \\[0, 1\\]"):
        boxes_from_maps(maps, [(4, 4)] * 2, 1.5)
    with pytest.raises(ValueError, match="max_boxes must be >= 1"):
        boxes_from_maps(maps, [(4, 4)] * 2, 0.4, mode="all", max_boxes=0)
