"""jobs/localize_shards.py end to end: Ray actors over synthetic shards -> Parquet (DESIGN §3).

One in-process Ray cluster (2 CPUs, 2 logical GPUs) serves the module. The first run uses
the defaults, so the 2 logical GPUs give 2 actors pinned to distinct GPU ids (on CPU, as
this machine has no CUDA). Its rows are checked against a direct single-process model
call on the same samples. Other tests: a rerun does no work, an actor killed mid-run,
the SeaweedFS endpoint (shards in, Parquet out, a new shard picked up by the next run),
bad inputs, and ``ray job submit`` against a ``ray start --head`` cluster.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch

from model.boxes import boxes_from_maps
from model.checkpoint import default_config
from pipeline.data.checkpoints import load_checkpoint, save_checkpoint
from model.factory import create_model
from model.precision import resolve_precision
from pipeline.localize.run import BadInputError, LocalizeConfig, run_localize
from pipeline.evaluation.evaluate import evaluate_run
from pipeline.data.preprocess import ResizeCrop, normalize, resize_to_input, stack_uint8
from pipeline.data.reader import read_samples
from pipeline.results.schema import loc_map_shape, localize_schema
from pipeline.datasets.synthetic import class_names, iter_synthetic_samples, write_synthetic_shards
from ray_cluster import RayCluster
from run_factory import write_shard

REPO = Path(__file__).resolve().parents[2]
MODEL = "sat_vit_micro_patch8_64"
NAMES = class_names("birds", 10)
BATCH = 8

pytestmark = pytest.mark.slow


# --- data and cluster -------------------------------------------------------------------


def _write_bad_shard(directory: Path) -> str:
    """6 samples: #1 undecodable, #3 without an image, and the tar cut inside the last one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, (key, members) in enumerate(iter_synthetic_samples("bad", 6, seed=3)):
            if i == 1:
                members["jpg"] = b"this is not a jpeg"
            if i == 3:
                del members["jpg"]
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tf.addfile(info, io.BytesIO(members[ext]))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        last = tf.getmembers()[-1]
    path = directory / "bad-000000.tar"
    path.write_bytes(data[: last.offset_data + last.size // 2])  # cut inside the last member
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("localize")
    shards = root / "shards"
    write_synthetic_shards(str(shards), "val", 36, seed=0, shard_size=12)
    _write_bad_shard(shards)
    torch.manual_seed(0)
    model = create_model(MODEL, 10)
    checkpoint = str(root / "sat.safetensors")
    save_checkpoint(model, checkpoint, default_config(MODEL, 10, model_kwargs={}, class_names=NAMES, threshold=0.4))
    return {"root": root, "shards": str(shards) + "/", "checkpoint": checkpoint}


@pytest.fixture(scope="module")
def ray_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rt_", dir="/tmp")
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, _temp_dir=temp_dir,
             _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def first_run(data, ray_cluster):
    out = io.StringIO()
    options = LocalizeConfig(
        shards=data["shards"], checkpoint=data["checkpoint"], output=str(data["root"] / "out"),
        batch_size=BATCH, progress_seconds=0.5,
        precision="fp32",  # compared with direct fp32 model calls; other runs compare with this one
    )
    summary = run_localize(options, out=out)
    return {"options": options, "summary": summary, "log": out.getvalue()}


def _read_run(run_url: str):
    files = sorted(Path(run_url).glob("*.parquet"))
    return {f.stem: pq.read_table(f) for f in files}


def direct_model_rows(shard_url: str, checkpoint: str) -> dict[str, dict]:
    """The reference: one process, the model called directly, batches of BATCH good samples."""
    model, config = load_checkpoint(checkpoint)
    samples = list(read_samples(shard_url))
    good = [s for s in samples if s.ok]
    rows = {s.key: {"error": s.error} for s in samples if not s.ok}
    for start in range(0, len(good), BATCH):
        chunk = good[start: start + BATCH]
        x = normalize(stack_uint8([resize_to_input(s.image, 64) for s in chunk]), config["mean"], config["std"])
        with torch.no_grad():
            out = model(x)
        boxes = boxes_from_maps(out.loc_map, [(s.width, s.height) for s in chunk], config["threshold"])
        for s, logit, loc_map, box in zip(chunk, out.logits, out.loc_map, boxes):
            rows[s.key] = {"label": int(logit.argmax()), "map": loc_map.flatten().numpy(), "boxes": box.numpy(),
                           "gt_label": s.label}
    return rows


# --- the first run: 2 actors on 2 logical GPUs -------------------------------------------


def test_two_actors_pinned_to_distinct_gpus(first_run):
    summary = first_run["summary"]
    assert summary.exit_code == 0 and not summary.failed_shards
    assert len(summary.actors) == 2
    gpu_ids = [tuple(a["info"]["gpu_ids"]) for a in summary.actors]
    assert sorted(gpu_ids) == [("0",), ("1",)]
    assert sorted(a["info"]["cuda_visible_devices"] for a in summary.actors) == ["0", "1"]
    assert {a["info"]["device"] for a in summary.actors} == {"cpu"}  # no CUDA on this machine
    assert all(a["shards"] >= 1 for a in summary.actors)
    assert summary.shards_total == 4 and summary.shards_processed == 4


def test_every_key_once_and_values_equal_a_direct_model_call(data, first_run):
    tables = _read_run(first_run["summary"].run_url)
    assert sorted(tables) == ["bad-000000", "val-000000", "val-000001", "val-000002"]
    for stem, table in tables.items():
        shard = data["shards"] + stem + ".tar"
        expected = direct_model_rows(shard, data["checkpoint"])
        keys = table["key"].to_pylist()
        assert len(keys) == len(set(keys)) and set(keys) == set(expected), stem
        assert loc_map_shape(table.schema) == (8, 8)
        assert table.schema.remove_metadata().equals(localize_schema(8, 8).remove_metadata())
        for row in table.to_pylist():
            ref = expected[row["key"]]
            assert row["shard"] == shard
            if "label" not in ref:
                assert row["status"] == "error" and row["error"] == ref["error"]
                continue
            assert row["status"] == "ok"
            assert row["label"] == ref["label"]
            assert row["class_name"] == NAMES[ref["label"]]
            assert row["gt_label"] == ref["gt_label"]
            stored = np.array(row["loc_map"], dtype=np.float32) / 255.0
            assert np.abs(stored - ref["map"]).max() <= 0.5 / 255 + 1e-6  # within quantisation
            got = np.array([[b["x0"], b["y0"], b["x1"], b["y1"]] for b in row["boxes"]])
            np.testing.assert_array_equal(got, ref["boxes"][:, :4])
            assert [row["box_x0"], row["box_y0"], row["box_x1"], row["box_y1"]] == ref["boxes"][0, :4].tolist()


def test_corrupt_samples_become_error_rows(first_run):
    table = _read_run(first_run["summary"].run_url)["bad-000000"]
    rows = table.to_pylist()
    errors = {r["key"]: r["error"] for r in rows if r["status"] == "error"}
    assert errors["bad_0000001"].startswith("undecodable image")
    assert errors["bad_0000003"].startswith("no image member")
    assert any("truncated" in e for e in errors.values())
    assert len(errors) == 3
    ok = [r for r in rows if r["status"] == "ok"]
    assert [r["key"] for r in ok] == ["bad_0000000", "bad_0000002", "bad_0000004"]
    assert first_run["summary"].errors == 3 and first_run["summary"].images == 36 + 3


def test_duckdb_reads_the_output(first_run):
    run_url = first_run["summary"].run_url
    tables = _read_run(run_url)
    rows = [r for t in tables.values() for r in t.to_pylist()]
    ok = [r for r in rows if r["status"] == "ok"]
    by_label: dict[int, list[float]] = {}
    for r in ok:
        by_label.setdefault(r["label"], []).append(r["fg_ratio"])
    got = duckdb.sql(
        f"SELECT label, count(*) AS n, avg(fg_ratio) AS fg FROM read_parquet('{run_url}/*.parquet') "
        "WHERE status = 'ok' GROUP BY label ORDER BY label"
    ).fetchall()
    assert [(label, n) for label, n, _ in got] == [(k, len(v)) for k, v in sorted(by_label.items())]
    for label, _, fg in got:
        assert fg == pytest.approx(float(np.mean(by_label[label])), rel=1e-6)
    assert duckdb.sql(f"SELECT count(*) FROM '{run_url}/*.parquet'").fetchall()[0][0] == len(rows) == 42
    # The map is a plain fixed-size list DuckDB can index.
    first = duckdb.sql(f"SELECT loc_map[1], len(loc_map) FROM '{run_url}/val-000000.parquet' LIMIT 1").fetchall()[0]
    assert first[1] == 64 and 0 <= first[0] <= 255


def test_progress_summary_and_manifest(first_run):
    log = first_run["log"]
    summary = first_run["summary"]
    assert "4 shards, 0 done, 4 to do" in log
    assert "[localize] shards 4/4 | 39 images" in log and "| 3 errors | ETA 0s" in log  # the last progress line
    assert "done: 4 shards processed, 0 failed, 39 images, 3 error rows" in log
    assert log.count("img/s busy") == 2
    manifest = json.loads(Path(summary.manifest_url).read_text())
    assert manifest["run_id"] == summary.run_id and manifest["shards_done"] == 4
    assert manifest["rows"] == 42 and manifest["error_rows"] == 3 and manifest["failed_shards"] == []
    assert {s["status"] for s in manifest["shards"]} == {"done"}
    assert sum(s["rows"] for s in manifest["shards"]) == 42
    assert manifest["model_sha256"] == load_checkpoint(first_run["options"].checkpoint)[1]["sha256"]
    assert manifest["model_config"]["model"] == MODEL and manifest["settings"]["threshold"] == 0.4
    assert manifest["settings"]["precision"] == manifest["settings"]["precision_requested"] == "fp32"
    assert f"batch {BATCH}, fp32, --decode auto" in log
    # --decode auto on actors without CUDA (logical GPUs here): the CPU path, said per actor
    assert manifest["settings"]["decode_requested"] == "auto"
    assert [a["info"]["decode"] for a in manifest["timings"]["actors"]] == ["cpu", "cpu"]
    # one line per shard: where its time went, so a user sees which side bounds it
    shard_lines = [ln for ln in log.splitlines() if ln.startswith("[localize] shard ") and " on actor " in ln]
    assert len(shard_lines) == 4 and all("decode wait" in ln and "model busy" in ln for ln in shard_lines)
    assert all(ln.endswith(("model-bound", "GPU actors)")) and "decode cpu" in ln for ln in shard_lines)
    assert log.count("decode cpu: decode wait") == 2  # the actor summary lines
    assert manifest["timings"]["images"] == 39 and manifest["timings"]["seconds"] > 0


def test_rerun_does_no_work(first_run):
    summary = first_run["summary"]
    files = sorted(Path(summary.run_url).glob("*.parquet"))
    before = {f: f.stat().st_mtime_ns for f in files}
    out = io.StringIO()
    notes = Path(first_run["options"].shards) / "notes.txt"  # a file that is not a shard: said and recorded
    notes.write_text("not a shard")
    try:
        again = run_localize(first_run["options"], out=out)
    finally:
        notes.unlink()
    assert again.run_id == summary.run_id  # the default id is stable
    assert (again.shards_total, again.shards_done_before, again.shards_todo, again.shards_processed) == (4, 4, 0, 0)
    assert {f: f.stat().st_mtime_ns for f in files} == before
    assert "actor" not in out.getvalue()  # no actors were started
    manifest = json.loads(Path(again.manifest_url).read_text())
    assert manifest["rows"] == 42 and len(manifest["history"]) == 2
    assert [h["files_not_shards"] for h in manifest["history"]] == [[], [str(notes)]]
    assert f"skipped 1 file(s) in {first_run['options'].shards!r} that are not shards" in out.getvalue()
    dry = run_localize(LocalizeConfig(**{**first_run["options"].__dict__, "dry_run": True, "overwrite": True}), out=None)
    assert dry.dry_run and dry.shards_todo == 4  # --overwrite would redo them all


# --- faults --------------------------------------------------------------------------------


def test_actor_killed_mid_run_still_gives_every_key_once(data, first_run, tmp_path):
    shards = tmp_path / "many"
    write_synthetic_shards(str(shards), "kill", 96, seed=5, shard_size=6)  # 16 shards
    options = LocalizeConfig(
        shards=str(shards) + "/", checkpoint=data["checkpoint"], output=str(tmp_path / "out"), run_id="killtest",
        num_actors=2, gpus_per_actor=0, batch_size=1, progress_seconds=60,
    )
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(summary=run_localize(options, out=None)))
    thread.start()
    run_dir = tmp_path / "out" / "killtest"
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("*.parquet")) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    names = [n for n in ray.util.list_named_actors() if n.startswith("satloc-localize-killtest-")]
    assert names, "the run's actors were not found"
    ray.kill(ray.get_actor(sorted(names)[0]))
    thread.join(timeout=300)
    summary = result["summary"]
    assert summary.exit_code == 0
    manifest = json.loads(Path(summary.manifest_url).read_text())
    assert manifest["timings"]["replaced_actors"] == 1
    assert sum(1 for a in summary.actors if a["died"]) == 1 and len(summary.actors) == 3
    keys = [k for f in sorted(run_dir.glob("*.parquet")) for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]
    assert len(keys) == 96 and len(set(keys)) == 96
    assert manifest["rows"] == 96
    # The default precision, auto, resolved once for CPU actors: bf16 on a native-bf16 CPU, else fp32.
    assert manifest["settings"]["precision"] == resolve_precision("auto", "cpu")
    assert manifest["settings"]["precision_requested"] == "auto"


