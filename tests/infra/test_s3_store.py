import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from infra.local.s3_store import LocalS3Store, find_weed, free_ports

REPO = Path(__file__).resolve().parents[2]


def test_session_store_serves_s3_on_loopback(s3_store):
    assert s3_store.endpoint.startswith("http://127.0.0.1:")
    env = s3_store.env()
    assert set(env) == {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    text = s3_store.env_file.read_text()
    assert f"AWS_ENDPOINT_URL={s3_store.endpoint}\n" in text
    assert (os.stat(s3_store.env_file).st_mode & 0o777) == 0o600
    names = [b["Name"] for b in s3_store.client().list_buckets()["Buckets"]]
    assert s3_store.bucket in names
    # Every component listens on its own port, all distinct.
    assert len(set(s3_store.ports.values())) == len(s3_store.ports)


def test_store_requires_credentials(s3_store):
    anonymous = boto3.client("s3", endpoint_url=s3_store.endpoint, region_name="us-east-1",
                             aws_access_key_id="nobody", aws_secret_access_key="wrong")
    with pytest.raises(Exception, match="AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|403"):
        anonymous.list_objects_v2(Bucket=s3_store.bucket)


def test_second_store_starts_and_stops_cleanly(s3_store):
    store = LocalS3Store(bucket="other")
    with store:
        assert store.endpoint != s3_store.endpoint
        pid, directory = store.process.pid, store.directory
        c = store.client()
        c.put_object(Bucket="other", Key="k", Body=b"v")
        assert c.get_object(Bucket="other", Key="k")["Body"].read() == b"v"
    assert not Path(f"/proc/{pid}").exists()  # stopped and reaped
    assert not directory.exists()
    with pytest.raises(RuntimeError, match="not started"):
        store.endpoint


def test_cli_up_and_down(tmp_path):
    d = tmp_path / "s3"
    up = subprocess.run([sys.executable, "-m", "infra.local.s3_store", "up", "--dir", str(d)],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    pid = int((d / "weed.pid").read_text())
    try:
        env = dict(line.split("=", 1) for line in (d / "s3.env").read_text().splitlines())
        assert env["AWS_ENDPOINT_URL"] in up.stdout
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        assert "satloc" in [b["Name"] for b in client.list_buckets()["Buckets"]]
        again = subprocess.run([sys.executable, "-m", "infra.local.s3_store", "up", "--dir", str(d)],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
        assert again.returncode == 1 and "already running" in again.stderr
    finally:
        down = subprocess.run(["bash", "infra/local/objectstore.sh", "down", str(d)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not Path(f"/proc/{pid}").exists()
    assert not (d / "weed.pid").exists() and not (d / "data").exists()


def test_helpers():
    assert os.access(find_weed(), os.X_OK)
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(p > 0 for p in ports)
