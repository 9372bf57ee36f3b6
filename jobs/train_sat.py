"""Train SAT (or the CAM baseline) on WebDataset shards with Ray Train; export a satloc checkpoint.

    python jobs/train_sat.py --recipe cub --pretrained deit_small.pth \\
        --train-shards s3://b/wds/train-{000000..000127}.tar --val-shards s3://b/wds/val-000000.tar \\
        --num-workers 8 --use-gpu --storage-path s3://b/runs --name cub-sat --output s3://b/models/cub-sat.safetensors

Recipes (pipeline/train/recipes.py) set every hyper-parameter; flags given explicitly override it:
  cub       the official CUB run: sat_deit_small_patch16_224, AdamW wd 0.05, constant lr 1e-4
            (no warm-up), global batch 256, 30 epochs, alpha 0.25, drop path 0.1, Resize 256x256,
            RandomCrop 224, horizontal flip
  imagenet  the same with lr 1.5e-5, global batch 512, 1 epoch, alpha 0.35
  demo      the CPU demo's recipe (make demo): sat_vit_micro_patch8_64, lr 1e-3 with warm-up and
            cosine, batch 128, 10 epochs, fp32
A DeiT model (deit_tiny/small/base) needs --recipe: the built-in defaults are CPU-demo
settings (lr 1e-3, warm-up and cosine) that are wrong for fine-tuning DeiT. The small CPU
backbones train with the defaults shown below when no --recipe is given. The job prints the
resolved settings and stores them in the checkpoint (config "training" -> "settings").

--precision auto (the default) is bf16 on GPUs and on CPUs with native bf16 (AVX512-BF16 or
AMX, as seen by the machine that starts the job), fp32 elsewhere.

Rerunning with the same --name and --storage-path resumes from the last epoch's
checkpoint. Without --name, the name is derived from the training options, so an
identical rerun resumes too. Under `ray job submit --working-dir . -- python
jobs/train_sat.py ...` it uses the job's cluster; otherwise it starts Ray in-process.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model.precision import PRECISION_CHOICES  # noqa: E402
from pipeline.train.recipes import TRAIN_RECIPES, train_recipe  # noqa: E402
from pipeline.train.job import TrainOptions, is_deit_size, resolve_model_name, run_training  # noqa: E402
from pipeline.train.loop import FREEZE_MODES, PRECISIONS, SCHEDULES  # noqa: E402
from pipeline.evaluation.threshold import THRESHOLD_METRICS  # noqa: E402

D = TrainOptions.__dataclass_fields__
TRAIN_PRECISION_CHOICES = tuple(p for p in PRECISION_CHOICES if p == "auto" or p in PRECISIONS)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object like '{\"depth\": 6}'")
    return value


def parse_args(argv: list[str] | None = None) -> TrainOptions:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    def setting(flag: str, help: str = "", **kwargs) -> None:
        """A training option: absent unless given (so a recipe can fill it), default shown."""
        default = D[flag.lstrip("-").replace("-", "_")].default
        plain = isinstance(default, (int, float, str)) and not isinstance(default, bool)
        shown = f"default {default}" if plain else ""
        help = "; ".join(x for x in (help, shown) if x)
        p.add_argument(flag, default=argparse.SUPPRESS, help=help or None, **kwargs)

    p.add_argument("--train-shards", required=True, help="shard spec of the labelled training split")
    p.add_argument("--val-shards", required=True, help="shard spec of the labelled val split with GT boxes")
    p.add_argument("--recipe", choices=tuple(TRAIN_RECIPES),
                   help="every hyper-parameter of a known run (see above); explicit flags override it")
    setting("--model", "a create_model name (sat_*/cam_*) or a backbone")
    setting("--img-size", "input size (default: the backbone's)", type=int)
    setting("--model-kwargs", 'JSON overrides, e.g. \'{"depth": 6, "embed_dim": 128, "num_heads": 4, '
            '"patch_size": 8}\' (merged into a recipe\'s)', type=_json_object)
    setting("--method", "replaces the method prefix of --model", choices=("sat", "cam"))
    setting("--pretrained", "DeiT/official SAT weights or a satloc checkpoint (two-stage recipe)")
    setting("--epochs", type=int)
    setting("--batch-size", "global, across workers", type=int)
    setting("--lr", type=float)
    setting("--schedule", "after the warm-up: cosine to zero, or constant (the official runs)", choices=SCHEDULES)
    setting("--weight-decay", type=float)
    setting("--warmup-epochs", type=float)
    setting("--alpha", "target map area", type=float)
    setting("--area-weight", type=float)
    setting("--norm-weight", type=float)
    setting("--spatial-loss-start", "epochs before the area and normalization terms start", type=float)
    setting("--spatial-loss-ramp", "epochs over which they ramp to full weight", type=float)
    setting("--backbone-lr-scale", "the backbone's lr as a fraction of the token's and head's", type=float)
    setting("--freeze", "token: only the spatial token, its position embedding, the head and the "
            "re-weighted blocks train", choices=FREEZE_MODES)
    setting("--images-per-class", "few-shot: the first N keys of each class (sorted)", type=int)
    setting("--num-workers", type=int)
    setting("--use-gpu", action="store_true")
    setting("--precision", "auto: bf16 on GPUs and native-bf16 CPUs, else fp32", choices=TRAIN_PRECISION_CHOICES)
    p.add_argument("--storage-path", required=True, help="Ray Train run storage: a directory or s3:// URL")
    p.add_argument("--name", help="run name (same name + storage path = resume)")
    setting("--seed", type=int)
    p.add_argument("--output", required=True, help="URL of the final satloc checkpoint")
    setting("--threshold-metric", "what the box threshold is chosen for on the val split",
            choices=THRESHOLD_METRICS)
    setting("--max-failures", "worker failures Ray Train recovers from (from the last checkpoint)", type=int)
    args = vars(p.parse_args(argv))
    recipe = args.pop("recipe")
    if recipe is None:
        try:
            model = resolve_model_name(args.get("model", D["model"].default), args.get("method"))
        except ValueError as e:
            p.error(f"--model: {e}")
        if is_deit_size(model):
            p.error(f"--model {model} needs --recipe cub or imagenet (the paper's settings; flags you give "
                    "override them) or --recipe demo: the built-in defaults are the CPU demo's "
                    "(lr 1e-3, warm-up and cosine), wrong for fine-tuning DeiT")
    settings = train_recipe(recipe, args) if recipe else args
    return TrainOptions(**settings, recipe=recipe)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    try:
        result = run_training(options)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"train_sat: error: {e}", file=sys.stderr)
        return 2 if not isinstance(e, RuntimeError) else 1
    m = result["metrics"]
    print(json.dumps({
        "checkpoint": result["checkpoint"], "name": result["name"], "threshold": result["threshold"],
        "val_top1": m["val_top1"], "val_gt_known_loc": m["val_gt_known_loc"],
        "val_maxboxacc_v2": m["val_maxboxacc_v2"], "epochs": m["epoch"],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
