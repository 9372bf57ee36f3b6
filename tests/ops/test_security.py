"""Security: malicious pickles are refused, credentials never leak, servers listen on
loopback only, and hostile shard keys cannot write outside an output directory.

One ``ray start --head`` cluster (infra/local/cluster.py's) and a SeaweedFS store whose
secret key is a known fake string; the localize job runs on it through ``ray job submit``,
and that string is then searched for in everything the run produced.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import posixpath
import secrets
import tarfile
from pathlib import Path

import pytest
import torch

from model.checkpoint import default_config
from pipeline.data.checkpoints import save_checkpoint
from model.factory import create_model
from infra.local.s3_store import LocalS3Store
from pipeline.localize.run import plan_run
from pipeline.datasets.synthetic import class_names, iter_synthetic_samples, write_synthetic_shards
from ray_cluster import REPO, RayCluster, is_loopback, listening_sockets

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

MODEL = "sat_vit_micro_patch8_64"
FAKE_SECRET = f"satlocFAKEsecret{secrets.token_hex(8)}"
HOSTILE_KEYS = ["../../x", "/abs/evil", "a/../../../w", "....//....//y"]


def load_job(name: str):
    spec = importlib.util.spec_from_file_location(f"satloc_job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


# --- a malicious .pth -----------------------------------------------------------------------


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what a hostile checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def evil_pth(tmp_path_factory):
    root = tmp_path_factory.mktemp("evil")
    marker = root / "pwned"
    path = root / "deit_small.pth"
    torch.save({"model": {"pos_embed": torch.zeros(1, 65, 128)}, "extra": _Payload(marker)}, path)
    # The payload is live: an unsafe load (weights_only=False) runs it.
    torch.load(path, weights_only=False)
    assert marker.exists(), "the test payload did not run under an unsafe load"
    marker.unlink()
    return path, marker


def test_malicious_pth_is_refused_by_create_model(evil_pth):
    path, marker = evil_pth
    with pytest.raises(ValueError, match="refusing to load .*deit_small.pth: it is not safetensors and not a weights-"):
        create_model(MODEL, 10, pretrained=str(path))
    assert not marker.exists()


def test_malicious_pth_is_refused_by_the_train_job(evil_pth, tmp_path, capsys):
    path, marker = evil_pth
    data = tmp_path / "data"
    write_synthetic_shards(str(data / "train"), "train", 8, seed=0, image_size=32, num_classes=2)
    write_synthetic_shards(str(data / "val"), "val", 4, seed=0, image_size=32, num_classes=2)
    out, runs = tmp_path / "sat.safetensors", tmp_path / "runs"
    code = load_job("train_sat").main([
        "--train-shards", f"{data}/train/", "--val-shards", f"{data}/val/", "--img-size", "32",
        "--num-workers", "1", "--batch-size", "4", "--epochs", "1", "--pretrained", str(path),
        "--storage-path", str(runs), "--output", str(out),
    ])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to load" in err and str(path) in err
    assert not marker.exists() and not out.exists()
    assert not [p for p in runs.rglob("*") if p.is_file()]  # no run record, no checkpoint


def test_malicious_pth_is_refused_by_the_localize_job(evil_pth, tmp_path, capsys):
    path, marker = evil_pth
    write_synthetic_shards(str(tmp_path / "shards"), "val", 4, seed=0)
    out = tmp_path / "out"
    code = load_job("localize_shards").main(
        ["--shards", f"{tmp_path}/shards/", "--checkpoint", str(path), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and f"{path} is not a satloc checkpoint" in err
    assert not marker.exists() and not out.exists()


# --- one cluster with fake credentials ----------------------------------------------------------


@pytest.fixture(scope="module")
def store():
    s = LocalS3Store(bucket="satloc", access_key="satlocFAKEkeyid", secret_key=FAKE_SECRET)
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cluster(store):
    with RayCluster(num_cpus=1, env=store.env(), prefix="rs") as c:
        yield c


def hostile_shard() -> bytes:
    """A shard whose sample keys try to climb out of directories."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for key, (_, members) in zip(HOSTILE_KEYS, iter_synthetic_samples("hostile", len(HOSTILE_KEYS), seed=5)):
            for ext in ("jpg", "cls", "json"):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(members[ext])
                tf.addfile(info, io.BytesIO(members[ext]))
    return buf.getvalue()


