"""Real multi-process Ray clusters for tests: ``ray start --head`` (+ extra nodes) on loopback.

The processes are the ones ``infra/local/cluster.py`` starts for ``make cluster-up``
(loaded from that file, so the tests exercise the script users run): token auth, every
server on 127.x, a short ``--temp-dir`` per node, stopped by PID (never ``ray stop``).

    with RayCluster(num_cpus=1, env=store.env()) as cluster:
        node = cluster.add_node(num_cpus=1)          # a second raylet on 127.0.0.2
        cluster.driver(["python", "jobs/localize_shards.py", ...])   # RAY_ADDRESS = the head
        cluster.submit([...], submission_id="x")     # `ray job submit`

Importable from any test (tests/ is on sys.path through tests/conftest.py).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPT = REPO / "infra" / "local" / "cluster.py"


def load_cluster_script():
    """``infra/local/cluster.py`` as a module (infra/ is not a package)."""
    name = "satloc_infra_cluster"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CLUSTER_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


cluster_script = load_cluster_script()


class RayCluster:
    """A head node (its own short temp dir and token) and any nodes added to it."""

    def __init__(self, num_cpus: int = 1, num_gpus: int = 0, env: dict[str, str] | None = None,
                 prefix: str = "rt"):
        self.root = Path(tempfile.mkdtemp(prefix=f"{prefix}_", dir="/tmp"))
        self.token_file = cluster_script.make_token(self.root / "auth_token")
        self.env = dict(env or {})
        self.head = cluster_script.RayNode(self.root / "h", self.token_file, num_cpus=num_cpus, num_gpus=num_gpus,
                                           env=self.env)
        self.nodes: list = []
        self.drivers: list[subprocess.Popen] = []

    # --- lifecycle -----------------------------------------------------------------

    def start(self, timeout: float = 240.0) -> RayCluster:
        self.head.start()
        try:
            self.head.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_node(self, num_cpus: int = 1, timeout: float = 240.0, resources: dict | None = None):
        """Another raylet on the next free loopback address (127.0.0.2, ...), its own temp dir."""
        ip = cluster_script.NODE_IPS[len(self.nodes)]
        node = cluster_script.RayNode(self.root / f"n{len(self.nodes) + 1}", self.token_file, node_ip=ip,
                                      num_cpus=num_cpus, head_address=self.head.gcs_address, env=self.env,
                                      resources=resources or {})
        node.start()
        self.nodes.append(node)
        self.head.wait_ready(timeout, expected_nodes=1 + sum(1 for n in self.nodes if n.pid is not None))
        return node

    def stop(self) -> None:
        for proc in self.drivers:  # a test that failed or timed out may leave its driver
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for node in self.nodes:
            node.stop()
        self.head.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- using it ------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The dashboard URL, for ``ray job submit``."""
        return self.head.dashboard_url

    @property
    def gcs_address(self) -> str:
        return self.head.gcs_address

    def client_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Environment of a driver or CLI talking to this cluster (token auth, no RAY_ADDRESS)."""
        return cluster_script.auth_env(self.token_file, {**os.environ, **self.env, **(extra or {})})

    def driver(self, args: list[str], timeout: float = 600, extra_env: dict[str, str] | None = None,
               **popen) -> subprocess.Popen:
        """Start a driver process connected to the head (RAY_ADDRESS = its GCS)."""
        env = self.client_env(extra_env)
        env["RAY_ADDRESS"] = self.gcs_address  # auth_env drops an inherited one
        # ray.init swaps a literal 127.0.0.1 for the routable address unless this is 0.
        env[cluster_script.LOOPBACK_SWITCH] = "0"
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **popen)
        self.drivers.append(proc)
        return proc

    def submit(self, entrypoint: list[str], **kwargs):
        return cluster_script.submit(self.address, entrypoint, self.token_file, env={**os.environ, **self.env},
                                     **kwargs)

    def pids(self) -> list[int]:
        """Every live process of the cluster (the sessions of its ``ray start`` processes)."""
        found = []
        for node in [self.head, *self.nodes]:
            if node.pid is not None:
                found += cluster_script.session_pids(node.pid)
        return found

    def temp_dirs(self) -> list[Path]:
        return [self.head.temp_dir, *(n.temp_dir for n in self.nodes)]


def pids_with_title(pids: list[int], title: str) -> list[int]:
    """The PIDs among ``pids`` whose command line (Ray's process title) contains ``title``."""
    out = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title in cmdline:
            out.append(pid)
    return out


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, IP, port) of every TCP socket in LISTEN state owned by ``pids`` (from /proc)."""
    listening: dict[str, tuple[str, int]] = {}
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # TCP_LISTEN
                continue
            hex_ip, hex_port = fields[1].split(":")
            listening[fields[9]] = (_decode_ip(hex_ip, width), int(hex_port, 16))
    found = []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in listening:
                found.append((pid, *listening[target[8:-1]]))
    return found


def _decode_ip(hex_ip: str, width: int) -> str:
    """/proc/net/tcp{,6} addresses: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_ip)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if width == 8:
        return ".".join(str(b) for b in words)
    if words[:12] == b"\x00" * 10 + b"\xff\xff":  # IPv4-mapped IPv6
        return ".".join(str(b) for b in words[12:])
    import ipaddress

    return str(ipaddress.IPv6Address(words))


def is_loopback(ip: str) -> bool:
    import ipaddress

    return ipaddress.ip_address(ip).is_loopback
