"""Contact sheets: a run's images with the map as a heat overlay, predicted and GT boxes.

Each tile shows one image (read from the source shards, or a grey canvas of the same
shape when no shards are given) scaled to fit ``tile`` x ``tile``, the ``loc_map``
upsampled over it in a black-red-yellow "hot" palette (opaque where the map is high), the predicted boxes in cyan and
the GT boxes in green (colours the palette never uses), and a caption with the predicted
class and score.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFont

from pipeline.evaluation.evaluate import loc_maps_of, read_run

PRED_COLOUR = (0, 220, 255)
GT_COLOUR = (40, 255, 40)
CANVAS_GREY = (128, 128, 128)
HEAT_ALPHA = 0.7
CAPTION_HEIGHT = 30
HEADER_HEIGHT = 22
ORDERS = ("key", "score-asc", "score-desc")


@dataclass
class Tile:
    key: str
    width: int
    height: int
    loc_map: np.ndarray  # uint8 (h, w) on the patch grid
    boxes: list[tuple[float, float, float, float]]  # predicted, original pixels
    gt_boxes: list[list[float]]
    caption: str
    window: tuple[float, float, float, float] | None = None  # the map covers this crop (--resize-crop)


def sheet_size(count: int, columns: int, tile: int) -> tuple[int, int]:
    """(width, height) of the contact sheet for ``count`` tiles."""
    rows = max(1, -(-count // columns))
    return columns * tile, HEADER_HEIGHT + rows * (tile + CAPTION_HEIGHT)


def _hot(values: np.ndarray) -> np.ndarray:
    """[0, 1] -> RGB uint8, black -> red -> yellow -> white."""
    v = np.clip(values, 0.0, 1.0)[..., None] * 3.0
    rgb = np.concatenate([np.clip(v, 0, 1), np.clip(v - 1, 0, 1), np.clip(v - 2, 0, 1)], axis=-1)
    return (rgb * 255).astype(np.uint8)


def _draw_tile(tile: Tile, image: Image.Image | None, size: int, font) -> Image.Image:
    scale = min(size / tile.width, size / tile.height)
    shown_w, shown_h = max(1, round(tile.width * scale)), max(1, round(tile.height * scale))
    base = image.convert("RGB") if image is not None else Image.new("RGB", (tile.width, tile.height), CANVAS_GREY)
    base = np.asarray(base.resize((shown_w, shown_h), Image.BILINEAR), dtype=np.float32)
    wx0, wy0, wx1, wy1 = tile.window or (0, 0, tile.width, tile.height)
    px0, py0 = round(wx0 * scale), round(wy0 * scale)
    pw, ph = max(1, min(round(wx1 * scale), shown_w) - px0), max(1, min(round(wy1 * scale), shown_h) - py0)
    crop_heat = Image.fromarray(tile.loc_map.astype(np.float32), mode="F").resize((pw, ph), Image.BILINEAR)
    crop_heat = np.asarray(crop_heat, dtype=np.float32)
    span = crop_heat.max() - crop_heat.min()
    heat = np.zeros((shown_h, shown_w), dtype=np.float32)  # no map outside a crop window
    heat[py0 : py0 + ph, px0 : px0 + pw] = (crop_heat - crop_heat.min()) / span if span > 0 else 0.0
    # Opacity follows the map, so the image stays visible where the map is low.
    alpha = HEAT_ALPHA * heat[..., None]
    blended = (1 - alpha) * base + alpha * _hot(heat).astype(np.float32)

    out = Image.new("RGB", (size, size + CAPTION_HEIGHT), (0, 0, 0))
    ox, oy = (size - shown_w) // 2, (size - shown_h) // 2
    out.paste(Image.fromarray(blended.astype(np.uint8)), (ox, oy))
    draw = ImageDraw.Draw(out)

    def rect(box, colour, width):
        x0, y0, x1, y1 = (float(v) * scale for v in box[:4])
        draw.rectangle([ox + x0, oy + y0, ox + max(x1 - 1, x0), oy + max(y1 - 1, y0)], outline=colour, width=width)

    for box in tile.gt_boxes:
        rect(box, GT_COLOUR, 2)
    for box in tile.boxes:
        rect(box, PRED_COLOUR, 2)
    draw.text((4, size + 2), tile.caption[:48], fill=(255, 255, 255), font=font)
    draw.text((4, size + 15), tile.key[:48], fill=(170, 170, 170), font=font)
    return out


def render_sheet(
    tiles: Sequence[Tile], images: dict[str, Image.Image], columns: int = 4, tile: int = 256
) -> Image.Image:
    """One PNG-ready image: a legend line, then the tiles row by row."""
    if columns < 1 or tile < 32:
        raise ValueError(f"need --columns >= 1 and --tile >= 32, got {columns} and {tile}")
    width, height = sheet_size(len(tiles), columns, tile)
    sheet = Image.new("RGB", (width, height), (0, 0, 0))
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(sheet)
    legend = "cyan: predicted box   green: ground truth   heat: localization map"
    draw.text((4, 4), legend, fill=(255, 255, 255), font=font)
    for i, t in enumerate(tiles):
        x, y = (i % columns) * tile, HEADER_HEIGHT + (i // columns) * (tile + CAPTION_HEIGHT)
        sheet.paste(_draw_tile(t, images.get(t.key), tile, font), (x, y))
    return sheet


def tiles_of_run(predictions_url: str, num: int = 16, order: str = "key") -> list[Tile]:
    """The first ``num`` good rows of a run in the given order, as tiles."""
    if order not in ORDERS:
        raise ValueError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    if num < 1:
        raise ValueError(f"--num must be >= 1, got {num}")
    run = read_run(predictions_url)
    t = run.table
    ok = t.filter(pa.array(np.array(t.column("status").to_pylist(), dtype=object) == "ok"))
    if ok.num_rows == 0:
        raise ValueError(f"run {predictions_url} has no good rows to draw")
    cols = {
        c: ok.column(c).to_pylist()
        for c in ("key", "width", "height", "label", "score", "class_name", "boxes", "gt_label", "gt_boxes")
    }
    names = run.class_names()
    if order == "key":
        idx = sorted(range(ok.num_rows), key=lambda i: cols["key"][i])
    else:
        sign = 1 if order == "score-asc" else -1
        idx = sorted(range(ok.num_rows), key=lambda i: (sign * (cols["score"][i] or 0.0), cols["key"][i]))
    idx = idx[:num]
    maps = loc_maps_of(ok, run.grid)
    frame = run.resize_crop
    tiles = []
    for i in idx:
        name = cols["class_name"][i] or str(cols["label"][i])
        caption = f"{name} {float(cols['score'][i] or 0.0):.2f}"
        gt_label = cols["gt_label"][i]
        if gt_label is not None and gt_label != cols["label"][i]:
            caption += f" (true: {names.get(gt_label, gt_label)})"
        tiles.append(
            Tile(
                key=cols["key"][i],
                width=int(cols["width"][i]),
                height=int(cols["height"][i]),
                loc_map=maps[i],
                boxes=[(b["x0"], b["y0"], b["x1"], b["y1"]) for b in cols["boxes"][i] or []],
                gt_boxes=cols["gt_boxes"][i] or [],
                caption=caption,
                window=frame.window(int(cols["width"][i]), int(cols["height"][i])) if frame else None,
            )
        )
    return tiles


def images_from_shards(spec: str, keys: Sequence[str]) -> dict[str, Image.Image]:
    """Decoded images of ``keys`` from the shards of ``spec`` (stops once all are found)."""
    from pipeline.data.reader import decode_sample, read_samples
    from pipeline.data.shards import expand_shards

    wanted, found = set(keys), {}
    for url in expand_shards(spec):
        for sample in read_samples(url, decode=False):
            if sample.key in wanted and sample.key not in found and sample.error is None:
                decoded = decode_sample(sample)
                if decoded.image is not None:
                    found[sample.key] = decoded.image
            if len(found) == len(wanted):
                return found
    return found
