"""Evaluate a localize run with the WSOL metrics (DESIGN §6): JSON + a readable table.

    python jobs/evaluate_wsol.py --predictions runs/out/val-run --output val.json
    python jobs/evaluate_wsol.py --predictions runs/out/test-run --threshold-from val.json
    python jobs/evaluate_wsol.py --predictions s3://b/out/run1 --gt-shards 's3://b/wds/val-{000..007}.tar'

Thresholds are chosen on a labelled validation run and applied to the test run with
--threshold-from (never chosen on the test split itself).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.evaluate import evaluate_run, format_table  # noqa: E402
from pipeline.storage import write_bytes_atomic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="run directory <output>/<run_id> (any fsspec URL)")
    parser.add_argument("--threshold", type=float, help="fixed map threshold in [0, 1] (default: the run's own)")
    parser.add_argument(
        "--threshold-from", help="use the threshold chosen on another run: its evaluation JSON or run directory"
    )
    parser.add_argument("--gt-shards", help="shard spec to read GT masks (PxAP), and labels/boxes the rows lack")
    parser.add_argument("--output", help="write the JSON here (file or URL); it is always printed too")
    parser.add_argument("--workers", type=int, help="processes for the threshold sweep (default: min(2, cores))")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate_run(
            args.predictions,
            threshold=args.threshold,
            threshold_from=args.threshold_from,
            gt_shards=args.gt_shards,
            workers=args.workers,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(format_table(result))
    if args.output:
        write_bytes_atomic(args.output, (text + "\n").encode())
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