@pytest.fixture(scope="module")
def secured_run(cluster, store, tmp_path_factory):
    """The localize job via `ray job submit`: shards and checkpoint in the fake-keyed store,
    output on local disk (so every byte it wrote can be read back)."""
    root = tmp_path_factory.mktemp("secured")
    client = store.client()
    os.environ.update(store.env())
    try:
        write_synthetic_shards(f"s3://{store.bucket}/sec/shards/", "sec", 12, seed=4, shard_size=6)
    finally:
        for k in store.env():
            os.environ.pop(k, None)
    client.put_object(Bucket=store.bucket, Key="sec/shards/hostile-000000.tar", Body=hostile_shard())
    torch.manual_seed(0)
    ckpt = root / "sat.safetensors"
    save_checkpoint(create_model(MODEL, 10), str(ckpt), default_config(MODEL, 10, class_names=class_names("birds", 10)))
    client.put_object(Bucket=store.bucket, Key="sec/sat.safetensors", Body=ckpt.read_bytes())
    ckpt.unlink()
    out = root / "work" / "out"
    before = files_under(root)
    result = cluster.submit(
        ["python", "jobs/localize_shards.py", "--shards", f"s3://{store.bucket}/sec/shards/",
         "--checkpoint", f"s3://{store.bucket}/sec/sat.safetensors", "--output", str(out), "--run-id", "sec",
         "--num-actors", "1", "--batch-size", "4"],
        submission_id=f"sec-{secrets.token_hex(4)}", working_dir=str(REPO), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "out": out, "run": out / "sec", "result": result, "before": before}


@pytest.fixture(scope="module")
def secured_training(cluster, store):
    """The train job via `ray job submit` on the same cluster: shards, Ray Train storage and
    the exported checkpoint all in the fake-keyed store. More shards than the driver indexes
    itself, so Ray tasks index them, and a Ray Train worker reads them."""
    os.environ.update(store.env())
    try:
        for split, n in (("train", 40), ("val", 8)):
            write_synthetic_shards(f"s3://{store.bucket}/sec/train-data/{split}/", split, n, seed=6, image_size=32,
                                   shard_size=2, num_classes=4)
    finally:
        for k in store.env():
            os.environ.pop(k, None)
    data = f"s3://{store.bucket}/sec/train-data"
    result = cluster.submit(
        ["python", "jobs/train_sat.py", "--train-shards", f"{data}/train/", "--val-shards", f"{data}/val/",
         "--model", MODEL, "--img-size", "32", "--epochs", "1", "--batch-size", "8", "--num-workers", "1",
         "--model-kwargs", json.dumps(dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, reweight_blocks=1)),
         "--storage-path", f"s3://{store.bucket}/sec/runs", "--name", "sec-train",
         "--output", f"s3://{store.bucket}/sec/trained.safetensors"],
        submission_id=f"sec-train-{secrets.token_hex(4)}", working_dir=str(REPO), timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_local_servers_listen_on_loopback_only_and_require_the_token(cluster, store):
    import urllib.error
    import urllib.request

    sockets = listening_sockets(cluster.pids() + [store.process.pid])
    ray_ports = {port for pid, _, port in sockets if pid != store.process.pid}
    weed_ports = {port for pid, _, port in sockets if pid == store.process.pid}
    outside = [(pid, ip, port) for pid, ip, port in sockets if not is_loopback(ip)]
    print(f"[security] {len(sockets)} listening sockets ({len(ray_ports)} Ray ports, {len(weed_ports)} SeaweedFS "
          f"ports), off loopback: {outside}")
    assert outside == []
    assert {ip for _, ip, _ in sockets} == {"127.0.0.1"}
    for name in ("port", "dashboard-port", "node-manager-port", "object-manager-port", "ray-client-server-port"):
        assert cluster.head.ports[name] in ray_ports, name
    assert store.ports["s3.port"] in weed_ports
    # Token auth: no token 401, a wrong one 403, the cluster's 200.
    url = f"{cluster.address}/api/jobs/"
    for header, expected in ((None, 401), ("Bearer not-the-token", 403)):
        request = urllib.request.Request(url)
        if header:
            request.add_header("Authorization", header)
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == expected
    assert os.stat(cluster.token_file).st_mode & 0o777 == 0o600


