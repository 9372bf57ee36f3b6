"""Draw a contact sheet of a run: images with the map as a heat overlay, predicted boxes
(cyan) and GT boxes (green), each captioned with the predicted class and score.

    python jobs/render_overlays.py --predictions runs/out/run1 --shards 'data/val-{000000..000003}.tar' \
        --output sheet.png --num 16 --order score-asc
"""
from __future__ import annotations

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.evaluation.overlays import ORDERS, images_from_shards, render_sheet, tiles_of_run  # noqa: E402
from pipeline.data.storage import write_bytes_atomic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="run directory <output>/<run_id> (any fsspec URL)")
    parser.add_argument("--output", required=True, help="PNG file to write (file or URL)")
    parser.add_argument("--shards", help="source shard spec for the images (default: grey canvases)")
    parser.add_argument("--num", type=int, default=16, help="how many images")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--tile", type=int, default=256, help="tile size in pixels")
    parser.add_argument("--order", choices=ORDERS, default="key", help="which images: by key or by confidence")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        tiles = tiles_of_run(args.predictions, args.num, args.order)
        images = images_from_shards(args.shards, [t.key for t in tiles]) if args.shards else {}
        sheet = render_sheet(tiles, images, args.columns, args.tile)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    write_bytes_atomic(args.output, buffer.getvalue())
    missing = len(tiles) - len(images)
    note = f" ({missing} without a source image: grey canvas)" if args.shards and missing else ""
    print(f"wrote {args.output}: {len(tiles)} images, {sheet.width}x{sheet.height} px{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
