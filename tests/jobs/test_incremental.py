"""Scheduled incremental localization, as the nightly schedule submits it (docs/operations.md).

A ``ray start --head`` cluster (infra/local/cluster.py's) and the session's SeaweedFS
store. Day 1 runs over a prefix; a shard arrives; day 2 runs with the same ``--run-id``
and processes only the new shard. Each day's submission goes through
``infra/local/cluster.py submit --dated satloc-loc-nightly``: a second trigger on the
same day is refused by Ray (the submission id exists) and starts nothing.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from model.checkpoint import checkpoint_bytes, default_config
from model.factory import create_model
from pipeline.datasets.synthetic import class_names, iter_synthetic_samples
from ray_cluster import CLUSTER_SCRIPT, REPO, RayCluster, cluster_script

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MODEL = "sat_vit_micro_patch8_64"
PREFIX = "test_incremental"
PER_SHARD = 8


def test_dated_submission_id():
    day = dt.date(2026, 3, 1)
    assert cluster_script.dated_submission_id("satloc-loc-nightly", day) == "satloc-loc-nightly-20260301"
    today = dt.datetime.now(dt.timezone.utc).date()
    assert cluster_script.dated_submission_id("x") == f"x-{today:%Y%m%d}"
    for bad in ("", "a b", "a/b"):
        with pytest.raises(ValueError, match="--dated prefix"):
            cluster_script.dated_submission_id(bad)


@pytest.fixture(scope="module")
def cluster(s3_store):
    with RayCluster(num_cpus=2, env=s3_store.env(), prefix="ri") as c:
        yield c


def put_shard(store, index: int) -> None:
    """``inc-00000{index}.tar`` with PER_SHARD synthetic samples (keys unique across shards)."""
    import tarfile

    buf = io.BytesIO()
    samples = list(iter_synthetic_samples("inc", PER_SHARD * (index + 1), seed=7))[PER_SHARD * index:]
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tf.addfile(info, io.BytesIO(members[ext]))
    store.client().put_object(Bucket=store.bucket, Key=f"{PREFIX}/shards/inc-{index:06d}.tar", Body=buf.getvalue())


def submit_day(cluster, store, day: dt.date, *extra: str) -> subprocess.CompletedProcess:
    base = f"s3://{store.bucket}/{PREFIX}"
    cmd = [sys.executable, str(CLUSTER_SCRIPT), "submit", "--address", cluster.address,
           "--token-file", str(cluster.token_file), "--dated", "satloc-loc-nightly", "--date", day.isoformat(),
           "--working-dir", str(REPO), *extra, "--",
           "python", "jobs/localize_shards.py", "--shards", f"{base}/shards/",
           "--checkpoint", f"{base}/sat.safetensors", "--output", f"{base}/out", "--run-id", "nightly",
           "--num-actors", "1", "--batch-size", str(PER_SHARD)]
    return subprocess.run(cmd, env=cluster.client_env(), capture_output=True, text=True, timeout=400, cwd=REPO)


def run_objects(store) -> dict[str, dict]:
    listed = store.client().list_objects_v2(Bucket=store.bucket, Prefix=f"{PREFIX}/out/nightly/").get("Contents", [])
    return {o["Key"].rsplit("/", 1)[1]: o for o in listed}


def run_keys(store, names) -> list[str]:
    keys = []
    for name in names:
        body = store.client().get_object(Bucket=store.bucket, Key=f"{PREFIX}/out/nightly/{name}")["Body"].read()
        keys += pq.read_table(pa.BufferReader(body), columns=["key"])["key"].to_pylist()
    return keys


def manifest(store) -> dict:
    body = store.client().get_object(Bucket=store.bucket, Key=f"{PREFIX}/out/nightly/_manifest.json")["Body"].read()
    return json.loads(body)


def test_nightly_runs_pick_up_only_new_shards_and_a_double_trigger_is_refused(cluster, s3_store):
    store = s3_store
    torch.manual_seed(0)
    checkpoint = checkpoint_bytes(create_model(MODEL, 10),
                                  default_config(MODEL, 10, class_names=class_names("birds", 10), threshold=0.4))
    store.client().put_object(Bucket=store.bucket, Key=f"{PREFIX}/sat.safetensors", Body=checkpoint)
    put_shard(store, 0)
    put_shard(store, 1)

    # Day 1: the prefix holds 2 shards.
    day1 = submit_day(cluster, store, dt.date(2026, 3, 1))
    assert day1.returncode == 0, day1.stdout[-3000:] + day1.stderr[-3000:]
    assert "[localize] run nightly: 2 shards, 0 done, 2 to do" in day1.stdout
    first = run_objects(store)
    assert sorted(first) == ["_manifest.json", "inc-000000.parquet", "inc-000001.parquet"]

    # A shard arrives; day 2 is submitted, and the trigger fires twice.
    put_shard(store, 2)
    day2 = submit_day(cluster, store, dt.date(2026, 3, 2), "--no-wait")
    assert day2.returncode == 0, day2.stdout[-3000:] + day2.stderr[-3000:]
    again = submit_day(cluster, store, dt.date(2026, 3, 2), "--no-wait")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "satloc-loc-nightly-20260302 was already submitted" in again.stdout
    deadline = time.monotonic() + 300
    while (status := cluster_script.job_status(cluster.address, "satloc-loc-nightly-20260302", cluster.token_file)) \
            not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
        time.sleep(1)
    assert status == "SUCCEEDED"

    # Only the new shard was processed; the first two were not rewritten.
    second = run_objects(store)
    assert sorted(second) == ["_manifest.json", "inc-000000.parquet", "inc-000001.parquet", "inc-000002.parquet"]
    for name in ("inc-000000.parquet", "inc-000001.parquet"):
        stamp = ("ETag", "LastModified")
        assert [second[name][k] for k in stamp] == [first[name][k] for k in stamp]
    doc = manifest(store)
    history = doc["history"]
    assert len(history) == 2  # day 1 and day 2: the double trigger started no third run
    assert [h["shards_processed"] for h in history] == [2, 1]
    assert [h["images"] for h in history] == [2 * PER_SHARD, PER_SHARD]
    keys = run_keys(store, [n for n in second if n.endswith(".parquet")])
    expected = {f"inc_{i:07d}" for i in range(3 * PER_SHARD)}
    lost, duplicated = len(expected - set(keys)), len(keys) - len(set(keys))
    print(f"[incremental] day 1: 2 shards, {2 * PER_SHARD} rows; day 2: 1 new shard, {PER_SHARD} rows; "
          f"total {len(keys)} rows, lost {lost}, duplicated {duplicated}")
    assert (lost, duplicated) == (0, 0) and doc["rows"] == 3 * PER_SHARD and doc["shards_done"] == 3

    # Ray holds each dated id once: one job per day.
    status, body = cluster_script.dashboard_get(cluster.address, "/api/jobs/", cluster.token_file)
    ids = [j.get("submission_id") for j in json.loads(body)]
    assert status == 200 and sorted(i for i in ids if i and i.startswith("satloc-loc-nightly-")) == [
        "satloc-loc-nightly-20260301", "satloc-loc-nightly-20260302"]
