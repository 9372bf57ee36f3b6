"""pipeline/localize/run.py helpers that need no cluster: plan, run id, resources, checks."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.localize.run import (
    BadInputError,
    LocalizeConfig,
    actor_resources,
    default_run_id,
    plan_run,
)
from pipeline.data.storage import storage_env

REPO = Path(__file__).resolve().parents[3]


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
    pq.write_table(pa.table({"status": ["ok"]}), run / "a-000001.parquet")
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
    with pytest.raises(BadInputError, match="--decode gpu needs GPUs"):
        actor_resources(_options(decode="gpu"), cpu_only, 10)
    assert actor_resources(_options(decode="gpu"), gpus, 10).gpus == 1.0
    with pytest.raises(BadInputError, match="cluster has 8 CPUs and 0 GPUs"):
        actor_resources(_options(num_actors=3, cpus_per_actor=4), cpu_only, 10)
    with pytest.raises(BadInputError, match="--gpus-per-actor 1 but the cluster has 0 GPUs"):
        actor_resources(_options(gpus_per_actor=1), cpu_only, 10)


def test_storage_env_passes_only_aws_variables(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("SOMETHING_ELSE", "x")
    env = storage_env()
    assert env["AWS_ENDPOINT_URL"] == "http://127.0.0.1:1" and "SOMETHING_ELSE" not in env


# --- issue 14 (7): bad inputs are clear errors before Ray starts --------------------------------

MICRO = "sat_vit_micro_patch8_64"


@pytest.fixture(scope="module")
def micro_inputs(tmp_path_factory):
    """A good 10-class micro checkpoint's bytes and one small synthetic shard."""
    import torch

    from model.checkpoint import checkpoint_bytes, default_config
    from model.factory import create_model
    from pipeline.datasets.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("bad_inputs")
    torch.manual_seed(0)
    model = create_model(MICRO, 10)
    data = checkpoint_bytes(model, default_config(MICRO, 10))
    shards = write_synthetic_shards(str(root / "shards"), "val", 4, seed=0, shard_size=4)
    return {"root": root, "checkpoint": data, "model": model, "shard": shards[0]}


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test, instead of starting a cluster, if run_localize gets as far as Ray."""
    import pipeline.localize.run as run_module

    def refuse():
        raise AssertionError("run_localize started Ray: the bad input was not caught before")

    monkeypatch.setattr(run_module, "ensure_ray", refuse)


def test_truncated_checkpoint_is_named_before_ray(micro_inputs, tmp_path, no_ray):
    from pipeline.localize.run import read_checkpoint, run_localize

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(micro_inputs["checkpoint"][: len(micro_inputs["checkpoint"]) - 1000])  # header intact
    with pytest.raises(BadInputError, match=f"{cut} is truncated: .* copy or export it again"):
        read_checkpoint(str(cut))
    config = LocalizeConfig(shards=micro_inputs["shard"], checkpoint=str(cut), output=str(tmp_path / "out"))
    with pytest.raises(BadInputError, match="is truncated"):
        run_localize(config, out=None)
    assert not list((tmp_path).rglob("*.parquet"))


def test_weights_that_do_not_fit_their_config_are_named_before_ray(micro_inputs, tmp_path, no_ray):
    """5-class weights under a 10-class config (and a renamed tensor): refused with the tensor's name."""
    import json

    from safetensors.torch import save

    from model.checkpoint import CONFIG_KEY, default_config
    from model.factory import create_model
    from pipeline.localize.run import read_checkpoint, run_localize

    five = create_model(MICRO, 5)
    state = {k: v.contiguous() for k, v in five.state_dict().items()}
    wrong = tmp_path / "five.safetensors"
    wrong.write_bytes(save(state, metadata={CONFIG_KEY: json.dumps(default_config(MICRO, 10))}))
    with pytest.raises(BadInputError, match=r"five.safetensors: the weights do not match the checkpoint's config "
                                            r"\(model sat_vit_micro_patch8_64, 10 classes\): head.conv.weight: "
                                            r"shape \[5, 128, 3, 3\] in the file, \[10, 128, 3, 3\] for the config"):
        read_checkpoint(str(wrong))
    config = LocalizeConfig(shards=micro_inputs["shard"], checkpoint=str(wrong), output=str(tmp_path / "out"))
    with pytest.raises(BadInputError, match="do not match"):
        run_localize(config, out=None)

    ten = {k: v.contiguous() for k, v in micro_inputs["model"].state_dict().items()}
    ten["head.renamed"] = ten.pop("head.conv.bias")
    renamed = tmp_path / "renamed.safetensors"
    renamed.write_bytes(save(ten, metadata={CONFIG_KEY: json.dumps(default_config(MICRO, 10))}))
    with pytest.raises(BadInputError, match="head.conv.bias: missing; head.renamed: not in the model"):
        read_checkpoint(str(renamed))
    good = tmp_path / "good.safetensors"
    good.write_bytes(micro_inputs["checkpoint"])
    assert read_checkpoint(str(good))[1]["num_classes"] == 10


