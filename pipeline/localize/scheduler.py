"""Driver side: hand whole shards to free actors, retry, replace dead actors, report progress.

The scheduler knows nothing of models: an actor is anything with ``localize(job) ->
ShardResult``, ``info()`` and ``progress()`` remote methods, built by ``create_actor(index)``.

Rules:
- one shard per actor at a time; a shard is never in flight twice, so no output is
  written twice by one run (the worker also skips an output that already exists);
- a shard that raises is retried up to ``max_retries`` times, each time on an actor
  that has not tried it yet while such an actor is alive (with one actor, on that one),
  unless retrying cannot help (``retry_can_help``: not a tar, empty, missing): then it
  fails at once with its reason;
- an actor that dies (``RayActorError``: killed, OOM, node lost) is replaced by a new
  one, and its shard counts one attempt and goes back in the queue; the replacement gets
  work only once it has started, so when the cluster has no room for it (its node is
  gone) the run finishes on the actors that are left;
- a progress line at least every ``progress_seconds``, a line per finished shard with its
  decode-wait and model times (which side bounds it); ``ScheduleOutcome`` for the summary.
"""
from __future__ import annotations

import re
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from pipeline.localize.messages import ShardJob, ShardResult

ACTOR_START_TIMEOUT = 900.0


class ActorStartError(RuntimeError):
    """The first actors could not start (bad checkpoint on the workers, no resources ...)."""


@dataclass
class ActorStats:
    index: int
    info: dict[str, Any] = field(default_factory=dict)
    shards: int = 0
    images: int = 0
    errors: int = 0
    busy_seconds: float = 0.0
    decode_wait_seconds: float = 0.0  # its shards' model stage waiting for decoded samples
    model_seconds: float = 0.0
    died: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.busy_seconds if self.busy_seconds > 0 else 0.0


@dataclass
class _Slot:
    stats: ActorStats
    handle: Any
    job: ShardJob | None = None
    starting: Any = None  # a replacement's info() ref until it has started


@dataclass
class ScheduleOutcome:
    results: list[ShardResult] = field(default_factory=list)  # one per finished shard
    failed: dict[str, list[str]] = field(default_factory=dict)  # shard URL -> error per attempt
    attempts: dict[str, int] = field(default_factory=dict)
    actors: list[ActorStats] = field(default_factory=list)
    replaced_actors: int = 0
    seconds: float = 0.0  # from the first actor ready to the last result
    startup_seconds: float = 0.0
    overhead_seconds: list[float] = field(default_factory=list)  # per shard: round trip - in-actor time

    @property
    def images(self) -> int:
        return sum(r.images for r in self.results if not r.skipped)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in self.results if not r.skipped)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ACTOR_DETAIL = ("class_name:", "actor_id:", "pid:", "name:", "namespace:", "ip:")


def _describe_failure(e: BaseException) -> str:
    """One line for logs and the manifest: the exception a shard or actor start raised."""
    if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None:
        return f"{type(e.cause).__name__}: {e.cause}"
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    if isinstance(e, RayActorError) and getattr(e, "actor_init_failed", False):
        return lines[-1]  # the exception raised in __init__, after its traceback
    if isinstance(e, RayActorError):  # killed, OOM, node lost: the reason, without ids
        return " ".join(ln for ln in lines if not ln.startswith(_ACTOR_DETAIL))[:500]
    return f"{type(e).__name__}: {lines[-1]}"


# Failures that the same input gives every time, whichever actor tries: not retried.
_PERMANENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)


