"""Localize throughput: the Ray job end to end against its limits (issue 4, item 6).

Prints (never pass/fail), all on the same shards, model, batch and precision:
- bare model forward (uint8 batch already in memory -> normalize -> model), img/s;
- a plain single-process loop as the official evaluator does it: decode one image at a
  time, fp32 model on batches, boxes labelled one image at a time; img/s;
- the worker alone (``ShardLocalizer`` in this process, no Ray) on one shard;
- ``run_localize`` with in-process Ray: 1 actor x 2 CPUs and 2 actors x 1 CPU on 4 shards,
  then 4 vs 40 shards (cost per image should stay flat); processing img/s (actors ready to
  last shard written) and wall time with actor start-up;
- Parquet bytes per image (target <= 400 with a 14 x 14 map) on a 1000-row shard;
- scheduling overhead per shard (driver round trip minus time in the actor) against
  the processing time of a 1000-sample shard (target < 1%).

- with ``--device`` / ``--decode``: the worker alone on that device with each decode path
  (``cpu``: PIL per sample on ``--decode-threads`` threads, default all cores; ``gpu``: JPEGs in
  batches with nvJPEG; ``batched``: the same batched code on the CPU), end-to-end img/s
  against the bare forward of the same model and precision on that device.

    python bench/bench_localize.py                       # micro ViT, 112 px input, 14x14 map
    python bench/bench_localize.py --model sat_deit_tiny_patch16_224 --per-shard 40
    # the GPU check: DeiT-S at 224 over ImageNet-like JPEGs (500x375, q90), CPU vs GPU decode
    python bench/bench_localize.py --model sat_deit_small_patch16_224 --device cuda --decode both \
        --precision bf16 --batch-size 128 --imagenet-like --alone-images 4000 --worker-only
    # a tiny CPU run of the same comparison (seconds)
    python bench/bench_localize.py --decode both-cpu --worker-only --alone-images 64 --per-shard 16
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from model.boxes import boxes_from_maps  # noqa: E402
from model.checkpoint import default_config  # noqa: E402
from pipeline.data.checkpoints import load_checkpoint, save_checkpoint  # noqa: E402
from model.factory import create_model  # noqa: E402
from pipeline.localize.rows import RowSettings  # noqa: E402
from model.precision import autocast_for  # noqa: E402
from pipeline.localize.worker import ShardLocalizer, WorkerSettings  # noqa: E402
from pipeline.data.preprocess import normalize, resize_to_input, stack_uint8  # noqa: E402
from pipeline.data.reader import read_samples  # noqa: E402
from pipeline.localize.messages import ShardJob  # noqa: E402
from pipeline.datasets.webdataset_writer import ShardWriter  # noqa: E402


def photo_like_jpeg(rng: np.random.Generator, imagenet_like: bool = False) -> bytes:
    """An ImageNet-sized JPEG (about 400 x 330, smooth content plus texture, quality 90);
    ``imagenet_like``: 500 x 375 or 375 x 500, ImageNet's most common sizes."""
    w, h = int(rng.integers(320, 500)), int(rng.integers(260, 400))
    if imagenet_like:
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
    coarse = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
    base += rng.normal(0, 12, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(directory: str, shards: int, per_shard: int, seed: int = 0, imagenet_like: bool = False) -> list[str]:
    rng = np.random.default_rng(seed)
    pool = [photo_like_jpeg(rng, imagenet_like) for _ in range(min(per_shard, 64))]  # reuse: decoding cost is what counts
    with ShardWriter(directory, "bench", max_count=per_shard, progress=None) as writer:
        for i in range(shards * per_shard):
            label = i % 10
            box = json.dumps({"label": label, "boxes": [[10, 10, 200, 150]]}).encode()
            writer.write(f"s{i:07d}", {"jpg": pool[i % len(pool)], "cls": str(label).encode(), "json": box})
    return writer.urls


def bare_forward(model, config, size, batch, precision, images, device="cpu") -> float:
    """uint8 batch already on ``device`` -> normalize -> model, img/s."""
    device = torch.device(device)
    model = model.to(device)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.no_grad(), autocast_for(precision, device):
        for _ in range(2 if device.type == "cuda" else 1):  # warm-up (cuDNN picks its kernels)
            model(normalize(x, config["mean"], config["std"]))
        sync()
        t0 = time.perf_counter()
        done = 0
        while done < images:
            model(normalize(x, config["mean"], config["std"]))
            done += batch
        sync()
    return done / (time.perf_counter() - t0)


def plain_loop(model, config, size, batch, shard_urls) -> tuple[float, int]:
    """The official evaluator's shape: one image decoded at a time, fp32, boxes per image."""
    t0 = time.perf_counter()
    n = 0
    with torch.no_grad():
        for url in shard_urls:
            pending = []
            for sample in read_samples(url):
                pending.append(sample)
                if len(pending) == batch:
                    n += _plain_batch(model, config, size, pending)
                    pending = []
            if pending:
                n += _plain_batch(model, config, size, pending)
    return n / (time.perf_counter() - t0), n


def _plain_batch(model, config, size, samples) -> int:
    x = normalize(stack_uint8([resize_to_input(s.image, size) for s in samples]), config["mean"], config["std"])
    out = model(x)
    for s, loc_map in zip(samples, out.loc_map):
        boxes_from_maps(loc_map[None], [(s.width, s.height)], config["threshold"])
    return len(samples)


def parquet_bytes_per_image(grid: int, rows: int = 1000) -> dict[str, float]:
    """Bytes per row of a 1000-row file whose maps are smooth blobs (like a trained model's)
    or uniform noise (the incompressible worst case)."""
    from pipeline.localize.rows import localize_rows
    from pipeline.results.parquet import parquet_bytes
    from pipeline.data.reader import Sample
    from pipeline.results.schema import localize_schema

    rng = np.random.default_rng(0)
    samples = [Sample(key=f"train_{i:07d}", shard="s3://bucket/wds/train-000000.tar", width=500, height=375,
                      label=i % 1000, gt_boxes=[[10.0, 20.0, 300.0, 200.0]]) for i in range(rows)]
    settings = RowSettings(threshold=0.3, model_sha256="ab" * 32, class_names=tuple(f"class{i}" for i in range(1000)))
    schema = localize_schema(grid, grid, run_id="bench")
    yy, xx = np.mgrid[0:grid, 0:grid]
    centres = rng.uniform(0, grid, (rows, 2))
    widths = rng.uniform(1.5, grid / 2, rows)
    smooth = np.exp(-((yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2)
                    / (2 * widths[:, None, None] ** 2))
    smooth = 0.05 + 0.9 * smooth + rng.normal(0, 0.01, smooth.shape)
    maps = {"smooth": torch.tensor(smooth, dtype=torch.float32)[:, None].clamp(0, 1),
            "noise": torch.rand(rows, 1, grid, grid)}
    logits = torch.randn(rows, 1000)
    out = {}
    for name, m in maps.items():
        table = localize_rows(samples, logits, m, settings, schema)
        out[name] = len(parquet_bytes(table, "token")) / rows
    return out


def worker_alone(model, config, batch, precision, shard_url, out_dir, device="cpu", decode="cpu",
                 threads=2, warm_url=None) -> tuple[float, object]:
    """The worker in this process on ``device`` with ``decode``; ``warm_url`` runs first, untimed."""
    settings = WorkerSettings(batch_size=batch, precision=precision, decode_threads=threads, decode=decode)
    rows = RowSettings(threshold=config["threshold"], model_sha256=config["sha256"])
    localizer = ShardLocalizer(model, config, settings, rows, device)
    name = f"alone-{decode}-{device}".replace(":", "")
    if warm_url:
        localizer.localize(ShardJob(warm_url, os.path.join(out_dir, f"{name}-warm.parquet")))
    result = localizer.localize(ShardJob(shard_url, os.path.join(out_dir, f"{name}.parquet")))
    localizer.close()
    return result.images / result.seconds, result


DECODE_RUNS = {  # --decode -> the worker decode paths it compares
    "cpu": ("cpu",), "gpu": ("gpu",), "batched": ("batched",), "both": ("cpu", "gpu"), "both-cpu": ("cpu", "batched"),
}


def check_device_options(args) -> str | None:
    """Why ``--device``/``--decode``/``--precision`` cannot run together, or None."""
    if args.device == "cuda" and not torch.cuda.is_available():
        return "--device cuda: torch sees no CUDA GPU on this machine (use --device cpu)"
    if args.device == "cpu" and "gpu" in DECODE_RUNS[args.decode]:
        return f"--decode {args.decode} decodes on the GPU and needs --device cuda (on CPU: --decode cpu, batched or both-cpu)"
    if args.device == "cpu" and args.precision == "fp16":
        return "--precision fp16 needs --device cuda (use bf16 or fp32 on CPU)"
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


def decode_comparison(args, model, config, size, urls, big, work) -> dict:
    """The worker alone on --device with each --decode path, against the bare forward there;
    the figures as a dict (``--json``)."""
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    bare = bare_forward(model, config, size, args.batch_size, args.precision, max(512, 4 * args.batch_size), device)
    print(f"bare model forward on {device}:     {bare:8.1f} img/s ({args.precision}, batch {args.batch_size})")
    figures = {"model": args.model, "device": str(device), "precision": args.precision, "batch": args.batch_size,
               "images": args.alone_images, "imagenet_like": args.imagenet_like, "bare_forward_img_s": bare,
               "decode": {}}
    for decode in DECODE_RUNS[args.decode]:
        threads = args.decode_threads or os.cpu_count() or 1
        rate, r = worker_alone(model, config, args.batch_size, args.precision, big, work, device, decode, threads, urls[0])
        bare_after = bare_forward(model, config, size, args.batch_size, args.precision, max(256, 2 * args.batch_size), device)
        how = f"{threads} decode threads" if decode == "cpu" else f"batched on {device}, {r.decode_fallbacks} on CPU"
        print(f"worker alone on {device}, --decode {decode} ({how}): {rate:8.1f} img/s = "
              f"{rate / ((bare + bare_after) / 2):.2f} of bare forward; decode wait {r.decode_wait_seconds:.2f}s, "
              f"model {r.model_seconds:.2f}s, write {r.write_seconds:.2f}s of {r.seconds:.2f}s")
        figures["decode"][decode] = {
            "img_s": rate, "of_bare_forward": rate / ((bare + bare_after) / 2), "decode_threads": threads,
            "cpu_fallbacks": r.decode_fallbacks, "decode_wait_s": r.decode_wait_seconds,
            "model_s": r.model_seconds, "seconds": r.seconds,
        }
    return figures


def ray_run(shards_dir, checkpoint, out_dir, run_id, actors, cpus, batch, precision, limit):
    from pipeline.localize.run import LocalizeConfig, run_localize

    t0 = time.perf_counter()
    summary = run_localize(
        LocalizeConfig(
            shards=shards_dir, checkpoint=checkpoint, output=out_dir, run_id=run_id, num_actors=actors,
            cpus_per_actor=cpus, gpus_per_actor=0, batch_size=batch, precision=precision, limit=limit,
            progress_seconds=30,
        ),
        out=None,
    )
    wall = time.perf_counter() - t0
    manifest = json.loads(open(summary.manifest_url).read())
    return summary, wall, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sat_vit_micro_patch8_64")
    ap.add_argument("--img-size", type=int, default=112, help="micro model input (112 / patch 8 = 14x14 map)")
    ap.add_argument("--per-shard", type=int, default=50, help="images per shard")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="fp16: --device cuda only")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the worker-alone runs go")
    ap.add_argument("--decode", default="cpu", choices=tuple(DECODE_RUNS),
                    help="decode paths of the worker-alone runs: cpu, gpu (needs --device cuda), batched (the "
                         "batched code on --device), both (cpu and gpu), both-cpu (cpu and batched on CPU)")
    ap.add_argument("--decode-threads", type=int, help="CPU decode threads (default: all cores)")
    ap.add_argument("--imagenet-like", action="store_true", help="shards of 500x375 / 375x500 textured q90 JPEGs")
    ap.add_argument("--worker-only", action="store_true",
                    help="only the bare forward and the worker-alone runs of --device/--decode (the GPU check)")
    ap.add_argument("--skip-40", action="store_true", help="skip the 40-shard run")
    ap.add_argument("--alone-images", type=int, default=1000, help="images in the worker-alone shard")
    ap.add_argument("--json", help="write the --device/--decode comparison's figures to this file")
    args = ap.parse_args()
    problem = check_device_options(args)
    if problem:
        ap.error(problem)

    work = tempfile.mkdtemp(prefix="bench_localize_")
    try:
        kwargs = {"img_size": args.img_size} if "micro" in args.model else {}
        torch.manual_seed(0)
        model = create_model(args.model, 10, **kwargs)
        checkpoint = os.path.join(work, "model.safetensors")
        save_checkpoint(model, checkpoint, default_config(args.model, 10, model_kwargs=kwargs))
        model, config = load_checkpoint(checkpoint)
        size = model.patch_embed.img_size[0]
        grid = model.grid if hasattr(model, "grid") else None
        shards_dir = os.path.join(work, "shards")
        urls = write_shards(shards_dir, 1 if args.worker_only else 40, args.per_shard, imagenet_like=args.imagenet_like)
        big = write_shards(os.path.join(work, "big"), 1, args.alone_images, seed=1, imagenet_like=args.imagenet_like)[0]
        gpu = f", GPU {torch.cuda.get_device_name(0)}" if args.device == "cuda" else ""
        kind = "ImageNet-like (500x375 q90)" if args.imagenet_like else "photo-sized"
        print(f"model {args.model} input {size} grid {grid}, batch {args.batch_size}, {args.precision}, "
              f"{args.per_shard} {kind} JPEGs per shard, {os.cpu_count()} CPUs ({cpu_name()}){gpu}")
        if args.worker_only or args.device == "cuda" or args.decode != "cpu":
            figures = decode_comparison(args, model, config, size, urls, big, work)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(figures, f, indent=1)
        if args.worker_only:
            return
        if args.device == "cuda":
            print("(the plain-loop, Ray and Parquet figures below run on CPU)")
        model = model.cpu()
        torch.set_num_threads(2)

        bare = bare_forward(model, config, size, args.batch_size, args.precision, max(256, 4 * args.per_shard))
        print(f"bare model forward:              {bare:8.1f} img/s")
        plain, _ = plain_loop(model, config, size, args.batch_size, urls[:4])
        bare_plain = (bare + bare_forward(model, config, size, args.batch_size, args.precision, 128)) / 2
        print(f"plain single-process loop (fp32): {plain:8.1f} img/s; bare forward around it {bare_plain:.1f} img/s")
        alone, result = worker_alone(model, config, args.batch_size, args.precision, big, work)
        print(f"worker alone, {args.alone_images}-image shard: {alone:8.1f} img/s (decode wait {result.decode_wait_seconds:.2f}s, "
              f"model {result.model_seconds:.2f}s, write {result.write_seconds:.2f}s of {result.seconds:.2f}s)")
        side = grid[0]
        sizes = parquet_bytes_per_image(side)
        print(f"Parquet bytes per image, 1000 rows, {side}x{side} map: this model {result.bytes_written / result.rows:.0f}, "
              f"smooth maps {sizes['smooth']:.0f}, noise maps (worst case) {sizes['noise']:.0f} (target <= 400)")

        import ray

        temp = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, _node_ip_address="127.0.0.1",
                 log_to_driver=False)
        try:
            results = {}
            bares = {}
            for actors, cpus in ((1, 2), (2, 1)):
                before = bare_forward(model, config, size, args.batch_size, args.precision, 128)
                s, wall, m = ray_run(shards_dir + "/", checkpoint, os.path.join(work, "out"), f"a{actors}",
                                     actors, cpus, args.batch_size, args.precision, 4)
                after = bare_forward(model, config, size, args.batch_size, args.precision, 128)
                bares[actors] = (before + after) / 2  # the machine is shared: compare like with like
                results[(actors, 4)] = (s, wall, m)
                print(f"ray {actors} actor(s) x {cpus} CPU, 4 shards:  {s.images_per_second:8.1f} img/s processing, "
                      f"{s.images / wall:6.1f} img/s with start-up ({wall:.1f}s); bare forward around it "
                      f"{bares[actors]:.1f} img/s")
            best = max((1, 2), key=lambda a: results[(a, 4)][0].images_per_second)
            if not args.skip_40:
                cpus = 2 // best
                s, wall, m = ray_run(shards_dir + "/", checkpoint, os.path.join(work, "out"), f"b{best}",
                                     best, cpus, args.batch_size, args.precision, 40)
                results[(best, 40)] = (s, wall, m)
                print(f"ray {best} actor(s), 40 shards:            {s.images_per_second:8.1f} img/s processing, "
                      f"{s.images / wall:6.1f} img/s with start-up ({wall:.1f}s)")
            s4 = results[(best, 4)][0]
            print(f"end to end / bare forward:        {s4.images_per_second / bares[best]:8.2f} (target >= 0.8)")
            print(f"end to end / plain loop:          {s4.images_per_second / plain:8.2f} (target >= 2); "
                  f"each against its own bare forward: {(s4.images_per_second / bares[best]) / (plain / bare_plain):.2f}")
            key = (best, 40) if (best, 40) in results else (best, 4)
            s, _, m = results[key]
            overhead = m["timings"]["scheduling_overhead_seconds_mean"]
            per_actor_rate = s.images_per_second / best
            shard_1000 = 1000 / per_actor_rate
            print(f"scheduling overhead per shard:    {overhead * 1000:8.1f} ms = "
                  f"{100 * overhead / shard_1000:.3f}% of a 1000-sample shard ({shard_1000:.1f}s) (target < 1%)")
        finally:
            ray.shutdown()
            shutil.rmtree(temp, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
