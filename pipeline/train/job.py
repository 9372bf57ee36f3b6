"""Train SAT (or the CAM baseline) with Ray Train: ``run_training(TrainOptions.from_settings(...))``.

The rooms of training: ``pipeline.train.options`` (one ``TrainOptions`` holding the
``TrainConfig`` and its ``SATLossConfig``; the flags of ``jobs/train_sat.py`` are its flat
field names), ``pipeline.train.worker`` (what each Ray Train worker runs, from one frozen
``WorkerPlan``), ``pipeline.train.loop`` (the epoch, free of Ray), ``pipeline.train.data``
(streaming shards into batches) and this driver.

The driver checks everything it can before a worker starts (options, storage, shards,
classes, the pretrained checkpoint), indexes the splits (driver threads for a few shards,
Ray tasks for many), resolves the options into the ``TrainConfig`` the workers train with,
then runs a ``TorchTrainer``. Rank 0 reports the metrics and a checkpoint (satloc model
file, optimizer state, epoch, history) to ``RunConfig(name, storage_path)``; rerunning with
the same name and storage path resumes from the last one. At the end the driver exports a
satloc checkpoint to ``output`` with the class names, mean/std, the threshold chosen on val
and training info.

Determinism: the model init is seeded, each epoch reseeds torch from (seed, epoch, rank)
and the data order is a function of (seed, epoch, rank), so a run that is interrupted and
resumed ends where an uninterrupted run ends.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import replace
from functools import partial
from typing import Any


from model.checkpoint import default_config, fingerprint, read_config
from pipeline.data.checkpoints import load_checkpoint, save_checkpoint
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
from pipeline.train.data import SplitIndex, TrainDataError, check_classes, index_split
from pipeline.train.loop import TrainConfig, build_model, trainable_parameters
from pipeline.train.options import (
    TrainOptions,
    check_options,
    default_run_name,
    format_settings,
    input_size,
    option_warnings,
    resolve_model_name,
    resolve_loader_workers,
    resolved_settings,
    run_config,
    run_fingerprint,
)
from pipeline.train.worker import MODEL_FILE, STATE_FILE, WorkerPlan, train_worker

RUN_FILE = "satloc_run.json"
RESULT_FILE = "satloc_result.json"
SUMMARY_KEYS = ("name", "run_path", "num_classes", "class_names", "train_images", "steps_per_epoch",
                "batch_size", "resumed")
LOCAL_INDEX_MAX_SHARDS = 16


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
        defaults = TrainOptions(options.train_shards, options.val_shards, options.output, options.storage_path)
        then = {k: theirs.get(k, v) for k, v in run_fingerprint(defaults).items()}
        # Records from before TrainOptions.from_settings hold a bare backbone as given.
        then["model"] = _model_as_recorded(then["model"])
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


def _model_as_recorded(model: str) -> str:
    try:
        return resolve_model_name(model, None)
    except ValueError:
        return model  # not a model name: differs, and the message shows it


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
    training function (``partial``, ``_train_with_storage_env``), never in
    ``train_loop_config`` (Ray Train may record it) nor in a runtime_env (Ray logs those in
    plain text).
    """
    apply_storage_env(env)
    return fn(*args)


def _train_with_storage_env(env: dict[str, str], plan: "WorkerPlan") -> None:
    """Ray Train's worker function: ``train_worker(plan)`` with the storage variables set.
    No free parameter, so Ray Train calls it without a ``train_loop_config``."""
    apply_storage_env(env)
    train_worker(plan)


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


# --- the driver ------------------------------------------------------------------------


def log(options: TrainOptions, message: str) -> None:
    if options.verbose:
        print(f"[satloc] {message}", flush=True)


