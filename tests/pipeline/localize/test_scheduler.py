"""pipeline/localize/scheduler.py with stand-in actors: retries, replacement, progress lines.

The stand-in actors need no model: they record which actor ran which shard (a file per
attempt) and fail or die on command, so every rule of the scheduler is checked quickly.
"""
from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import time

import pytest
import ray
import ray.cloudpickle

from pipeline.localize.messages import ShardJob, ShardResult
from pipeline.localize.scheduler import ProgressLine, ShardScheduler, format_seconds

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


class StandInActor:
    """Fails shards named ``flaky*`` on actor 0, always fails ``broken*``, dies on ``die*`` once."""

    def __init__(self, index: int, log_dir: str, seconds: float = 0.05):
        self.index, self.log_dir, self.seconds = index, log_dir, seconds
        self.done = 0

    def info(self):
        return {"pid": os.getpid(), "index": self.index}

    def progress(self):
        return self.done

    def localize(self, job: ShardJob) -> ShardResult:
        name = os.path.basename(job.shard_url)
        attempt = len([f for f in os.listdir(self.log_dir) if f.startswith(name + ".")])
        open(os.path.join(self.log_dir, f"{name}.{attempt}.actor{self.index}"), "w").close()
        if name.startswith("die") and attempt == 0:
            os._exit(1)
        if name.startswith("broken") or (name.startswith("flaky") and self.index == 0):
            raise ValueError(f"cannot read {name}")
        if name.startswith("nottar"):  # what the reader raises for a file that is not a tar
            from pipeline.data.reader import ShardFormatError

            raise ShardFormatError(f"shard {name} is not a tar file (empty file)")
        if name.startswith("ioerr") and attempt == 0:
            raise ConnectionResetError(f"reading {name}: connection reset")
        time.sleep(self.seconds)
        self.done += 10
        return ShardResult(job.shard_url, job.out_url, rows=10, errors=1, seconds=self.seconds)


def _scheduler(tmp_path, num_actors=2, max_retries=2, out=None, every=60.0, seconds=0.05):
    actor_class = ray.remote(num_cpus=0.5, max_restarts=0, max_concurrency=2)(StandInActor)
    progress = ProgressLine(0, out, every) if out is not None else None
    return ShardScheduler(
        lambda i: actor_class.remote(i, str(tmp_path), seconds), num_actors, max_retries=max_retries, progress=progress
    )


def _attempts(tmp_path, name):
    """(attempt, actor index) for each try of shard ``name``, in order."""
    found = [f.split(".") for f in os.listdir(tmp_path) if f.startswith(name + ".")]
    return sorted((int(a), int(actor[len("actor"):])) for _, a, actor in found)


def _jobs(names):
    return [ShardJob(f"mem://{n}", f"out/{n}.parquet") for n in names]


def test_every_shard_once_spread_over_actors(ray_cluster, tmp_path):
    names = [f"ok{i}" for i in range(8)]
    sched = _scheduler(tmp_path)
    try:
        outcome = sched.run(_jobs(names))
    finally:
        sched.shutdown()
    assert sorted(r.shard_url for r in outcome.results) == sorted(f"mem://{n}" for n in names)
    assert not outcome.failed and outcome.replaced_actors == 0
    assert outcome.images == 8 * 9 and outcome.errors == 8
    for n in names:
        assert len(_attempts(tmp_path, n)) == 1
    per_actor = {a.index: a.shards for a in outcome.actors}
    assert sum(per_actor.values()) == 8 and all(v >= 1 for v in per_actor.values())
    assert all(a.images_per_second > 0 for a in outcome.actors)
    assert len(outcome.overhead_seconds) == 8 and all(o >= 0 for o in outcome.overhead_seconds)


def test_failed_shard_is_retried_on_another_actor(ray_cluster, tmp_path):
    sched = _scheduler(tmp_path)
    try:
        sched.start()
        # Both actors idle: the first job goes to actor 0, where 'flaky' fails.
        outcome = sched.run(_jobs(["flaky", "ok"]))
    finally:
        sched.shutdown()
    assert not outcome.failed
    tries = _attempts(tmp_path, "flaky")
    assert tries == [(0, 0), (1, 1)]
    assert outcome.attempts["mem://flaky"] == 2 and outcome.attempts["mem://ok"] == 1


