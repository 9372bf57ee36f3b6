"""Train SAT (or the CAM baseline) with Ray Train: ``run_training(TrainOptions(...))``.

The driver checks everything it can before a worker starts (options, storage, shards,
classes, the pretrained checkpoint), indexes the splits (driver threads for a few shards,
Ray tasks for many), then runs a
``TorchTrainer`` whose workers each stream their own shards (``pipeline.train.data``) and
run ``pipeline.train.loop.train_epoch`` under DDP. Every epoch every worker evaluates its
share of the val split; the counts are all-reduced, so the figures cover the whole split.
Rank 0 reports the metrics and a checkpoint (satloc model file, optimizer state, epoch,
history) to ``RunConfig(name, storage_path)``; rerunning with the same name and storage
path resumes from the last one. At the end the driver exports a satloc checkpoint to
``output`` with the class names, mean/std, the threshold chosen on val and training info.

Determinism: the model init is seeded, each epoch reseeds torch from (seed, epoch, rank)
and the data order is a function of (seed, epoch, rank), so a run that is interrupted and
resumed ends where an uninterrupted run ends.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np
import torch

from model.checkpoint import checkpoint_bytes, default_config, fingerprint, load_checkpoint, read_config, save_checkpoint
from model.factory import model_kwargs as resolve_model_kwargs
from model.factory import split_name
from model.precision import autocast_for, resolve_precision
from model.pretrained import pretrained_report
from pipeline.local_ray import ensure_ray
from pipeline.data.storage import (
    StorageError,
    check_writable,
    exists,
    join_url,
    protocol_of,
    read_bytes,
    apply_storage_env,
    s3_endpoint,
    storage_env,
    write_bytes_atomic,
)
from pipeline.data.preprocess import train_resize_size
from pipeline.train.data import SplitIndex, TrainDataError, check_classes, index_split, train_batches, val_batches
from pipeline.train.loop import TrainConfig, build_model, build_optimizer, to_model_input, train_epoch
from pipeline.evaluation.threshold import THRESHOLD_METRICS, LocCounts, choose_threshold, count_hits, tau_grid

RUN_FILE = "satloc_run.json"
RESULT_FILE = "satloc_result.json"
SUMMARY_KEYS = ("name", "run_path", "num_classes", "class_names", "train_images", "steps_per_epoch",
                "batch_size", "resumed")
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
# Coarse grid for the per-epoch val figure, the official 0.01 grid for the final choice.
EPOCH_TAU_STEP = 0.05
FINAL_TAU_STEP = 0.01
# Options that may change between a run and its resumption; all others must match.
RESUMABLE_CHANGES = {"num_workers", "use_gpu", "max_failures", "output", "threshold_metric",
                     "stop_after_epochs", "verbose", "ray_temp_dir", "name", "storage_path",
                     "cpus_per_worker", "ray_log_level", "recipe"}
LOCAL_INDEX_MAX_SHARDS = 16


class TrainingInterrupted(RuntimeError):
    """Raised inside workers by ``stop_after_epochs`` (tests simulate a failure with it)."""


@dataclass
class TrainOptions:
    """Everything ``jobs/train_sat.py`` takes; the flags are these names with dashes."""

    train_shards: str
    val_shards: str
    output: str
    storage_path: str
    name: str | None = None  # default: derived from the options, so a rerun resumes
    recipe: str | None = None  # the --recipe these settings came from (recorded, not applied here)
    model: str = "sat_vit_micro_patch8_64"
    method: str | None = None  # sat|cam: replaces the model name's method prefix
    img_size: int | None = None
    model_kwargs: dict = field(default_factory=dict)
    pretrained: str | None = None
    epochs: int = 16
    batch_size: int = 128  # global
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # after the warm-up: cosine to zero, or constant (the official runs)
    alpha: float = 0.25
    area_weight: float = 1.0
    norm_weight: float = 1.0
    area_mode: str = "batch"
    spatial_loss_start: float = 0.0
    spatial_loss_ramp: float = 0.0
    backbone_lr_scale: float = 1.0
    freeze: str = "none"
    images_per_class: int | None = None
    num_workers: int = 2
    use_gpu: bool = False
    precision: str = "auto"  # bf16 on CUDA and native-bf16 CPUs, else fp32 (model.precision)
    seed: int = 0
    threshold_metric: str = "gt_known"
    max_failures: int = 0
    shuffle_buffer: int = 1000
    val_batch_size: int = 64
    stop_after_epochs: int | None = None  # tests only: fail on purpose after this many epochs
    verbose: bool = True
    ray_temp_dir: str | None = None  # for an in-process cluster started here
    cpus_per_worker: float | None = None  # Ray's default (1) unless set; torch uses as many threads
    ray_log_level: str = "WARNING"  # Ray Train's own logs (INFO shows every report)


# --- resolving and checking options ----------------------------------------------------


def resolve_model_name(model: str, method: str | None) -> str:
    """``--model`` is a create_model name or a bare backbone; ``--method`` sets the prefix."""
    if method is not None and method not in ("sat", "cam"):
        raise ValueError(f"--method must be sat or cam, got {method!r}")
    head, _, rest = model.partition("_")
    backbone = rest if head in ("sat", "cam") else model
    name = f"{method or (head if head in ('sat', 'cam') else 'sat')}_{backbone}"
    split_name(name)
    return name


def train_config(options: TrainOptions, num_classes: int) -> TrainConfig:
    name = resolve_model_name(options.model, options.method)
    kwargs = dict(options.model_kwargs)
    if options.img_size is not None:
        kwargs["img_size"] = options.img_size
    resolve_model_kwargs(name, **kwargs)  # unknown combinations fail here, with the flag's words
    return TrainConfig(
        model=name, num_classes=num_classes, model_kwargs=kwargs, pretrained=options.pretrained,
        epochs=options.epochs, batch_size=options.batch_size, lr=options.lr,
        weight_decay=options.weight_decay, warmup_epochs=options.warmup_epochs, schedule=options.schedule,
        alpha=options.alpha,
        area_weight=options.area_weight, norm_weight=options.norm_weight, area_mode=options.area_mode,
        spatial_loss_start=options.spatial_loss_start, spatial_loss_ramp=options.spatial_loss_ramp,
        backbone_lr_scale=options.backbone_lr_scale, freeze=options.freeze,
        precision=resolve_precision(options.precision, "cuda" if options.use_gpu else "cpu"), seed=options.seed,
    )


def input_size(cfg: TrainConfig) -> int:
    size = resolve_model_kwargs(cfg.model, **cfg.model_kwargs)["img_size"]
    return int(size if isinstance(size, int) else size[0])


def is_deit_size(model: str) -> bool:
    return split_name(model)[1].startswith("deit_")


def option_warnings(options: TrainOptions) -> list[str]:
    """Settings that run but are most likely a mistake."""
    name = resolve_model_name(options.model, options.method)
    if is_deit_size(name) and not options.pretrained:
        return [f"{name} is trained from random weights (no --pretrained): SAT fine-tunes pretrained "
                "DeiT weights (DESIGN §5); from scratch it does not beat CAM. Give --pretrained "
                "deit_small.pth (or a timm hub name) unless this is on purpose"]
    return []


def resolved_settings(options: TrainOptions, cfg: TrainConfig) -> dict[str, Any]:
    """The hyper-parameters a run trains with, after the recipe, the flags and ``auto``:
    printed by the job and kept in the checkpoint's training info."""
    kwargs = resolve_model_kwargs(cfg.model, **cfg.model_kwargs)
    size = input_size(cfg)
    return {
        "recipe": options.recipe, "model": cfg.model, "pretrained": cfg.pretrained, "img_size": size,
        "drop_path_rate": kwargs.get("drop_path_rate"), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "optimizer": "AdamW", "lr": cfg.lr, "schedule": cfg.schedule, "warmup_epochs": cfg.warmup_epochs,
        "weight_decay": cfg.weight_decay, "alpha": cfg.alpha, "area_weight": cfg.area_weight,
        "norm_weight": cfg.norm_weight, "area_mode": cfg.area_mode, "spatial_loss_start": cfg.spatial_loss_start,
        "spatial_loss_ramp": cfg.spatial_loss_ramp, "backbone_lr_scale": cfg.backbone_lr_scale,
        "freeze": cfg.freeze, "augment": f"Resize {train_resize_size(size)}x{train_resize_size(size)}, "
                                      f"RandomCrop {size}, horizontal flip",
        "precision": cfg.precision, "precision_requested": options.precision,
    }


