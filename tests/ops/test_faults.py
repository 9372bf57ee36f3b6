"""Faults on a real two-node Ray cluster on loopback: the S3 endpoint stopped mid-run and
restarted, a Ray worker node killed by PID mid-run, a Ray Train worker killed mid-epoch.

One cluster serves the module: a head (127.0.0.1, 1 CPU) and a second raylet (127.0.0.2,
1 CPU, its own temp dir), started by ``infra/local/cluster.py``'s ``RayNode``; its own
SeaweedFS store (this module stops it). Drivers are separate processes connected to the
head (``RAY_ADDRESS``), as under ``ray job submit``. Each test prints the rows it counted
as lost and duplicated; both must be 0. The node is killed last (the module's last test).
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.checkpoint import default_config
from pipeline.data.checkpoints import save_checkpoint
from model.factory import create_model
from infra.local.s3_store import LocalS3Store, stop_pid
from pipeline.datasets.synthetic import class_names, write_synthetic_shards
from ray_cluster import RayCluster, pids_with_title

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MODEL = "sat_vit_micro_patch8_64"


def count_rows(keys: list[str], expected: set[str], what: str) -> tuple[int, int]:
    """Print and return (lost, duplicated) rows of ``keys`` against the ``expected`` set."""
    lost = len(expected - set(keys))
    duplicated = len(keys) - len(set(keys))
    print(f"[faults] {what}: {len(keys)} rows, {len(expected)} expected, lost {lost}, duplicated {duplicated}")
    return lost, duplicated


@pytest.fixture(scope="module")
def store():
    s = LocalS3Store(bucket="satloc")
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cluster(store):
    with RayCluster(num_cpus=1, env=store.env(), prefix="rf") as c:
        c.add_node(num_cpus=1)
        yield c


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "sat.safetensors"
    save_checkpoint(create_model(MODEL, 10), str(path),
                    default_config(MODEL, 10, class_names=class_names("birds", 10), threshold=0.4))
    return str(path)


def expected_keys(split: str, n: int) -> set[str]:
    return {f"{split}_{i:07d}" for i in range(n)}


def localize_args(shards: str, checkpoint: str, output: str, run_id: str, *extra: str) -> list[str]:
    return [sys.executable, "jobs/localize_shards.py", "--shards", shards, "--checkpoint", checkpoint,
            "--output", output, "--run-id", run_id, "--num-actors", "2", "--cpus-per-actor", "1",
            "--gpus-per-actor", "0", "--batch-size", "1", *extra]


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"driver did not finish within {timeout}s:\n{out[-3000:]}\n{err[-3000:]}") from None
    return proc.returncode, out, err


# --- the S3 endpoint stopped mid-run -----------------------------------------------------------


def restart_store(store: LocalS3Store, outage_seconds: float) -> float:
    """Stop weed by PID, wait, start it again on the same ports and data; returns the outage."""
    t0 = time.monotonic()
    stop_pid(store.process.pid)
    time.sleep(outage_seconds)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": store.access_key, "AWS_SECRET_ACCESS_KEY": store.secret_key}
    with open(store.directory / "weed.log", "ab") as log:
        store.process = subprocess.Popen(store.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=store.directory)
    store._wait_ready()
    return time.monotonic() - t0


def s3_parquet_names(store: LocalS3Store, prefix: str) -> list[str]:
    listed = store.client().list_objects_v2(Bucket=store.bucket, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"].rsplit("/", 1)[1] for o in listed if o["Key"].endswith(".parquet"))


def s3_run_keys(store: LocalS3Store, prefix: str) -> tuple[list[str], list[str]]:
    """(Parquet object names, every key in them) under ``prefix``."""
    client = store.client()
    names = s3_parquet_names(store, prefix)
    keys = []
    for name in names:
        body = client.get_object(Bucket=store.bucket, Key=f"{prefix}{name}")["Body"].read()
        keys += pq.read_table(pa.BufferReader(body), columns=["key"])["key"].to_pylist()
    return names, keys


def test_s3_endpoint_stopped_and_restarted_mid_run(cluster, store, checkpoint):
    os.environ.update(store.env())  # this process writes the shards
    try:
        base = f"s3://{store.bucket}/faults-s3"
        write_synthetic_shards(f"{base}/shards/", "s3f", 60, seed=1, shard_size=5)  # 12 shards
        store.client().put_object(Bucket=store.bucket, Key="faults-s3/sat.safetensors",
                                  Body=Path(checkpoint).read_bytes())
    finally:
        for k in store.env():
            os.environ.pop(k, None)
    args = localize_args(f"{base}/shards/", f"{base}/sat.safetensors", f"{base}/out", "s3fault")
    proc = cluster.driver(args)
    prefix = "faults-s3/out/s3fault/"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not s3_parquet_names(store, prefix):
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the outage: " + "".join(finish(proc)[1:])[-3000:]
    done_before = len(s3_parquet_names(store, prefix))
    outage = restart_store(store, outage_seconds=3.0)
    code, out, err = finish(proc)
    print(f"[faults] S3 endpoint down for {outage:.1f}s after {done_before}/12 shards; first run exit {code}")
    reruns = 0
    if code != 0:
        # Allowed: the run fails clearly (names the shards), and a rerun with the same id completes it.
        assert "FAILED" in out or "error" in err.lower(), out[-3000:] + err[-3000:]
        reruns = 1
        code, out, err = finish(cluster.driver(args))
    assert code == 0, out[-3000:] + err[-3000:]
    names, keys = s3_run_keys(store, prefix)
    assert len(names) == 12
    lost, duplicated = count_rows(keys, expected_keys("s3f", 60), f"S3 outage ({reruns} rerun)")
    assert (lost, duplicated) == (0, 0)
    manifest = json.loads(store.client().get_object(Bucket=store.bucket, Key=f"{prefix}_manifest.json")["Body"].read())
    assert manifest["shards_done"] == 12 and manifest["rows"] == 60 and manifest["failed_shards"] == []
    retried = {s["shard"].rsplit("/", 1)[1]: s["attempts"] for s in manifest["shards"] if s.get("attempts", 1) > 1}
    print(f"[faults] shards that needed more than one attempt: {retried or 'none (s3fs retries covered it)'}")


# --- a Ray Train worker killed mid-epoch -----------------------------------------------------------


def registered_epochs(snapshot: Path) -> int:
    """Epochs done in the newest checkpoint of Ray Train's checkpoint manager snapshot (0: none).

    A checkpoint directory exists before the controller registers it; only a registered
    one is what a restarted worker group resumes from.
    """
    try:
        results = json.loads(snapshot.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):
        return 0
    return max((int(r["metrics"]["epoch"]) for r in results), default=0)


def test_train_worker_killed_mid_epoch_resumes_from_checkpoint(cluster, tmp_path):
    data = tmp_path / "data"
    write_synthetic_shards(str(data / "train"), "train", 192, seed=2, image_size=32, shard_size=48, num_classes=4)
    write_synthetic_shards(str(data / "val"), "val", 16, seed=2, image_size=32, shard_size=16, num_classes=4)
    runs, name, epochs = tmp_path / "runs", "killed", 4
    args = [sys.executable, "jobs/train_sat.py", "--train-shards", f"{data}/train/", "--val-shards", f"{data}/val/",
            "--model", MODEL, "--img-size", "32",
            "--model-kwargs", json.dumps(dict(patch_size=8, depth=3, embed_dim=32, num_heads=2, reweight_blocks=2)),
            "--epochs", str(epochs), "--batch-size", "8", "--lr", "3e-3", "--warmup-epochs", "0.5",
            "--num-workers", "2", "--storage-path", str(runs), "--name", name,
            "--output", str(tmp_path / "sat.safetensors"), "--max-failures", "1"]
    proc = cluster.driver(args)
    run_dir = runs / name
    deadline = time.monotonic() + 300
    registered = 0  # epochs of the newest checkpoint Ray Train has registered (not just written)
    while time.monotonic() < deadline and proc.poll() is None and not registered:
        registered = registered_epochs(run_dir / "checkpoint_manager_snapshot.json")
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before a worker could be killed: " + "".join(finish(proc)[1:])[-3000:]
    workers = pids_with_title(cluster.pids(), "RayTrainWorker")
    assert len(workers) == 2, workers
    victim = max(workers)
    os.kill(victim, signal.SIGKILL)
    code, out, err = finish(proc, timeout=360)
    assert code == 0, out[-4000:] + err[-4000:]
    resumed = [int(m) for m in re.findall(r"resuming '\S+' after epoch (\d+)", out + err)]
    print(f"[faults] Ray Train worker PID {victim} killed with epoch {registered}'s checkpoint registered; "
          f"the restarted workers resumed after epoch {resumed}")
    assert len(resumed) == 1 and resumed[0] >= registered  # from the last checkpoint, not from scratch
    result = json.loads((run_dir / "satloc_result.json").read_text())
    history = result["history"]
    epochs_seen = [h["epoch"] for h in history]
    lost = len(set(range(1, epochs + 1)) - set(epochs_seen))
    duplicated = len(epochs_seen) - len(set(epochs_seen))
    images_per_epoch = [h["images"] for h in history]
    print(f"[faults] Ray Train: epochs {epochs_seen}, images per epoch {images_per_epoch}: lost epochs {lost}, "
          f"duplicated epochs {duplicated}; lost rows {sum(192 - n for n in images_per_epoch if n < 192)}, "
          f"duplicated rows {sum(n - 192 for n in images_per_epoch if n > 192)}")
    assert (lost, duplicated) == (0, 0)
    assert images_per_epoch == [192] * epochs
    assert Path(result["checkpoint"]).exists()


# --- a worker node killed mid-run (last: the node does not come back) ---------------------------


def test_worker_node_killed_mid_run_completes_on_the_head(cluster, checkpoint, tmp_path):
    shards = tmp_path / "shards"
    write_synthetic_shards(str(shards), "node", 96, seed=3, shard_size=6)  # 16 shards
    out = tmp_path / "out"
    proc = cluster.driver(localize_args(f"{shards}/", checkpoint, str(out), "nodekill"))
    run_dir = out / "nodekill"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and len(list(run_dir.glob("*.parquet"))) < 2:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before the node was killed: " + "".join(finish(proc)[1:])[-3000:]
    node = cluster.nodes[0]
    killed = node.kill()  # SIGKILL to every process of the node: raylet, agents, its actor
    done_at_kill = len(list(run_dir.glob("*.parquet")))
    code, stdout, stderr = finish(proc)
    print(f"[faults] node 127.0.0.2 killed ({len(killed)} processes) after {done_at_kill}/16 shards; exit {code}")
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    files = sorted(run_dir.glob("*.parquet"))
    keys = [k for f in files for k in pq.read_table(f, columns=["key"])["key"].to_pylist()]
    lost, duplicated = count_rows(keys, expected_keys("node", 96), "worker node killed")
    assert len(files) == 16 and (lost, duplicated) == (0, 0)
    manifest = json.loads((run_dir / "_manifest.json").read_text())
    died = [a for a in manifest["timings"]["actors"] if a["died"]]
    assert len(died) == 1 and manifest["timings"]["replaced_actors"] == 1
    on_head = [a for a in manifest["timings"]["actors"] if a["info"].get("node_ip") == "127.0.0.1"]
    assert on_head and sum(a["shards"] for a in on_head) >= 16 - done_at_kill
