"""Benchmark the WSOL threshold sweep (pipeline/metrics.py): prints figures, never fails.

The full sweep of the issue's target: 10,000 random blobby 14 x 14 maps, evaluated at
224 x 224, 101 thresholds, every connected component, IoU levels 0.3/0.5/0.7 (MaxBoxAcc
and MaxBoxAccV2). Then the brute-force reference of the tests (one scipy.ndimage.label
per image per threshold) on a small subset, for the speed ratio and an equality check.

    python bench/bench_metrics.py [--images 10000] [--workers 2] [--subset 20]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline import metrics  # noqa: E402


def blobby_maps(n: int, seed: int = 0, grid: int = 14) -> tuple[np.ndarray, np.ndarray]:
    """uint8 maps made of 1-3 Gaussian blobs plus noise, and a GT box around the strongest
    blob (jittered), in 224-px coordinates."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:grid, 0:grid] + 0.5
    maps = np.zeros((n, grid, grid))
    strongest = np.zeros((n, 4))
    best_amp = np.zeros(n)
    for _ in range(3):
        cy, cx = rng.uniform(1, grid - 1, (2, n))
        sigma = rng.uniform(0.8, 3.5, n)
        amp = rng.uniform(0.2, 1.0, n) * (rng.random(n) < 0.8)
        d2 = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2
        maps += amp[:, None, None] * np.exp(-d2 / (2 * sigma[:, None, None] ** 2))
        win = amp > best_amp
        best_amp = np.where(win, amp, best_amp)
        half = 2 * sigma * 16
        box = np.stack([cx * 16 - half, cy * 16 - half, cx * 16 + half, cy * 16 + half], axis=1)
        strongest[win] = box[win]
    maps += rng.uniform(0, 0.1, maps.shape)
    maps = np.round(255 * maps / maps.max(axis=(1, 2), keepdims=True)).astype(np.uint8)
    jitter = rng.normal(0, 8, (n, 4))
    gt = np.clip(strongest + jitter, 0, 224)
    gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 4)
    return maps, gt[:, None, :]


def _reference():
    path = os.path.join(ROOT, "tests", "pipeline", "test_metrics.py")
    spec = importlib.util.spec_from_file_location("satloc_test_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.brute_force_sweep


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the sweep's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subset", type=int, default=20, help="images for the brute-force comparison")
    args = parser.parse_args()

    maps, gt = blobby_maps(args.images)
    print(f"{args.images} maps 14x14 -> 224x224, {len(metrics.TAUS)} taus, IoU {metrics.IOU_DELTAS}, "
          f"{args.workers} worker process(es), {os.cpu_count()} cores")
    start, cpu = time.perf_counter(), _cpu_seconds()
    sweep = metrics.sweep_loc_maps(maps, gt, workers=args.workers)
    acc, tau = metrics.max_box_acc(sweep)
    v2, by_delta = metrics.max_box_acc_v2(sweep)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    load = os.getloadavg()[0]
    print(f"full sweep: {seconds:.2f} s wall, {args.images / seconds:.0f} images/s; {cpu:.2f} CPU-s "
          f"({cpu / args.images * 1e3:.2f} ms per image; load average {load:.1f} on {os.cpu_count()} cores)")
    print(f"  MaxBoxAcc {acc:.2f} at tau {tau:.2f}; MaxBoxAccV2 {v2:.2f} ("
          + ", ".join(f"IoU {d}: {v:.2f} at tau {t:.2f}" for d, (v, t) in by_delta.items()) + ")")

    brute_force_sweep = _reference()
    subset = slice(0, args.subset)
    scores = metrics.score_maps(maps[subset])
    start = time.process_time()
    fast = metrics.sweep_boxes(scores, gt[subset])
    fast_s = time.process_time() - start
    start = time.process_time()
    largest, best = brute_force_sweep(scores, gt[subset], metrics.TAUS)
    brute_s = time.process_time() - start
    same = np.array_equal(fast.largest_iou, largest.astype(np.float32)) and np.array_equal(
        fast.best_iou, best.astype(np.float32)
    )
    print(f"subset of {args.subset} (CPU time, 1 process): vectorised {fast_s * 1e3 / args.subset:.2f} ms/image, "
          f"brute force {brute_s * 1e3 / args.subset:.1f} ms/image: {brute_s / fast_s:.0f}x faster; "
          f"results identical: {same}")


if __name__ == "__main__":
    main()