def format_settings(s: dict[str, Any]) -> str:
    precision = s["precision"]
    if s["precision_requested"] != precision:
        precision += f" (from {s['precision_requested']})"
    source = f"recipe {s['recipe']}" if s["recipe"] else "no --recipe; --recipe cub|imagenet gives the paper's"
    return (
        f"settings ({source}): "
        f"{s['model']} from {s['pretrained'] or 'random weights'}, {s['img_size']} px, drop path "
        f"{s['drop_path_rate']:g}; AdamW lr {s['lr']:g} {s['schedule']} (warm-up {s['warmup_epochs']:g} "
        f"epochs), weight decay {s['weight_decay']:g}; global batch {s['batch_size']}, {s['epochs']} epochs; "
        f"alpha {s['alpha']:g}, area/norm weights {s['area_weight']:g}/{s['norm_weight']:g}; "
        f"{s['augment']}; precision {precision}"
    )


def check_options(options: TrainOptions) -> None:
    """Option errors that need no data, named by their flag."""
    if options.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {options.num_workers}")
    if options.batch_size < options.num_workers or options.batch_size % options.num_workers:
        raise ValueError(
            f"--batch-size {options.batch_size} is the global batch: it must be a multiple of "
            f"--num-workers {options.num_workers}"
        )
    if options.threshold_metric not in THRESHOLD_METRICS:
        raise ValueError(f"--threshold-metric must be one of {THRESHOLD_METRICS}, got {options.threshold_metric!r}")
    if options.max_failures < -1:
        raise ValueError(f"--max-failures must be >= 0 (or -1 for unlimited), got {options.max_failures}")
    if options.spatial_loss_start < 0 or options.spatial_loss_ramp < 0:
        raise ValueError("--spatial-loss-start and --spatial-loss-ramp must be >= 0 epochs")
    if not 0 < options.backbone_lr_scale <= 1e3:
        raise ValueError(f"--backbone-lr-scale must be positive, got {options.backbone_lr_scale}")
    train_config(options, num_classes=2)  # model name, overrides, freeze, precision


