"""SAT against CAM with the same budget, through the project's own jobs (`make quality`).

For each family (the tuning family `birds` and the held-out `vehicles`), each seed and
each method: synthetic shards -> Ray Train (`pipeline.train.job`, the shipped recipe of
`pipeline/train/recipes.py`, threshold chosen on val inside the job) -> the localize job on the
test split -> the WSOL evaluation of that run. Prints one table per family with the mean
over seeds; every stage is cached under --workdir, so a rerun only adds what is missing.

    python bench/bench_quality.py --workdir bench_out/quality --seeds 0 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.train.recipes import PRETRAIN, recipe  # noqa: E402

SIZES = {"train": 5000, "val": 500, "test": 1000}
COLUMNS = [("top1", "top-1"), ("gt_known_loc", "GT-known Loc"), ("maxboxacc", "MaxBoxAcc"),
           ("maxboxacc_v2", "MaxBoxAccV2"), ("pxap", "PxAP"), ("train_s", "train s")]


def say(text: str) -> None:
    print(f"[quality] {text}", flush=True)


def data(workdir: str, family: str, seed: int, sizes: dict[str, int], num_classes: int = 10) -> dict[str, str]:
    from pipeline.datasets.synthetic import write_synthetic_shards

    specs = {}
    for split, n in sizes.items():
        out = os.path.join(workdir, "data", f"{family}-s{seed}", split)
        if not (os.path.isdir(out) and os.listdir(out)):
            write_synthetic_shards(out, split, n, seed=seed, family=family, num_classes=num_classes, shard_size=1000)
        specs[split] = out + "/"
    return specs


def train(workdir: str, name: str, specs: dict[str, str], settings: dict, seed: int, workers: int) -> tuple[str, float]:
    from pipeline.train.job import run_training
    from pipeline.train.options import TrainOptions

    ckpt = os.path.abspath(os.path.join(workdir, "checkpoints", f"{name}.safetensors"))
    timing = ckpt + ".seconds"
    if os.path.exists(ckpt) and os.path.exists(timing):
        return ckpt, float(open(timing).read())
    start = time.time()
    run_training(TrainOptions.from_settings(
        train_shards=specs["train"], val_shards=specs["val"], output=ckpt, name=name,
        storage_path=os.path.abspath(os.path.join(workdir, "ray_train")), num_workers=workers, seed=seed,
        verbose=True, **settings,
    ))
    seconds = time.time() - start
    with open(timing, "w") as f:
        f.write(f"{seconds:.1f}")
    return ckpt, seconds


def localize_and_evaluate(workdir: str, name: str, ckpt: str, specs: dict[str, str]) -> dict:
    from pipeline.evaluation.evaluate import evaluate_run
    from pipeline.localize.run import LocalizeConfig, run_localize

    result_path = os.path.join(workdir, "eval", f"{name}.json")
    if os.path.exists(result_path):
        return json.load(open(result_path))
    summary = run_localize(LocalizeConfig(
        shards=specs["test"], checkpoint=ckpt, output=os.path.abspath(os.path.join(workdir, "predictions")),
        run_id=name, num_actors=2, precision="fp32",  # as the documented figures were made
    ), out=None)
    result = evaluate_run(summary.run_url, gt_shards=specs["test"])
    os.makedirs(os.path.dirname(result_path), exist_ok=True)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def pretrained_backbone(workdir: str, seed: int, workers: int) -> str:
    """The ImageNet stand-in: a classifier trained on the plumage family (docs/quality.md)."""
    specs = data(workdir, "plumage", seed + 100, {"train": PRETRAIN["train_samples"], "val": 500},
                 num_classes=PRETRAIN["num_classes"])
    ckpt, _ = train(workdir, f"pretrain-plumage-s{seed}", specs, dict(PRETRAIN["settings"]), seed, workers)
    return ckpt


def table(rows: dict[str, list[dict]]) -> str:
    head = "| method | seeds | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [head, "|---" * (len(COLUMNS) + 2) + "|"]
    for method, results in rows.items():
        cells = []
        for key, _ in COLUMNS:
            values = [r[key] for r in results if isinstance(r.get(key), (int, float))]
            per_seed = "/".join(f"{v:.1f}" if key != "train_s" else f"{v:.0f}" for v in values)
            mean = sum(values) / len(values) if values else float("nan")
            cells.append(f"**{mean:.1f}** ({per_seed})" if key != "train_s" else f"{mean:.0f}")
        lines.append(f"| {method} | {len(results)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bench_out/quality")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--families", nargs="+", default=["birds", "vehicles"])
    p.add_argument("--methods", nargs="+", default=["sat", "cam"])
    p.add_argument("--epochs", type=int, default=None, help="override the recipes' epochs (quick runs)")
    p.add_argument("--train-samples", type=int, default=SIZES["train"])
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    from pipeline.local_ray import start_local_ray

    start_local_ray(num_cpus=os.cpu_count() or 2)
    sizes = dict(SIZES, train=a.train_samples)
    for family in a.families:
        rows: dict[str, list[dict]] = {m: [] for m in a.methods}
        for seed in a.seeds:
            specs = data(a.workdir, family, seed, sizes)
            for method in a.methods:
                settings = recipe(method)
                if a.epochs:
                    settings["epochs"] = a.epochs
                if settings.pop("pretrain", False):
                    settings["pretrained"] = pretrained_backbone(a.workdir, seed, a.workers)
                name = f"{family}-{method}-s{seed}" + (f"-e{a.epochs}" if a.epochs else "")
                say(f"{name}: training")
                ckpt, seconds = train(a.workdir, name, specs, settings, seed, a.workers)
                result = dict(localize_and_evaluate(a.workdir, name, ckpt, specs), train_s=seconds)
                rows[method].append(result)
                say(f"{name}: " + ", ".join(f"{k} {result.get(k)}" for k, _ in COLUMNS))
        print(f"\n{family} (test split, {len(a.seeds)} seeds: mean (per seed); threshold chosen on val)")
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
