"""What every Ray Train worker runs: one frozen ``WorkerPlan`` in, epochs of
``pipeline.train.loop.train_epoch`` under DDP, validation of its share of the val split
(counts all-reduced), and rank 0's report of metrics and a checkpoint to Ray Train."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from model.checkpoint import checkpoint_bytes, unwrap_model
from model.precision import autocast_for
from pipeline.data.preprocess import normalize
from pipeline.train.data import SplitIndex, val_batches
from pipeline.train.loader import TrainLoader
from pipeline.train.loop import TrainConfig, build_model, build_optimizer, train_epoch
from pipeline.evaluation.threshold import THRESHOLD_METRICS, LocCounts, choose_threshold, count_hits, tau_grid


MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
# Coarse grid for the per-epoch val figure, the official 0.01 grid for the final choice.
EPOCH_TAU_STEP = 0.05
FINAL_TAU_STEP = 0.01


class TrainingInterrupted(RuntimeError):
    """Raised inside workers by ``stop_after_epochs`` (tests simulate a failure with it)."""


def _all_reduce(values: np.ndarray, op: str = "sum") -> np.ndarray:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.as_tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.numpy()


SUMMED_METRICS = ("skipped",)  # counts: summed over workers, not averaged


def reduce_train_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Image-weighted means over all workers (train_epoch gives this worker's), sums of
    the counts in SUMMED_METRICS."""
    keys = sorted(k for k in metrics if k not in ("images", "seconds", *SUMMED_METRICS))
    counts = [k for k in SUMMED_METRICS if k in metrics]
    n = metrics["images"]
    summed = _all_reduce(np.array([metrics[k] * n for k in keys] + [metrics[k] for k in counts] + [n],
                                  dtype=np.float64))
    total = summed[-1]
    out = {k: float(summed[i] / max(total, 1)) for i, k in enumerate(keys)}
    out.update({k: int(summed[len(keys) + i]) for i, k in enumerate(counts)})
    seconds = float(_all_reduce(np.array([metrics["seconds"]]), op="max")[0])  # the slowest worker's
    out["images"] = int(total)
    out["seconds"] = seconds
    out["images_per_s"] = float(total / max(seconds, 1e-9))  # all workers' images / epoch wall time
    return out


@torch.no_grad()
def validate_epoch(model, cfg: TrainConfig, index: SplitIndex, rank: int, world: int, batch_size: int,
                   size: int, tau_step: float, metric: str, device) -> dict[str, float]:
    """Val top-1 and localization counts on this worker's share, summed over workers.

    CAM maps are taken for the true class (GT-known); SAT's map has no class.
    """
    model.eval()
    taus = tau_grid(tau_step)
    counts = LocCounts.zeros(taus)
    correct = seen = 0
    is_cam = cfg.method == "cam"
    for batch in val_batches(index, rank=rank, world=world, batch_size=batch_size, image_size=size):
        x = normalize(batch.images.to(device), cfg.mean, cfg.std)
        labels = batch.labels.to(device)
        with autocast_for(cfg.precision, device):
            out = model(x, target=labels) if is_cam else model(x)
        correct += int((out.logits.argmax(1) == labels).sum())
        seen += len(labels)
        counts = counts + count_hits(out.loc_map.float().cpu(), batch.gt_boxes, size, taus)
    total = _all_reduce(np.concatenate([[correct, seen], counts.to_vector()]))
    counts = LocCounts.from_vector(taus, total[2:])
    chosen = {m: choose_threshold(counts, m) for m in THRESHOLD_METRICS}
    return {
        "val_top1": float(total[0] / max(total[1], 1) * 100),
        "val_images": int(total[1]),
        "val_gt_known_loc": chosen[metric]["gt_known_loc"],
        "val_maxboxacc_v2": chosen[metric]["maxboxacc_v2"],
        "val_threshold": chosen[metric]["threshold"],
        # Both choices, so an export can switch --threshold-metric without retraining.
        **{f"val_threshold_{m}": c["threshold"] for m, c in chosen.items()},
    }


