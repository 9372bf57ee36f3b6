"""Localize WebDataset shards into Parquet with SAT (DESIGN §3): one Parquet file per shard.

    python jobs/localize_shards.py --shards 's3://bucket/wds/val-{000000..000049}.tar' \\
        --checkpoint s3://bucket/models/sat.safetensors --output s3://bucket/loc/
    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python jobs/localize_shards.py --shards ... --checkpoint ... --output ...

Rerunning with the same --run-id (or the same spec, model and settings, which give the
same default id) resumes: done shards are skipped, new shards are processed.
Exit codes: 0 all shards done, 1 a shard failed after its retries (the manifest names
it) or the manifest could not be written, 2 bad input (nothing was written), 130
interrupted by Ctrl-C (shards already written are whole and a rerun skips them; no manifest).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.precision import PRECISION_CHOICES  # noqa: E402
from pipeline.localize.decode import DECODE_CHOICES  # noqa: E402
from pipeline.localize.run import BadInputError, LocalizeConfig, run_localize  # noqa: E402
from pipeline.localize.scheduler import ActorStartError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> LocalizeConfig:
    """The flags as a checked LocalizeConfig (BadInputError naming a wrong flag)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="brace pattern, prefix/, path, URL or @list.txt")
    p.add_argument("--checkpoint", required=True, help="satloc checkpoint (.safetensors), any fsspec URL")
    p.add_argument("--output", required=True, help="output prefix; files go to OUTPUT/RUN_ID/")
    p.add_argument("--run-id", help="rerun with the same id to resume (default: derived from spec, model, settings)")
    p.add_argument("--num-actors", type=int, help="model replicas (default: one per GPU, or per --cpus-per-actor CPUs)")
    p.add_argument("--gpus-per-actor", type=float, help="default: 1 when the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-actor", type=float, help="CPUs for decoding and torch threads per actor")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                   help="auto (default): bf16 on GPU actors and on CPUs with native bf16 (AVX512-BF16/AMX, "
                        "as seen by the driver's machine), else fp32; fp16 needs a GPU")
    p.add_argument("--decode", choices=DECODE_CHOICES, default="auto",
                   help="auto (default): JPEGs decoded in batches on the GPU of CUDA actors (nvJPEG), per sample "
                        "on CPU elsewhere; gpu: always on the GPU (needs GPU actors); cpu: per sample on CPU. "
                        "PNG/WebP, CMYK, EXIF-rotated and anything nvJPEG refuses are decoded on CPU either way")
    p.add_argument("--threshold", type=float, help="box threshold in [0, 1] (default: the checkpoint's)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--box-mode", choices=("largest", "all"), default="largest")
    p.add_argument("--max-boxes", type=int, help="with --box-mode all: keep at most this many boxes")
    p.add_argument("--resize-crop", metavar="RESIZE,CROP",
                   help="the official SAT test frame, e.g. 256,224: resize to RESIZExRESIZE, centre crop CROP "
                        "(the model's input size); boxes stay in original pixels, inside the crop window; "
                        "needed by evaluate_wsol.py --protocol sat (default: whole image resized, Choe et al.)")
    p.add_argument("--max-retries", type=int, default=2, help="retries of a failed shard, on another actor")
    p.add_argument("--limit", type=int, help="only the first N shards")
    p.add_argument("--overwrite", action="store_true", help="redo shards whose output exists")
    p.add_argument("--dry-run", action="store_true", help="print the plan (shards total, done, to do) and exit")
    args = p.parse_args(argv)
    return LocalizeConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    try:
        summary = run_localize(parse_args(argv))
    except BadInputError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except ActorStartError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except OSError as e:  # the manifest, after the shards (whose outcome was printed)
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): shards written so far are whole and a rerun with the same --run-id "
              "skips them; no manifest was written", file=sys.stderr, flush=True)
        return 130
    return summary.exit_code


if __name__ == "__main__":
    sys.exit(main())
