"""Training step time with a frozen backbone (``--freeze backbone``) against full fine-tuning.

Prints (never pass/fail) the seconds per training step of SAT on a backbone (default
DINOv2-S/14 with 4 registers, 224 px, batch 16, 200 classes) with ``freeze=none`` and
``freeze=backbone``, and their ratio (target: frozen >= 1.5 x faster per step). The step is
the training loop's own (``pipeline.train.loop.train_epoch`` on one batch: forward, SAT loss,
backward, AdamW), so what it times is what a worker runs. Random weights: speed does not
depend on them.

A frozen backbone still runs backward through every block (every block attends to the
spatial token, which trains), but skips the weight gradients and the optimizer update of
the backbone: roughly the backward's weight half and all of AdamW's work.

The machine is shared: the two modes run interleaved in rounds (alternating which goes
first) and the figures are medians over rounds; the CPU-time ratio is printed too (time
spent descheduled does not count in it, so it moves less on a busy machine).

    python bench/bench_freeze.py [--model sat_dinov2_small_patch14_reg4] [--batch 16] [--rounds 3]
                                 [--precision fp32 bf16] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from model.precision import native_bf16_cpu  # noqa: E402
from pipeline.train.loop import TrainConfig, build_model, build_optimizer, train_epoch, trainable_parameters  # noqa: E402

SPEEDUP_TARGET = 1.5  # full-fine-tuning step time / frozen-backbone step time, at least
MODES = ("none", "backbone")


def step_seconds(model, optimizer, cfg: TrainConfig, batch) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one step."""
    start, cpu_start = time.perf_counter(), time.process_time()
    train_epoch(model, [batch], optimizer, cfg, epoch=0, steps_per_epoch=1)
    return time.perf_counter() - start, time.process_time() - cpu_start


def bench(model_name: str, batch_size: int, rounds: int, precision: str, size: int) -> dict[str, dict[str, float]]:
    cfgs = {mode: TrainConfig(model=model_name, num_classes=200, freeze=mode, batch_size=batch_size, epochs=1,
                              lr=1e-4, warmup_epochs=0.0, schedule="constant", precision=precision)
            for mode in MODES}
    models = {mode: build_model(cfg) for mode, cfg in cfgs.items()}
    optimizers = {mode: build_optimizer(models[mode], cfgs[mode]) for mode in MODES}
    g = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (batch_size, 3, size, size), dtype=torch.uint8, generator=g),
             torch.randint(0, 200, (batch_size,), generator=g))
    for mode in MODES:  # warm-up: first-call allocations, AdamW state
        step_seconds(models[mode], optimizers[mode], cfgs[mode], batch)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode in MODES if r % 2 == 0 else reversed(MODES):
            wall, cpu_time = step_seconds(models[mode], optimizers[mode], cfgs[mode], batch)
            times[mode].append(wall)
            cpu[mode].append(cpu_time)
    for mode in MODES:
        trainable, total = trainable_parameters(models[mode])
        t = times[mode]
        print(f"  {precision:>4} freeze={mode:<8}: {statistics.median(t):6.3f} s/step (range {min(t):.3f}-"
              f"{max(t):.3f}), CPU {statistics.median(cpu[mode]):6.3f} s/step, "
              f"{batch_size / statistics.median(t):5.1f} img/s; trainable {trainable:,} of {total:,}", flush=True)
    return {"wall": {m: statistics.median(t) for m, t in times.items()},
            "cpu": {m: statistics.median(t) for m, t in cpu.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sat_dinov2_small_patch14_reg4")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=224, help="input size (the model is built for 224)")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} threads, {args.model}, batch {args.batch}, "
          f"{args.size} px, {args.rounds} rounds; load average {load[0]:.1f} on {os.cpu_count()} CPUs; "
          f"native bf16 {'yes' if native_bf16_cpu() else 'no'}", flush=True)
    for precision in args.precision:
        t = bench(args.model, args.batch, args.rounds, precision, args.size)
        speedup = t["wall"]["none"] / t["wall"]["backbone"]
        cpu_speedup = t["cpu"]["none"] / t["cpu"]["backbone"]
        verdict = "met" if speedup >= SPEEDUP_TARGET else "MISSED"
        print(f"  {precision:>4}: frozen backbone {speedup:.2f}x faster per step than full fine-tuning by wall "
              f"time (target >= {SPEEDUP_TARGET}: {verdict}), {cpu_speedup:.2f}x by CPU time", flush=True)


if __name__ == "__main__":
    main()