def default_run_name(options: TrainOptions) -> str:
    """A name that is the same for the same training options (so a rerun resumes)."""
    digest = hashlib.sha256(json.dumps(run_fingerprint(options), sort_keys=True).encode()).hexdigest()
    return f"{resolve_model_name(options.model, options.method)}-{digest[:10]}"


def run_fingerprint(options: TrainOptions) -> dict[str, Any]:
    return {k: v for k, v in asdict(options).items() if k not in RESUMABLE_CHANGES}


def absolute_spec(spec: str) -> str:
    """A local shard spec made absolute, keeping its form (``@list``, trailing ``/``, braces)."""
    if protocol_of(spec.lstrip("@")) != "file" or "://" in spec:
        return spec
    at = "@" if spec.startswith("@") else ""
    body = spec[len(at):]
    absolute = os.path.abspath(body) + ("/" if body.endswith("/") else "")
    return at + absolute


def local_or_url(url: str) -> str:
    return os.path.abspath(url) if protocol_of(url) == "file" and "://" not in url else url


def check_storage(options: TrainOptions) -> None:
    """Storage path and output must be writable: a clear error now, not after training."""
    try:
        check_writable(options.storage_path)
    except StorageError as e:
        raise StorageError(f"--storage-path: {e}") from None
    if options.output.endswith("/"):
        raise ValueError(f"--output {options.output} names a folder: give the checkpoint file's URL")
    parent = options.output.rsplit("/", 1)[0] if "/" in options.output else "."
    try:
        check_writable(parent)
    except StorageError as e:
        raise StorageError(f"--output: {e}") from None
    if protocol_of(options.output) == "file" and os.path.isdir(options.output.removeprefix("file://")):
        raise ValueError(f"--output {options.output} is a directory: give the checkpoint file's path")


