"""Train SAT (or the CAM baseline) on WebDataset shards with Ray Train; export a satloc checkpoint.

    python jobs/train_sat.py --train-shards s3://b/wds/train-{000000..000127}.tar \\
        --val-shards s3://b/wds/val-000000.tar --model sat_deit_small_patch16_224 \\
        --pretrained deit_small.pth --epochs 30 --batch-size 256 --lr 1e-4 \\
        --num-workers 8 --use-gpu --storage-path s3://b/runs --name cub-sat --output s3://b/models/cub-sat.safetensors

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

from pipeline.train_job import TrainOptions, run_training  # noqa: E402
from pipeline.train_loop import FREEZE_MODES, PRECISIONS  # noqa: E402
from pipeline.val_threshold import THRESHOLD_METRICS  # noqa: E402

D = TrainOptions.__dataclass_fields__


def _default(name: str):
    return D[name].default


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
    p.add_argument("--train-shards", required=True, help="shard spec of the labelled training split")
    p.add_argument("--val-shards", required=True, help="shard spec of the labelled val split with GT boxes")
    p.add_argument("--model", default=_default("model"), help="a create_model name (sat_*/cam_*) or a backbone")
    p.add_argument("--img-size", type=int, help="input size (default: the backbone's)")
    p.add_argument("--model-kwargs", type=_json_object, default={},
                   help='JSON overrides, e.g. \'{"depth": 6, "embed_dim": 128, "num_heads": 4, "patch_size": 8}\'')
    p.add_argument("--method", choices=("sat", "cam"), help="replaces the method prefix of --model")
    p.add_argument("--pretrained", help="DeiT/official SAT weights or a satloc checkpoint (two-stage recipe)")
    p.add_argument("--epochs", type=int, default=_default("epochs"))
    p.add_argument("--batch-size", type=int, default=_default("batch_size"), help="global, across workers")
    p.add_argument("--lr", type=float, default=_default("lr"))
    p.add_argument("--weight-decay", type=float, default=_default("weight_decay"))
    p.add_argument("--warmup-epochs", type=float, default=_default("warmup_epochs"))
    p.add_argument("--alpha", type=float, default=_default("alpha"), help="target map area")
    p.add_argument("--area-weight", type=float, default=_default("area_weight"))
    p.add_argument("--norm-weight", type=float, default=_default("norm_weight"))
    p.add_argument("--spatial-loss-start", type=float, default=_default("spatial_loss_start"),
                   help="epochs before the area and normalization terms start")
    p.add_argument("--spatial-loss-ramp", type=float, default=_default("spatial_loss_ramp"),
                   help="epochs over which they ramp to full weight")
    p.add_argument("--backbone-lr-scale", type=float, default=_default("backbone_lr_scale"),
                   help="the backbone's lr as a fraction of the token's and head's")
    p.add_argument("--freeze", choices=FREEZE_MODES, default=_default("freeze"),
                   help="token: only the spatial token, its position embedding, the head and the re-weighted blocks train")
    p.add_argument("--images-per-class", type=int, help="few-shot: the first N keys of each class (sorted)")
    p.add_argument("--num-workers", type=int, default=_default("num_workers"))
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--precision", choices=PRECISIONS, default=_default("precision"))
    p.add_argument("--storage-path", required=True, help="Ray Train run storage: a directory or s3:// URL")
    p.add_argument("--name", help="run name (same name + storage path = resume)")
    p.add_argument("--seed", type=int, default=_default("seed"))
    p.add_argument("--output", required=True, help="URL of the final satloc checkpoint")
    p.add_argument("--threshold-metric", choices=THRESHOLD_METRICS, default=_default("threshold_metric"),
                   help="what the box threshold is chosen for on the val split")
    p.add_argument("--max-failures", type=int, default=_default("max_failures"),
                   help="worker failures Ray Train recovers from (from the last checkpoint)")
    args = vars(p.parse_args(argv))
    return TrainOptions(**args)


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
