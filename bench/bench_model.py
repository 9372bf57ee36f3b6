"""SAT forward speed against plain DeiT, and map -> box speed against the official per-image path.

Prints (never pass/fail):
1. img/s of SAT DeiT-S (200 classes) and timm's plain ``deit_small_patch16_224`` (200
   classes) at 224 px, same batch and threads, fp32 and bf16 autocast, and the time ratio
   (target: SAT <= 1.10 x DeiT in bf16).
1b. The same for the self-supervised / newer backbones: SAT on DINOv2-S/B (with and without
   registers) and DeiT III-S against timm's plain model of the same layout at 224 px
   (``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``, ``deit3_small_patch16_224``;
   target: SAT <= 1.05 x the backbone in bf16).
2. Box extraction time per image: ``boxes_from_maps`` on batches of 14 x 14 maps for images
   of random sizes around 300-500 px, against the official per-image path (per image: min-max
   normalise on the grid, torch bilinear resize, ``>`` threshold, ``skimage.measure.label`` with
   connectivity 2, ``regionprops``, the largest region's bbox), whether both give the same
   boxes, the speed ratio (target >= 5 x) and the box time as a share of DeiT-S bf16 model
   time per image (target < 2 %).

The machine is shared, so timing noise is real: the variants run interleaved in repeated
rounds (alternating which goes first) and the figures are medians over rounds.

The allocator is held warm (``--allocator warm``, the default): the script re-runs itself
with glibc's ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` set high, so freed
activations stay in the heap and are reused. With glibc's defaults a forward of tens of MB
of activations maps fresh pages and returns them, and the page faults land on whichever
model's allocation pattern crosses glibc's moving thresholds: on DINOv2-B in bf16 the
SAT/backbone ratio then swings between 1.02 and 1.13 from run to run (the extra shows up
as GELU and copies, which write into fresh pages), against 1.02-1.05 held warm, and both
models run 10-15% faster. ``--allocator default`` measures with glibc's defaults.

    python bench/bench_model.py [--quick] [--threads N] [--batch 32] [--rounds R]
                                [--only model|backbones|boxes] [--backbones dinov2_small_patch14 ...]
                                [--device cpu|cuda] [--precisions bf16 ...] [--json PATH]
                                [--allocator warm|default]

On ``--device cuda`` (bench/gpu_check.sh uses it: ``--device cuda --only model --batch 256
--precisions bf16``) each forward is timed between ``torch.cuda.synchronize()`` calls, and
the CPU-time column is left out. ``--json`` writes the section 1 figures to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from skimage.measure import label, regionprops  # noqa: E402

from model import boxes_from_maps, create_model  # noqa: E402
from model.precision import autocast_for, native_bf16_cpu  # noqa: E402

SAT_TARGET = 1.10  # SAT time / DeiT time in bf16, at most
BACKBONE_TARGET = 1.05  # SAT time / its plain timm backbone's time in bf16, at most (1b)
# Our backbone name -> timm's plain model of the same layout.
TIMM_BACKBONES = {
    "dinov2_small_patch14": "vit_small_patch14_dinov2",
    "dinov2_small_patch14_reg4": "vit_small_patch14_reg4_dinov2",
    "dinov2_base_patch14": "vit_base_patch14_dinov2",
    "dinov2_base_patch14_reg4": "vit_base_patch14_reg4_dinov2",
    "deit3_small_patch16_224": "deit3_small_patch16_224",
}
BOX_SPEEDUP_TARGET = 5.0  # official per-image time / boxes_from_maps time, at least
BOX_SHARE_TARGET = 0.02  # boxes_from_maps time / DeiT-S bf16 model time per image, under


# ---------------------------------------------------------------- 1. model forward


DEVICE = torch.device("cpu")  # set by --device


def precision_context(precision: str):
    return autocast_for(precision, DEVICE)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def timed_forward(model: torch.nn.Module, x: torch.Tensor, precision: str) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one forward (on CUDA: until the GPU is done)."""
    with torch.inference_mode(), precision_context(precision):
        _sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        model(x)
        _sync()
        return time.perf_counter() - start, time.process_time() - cpu_start