def test_fp16_on_cpu_and_oversized_requests_fail_before_work(data, first_run, tmp_path):
    out = tmp_path / "out"
    base = dict(shards=data["shards"], checkpoint=data["checkpoint"], output=str(out))
    with pytest.raises(BadInputError, match="fp16 needs GPUs"):
        run_localize(LocalizeConfig(**base, precision="fp16", gpus_per_actor=0), out=None)
    with pytest.raises(BadInputError, match="cluster has 2 CPUs"):
        run_localize(LocalizeConfig(**base, num_actors=3, gpus_per_actor=0, cpus_per_actor=1), out=None)
    assert not list(out.rglob("*.parquet"))


def test_decode_gpu_on_actors_without_cuda_is_a_clear_start_error(data, first_run, tmp_path):
    """Logical GPUs without CUDA (this machine): --decode gpu cannot run, and says so."""
    from pipeline.localize.scheduler import ActorStartError

    options = LocalizeConfig(shards=data["shards"], checkpoint=data["checkpoint"], output=str(tmp_path / "out"),
                             decode="gpu", num_actors=1, progress_seconds=60)
    with pytest.raises(ActorStartError, match="--decode gpu needs a CUDA device and this actor runs on cpu"):
        run_localize(options, out=None)
    assert not list((tmp_path / "out").rglob("*.parquet"))


