"""Training images/s: Ray Train (1 and 2 workers) against a plain single-process loop.

Same data (synthetic shards on local disk, streamed and augmented by
``pipeline.train.data``), same model, same step (``pipeline.train.loop.train_epoch``),
same machine. Images/s is measured per epoch over the training steps only (data
streaming, augmentation, forward, backward, optimizer and, under DDP, the gradient
all-reduce); the first epoch is a warm-up and is left out, and so are Ray's start-up and
the per-epoch validation, which are printed separately.

Processes. The plain loop runs in a fresh process in a session of its own with
OMP_NUM_THREADS set, like Ray's workers (see ``plain_loop`` for why the session matters).

Threads. The plain loop is measured with 1 torch thread and with one per core; the faster
is the reference (on a machine shared with other busy processes, 2 threads can be several
times slower than 1: every op waits for the more-delayed thread). Ray Train with 1 worker
gets the reference's thread count (the cost of Ray Train itself); with 2 workers each
gets cores / 2 (the whole machine, data-parallel). The reference runs again after the
Ray runs and the mean of both is used, so drifting load shows up as a spread, not a bias.

    python bench/bench_train.py [--images 512] [--epochs 3] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.local_ray import start_local_ray  # noqa: E402
from pipeline.datasets.synthetic import write_synthetic_shards  # noqa: E402
from pipeline.train.data import index_split  # noqa: E402
from pipeline.train.loader import train_batches  # noqa: E402
from pipeline.train.job import run_training  # noqa: E402
from pipeline.train.options import TrainOptions  # noqa: E402
from pipeline.train.loop import TrainConfig, build_model, build_optimizer, train_epoch  # noqa: E402


def plain_loop(args, train_dir: str, num_classes: int, threads: int) -> list[float]:
    """A fresh process with ``threads`` torch threads and OMP_NUM_THREADS=threads, in a
    session of its own, as Ray's worker processes are; images/s of each epoch.

    The session matters on Linux with autogroup scheduling (the default): CPU time is
    shared fairly between sessions first, so on a machine busy with other sessions a
    process in the bench's own session would get less CPU than a Ray worker and the ratio
    would measure the scheduler, not Ray Train.
    """
    cmd = [sys.executable, os.path.abspath(__file__), "--plain-threads", str(threads), "--images", str(args.images),
           "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--model", args.model,
           "--precision", args.precision, "--train-dir", train_dir, "--num-classes", str(num_classes)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, start_new_session=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plain_loop_in_ray(args, train_dir: str, num_classes: int, threads: int) -> list[float]:
    """The same plain loop hosted by a Ray task: a Ray worker process (its session, nice,
    environment) but no Ray Train. Against this, the ratio is Ray Train's own cost."""
    import ray

    task_args = argparse.Namespace(**dict(vars(args), plain_threads=threads, train_dir=train_dir,
                                          num_classes=num_classes))
    task = ray.remote(num_cpus=threads)(plain_loop_here)
    return ray.get(task.remote(task_args))


def plain_loop_here(args) -> list[float]:
    threads, train_dir, num_classes = args.plain_threads, args.train_dir, args.num_classes
    torch.set_num_threads(threads)
    cfg = TrainConfig(model=args.model, num_classes=num_classes, epochs=args.epochs, batch_size=args.batch_size,
                      lr=1e-3, precision=args.precision, seed=0)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg)
    index = index_split(train_dir, "train")
    steps = index.total // args.batch_size
    rates = []
    for epoch in range(args.epochs):
        batches = train_batches(index, rank=0, world=1, epoch=epoch, seed=0, batch_size=args.batch_size,
                                steps=steps, image_size=64, buffer_size=256)
        m = train_epoch(model, batches, optimizer, cfg, epoch, steps)
        rates.append(m["images"] / m["seconds"])
    return rates