def test_fake_credentials_appear_in_no_output_log_or_manifest(secured_run, secured_training, cluster, store):
    result = secured_run["result"]
    assert "[localize] done: 3 shards processed, 0 failed" in result.stdout
    trained = store.client().head_object(Bucket=store.bucket, Key="sec/trained.safetensors")
    assert trained["ContentLength"] > 0  # the train job read, trained and wrote through S3
    needle = FAKE_SECRET.encode()
    scanned, found = 0, []
    for job in (result, secured_training):
        assert needle not in job.stdout.encode() and needle not in job.stderr.encode()
    roots = [secured_run["out"], *cluster.temp_dirs()]
    for root in roots:
        for path in files_under(root):
            if path.is_symlink() or not path.is_file():
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            scanned += 1
            if needle in data:
                found.append(str(path))
    logs = [p for p in files_under(cluster.head.temp_dir) if p.suffix in (".log", ".out", ".err")]
    print(f"[security] fake secret searched in {scanned} files ({len(logs)} Ray logs of a localize and a train "
          f"job, the Parquet files, the manifest) and the jobs' stdout/stderr: found in {found or 'none'}")
    assert found == []
    assert any(p.name.startswith("job-driver-") for p in logs) and any("runtime_env" in p.name for p in logs)
    manifest = json.loads((secured_run["run"] / "_manifest.json").read_text())
    assert manifest["shards_done"] == 3 and manifest["rows"] == 12 + len(HOSTILE_KEYS)


def test_hostile_keys_stay_inside_every_output_directory(secured_run, tmp_path):
    run, root = secured_run["run"], secured_run["root"]
    # localize: one file per shard stem, nothing else anywhere.
    written = files_under(root) - secured_run["before"]
    assert {p.relative_to(run).as_posix() for p in written} == {
        "_manifest.json", "hostile-000000.parquet", "sec-000000.parquet", "sec-000001.parquet"}
    import pyarrow.parquet as pq

    keys = pq.read_table(run / "hostile-000000.parquet", columns=["key"])["key"].to_pylist()
    assert sorted(keys) == sorted(HOSTILE_KEYS)
    # A shard URL cannot name a file outside the run either: stems are base names.
    plan = plan_run(["s3://b/x/../../etc/passwd.tar", "s3://b/q/..", "/data/a/../../../y-000001.tar"],
                    str(tmp_path / "plan"), "r", overwrite=False)
    for shard in plan.shards:
        assert posixpath.dirname(shard.out_url) == str(tmp_path / "plan" / "r") and "/" not in shard.out_url[
            len(str(tmp_path / "plan" / "r")) + 1:]
    # export (YOLO: a file per key) and overlays (one PNG) from the same run.
    work = tmp_path / "a" / "b" / "c"
    work.mkdir(parents=True)
    before = files_under(tmp_path)
    yolo, coco, sheet = work / "yolo", work / "pseudo.json", work / "sheet.png"
    export = load_job("export_pseudo_boxes")
    assert export.main(["--predictions", str(run), "--format", "yolo", "--output", str(yolo)]) == 0
    assert export.main(["--predictions", str(run), "--format", "coco", "--output", str(coco)]) == 0
    overlays = load_job("render_overlays")
    assert overlays.main(["--predictions", str(run), "--output", str(sheet), "--num", "16"]) == 0
    new = files_under(tmp_path) - before
    outside = [p for p in new if not (p.is_relative_to(yolo) or p in (coco, sheet))]
    yolo_files = sorted(p.name for p in new if p.is_relative_to(yolo))
    print(f"[security] {len(new)} files written by export/overlays, {len(outside)} outside their output; "
          f"YOLO names of hostile keys: {[n for n in yolo_files if not n.startswith('sec_')]}")
    assert outside == [] and all(p.parent == yolo for p in new if p.is_relative_to(yolo))
    assert len(yolo_files) == 12 + len(HOSTILE_KEYS) + 1  # one per image + classes.txt
    assert not (tmp_path / "a" / "x.txt").exists() and not Path("/abs/evil.txt").exists()
    coco_names = {im["file_name"] for im in json.loads(coco.read_text())["images"]}
    # kept as data inside the JSON (<shard-stem>/<key>), never used as paths
    assert {f"hostile-000000/{k}" for k in HOSTILE_KEYS} <= coco_names