def check_pretrained(pretrained: str, num_classes: int) -> None:
    """A satloc checkpoint given as --pretrained must have the data's class count."""
    if "/" not in pretrained and "." not in pretrained:
        return  # a timm hub name (DeiT ImageNet weights)
    try:
        data = read_bytes(pretrained)
    except FileNotFoundError:
        raise ValueError(f"--pretrained {pretrained} does not exist") from None
    try:
        config = read_config(data, pretrained)
    except ValueError:
        return  # a foreign (DeiT/official SAT) state dict: its head is dropped anyway
    if config["num_classes"] != num_classes:
        raise ValueError(
            f"--pretrained {pretrained} was trained on {config['num_classes']} classes but the "
            f"shards have {num_classes}: train from a checkpoint of the same class list"
        )


def check_run_record(options: TrainOptions, run_url: str) -> bool:
    """Write the run's option record, or check a rerun matches it. True when resuming."""
    record_url = join_url(run_url, RUN_FILE)
    mine = run_fingerprint(options)
    if exists(record_url):
        theirs = json.loads(read_bytes(record_url))
        # An option newer than the record counts as its default (runs resume across upgrades).
        defaults = {k: f.default for k, f in TrainOptions.__dataclass_fields__.items()}
        then = {k: theirs.get(k, defaults.get(k)) for k in mine}
        diff = {k: (then[k], v) for k, v in mine.items() if then[k] != v}
        if diff:
            shown = "; ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in sorted(diff.items()))
            raise ValueError(
                f"run '{options.name}' under {options.storage_path} was started with other options "
                f"({shown}); rerun with the same options to resume, or pick another --name"
            )
        return True
    write_bytes_atomic(record_url, json.dumps(mine, indent=1, sort_keys=True).encode())
    return False


def pyarrow_storage(storage_path: str):
    """(storage_filesystem, storage_path) for RunConfig: S3 gets an explicit endpoint."""
    if protocol_of(storage_path) not in ("s3", "s3a"):
        return None, local_or_url(storage_path)
    import pyarrow.fs

    kwargs: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"],
                      secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
                      session_token=os.environ.get("AWS_SESSION_TOKEN"))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs["region"] = region or "us-east-1"
    return pyarrow.fs.S3FileSystem(**kwargs), storage_path.split("://", 1)[1].rstrip("/")


# --- Ray -------------------------------------------------------------------------------


def _with_storage_env(env: dict[str, str], fn, *args):
    """Run ``fn(*args)`` in a Ray worker after setting the storage variables it was handed.

    Indexing tasks get ``env`` as a task argument; Ray Train workers get it bound into the
    training function (``partial``), never in ``train_loop_config`` (Ray Train may record
    it) nor in a runtime_env (Ray logs those in plain text).
    """
    apply_storage_env(env)
    return fn(*args)


def index_map(fn, items: list[tuple], options: TrainOptions | None = None) -> list:
    """``fn(*item)`` per shard: driver threads for a few shards, Ray tasks for many.

    Starting task processes costs seconds; a handful of shards is read faster here.
    """
    if len(items) <= LOCAL_INDEX_MAX_SHARDS:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
            return list(pool.map(lambda item: fn(*item), items))
    import ray

    if options is not None:
        ensure_ray(_temp_dir=options.ray_temp_dir)
    task = ray.remote(num_cpus=1, max_retries=2)(_with_storage_env)
    env = storage_env()  # an argument, never runtime_env (pipeline.data.storage says why)
    return ray.get([task.remote(env, fn, *item) for item in items])


# --- what every worker runs ------------------------------------------------------------


def _all_reduce(values: np.ndarray, op: str = "sum") -> np.ndarray:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    t = torch.as_tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.numpy()