def retry_can_help(e: BaseException) -> bool:
    """False for a shard failure that the same input repeats (an exception whose class says
    ``retryable = False``, such as the reader's ShardFormatError, or a missing shard); True
    for the rest (network, I/O, lost objects), which a retry may get past."""
    cause = e.cause if isinstance(e, RayTaskError) and getattr(e, "cause", None) is not None else e
    return getattr(cause, "retryable", True) and not isinstance(cause, _PERMANENT)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def shard_timing(result: ShardResult) -> str:
    """``decode wait 0.8s, model 3.1s (model busy 79%), decode batched (3 on CPU): model-bound``.

    Decoding runs ahead of the model, so the model stage either runs or waits for decoded
    samples: a long wait means decoding bounds the shard, a short one the model does.
    """
    wait, model = result.decode_wait_seconds, result.model_seconds
    busy = model / (wait + model) if wait + model > 0 else 0.0
    how = f", decode {result.decode}" if result.decode else ""
    if result.decode == "batched" and result.decode_fallbacks:
        how += f" ({result.decode_fallbacks} on CPU)"
    if wait > model:
        bound = "decode-bound (give actors more CPUs, or --decode gpu on GPU actors)"
    else:
        bound = "model-bound"
    return f"decode wait {wait:.2f}s, model {model:.2f}s (model busy {100 * busy:.0f}%){how}: {bound}"


class ProgressLine:
    """``shards 3/40 | 1,234 images | 45.3 img/s | 2 errors | ETA 1m23s`` on ``out``."""

    def __init__(self, total_shards: int, out: TextIO | None = sys.stdout, every_seconds: float = 5.0):
        self.total = total_shards
        self.out = out
        self.every = every_seconds
        self.last_print = 0.0

    def due(self, now: float) -> bool:
        return now - self.last_print >= self.every

    def line(self, done: int, failed: int, images: int, in_progress: int, errors: int, elapsed: float) -> str:
        seen = images + in_progress
        rate = seen / elapsed if elapsed > 0 else 0.0
        remaining = self.total - done - failed
        if done and rate > 0:
            per_shard = images / done
            eta = format_seconds(max(remaining * per_shard - in_progress, 0) / rate)
        else:
            eta = "?"
        failed_text = f" ({failed} failed)" if failed else ""
        return (
            f"shards {done}/{self.total}{failed_text} | {seen:,} images | {rate:.1f} img/s | "
            f"{errors} errors | ETA {eta}"
        )

    def shard_done(self, result: ShardResult, actor: int) -> None:
        """One line per written shard: its rows and where its time went (``shard_timing``)."""
        if self.out is not None:
            print(
                f"[localize] shard {result.shard_url} on actor {actor}: {result.images:,} images, "
                f"{result.errors} errors in {result.seconds:.1f}s | {shard_timing(result)}",
                file=self.out, flush=True,
            )

    def emit(self, text: str, now: float) -> None:
        self.last_print = now
        if self.out is not None:
            print(f"[localize] {text}", file=self.out, flush=True)


class _RunState:
    """What one ``ShardScheduler.run`` tracks: the queue, attempts, shards in flight."""

    def __init__(self, jobs: Sequence[ShardJob]) -> None:
        self.outcome = ScheduleOutcome()
        self.t0 = time.monotonic()
        self.pending: deque[ShardJob] = deque(jobs)
        self.tried_on: dict[str, set[int]] = {j.shard_url: set() for j in jobs}
        self.errors: dict[str, list[str]] = {j.shard_url: [] for j in jobs}
        self.in_flight: dict[Any, tuple[_Slot, ShardJob, float]] = {}
        self.live_progress: dict[int, int] = {}
        self.stalled_since: float | None = None

    def fail_or_retry(self, job: ShardJob, why: str, max_retries: int, retryable: bool = True) -> None:
        errors = self.errors[job.shard_url]
        errors.append(why)
        self.outcome.attempts[job.shard_url] = len(errors)
        if len(errors) > max_retries or not retryable:
            self.outcome.failed[job.shard_url] = list(errors)
        else:
            self.pending.appendleft(job)  # retry soon, while the cause is fresh in the logs

    def fail_pending(self, why: str) -> None:
        for job in self.pending:
            self.errors[job.shard_url].append(why)
            self.outcome.failed[job.shard_url] = list(self.errors[job.shard_url])
        self.pending.clear()


