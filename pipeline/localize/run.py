"""The localize job, end to end: validate, plan, run actors over shards, write the manifest.

``run_localize(LocalizeOptions(...)) -> RunSummary`` is what ``jobs/localize_shards.py``
calls. Everything that can be wrong with the inputs (no shard matches, an unreadable
checkpoint, an unwritable output, wrong credentials, a cluster too small for the actors
asked for) raises ``BadInputError`` before any shard is touched; the message names the
URL or flag and never a secret.

Output layout (DESIGN §3): ``<output>/<run_id>/<shard-stem>.parquet`` per shard and
``<output>/<run_id>/_manifest.json`` at the end. An existing output file means that
shard is done, so a rerun with the same run id only does what is missing, including
shards that appeared under the spec since; ``overwrite`` redoes everything.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, TextIO

from model.checkpoint import read_config
from model.precision import PRECISION_CHOICES, resolve_precision
from pipeline.local_ray import ensure_ray
from pipeline.localize.rows import RowSettings
from pipeline.localize.worker import WorkerSettings, grid_shape, input_size, output_counts
from pipeline.data.preprocess import ResizeCrop, parse_resize_crop
from pipeline.localize.messages import ShardJob
from pipeline.localize.scheduler import ProgressLine, ScheduleOutcome, ShardScheduler
from pipeline.data.shards import expand_shards
from pipeline.data.storage import (
    StorageError,
    check_readable,
    join_url,
    protocol_of,
    read_bytes,
    storage_env,
    url_to_fs,
    write_bytes_atomic,
)

MANIFEST_NAME = "_manifest.json"


class BadInputError(ValueError):
    """The inputs are wrong (exit code 2); nothing was written."""


@dataclass
class LocalizeOptions:
    shards: str
    checkpoint: str
    output: str
    run_id: str | None = None
    num_actors: int | None = None  # default: one per GPU group, else one per cpus_per_actor CPUs
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # default: 1 on CPU; the cluster's CPUs per GPU actor on GPU
    batch_size: int = 64
    precision: str = "auto"  # bf16 on GPU actors and native-bf16 CPUs, else fp32 (model.precision)
    threshold: float | None = None  # default: the checkpoint's
    topk: int = 5
    box_mode: str = "largest"
    max_boxes: int | None = None
    resize_crop: str | tuple[int, int] | None = None  # "256,224": the official SAT test frame
    max_retries: int = 2
    limit: int | None = None
    overwrite: bool = False
    dry_run: bool = False
    progress_seconds: float = 5.0

    def validate(self) -> None:
        def at_least(flag: str, value, low, strict: bool = False) -> None:
            if value is not None and (value <= low if strict else value < low):
                raise BadInputError(f"{flag} must be {'>' if strict else '>='} {low}, got {value}")

        at_least("--batch-size", self.batch_size, 1)
        at_least("--topk", self.topk, 1)
        at_least("--max-retries", self.max_retries, 0)
        at_least("--limit", self.limit, 1)
        at_least("--num-actors", self.num_actors, 1)
        at_least("--gpus-per-actor", self.gpus_per_actor, 0)
        at_least("--cpus-per-actor", self.cpus_per_actor, 0, strict=True)
        at_least("--max-boxes", self.max_boxes, 1)
        try:
            self.crop_frame()
        except (TypeError, ValueError) as e:
            raise BadInputError(str(e) if "--resize-crop" in str(e) else f"--resize-crop: {e}") from None
        if self.precision not in PRECISION_CHOICES:
            raise BadInputError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise BadInputError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.run_id is not None and (not self.run_id or "/" in self.run_id or self.run_id.startswith(".")):
            raise BadInputError(f"--run-id {self.run_id!r} must be a non-empty name without '/', not starting with '.'")

    def crop_frame(self) -> ResizeCrop | None:
        """``--resize-crop`` as a ResizeCrop; None: the whole image (the default frame)."""
        if self.resize_crop is None or isinstance(self.resize_crop, ResizeCrop):
            return self.resize_crop
        if isinstance(self.resize_crop, (tuple, list)):
            return ResizeCrop(*(int(v) for v in self.resize_crop))
        return parse_resize_crop(self.resize_crop)


@dataclass
class ShardPlan:
    shard_url: str
    out_url: str
    done: bool  # output exists (skipped unless overwrite)


@dataclass
class RunPlan:
    run_id: str
    run_url: str
    shards: list[ShardPlan]
    overwrite: bool

    @property
    def todo(self) -> list[ShardPlan]:
        return [s for s in self.shards if self.overwrite or not s.done]

    @property
    def done(self) -> int:
        return sum(s.done for s in self.shards)

    def describe(self) -> str:
        extra = " (--overwrite: all redone)" if self.overwrite and self.done else ""
        return (
            f"run {self.run_id}: {len(self.shards)} shards, {self.done} done, {len(self.todo)} to do{extra} "
            f"-> {self.run_url}/"
        )


@dataclass
class RunSummary:
    run_id: str
    run_url: str
    manifest_url: str | None
    shards_total: int
    shards_done_before: int
    shards_todo: int
    shards_processed: int = 0
    images: int = 0
    errors: int = 0
    seconds: float = 0.0
    failed_shards: dict[str, list[str]] = field(default_factory=dict)
    actors: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_shards else 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


# --- validation, before any work ---------------------------------------------------------


def find_shards(spec: str, limit: int | None) -> list[str]:
    try:
        urls = expand_shards(spec)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    except (StorageError, PermissionError) as e:
        raise BadInputError(f"cannot list shards {spec!r}: {e}") from None
    except OSError as e:
        raise BadInputError(f"cannot list shards {spec!r}: {type(e).__name__}: {e}") from None
    return urls[:limit] if limit else urls


def read_checkpoint(url: str) -> tuple[bytes, dict[str, Any]]:
    """The checkpoint's bytes and config (with ``sha256``), or BadInputError naming the URL."""
    try:
        if protocol_of(url) in ("s3", "s3a"):
            check_readable(url)
        data = read_bytes(url)
    except FileNotFoundError:
        raise BadInputError(f"checkpoint {url} does not exist: check --checkpoint") from None
    except StorageError as e:
        raise BadInputError(f"cannot read checkpoint: {e}") from None
    except (PermissionError, IsADirectoryError, OSError) as e:
        raise BadInputError(f"cannot read checkpoint {url}: {type(e).__name__}: {e}") from None
    try:
        config = read_config(data, url)
        grid_shape(config)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    config["sha256"] = hashlib.sha256(data).hexdigest()
    return data, config