# --- --resize-crop: the official SAT test frame ------------------------------------------------


def test_resize_crop_run_reports_boxes_in_original_pixels_and_records_the_frame(data, ray_cluster, tmp_path):
    """--resize-crop 72,64 on the 64-px model: the model sees the centre 64 of a 72 x 72 resize,
    i.e. the window [4 W/72, 68 W/72) x [4 H/72, 68 H/72) of each image (offset 4)."""
    rng = np.random.default_rng(0)
    sizes = [(120, 80), (90, 150), (72, 72), (45, 200)]
    shard = write_shard(str(tmp_path / "crop-000000.tar"), [
        {"key": f"img{i}", "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
         "json": {"label": i, "boxes": [[5.0, 5.0, w - 5.0, h - 5.0]]}}
        for i, (w, h) in enumerate(sizes)
    ])
    base = dict(shards=shard, checkpoint=data["checkpoint"], output=str(tmp_path / "out"), batch_size=BATCH,
                gpus_per_actor=0, num_actors=1, cpus_per_actor=1, precision="fp32", progress_seconds=0.5)
    out = io.StringIO()
    summary = run_localize(LocalizeConfig(**base, resize_crop="72,64"), out=out)
    assert summary.exit_code == 0 and summary.images == 4
    assert "input frame: resize 72x72, centre crop 64x64" in out.getvalue()
    # Another frame is another run (the default id differs).
    assert run_localize(LocalizeConfig(**base, dry_run=True), out=None).run_id != summary.run_id

    manifest = json.loads(Path(summary.manifest_url).read_text())
    assert manifest["input_frame"] == {"kind": "resize_crop", "resize": 72, "crop": 64, "offset": 4}
    assert manifest["settings"]["resize_crop"] == {"resize": 72, "crop": 64}
    table = pq.read_table(Path(summary.run_url) / "crop-000000.parquet")
    assert table.schema.metadata[b"satloc.resize_crop"] == b"72,64"

    # The reference: the model called directly on the crop, its box found on the window's
    # pixel grid and mapped back by hand (offset 4 W/72, scale (64 W/72) / round(64 W/72)).
    model, config = load_checkpoint(data["checkpoint"])
    frame = ResizeCrop(72, 64)
    rows = {r["key"]: r for r in table.to_pylist()}
    for sample in read_samples(shard):
        w, h = sample.width, sample.height
        x = normalize(stack_uint8([frame.to_input(sample.image)]), config["mean"], config["std"])
        with torch.no_grad():
            loc_map = model(x).loc_map
        wx0, wy0, wx1, wy1 = 4 * w / 72, 4 * h / 72, 68 * w / 72, 68 * h / 72
        rw, rh = round(64 * w / 72), round(64 * h / 72)
        b = boxes_from_maps(loc_map, [(rw, rh)], config["threshold"])[0][0, :4].double().numpy()
        expected = [wx0 + b[0] * (wx1 - wx0) / rw, wy0 + b[1] * (wy1 - wy0) / rh,
                    wx0 + b[2] * (wx1 - wx0) / rw, wy0 + b[3] * (wy1 - wy0) / rh]
        row = rows[sample.key]
        got = [row["box_x0"], row["box_y0"], row["box_x1"], row["box_y1"]]
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        assert wx0 - 1e-4 <= got[0] < got[2] <= wx1 + 1e-4 and wy0 - 1e-4 <= got[1] < got[3] <= wy1 + 1e-4
        assert (row["width"], row["height"]) == (w, h)
        stored = np.array(row["loc_map"], dtype=np.float32) / 255.0
        assert np.abs(stored - loc_map.flatten().numpy()).max() <= 0.5 / 255 + 1e-6

    # evaluate_wsol --protocol sat reads the frame; the default protocol refuses the run.
    result = evaluate_run(summary.run_url, protocol="sat")
    assert result["num_loc_images"] == 4 and result["input_frame"] == {"resize": 72, "crop": 64}
    assert any("not the official 256,224" in n for n in result["notes"])
    with pytest.raises(ValueError, match="--protocol sat"):
        evaluate_run(summary.run_url)