class ShardScheduler:
    def __init__(
        self,
        create_actor: Callable[[int], Any],
        num_actors: int,
        max_retries: int = 2,
        progress: ProgressLine | None = None,
        poll_progress: bool = True,
    ) -> None:
        self.create_actor = create_actor
        self.num_actors = num_actors
        self.max_retries = max_retries
        self.progress = progress
        self.poll_progress = poll_progress
        self.slots: list[_Slot] = []
        self.retired: list[ActorStats] = []
        self._next_index = 0

    # --- actors ----------------------------------------------------------------------

    def _new_slot(self) -> _Slot:
        index = self._next_index
        self._next_index += 1
        return _Slot(ActorStats(index), self.create_actor(index))

    def start(self, timeout: float = ACTOR_START_TIMEOUT) -> None:
        """Create the actors and wait until each has loaded its model."""
        self.slots = [self._new_slot() for _ in range(self.num_actors)]
        refs = {s.handle.info.remote(): s for s in self.slots}
        deadline = time.monotonic() + timeout
        waiting = list(refs)
        while waiting:
            ready, waiting = ray.wait(waiting, num_returns=len(waiting), timeout=min(10.0, timeout))
            for ref in ready:
                try:
                    refs[ref].stats.info = ray.get(ref)
                except (RayActorError, RayTaskError) as e:
                    self.shutdown()
                    raise ActorStartError(f"a localize actor failed to start: {_describe_failure(e)}") from None
            if waiting and self.progress is not None:
                ready_count = len(self.slots) - len(waiting)
                self.progress.emit(f"waiting for actors: {ready_count}/{len(self.slots)} ready", time.monotonic())
            if waiting and time.monotonic() > deadline:
                self.shutdown()
                raise ActorStartError(
                    f"{len(waiting)} of {len(self.slots)} localize actors did not start within {timeout:.0f}s: "
                    "the cluster lacks the CPUs/GPUs they ask for (lower --num-actors, "
                    "--cpus-per-actor or --gpus-per-actor)"
                )

    def _replace(self, slot: _Slot, why: str) -> None:
        slot.stats.died = why
        self.retired.append(slot.stats)
        self.slots.remove(slot)
        try:
            ray.kill(slot.handle, no_restart=True)
        except Exception:
            pass
        replacement = self._new_slot()
        replacement.starting = replacement.handle.info.remote()
        self.slots.append(replacement)

    def _started(self, slot: _Slot) -> None:
        """A replacement answered info(): it takes work from now on (or is retired)."""
        ref, slot.starting = slot.starting, None
        try:
            slot.stats.info = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            slot.stats.died = f"failed to start: {_describe_failure(e)}"
            self.retired.append(slot.stats)
            self.slots.remove(slot)

    def shutdown(self) -> None:
        for slot in self.slots:
            try:
                ray.kill(slot.handle, no_restart=True)
            except Exception:
                pass

    # --- the loop --------------------------------------------------------------------

    def run(self, jobs: Sequence[ShardJob]) -> ScheduleOutcome:
        t_start = time.monotonic()
        if not self.slots:
            self.start()
        state = _RunState(jobs)
        state.outcome.startup_seconds = time.monotonic() - t_start
        try:
            while state.pending or state.in_flight:
                self._assign(state.pending, state.tried_on, state.in_flight)
                starting = {s.starting: s for s in self.slots if s.starting is not None}
                if self._stalled(state, starting):
                    break
                refs = list(state.in_flight) + list(starting)
                ready, _ = ray.wait(refs, num_returns=1, timeout=self._wait_timeout(state))
                for ref in ready:
                    if ref in starting:
                        self._started(starting[ref])
                    else:
                        self._collect(ref, state)
                self._report(state)
        finally:
            state.outcome.seconds = time.monotonic() - state.t0
            state.outcome.actors = sorted(self.retired + [s.stats for s in self.slots], key=lambda a: a.index)
        return state.outcome

    def _stalled(self, state: _RunState, starting: dict) -> bool:
        """Nothing in flight and no replacement able to start: fail what is left (True)."""
        if state.in_flight:  # only replacements that have not started yet can take the rest
            state.stalled_since = None
            return False
        state.stalled_since = state.stalled_since or time.monotonic()
        if starting and time.monotonic() - state.stalled_since <= ACTOR_START_TIMEOUT:
            return False
        state.fail_pending("no localize actor left: replacements could not start (cluster too small?)")
        return True

    def _wait_timeout(self, state: _RunState) -> float | None:
        """Until the next progress line is due; at most 10 s while only replacements are starting."""
        timeout = None
        if self.progress is not None:
            timeout = max(0.05, self.progress.every - (time.monotonic() - self.progress.last_print))
        if not state.in_flight:
            timeout = min(timeout or 10.0, 10.0)
        return timeout

    def _collect(self, ref: Any, state: _RunState) -> None:
        """One shard came back: a result, a failed shard (retried), or a dead actor (replaced)."""
        slot, job, submitted = state.in_flight.pop(ref)
        slot.job = None
        state.live_progress.pop(slot.stats.index, None)
        try:
            result: ShardResult = ray.get(ref)
        except RayActorError as e:
            why = f"actor {slot.stats.index} died: {_describe_failure(e)}"
            self._replace(slot, why)
            state.outcome.replaced_actors += 1
            state.fail_or_retry(job, why, self.max_retries)
            return
        except Exception as e:  # the shard itself failed (RayTaskError, lost object ...)
            state.tried_on[job.shard_url].add(slot.stats.index)
            state.fail_or_retry(
                job, f"on actor {slot.stats.index}: {_describe_failure(e)}", self.max_retries, retry_can_help(e)
            )
            return
        outcome = state.outcome
        outcome.attempts[job.shard_url] = len(state.errors[job.shard_url]) + 1
        outcome.results.append(result)
        outcome.overhead_seconds.append(max(time.monotonic() - submitted - result.seconds, 0.0))
        if not result.skipped:
            slot.stats.shards += 1
            slot.stats.images += result.images
            slot.stats.errors += result.errors
            slot.stats.busy_seconds += result.seconds
            slot.stats.decode_wait_seconds += result.decode_wait_seconds
            slot.stats.model_seconds += result.model_seconds
            if self.progress is not None:
                self.progress.shard_done(result, slot.stats.index)

    def _report(self, state: _RunState) -> None:
        """A progress line when one is due, and always at the end."""
        now = time.monotonic()
        if self.progress is None or not (self.progress.due(now) or not (state.pending or state.in_flight)):
            return
        if self.poll_progress and state.in_flight:
            state.live_progress = self._poll(state.in_flight)
        outcome = state.outcome
        line = self.progress.line(
            done=len(outcome.results),
            failed=len(outcome.failed),
            images=outcome.images,
            in_progress=sum(state.live_progress.values()),
            errors=outcome.errors,
            elapsed=now - state.t0,
        )
        self.progress.emit(line, now)

    def _assign(self, pending: deque[ShardJob], tried_on: dict[str, set[int]], in_flight: dict) -> None:
        ready = [s for s in self.slots if s.starting is None]
        live = {s.stats.index for s in ready}
        for job in list(pending):
            idle = [s for s in ready if s.job is None]
            if not idle:
                return
            tried = tried_on[job.shard_url]
            fresh = [s for s in idle if s.stats.index not in tried]
            if fresh:
                slot = fresh[0]
            elif live <= tried:  # every live actor has tried it: any will do
                slot = idle[0]
            else:  # wait for a busy actor that has not tried it yet
                continue
            pending.remove(job)
            slot.job = job
            in_flight[slot.handle.localize.remote(job)] = (slot, job, time.monotonic())

    def _poll(self, in_flight: dict) -> dict[int, int]:
        """Samples done so far in each in-flight shard; actors that do not answer count 0."""
        refs = {slot.handle.progress.remote(): slot.stats.index for slot, _, _ in in_flight.values()}
        counts: dict[int, int] = {}
        try:
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=1.0)
            for ref in ready:
                try:
                    counts[refs[ref]] = int(ray.get(ref))
                except Exception:
                    pass
        except GetTimeoutError:
            pass
        return counts