def check_output(url: str) -> None:
    from pipeline.data.storage import check_writable

    try:
        check_writable(url)
    except StorageError as e:
        raise BadInputError(f"--output: {e}") from None
    except OSError as e:
        raise BadInputError(f"--output: cannot write {url}: {type(e).__name__}: {e}") from None


def shard_stem(url: str) -> str:
    name = posixpath.basename(url.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def default_run_id(spec: str, model_sha256: str, settings: dict[str, Any]) -> str:
    """Stable: the same spec, model and row settings give the same id (so a rerun resumes)."""
    digest = hashlib.sha256(json.dumps([spec.strip(), model_sha256, settings], sort_keys=True).encode())
    return f"loc-{model_sha256[:8]}-{digest.hexdigest()[:8]}"


def plan_run(shard_urls: list[str], output: str, run_id: str, overwrite: bool) -> RunPlan:
    run_url = join_url(output, run_id)
    by_stem: dict[str, str] = {}
    for url in shard_urls:
        stem = shard_stem(url)
        if stem in by_stem:
            raise BadInputError(
                f"shards {by_stem[stem]} and {url} would both write {stem}.parquet: "
                "give a spec whose shard file names are unique"
            )
        by_stem[stem] = url
    fs, run_path = url_to_fs(run_url)
    try:
        existing = {posixpath.basename(p.rstrip("/")) for p in fs.ls(run_path, detail=False)}
    except (FileNotFoundError, NotADirectoryError):
        existing = set()
    shards = [
        ShardPlan(url, join_url(run_url, f"{stem}.parquet"), f"{stem}.parquet" in existing)
        for stem, url in by_stem.items()
    ]
    return RunPlan(run_id, run_url, shards, overwrite)


# --- cluster -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorResources:
    num_actors: int
    cpus: float
    gpus: float


def actor_resources(options: LocalizeOptions, cluster: dict[str, float], shards_todo: int) -> ActorResources:
    total_cpus = float(cluster.get("CPU", 0))
    total_gpus = float(cluster.get("GPU", 0))
    gpus = options.gpus_per_actor if options.gpus_per_actor is not None else (1.0 if total_gpus > 0 else 0.0)
    if options.precision == "fp16" and gpus == 0:
        raise BadInputError(
            "--precision fp16 needs GPUs (this run has --gpus-per-actor 0 or a cluster without GPUs): "
            "use --precision bf16 or fp32 on CPU"
        )
    if gpus > 0:
        if total_gpus < gpus:
            raise BadInputError(f"--gpus-per-actor {gpus:g} but the cluster has {total_gpus:g} GPUs")
        actors = options.num_actors or max(1, int(total_gpus // gpus))
        cpus = options.cpus_per_actor or max(1.0, float(int(total_cpus // actors)))
    else:
        cpus = options.cpus_per_actor or 1.0
        actors = options.num_actors or max(1, int(total_cpus // cpus))
    actors = max(1, min(actors, shards_todo))
    need_cpus, need_gpus = actors * cpus, actors * gpus
    if need_cpus > total_cpus + 1e-9 or need_gpus > total_gpus + 1e-9:
        raise BadInputError(
            f"{actors} actors x ({cpus:g} CPUs, {gpus:g} GPUs) need {need_cpus:g} CPUs and {need_gpus:g} GPUs "
            f"but the cluster has {total_cpus:g} CPUs and {total_gpus:g} GPUs: lower --num-actors, "
            "--cpus-per-actor or --gpus-per-actor"
        )
    return ActorResources(actors, cpus, gpus)


# --- the run -------------------------------------------------------------------------------


def run_localize(options: LocalizeOptions, out: TextIO | None = sys.stdout) -> RunSummary:
    def say(text: str) -> None:
        if out is not None:
            print(f"[localize] {text}", file=out, flush=True)

    options.validate()
    started = time.time()
    shard_urls = find_shards(options.shards, options.limit)
    checkpoint, config = read_checkpoint(options.checkpoint)
    frame = options.crop_frame()
    if frame is not None and frame.crop != input_size(config):
        raise BadInputError(
            f"--resize-crop {frame.resize},{frame.crop}: the crop must equal the input size of "
            f"{options.checkpoint} ({input_size(config)}); the official SAT frame of a 224 model is 256,224"
        )
    check_output(options.output)
    try:
        row_settings = RowSettings(
            threshold=float(options.threshold if options.threshold is not None else config.get("threshold", 0.4)),
            model_sha256=config["sha256"],
            topk=options.topk,
            box_mode=options.box_mode,
            max_boxes=options.max_boxes,
            class_names=tuple(config["class_names"]) if config.get("class_names") else None,
            resize_crop=frame,
        )
    except ValueError as e:
        raise BadInputError(str(e)) from None
    settings_record = {**asdict(row_settings), "class_names": None, "precision": options.precision}
    if frame is None:  # the ids of runs made before --resize-crop existed stay the same
        settings_record.pop("resize_crop")
    run_id = options.run_id or default_run_id(options.shards, config["sha256"], settings_record)
    plan = plan_run(shard_urls, options.output, run_id, options.overwrite)
    say(plan.describe())
    if frame is not None:
        say(f"input frame: {frame.describe()} (the official SAT test frame); boxes in original pixels")
    summary = RunSummary(
        run_id=run_id,
        run_url=plan.run_url,
        manifest_url=None,
        shards_total=len(plan.shards),
        shards_done_before=plan.done,
        shards_todo=len(plan.todo),
        dry_run=options.dry_run,
    )
    if options.dry_run:
        for s in plan.todo[:20]:
            say(f"to do: {s.shard_url} -> {s.out_url}")
        if len(plan.todo) > 20:
            say(f"... and {len(plan.todo) - 20} more")
        return summary

    outcome = ScheduleOutcome()
    resources = None
    if plan.todo:
        ensure_ray()
        import ray

        resources = actor_resources(options, ray.cluster_resources(), len(plan.todo))
    # "auto" is resolved here, once, for the actors' device (bf16 on GPUs; on CPU actors,
    # by this machine's CPU: pass --precision on a cluster of other CPUs).
    requested = options.precision
    gpus = resources.gpus if resources else (options.gpus_per_actor or 0)
    options = replace(options, precision=resolve_precision(requested, "cuda" if gpus > 0 else "cpu"))
    if plan.todo:
        outcome = _run_actors(options, plan, checkpoint, row_settings, resources, say, out)

    summary.shards_processed = sum(1 for r in outcome.results if not r.skipped)
    summary.images = outcome.images
    summary.errors = outcome.errors
    summary.seconds = outcome.seconds
    summary.failed_shards = outcome.failed
    summary.actors = [asdict(a) | {"images_per_second": a.images_per_second} for a in outcome.actors]
    manifest = build_manifest(options, plan, config, row_settings, outcome, resources, started, requested)
    summary.manifest_url = join_url(plan.run_url, MANIFEST_NAME)
    write_bytes_atomic(summary.manifest_url, json.dumps(manifest, indent=1).encode())

    say(
        f"done: {summary.shards_processed} shards processed, {len(outcome.failed)} failed, "
        f"{summary.images:,} images, {summary.errors} error rows in {summary.seconds:.1f}s "
        f"= {summary.images_per_second:.1f} img/s"
    )
    for a in outcome.actors:
        died = f", died: {a.died}" if a.died else ""
        say(
            f"actor {a.index} ({a.info.get('device', '?')}, gpus {a.info.get('gpu_ids', [])}): "
            f"{a.shards} shards, {a.images:,} images, {a.images_per_second:.1f} img/s busy{died}"
        )
    for url, errs in outcome.failed.items():
        say(f"FAILED {url} after {len(errs)} attempts: {errs[-1]}")
    say(f"manifest: {summary.manifest_url}")
    return summary


def _run_actors(options, plan, checkpoint, row_settings, resources, say, out) -> ScheduleOutcome:
    import ray

    from pipeline.localize.actor import localize_actor_class

    settings = WorkerSettings(
        batch_size=options.batch_size,
        precision=options.precision,
        decode_threads=max(1, int(resources.cpus)),
        run_id=plan.run_id,
    )
    actor_class = localize_actor_class(resources.cpus, resources.gpus)
    checkpoint_ref = ray.put(checkpoint)
    name_prefix = f"satloc-localize-{plan.run_id}-{uuid.uuid4().hex[:6]}"
    env = storage_env()  # an argument, never runtime_env: Ray logs runtime envs in plain text

    def create_actor(index: int):
        return actor_class.options(name=f"{name_prefix}-{index}").remote(
            checkpoint_ref, options.checkpoint, settings, row_settings, resources.cpus, env
        )

    say(
        f"{resources.num_actors} actors x ({resources.cpus:g} CPUs, {resources.gpus:g} GPUs), "
        f"batch {options.batch_size}, {options.precision}"
    )
    token = uuid.uuid4().hex
    jobs = [ShardJob(s.shard_url, s.out_url, overwrite=options.overwrite, write_token=token) for s in plan.todo]
    scheduler = ShardScheduler(
        create_actor,
        resources.num_actors,
        max_retries=options.max_retries,
        progress=ProgressLine(len(jobs), out, options.progress_seconds),
    )
    try:
        scheduler.start()
        for stats in scheduler.slots:
            say(f"actor {stats.stats.index} ready: {stats.stats.info}")
        return scheduler.run(jobs)
    finally:
        scheduler.shutdown()


def _previous_manifest(url: str) -> dict[str, Any]:
    """The manifest an earlier run with this id left, or {} (none, or unreadable)."""
    try:
        return json.loads(read_bytes(url))
    except (ValueError, OSError):  # FileNotFoundError is an OSError
        return {}


def build_manifest(options, plan, config, row_settings, outcome, resources, started,
                   precision_requested: str | None = None) -> dict[str, Any]:
    manifest_url = join_url(plan.run_url, MANIFEST_NAME)
    previous_manifest = _previous_manifest(manifest_url)
    previous = {s["shard"]: s for s in previous_manifest.get("shards", [])}
    results = {r.shard_url: r for r in outcome.results}
    shards = []
    for s in plan.shards:
        entry: dict[str, Any] = {"shard": s.shard_url, "output": s.out_url}
        r = results.get(s.shard_url)
        if s.shard_url in outcome.failed:
            entry.update(status="failed", errors_by_attempt=outcome.failed[s.shard_url])
        elif r is not None and not r.skipped:
            entry.update(status="done", rows=r.rows, errors=r.errors, seconds=round(r.seconds, 3),
                         bytes=r.bytes_written, run_started=_iso(started))
        elif s.shard_url in previous and previous[s.shard_url].get("status") == "done":
            entry = previous[s.shard_url]
        elif s.done or (r is not None and r.skipped):
            rows, errors = output_counts(s.out_url)
            entry.update(status="done", rows=rows, errors=errors)
        else:
            entry.update(status="not run")
        entry["attempts"] = outcome.attempts.get(s.shard_url, entry.get("attempts", 0))
        shards.append(entry)
    finished = time.time()
    model_config = {k: v for k, v in config.items() if k != "sha256"}
    history = previous_manifest.get("history", [])
    history.append({
        "started": _iso(started),
        "finished": _iso(finished),
        "seconds": round(finished - started, 3),
        "processing_seconds": round(outcome.seconds, 3),
        "startup_seconds": round(outcome.startup_seconds, 3),
        "shards_processed": sum(1 for r in outcome.results if not r.skipped),
        "images": outcome.images,
        "error_rows": outcome.errors,
        "images_per_second": round(outcome.images / outcome.seconds, 2) if outcome.seconds else 0.0,
        "replaced_actors": outcome.replaced_actors,
        # Per shard: driver round trip minus the time inside the actor (scheduling cost).
        "scheduling_overhead_seconds_mean": (
            round(sum(outcome.overhead_seconds) / len(outcome.overhead_seconds), 5)
            if outcome.overhead_seconds
            else None
        ),
        "actors": [asdict(a) | {"images_per_second": round(a.images_per_second, 2)} for a in outcome.actors],
        "resources": asdict(resources) if resources else None,
    })
    done = [e for e in shards if e["status"] == "done"]
    return {
        "run_id": plan.run_id,
        "spec": options.shards,
        "output": plan.run_url,
        "model_sha256": row_settings.model_sha256,
        "checkpoint": options.checkpoint,
        "model_config": model_config,
        "input_frame": input_frame(row_settings.resize_crop, config),
        "settings": {
            **{k: v for k, v in asdict(row_settings).items() if k != "class_names"},
            "precision": options.precision,
            "precision_requested": precision_requested or options.precision,
            "batch_size": options.batch_size,
            "max_retries": options.max_retries,
            "limit": options.limit,
        },
        "shards_total": len(shards),
        "shards_done": len(done),
        "rows": sum(e.get("rows", 0) for e in done),
        "error_rows": sum(e.get("errors", 0) for e in done),
        "failed_shards": [{"shard": u, "errors": e} for u, e in outcome.failed.items()],
        "shards": shards,
        "timings": history[-1],
        "history": history,
    }


def input_frame(frame: ResizeCrop | None, config: dict[str, Any]) -> dict[str, Any]:
    """What the maps cover, for the manifest (``evaluate_wsol.py --protocol sat`` reads it)."""
    if frame is None:
        return {"kind": "resize", "size": input_size(config)}
    return {"kind": "resize_crop", "resize": frame.resize, "crop": frame.crop, "offset": frame.offset}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
