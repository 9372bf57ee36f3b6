"""Training img/s through the real input path against the bare training step (issue 15, 3d).

Prints (never pass/fail), same model, batch, precision and device:
- the bare step: ``pipeline.train.loop.train_epoch`` over one uint8 batch already on the
  device, repeated (forward, loss, backward, optimizer; no input work at all): img/s;
- the real path: synthetic shards of ``--image-size`` px JPEGs, read, decoded and augmented
  by the training input (``pipeline.train.loader.TrainLoader`` with ``--loader-workers``
  DataLoader processes), then the same ``train_epoch``: img/s and the share of step time
  spent waiting for input, measured over ``--seconds`` after a warm-up epoch;
- the ratio (goal on one GPU with 16 cores: >= 0.9).

``--ray yes`` runs the real path as the Ray Train job (``run_training``, 1 worker, the GPU
if ``--device cuda``, every core for its input) and reads img/s from its epoch metrics;
``--ray no`` runs the same loader and ``train_epoch`` in this process (what a Ray Train
worker runs, without Ray: the lent GPU machine has no Ray); ``auto``: Ray if it imports.

    python bench/bench_train_step.py --device cuda --model sat_deit_small_patch16_224 \\
        --image-size 224 --batch-size 256 --precision bf16 --seconds 120 --json train.json
    python bench/bench_train_step.py --device cpu --model sat_vit_micro_patch8_64 \\
        --image-size 64 --batch-size 8 --images 64 --seconds 3 --loader-workers 1   # seconds
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from pipeline.datasets.synthetic import write_synthetic_shards  # noqa: E402
from pipeline.train.data import index_split  # noqa: E402
from pipeline.train.loader import TrainLoader, auto_loader_workers  # noqa: E402
from pipeline.train.loop import TrainConfig, build_model, build_optimizer, train_epoch  # noqa: E402

SHARD_SIZE = 512


def write_shards(root: str, images: int, size: int) -> str:
    """``images`` synthetic JPEGs of ``size`` px in shards of SHARD_SIZE, written in parallel."""
    os.makedirs(root, exist_ok=True)
    counts = [min(SHARD_SIZE, images - start) for start in range(0, images, SHARD_SIZE)]
    with ProcessPoolExecutor(min(len(counts), os.cpu_count() or 1)) as pool:
        jobs = [pool.submit(write_synthetic_shards, root, f"train{i:04d}", n, seed=i, image_size=size,
                            shard_size=SHARD_SIZE) for i, n in enumerate(counts)]
        for job in jobs:
            job.result()
    return root + "/"


def config(args) -> TrainConfig:
    return TrainConfig(model=args.model, num_classes=10, epochs=1000, batch_size=args.batch_size, lr=1e-4,
                       warmup_epochs=0, precision=args.precision, seed=0)


def model_kwargs(args) -> dict:
    return {"img_size": args.image_size} if "micro" in args.model else {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step(args, device: torch.device, steps: int) -> float:
    """img/s of train_epoch over one on-device batch, after a warm-up epoch of 3 steps."""
    cfg = config(args)
    model = build_model(TrainConfig(**{**cfg.__dict__, "model_kwargs": model_kwargs(args)})).to(device)
    optimizer = build_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, args.image_size, args.image_size), dtype=torch.uint8,
                           generator=gen).to(device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=gen).to(device)
    train_epoch(model, [(images, labels)] * 3, optimizer, cfg, 0, steps, device)
    _sync(device)
    start = time.perf_counter()
    m = train_epoch(model, [(images, labels)] * steps, optimizer, cfg, 1, steps, device)
    _sync(device)
    return m["images"] / (time.perf_counter() - start)


def in_process(args, device: torch.device, shards: str, steps: int, workers: int) -> dict:
    """The real input path and train_epoch in this process: img/s and input-wait share."""
    cfg = TrainConfig(**{**config(args).__dict__, "model_kwargs": model_kwargs(args)})
    model = build_model(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    index = index_split(shards, "train")
    per_epoch = max(1, index.total // args.batch_size)
    images = seconds = waited = 0.0
    e = 0
    # One loader for the run, as a Ray Train worker keeps one: its processes start once.
    with TrainLoader(index, rank=0, world=1, seed=0, batch_size=args.batch_size, image_size=args.image_size,
                     buffer_size=min(1000, index.total), workers=workers, pin_memory=device.type == "cuda") as loader:
        train_epoch(model, loader.epoch(0, min(per_epoch, 3)), optimizer, cfg, 0, per_epoch, device)  # warm-up
        while images < steps * args.batch_size:
            e += 1
            m = train_epoch(model, loader.epoch(e, min(per_epoch, steps)), optimizer, cfg, e, per_epoch, device)
            _sync(device)
            images += m["images"]
            seconds += m["seconds"]
            waited += m["input_wait"] * m["seconds"]
    return {"img_s": images / seconds, "input_wait_share": waited / seconds, "epochs": e, "how": "in-process"}


def with_ray(args, shards: str, workdir: str, workers: int) -> dict:
    """The Ray Train job, 1 worker: img/s of the epochs after the first, from its metrics
    (which time the training steps only; each epoch's validation runs on a small split)."""
    from pipeline.local_ray import start_local_ray
    from pipeline.train.job import run_training
    from pipeline.train.options import TrainOptions

    cores = os.cpu_count() or 1
    per_epoch = max(1, args.images // args.batch_size)
    epochs = 2 + max(1, round(args.seconds * args.rate_hint / args.images)) if args.rate_hint else 3
    options = TrainOptions.from_settings(
        train_shards=shards, val_shards=write_shards(f"{workdir}/val", min(256, args.images), args.image_size), output=f"{workdir}/out.safetensors", storage_path=f"{workdir}/runs",
        name=f"bench-step-{int(time.time())}", model=args.model, model_kwargs=model_kwargs(args), epochs=epochs,
        batch_size=args.batch_size, lr=1e-4, precision=args.precision, num_workers=1,
        use_gpu=args.device == "cuda", cpus_per_worker=cores, loader_workers=workers, verbose=False,
        recipe="demo",
    )
    import ray

    start_local_ray(num_cpus=cores, num_gpus=1 if args.device == "cuda" else 0, _temp_dir=f"{workdir}/ray")
    try:
        result = run_training(options)
    finally:
        ray.shutdown()
    history = result["history"][1:] or result["history"]
    images = sum(h["images"] for h in history)
    seconds = sum(h["seconds"] for h in history)
    waited = sum(h["input_wait"] * h["seconds"] for h in history)
    return {"img_s": images / seconds, "input_wait_share": waited / seconds, "epochs": len(history),
            "steps_per_epoch": per_epoch, "how": "ray train, 1 worker"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--model", default="sat_vit_micro_patch8_64")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--images", type=int, default=512, help="images in the synthetic shards (read again each epoch)")
    ap.add_argument("--seconds", type=float, default=10, help="about how long the real path is measured")
    ap.add_argument("--loader-workers", default="auto",
                    help="DataLoader processes: auto (the train job's rule for a worker with every core) or a number")
    ap.add_argument("--ray", choices=("auto", "yes", "no"), default="auto")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU here (use --device cpu)")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    use_ray = args.ray == "yes"
    if args.ray == "auto":
        try:
            import ray  # noqa: F401
            use_ray = True
        except ImportError:
            use_ray = False
    cores = os.cpu_count() or 1
    workers = (auto_loader_workers(cores, args.device == "cuda") if args.loader_workers == "auto"
               else int(args.loader_workers))
    gpu = f", GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"{args.model} at {args.image_size} px, batch {args.batch_size}, {args.precision} on {device}{gpu}; "
          f"{cores} cores, {workers} loader processes; torch {torch.__version__}", flush=True)

    work = tempfile.mkdtemp(prefix="bench_train_step_")
    try:
        t0 = time.perf_counter()
        shards = write_shards(os.path.join(work, "shards"), args.images, args.image_size)
        print(f"wrote {args.images} synthetic {args.image_size} px images in {time.perf_counter() - t0:.1f}s", flush=True)
        probe = bare_step(args, device, 5)
        steps = max(5, int(args.seconds * probe / args.batch_size / 4))
        bare = bare_step(args, device, steps)
        print(f"bare training step (inputs on {device}): {bare:9.1f} img/s", flush=True)
        args.rate_hint = bare
        real_steps = max(5, int(args.seconds * bare / args.batch_size))
        if use_ray:
            real = with_ray(args, shards, work, workers)
        else:
            real = in_process(args, device, shards, real_steps, workers)
        ratio = real["img_s"] / bare
        print(f"real input path ({real['how']}):   {real['img_s']:9.1f} img/s = {ratio:.2f} of the bare step "
              f"(goal >= 0.9 on a GPU); waiting for input {real['input_wait_share'] * 100:.0f}% of step time",
              flush=True)
        figures = {"model": args.model, "device": str(device), "precision": args.precision,
                   "batch": args.batch_size, "image_size": args.image_size, "cores": cores,
                   "loader_workers": workers, "bare_step_img_s": bare, "real": real, "of_bare_step": ratio}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=1)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