def ray_train(args, workdir: str, train_dir: str, val_dir: str, workers: int,
              cpus_per_worker: float) -> tuple[list[float], float, float]:
    """(images/s per epoch, end-to-end seconds, seconds outside the training steps)."""
    options = TrainOptions.from_settings(
        train_shards=train_dir, val_shards=val_dir, output=f"{workdir}/out/w{workers}.safetensors",
        storage_path=f"{workdir}/runs", name=f"bench-w{workers}-{int(time.time())}", model=args.model,
        epochs=args.epochs, batch_size=args.batch_size, lr=1e-3, precision=args.precision,
        num_workers=workers, cpus_per_worker=cpus_per_worker, shuffle_buffer=256, verbose=False,
    )
    result = run_training(options)
    rates = [h["images_per_s"] for h in result["history"]]
    train_seconds = sum(h["seconds"] for h in result["history"])
    return rates, result["seconds"], result["seconds"] - train_seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="training images (64 px synthetic)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run; the first is a warm-up")
    p.add_argument("--batch-size", type=int, default=64, help="global batch")
    p.add_argument("--model", default="sat_vit_micro_patch8_64")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", help="default: a temporary directory, removed afterwards")
    p.add_argument("--plain-threads", type=int, help=argparse.SUPPRESS)  # the plain-loop subprocess
    p.add_argument("--train-dir", help=argparse.SUPPRESS)
    p.add_argument("--num-classes", type=int, default=10, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.plain_threads:
        print(json.dumps(plain_loop_here(args)))
        return

    import ray

    workdir = args.workdir or tempfile.mkdtemp(prefix="bt", dir="/tmp")
    temp_dir = tempfile.mkdtemp(prefix="rb", dir="/tmp")
    try:
        train_dir, val_dir = f"{workdir}/data/train/", f"{workdir}/data/val/"
        if not os.path.isdir(train_dir):
            write_synthetic_shards(train_dir, "train", args.images, seed=0, shard_size=max(1, args.images // 4))
            write_synthetic_shards(val_dir, "val", 64, seed=0, shard_size=64)
        num_classes = 10
        print(f"{args.images} images, batch {args.batch_size}, {args.epochs} epochs (first = warm-up), "
              f"{args.model}, {args.precision}, {args.cores} cores, load average {os.getloadavg()[0]:.1f}",
              flush=True)
        plain_by_threads = {}
        for threads in sorted({1, args.cores}):
            plain_by_threads[threads] = plain_loop(args, train_dir, num_classes, threads)[1:]
            print(f"plain loop, {threads} thread(s): {np.mean(plain_by_threads[threads]):.1f} img/s", flush=True)
        best = max(plain_by_threads, key=lambda t: np.mean(plain_by_threads[t]))
        start_local_ray(num_cpus=args.cores, _temp_dir=temp_dir)
        in_ray = plain_loop_in_ray(args, train_dir, num_classes, best)[1:]
        print(f"plain loop in a Ray task, {best} thread(s): {np.mean(in_ray):.1f} img/s", flush=True)
        results = {}
        for workers, cpus in ((1, best), (2, max(1, args.cores // 2))):
            rates, wall, overhead = ray_train(args, workdir, train_dir, val_dir, workers, cpus)
            results[(workers, cpus)] = (rates[1:], wall, overhead)
            print(f"Ray Train, {workers} worker(s) x {cpus} thread(s): {np.mean(rates[1:]):.1f} img/s", flush=True)
        ray.shutdown()
        again = plain_loop(args, train_dir, num_classes, best)[1:]
        epochs = plain_by_threads[best] + again
        plain = float(np.mean(epochs))
        print(f"\nload average now {os.getloadavg()[0]:.1f}")
        print(f"{'run':<34}{'img/s':>9}{'ratio':>8}{'end-to-end s':>14}{'outside steps s':>17}")
        for threads, rates in plain_by_threads.items():
            rate = plain if threads == best else float(np.mean(rates))
            note = f"   (reference; epochs {min(epochs):.0f}..{max(epochs):.0f})" if threads == best else ""
            print(f"{f'plain loop, {threads} thread(s)':<34}{rate:>9.1f}{rate / plain:>8.2f}{'':>14}{'':>17}{note}")
        in_ray_rate = float(np.mean(in_ray))
        print(f"{f'plain loop in a Ray task, {best} thr':<34}{in_ray_rate:>9.1f}{in_ray_rate / plain:>8.2f}")
        for (workers, cpus), (rates, wall, overhead) in results.items():
            rate = float(np.mean(rates))
            label = f"Ray Train {workers} worker(s) x {cpus} thr"
            print(f"{label:<34}{rate:>9.1f}{rate / plain:>8.2f}{wall:>14.1f}{overhead:>17.1f}"
                  f"   ({rate / in_ray_rate:.2f} x the loop in a Ray task)")
        print("\nratio = images/s / the reference plain loop's (target for Ray Train >= 0.85); 'outside "
              "steps' = Ray start-up, indexing, per-epoch validation and checkpoints, export. On a "
              "machine shared with other busy processes the figures move by tens of percent between "
              "runs; the row 'in a Ray task' runs the plain loop in the same kind of process as the "
              "Ray Train workers.")
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