def test_shard_fails_after_max_retries_and_others_finish(ray_cluster, tmp_path):
    sched = _scheduler(tmp_path, max_retries=2)
    try:
        outcome = sched.run(_jobs(["broken", "ok1", "ok2"]))
    finally:
        sched.shutdown()
    assert list(outcome.failed) == ["mem://broken"]
    errors = outcome.failed["mem://broken"]
    assert len(errors) == 3 and all("ValueError: cannot read broken" in e for e in errors)
    tries = _attempts(tmp_path, "broken")
    assert len(tries) == 3
    assert tries[0][1] != tries[1][1]  # the first retry went to the other actor
    assert sorted(r.shard_url for r in outcome.results) == ["mem://ok1", "mem://ok2"]


def test_no_retries_means_one_attempt(ray_cluster, tmp_path):
    sched = _scheduler(tmp_path, num_actors=1, max_retries=0)
    try:
        outcome = sched.run(_jobs(["broken"]))
    finally:
        sched.shutdown()
    assert outcome.attempts["mem://broken"] == 1 and len(_attempts(tmp_path, "broken")) == 1


def test_a_shard_that_is_not_a_tar_fails_once_and_io_errors_are_retried(ray_cluster, tmp_path):
    """Issue 14: retry only what can succeed on retry."""
    sched = _scheduler(tmp_path, max_retries=2)
    try:
        outcome = sched.run(_jobs(["nottar", "ioerr", "ok"]))
    finally:
        sched.shutdown()
    assert list(outcome.failed) == ["mem://nottar"]
    assert outcome.attempts["mem://nottar"] == 1 and len(_attempts(tmp_path, "nottar")) == 1
    assert "ShardFormatError: shard nottar is not a tar file" in outcome.failed["mem://nottar"][0]
    assert outcome.attempts["mem://ioerr"] == 2 and len(_attempts(tmp_path, "ioerr")) == 2
    assert sorted(r.shard_url for r in outcome.results) == ["mem://ioerr", "mem://ok"]


def test_dead_actor_is_replaced_and_its_shard_redone(ray_cluster, tmp_path):
    sched = _scheduler(tmp_path)
    try:
        outcome = sched.run(_jobs(["die", "ok1", "ok2", "ok3"]))
        alive = len(sched.slots)
    finally:
        sched.shutdown()
    assert not outcome.failed
    assert outcome.replaced_actors == 1 and alive == 2
    assert sorted(r.shard_url for r in outcome.results) == ["mem://die", "mem://ok1", "mem://ok2", "mem://ok3"]
    tries = _attempts(tmp_path, "die")
    assert len(tries) == 2 and tries[0][1] != tries[1][1]
    dead = [a for a in outcome.actors if a.died]
    assert len(dead) == 1 and "died" in dead[0].died and len(outcome.actors) == 3


def test_progress_lines_every_interval(ray_cluster, tmp_path):
    out = io.StringIO()
    sched = _scheduler(tmp_path, out=out, every=0.2, seconds=0.3)
    sched.progress.total = 6
    try:
        outcome = sched.run(_jobs([f"ok{i}" for i in range(6)]))
    finally:
        sched.shutdown()
    lines = [ln for ln in out.getvalue().splitlines() if "shards" in ln]
    assert len(lines) >= 3  # about a second of work, a line every 0.2 s
    assert lines[-1].startswith("[localize] shards 6/6 | 54 images")
    assert "img/s" in lines[-1] and "ETA 0s" in lines[-1] and "6 errors" in lines[-1]
    assert outcome.images == 54


def test_progress_line_format_and_eta():
    p = ProgressLine(10, None)
    text = p.line(done=4, failed=1, images=400, in_progress=50, errors=3, elapsed=10.0)
    # 450 images in 10 s; 5 shards left of ~100 images, 50 of them already seen.
    assert text == "shards 4/10 (1 failed) | 450 images | 45.0 img/s | 3 errors | ETA 10s"
    assert p.line(0, 0, 0, 0, 0, 1.0).endswith("ETA ?")
    assert format_seconds(75) == "1m15s" and format_seconds(7300) == "2h01m"


class FailingInit:
    def __init__(self):
        raise RuntimeError("checkpoint s3://b/m.safetensors: no such key")

    def info(self):  # pragma: no cover - never reached
        return {}


def test_actor_that_cannot_start_is_a_clear_error(ray_cluster):
    from pipeline.localize.scheduler import ActorStartError

    actor_class = ray.remote(num_cpus=0.5, max_restarts=0)(FailingInit)
    sched = ShardScheduler(lambda i: actor_class.remote(), 1)
    with pytest.raises(ActorStartError, match="failed to start.*no such key"):
        sched.run(_jobs(["ok"]))
