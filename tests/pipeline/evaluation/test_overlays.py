"""pipeline/evaluation/overlays.py and jobs/render_overlays.py: a valid PNG of the expected size."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pipeline.evaluation.overlays import CANVAS_GREY, GT_COLOUR, PRED_COLOUR, render_sheet, sheet_size, tiles_of_run
from run_factory import blob_map, make_row, write_run, write_shard

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


@pytest.fixture
def run_and_shard(tmp_path):
    rows, samples = [], []
    for i in range(5):
        key = f"img-{i}"
        rows.append(
            make_row(key, loc_map=blob_map((14, 14), (2, 2, 7, 7)), label=i % 2, class_name=["cat", "dog"][i % 2],
                     score=0.5 + i / 10, width=320, height=240, boxes=[(40.0, 30.0, 140.0, 105.0, 0.8)],
                     gt_boxes=[[180.0, 120.0, 300.0, 220.0]])
        )
        image = np.zeros((240, 320, 3), dtype=np.uint8)
        image[:, :, 2] = 200  # blue images: easy to tell from the grey canvas
        samples.append({"key": key, "image": image, "json": {"label": i % 2}})
    run = write_run(str(tmp_path), "r", {"shard-000000": rows})
    shard = write_shard(str(tmp_path / "src-000000.tar"), samples)
    return run, shard


def _has_colour(img: Image.Image, colour) -> bool:
    arr = np.asarray(img)
    return bool(np.all(arr == np.array(colour, dtype=np.uint8), axis=-1).any())


def test_job_writes_a_png_of_the_expected_size_with_images_from_shards(run_and_shard, tmp_path):
    run, shard = run_and_shard
    out = tmp_path / "sheet.png"
    proc = subprocess.run(
        [sys.executable, "jobs/render_overlays.py", "--predictions", run, "--shards", shard, "--output", str(out),
         "--num", "5", "--columns", "3", "--tile", "128", "--order", "score-desc"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == sheet_size(5, 3, 128) == (384, 22 + 2 * (128 + 30))
        img = img.convert("RGB")
        assert _has_colour(img, PRED_COLOUR) and _has_colour(img, GT_COLOUR)
        # The first tile's centre-left shows the blue source image under the heat overlay.
        r, g, b = img.getpixel((10, 22 + 64))
        assert b > r and b > g


def test_without_shards_tiles_are_grey_canvases_in_the_image_shape(run_and_shard):
    run, _ = run_and_shard
    tiles = tiles_of_run(run, num=2, order="score-asc")
    assert [t.key for t in tiles] == ["img-0", "img-1"]
    assert tiles[0].caption == "cat 0.50"
    sheet = render_sheet(tiles, {}, columns=2, tile=96)
    assert sheet.size == sheet_size(2, 2, 96)
    # A 320 x 240 image fits 96 x 72: the letterbox rows above it stay black, the canvas is grey-ish.
    assert sheet.getpixel((48, 22 + 2)) == (0, 0, 0)
    r, g, b = sheet.getpixel((4, 22 + 48))
    assert abs(r - g) < 80 and abs(g - b) < 80 and r > 40  # grey canvas (with a little heat tint)
    assert CANVAS_GREY == (128, 128, 128)


def test_bad_arguments(run_and_shard):
    run, _ = run_and_shard
    with pytest.raises(ValueError, match="--order"):
        tiles_of_run(run, order="random")
    with pytest.raises(ValueError, match="--num"):
        tiles_of_run(run, num=0)
    with pytest.raises(ValueError, match="--columns"):
        render_sheet(tiles_of_run(run, num=1), {}, columns=0)


def test_crop_frame_maps_are_drawn_over_the_crop_window_only(tmp_path):
    from PIL import ImageFont

    from pipeline.evaluation.overlays import _draw_tile

    # --resize-crop 256,224 on a 320 x 240 image: window [20, 300) x [15, 225).
    hot = np.full((14, 14), 255, dtype=np.uint8)
    hot[0, 0] = 0
    run = write_run(str(tmp_path), "c", {"s-000000": [make_row("a", loc_map=hot, width=320, height=240)]},
                    resize_crop=(256, 224))
    (tile,) = tiles_of_run(run, 5, "key")
    assert tile.window == (20.0, 15.0, 300.0, 225.0)
    blue = Image.fromarray(np.dstack([np.zeros((240, 320, 2), np.uint8), np.full((240, 320), 200, np.uint8)]))
    drawn = np.asarray(_draw_tile(tile, blue, 160, ImageFont.load_default()))
    # Scale 0.5: the image is 160 x 120 at (0, 20); the window is x [10, 150), y [8, 112) in it.
    assert drawn[20 + 2, 2].tolist() == [0, 0, 200]  # outside the window: the image, no heat
    assert drawn[20 + 60, 80].tolist() != [0, 0, 200]  # inside: the hot map