def bench_models(
    batch: int, rounds: int, warmup: int, precisions: list[str], names: tuple[str, ...] = ("SAT", "DeiT")
) -> dict[str, dict[str, float]]:
    """Median wall seconds per batch for each (precision, model), the two models interleaved.

    The CPU-time ratio is printed too: on a busy machine it moves less than wall time
    (time spent descheduled does not count), so the two ratios together show the noise.
    """
    torch.manual_seed(0)
    builders = {
        "SAT": lambda: create_model("sat_deit_small_patch16_224", 200),
        "DeiT": lambda: timm.create_model("deit_small_patch16_224", pretrained=False, num_classes=200),
    }
    models = {name: builders[name]().eval().to(DEVICE) for name in names}
    x = torch.randn(batch, 3, 224, 224, device=DEVICE)
    results: dict[str, dict[str, float]] = {}
    for precision in precisions:
        for model in models.values():
            for _ in range(warmup):
                timed_forward(model, x, precision)
        times: dict[str, list[float]] = {name: [] for name in models}
        cpu: dict[str, list[float]] = {name: [] for name in models}
        for r in range(rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                wall, cpu_time = timed_forward(models[name], x, precision)
                times[name].append(wall)
                cpu[name].append(cpu_time)
        results[precision] = {name: statistics.median(t) for name, t in times.items()}
        if set(models) != {"SAT", "DeiT"}:
            print(f"  {precision:>4}: " + "   ".join(
                f"{name} {batch / t:6.1f} img/s ({t:.3f} s/batch)" for name, t in results[precision].items()
            ), flush=True)
            continue
        sat, deit = results[precision]["SAT"], results[precision]["DeiT"]
        cpu_ratio = statistics.median(cpu["SAT"]) / statistics.median(cpu["DeiT"])
        spread = {name: (min(t), max(t)) for name, t in times.items()}
        print(
            f"  {precision:>4}: SAT {batch / sat:6.1f} img/s ({sat:.3f} s/batch, range "
            f"{spread['SAT'][0]:.3f}-{spread['SAT'][1]:.3f})   DeiT {batch / deit:6.1f} img/s "
            f"({deit:.3f} s/batch, range {spread['DeiT'][0]:.3f}-{spread['DeiT'][1]:.3f})   "
            f"SAT/DeiT wall time {sat / deit:.3f}, CPU time {cpu_ratio:.3f}",
            flush=True,
        )
    return results


def bench_backbone_ratios(
    backbones: list[str], batch: int, rounds: int, warmup: int, precisions: list[str]
) -> dict[str, dict[str, float]]:
    """Per backbone and precision: SAT / plain timm model wall-time ratio (medians, interleaved)."""
    ratios: dict[str, dict[str, float]] = {}
    x = torch.randn(batch, 3, 224, 224, device=DEVICE)
    for backbone in backbones:
        torch.manual_seed(0)
        models = {
            "SAT": create_model(f"sat_{backbone}", 200).eval().to(DEVICE),
            "timm": timm.create_model(TIMM_BACKBONES[backbone], pretrained=False, num_classes=200,
                                      img_size=224).eval().to(DEVICE),
        }
        ratios[backbone] = {}
        for precision in precisions:
            for model in models.values():
                for _ in range(warmup):
                    timed_forward(model, x, precision)
            wall: dict[str, list[float]] = {name: [] for name in models}
            cpu: dict[str, list[float]] = {name: [] for name in models}
            for r in range(rounds):
                for name in models if r % 2 == 0 else reversed(models):
                    w, c = timed_forward(models[name], x, precision)
                    wall[name].append(w)
                    cpu[name].append(c)
            sat, ref = statistics.median(wall["SAT"]), statistics.median(wall["timm"])
            cpu_ratio = statistics.median(cpu["SAT"]) / statistics.median(cpu["timm"])
            ratios[backbone][precision] = sat / ref
            verdict = ""
            if precision == "bf16":
                verdict = f" (target <= {BACKBONE_TARGET:.2f}: {'met' if sat / ref <= BACKBONE_TARGET else 'MISSED'})"
            print(f"  {backbone:<26} {precision:>4}: SAT {batch / sat:6.1f} img/s, {TIMM_BACKBONES[backbone]} "
                  f"{batch / ref:6.1f} img/s; SAT/backbone wall time {sat / ref:.3f}{verdict}, CPU time "
                  f"{cpu_ratio:.3f}", flush=True)
    return ratios


# ---------------------------------------------------------------- 2. boxes


def smooth_maps(rng: np.random.Generator, n: int, grid: int = 14) -> torch.Tensor:
    """SAT-like maps: one to three soft blobs through a sigmoid, values in (0, 1)."""
    yy, xx = np.mgrid[0:grid, 0:grid]
    maps = np.zeros((n, 1, grid, grid))
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx, s = rng.uniform(0, grid), rng.uniform(0, grid), rng.uniform(1.0, 4.0)
            maps[i, 0] += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
        maps[i, 0] += rng.normal(0, 0.05, (grid, grid))
    return torch.from_numpy(1 / (1 + np.exp(-(4 * maps - 2)))).float()


def official_boxes(loc_maps: torch.Tensor, image_sizes, threshold: float) -> list[tuple[int, int, int, int]]:
    """The official SAT rule, one image at a time: normalise on the grid (with the 1e-5),
    upsample bilinearly, ``>``, label, the largest region's bbox."""
    boxes = []
    for loc_map, (width, height) in zip(loc_maps, image_sizes):
        m = loc_map[None].float()
        grid = (m - m.min()) / (m.max() - m.min() + 1e-5)
        norm = F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()
        regions = regionprops(label(norm > threshold, connectivity=2))
        if not regions:
            boxes.append((0, 0, width, height))
            continue
        r = max(regions, key=lambda region: region.area)  # first of the largest, in label order
        min_row, min_col, max_row, max_col = r.bbox
        boxes.append((min_col, min_row, max_col, max_row))
    return boxes


def bench_boxes(batch: int, n_batches: int, rounds: int, threshold: float, kind: str) -> tuple[float, float, int, int]:
    """Median seconds per image (boxes_from_maps, official) and (same boxes, images)."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(n_batches):
        if kind == "smooth":
            maps = smooth_maps(rng, batch)
        else:  # uniform noise: many small components, the labelling's worst case
            maps = torch.from_numpy(rng.random((batch, 1, 14, 14), dtype=np.float32))
        sizes = [(int(rng.integers(300, 501)), int(rng.integers(300, 501))) for _ in range(batch)]
        batches.append((maps, sizes))

    # Same boxes?
    same = total = 0
    for maps, sizes in batches:
        ours = boxes_from_maps(maps, sizes, threshold, mode="largest")
        theirs = official_boxes(maps, sizes, threshold)
        for box, ref in zip(ours, theirs):
            same += tuple(int(v) for v in box[0, :4].tolist()) == ref
            total += 1

    for maps, sizes in batches[:1]:  # warm up both
        boxes_from_maps(maps, sizes, threshold)
        official_boxes(maps, sizes, threshold)
    ours_t, theirs_t = [], []
    for r in range(rounds):
        a = b = 0.0
        for maps, sizes in batches:
            steps = [("ours", boxes_from_maps), ("theirs", official_boxes)]
            for name, fn in steps if r % 2 == 0 else reversed(steps):
                start = time.perf_counter()
                fn(maps, sizes, threshold)
                elapsed = time.perf_counter() - start
                if name == "ours":
                    a += elapsed
                else:
                    b += elapsed
        ours_t.append(a / total)
        theirs_t.append(b / total)
    return statistics.median(ours_t), statistics.median(theirs_t), same, total


# ---------------------------------------------------------------- main


def forward_figures(results: dict[str, dict[str, float]], args, rounds: int) -> dict:
    """Section 1 as JSON: img/s of each model and the SAT/DeiT time ratio per precision."""
    return {
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "batch": args.batch,
        "rounds": rounds,
        "forward": {
            p: {"sat_img_s": args.batch / r["SAT"], "deit_img_s": args.batch / r["DeiT"],
                "sat_over_deit_time": r["SAT"] / r["DeiT"]}
            for p, r in results.items()
        },
    }



WARM_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "4000000000", "MALLOC_TRIM_THRESHOLD_": "8000000000"}


def hold_allocator_warm() -> None:
    """Re-run this script with glibc's allocator keeping freed memory (module docstring).
    glibc reads these variables when a process starts, hence the re-exec."""
    if all(os.environ.get(k) == v for k, v in WARM_ALLOCATOR.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **WARM_ALLOCATOR})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and batches (a rough figure)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for both models")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=None, help="timing rounds (default 5, quick 2)")
    parser.add_argument("--box-batches", type=int, default=None, help="batches of maps (default 8, quick 3)")
    parser.add_argument("--threshold", type=float, default=0.4)
    parser.add_argument("--only", choices=["model", "backbones", "boxes"], default=None)
    parser.add_argument("--backbones", nargs="+", default=list(TIMM_BACKBONES), choices=list(TIMM_BACKBONES),
                        help="for 1b (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the models run (1, 1b)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="for 1 (default: both; bf16 is the one with a target)")
    parser.add_argument("--json", default=None, help="write section 1's figures to this file")
    parser.add_argument("--allocator", choices=["warm", "default"], default="warm",
                        help="warm (default): re-run with glibc's allocator keeping freed memory for reuse "
                             "(module docstring); default: glibc's defaults")
    args = parser.parse_args()
    if args.allocator == "warm":
        hold_allocator_warm()
    global DEVICE
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    DEVICE = torch.device(args.device)
    rounds = args.rounds or (2 if args.quick else 5)
    box_batches = args.box_batches or (3 if args.quick else 8)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    if DEVICE.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(DEVICE)} (CUDA {torch.version.cuda})", flush=True)
    print(
        f"torch {torch.__version__}, timm {timm.__version__}, {args.threads} threads, batch {args.batch}, "
        f"{rounds} rounds, {'quick' if args.quick else 'full'} run; load average {load[0]:.1f} "
        f"on {os.cpu_count()} CPUs (a shared machine: compare the ratios, not the absolute figures)\n"
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
        f"{'yes' if native_bf16_cpu() else 'no (bf16 autocast is emulated and slower than fp32 here)'}; "
        f"allocator {args.allocator}",
        flush=True,
    )

    deit_per_image: dict[str, float] = {}
    if args.only in (None, "model"):
        print(f"\n1. Forward, DeiT-S backbone, 224 px, 200 classes, batch {args.batch} (median over rounds)")
        results = bench_models(args.batch, rounds, warmup=1 if args.quick else 2, precisions=args.precisions)
        deit_per_image = {p: results[p]["DeiT"] / args.batch for p in results}
        if "bf16" in results:
            ratio = results["bf16"]["SAT"] / results["bf16"]["DeiT"]
            verdict = "met" if ratio <= SAT_TARGET else "MISSED"
            print(f"  bf16 SAT/DeiT wall time ratio {ratio:.3f} (target <= {SAT_TARGET:.2f}: {verdict})")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(forward_figures(results, args, rounds), f, indent=1)
    if args.only in (None, "backbones"):
        print(f"\n1b. Forward, SAT on other backbones against timm's plain model, 224 px, 200 classes, "
              f"batch {args.batch} (median over rounds)")
        bench_backbone_ratios(args.backbones, args.batch, rounds, warmup=1, precisions=["bf16", "fp32"])
    if args.only in (None, "boxes"):
        if set(deit_per_image) != {"fp32", "bf16"}:
            print("\n   (measuring DeiT-S alone for the share figure)")
            results = bench_models(args.batch, 2, 1, ["fp32", "bf16"], names=("DeiT",))
            deit_per_image = {p: results[p]["DeiT"] / args.batch for p in results}
        print(
            f"\n2. Boxes: 14x14 maps, images 300-500 px, batches of {args.batch}, "
            f"threshold {args.threshold}, mode largest (median over rounds)"
        )
        for kind in ("smooth", "noise"):
            ours, theirs, same, total = bench_boxes(args.batch, box_batches, rounds, args.threshold, kind)
            speedup = theirs / ours
            share = ours / deit_per_image["bf16"]
            print(
                f"  {kind:>6} maps: boxes_from_maps {ours * 1e3:.3f} ms/img, official per-image "
                f"{theirs * 1e3:.3f} ms/img, speedup {speedup:.2f}x (target >= {BOX_SPEEDUP_TARGET:.0f}x: "
                f"{'met' if speedup >= BOX_SPEEDUP_TARGET else 'MISSED'}); same boxes {same}/{total}\n"
                f"          {share * 100:.2f}% of DeiT-S bf16 model time per image "
                f"({deit_per_image['bf16'] * 1e3:.1f} ms; target < {BOX_SHARE_TARGET * 100:.0f}%: "
                f"{'met' if share < BOX_SHARE_TARGET else 'MISSED'}), "
                f"{ours / deit_per_image['fp32'] * 100:.2f}% of fp32 ({deit_per_image['fp32'] * 1e3:.1f} ms)",
                flush=True,
            )


if __name__ == "__main__":
    main()
