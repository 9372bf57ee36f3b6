"""pipeline/evaluation/sat_protocol.py: the official SAT evaluator's frame, box rule, GT mapping and IoU.

The maps are 14 x 14 blocks of 255 on 0: bilinear to 224 (16 px a cell, half-pixel
centres), a pixel at offset j = 0..15 into the 16-px stretch where a 0 cell meets a 1
cell has value (j + 0.5) / 16, which is > 0.4 from j = 6 on (6.5 / 16 = 0.406; 5.5 / 16 =
0.344, no value near 0.4 either way). So the block of cells [a, b) gives the box
x0 = 16 a - 2, x1 = 16 b + 2 (exclusive), clipped to [0, 224]; same for y.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.preprocess import ResizeCrop
from pipeline.evaluation.sat_protocol import OFFICIAL_FRAME, best_ious, gt_boxes_to_crop, iou_plus_one, official_boxes


def block(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((14, 14), dtype=np.uint8)
    m[y0:y1, x0:x1] = 255
    return m


def test_official_boxes_of_blocks_by_hand():
    maps = np.stack([
        block(1, 1, 9, 9),  # [16 - 2, 16 - 2, 144 + 2, 144 + 2]
        block(0, 0, 1, 1),  # on the border: [0, 0, 16 + 2, 16 + 2]
        block(10, 2, 14, 5),  # x to the right edge: [160 - 2, 32 - 2, 224, 80 + 2]
        np.full((14, 14), 7, dtype=np.uint8),  # constant: empty -> the whole frame
    ])
    boxes = official_boxes(maps, 224, 0.4)
    assert boxes.tolist() == [
        [14, 14, 146, 146],
        [0, 0, 18, 18],
        [158, 30, 224, 82],
        [0, 0, 224, 224],
    ]
    # The rule normalises each map: a scaled and shifted map gives the same box.
    scaled = maps[:1].astype(np.float32) / 255 * 0.5 + 0.3
    assert official_boxes(scaled, 224, 0.4).tolist() == [[14, 14, 146, 146]]


def test_official_boxes_keep_the_largest_8_connected_component():
    m = block(1, 1, 3, 3)  # cells [1, 3): pixels [14, 50)
    m[5:9, 5:9] = 255  # cells [5, 9): pixels [78, 146), apart from the first and larger
    boxes = official_boxes(m[None], 224, 0.4)
    assert boxes.tolist() == [[78, 78, 146, 146]]


def test_gt_boxes_map_into_the_crop_clip_and_truncate_by_hand():
    # 512 x 256 image: x / 512 * 256 - 16, y / 256 * 256 - 16.
    assert gt_boxes_to_crop([[64, 32, 320, 160]], 512, 256).tolist() == [[16, 16, 144, 144]]
    # The whole 256 x 256 image: [-16, -16, 240, 240] clipped to [0, 223].
    assert gt_boxes_to_crop([[0, 0, 256, 256]], 256, 256).tolist() == [[0, 0, 223, 223]]
    # 300 x 300: 100 / 300 * 256 - 16 = 69.33 -> 69; 250 -> 197.33 -> 197; 299 -> 239.15 -> 223.
    assert gt_boxes_to_crop([[100, 250, 250, 299]], 300, 300).tolist() == [[69, 197, 197, 223]]
    # Several boxes, and another frame: 72 / 64 has offset 4; 40 / 80 * 72 - 4 = 32.
    got = gt_boxes_to_crop([[40, 0, 80, 80], [0, 0, 8, 8]], 80, 80, ResizeCrop(72, 64))
    assert got.tolist() == [[32, 0, 63, 63], [0, 0, 3, 3]]  # 8 / 80 * 72 - 4 = 3.2 -> 3


def test_iou_counts_each_side_plus_one():
    # Inclusive pixel ranges: [0, 0, 0, 0] is one pixel, and identical to itself.
    assert iou_plus_one([0, 0, 0, 0], [0, 0, 0, 0]) == 1.0
    # [0, 1] x [0, 1] and [1, 2] x [1, 2] share pixel (1, 1): 1 / (4 + 4 - 1) (0 without the +1).
    assert iou_plus_one([0, 0, 1, 1], [1, 1, 2, 2]) == pytest.approx(1 / 7)
    # 19 x 19 vs 19 x 38: 361 / 722 = 0.5 exactly (without the +1: 18 * 18 / (18 * 37) = 0.486).
    assert iou_plus_one([0, 0, 18, 18], [0, 0, 18, 37]) == 0.5
    # Disjoint boxes, and broadcasting over GT boxes.
    got = iou_plus_one(np.array([14, 14, 146, 146]), np.array([[16, 16, 144, 144], [150, 150, 200, 200]]))
    assert got.tolist() == pytest.approx([129 * 129 / (133 * 133), 0.0])


def test_best_ious_take_the_best_matching_gt_box():
    maps = np.stack([block(1, 1, 9, 9), block(10, 10, 14, 14)])
    gts = [
        [[300, 200, 400, 250], [64, 32, 320, 160]],  # the second matches: IoU 16641 / 17689
        [[64, 32, 320, 160]],  # box [158, 158, 224, 224] misses [16, 16, 144, 144]
    ]
    boxes, ious = best_ious(maps, gts, [512, 512], [256, 256], 0.4, OFFICIAL_FRAME)
    assert boxes[1].tolist() == [158, 158, 224, 224]
    assert ious.tolist() == pytest.approx([16641 / 17689, 0.0])
    with pytest.raises(ValueError, match="no GT box"):
        best_ious(maps[:1], [[]], [512], [256], 0.4)
