"""Training input, images/s: train batches through ``pipeline.train.loader`` with 1 and 2
decode-and-augment processes, against the limit, a plain loop of the same work.

Data: ImageNet-like JPEGs (500x375, quality 90, textured: a smooth colour field, edges
and grain, about 60-100 KB each) in WebDataset shards on local disk.

- **Limit** (one process, one torch thread, as a loader process has): read the shards,
  decode, ``train_transform`` at 224 px, one image after another. Its img/s is what one
  process can do at best.
- **Loader, N processes**: ``TrainLoader(workers=N)`` for one Ray Train worker, batches of
  ``--batch-size`` (uint8, 224 px), everything a training step gets: reading and shuffling
  in the main process, chunks to the processes (in reusable shared-memory slots), decoding
  there, batches back in order. Its processes start in a warm-up epoch, which is not timed
  (a run starts them once). The timed epoch makes ``--passes`` passes over the images (the
  loader's stream reshuffles and goes on), so the figure is the steady rate a real epoch
  of 10^5 images runs at; the epoch's start (the shuffle buffer filling, the first chunk
  decoding while nothing comes out) is printed on its own, as the wait for the first batch.

Printed: img/s of each; per process, the loader's img/s / N / limit (target >= 0.85);
and 2 processes / 1 process (target >= 1.8x on 2 cores). Then a consumer that behaves
like a training step on a GPU (it sleeps 1.3 batches' worth of the 1-process rate: no
CPU, GIL released): the share of the epoch it waits for input, which is the main
process's own work (reading, packing, copy-out) wherever that runs in the step's thread. The limit is measured before
and after the loader runs and averaged (and the loader runs ``--rounds`` times, averaged),
so drifting load on a shared machine shows as a spread, not a bias. CPU time per image
(the main process's and the loader processes', from /proc) is printed too: it moves less
with the load, and says where the overhead is. No time fails anything: these are figures
to read.

    python bench/bench_ingest.py [--images 768] [--batch-size 32] [--rounds 2] [--passes 4]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.data.preprocess import train_transform  # noqa: E402
from pipeline.data.reader import decode_sample, read_samples  # noqa: E402
from pipeline.datasets.webdataset_writer import ShardWriter  # noqa: E402
from pipeline.train.data import index_split  # noqa: E402
from pipeline.train.loader import TrainLoader  # noqa: E402

WIDTH, HEIGHT, QUALITY, SIZE = 500, 375, 90, 224


def photo_like(rng: np.random.Generator) -> np.ndarray:
    """A 375 x 500 RGB image with the statistics JPEG cares about in a photo: smooth colour
    regions, a few hard edges, and grain at every scale (flat colours would compress 10x)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    field = np.zeros((HEIGHT, WIDTH, 3), np.float32)
    for _ in range(6):  # smooth colour field: low-frequency waves
        fx, fy = rng.uniform(0.002, 0.03, 2)
        phase = rng.uniform(0, 2 * np.pi)
        field += np.sin(x * fx + y * fy + phase)[..., None] * rng.uniform(10, 40, 3)
    for _ in range(3):  # objects: discs with hard edges
        cx, cy, r = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT), rng.uniform(30, 120)
        field[(x - cx) ** 2 + (y - cy) ** 2 < r * r] += rng.uniform(-60, 60, 3)
    coarse = rng.normal(0, 1, (HEIGHT // 4 + 1, WIDTH // 4 + 1, 3)).repeat(4, 0).repeat(4, 1)[:HEIGHT, :WIDTH]
    field += coarse * 10 + rng.normal(0, 9, (HEIGHT, WIDTH, 3))  # texture and grain
    return np.clip(field + 128, 0, 255).astype(np.uint8)


def write_shards(root: str, images: int, per_shard: int, seed: int = 0) -> tuple[str, float]:
    """Shards of ``images`` JPEGs under ``root``; (spec, mean JPEG size in KB)."""
    rng = np.random.default_rng(seed)
    sizes = []
    with ShardWriter(f"{root}/", prefix="train", max_count=per_shard) as writer:
        for i in range(images):
            buf = io.BytesIO()
            Image.fromarray(photo_like(rng)).save(buf, format="JPEG", quality=QUALITY)
            sizes.append(len(buf.getvalue()))
            writer.write(f"{i:06d}", {"jpg": buf.getvalue(), "cls": str(i % 10).encode()})
    return f"{root}/", float(np.mean(sizes)) / 1024


def limit(urls: list[str]) -> tuple[float, float]:
    """The plain loop: read, decode, augment, one process, one image at a time; (img/s, CPU ms an image)."""
    n = 0
    start, cpu = time.perf_counter(), time.process_time()
    for url in urls:
        for i, sample in enumerate(read_samples(url, decode=False)):
            decoded = decode_sample(sample)
            train_transform(decoded.image, SIZE, random.Random(f"bench-{i}"))
            n += 1
    return n / (time.perf_counter() - start), (time.process_time() - cpu) / n * 1000


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LoaderRun(NamedTuple):
    rate: float  # img/s after the first batch
    first_batch_s: float  # the epoch's start: wait for its first batch
    main_cpu: float  # CPU ms an image, the main process
    loaders_cpu: float  # CPU ms an image, the loader processes together
    in_slots: str  # chunks whose bytes travelled in a shared-memory slot, of all


@contextmanager
def warm_loader(index, workers: int, batch_size: int) -> Iterator[TrainLoader]:
    """A loader with ``workers`` processes, started by a short warm-up epoch (not timed: a
    run starts them once)."""
    with TrainLoader(index, rank=0, world=1, seed=0, batch_size=batch_size, image_size=SIZE, buffer_size=256,
                     workers=workers) as loader:
        for _ in loader.epoch(0, 2):
            pass
        yield loader


def loader_rate(index, workers: int, batch_size: int, steps: int) -> LoaderRun:
    """Train batches through the loader with ``workers`` processes, after a warm-up epoch.
    The rate counts from the first batch on (its wait is ``first_batch_s``)."""
    with warm_loader(index, workers, batch_size) as loader:
        pids = loader.loader_pids()
        start = time.perf_counter()
        batches = loader.epoch(1, steps)
        next(batches)
        first = time.perf_counter()
        before = [cpu_seconds(p) for p in pids]
        cpu = time.process_time()
        got = sum(len(labels) for _, labels in batches)
        end = time.perf_counter()
        main_cpu = (time.process_time() - cpu) / got * 1000
        loaders_cpu = sum(cpu_seconds(p) - b for p, b in zip(pids, before)) / got * 1000
        in_slots = "{}/{}".format(*loader.chunks_in_slots()) if loader.slots is not None else "no slots"
        return LoaderRun(got / (end - first), first - start, main_cpu, loaders_cpu, in_slots)


def stepped_rate(index, workers: int, batch_size: int, steps: int, step_s: float) -> tuple[float, float]:
    """Train batches consumed by a step that sleeps ``step_s`` (as a training step waiting
    on its GPU: no CPU, the GIL released), after a warm-up epoch: (img/s, the share of the
    epoch spent waiting for the next batch, as the train job's ``input wait``)."""
    with warm_loader(index, workers, batch_size) as loader:
        batches = loader.epoch(1, steps)
        next(batches)  # the epoch's start is not the steady state (printed above)
        waited, got = 0.0, 0
        start = time.perf_counter()
        while True:
            t = time.perf_counter()
            try:
                _, labels = next(batches)
            except StopIteration:
                break
            waited += time.perf_counter() - t
            got += len(labels)
            time.sleep(step_s)
        seconds = time.perf_counter() - start
        return got / seconds, waited / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--per-shard", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2, help="loader runs per process count (averaged)")
    p.add_argument("--passes", type=int, default=4,
                   help="passes over the images in the timed epoch (1: a short epoch, its start weighs more)")
    args = p.parse_args()
    torch.set_num_threads(1)  # as in a loader process (DataLoader sets 1)
    load = os.getloadavg()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"torch {torch.__version__}, {cpu}, {os.cpu_count()} CPUs, load average {load[0]:.1f} "
          "(a shared machine: compare the ratios, not the absolute figures)", flush=True)
    root = tempfile.mkdtemp(prefix="bench_ingest_")
    try:
        t = time.perf_counter()
        spec, kb = write_shards(root, args.images, args.per_shard)
        index = index_split(spec, "train")
        steps = index.total * args.passes // args.batch_size
        print(f"{index.total} JPEGs {WIDTH}x{HEIGHT} q{QUALITY}, mean {kb:.0f} KB, in {len(index.urls)} shards "
              f"(written in {time.perf_counter() - t:.0f} s); {SIZE} px, batch {args.batch_size}, timed epoch of {steps} steps ({args.passes} passes)",
              flush=True)
        limits = [limit(index.urls)]
        print(f"limit (plain loop, 1 process): {limits[0][0]:.1f} img/s, {limits[0][1]:.2f} CPU ms/img", flush=True)
        rates, cpu = {}, {}
        for workers in (1, 2):
            runs = [loader_rate(index, workers, args.batch_size, steps) for _ in range(args.rounds)]
            rates[workers] = float(np.mean([r.rate for r in runs]))
            cpu[workers] = (float(np.mean([r.main_cpu for r in runs])), float(np.mean([r.loaders_cpu for r in runs])))
            print(f"loader, {workers} process(es): {rates[workers]:.1f} img/s (runs: "
                  f"{', '.join(f'{r.rate:.1f}' for r in runs)}); CPU ms/img: main process {cpu[workers][0]:.2f}, "
                  f"loader processes {cpu[workers][1]:.2f}; first batch after "
                  f"{np.mean([r.first_batch_s for r in runs]) * 1000:.0f} ms; chunks in slots "
                  f"{', '.join(r.in_slots for r in runs)}", flush=True)
        limits.append(limit(index.urls))
        ref, ref_cpu = float(np.mean([x[0] for x in limits])), float(np.mean([x[1] for x in limits]))
        print(f"limit again: {limits[1][0]:.1f} img/s; reference (mean) {ref:.1f} img/s, {ref_cpu:.2f} CPU ms/img")
        for workers, rate in rates.items():
            print(f"per process, {workers} process(es): {rate / workers / ref:.2f} of the limit (target >= 0.85); "
                  f"by CPU time, limit / (loader + main) {ref_cpu / sum(cpu[workers]):.2f}")
        print(f"2 processes / 1 process: {rates[2] / rates[1]:.2f}x (target >= 1.8x on 2 cores)")
        step_s = 1.3 * args.batch_size / rates[1]
        rate, wait = stepped_rate(index, 1, args.batch_size, steps, step_s)
        print(f"with a training step of {step_s * 1000:.0f} ms a batch that waits without CPU, as a GPU step does "
              f"(1 loader process: auto on a 2-CPU GPU worker): input wait {wait:.1%} of the epoch, "
              f"{rate:.1f} img/s = {rate * step_s / args.batch_size:.2f} of the step's pace (the main process's "
              "reading, packing and copy-out run in the loader's prefetch thread, beside the step)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