def run_training(options: TrainOptions) -> dict[str, Any]:
    """Check, index, train with Ray Train, export; returns what was written and the metrics.

    Raises ValueError / StorageError / TrainDataError for bad input before training starts,
    and RuntimeError when training fails (rerun with the same name to resume).
    """
    start = time.perf_counter()
    check_options(options)
    for warning in option_warnings(options):
        print(f"[satloc] warning: {warning}", file=sys.stderr, flush=True)
    options = resolve_locations(options)
    check_storage(options)
    train_index, val_index, num_classes, class_names = index_splits(options)
    cfg = fitted_config(options, train_index, num_classes)
    settings = resolved_settings(options, cfg)
    log(options, format_settings(settings))

    run_url = join_url(options.storage_path, options.name)
    resuming = check_run_record(options, run_url)
    done = finished_run(options, run_url, start) if resuming else None
    if done is not None:
        return done
    steps = train_index.total // cfg.batch_size
    loader_workers = resolve_loader_workers(options)
    log(options, f"run '{options.name}' at {run_url} ({'resuming' if resuming else 'new'}): "
                 f"{train_index.total} train / {val_index.total} val images, {num_classes} classes, "
                 f"{options.num_workers} worker(s) x batch {cfg.batch_size // options.num_workers}, "
                 f"{steps} steps/epoch, {cfg.epochs} epochs; input: "
                 + (f"{loader_workers} loader process(es) per worker" if loader_workers else "one thread per worker")
                 + f" (--loader-workers {options.loader_workers})")
    model_config = default_config(
        cfg.model, num_classes, model_kwargs=cfg.model_kwargs, class_names=class_names,
        mean=list(cfg.mean), std=list(cfg.std),
        training={"run": options.name, "recipe": options.recipe, "precision": cfg.precision,
                  "precision_requested": options.precision, "settings": settings, "train_config": cfg.to_dict()},
    )
    plan = WorkerPlan(
        train=cfg, train_index=train_index, val_index=val_index, image_size=input_size(cfg),
        steps_per_epoch=steps, worker_batch_size=cfg.batch_size // options.num_workers,
        val_batch_size=options.val_batch_size, shuffle_buffer=options.shuffle_buffer,
        threshold_metric=options.threshold_metric, model_config=model_config,
        stop_after_epochs=options.stop_after_epochs, ray_log_level=options.ray_log_level,
        loader_workers=loader_workers,
    )
    summary = {
        "name": options.name, "run_path": run_url, "num_classes": num_classes, "class_names": class_names,
        "train_images": train_index.total, "steps_per_epoch": steps, "batch_size": cfg.batch_size,
        "resumed": resuming,
    }
    checkpoint_url = fit(options, plan, run_url)
    return export(options, checkpoint_url, summary, start)


def resolve_locations(options: TrainOptions) -> TrainOptions:
    """Absolute local paths (Ray workers do not share the driver's working directory), and
    the run name. The caller's options stay as given."""
    pretrained = options.train.pretrained
    if pretrained and ("/" in pretrained or "." in pretrained):
        pretrained = local_or_url(pretrained)  # not a timm hub name
    resolved = replace(
        options, storage_path=local_or_url(options.storage_path), output=local_or_url(options.output),
        train_shards=absolute_spec(options.train_shards), val_shards=absolute_spec(options.val_shards),
        train=replace(options.train, pretrained=pretrained),
    )
    return replace(resolved, name=resolved.name or default_run_name(resolved))


def index_splits(options: TrainOptions) -> tuple[SplitIndex, SplitIndex, int, list[str]]:
    """Both splits indexed and checked: (train, val, class count, class names)."""
    mapper = lambda fn, items: index_map(fn, items, options)  # noqa: E731
    log(options, f"indexing --train-shards {options.train_shards} and --val-shards {options.val_shards}")
    train_index = index_split(options.train_shards, "train", images_per_class=options.images_per_class, map_fn=mapper)
    val_index = index_split(options.val_shards, "val", require_boxes=True, map_fn=mapper)
    num_classes, class_names = check_classes(train_index, val_index, options.images_per_class)
    if options.train.pretrained:
        check_pretrained(options.train.pretrained, num_classes)
    return train_index, val_index, num_classes, class_names


def fitted_config(options: TrainOptions, train_index: SplitIndex, num_classes: int) -> TrainConfig:
    """The run's TrainConfig, checked by building the model once, its global batch cut to
    the training images when there are fewer."""
    cfg = run_config(options, num_classes)
    try:
        model = build_model(cfg)  # a pretrained file that does not fit this backbone fails here
    except TypeError as e:  # an override the backbone does not take
        raise ValueError(f"--model-kwargs/--img-size: {cfg.model} does not accept {cfg.model_kwargs}: {e}") from None
    if pretrained_report(model) is not None:  # what the pretrained weights did not fill
        log(options, pretrained_report(model).summary())
    trainable, total = trainable_parameters(model)
    log(options, f"trainable parameters: {trainable:,} of {total:,} (--freeze {cfg.freeze})")
    workers = options.num_workers
    batch_size = min(cfg.batch_size, train_index.total - train_index.total % workers)
    if batch_size < workers:
        raise TrainDataError(
            f"--train-shards has {train_index.total} training image(s), fewer than --num-workers {workers}"
        )
    if batch_size != cfg.batch_size:
        log(options, f"global batch {cfg.batch_size} > {train_index.total} training images: using {batch_size}")
    return replace(cfg, batch_size=batch_size)


def fit(options: TrainOptions, plan: WorkerPlan, run_url: str) -> str:
    """Run the workers under Ray Train; the URL of the last reported checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    filesystem, storage_path = pyarrow_storage(options.storage_path)
    ensure_ray(_temp_dir=options.ray_temp_dir)
    trainer = TorchTrainer(
        partial(_train_with_storage_env, storage_env(), plan),
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
    return join_url(run_url, result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])


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
    if recorded["metrics"]["epoch"] < options.train.epochs:
        return None
    log(options, f"run '{options.name}' already finished ({options.train.epochs} epochs)")
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


__all__ = ["run_training"]
