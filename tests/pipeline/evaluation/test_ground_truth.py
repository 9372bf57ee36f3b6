"""pipeline/evaluation/ground_truth.py: labels, boxes and masks by key from source shards."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.evaluation.ground_truth import read_ground_truth, resize_mask
from run_factory import write_shard


def _mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), dtype=np.uint8)
    m[:, w // 2 :] = 255
    return m


def test_reads_labels_boxes_and_masks_of_the_wanted_keys(tmp_path):
    image = np.zeros((4, 8, 3), dtype=np.uint8)
    shard = write_shard(
        str(tmp_path / "gt-000000.tar"),
        [
            {"key": "a", "image": image, "json": {"label": 3, "class_name": "cat", "boxes": [[1, 2, 3, 4]]},
             "mask": _mask(4, 8)},
            {"key": "b", "image": image, "json": {"label": 5}},
            {"key": "c", "image": image, "json": {"label": 6}},
        ],
    )
    truth = read_ground_truth(shard, keys=["a", "b"])
    assert set(truth) == {"a", "b"}
    a = truth["a"]
    assert (a.label, a.class_name, a.boxes, a.shard) == (3, "cat", [[1.0, 2.0, 3.0, 4.0]], shard)
    assert a.mask.dtype == np.uint8 and a.mask_shape == (4, 8) and a.mask[0].tolist() == [0] * 4 + [255] * 4
    assert truth["b"].mask is None and truth["b"].boxes is None
    small = read_ground_truth(shard, keys=["a"], mask_size=(2, 4))["a"]
    assert small.mask_shape == (4, 8)
    np.testing.assert_array_equal(small.mask, [[False, False, True, True]] * 2)


def test_a_key_in_two_shards_is_an_error(tmp_path):
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    write_shard(str(tmp_path / "gt-000000.tar"), [{"key": "a", "image": image, "json": {"label": 1}}])
    write_shard(str(tmp_path / "gt-000001.tar"), [{"key": "a", "image": image, "json": {"label": 2}}])
    with pytest.raises(ValueError, match="key 'a' is in both"):
        read_ground_truth(str(tmp_path) + "/")


def test_resize_mask_nearest():
    np.testing.assert_array_equal(resize_mask(_mask(4, 8), (2, 4)), [[False, False, True, True]] * 2)
    np.testing.assert_array_equal(resize_mask(_mask(2, 2), (4, 4)), [[False, False, True, True]] * 4)