def reduce_train_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Image-weighted means over all workers (train_epoch gives this worker's)."""
    keys = sorted(k for k in metrics if k not in ("images", "seconds"))
    n = metrics["images"]
    summed = _all_reduce(np.array([metrics[k] * n for k in keys] + [n], dtype=np.float64))
    total = summed[-1]
    out = {k: float(summed[i] / max(total, 1)) for i, k in enumerate(keys)}
    seconds = float(_all_reduce(np.array([metrics["seconds"]]), op="max")[0])  # the slowest worker's
    out["images"] = int(total)
    out["seconds"] = seconds
    out["images_per_s"] = float(total / max(seconds, 1e-9))  # all workers' images / epoch wall time
    return out


@torch.no_grad()
def evaluate(model, cfg: TrainConfig, index: SplitIndex, rank: int, world: int, batch_size: int,
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
        x = to_model_input(batch.images.to(device), cfg.mean, cfg.std)
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


def _unwrap(model):
    return getattr(model, "module", model)


def _save_epoch(directory: str, model, optimizer, model_config: dict, state: dict) -> None:
    with open(os.path.join(directory, MODEL_FILE), "wb") as f:
        f.write(checkpoint_bytes(_unwrap(model), model_config))
    torch.save(optimizer.state_dict(), os.path.join(directory, OPTIMIZER_FILE))
    with open(os.path.join(directory, STATE_FILE), "w") as f:
        json.dump(state, f)


def _load_epoch(directory: str, model, optimizer) -> dict:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(os.path.join(directory, MODEL_FILE)), strict=True)
    optimizer.load_state_dict(torch.load(os.path.join(directory, OPTIMIZER_FILE), weights_only=True))
    with open(os.path.join(directory, STATE_FILE)) as f:
        return json.load(f)


def train_worker(plan: dict) -> None:
    """The Ray Train loop: resume, train, evaluate and report every epoch."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _quiet_report_log(plan.get("ray_log_level", "WARNING"))
    cfg = TrainConfig(**plan["train_config"])
    train_index = SplitIndex.from_dict(plan["train_index"])
    val_index = SplitIndex.from_dict(plan["val_index"])
    size, steps = plan["image_size"], plan["steps_per_epoch"]
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # one intra-op thread per CPU Ray gave this worker
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))

    model = build_model(cfg).to(device)  # on its device before the optimizer state is loaded
    optimizer = build_optimizer(model, cfg)
    state = {"epoch": -1, "history": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        # A private copy per worker: Checkpoint.as_directory shares one download directory
        # between the workers of a node, and a second download can rewrite files while the
        # first worker reads them (seen as "PytorchStreamReader failed reading file").
        with tempfile.TemporaryDirectory(prefix="satloc-resume-") as directory:
            checkpoint.to_directory(directory)
            state = _load_epoch(directory, model, optimizer)
        if rank == 0:
            _say(f"[satloc] resuming '{ctx.get_experiment_name()}' after epoch {state['epoch'] + 1}")
    model = ray.train.torch.prepare_model(model)
    first_epoch = state["epoch"] + 1
    for epoch in range(first_epoch, cfg.epochs):
        _seed_epoch(cfg.seed, epoch, rank)
        batches = train_batches(
            train_index, rank=rank, world=world, epoch=epoch, seed=cfg.seed,
            batch_size=plan["worker_batch_size"], steps=steps, image_size=size,
            buffer_size=plan["shuffle_buffer"],
        )
        metrics = reduce_train_metrics(train_epoch(model, batches, optimizer, cfg, epoch, steps, device))
        last = epoch == cfg.epochs - 1
        metrics.update(evaluate(
            _unwrap(model), cfg, val_index, rank, world, plan["val_batch_size"], size,
            FINAL_TAU_STEP if last else EPOCH_TAU_STEP, plan["threshold_metric"], device,
        ))
        metrics["epoch"] = epoch + 1  # epochs done
        metrics["lr"] = optimizer.param_groups[0]["lr"]
        state = {"epoch": epoch, "history": state["history"] + [metrics]}
        if rank == 0:
            _say(format_metrics(metrics, cfg.epochs))
            with tempfile.TemporaryDirectory(prefix="satloc-ckpt-") as directory:
                model_config = dict(plan["model_config"], threshold=metrics["val_threshold"])
                _save_epoch(directory, model, optimizer, model_config, state)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        stop = plan.get("stop_after_epochs")
        if stop is not None and epoch + 1 == stop and not last:
            raise TrainingInterrupted(f"stopped on purpose after epoch {stop} (stop_after_epochs)")


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
        f"(tau {m['val_threshold']:.2f}) | {m['images_per_s']:.0f} img/s"
    )


# --- the driver ------------------------------------------------------------------------


def log(options: TrainOptions, message: str) -> None:
    if options.verbose:
        print(f"[satloc] {message}", flush=True)


def run_training(options: TrainOptions) -> dict[str, Any]:
    """Check, index, train with Ray Train, export; returns what was written and the metrics.

    Raises ValueError / StorageError / TrainDataError for bad input before training starts,
    and RuntimeError when training fails (rerun with the same name to resume).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    start = time.perf_counter()
    options = replace(options)  # resolved below (absolute paths, name); the caller's stays as given
    check_options(options)
    for warning in option_warnings(options):
        print(f"[satloc] warning: {warning}", file=sys.stderr, flush=True)
    options.storage_path = local_or_url(options.storage_path)
    options.output = local_or_url(options.output)
    # Ray workers do not share the driver's working directory: make local specs absolute.
    options.train_shards = absolute_spec(options.train_shards)
    options.val_shards = absolute_spec(options.val_shards)
    if options.pretrained and ("/" in options.pretrained or "." in options.pretrained):
        options.pretrained = local_or_url(options.pretrained)  # not a timm hub name
    options.name = options.name or default_run_name(options)
    check_storage(options)
    mapper = lambda fn, items: index_map(fn, items, options)  # noqa: E731

    log(options, f"indexing --train-shards {options.train_shards} and --val-shards {options.val_shards}")
    train_index = index_split(options.train_shards, "train", images_per_class=options.images_per_class, map_fn=mapper)
    val_index = index_split(options.val_shards, "val", require_boxes=True, map_fn=mapper)
    num_classes, class_names = check_classes(train_index, val_index, options.images_per_class)
    if options.pretrained:
        check_pretrained(options.pretrained, num_classes)
    cfg = train_config(options, num_classes)
    try:
        model = build_model(cfg)  # a pretrained file that does not fit this backbone fails here
    except TypeError as e:  # an override the backbone does not take
        raise ValueError(f"--model-kwargs/--img-size: {cfg.model} does not accept {cfg.model_kwargs}: {e}") from None
    if pretrained_report(model) is not None:  # what the pretrained weights did not fill
        log(options, pretrained_report(model).summary())
    size = input_size(cfg)

    batch_size = min(options.batch_size, train_index.total - train_index.total % options.num_workers)
    if batch_size < options.num_workers:
        raise TrainDataError(
            f"--train-shards has {train_index.total} training image(s), fewer than --num-workers "
            f"{options.num_workers}"
        )
    if batch_size != options.batch_size:
        log(options, f"global batch {options.batch_size} > {train_index.total} training images: using {batch_size}")
    steps = train_index.total // batch_size
    cfg.batch_size = batch_size
    settings = resolved_settings(options, cfg)
    log(options, format_settings(settings))

    run_url = join_url(options.storage_path, options.name)
    resuming = check_run_record(options, run_url)
    done = finished_run(options, run_url, start) if resuming else None
    if done is not None:
        return done
    log(options, f"run '{options.name}' at {run_url} ({'resuming' if resuming else 'new'}): "
                 f"{train_index.total} train / {val_index.total} val images, {num_classes} classes, "
                 f"{options.num_workers} worker(s) x batch {batch_size // options.num_workers}, "
                 f"{steps} steps/epoch, {cfg.epochs} epochs")

    model_config = default_config(
        cfg.model, num_classes, model_kwargs=cfg.model_kwargs, class_names=class_names,
        mean=list(cfg.mean), std=list(cfg.std),
        training={"run": options.name, "recipe": options.recipe, "precision": cfg.precision,
                  "precision_requested": options.precision, "settings": settings, "train_config": cfg.to_dict()},
    )
    plan = {
        "train_config": cfg.to_dict(), "train_index": train_index.to_dict(), "val_index": val_index.to_dict(),
        "image_size": size, "steps_per_epoch": steps, "worker_batch_size": batch_size // options.num_workers,
        "val_batch_size": options.val_batch_size, "shuffle_buffer": options.shuffle_buffer,
        "threshold_metric": options.threshold_metric, "stop_after_epochs": options.stop_after_epochs,
        "model_config": model_config, "ray_log_level": options.ray_log_level,
    }
    summary = {
        "name": options.name, "run_path": run_url, "num_classes": num_classes, "class_names": class_names,
        "train_images": train_index.total, "steps_per_epoch": steps, "batch_size": batch_size,
        "resumed": resuming,
    }
    filesystem, storage_path = pyarrow_storage(options.storage_path)
    ensure_ray(_temp_dir=options.ray_temp_dir)
    trainer = TorchTrainer(
        partial(_with_storage_env, storage_env(), train_worker),
        train_loop_config=plan,
        scaling_config=ray.train.ScalingConfig(
            num_workers=options.num_workers, use_gpu=options.use_gpu,
            resources_per_worker={"CPU": options.cpus_per_worker} if options.cpus_per_worker else None,
        ),
        run_config=ray.train.RunConfig(
            name=options.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Our own per-epoch line says what Ray Train's INFO lines say (as dicts, per rank).
            logging_config=ray.train.LoggingConfig(log_level=options.ray_log_level),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(
            f"training run '{options.name}' failed: {_root_cause(e)}. Its checkpoints are under "
            f"{run_url}; rerun with the same options and --name {options.name} to resume"
        ) from e
    if result.error is not None:
        raise RuntimeError(f"training run '{options.name}' failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError(f"training run '{options.name}' reported no checkpoint under {run_url}")

    checkpoint_url = join_url(run_url, result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    return export(options, checkpoint_url, summary, start)


def export(options: TrainOptions, checkpoint_url: str, summary: dict, start: float) -> dict[str, Any]:
    """Write the satloc checkpoint from a Ray Train checkpoint; record the result in the run."""
    model, config = load_checkpoint(join_url(checkpoint_url, MODEL_FILE))
    state = json.loads(read_bytes(join_url(checkpoint_url, STATE_FILE)))
    final = state["history"][-1]
    config.pop("sha256", None)
    config["threshold"] = final[f"val_threshold_{options.threshold_metric}"]
    config["training"] = dict(
        config.get("training", {}), epochs_done=state["epoch"] + 1, threshold_metric=options.threshold_metric,
        val_metrics={k: v for k, v in final.items() if k.startswith("val_")},
        train_images=summary["train_images"], images_per_class=options.images_per_class,
        train_shards=options.train_shards, val_shards=options.val_shards,
    )
    sha = save_checkpoint(model, options.output, config)
    log(options, f"wrote {options.output} (threshold {config['threshold']:.2f} by {options.threshold_metric}, "
                 f"sha256 {sha[:12]}) in {time.perf_counter() - start:.0f} s")
    result = dict(
        summary, checkpoint=options.output, sha256=sha, ray_checkpoint=checkpoint_url,
        threshold=config["threshold"], threshold_metric=options.threshold_metric,
        metrics=final, history=state["history"],
    )
    write_bytes_atomic(join_url(summary["run_path"], RESULT_FILE), json.dumps(result).encode())
    return dict(result, seconds=time.perf_counter() - start)


def finished_run(options: TrainOptions, run_url: str, start: float) -> dict[str, Any] | None:
    """A finished run's result without starting Ray Train: as recorded when the exported
    checkpoint is still there unchanged, else re-exported from the last Ray checkpoint."""
    record_url = join_url(run_url, RESULT_FILE)
    if not exists(record_url):
        return None
    recorded = json.loads(read_bytes(record_url))
    if recorded["metrics"]["epoch"] < options.epochs:
        return None
    log(options, f"run '{options.name}' already finished ({options.epochs} epochs)")
    same_export = recorded["checkpoint"] == options.output and recorded["threshold_metric"] == options.threshold_metric
    if same_export and exists(options.output) and fingerprint(read_bytes(options.output)) == recorded["sha256"]:
        log(options, f"{options.output} is up to date")
        return dict(recorded, resumed=True, seconds=time.perf_counter() - start)
    summary = {k: recorded[k] for k in SUMMARY_KEYS}
    return export(options, recorded["ray_checkpoint"], dict(summary, resumed=True), start)


def _root_cause(error: BaseException) -> str:
    """The innermost message of a TrainingFailedError (worker tracebacks are long)."""
    text = str(error).strip().splitlines()
    for line in reversed(text):
        if line.strip() and not line.startswith(" "):
            return line.strip()[:500]
    return type(error).__name__


__all__ = ["TrainOptions", "run_training", "train_worker", "TrainingInterrupted"]