def test_bad_resize_crop_is_refused_before_work(data, tmp_path):
    out = tmp_path / "out"
    good = dict(shards=data["shards"], checkpoint=data["checkpoint"], output=str(out))
    with pytest.raises(BadInputError, match="--resize-crop 256,224: the crop must equal the input size .* \\(64\\)"):
        run_localize(LocalizeConfig(**good, resize_crop="256,224"), out=None)
    with pytest.raises(BadInputError, match="--resize-crop 60,64: need RESIZE >= CROP"):
        run_localize(LocalizeConfig(**good, resize_crop=(60, 64)), out=None)
    proc = subprocess.run(
        [sys.executable, "jobs/localize_shards.py", "--shards", data["shards"], "--checkpoint", data["checkpoint"],
         "--output", str(out), "--resize-crop", "72x64"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2 and "--resize-crop must be RESIZE,CROP" in proc.stderr, proc.stderr
    assert not out.exists()


# --- bad input, no cluster needed ------------------------------------------------------------


def test_bad_inputs_name_the_url_and_write_nothing(data, tmp_path):
    out = tmp_path / "out"
    good = dict(shards=data["shards"], checkpoint=data["checkpoint"], output=str(out))
    with pytest.raises(BadInputError, match="matches no shard"):
        run_localize(LocalizeConfig(**{**good, "shards": str(tmp_path / "none-{000..003}.tar")}), out=None)
    missing = str(tmp_path / "missing.safetensors")
    with pytest.raises(BadInputError, match=f"checkpoint {missing} does not exist"):
        run_localize(LocalizeConfig(**{**good, "checkpoint": missing}), out=None)
    not_a_checkpoint = tmp_path / "junk.safetensors"
    not_a_checkpoint.write_bytes(b"\x00" * 64)
    with pytest.raises(BadInputError, match="junk.safetensors is not a satloc checkpoint"):
        run_localize(LocalizeConfig(**{**good, "checkpoint": str(not_a_checkpoint)}), out=None)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(BadInputError, match=f"cannot write {blocker}/out"):
        run_localize(LocalizeConfig(**{**good, "output": str(blocker / "out")}), out=None)
    with pytest.raises(BadInputError, match="--batch-size"):
        run_localize(LocalizeConfig(**{**good, "batch_size": 0}), out=None)
    assert not out.exists()


def test_cli_exit_code_2_when_no_shard_matches(data, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "jobs/localize_shards.py", "--shards", str(tmp_path / "x-{000..009}.tar"),
         "--checkpoint", data["checkpoint"], "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "matches no shard" in proc.stderr and str(tmp_path / "x-{000..009}.tar") in proc.stderr
    assert not out.exists()


def test_cli_without_ray_address_starts_its_own_cluster_on_loopback(data, first_run, tmp_path):
    # The embedded default (no RAY_ADDRESS): a new in-process cluster (pipeline.local_ray), in
    # its own temp dir here (RAY_TMPDIR), whose rows are those of the in-test cluster's run.
    ray_tmp = tempfile.mkdtemp(prefix="rl_", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    out = tmp_path / "out"
    try:
        proc = subprocess.run(
            [sys.executable, "jobs/localize_shards.py", "--shards", data["shards"] + "val-{000000..000001}.tar",
             "--checkpoint", data["checkpoint"], "--output", str(out), "--run-id", "embedded",
             "--num-actors", "1", "--batch-size", str(BATCH), "--precision", "fp32"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
        )
        sessions = list(Path(ray_tmp).glob("**/session_*/logs"))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[localize] done: 2 shards processed, 0 failed, 24 images" in proc.stdout
    assert sessions, f"the job's cluster did not use RAY_TMPDIR {ray_tmp}"
    local = _read_run(first_run["summary"].run_url)
    for stem, table in _read_run(str(out / "embedded")).items():
        cols = ["key", "label", "loc_map", "boxes"]
        assert table.select(cols).equals(local[stem].select(cols))


# --- object storage ----------------------------------------------------------------------------


def _upload_dir(client, bucket: str, prefix: str, directory: Path, names) -> None:
    for name in names:
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}", Body=(directory / name).read_bytes())


def test_seaweedfs_shards_in_parquet_out_and_new_shards_next_run(data, first_run, s3_env, monkeypatch):
    store = s3_env
    client = store.client()
    local = Path(data["shards"])
    prefix = "test_localize_job"
    _upload_dir(client, store.bucket, f"{prefix}/shards", local, ["val-000000.tar", "val-000001.tar"])
    client.put_object(Bucket=store.bucket, Key=f"{prefix}/sat.safetensors", Body=Path(data["checkpoint"]).read_bytes())
    base = f"s3://{store.bucket}/{prefix}"
    options = LocalizeConfig(
        shards=f"{base}/shards/", checkpoint=f"{base}/sat.safetensors", output=f"{base}/out",
        run_id="s3run", num_actors=1, gpus_per_actor=0, batch_size=BATCH, precision="fp32",
    )
    # The actor gets the store's address and keys only through the runtime env: the
    # cluster was started before these variables were set.
    summary = run_localize(options, out=None)
    assert summary.exit_code == 0 and summary.shards_processed == 2
    listed = client.list_objects_v2(Bucket=store.bucket, Prefix=f"{prefix}/out/s3run/")["Contents"]
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in listed) == ["_manifest.json", "val-000000.parquet", "val-000001.parquet"]
    local_tables = _read_run(first_run["summary"].run_url)
    for stem in ("val-000000", "val-000001"):
        body = client.get_object(Bucket=store.bucket, Key=f"{prefix}/out/s3run/{stem}.parquet")["Body"].read()
        table = pq.read_table(pa.BufferReader(body))
        assert table["shard"].to_pylist() == [f"{base}/shards/{stem}.tar"] * table.num_rows
        cols = ["key", "label", "loc_map", "boxes", "fg_ratio", "gt_label", "gt_boxes"]
        assert table.select(cols).equals(local_tables[stem].select(cols))

    # A new shard appears under the spec: the next run with the same id does only it.
    _upload_dir(client, store.bucket, f"{prefix}/shards", local, ["val-000002.tar"])
    again = run_localize(options, out=None)
    assert (again.shards_done_before, again.shards_todo, again.shards_processed) == (2, 1, 1)
    manifest = json.loads(client.get_object(Bucket=store.bucket, Key=f"{prefix}/out/s3run/_manifest.json")["Body"].read())
    assert manifest["shards_done"] == 3 and manifest["rows"] == 36

    # Wrong credentials: a clear error naming the bucket, never the secret.
    wrong = secrets.token_hex(8)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    with pytest.raises(BadInputError) as err:
        run_localize(LocalizeConfig(**{**options.__dict__, "run_id": "other"}), out=None)
    assert store.bucket in str(err.value) and wrong not in str(err.value) and store.secret_key not in str(err.value)


# --- ray job submit against a head cluster -------------------------------------------------------


@pytest.fixture
def head_cluster():
    """`ray start --head` on 127.0.0.1 with token auth, stopped by PID (tests/ray_cluster.py)."""
    with RayCluster(num_cpus=2) as cluster:
        env = cluster.client_env()
        for name in [k for k in env if k.startswith("AWS_")]:
            env.pop(name)
        yield {"address": cluster.address, "env": env, "temp_dir": str(cluster.head.temp_dir)}


def test_ray_job_submit_against_a_head_cluster(data, first_run, head_cluster, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", head_cluster["address"],
         "--working-dir", str(REPO), "--",
         "python", "jobs/localize_shards.py", "--shards", data["shards"] + "val-{000000..000001}.tar",
         "--checkpoint", data["checkpoint"], "--output", str(out), "--run-id", "submitted",
         "--num-actors", "1", "--batch-size", str(BATCH), "--precision", "fp32"],
        cwd=REPO, env=head_cluster["env"], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[localize] done: 2 shards processed, 0 failed, 24 images" in proc.stdout
    assert "succeeded" in proc.stdout
    local = _read_run(first_run["summary"].run_url)
    for stem, table in _read_run(str(out / "submitted")).items():
        cols = ["key", "label", "loc_map", "boxes"]
        assert table.select(cols).equals(local[stem].select(cols))


# --- Ctrl-C (issue 14, 7) -----------------------------------------------------------------------


def test_ctrl_c_prints_one_line_exits_130_and_leaves_whole_files(data, tmp_path):
    """SIGINT to the job's process group (what Ctrl-C sends) once its actor is working: exit 130,
    one line on stderr and no traceback; every Parquet file there reads whole, no temp file, no
    manifest (a rerun skips the written shards)."""
    import signal

    write_synthetic_shards(str(tmp_path / "shards"), "val", 48 * 8, seed=0, shard_size=8)
    ray_tmp = tempfile.mkdtemp(prefix="rc_", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = ray_tmp
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "jobs/localize_shards.py", "--shards", str(tmp_path / "shards") + "/",
         "--checkpoint", data["checkpoint"], "--output", str(out), "--run-id", "r", "--num-actors", "1",
         "--cpus-per-actor", "1", "--batch-size", str(BATCH), "--precision", "fp32"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        for line in proc.stdout:
            if "[localize] actor 0 ready" in line:
                time.sleep(1.0)
                os.killpg(proc.pid, signal.SIGINT)
                break
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 130, stderr[-3000:]
    ours = [line for line in stderr.splitlines() if "Ctrl-C" in line]
    assert len(ours) == 1 and ours[0].startswith("interrupted (Ctrl-C): shards written so far are whole"), stderr
    assert stderr.strip().splitlines()[-1] == ours[0]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    names = sorted(os.listdir(out / "r"))
    assert "_manifest.json" not in names and not [n for n in names if n.startswith(".")], names
    assert len(names) < 48  # interrupted, not finished
    for name in names:
        assert pq.read_table(out / "r" / name).num_rows == 8, name
