"""pipeline/localize/run.py helpers that need no cluster: plan, run id, resources, checks."""
from __future__ import annotations

import pytest

from pipeline.localize.run import (
    BadInputError,
    LocalizeConfig,
    actor_resources,
    default_run_id,
    plan_run,
)
from pipeline.data.storage import storage_env


def _options(**kw) -> LocalizeConfig:
    return LocalizeConfig(**{"shards": "s/", "checkpoint": "c", "output": "o", **kw})


def test_default_run_id_is_stable_and_tracks_spec_model_and_settings():
    a = default_run_id("s3://b/wds/", "f" * 64, {"threshold": 0.4})
    assert a == default_run_id(" s3://b/wds/ ", "f" * 64, {"threshold": 0.4})
    assert a.startswith("loc-ffffffff-")
    assert a != default_run_id("s3://b/other/", "f" * 64, {"threshold": 0.4})
    assert a != default_run_id("s3://b/wds/", "e" * 64, {"threshold": 0.4})
    assert a != default_run_id("s3://b/wds/", "f" * 64, {"threshold": 0.3})


def test_plan_marks_done_shards_and_refuses_clashing_names(tmp_path):
    run = tmp_path / "out" / "r1"
    run.mkdir(parents=True)
    (run / "a-000001.parquet").write_bytes(b"x")
    (run / ".tmp-a-000002").write_bytes(b"half")  # an interrupted write is not a done shard
    plan = plan_run(["d/a-000000.tar", "d/a-000001.tar", "d/a-000002.tar"], str(tmp_path / "out"), "r1", False)
    assert [s.done for s in plan.shards] == [False, True, False]
    assert [s.out_url for s in plan.todo] == [f"{run}/a-000000.parquet", f"{run}/a-000002.parquet"]
    assert plan.describe().startswith("run r1: 3 shards, 1 done, 2 to do")
    assert len(plan_run(["d/a-000001.tar"], str(tmp_path / "out"), "r1", True).todo) == 1
    fresh = plan_run(["d/a-000001.tar"], str(tmp_path / "out"), "new", False)
    assert fresh.done == 0 and not (tmp_path / "out" / "new").exists()
    with pytest.raises(BadInputError, match="would both write a-000000.parquet"):
        plan_run(["d1/a-000000.tar", "d2/a-000000.tar"], str(tmp_path / "out"), "r1", False)


def test_actor_resources_defaults_and_limits():
    cpu_only = {"CPU": 8.0}
    assert actor_resources(_options(), cpu_only, 100) == actor_resources(_options(cpus_per_actor=1), cpu_only, 100)
    r = actor_resources(_options(), cpu_only, 100)
    assert (r.num_actors, r.cpus, r.gpus) == (8, 1.0, 0.0)
    assert actor_resources(_options(), cpu_only, 3).num_actors == 3  # never more actors than shards
    gpus = {"CPU": 16.0, "GPU": 4.0}
    r = actor_resources(_options(), gpus, 100)
    assert (r.num_actors, r.cpus, r.gpus) == (4, 4.0, 1.0)  # one per GPU, the CPUs shared out
    r = actor_resources(_options(gpus_per_actor=0.5), gpus, 100)
    assert (r.num_actors, r.gpus) == (8, 0.5)
    with pytest.raises(BadInputError, match="fp16 needs GPUs"):
        actor_resources(_options(precision="fp16"), cpu_only, 10)
    assert actor_resources(_options(precision="fp16"), gpus, 10).gpus == 1.0
    with pytest.raises(BadInputError, match="cluster has 8 CPUs and 0 GPUs"):
        actor_resources(_options(num_actors=3, cpus_per_actor=4), cpu_only, 10)
    with pytest.raises(BadInputError, match="--gpus-per-actor 1 but the cluster has 0 GPUs"):
        actor_resources(_options(gpus_per_actor=1), cpu_only, 10)


def test_storage_env_passes_only_aws_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("SOMETHING_ELSE", "x")
    env = storage_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1" and "SOMETHING_ELSE" not in env
