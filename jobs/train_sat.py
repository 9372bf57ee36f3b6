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
from pipeline.train.job import run_training  # noqa: E402
from pipeline.train.loader import AUTO, parse_loader_workers  # noqa: E402
from pipeline.train.options import TrainOptions, is_deit_size, resolve_model_name, setting_fields  # noqa: E402
from pipeline.train.loop import FREEZE_MODES, PRECISIONS, SCHEDULES  # noqa: E402
from pipeline.evaluation.threshold import THRESHOLD_METRICS  # noqa: E402

def _loader_workers(text: str) -> str | int:
    try:
        n = parse_loader_workers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--loader-workers ")) from None
    return AUTO if n is None else n


TRAIN_PRECISION_CHOICES = tuple(p for p in PRECISION_CHOICES if p == "auto" or p in PRECISIONS)
# Given as they are, never from a recipe: the data, the recipe itself, where the run goes.
PLACES = ("train_shards", "val_shards", "recipe", "storage_path", "name", "output")
# The flags in --help order: setting name, help, argparse extras. The flag is the name with
# dashes; its type and default come from the field (TrainConfig, SATLossConfig, TrainOptions).
FLAGS = (
    ("train_shards", "shard spec of the labelled training split", {}),
    ("val_shards", "shard spec of the labelled val split with GT boxes", {}),
    ("recipe", "every hyper-parameter of a known run (see above); explicit flags override it",
     dict(choices=tuple(TRAIN_RECIPES))),
    ("model", "a create_model name (sat_*/cam_*) or a backbone", {}),
    ("img_size", "input size (default: the backbone's)", {}),
    ("model_kwargs", 'JSON overrides, e.g. \'{"depth": 6, "embed_dim": 128, "num_heads": 4, "patch_size": 8}\' '
     "(merged into a recipe's)", {}),
    ("method", "replaces the method prefix of --model", dict(choices=("sat", "cam"))),
    ("pretrained", "DeiT/official SAT weights or a satloc checkpoint (two-stage recipe)", {}),
    ("epochs", "", {}),
    ("batch_size", "global, across workers", {}),
    ("lr", "", {}),
    ("schedule", "after the warm-up: cosine to zero, or constant (the official runs)", dict(choices=SCHEDULES)),
    ("weight_decay", "", {}),
    ("warmup_epochs", "", {}),
    ("alpha", "target map area", {}),
    ("area_weight", "", {}),
    ("norm_weight", "", {}),
    ("spatial_loss_start", "epochs before the area and normalization terms start", {}),
    ("spatial_loss_ramp", "epochs over which they ramp to full weight", {}),
    ("backbone_lr_scale", "the backbone's lr as a fraction of the token's and head's", {}),
    ("freeze", "token: only the spatial token, its position embedding, the head and the re-weighted blocks "
     "train; backbone: only the spatial token, its position embedding and the head train (a frozen "
     "backbone, e.g. DINOv2)", dict(choices=FREEZE_MODES)),
    ("images_per_class", "few-shot: the first N keys of each class (sorted)", {}),
    ("num_workers", "", {}),
    ("use_gpu", "", {}),
    ("cpus_per_worker", "CPUs Ray gives each worker (default 1); torch and the loader processes share them", {}),
    ("loader_workers", "decode-and-augment processes per worker: auto (CPUs - 1 with --use-gpu, else "
     "CPUs // 4) or a count; 0 decodes in one thread of the worker", dict(type=_loader_workers)),
    ("precision", "auto: bf16 on GPUs and native-bf16 CPUs, else fp32", dict(choices=TRAIN_PRECISION_CHOICES)),
    ("storage_path", "Ray Train run storage: a directory or s3:// URL", {}),
    ("name", "run name (same name + storage path = resume)", {}),
    ("seed", "", {}),
    ("output", "URL of the final satloc checkpoint", {}),
    ("threshold_metric", "what the box threshold is chosen for on the val split", dict(choices=THRESHOLD_METRICS)),
    ("max_failures", "worker failures Ray Train recovers from (from the last checkpoint)", {}),
)
FIELDS = setting_fields()


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object like '{\"depth\": 6}'")
    return value


def add_flag(p: argparse.ArgumentParser, name: str, help: str, extra: dict) -> None:
    """A setting's flag: absent unless given (so a recipe can fill it), its default shown."""
    field = FIELDS[name]
    kwargs = dict(extra)
    if field.kind is bool:
        kwargs["action"] = "store_true"
    elif field.kind is not str:
        kwargs["type"] = _json_object if field.kind is dict else field.kind
    flag = "--" + name.replace("_", "-")
    if name in PLACES:
        p.add_argument(flag, required=field.required, help=help, **kwargs)
        return
    default = field.default
    plain = isinstance(default, (int, float, str)) and not isinstance(default, bool)
    help = "; ".join(x for x in (help, f"default {default}" if plain else "") if x)
    p.add_argument(flag, default=argparse.SUPPRESS, help=help or None, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, help, extra in FLAGS:
        add_flag(p, name, help, extra)
    return p


def parse_args(argv: list[str] | None = None) -> TrainOptions:
    p = build_parser()
    args = vars(p.parse_args(argv))
    recipe = args.pop("recipe")
    if recipe is None:
        try:
            model = resolve_model_name(args.get("model", FIELDS["model"].default), args.get("method"))
        except ValueError as e:
            p.error(f"--model: {e}")
        if is_deit_size(model):
            p.error(f"--model {model} needs --recipe cub or imagenet (the paper's settings; flags you give "
                    "override them) or --recipe demo: the built-in defaults are the CPU demo's "
                    "(lr 1e-3, warm-up and cosine), wrong for fine-tuning DeiT")
    settings = train_recipe(recipe, args) if recipe else args
    try:
        return TrainOptions.from_settings(**settings, recipe=recipe)
    except ValueError as e:
        p.error(str(e))


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
