"""model/boxes.py: maps -> boxes, exact against the official SAT rule written per image."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.measure import label, regionprops

from model.boxes import (
    boxes_from_maps,
    boxes_from_normalized,
    foreground_ratio,
    normalize_on_grid,
    normalized_upsampled_maps,
)

EIGHT = np.ones((3, 3), dtype=bool)
K = 1 / (1 + 1e-5)  # a map with range 1 normalises to values / (1 + 1e-5)


def reference_boxes(norm: np.ndarray, threshold: float, mode: str, max_boxes: int | None) -> np.ndarray:
    """One image, the textbook way: scipy 8-connected labels, skimage regionprops bboxes.

    Components by area, largest first; equal areas keep label (raster) order, which is
    what ``max(regions, key=area)`` picks in the official per-image evaluation.
    """
    height, width = norm.shape
    labels, count = ndimage.label(norm > np.float32(threshold), structure=EIGHT)
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


def official_upsampled(loc_map: torch.Tensor, width: int, height: int) -> np.ndarray:
    """The official SAT rule's map for one image (h x w map), written independently of
    model/boxes.py: torch float32 normalisation on the grid with the 1e-5, then
    F.interpolate bilinear (align_corners=False) to the image."""
    grid = (loc_map - loc_map.min()) / (loc_map.max() - loc_map.min() + 1e-5)
    return F.interpolate(grid[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def official_box(up: np.ndarray, threshold: float) -> tuple[list[int], bool]:
    """The official box of that map: ``>`` (numpy compares a float32 map with the threshold
    as float32, as torch does), skimage 8-connected labels, the largest component by pixel
    count (ties: the lowest label, i.e. the first in raster order, as Python's ``max`` over
    regionprops picks), its regionprops bbox (max exclusive); no pixel above the threshold
    gives the whole image. Also: whether some pixel lies within 1e-6 of the threshold
    (where float rounding may decide)."""
    height, width = up.shape
    near = bool(np.abs(up - np.float32(threshold)).min() <= 1e-6)
    labels = label(up > threshold, connectivity=2)
    regions = regionprops(labels)
    if not regions:
        return [0, 0, width, height], near
    best = max(regions, key=lambda r: r.area)
    min_row, min_col, max_row, max_col = best.bbox
    return [min_col, min_row, max_col, max_row], near


def official_sat_box(loc_map: torch.Tensor, width: int, height: int, threshold: float) -> tuple[list[int], bool]:
    return official_box(official_upsampled(loc_map, width, height), threshold)


def smooth_maps(rng: np.random.Generator, n: int, h: int = 14, w: int = 14) -> torch.Tensor:
    """SAT-like maps: a few Gaussian blobs of random size and weight plus a little noise,
    through a sigmoid; some with a second mode, some nearly flat."""
    yy, xx = np.mgrid[0:h, 0:w]
    maps = np.zeros((n, h, w))
    for b in range(n):
        for _ in range(rng.integers(1, 5)):
            cy, cx, s = rng.uniform(-2, h + 1), rng.uniform(-2, w + 1), rng.uniform(0.8, 5)
            maps[b] += rng.uniform(-0.5, 1.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        maps[b] += rng.normal(0, rng.choice([0.0, 0.02, 0.1]), (h, w))
        maps[b] *= rng.choice([1.0, 4.0, 0.05])
    return torch.from_numpy(1 / (1 + np.exp(-(3 * maps - 1)))).float()[:, None]


OFFICIAL_THRESHOLDS = (0.30, 0.35, 0.40, 0.45)


def test_boxes_equal_the_official_rule_on_1000_smooth_maps():
    """>= 1,000 random smooth 14 x 14 maps, image sizes small (pixel path) to large and
    non-square (line path), at the official thresholds: boxes_from_maps (the fast path) and
    the Parquet's path (normalized_upsampled_maps + boxes_from_normalized) both give the
    official box, except possibly where a pixel lies within 1e-6 of the threshold."""
    rng = np.random.default_rng(2024)
    n_maps, batch = 1000, 100
    compared = identical = near_cases = 0
    mismatches = []
    paths = {"line": 0, "pixel": 0}
    for start in range(0, n_maps, batch):
        maps = smooth_maps(rng, batch)
        sizes = []
        for _ in range(batch):
            kind = rng.random()
            if kind < 0.2:  # small: w + h <= 128, torch's other kernel, the pixel path
                sizes.append((int(rng.integers(8, 64)), int(rng.integers(8, 64))))
            elif kind < 0.95:
                sizes.append((int(rng.integers(64, 320)), int(rng.integers(64, 320))))
            else:  # large and very non-square
                sizes.append((int(rng.integers(400, 1000)), int(rng.integers(100, 700))))
        for w, h in sizes:
            paths["line" if w + h >= 129 else "pixel"] += 1
        norms = normalized_upsampled_maps(maps, sizes)
        ups = [official_upsampled(maps[i, 0], w, h) for i, (w, h) in enumerate(sizes)]
        for threshold in OFFICIAL_THRESHOLDS:
            fast = boxes_from_maps(maps, sizes, threshold, mode="largest")
            parquet = boxes_from_normalized(norms, threshold, mode="largest")
            for i, (w, h) in enumerate(sizes):
                expected, near = official_box(ups[i], threshold)
                near_cases += near
                for path, got in (("fast", fast[i]), ("parquet", parquet[i])):
                    compared += 1
                    if got[0, :4].tolist() == expected:
                        identical += 1
                    else:
                        mismatches.append((start + i, (w, h), threshold, path, got[0, :4].tolist(), expected, near))
    print(f"official SAT rule: {compared} boxes compared ({n_maps} maps x {len(OFFICIAL_THRESHOLDS)} thresholds x "
          f"2 paths; images {paths}), {identical} identical, {len(mismatches)} differ, "
          f"{near_cases} map/threshold pairs with a pixel within 1e-6 of the threshold")
    assert compared == n_maps * len(OFFICIAL_THRESHOLDS) * 2
    assert all(m[-1] for m in mismatches), f"boxes differ away from the threshold: {mismatches[:5]}"
    assert not mismatches, f"boxes differ (near the threshold): {mismatches[:5]}"
    assert paths["line"] >= 700 and paths["pixel"] >= 150  # both paths, many times


def test_official_rule_empty_map_gives_the_whole_image():
    # Constant maps (normalised to zeros) and maps whose every value stays at or below the
    # threshold after normalising (the maximum is 1 / (1 + 1e-5) of the range, never > 1).
    maps = torch.stack([torch.full((1, 14, 14), 0.7), torch.zeros(1, 14, 14), torch.rand(1, 14, 14)])
    sizes = [(500, 375), (40, 30), (333, 1000)]
    for threshold in (0.3, 0.4, 1.0):
        got = boxes_from_maps(maps, sizes, threshold) if threshold < 1 else boxes_from_maps(maps, sizes, 1.0)
        for i, (w, h) in enumerate(sizes):
            if i == 2 and threshold < 1:
                continue  # a real map: boxes inside the image
            np.testing.assert_array_equal(got[i].numpy(), [[0, 0, w, h, 0.0]])
            assert official_sat_box(maps[i, 0], w, h, threshold)[0] == [0, 0, w, h]
    # At the upsampled map's maximum nothing is above it; just below it, the peak is.
    m = torch.rand(1, 1, 14, 14, generator=torch.Generator().manual_seed(4))
    [norm] = normalized_upsampled_maps(m, [(300, 200)])
    top = float(norm.max())
    [box] = boxes_from_maps(m, [(300, 200)], top)
    np.testing.assert_array_equal(box.numpy(), [[0, 0, 300, 200, 0.0]])
    assert official_sat_box(m[0, 0], 300, 200, top)[0] == [0, 0, 300, 200]
    below = float(np.nextafter(np.float32(top), np.float32(0)))
    [box] = boxes_from_maps(m, [(300, 200)], below)
    y, x = np.argwhere(norm == norm.max())[0]
    assert box[0, 0] <= x < box[0, 2] and box[0, 1] <= y < box[0, 3] and box[0, 2] - box[0, 0] < 300
    assert official_sat_box(m[0, 0], 300, 200, below)[0] == box[0, :4].tolist()



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
    # on plateaus at the threshold (thresholds 0 and 1 included; a plateau sits at the
    # threshold when the threshold is one of the grid-normalised values).
    seen = near_cells
    rng = np.random.default_rng(seed)
    for trial in range(14):
        batch = int(rng.integers(1, 5))
        h, w = (14, 14) if trial % 2 else (int(rng.integers(2, 17)), int(rng.integers(2, 17)))
        maps = random_maps(rng, batch, h, w) if trial % 3 == 0 else plateau_maps(rng, batch, h, w)
        sizes = [(int(rng.integers(40, 420)), int(rng.integers(90, 420))) for _ in range(batch)]
        # Image 0's grid-normalised values (float32) and the float32 just below each: with
        # ``>``, pixels exactly at a level are foreground at the latter, background at the former.
        levels = np.unique(normalize_on_grid(maps)[0].numpy())
        levels = np.concatenate([levels, np.nextafter(levels, np.float32(-1))])
        threshold = float(rng.choice(
            [0.0, 0.2, 1 / 3, 0.4, 0.5, 2 / 3, 1.0, float(rng.random())] + rng.choice(levels, 8).tolist()
        ))
        threshold = min(max(threshold, 0.0), 1.0)
        mode, max_boxes = [("largest", None), ("all", None), ("all", 3)][trial % 3]
        got = boxes_from_maps(maps, sizes, threshold, mode=mode, max_boxes=max_boxes)
        norms = normalized_upsampled_maps(maps, sizes)
        for i in range(batch):
            context = f"seed {seed} trial {trial} image {i} grid {h}x{w} size {sizes[i]} thr {threshold} {mode}"
            assert_boxes_equal(got[i], reference_boxes(norms[i], threshold, mode, max_boxes), context)
    assert seen["near"] > 0 and seen["redone"] > 0  # the exact values were needed, and used


def test_speckle_at_the_threshold_stays_exact(near_cells):
    # Grid-normalised values exactly at the threshold (the 1/3 and 2/3 levels here) over
    # whole cells: torch's rounding makes a speckle there (v * w0 + v * w1 is not always v in
    # float32) that no line predicts; that image is labelled from its pixels instead. Same
    # boxes as the reference.
    maps = torch.from_numpy((np.round(np.random.default_rng(18).random((1, 1, 14, 14)) * 3) / 3).astype(np.float32))
    maps = torch.cat([maps, random_maps(np.random.default_rng(3), 2, 14, 14)])  # and two ordinary maps
    sizes = [(384, 399), (300, 200), (451, 333)]
    norms = normalized_upsampled_maps(maps, sizes)
    levels = np.unique(normalize_on_grid(maps)[0].numpy())
    assert len(levels) == 4  # 0, 1/3, 2/3, 1 before normalising
    for threshold in (float(levels[1]), float(levels[2])):
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
    # Normalised on the grid (with the official 1e-5), then upsampled: not the other way round.
    rng = np.random.default_rng(3)
    maps = torch.from_numpy(rng.random((4, 1, 14, 9)).astype(np.float32))
    sizes = [(300, 200), (33, 47), (300, 200), (5, 4)]
    norms = normalized_upsampled_maps(maps, sizes)
    for i, (width, height) in enumerate(sizes):
        m = maps[i:i + 1]
        grid = (m - m.min()) / (m.max() - m.min() + 1e-5)
        expected = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
        assert norms[i].dtype == np.float32 and norms[i].shape == (height, width)
        np.testing.assert_array_equal(norms[i], expected)
        assert norms[i].min() >= 0.0 and norms[i].max() < 1.0
        up = F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        post = ((up - up.min()) / (up.max() - up.min())).numpy()
        assert np.abs(norms[i] - post).max() > 1e-4  # the other order is another map


def test_bilinear_upsampling_written_out():
    # align_corners=False, 1 x 2 -> 1 x 4: source x = (x + 0.5) / 2 - 0.5, clamped at the edges.
    # The grid normalises to [0, c], c = 0.4 / (0.4 + 1e-5).
    c = 0.4 / (0.4 + 1e-5)
    norm = normalized_upsampled_maps(torch.tensor([[[[0.2, 0.6]]]]), [(4, 1)])[0]
    np.testing.assert_allclose(norm, [[0.0, 0.25 * c, 0.75 * c, c]], atol=1e-7)
    [box] = boxes_from_maps(torch.tensor([[[[0.2, 0.6]]]]), [(4, 1)], threshold=0.5)
    np.testing.assert_allclose(box.numpy(), [[2, 0, 4, 1, 0.875 * c]], atol=1e-7)


# ---------------------------------------------------------------- hand-computed small cases


def test_hand_computed_4x4_at_4x4():
    loc_map = torch.tensor([[[[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]]])
    [box] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.4)
    np.testing.assert_allclose(box.numpy(), [[1, 1, 3, 3, 0.875 * K]], atol=1e-7)  # x0 y0 x1 y1 (exclusive), mean
    [box] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.6)  # the 0.5 drops out; same bbox
    np.testing.assert_allclose(box.numpy(), [[1, 1, 3, 3, K]], atol=1e-7)
    # Values are relative to the map's range: the same shape scaled into (0.2, 0.3) is the
    # same box (its score divided by 0.1 + 1e-5 instead of 1 + 1e-5).
    [box] = boxes_from_maps(0.2 + loc_map / 10, [(4, 4)], threshold=0.4)
    np.testing.assert_allclose(box.numpy(), [[1, 1, 3, 3, 0.875 * 0.1 / (0.1 + 1e-5)]], atol=1e-6)
    # The threshold is strict: 0.5 / (1 + 1e-5) = 0.499995, so at 0.499994 the 0.5 cell
    # counts and at 0.499996 it does not (a score of 1 + 1 + 1 over 3 cells, times K).
    [box] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.499994)
    np.testing.assert_allclose(box.numpy(), [[1, 1, 3, 3, 0.875 * K]], atol=1e-7)
    [box] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.499996)
    np.testing.assert_allclose(box.numpy(), [[1, 1, 3, 3, K]], atol=1e-7)


def test_hand_computed_components_largest_and_all():
    loc_map = torch.tensor([[[[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.8], [0.0, 0.0, 0.9, 0.0]]]])
    [largest] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.5)
    np.testing.assert_allclose(largest.numpy(), [[2, 2, 4, 4, 0.9 * K]], atol=1e-7)
    [every] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.5, mode="all")
    np.testing.assert_allclose(every.numpy(), [[2, 2, 4, 4, 0.9 * K], [0, 0, 1, 1, K]], atol=1e-7)
    [one] = boxes_from_maps(loc_map, [(4, 4)], threshold=0.5, mode="all", max_boxes=1)
    np.testing.assert_allclose(one.numpy(), [[2, 2, 4, 4, 0.9 * K]], atol=1e-7)


def test_diagonal_pixels_are_one_component():
    loc_map = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]]])
    [every] = boxes_from_maps(loc_map, [(3, 3)], threshold=0.5, mode="all")
    np.testing.assert_allclose(every.numpy(), [[0, 0, 2, 2, K]], atol=1e-7)  # 8-connected, not 4


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
    # > 0: everything but the minimum (0.1 at the top left); still one 8-connected component.
    [box] = boxes_from_maps(loc_map, [(3, 2)], threshold=0.0)
    mean = (0.8 + 0.3 + 0.2 + 0.1 + 0.7) / 5 / (0.8 + 1e-5)
    np.testing.assert_allclose(box.numpy(), [[0, 0, 3, 2, mean]], atol=1e-6)
    # > 1: nothing (the maximum normalises to 0.8 / (0.8 + 1e-5) < 1): the whole image.
    [box] = boxes_from_maps(loc_map, [(3, 2)], threshold=1.0)
    np.testing.assert_array_equal(box.numpy(), [[0, 0, 3, 2, 0.0]])
    # Just below the maximum's normalised value: only the maximum.
    [box] = boxes_from_maps(loc_map, [(3, 2)], threshold=0.9999)
    np.testing.assert_allclose(box.numpy(), [[1, 0, 2, 1, 0.8 / (0.8 + 1e-5)]], atol=1e-6)


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
    np.testing.assert_allclose(boxes[1].numpy(), [[0, 0, 1, 1, K]], atol=1e-7)


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
    # The share of pixels the boxes use: strictly above the threshold (0.4 itself is not).
    norm = np.array([[0.0, 0.5], [0.4, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(foreground_ratio([norm, np.zeros((3, 3), np.float32)], 0.4), [0.5, 0.0])
    np.testing.assert_allclose(foreground_ratio([norm], 0.39), [0.75])
    # On the maps boxes_from_maps thresholds: the box's pixels are at most that share.
    maps = random_maps(np.random.default_rng(2), 3, 14, 14)
    sizes = [(300, 200), (40, 50), (129, 64)]
    norms = normalized_upsampled_maps(maps, sizes)
    ratio = foreground_ratio(norms, 0.4)
    for norm, r, (w, h) in zip(norms, ratio, sizes):
        assert r == pytest.approx((norm > np.float32(0.4)).sum() / (w * h))


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