def test_a_run_directory_that_cannot_take_files_is_refused_before_ray(micro_inputs, tmp_path, no_ray):
    """The output root is writable but <output>/<run_id> is not a directory one can write into."""
    from pipeline.localize.run import run_localize

    checkpoint = tmp_path / "m.safetensors"
    checkpoint.write_bytes(micro_inputs["checkpoint"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "r1").write_text("a file where the run directory should be")
    config = LocalizeConfig(shards=micro_inputs["shard"], checkpoint=str(checkpoint), output=str(out), run_id="r1")
    with pytest.raises(BadInputError, match=f"the run directory {out}/r1 cannot take files .* make it writable"):
        run_localize(config, out=None)
    assert (out / "r1").read_text().startswith("a file")


def test_s3_without_credentials_or_endpoint_is_named_before_ray(micro_inputs, tmp_path, monkeypatch, no_ray,
                                                                no_s3_credentials, closed_port):
    import time

    from pipeline.localize.run import run_localize

    checkpoint = tmp_path / "m.safetensors"
    checkpoint.write_bytes(micro_inputs["checkpoint"])
    endpoint = f"http://127.0.0.1:{closed_port}"
    no_s3_credentials(endpoint)
    config = LocalizeConfig(shards="s3://satloc/wds/val-{000000..000003}.tar", checkpoint=str(checkpoint),
                            output=str(tmp_path / "out"))
    with pytest.raises(BadInputError, match="no S3 credentials for bucket 'satloc' .* set AWS_ACCESS_KEY_ID and "
                                            "AWS_SECRET_ACCESS_KEY"):
        run_localize(config, out=None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    started = time.monotonic()
    with pytest.raises(BadInputError, match=f"bucket 'satloc' at endpoint {endpoint} does not answer .* "
                                            "check AWS_ENDPOINT_URL"):
        run_localize(config, out=None)
    assert time.monotonic() - started < 10


def test_a_zero_byte_cut_or_short_output_is_redone(tmp_path):
    """Issue 14: done means readable, with the rows the manifest records."""
    from pipeline.results.manifest import Manifest, ShardEntry, write_manifest

    run = tmp_path / "out" / "r1"
    run.mkdir(parents=True)
    table = pa.table({"status": ["ok"] * 50})
    for stem in ("a-good", "a-short"):
        pq.write_table(table, run / f"{stem}.parquet")
    (run / "a-zero.parquet").write_bytes(b"")
    (run / "a-cut.parquet").write_bytes((run / "a-good.parquet").read_bytes()[:-30])
    write_manifest(str(run), Manifest("r1", {}, [
        ShardEntry("d/a-good.tar", str(run / "a-good.parquet"), "done", rows=50, errors=0),
        ShardEntry("d/a-short.tar", str(run / "a-short.parquet"), "done", rows=80, errors=0),
    ]))
    urls = ["d/a-good.tar", "d/a-zero.tar", "d/a-cut.tar", "d/a-short.tar"]
    plan = plan_run(urls, str(tmp_path / "out"), "r1", False)
    assert [s.done for s in plan.shards] == [True, False, False, False]
    assert plan.shards[0].redo is None
    assert "a-zero.parquet does not read as Parquet" in plan.shards[1].redo
    assert "a-cut.parquet does not read as Parquet" in plan.shards[2].redo
    assert "holds 50 rows but the run's manifest records 80" in plan.shards[3].redo
    assert "1 done, 3 to do; 3 unreadable output(s) redone" in plan.describe()


def test_labels_outside_the_checkpoint_classes_are_in_the_summary():
    """Issue 14: kept and counted, and a checkpoint with fewer classes than the data is named."""
    from pipeline.localize.messages import ShardResult
    from pipeline.localize.run import RunSummary
    from pipeline.localize.scheduler import ScheduleOutcome

    outcome = ScheduleOutcome(results=[
        ShardResult("a.tar", "a.parquet", rows=4, gt_labels_outside=1, gt_label_range=(-7, 3)),
        ShardResult("b.tar", "b.parquet", rows=4, gt_labels_outside=2, gt_label_range=(0, 9)),
    ])
    summary = RunSummary("r", "o/r", None, 2, 0, 2, num_classes=5)
    summary.record(outcome)
    assert summary.gt_labels_outside == 3 and summary.gt_label_range == (-7, 9)
    note = summary.label_note()
    assert "3 rows have a ground-truth label outside the checkpoint's 5 classes (0..4; labels seen: -7..9)" in note
    assert "the checkpoint has 5 classes but the data's labels reach 9" in note
    summary.record(ScheduleOutcome(results=[ShardResult("a.tar", "a.parquet", rows=4, gt_label_range=(0, 4))]))
    assert summary.label_note() is None


def test_cli_decode_gpu_without_gpus_exits_2_before_ray(micro_inputs, tmp_path, no_ray, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("localize_shards", REPO / "jobs" / "localize_shards.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    checkpoint = tmp_path / "m.safetensors"
    checkpoint.write_bytes(micro_inputs["checkpoint"])
    argv = ["--shards", micro_inputs["shard"], "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out"),
            "--decode", "gpu", "--gpus-per-actor", "0"]
    assert job.main(argv) == 2
    assert "error: --decode gpu needs GPUs" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # argparse names the choices
        job.parse_args(argv[:6] + ["--decode", "nvjpeg"])
