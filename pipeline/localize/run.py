"""The localize job's driver, end to end: check, plan, run actors over shards, write the manifest.

``run_localize(LocalizeConfig(...)) -> RunSummary`` is what ``jobs/localize_shards.py``
calls; it only wires the stages together:

    spec -> shard URLs      ``find_shards`` (``pipeline.data.shards.expand_shards``)
    URLs -> plan            ``plan_run`` (an existing output file means the shard is done)
    plan -> Parquet files   ``_run_actors``: ``ShardScheduler`` hands whole shards to
                            ``LocalizeActor``s, each a ``ShardLocalizer`` (``pipeline.localize.worker``)
    outcome -> manifest     ``build_manifest`` (``pipeline.results.manifest``)

Everything that can be wrong with the inputs (a flag out of range, no shard matches, an
unreadable checkpoint, an unwritable output, wrong credentials, a cluster too small for
the actors asked for) raises ``BadInputError`` before any shard is touched; the message
names the URL or flag and never a secret. Flags are checked once, by ``LocalizeConfig``.

Output layout (DESIGN §3, ``pipeline.results.run_dir``): ``<output>/<run_id>/<shard-stem>.parquet``
per shard and ``<output>/<run_id>/_manifest.json`` at the end. A rerun with the same run
id only does what is missing, including shards that appeared under the spec since;
``overwrite`` redoes everything.
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, TextIO

from model.checkpoint import check_weights, default_config, fingerprint
from model.precision import resolve_precision
from pipeline.data.preprocess import ResizeCrop
from pipeline.data.shards import ShardListing, find_shard_files
from pipeline.data.storage import (
    StorageError,
    check_bucket,
    check_readable,
    check_writable,
    join_url,
    protocol_of,
    read_bytes,
    storage_env,
)
from pipeline.local_ray import ensure_ray
from pipeline.localize.config import BadInputError, LocalizeConfig, decode_gpu_without_gpus, resolve_threshold
from pipeline.localize.messages import ShardJob
from pipeline.localize.rows import RowSettings
from pipeline.localize.scheduler import ProgressLine, ScheduleOutcome, ShardScheduler
from pipeline.localize.worker import WorkerSettings, grid_shape, model_input_size
from pipeline.results.manifest import Manifest, ManifestError, ShardEntry, read_manifest, write_manifest
from pipeline.results.parquet import output_counts, unfinished_reason
from pipeline.results.run_dir import file_names, output_url, shard_stem

__all__ = ["BadInputError", "LocalizeConfig", "RunSummary", "run_localize"]

Say = Callable[[str], None]


@dataclass
class ShardPlan:
    shard_url: str
    out_url: str
    done: bool  # output exists and reads (skipped unless overwrite)
    redo: str | None = None  # why an output that is there is not done (cut, zero bytes, rows)


@dataclass
class RunPlan:
    run_id: str
    run_url: str
    shards: list[ShardPlan]
    overwrite: bool
    files_not_shards: list[str] = field(default_factory=list)  # found under the spec's prefixes, said and recorded

    @property
    def todo(self) -> list[ShardPlan]:
        return [s for s in self.shards if self.overwrite or not s.done]

    @property
    def done(self) -> int:
        return sum(s.done for s in self.shards)

    def describe(self) -> str:
        extra = " (--overwrite: all redone)" if self.overwrite and self.done else ""
        redo = [s for s in self.shards if s.redo]
        if redo:
            extra += f"; {len(redo)} unreadable output(s) redone, first: {redo[0].redo}"
        return (
            f"run {self.run_id}: {len(self.shards)} shards, {self.done} done, {len(self.todo)} to do{extra} "
            f"-> {self.run_url}/"
        )


@dataclass
class RunSummary:
    """What ``run_localize`` returns (the job's exit code and the numbers it prints)."""

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
    num_classes: int | None = None  # the checkpoint's
    gt_labels_outside: int = 0  # rows whose ground-truth label is not one of its classes
    gt_label_range: tuple[int, int] | None = None  # (min, max) ground-truth label seen

    @property
    def exit_code(self) -> int:
        return 1 if self.failed_shards else 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def record(self, outcome: ScheduleOutcome) -> None:
        self.shards_processed = sum(1 for r in outcome.results if not r.skipped)
        self.images = outcome.images
        self.errors = outcome.errors
        self.seconds = outcome.seconds
        self.failed_shards = outcome.failed
        self.actors = [asdict(a) | {"images_per_second": a.images_per_second} for a in outcome.actors]
        processed = [r for r in outcome.results if not r.skipped]
        self.gt_labels_outside = sum(r.gt_labels_outside for r in processed)
        ranges = [r.gt_label_range for r in processed if r.gt_label_range is not None]
        if ranges:
            self.gt_label_range = (min(lo for lo, _ in ranges), max(hi for _, hi in ranges))

    def label_note(self) -> str | None:
        """A line for the summary when ground-truth labels fall outside the checkpoint's classes."""
        if not self.gt_labels_outside or self.num_classes is None or self.gt_label_range is None:
            return None
        lo, hi = self.gt_label_range
        fewer = (
            f"; the checkpoint has {self.num_classes} classes but the data's labels reach {hi}: "
            "is this the checkpoint for this data?"
            if hi >= self.num_classes
            else ""
        )
        return (
            f"{self.gt_labels_outside:,} rows have a ground-truth label outside the checkpoint's "
            f"{self.num_classes} classes (0..{self.num_classes - 1}; labels seen: {lo}..{hi}): "
            f"kept as given in gt_label{fewer}"
        )


# --- checks, before any work --------------------------------------------------------------


def find_shards(spec: str, limit: int | None, say: Say | None = None) -> ShardListing:
    """spec -> shard URLs (the first ``limit``) and the files below its prefixes that are
    not shards, which are said here and recorded in the manifest."""
    try:
        check_bucket(spec.strip())  # S3: credentials and endpoint first, in seconds, naming what to set
        listing = find_shard_files(spec)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    except (StorageError, PermissionError) as e:
        raise BadInputError(f"cannot list shards {spec!r}: {e}") from None
    except OSError as e:
        raise BadInputError(f"cannot list shards {spec!r}: {type(e).__name__}: {e}") from None
    if listing.skipped and say is not None:
        more = f" and {len(listing.skipped) - 10} more" if len(listing.skipped) > 10 else ""
        say(
            f"skipped {len(listing.skipped)} file(s) in {spec!r} that are not shards "
            f"(*.tar, *.tar.gz, *.tgz): {', '.join(listing.skipped[:10])}{more}"
        )
    return ShardListing(listing.urls[:limit] if limit else listing.urls, listing.skipped)


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
        config = check_weights(data, url)  # whole, and fits its config: fail here, not in every actor
        grid_shape(config)
    except ValueError as e:
        raise BadInputError(str(e)) from None
    config["sha256"] = fingerprint(data)
    return data, config


def check_output(url: str) -> None:
    try:
        check_writable(url)
    except StorageError as e:
        raise BadInputError(f"--output: {e}") from None
    except OSError as e:
        raise BadInputError(f"--output: cannot write {url}: {type(e).__name__}: {e}") from None


def check_run_dir(run_url: str) -> None:
    """The run directory itself must take files (it may exist already, e.g. read-only or a file)."""
    try:
        check_writable(run_url)
    except (StorageError, OSError) as e:
        raise BadInputError(
            f"--output: the run directory {run_url} cannot take files ({e}); make it writable, "
            "or pick another --output or --run-id"
        ) from None


def check_frame(config: LocalizeConfig, model_config: dict[str, Any]) -> None:
    frame, size = config.resize_crop, model_input_size(model_config)
    if frame is not None and frame.crop != size:
        raise BadInputError(
            f"--resize-crop {frame.resize},{frame.crop}: the crop must equal the input size of "
            f"{config.checkpoint} ({size}); the official SAT frame of a 224 model is 256,224"
        )


def row_settings(config: LocalizeConfig, model_config: dict[str, Any]) -> RowSettings:
    """The row settings of a run: the flags, else the checkpoint's threshold and class names."""
    if config.threshold is not None:
        threshold = config.threshold
    else:
        fallback = default_config(model_config["model"], model_config["num_classes"])["threshold"]
        threshold = resolve_threshold(model_config.get("threshold", fallback), f"the threshold of {config.checkpoint}")
    names = model_config.get("class_names")
    return RowSettings(
        threshold=threshold,
        model_sha256=model_config["sha256"],
        topk=config.topk,
        box_mode=config.box_mode,
        max_boxes=config.max_boxes,
        class_names=tuple(names) if names else None,
        resize_crop=config.resize_crop,
    )


def default_run_id(spec: str, model_sha256: str, settings: dict[str, Any]) -> str:
    """Stable: the same spec, model and row settings give the same id (so a rerun resumes)."""
    digest = hashlib.sha256(json.dumps([spec.strip(), model_sha256, settings], sort_keys=True).encode())
    return f"loc-{model_sha256[:8]}-{digest.hexdigest()[:8]}"


def run_id_settings(rows: RowSettings, precision: str) -> dict[str, Any]:
    """What the default run id hashes besides spec and model."""
    record = {**asdict(rows), "class_names": None, "precision": precision}
    if rows.resize_crop is None:  # the ids of runs made before --resize-crop existed stay the same
        record.pop("resize_crop")
    return record


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
    existing = file_names(run_url)
    shards = [
        ShardPlan(url, output_url(run_url, url), f"{stem}.parquet" in existing) for stem, url in by_stem.items()
    ]
    _check_done(shards, run_url)
    return RunPlan(run_id, run_url, shards, overwrite)


def _check_done(shards: list[ShardPlan], run_url: str) -> None:
    """Done means readable: an output whose footer does not read, or whose row count differs
    from the manifest's, is redone (``redo`` says why). Footers are read in parallel."""
    present = [s for s in shards if s.done]
    if not present:
        return
    previous = _previous_manifest(run_url)
    rows = {e.shard: e.rows for e in previous.shards if e.status == "done"} if previous else {}
    with ThreadPoolExecutor(min(16, len(present))) as pool:
        reasons = pool.map(lambda s: unfinished_reason(s.out_url, rows.get(s.shard_url)), present)
        for shard, reason in zip(present, reasons):
            if reason is not None:
                shard.done, shard.redo = False, reason


# --- cluster -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ActorResources:
    num_actors: int
    cpus: float
    gpus: float


def actor_resources(config: LocalizeConfig, cluster: dict[str, float], shards_todo: int) -> ActorResources:
    total_cpus = float(cluster.get("CPU", 0))
    total_gpus = float(cluster.get("GPU", 0))
    gpus = config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if total_gpus > 0 else 0.0)
    if config.precision == "fp16" and gpus == 0:
        raise BadInputError(
            "--precision fp16 needs GPUs (this run has --gpus-per-actor 0 or a cluster without GPUs): "
            "use --precision bf16 or fp32 on CPU"
        )
    if config.decode == "gpu" and gpus == 0:
        raise BadInputError(decode_gpu_without_gpus())
    if gpus > 0:
        if total_gpus < gpus:
            raise BadInputError(f"--gpus-per-actor {gpus:g} but the cluster has {total_gpus:g} GPUs")
        actors = config.num_actors or max(1, int(total_gpus // gpus))
        cpus = config.cpus_per_actor or max(1.0, float(int(total_cpus // actors)))
    else:
        cpus = config.cpus_per_actor or 1.0
        actors = config.num_actors or max(1, int(total_cpus // cpus))
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


def run_localize(config: LocalizeConfig, out: TextIO | None = sys.stdout) -> RunSummary:
    say = _sayer(out)
    started = time.time()
    listing = find_shards(config.shards, config.limit, say)
    checkpoint, model_config = read_checkpoint(config.checkpoint)
    check_frame(config, model_config)
    check_output(config.output)
    rows = row_settings(config, model_config)
    run_id = config.run_id or default_run_id(config.shards, rows.model_sha256, run_id_settings(rows, config.precision))
    plan = plan_run(listing.urls, config.output, run_id, config.overwrite)
    plan.files_not_shards = listing.skipped
    if not config.dry_run:
        check_run_dir(plan.run_url)
    say(plan.describe())
    if rows.resize_crop is not None:
        say(f"input frame: {rows.resize_crop.describe()} (the official SAT test frame); boxes in original pixels")
    summary = RunSummary(
        run_id=run_id,
        run_url=plan.run_url,
        manifest_url=None,
        shards_total=len(plan.shards),
        shards_done_before=plan.done,
        shards_todo=len(plan.todo),
        dry_run=config.dry_run,
        num_classes=int(model_config["num_classes"]),
    )
    if config.dry_run:
        _say_todo(plan, say)
        return summary

    resources = None
    if plan.todo:
        ensure_ray()
        import ray

        resources = actor_resources(config, ray.cluster_resources(), len(plan.todo))
    # "auto" is resolved here, once, for the actors' device (bf16 on GPUs; on CPU actors,
    # by this machine's CPU: pass --precision on a cluster of other CPUs).
    gpus = resources.gpus if resources else (config.gpus_per_actor or 0)
    precision = resolve_precision(config.precision, "cuda" if gpus > 0 else "cpu")
    outcome = ScheduleOutcome()
    if plan.todo:
        outcome = _run_actors(config, precision, plan, checkpoint, rows, resources, say, out)

    summary.record(outcome)
    run = RunRecord(config, precision, plan, model_config, rows, resources, started)
    try:
        summary.manifest_url = write_manifest(plan.run_url, build_manifest(run, outcome))
    finally:  # the shards' own outcome is said even when the manifest cannot be written
        _say_summary(summary, outcome, say)
    return summary


def _sayer(out: TextIO | None) -> Say:
    def say(text: str) -> None:
        if out is not None:
            print(f"[localize] {text}", file=out, flush=True)

    return say


def _say_todo(plan: RunPlan, say: Say) -> None:
    for s in plan.todo[:20]:
        say(f"to do: {s.shard_url} -> {s.out_url}")
    if len(plan.todo) > 20:
        say(f"... and {len(plan.todo) - 20} more")


def _say_summary(summary: RunSummary, outcome: ScheduleOutcome, say: Say) -> None:
    say(
        f"done: {summary.shards_processed} shards processed, {len(outcome.failed)} failed, "
        f"{summary.images:,} images, {summary.errors} error rows in {summary.seconds:.1f}s "
        f"= {summary.images_per_second:.1f} img/s"
    )
    for a in outcome.actors:
        died = f", died: {a.died}" if a.died else ""
        say(
            f"actor {a.index} ({a.info.get('device', '?')}, gpus {a.info.get('gpu_ids', [])}): "
            f"{a.shards} shards, {a.images:,} images, {a.images_per_second:.1f} img/s busy, "
            f"decode {a.info.get('decode', '?')}: decode wait {a.decode_wait_seconds:.1f}s, "
            f"model {a.model_seconds:.1f}s{died}"
        )
    note = summary.label_note()
    if note:
        say(note)
    for url, errs in outcome.failed.items():
        say(f"FAILED {url} after {len(errs)} attempt{'s' if len(errs) != 1 else ''}: {errs[-1]}")
    say(f"manifest: {summary.manifest_url}")


def _run_actors(
    config: LocalizeConfig,
    precision: str,
    plan: RunPlan,
    checkpoint: bytes,
    rows: RowSettings,
    resources: ActorResources,
    say: Say,
    out: TextIO | None,
) -> ScheduleOutcome:
    import ray

    from pipeline.localize.actor import localize_actor_class

    settings = WorkerSettings(
        batch_size=config.batch_size,
        precision=precision,
        decode_threads=max(1, int(resources.cpus)),
        run_id=plan.run_id,
        decode=config.decode,  # resolved by each actor for its device ("auto": batched on CUDA)
    )
    actor_class = localize_actor_class(resources.cpus, resources.gpus)
    checkpoint_ref = ray.put(checkpoint)
    name_prefix = f"satloc-localize-{plan.run_id}-{uuid.uuid4().hex[:6]}"
    env = storage_env()  # an argument, never runtime_env: Ray logs runtime envs in plain text

    def create_actor(index: int):
        return actor_class.options(name=f"{name_prefix}-{index}").remote(
            checkpoint_ref, config.checkpoint, settings, rows, resources.cpus, env
        )

    say(
        f"{resources.num_actors} actors x ({resources.cpus:g} CPUs, {resources.gpus:g} GPUs), "
        f"batch {config.batch_size}, {precision}, --decode {config.decode}"
    )
    token = uuid.uuid4().hex
    # A redone output (unreadable, or not the manifest's rows) is overwritten like --overwrite.
    jobs = [
        ShardJob(s.shard_url, s.out_url, overwrite=config.overwrite or s.redo is not None, write_token=token)
        for s in plan.todo
    ]
    scheduler = ShardScheduler(
        create_actor,
        resources.num_actors,
        max_retries=config.max_retries,
        progress=ProgressLine(len(jobs), out, config.progress_seconds),
    )
    try:
        scheduler.start()
        for stats in scheduler.slots:
            say(f"actor {stats.stats.index} ready: {stats.stats.info}")
        return scheduler.run(jobs)
    finally:
        scheduler.shutdown()


# --- the manifest --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What the manifest records about an invocation besides its outcome."""

    config: LocalizeConfig  # as given (precision as requested)
    precision: str  # resolved
    plan: RunPlan
    model_config: dict[str, Any]  # the checkpoint's, with its sha256
    rows: RowSettings
    resources: ActorResources | None
    started: float


def _previous_manifest(run_url: str) -> Manifest | None:
    """The manifest an earlier invocation of this run id left, or None (none, or unreadable)."""
    try:
        return read_manifest(run_url)
    except (ManifestError, OSError):  # FileNotFoundError is an OSError
        return None


def build_manifest(run: RunRecord, outcome: ScheduleOutcome) -> Manifest:
    """The run's manifest after this invocation: its shards, settings and timing history."""
    previous = _previous_manifest(run.plan.run_url)
    config, rows = run.config, run.rows
    history = list(previous.history) if previous else []
    history.append(_timings(outcome, run.resources, run.started) | {"files_not_shards": run.plan.files_not_shards})
    return Manifest(
        run_id=run.plan.run_id,
        spec=config.shards,
        output=run.plan.run_url,
        model_sha256=rows.model_sha256,
        checkpoint=config.checkpoint,
        model_config={k: v for k, v in run.model_config.items() if k != "sha256"},
        input_frame=input_frame(rows.resize_crop, run.model_config),
        settings={
            **{k: v for k, v in asdict(rows).items() if k != "class_names"},
            "precision": run.precision,
            "precision_requested": config.precision,
            "decode_requested": config.decode,  # what each actor ran: timings.actors[].info.decode
            "batch_size": config.batch_size,
            "max_retries": config.max_retries,
            "limit": config.limit,
        },
        shards=_shard_entries(run.plan, outcome, previous, run.started),
        failed_shards=[{"shard": u, "errors": e} for u, e in outcome.failed.items()],
        history=history,
    )


def _shard_entries(
    plan: RunPlan, outcome: ScheduleOutcome, previous: Manifest | None, started: float
) -> list[ShardEntry]:
    before = {s.shard: s for s in previous.shards} if previous else {}
    results = {r.shard_url: r for r in outcome.results}
    entries = []
    for s in plan.shards:
        entry = ShardEntry(s.shard_url, s.out_url)
        r = results.get(s.shard_url)
        if s.shard_url in outcome.failed:
            entry.status, entry.errors_by_attempt = "failed", outcome.failed[s.shard_url]
        elif r is not None and not r.skipped:
            entry = ShardEntry(s.shard_url, s.out_url, "done", rows=r.rows, errors=r.errors,
                               seconds=round(r.seconds, 3), bytes=r.bytes_written, run_started=_iso(started),
                               gt_labels_outside=r.gt_labels_outside,
                               gt_label_range=list(r.gt_label_range) if r.gt_label_range else None)
        elif s.shard_url in before and before[s.shard_url].status == "done":
            entry = before[s.shard_url]
        elif s.done or (r is not None and r.skipped):
            entry.status = "done"
            entry.rows, entry.errors = output_counts(s.out_url)
        entry.attempts = outcome.attempts.get(s.shard_url, entry.attempts)
        entries.append(entry)
    return entries


def _timings(outcome: ScheduleOutcome, resources: ActorResources | None, started: float) -> dict[str, Any]:
    finished = time.time()
    overhead = outcome.overhead_seconds
    return {
        "started": _iso(started),
        "finished": _iso(finished),
        "seconds": round(finished - started, 3),
        "processing_seconds": round(outcome.seconds, 3),
        "startup_seconds": round(outcome.startup_seconds, 3),
        "shards_processed": sum(1 for r in outcome.results if not r.skipped),
        "images": outcome.images,
        "error_rows": outcome.errors,
        "gt_labels_outside_classes": sum(r.gt_labels_outside for r in outcome.results if not r.skipped),
        "images_per_second": round(outcome.images / outcome.seconds, 2) if outcome.seconds else 0.0,
        "replaced_actors": outcome.replaced_actors,
        # Per shard: driver round trip minus the time inside the actor (scheduling cost).
        "scheduling_overhead_seconds_mean": round(sum(overhead) / len(overhead), 5) if overhead else None,
        "actors": [asdict(a) | {"images_per_second": round(a.images_per_second, 2)} for a in outcome.actors],
        "resources": asdict(resources) if resources else None,
    }


def input_frame(frame: ResizeCrop | None, model_config: dict[str, Any]) -> dict[str, Any]:
    """What the maps cover, for the manifest (``evaluate_wsol.py --protocol sat`` reads it)."""
    if frame is None:
        return {"kind": "resize", "size": model_input_size(model_config)}
    return {"kind": "resize_crop", "resize": frame.resize, "crop": frame.crop, "offset": frame.offset}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
