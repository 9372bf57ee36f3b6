"""Export a run's boxes as pseudo-labels for detector training (COCO JSON or YOLO text).

    python jobs/export_pseudo_boxes.py --predictions runs/out/run1 --format coco --output pseudo.json \
        --min-score 0.5 --max-fg-ratio 0.8 --classes bird,cat
    python jobs/export_pseudo_boxes.py --predictions s3://b/out/run1 --format yolo --output s3://b/yolo/run1/

Where the rows carry ground-truth boxes, COCOeval's AP and AP50 of the pseudo-boxes are printed.

Names are unique across shards (keys often repeat between shards): a COCO image's file_name
is <shard-stem>/<key>, a YOLO label file <shard-stem>__<key>.txt (reduced to [A-Za-z0-9._-]
plus a hash when the key holds other characters; -2, -3, ... when a key repeats inside one
shard), next to classes.txt. An existing output is refused unless --overwrite.
Exit codes: 0 written, 2 bad input (nothing was written), 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data.storage import StorageError  # noqa: E402
from pipeline.evaluation.pseudo_boxes import FORMATS, BoxFilter, export_pseudo_boxes  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="run directory <output>/<run_id> (any fsspec URL)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument(
        "--output", required=True,
        help="COCO: the JSON file (file_name <shard-stem>/<key>); YOLO: a directory of <shard-stem>__<key>.txt "
             "and classes.txt (file or URL)",
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing COCO file, or write into a YOLO directory that is not empty")
    parser.add_argument("--min-score", type=float, default=0.0,
                        help="keep images whose top-1 probability is >= this, in [0, 1]")
    parser.add_argument("--min-fg-ratio", type=float, default=0.0, help="keep images whose foreground share is >= this")
    parser.add_argument("--max-fg-ratio", type=float, default=1.0, help="... and <= this")
    parser.add_argument("--max-boxes", type=int, help="at most this many boxes per image (best first)")
    parser.add_argument("--classes", help="comma-separated class names or ids to keep (predicted class)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        filt = BoxFilter(args.min_score, args.min_fg_ratio, args.max_fg_ratio, args.max_boxes)
        classes = args.classes.split(",") if args.classes else None
        summary = export_pseudo_boxes(args.predictions, args.format, args.output, filt, classes, args.overwrite)
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # FileNotFoundError, PermissionError, ... while reading or writing
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): each file is written whole or not at all; rerun with --overwrite",
              file=sys.stderr)
        return 130
    print(
        f"wrote {summary['boxes']} boxes of {summary['images']} images in {summary['files']} files "
        f"to {args.output} ({args.format})"
    )
    if summary["coco_eval"] is not None:
        ev = summary["coco_eval"]
        print(f"COCOeval of the pseudo-boxes against the GT boxes: AP {ev['ap']:.2f}  AP50 {ev['ap50']:.2f}")
    else:
        print("note: the rows carry no ground-truth boxes: no COCOeval AP")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
