"""Evaluate a localize run with the WSOL metrics (DESIGN §6): JSON + a readable table.

    python jobs/evaluate_wsol.py --predictions runs/out/val-run --output val.json
    python jobs/evaluate_wsol.py --predictions runs/out/test-run --threshold-from val.json
    python jobs/evaluate_wsol.py --predictions s3://b/out/run1 --gt-shards 's3://b/wds/val-{000..007}.tar'
    python jobs/evaluate_wsol.py --predictions runs/out/cub-test-crop --protocol sat   # the paper's figures

Thresholds are chosen on a labelled validation run and applied to the test run with
--threshold-from (never chosen on the test split itself).

--protocol sat reproduces the official SAT evaluator (the figures the paper reports): the
224 centre crop of the 256 resize, IoU with the +1-pixel convention, one fixed threshold.
It needs a run localized with `jobs/localize_shards.py --resize-crop 256,224`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.evaluation.evaluate import PROTOCOLS, evaluate_run, format_table  # noqa: E402
from pipeline.data.storage import StorageError, write_bytes_atomic  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True, help="run directory <output>/<run_id> (any fsspec URL)")
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="choe",
        help="choe (default): Choe et al.'s threshold sweep (MaxBoxAcc, MaxBoxAccV2, PxAP); sat: the official "
             "SAT evaluator (Top-1/Top-5/GT-known Loc at a fixed threshold), for a run localized with "
             "--resize-crop 256,224",
    )
    parser.add_argument(
        "--threshold", type=float,
        help="fixed map threshold in [0, 1] (default: the run's own; with --protocol sat 0.4, the official "
             "CUB value: pass 0.3 for ImageNet)",
    )
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
            protocol=args.protocol,
        )
    except (ValueError, StorageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # FileNotFoundError, PermissionError, ... naming the file
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing was written", file=sys.stderr)
        return 130
    text = json.dumps(result, indent=2)
    print(format_table(result))
    if args.output:
        try:
            write_bytes_atomic(args.output, (text + "\n").encode())
        except OSError as e:
            print(f"error: --output {args.output}: cannot write: {type(e).__name__}: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