def _quiet_report_log(level: str) -> None:
    """Ray Train 2.60 logs every report (a dict per rank) on a logger named by its file's
    path, outside the ``ray.train`` hierarchy that LoggingConfig sets: apply the level there."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: leave its logging alone
        return
    logging.getLogger(train_context.__file__).setLevel(getattr(logging, level, logging.WARNING))


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    torch.manual_seed(int.from_bytes(hashlib.sha256(f"{seed}-{epoch}-{rank}".encode()).digest()[:7], "little"))


def _save_epoch(directory: str, model, optimizer, model_config: dict, state: dict) -> None:
    with open(os.path.join(directory, MODEL_FILE), "wb") as f:
        f.write(checkpoint_bytes(unwrap_model(model), model_config))
    torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def _load_epoch(directory: str, model, optimizer) -> dict:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(directory, MODEL_FILE)), strict=True)
    optimizer.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


@dataclass(frozen=True)
class WorkerPlan:
    """What every Ray Train worker is handed (bound into its function, so pickled, never
    recorded as Ray Train's ``train_loop_config``)."""

    train: TrainConfig
    train_index: SplitIndex
    val_index: SplitIndex
    image_size: int
    steps_per_epoch: int
    worker_batch_size: int
    val_batch_size: int
    shuffle_buffer: int
    threshold_metric: str
    model_config: dict  # the satloc checkpoint config of each epoch's model file
    stop_after_epochs: int | None = None
    ray_log_level: str = "WARNING"
    loader_workers: int = 0  # decode-and-augment processes per worker (resolved: auto is the job's)


def train_worker(plan: WorkerPlan) -> None:
    """The Ray Train loop: resume, then train, validate and report every epoch."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _quiet_report_log(plan.ray_log_level)
    device = _worker_device(plan.loader_workers)
    model = build_model(plan.train).to(device)  # on its device before the optimizer state is loaded
    optimizer = build_optimizer(model, plan.train)
    state = _resume(model, optimizer, rank)
    model = ray.train.torch.prepare_model(model)
    epochs = plan.train.epochs
    # One loader for the run: its processes start once, and stop when training ends or fails.
    with TrainLoader(plan.train_index, rank=rank, world=world, seed=plan.train.seed,
                     batch_size=plan.worker_batch_size, image_size=plan.image_size,
                     buffer_size=plan.shuffle_buffer, workers=plan.loader_workers,
                     pin_memory=device.type == "cuda") as loader:
        for epoch in range(state["epoch"] + 1, epochs):
            metrics = _worker_epoch(plan, model, optimizer, loader, epoch, rank, world, device)
            state = {"epoch": epoch, "history": state["history"] + [metrics]}
            _report(plan, model, optimizer, metrics, state, rank)
            stop = plan.stop_after_epochs
            if stop is not None and epoch + 1 == stop and epoch != epochs - 1:
                raise TrainingInterrupted(f"stopped on purpose after epoch {stop} (stop_after_epochs)")


def _worker_device(loader_workers: int = 0) -> torch.device:
    import ray
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type == "cpu":  # one intra-op thread per CPU Ray gave this worker and no loader process uses
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus) - loader_workers))
    return device


def _resume(model, optimizer, rank: int) -> dict:
    """The last reported epoch's state, loaded into ``model`` and ``optimizer`` (or a fresh one)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": -1, "history": []}
    # A private copy per worker: Checkpoint.as_directory shares one download directory
    # between the workers of a node, and a second download can rewrite files while the
    # first worker reads them (seen as "PytorchStreamReader failed reading file").
    with tempfile.TemporaryDirectory(prefix="satloc-resume-") as directory:
        checkpoint.to_directory(directory)
        state = _load_epoch(directory, model, optimizer)
    if rank == 0:
        _say(f"[satloc] resuming '{ray.train.get_context().get_experiment_name()}' after epoch {state['epoch'] + 1}")
    return state


def _worker_epoch(plan: WorkerPlan, model, optimizer, loader: TrainLoader, epoch: int, rank: int, world: int,
                  device) -> dict:
    """Train one epoch on this worker's shards, validate; the metrics of all workers."""
    cfg, steps, size = plan.train, plan.steps_per_epoch, plan.image_size
    _seed_epoch(cfg.seed, epoch, rank)
    local = train_epoch(model, loader.epoch(epoch, steps), optimizer, cfg, epoch, steps, device)
    local.update(skipped=loader.skipped.total, loader_workers=plan.loader_workers)
    metrics = reduce_train_metrics(local)
    tau_step = FINAL_TAU_STEP if epoch == cfg.epochs - 1 else EPOCH_TAU_STEP
    metrics.update(validate_epoch(
        unwrap_model(model), cfg, plan.val_index, rank, world, plan.val_batch_size, size,
        tau_step, plan.threshold_metric, device,
    ))
    metrics["epoch"] = epoch + 1  # epochs done
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    return metrics


def _report(plan: WorkerPlan, model, optimizer, metrics: dict, state: dict, rank: int) -> None:
    """Report the epoch to Ray Train; rank 0 with the checkpoint."""
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    _say(format_metrics(metrics, plan.train.epochs))
    with tempfile.TemporaryDirectory(prefix="satloc-ckpt-") as directory:
        model_config = dict(plan.model_config, threshold=metrics["val_threshold"])
        _save_epoch(directory, model, optimizer, model_config, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def _say(line: str) -> None:
    """One line on the worker's stdout, which Ray forwards to the driver (print is patched
    by Ray Train to log *and* print, which shows every line twice)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def format_metrics(m: dict, epochs: int) -> str:
    parts = f"ce {m['ce']:.3f}" + (f" area {m['area']:.3f} norm {m['norm']:.3f}" if "area" in m else "")
    return (
        f"[satloc] epoch {m['epoch']}/{epochs} loss {m['loss']:.4f} ({parts}) train acc "
        f"{m['train_acc'] * 100:.1f}% map area {m['map_area']:.3f} | val top-1 {m['val_top1']:.1f}% "
        f"GT-known Loc {m['val_gt_known_loc']:.1f}% MaxBoxAccV2 {m['val_maxboxacc_v2']:.1f}% "
        f"(tau {m['val_threshold']:.2f}) | {m['images_per_s']:.0f} img/s, input wait "
        f"{m.get('input_wait', 0.0) * 100:.0f}%" + (f", {m['skipped']} sample(s) skipped" if m.get("skipped") else "")
    )
