"""`make demo`: the whole loop on one machine, SAT beside the CAM baseline.

synthetic shards -> Ray Train (2 workers) for SAT and CAM -> localize the test split with
Ray actors -> WSOL evaluation -> a quality table, one DuckDB query, an overlay picture.
Every stage is skipped when its output exists, so a second run reuses the first.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass

from pipeline.train.recipes import recipe

SPLITS = {"train": 3000, "val": 500, "test": 1000}


@dataclass
class DemoOptions:
    workdir: str = "demo_out"
    epochs: int | None = 6  # the demo trains shorter than the recipe (10) to stay within minutes
    train_samples: int = SPLITS["train"]
    num_workers: int = 2
    seed: int = 0
    methods: tuple[str, ...] = ("sat", "cam")


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def make_data(opts: DemoOptions) -> dict[str, str]:
    from pipeline.datasets.synthetic import write_synthetic_shards

    specs = {}
    for split, n in SPLITS.items():
        n = opts.train_samples if split == "train" else n
        out = os.path.abspath(os.path.join(opts.workdir, "data", split))
        specs[split] = out + "/"
        if os.path.isdir(out) and any(f.endswith(".tar") for f in os.listdir(out)):
            say(f"data/{split}: exists, reused")
            continue
        say(f"data/{split}: writing {n} synthetic images")
        write_synthetic_shards(out, split, n, seed=opts.seed, image_size=64, shard_size=500)
    return specs


def train_method(method: str, specs: dict[str, str], opts: DemoOptions) -> str:
    from pipeline.train.job import run_training
    from pipeline.train.options import TrainOptions

    ckpt = os.path.abspath(os.path.join(opts.workdir, "checkpoints", f"{method}.safetensors"))
    if os.path.exists(ckpt):
        say(f"{method}: checkpoint exists, reused ({ckpt})")
        return ckpt
    settings = recipe(method)
    if opts.epochs:
        settings["epochs"] = opts.epochs
    say(f"{method}: training {settings['model']} for {settings['epochs']} epochs with {opts.num_workers} Ray Train workers")
    run_training(TrainOptions.from_settings(
        train_shards=specs["train"], val_shards=specs["val"], output=ckpt,
        storage_path=os.path.abspath(os.path.join(opts.workdir, "ray_train")), name=f"demo-{method}",
        num_workers=opts.num_workers, seed=opts.seed, **settings,
    ))
    return ckpt


def localize_method(method: str, ckpt: str, specs: dict[str, str], opts: DemoOptions) -> str:
    from pipeline.localize.run import LocalizeConfig, run_localize

    output = os.path.abspath(os.path.join(opts.workdir, "predictions"))
    summary = run_localize(LocalizeConfig(
        shards=specs["test"], checkpoint=ckpt, output=output, run_id=f"{method}-test", num_actors=2,
        precision="fp32",  # as the documented figures were made (the recipe trains in fp32 too)
    ))
    if summary.exit_code:
        raise RuntimeError(f"localization of the test split failed: {summary.failed_shards}")
    return summary.run_url


def evaluate_method(method: str, run_url: str, specs: dict[str, str], opts: DemoOptions) -> dict:
    from pipeline.evaluation.evaluate import evaluate_run

    result = evaluate_run(run_url, gt_shards=specs["test"])
    with open(os.path.join(opts.workdir, f"eval_{method}.json"), "w") as f:
        json.dump(result, f, indent=2)
    return result


def quality_table(results: dict[str, dict], seconds: dict[str, float]) -> str:
    cols = [("top1", "top-1"), ("gt_known_loc", "GT-known Loc"), ("maxboxacc", "MaxBoxAcc"),
            ("maxboxacc_v2", "MaxBoxAccV2"), ("pxap", "PxAP"), ("threshold", "tau (val)")]
    lines = ["| method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, r in results.items():
        cells = [f"{r[k]:.1f}" if isinstance(r.get(k), (int, float)) else "-" for k, _ in cols]
        cells[-1] = f"{r['threshold']:.2f}"
        lines.append(f"| {method.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


DEMO_QUERY = """
SELECT class_name, count(*) AS images, round(avg(score), 3) AS mean_score,
       round(avg(fg_ratio), 3) AS mean_fg_ratio,
       round(avg((box_x1 - box_x0) * (box_y1 - box_y0) / (width * height)), 3) AS mean_box_area
FROM read_parquet('{glob}') WHERE status = 'ok' GROUP BY class_name ORDER BY images DESC
"""


def query(run_url: str) -> str:
    import duckdb

    sql = DEMO_QUERY.format(glob=os.path.join(run_url, "*.parquet"))
    say("DuckDB:" + sql.rstrip())
    return str(duckdb.sql(sql))


def overlay(run_url: str, specs: dict[str, str], opts: DemoOptions, method: str) -> str:
    from pipeline.evaluation.overlays import images_from_shards, render_sheet, tiles_of_run

    tiles = tiles_of_run(run_url, num=16)
    sheet = render_sheet(tiles, images_from_shards(specs["test"], [t.key for t in tiles]), columns=4, tile=192)
    path = os.path.abspath(os.path.join(opts.workdir, f"overlay_{method}.png"))
    sheet.save(path)
    return path


def run_demo(opts: DemoOptions) -> dict:
    import ray

    from pipeline.local_ray import start_local_ray

    started = time.time()
    os.makedirs(opts.workdir, exist_ok=True)
    specs = make_data(opts)
    if not ray.is_initialized():
        # Its own temp dir: other Ray clusters on the machine are left alone.
        temp_dir = tempfile.mkdtemp(prefix="satloc-demo-ray-", dir="/tmp")
        start_local_ray(num_cpus=os.cpu_count() or 2, _temp_dir=temp_dir)
    results, seconds, runs = {}, {}, {}
    for method in opts.methods:
        t = time.time()
        ckpt = train_method(method, specs, opts)
        seconds[method] = time.time() - t
        runs[method] = localize_method(method, ckpt, specs, opts)
        results[method] = evaluate_method(method, runs[method], specs, opts)
    say("quality on the test split (threshold chosen on val; MaxBoxAccV2 over the tau grid):\n"
        + quality_table(results, seconds))
    first = opts.methods[0]
    say("per-class summary of the SAT run:\n" + query(runs[first]))
    pictures = [overlay(runs[m], specs, opts, m) for m in opts.methods]
    for p in pictures:
        say(f"overlay written: {p}")
    say(f"done in {time.time() - started:.0f}s; outputs under {os.path.abspath(opts.workdir)}")
    return {"results": results, "runs": runs, "overlays": pictures}
