"""pipeline/local_ray.py: the embedded cluster listens on loopback wherever Ray lets it, and
leaves no process behind when its driver is killed (tests start their own driver process)."""
from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.local_ray import _processes, descendants

REPO = Path(__file__).resolve().parents[2]

# Starts the embedded cluster, runs two tasks, prints its processes' listening sockets, waits.
DRIVER = r"""
import json, os, sys, time
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
import ray
from ray_cluster import listening_sockets
from pipeline.local_ray import _processes, descendants, start_local_ray
start_local_ray(num_cpus=1, _temp_dir=sys.argv[2])
@ray.remote
def pid():
    return os.getpid()
ray.get([pid.remote() for _ in range(2)])
time.sleep(1)
procs = [os.getpid(), *descendants(os.getpid(), _processes())]
rows = []
for p, ip, port in listening_sockets(procs):
    argv = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")
    rows.append([p, " ".join(a.decode(errors="replace") for a in argv[:3]), ip, port])
print("SOCKETS " + json.dumps({"driver": os.getpid(), "rows": rows}), flush=True)
time.sleep(float(sys.argv[3]))
"""

def component(pid: int, argv: str, driver: int) -> str:
    if "gcs_server" in argv:
        return "gcs_server"
    if "raylet/raylet" in argv:
        return "raylet"
    if "ray::DashboardAgent" in argv:
        return "dashboard agent"
    if "ray::RuntimeEnvAgent" in argv:
        return "runtime env agent"
    if "autoscaler/_private/monitor.py" in argv:
        return "autoscaler metrics"
    if "dashboard/dashboard.py" in argv:
        return "dashboard metrics"
    if argv.startswith("ray::") or pid == driver:
        return "core worker"
    return argv


def start_driver(temp_dir: str, linger: float) -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(REPO), temp_dir, str(linger)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    for line in proc.stdout:
        if line.startswith("SOCKETS "):
            return proc, json.loads(line[len("SOCKETS "):])
    proc.wait(timeout=30)
    pytest.fail(f"the driver exited ({proc.returncode}) before its cluster was up")


@pytest.mark.slow
def test_every_listener_of_the_cluster_is_on_loopback():
    with tempfile.TemporaryDirectory(prefix="rl_", dir="/tmp") as temp_dir:
        proc, seen = start_driver(temp_dir, 0)
        proc.wait(timeout=120)
    rows = [(component(p, argv, seen["driver"]), ip, port) for p, argv, ip, port in seen["rows"]]
    assert [r for r in rows if not ipaddress.ip_address(r[1]).is_loopback] == []
    # and the survey saw the cluster's servers, not an empty list
    assert {"gcs_server", "raylet", "core worker", "dashboard agent", "runtime env agent"} <= {r[0] for r in rows}


@pytest.mark.slow
def test_no_cluster_process_outlives_a_killed_driver():
    with tempfile.TemporaryDirectory(prefix="rl_", dir="/tmp") as temp_dir:
        proc, seen = start_driver(temp_dir, 600)
        cluster = descendants(seen["driver"], _processes())
        reaper = [p for p in cluster if b"local_ray\x00reap" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(reaper) == 1 and len(cluster) >= 6  # gcs, raylet, agents, dashboard, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            table = _processes()
            alive = {p: Path(f"/proc/{p}/cmdline").read_bytes()[:60] for p, t in cluster.items()
                     if p in table and table[p][1] == t}
            if not alive:
                break
            time.sleep(0.5)
        for p in alive:  # never leave them to the next test
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    assert alive == {}, f"still running 30 s after the driver was killed: {alive}"
