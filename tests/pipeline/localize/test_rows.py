"""pipeline/localize/rows.py: model outputs -> rows in the DESIGN §3 schema."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from model.boxes import boxes_from_maps, foreground_ratio, normalized_upsampled_maps
from pipeline.localize.rows import RowSettings, crop_region_size, localize_rows, quantize_loc_maps
from pipeline.data.preprocess import ResizeCrop
from pipeline.data.reader import Sample
from pipeline.results.schema import localize_schema, resize_crop_of

SHA = "ab" * 32
NAMES = ("cat", "dog", "bird", "fish")


def _blob_map(h: int, w: int, cy: float, cx: float) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    return torch.sigmoid(4.0 - 2.0 * ((yy - cy) ** 2 + (xx - cx) ** 2))


def _settings(**kw) -> RowSettings:
    return RowSettings(**{"threshold": 0.4, "model_sha256": SHA, "topk": 3, "class_names": NAMES, **kw})


def test_quantize_rounds_to_255_steps_and_clamps():
    maps = torch.tensor([0.0, 0.5, 1.0, 0.002, 0.998, 1.2, -0.1, 0.25]).view(1, 1, 2, 4)
    q = quantize_loc_maps(maps)
    assert q.dtype == np.uint8 and q.shape == (1, 8)
    assert q.tolist() == [[0, 128, 255, 1, 254, 255, 0, 64]]


def test_rows_match_direct_post_processing_on_original_sizes():
    schema = localize_schema(4, 4, run_id="r1")
    samples = [
        Sample(key="a", shard="s.tar", width=40, height=30, label=1, gt_boxes=[[1.0, 2.0, 30.0, 20.0]]),
        Sample(key="b", shard="s.tar", width=17, height=50),
    ]
    maps = torch.stack([_blob_map(4, 4, 1.0, 1.0), _blob_map(4, 4, 2.5, 3.0)]).unsqueeze(1)
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0], [2.0, 0.0, 0.0, 5.0]])
    table = localize_rows(samples, logits, maps, _settings(), schema)

    assert table.schema.equals(schema, check_metadata=True)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["a", "b"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["label"] for r in rows] == [1, 3]
    assert [r["class_name"] for r in rows] == ["dog", "fish"]
    probs = torch.softmax(logits, 1)
    assert rows[0]["topk_labels"] == [1, 2, 0]
    np.testing.assert_allclose(rows[0]["topk_scores"], probs[0, [1, 2, 0]].numpy(), rtol=1e-6)
    assert rows[0]["score"] == pytest.approx(float(probs[0, 1]), rel=1e-6)
    # Maps: quantised on the patch grid, row-major.
    assert rows[1]["loc_map"] == torch.round(maps[1, 0].flatten() * 255).to(torch.uint8).tolist()
    # Boxes and fg_ratio: computed at each image's original size.
    expected = boxes_from_maps(maps, [(40, 30), (17, 50)], 0.4)
    norm = normalized_upsampled_maps(maps, [(40, 30), (17, 50)])
    fg = foreground_ratio(norm, 0.4)
    for r, box, ratio in zip(rows, expected, fg):
        got = [[b["x0"], b["y0"], b["x1"], b["y1"], b["score"]] for b in r["boxes"]]
        np.testing.assert_allclose(np.array(got), box.numpy(), rtol=1e-6)
        assert [r["box_x0"], r["box_y0"], r["box_x1"], r["box_y1"]] == pytest.approx(box[0, :4].tolist())
        assert r["fg_ratio"] == pytest.approx(float(ratio))
    # Not the whole-image fallback: the blobs give boxes inside the images.
    assert rows[0]["box_x1"] < 40 and rows[1]["box_y0"] > 0
    # Ground truth and provenance carried through.
    assert rows[0]["gt_label"] == 1 and rows[0]["gt_boxes"] == [[1.0, 2.0, 30.0, 20.0]]
    assert rows[1]["gt_label"] is None and rows[1]["gt_boxes"] is None
    assert {r["model_sha256"] for r in rows} == {SHA}
    assert rows[0]["threshold"] == pytest.approx(0.4)
    assert (rows[0]["width"], rows[0]["height"]) == (40, 30)


def test_crop_frame_boxes_are_in_original_pixels_inside_the_crop_window():
    """--resize-crop 256,224: the map covers the window [16 W/256, 240 W/256) x [16 H/256, 240 H/256).

    a: 512 x 256, window x [32, 480), y [16, 240), i.e. 448 x 224 px: 32 px a cell in x,
    16 in y. A block of cells [1, 9) (0.9 on 0.1): bilinear, the pixel j px into the
    stretch where a 0.1 cell meets a 0.9 cell has normalised value (j + 0.5) / s (s the
    stretch, 32 or 16), > 0.4 from j = 13 (x) or 6 (y); so in the window x [32 - 3, 288 + 3)
    = [29, 291), y [16 - 2, 144 + 2) = [14, 146), i.e. original x [61, 323), y [30, 162).
    fg_ratio: the upsampled block is the product of its x and y ramps, so the corners of
    that box are cut off (e.g. 0.55 * 0.55 < 0.4): counted below from the 1-D ramps.
    b: 500 x 375, a constant map (no evidence): the whole window, which has fractional edges
    [31.25, 468.75) x [23.4375, 351.5625); its region is 438 x 328 px (437.5 and 328.1 rounded).
    """
    frame = ResizeCrop(256, 224)
    schema = localize_schema(14, 14, run_id="r1", resize_crop=(256, 224))
    assert resize_crop_of(schema) == (256, 224) and resize_crop_of(localize_schema(14, 14)) is None
    samples = [
        Sample(key="a", shard="s.tar", width=512, height=256),
        Sample(key="b", shard="s.tar", width=500, height=375),
    ]
    maps = torch.full((2, 1, 14, 14), 0.1)
    maps[0, 0, 1:9, 1:9] = 0.9
    logits = torch.zeros(2, 4)
    rows = localize_rows(samples, logits, maps, _settings(resize_crop=frame), schema).to_pylist()
    assert [rows[0][k] for k in ("box_x0", "box_y0", "box_x1", "box_y1")] == [61.0, 30.0, 323.0, 162.0]
    cells = np.zeros(14)
    cells[1:9] = 1.0
    ramp_x = np.interp((np.arange(448) + 0.5) / 32 - 0.5, np.arange(14), cells)  # clamped at the ends
    ramp_y = np.interp((np.arange(224) + 0.5) / 16 - 0.5, np.arange(14), cells)
    assert (ramp_x > 0.4).sum() == 291 - 29 and (ramp_y > 0.4).sum() == 146 - 14
    assert rows[0]["fg_ratio"] == pytest.approx((ramp_y[:, None] * ramp_x[None, :] > 0.4).mean(), abs=1e-7)
    assert crop_region_size(frame.window(500, 375)) == (438, 328)
    assert [rows[1][k] for k in ("box_x0", "box_y0", "box_x1", "box_y1")] == [31.25, 23.4375, 468.75, 351.5625]
    assert rows[1]["fg_ratio"] == 0.0
    # The stored map is the grid map, whatever the frame.
    assert rows[0]["loc_map"] == torch.round(maps[0, 0].flatten() * 255).to(torch.uint8).tolist()


def test_error_samples_become_error_rows_in_order():
    schema = localize_schema(4, 4)
    samples = [
        Sample(key="bad1", shard="s.tar", error="undecodable image: OSError: broken", label=2),
        Sample(key="ok", shard="s.tar", width=8, height=8),
        Sample(key="bad2", shard="s.tar", error="no image member"),
    ]
    maps = _blob_map(4, 4, 2, 2).view(1, 1, 4, 4)
    table = localize_rows(samples, torch.tensor([[1.0, 0.0, 0.0, 0.0]]), maps, _settings(), schema)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["bad1", "ok", "bad2"]
    assert [r["status"] for r in rows] == ["error", "ok", "error"]
    assert rows[0]["error"].startswith("undecodable image") and rows[1]["error"] is None
    for r in (rows[0], rows[2]):
        assert r["label"] is None and r["loc_map"] is None and r["boxes"] is None and r["width"] is None
        assert r["model_sha256"] == SHA
    assert rows[0]["gt_label"] == 2
    assert rows[1]["label"] == 0 and len(rows[1]["loc_map"]) == 16


def test_a_batch_of_only_bad_samples():
    schema = localize_schema(2, 2)
    samples = [Sample(key="x", shard="s.tar", error="truncated")]
    table = localize_rows(samples, torch.zeros(0, 4), torch.zeros(0, 1, 2, 2), _settings(), schema)
    assert table.num_rows == 1 and table["status"].to_pylist() == ["error"]


def test_box_mode_all_keeps_every_component_up_to_max_boxes():
    schema = localize_schema(6, 6)
    m = torch.zeros(6, 6)
    m[0:2, 0:2] = 1.0  # three separate blobs, areas 4, 2, 1 cells
    m[4:6, 5] = 1.0
    m[0, 5] = 1.0
    maps = m.view(1, 1, 6, 6)
    sample = [Sample(key="k", shard="s.tar", width=6, height=6)]
    logits = torch.zeros(1, 4)
    all_rows = localize_rows(sample, logits, maps, _settings(box_mode="all", threshold=0.9), schema).to_pylist()[0]
    two = localize_rows(sample, logits, maps, _settings(box_mode="all", max_boxes=2, threshold=0.9), schema)
    largest = localize_rows(sample, logits, maps, _settings(threshold=0.9), schema).to_pylist()[0]
    assert [(b["x0"], b["y0"], b["x1"], b["y1"]) for b in all_rows["boxes"]] == [(0, 0, 2, 2), (5, 4, 6, 6), (5, 0, 6, 1)]
    assert len(two.to_pylist()[0]["boxes"]) == 2
    assert [(b["x0"], b["y0"], b["x1"], b["y1"]) for b in largest["boxes"]] == [(0, 0, 2, 2)]
    assert (largest["box_x0"], largest["box_y1"]) == (0, 2)
    assert largest["fg_ratio"] == pytest.approx(7 / 36)


def test_without_class_names_class_name_is_null_and_topk_is_capped():
    schema = localize_schema(2, 2)
    sample = [Sample(key="k", shard="s.tar", width=4, height=4)]
    rows = localize_rows(
        sample, torch.tensor([[0.1, 0.9]]), torch.rand(1, 1, 2, 2), _settings(class_names=None, topk=5), schema
    ).to_pylist()
    assert rows[0]["class_name"] is None and rows[0]["topk_labels"] == [1, 0]


def test_mismatched_outputs_are_refused():
    schema = localize_schema(2, 2)
    sample = [Sample(key="k", shard="s.tar", width=4, height=4)]
    with pytest.raises(ValueError, match="1 good samples but 2 logits"):
        localize_rows(sample, torch.zeros(2, 4), torch.zeros(2, 1, 2, 2), _settings(), schema)
    with pytest.raises(ValueError, match="maps are 3x3"):
        localize_rows(sample, torch.zeros(1, 4), torch.zeros(1, 1, 3, 3), _settings(), schema)


def test_rows_write_plain_parquet_types(tmp_path):
    import pyarrow.parquet as pq

    schema = localize_schema(2, 2, run_id="r")
    sample = [Sample(key="k", shard="s.tar", width=4, height=4, gt_boxes=[[0, 0, 1, 1]])]
    table = localize_rows(sample, torch.zeros(1, 4), torch.full((1, 1, 2, 2), 0.5), _settings(), schema)
    pq.write_table(table, tmp_path / "x.parquet")
    back = pq.read_table(tmp_path / "x.parquet")
    assert back.schema.field("loc_map").type == pa.list_(pa.uint8(), 4)
    assert back.schema.metadata[b"satloc.loc_map_shape"] == b"2,2"
    assert back["loc_map"].to_pylist() == [[128, 128, 128, 128]]


def test_a_row_arrow_cannot_store_is_that_samples_error_row_not_a_lost_batch():
    """Issue 14: a key with bytes that are not UTF-8 (tar names keep them as surrogates) or a
    label beyond int32 fails only its own row, which names the key and the column."""
    schema = localize_schema(2, 2)
    samples = [
        Sample(key="a", shard="s.tar", error="e", label=1),
        Sample(key="b\udcff", shard="s.tar", error="e"),
        Sample(key="c", shard="s.tar", error="e", label=2**40),
        Sample(key="d", shard="s.tar", error="e", label=3),
    ]
    table = localize_rows(samples, torch.zeros(0, 4), torch.zeros(0, 1, 2, 2), _settings(), schema)
    rows = table.to_pylist()
    assert [r["key"] for r in rows] == ["a", "b\\udcff", "c", "d"]
    assert [r["gt_label"] for r in rows] == [1, None, None, 3]
    assert "row for sample 'b\\udcff' cannot be stored: key" in rows[1]["error"]
    assert "row for sample 'c' cannot be stored: gt_label" in rows[2]["error"]
    assert all(r["status"] == "error" and r["model_sha256"] == SHA for r in rows)


def test_gt_labels_outside_the_checkpoint_classes_are_counted():
    from pipeline.localize.rows import gt_label_check

    labels = pa.chunked_array([pa.array([1, None, -7, 9, 4], pa.int32())])
    assert gt_label_check(labels, 5) == (2, (-7, 9))
    assert gt_label_check(labels, 10) == (1, (-7, 9))
    assert gt_label_check(pa.array([None], pa.int32()), 5) == (0, None)
