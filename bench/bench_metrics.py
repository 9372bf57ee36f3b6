"""Benchmark the WSOL threshold sweep (pipeline/evaluation/metrics.py): prints figures, never fails.

In one run, on the same 10,000 random blobby 14 x 14 maps, 224 x 224, both MaxBoxAcc and
MaxBoxAccV2 (IoU 0.3/0.5/0.7):

- the baseline: satloc's earlier 101-tau sweep (bilinear, ``score >= tau``), read from git
  history at run time (``pipeline/metrics.py`` at commit ``BASELINE_COMMIT``, the last
  version of that sweep) into a temporary module: the bench needs the repository's git
  history;
- the default sweep now: wsolevaluation's rules, 1,000 taus (``metrics.sweep_loc_maps``);

and their ratio, wall and CPU (the goal: at most 1.5). Both run on ``--workers`` spawned
processes; the new sweep's workers each load numba's compiled code from its cache (or
compile it, where there is no writable cache: seconds per process). Then this process's
first call (the cache load), and the tests' OpenCV transcription of wsolevaluation on a
small subset, for an equality check and its speed.

    python bench/bench_metrics.py [--images 10000] [--workers 2] [--subset 20]
"""
from __future__ import annotations

import argparse
import atexit
import importlib
import importlib.util
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from types import ModuleType

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pipeline.evaluation import metrics  # noqa: E402

# pipeline/metrics.py here is the 101-tau sweep (basins, scipy's connected components),
# unchanged from 87aff0b until dcc5f71 replaced it with the wsolevaluation sweep.
BASELINE_COMMIT = "04cc7da"
BASELINE_PATH = "pipeline/metrics.py"
BASELINE_MODULE = "satloc_metrics_101_baseline"


def load_baseline() -> ModuleType:
    """The baseline sweep module, from ``git show BASELINE_COMMIT:BASELINE_PATH``.

    Written to a temporary directory put on ``sys.path`` (removed at exit), so that the
    sweep's spawned workers, which get this process's ``sys.path``, import it too.
    """
    spec = f"{BASELINE_COMMIT}:{BASELINE_PATH}"
    try:
        source = subprocess.run(
            ["git", "-C", ROOT, "show", spec], check=True, capture_output=True, text=True
        ).stdout
    except FileNotFoundError:
        sys.exit(f"bench_metrics: the baseline is read from git history ({spec}), but git is not installed")
    except subprocess.CalledProcessError as err:
        sys.exit(
            f"bench_metrics: cannot read the baseline {spec} from git in {ROOT}: {err.stderr.strip()}\n"
            "Run the bench in a clone of satloc with its history (a shallow clone or a source "
            "archive lacks that commit: git fetch --unshallow)."
        )
    folder = tempfile.mkdtemp(prefix="satloc_bench_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with open(os.path.join(folder, BASELINE_MODULE + ".py"), "w") as f:
        f.write(source)
    sys.path.insert(0, folder)
    return importlib.import_module(BASELINE_MODULE)


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
    path = os.path.join(ROOT, "tests", "pipeline", "evaluation", "test_metrics.py")
    spec = importlib.util.spec_from_file_location("satloc_test_metrics", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cv2_ious


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the sweep's workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"


def _timed(label: str, n: int, sweep_fn) -> tuple[float, float, "metrics.BoxSweep"]:
    start, cpu = time.perf_counter(), _cpu_seconds()
    sweep = sweep_fn()
    acc, tau = metrics.max_box_acc(sweep)
    v2, by_delta = metrics.max_box_acc_v2(sweep)
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    print(f"{label}: {seconds:.2f} s wall, {n / seconds:.0f} images/s; {cpu:.2f} CPU-s "
          f"({cpu / n * 1e3:.2f} ms per image; load average {os.getloadavg()[0]:.1f})")
    print(f"  MaxBoxAcc {acc:.2f} at tau {tau:.3f}; MaxBoxAccV2 {v2:.2f} ("
          + ", ".join(f"IoU {d}: {v:.2f} at tau {t:.3f}" for d, (v, t) in by_delta.items()) + ")")
    return seconds, cpu, sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subset", type=int, default=20, help="images for the OpenCV comparison")
    args = parser.parse_args()

    baseline = load_baseline()
    maps, gt = blobby_maps(args.images)
    widths = np.full(args.images, 224.0)
    print(f"CPU: {_cpu_model()}, {os.cpu_count()} cores; {args.images} maps 14x14 -> 224x224, "
          f"IoU {metrics.IOU_DELTAS}, {args.workers} worker process(es)")
    old_s, old_cpu, _ = _timed(f"baseline, {len(baseline.TAUS)} taus (satloc's earlier sweep, "
                               f"{BASELINE_COMMIT}:{BASELINE_PATH})", args.images,
                      lambda: baseline.sweep_loc_maps(maps, gt, workers=args.workers))
    gt_frame = metrics.wsol_gt_boxes(list(gt), widths, widths)
    new_s, new_cpu, _ = _timed(f"wsolevaluation sweep, {len(metrics.TAUS)} taus", args.images,
                      lambda: metrics.sweep_loc_maps(maps, gt_frame, workers=args.workers))
    print(f"ratio new / baseline: {new_s / old_s:.2f} wall, {new_cpu / old_cpu:.2f} CPU (goal <= 1.5; "
          f"the CPU ratio is the steadier one on a shared machine)")

    cv2_ious = _reference()
    subset = slice(0, args.subset)
    scores = metrics.wsol_score_maps(maps[subset])
    start = time.perf_counter()
    metrics.sweep_wsol_boxes(scores[:1], gt_frame[:1])  # this process's first call: loads the compiled code
    print(f"first sweep call in this process (numba cache load, or compile without a cache): "
          f"{time.perf_counter() - start:.2f} s")
    start = time.process_time()
    fast = metrics.sweep_wsol_boxes(scores, gt_frame[subset])
    fast_s = time.process_time() - start
    start = time.process_time()
    ref = [cv2_ious(scores[i], gt_frame[i], metrics.TAUS) for i in range(len(scores))]
    ref_s = time.process_time() - start
    same = all(
        np.array_equal(fast.largest_iou[i], r[0]) and np.array_equal(fast.best_iou[i], r[1]) for i, r in enumerate(ref)
    )
    print(f"subset of {args.subset} (CPU time, 1 process): ours {fast_s * 1e3 / args.subset:.2f} ms/image, "
          f"OpenCV per tau {ref_s * 1e3 / args.subset:.1f} ms/image; results identical: {same}")


if __name__ == "__main__":
    main()
