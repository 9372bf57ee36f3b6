"""A local Ray cluster (head, optional extra nodes) and the SeaweedFS S3 endpoint, on loopback.

    python infra/local/cluster.py up   [--dir .cluster] [--num-cpus N]   # `make cluster-up`
    python infra/local/cluster.py down [--dir .cluster]                  # `make cluster-down`
    python infra/local/cluster.py status [--dir .cluster]
    python infra/local/cluster.py env  [--dir .cluster]        # `eval "$(... env)"` for ray CLIs
    python infra/local/cluster.py submit-demo [--dir .cluster]           # `make submit-demo`
    python infra/local/cluster.py submit --address http://HEAD:8265 --dated satloc-loc-nightly \\
        [--working-dir .] -- python jobs/localize_shards.py ...          # scheduled runs

Rules it keeps (DESIGN §7):
- every server binds 127.0.0.1 (Ray head, its dashboard, the S3 endpoint), on free ports
  chosen at start and recorded in ``DIR/cluster.json``;
- token auth: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH=DIR/auth_token`` (0600)
  for ``ray start`` *and* every ``ray job submit`` (Ray 2.60 turns token auth on by
  default only for ``ray.init()`` clusters; ``ray start`` follows whatever token it
  finds, so the mode is set explicitly to keep both sides the same);
- the head's own ``--temp-dir`` (short, so socket paths stay under 108 bytes);
- processes are stopped by the PIDs recorded at start (the ``ray start --block``
  process and, after it, anything left in its session), never with ``ray stop``.

``submit --dated PREFIX`` is the double-submission guard of scheduled runs: the
submission id is ``PREFIX-YYYYMMDD`` (UTC), and Ray refuses a second job with an id it
already holds, so a retried or duplicated trigger on the same day does nothing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from infra.local.s3_store import ENV_FILE, LocalS3Store, free_ports  # noqa: E402
from infra.local.s3_store import down as store_down  # noqa: E402

STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
HEAD_PID_FILE = "ray-head.pid"
HEAD_IP = "127.0.0.1"
# Extra nodes on this machine: other loopback addresses, which `ray start` keeps as given
# (only the literal localhost/127.0.0.1/::1 is swapped for the routable address).
NODE_IPS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SOCKET_PATH_BUDGET = 107  # bytes of a unix socket path (sun_path), NUL excluded
# Longest path Ray puts under its temp dir: /session_YYYY-MM-DD_HH-MM-SS_ffffff_PID/sockets/plasma_store
_SESSION_SUFFIX = len("/session_2026-01-01_00-00-00_000000_1234567/sockets/plasma_store")
HEAD_PORTS = ("port", "dashboard-port", "node-manager-port", "object-manager-port",
              "dashboard-agent-grpc-port", "dashboard-agent-listen-port", "metrics-export-port",
              "runtime-env-agent-port", "ray-client-server-port")
NODE_PORTS = ("node-manager-port", "object-manager-port", "dashboard-agent-grpc-port",
              "dashboard-agent-listen-port", "metrics-export-port", "runtime-env-agent-port")
# Never uploaded with --working-dir: cluster state (token, S3 keys), outputs, history.
WORKING_DIR_EXCLUDES = [".cluster", ".git", "demo_out", "runs", "bench_out", ".venv", ".pytest_cache"]
DUPLICATE_MARK = "already exists"  # Ray's refusal of a second job with the same submission id

DEMO_BUCKET = "satloc"
DEMO_PREFIX = "demo"
DEMO_MODEL = "sat_vit_micro_patch8_64"
DEMO_CHECKPOINT = REPO / "demo_out" / "checkpoints" / "sat.safetensors"


# --- processes -------------------------------------------------------------------------------


def ray_binary() -> str:
    """The ``ray`` CLI beside this Python (the venv's), else on PATH."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else "ray"


def auth_env(token_file: str | os.PathLike, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: os.environ) with token auth pointing at ``token_file``.

    RAY_AUTH_TOKEN wins over RAY_AUTH_TOKEN_PATH in Ray, so an inherited one is dropped.
    """
    env = dict(os.environ if base is None else base)
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(Path(token_file).resolve())
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def make_token(path: Path) -> Path:
    """A random token file readable only by its owner (kept when it exists)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.chmod(path, 0o600)
    return path


def short_temp_dir(preferred: Path) -> Path:
    """``preferred`` if Ray's socket paths under it fit, else a short one under /tmp."""
    preferred = preferred.resolve()
    if len(str(preferred)) + _SESSION_SUFFIX <= SOCKET_PATH_BUDGET:
        return preferred
    return Path("/tmp") / f"satloc-ray-{secrets.token_hex(4)}"


def session_pids(session_id: int) -> list[int]:
    """PIDs of live processes in the session ``session_id`` (``ray start`` ran with setsid)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
        if len(fields) > 3 and int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def _signal_all(pids: list[int], sig: int) -> list[int]:
    sent = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent


def stop_session(leader: int, timeout: float = 20.0, popen: subprocess.Popen | None = None,
                 orphan_grace: float = 3.0, term_all_after: float = 2.0) -> list[int]:
    """Stop a ``ray start --block`` process and every process of its session, by PID.

    SIGTERM to the leader (it stops its node's processes one by one), after
    ``term_all_after`` s SIGTERM to every process still in the session (so they stop in
    parallel), and SIGKILL for any still there ``timeout`` s after the start, or
    ``orphan_grace`` s after the leader exited. Returns the PIDs that needed SIGKILL.
    """
    _signal_all([leader], signal.SIGTERM)
    start = time.monotonic()
    deadline = start + timeout
    leader_gone = None
    termed_all = False
    while time.monotonic() < deadline:
        if not termed_all and time.monotonic() - start > term_all_after:
            _signal_all([p for p in session_pids(leader) if p != leader], signal.SIGTERM)
            termed_all = True
        if popen is not None:
            popen.poll()
        leader_alive, rest = _alive(leader), session_pids(leader)
        if not leader_alive and not rest:
            return []
        if not leader_alive:
            leader_gone = leader_gone or time.monotonic()
            if time.monotonic() - leader_gone > orphan_grace:
                break
        time.sleep(0.2)
    killed = _signal_all(session_pids(leader), signal.SIGKILL)
    if popen is not None:
        try:
            popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    return killed


@dataclass
class RayNode:
    """One ``ray start --block`` process: a head, or a node joining ``head_address``.

    Every port is chosen free on 127.0.0.1, so several nodes (and clusters) can share a
    machine. ``--temp-dir`` is per node in Ray 2.60 (a node without one uses the head's).
    """

    temp_dir: Path
    token_file: Path
    node_ip: str = HEAD_IP
    num_cpus: int = 1
    num_gpus: int = 0
    head_address: str | None = None  # GCS host:port; None starts a head
    env: dict[str, str] = field(default_factory=dict)  # extra variables (AWS_* for jobs)
    resources: dict[str, float] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    pid: int | None = None
    log_path: Path | None = None

    def __post_init__(self) -> None:
        if not self.is_head and self.node_ip == HEAD_IP:
            self.node_ip = NODE_IPS[0]

    @property
    def is_head(self) -> bool:
        return self.head_address is None

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip}:{self.ports['port']}" if self.is_head else self.head_address

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard-port']}"

    @property
    def join_address(self) -> str:
        """The head's GCS address as a joining node must spell it.

        ``ray start --address=127.0.0.1:P`` swaps the literal loopback address for the
        machine's routable one, where a loopback-only head does not listen; ``127.1`` is
        the same address (inet_aton) that Ray does not recognise as "localhost".
        """
        host, _, port = self.head_address.rpartition(":")
        return f"127.1:{port}" if host == HEAD_IP else self.head_address

    def command(self) -> list[str]:
        cmd = [ray_binary(), "start", "--block", f"--temp-dir={self.temp_dir}", f"--node-ip-address={self.node_ip}",
               f"--num-cpus={self.num_cpus}", f"--num-gpus={self.num_gpus}", "--disable-usage-stats"]
        if self.is_head:
            cmd += ["--head", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
        else:
            cmd += [f"--address={self.join_address}"]
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        return cmd + [f"--{name}={port}" for name, port in self.ports.items()]

    def start(self) -> RayNode:
        names = HEAD_PORTS if self.is_head else NODE_PORTS
        self.ports = dict(zip(names, free_ports(len(names))))
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        name = "ray-head" if self.is_head else f"ray-node-{self.ports['node-manager-port']}"
        self.log_path = self.temp_dir / f"{name}.log"
        env = auth_env(self.token_file, {**os.environ, **self.env})
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        if self.node_ip == HEAD_IP:
            # `ray start` swaps a literal 127.0.0.1 for the machine's routable address
            # (services.resolve_ip_for_localhost), and Ray's servers then listen there.
            # With this switch off, Ray 2.60 keeps the loopback address (it is the switch
            # Ray uses for single-machine clusters on macOS/Windows); it also forbids this
            # node's processes from *joining* a cluster, which a head never does.
            env[LOOPBACK_SWITCH] = "0"
        elif not self.node_ip.startswith("127."):
            raise ValueError(f"node IP {self.node_ip} is not a loopback address")
        else:
            env["GRPC_DNS_RESOLVER"] = "native"  # getaddrinfo reads 127.1; c-ares may not
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.temp_dir)
        self.pid = self.process.pid
        return self

    def wait_ready(self, timeout: float = 180.0, expected_nodes: int = 1) -> None:
        """Until the dashboard answers with the token and ``expected_nodes`` nodes are alive
        (call on the head; a joining node is ready when the head counts it)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}: {self.log_tail()}")
            try:
                alive = alive_nodes(self.dashboard_url, self.token_file)
                if alive >= expected_nodes:
                    return
                last = f"{alive} of {expected_nodes} nodes alive"
            except (OSError, ValueError) as e:
                last = str(e)
            time.sleep(0.5)
        raise TimeoutError(f"Ray head {self.dashboard_url} not ready within {timeout:.0f}s ({last}): {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except (OSError, AttributeError):
            return "(no log)"

    def stop(self, timeout: float = 20.0) -> list[int]:
        if self.pid is None:
            return []
        killed = stop_session(self.pid, timeout, self.process)
        self.process, self.pid = None, None
        return killed

    def kill(self) -> list[int]:
        """SIGKILL the whole node at once (a crashed machine), by the PIDs of its session."""
        pids = _signal_all(session_pids(self.pid), signal.SIGKILL)
        if self.process is not None:
            self.process.wait(timeout=30)
        self.process, self.pid = None, None
        return pids


def dashboard_get(url: str, path: str, token_file: Path | None, timeout: float = 5.0) -> tuple[int, bytes]:
    """(HTTP status, body) of GET ``url + path`` with the bearer token (none when None)."""
    request = urllib.request.Request(url + path)
    if token_file is not None:
        request.add_header("Authorization", f"Bearer {Path(token_file).read_text().strip()}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def alive_nodes(url: str, token_file: Path) -> int:
    status, body = dashboard_get(url, "/nodes?view=summary", token_file)
    if status != 200:
        raise ValueError(f"dashboard answered {status}: {body[:200]!r}")
    summary = json.loads(body)["data"]["summary"]
    return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")


# --- job submission ----------------------------------------------------------------------------


def dated_submission_id(prefix: str, day: dt.date | None = None) -> str:
    """``PREFIX-YYYYMMDD`` for ``day`` (default: today in UTC), e.g. satloc-loc-nightly-20260301."""
    if not prefix or any(c.isspace() or c == "/" for c in prefix):
        raise ValueError(f"--dated prefix {prefix!r} must be a non-empty name without spaces or '/'")
    day = day or dt.datetime.now(dt.timezone.utc).date()
    return f"{prefix}-{day:%Y%m%d}"


@dataclass
class Submission:
    submission_id: str | None
    returncode: int
    duplicate: bool  # Ray refused the id: a job with it was already submitted
    stdout: str
    stderr: str


def submit(address: str, entrypoint: list[str], token_file: Path, submission_id: str | None = None,
           working_dir: str | None = None, wait: bool = True, env: dict[str, str] | None = None,
           timeout: float | None = None) -> Submission:
    """``ray job submit`` with token auth; a refused duplicate id is reported, not raised.

    ``wait`` follows the job to its end (exit code = the job's); without it the call
    returns once Ray accepted the job.
    """
    cmd = [ray_binary(), "job", "submit", f"--address={address}"]
    if submission_id:
        cmd.append(f"--submission-id={submission_id}")
    if working_dir:
        cmd += [f"--working-dir={working_dir}", "--runtime-env-json", json.dumps({"excludes": WORKING_DIR_EXCLUDES})]
    if not wait:
        cmd.append("--no-wait")
    proc = subprocess.run(cmd + ["--", *entrypoint], env=auth_env(token_file, env), capture_output=True,
                          text=True, timeout=timeout, cwd=working_dir or None)
    text = proc.stdout + proc.stderr
    duplicate = proc.returncode != 0 and bool(submission_id) and f"{submission_id} {DUPLICATE_MARK}" in text
    return Submission(submission_id, proc.returncode, duplicate, proc.stdout, proc.stderr)


def job_status(address: str, submission_id: str, token_file: Path) -> str:
    """SUCCEEDED / FAILED / RUNNING / PENDING / STOPPED, or UNKNOWN when Ray holds no such job."""
    status, body = dashboard_get(address, f"/api/jobs/{submission_id}", token_file)
    if status != 200:
        return "UNKNOWN"
    return json.loads(body).get("status", "UNKNOWN")


# --- the local cluster: up / down / status ----------------------------------------------------


def _state_path(directory: Path) -> Path:
    return directory / STATE_FILE


def read_state(directory: Path) -> dict:
    path = _state_path(directory)
    if not path.exists():
        raise FileNotFoundError(f"no local cluster in {directory}: run `make cluster-up` first")
    return json.loads(path.read_text())


def load_store_env(directory: Path) -> dict[str, str]:
    env_file = directory / "s3" / ENV_FILE
    pairs = (line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    return {k: v for k, v in pairs}


def up(directory: Path, num_cpus: int, num_gpus: int = 0, out=sys.stdout) -> dict:
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # token, S3 keys and logs: the owner's only
    (directory / ".gitignore").write_text("# satloc local cluster state: never commit (token, S3 keys)\n*\n")
    if _state_path(directory).exists():
        state = read_state(directory)
        if _alive(state["head_pid"]):
            print(f"already running: dashboard {state['dashboard']} (PID {state['head_pid']})", file=out)
            return state
    token_file = make_token(directory / TOKEN_FILE)
    store = LocalS3Store(directory / "s3", bucket=DEMO_BUCKET)
    store.start(detach=True)
    store_env = store.env()
    print(f"S3 endpoint {store.endpoint} (bucket {store.bucket}), PID {store.process.pid}", file=out)
    head = RayNode(short_temp_dir(directory / "ray"), token_file, num_cpus=num_cpus, num_gpus=num_gpus,
                   env=store_env)
    head.start()
    (directory / HEAD_PID_FILE).write_text(f"{head.pid}\n")
    try:
        head.wait_ready()
    except BaseException:
        head.stop()
        store.stop()
        raise
    state = {
        "dashboard": head.dashboard_url, "gcs": head.gcs_address, "head_pid": head.pid,
        "temp_dir": str(head.temp_dir), "token_file": str(token_file), "s3_dir": str(directory / "s3"),
        "s3_endpoint": store.endpoint, "weed_pid": store.process.pid, "ports": head.ports,
    }
    _state_path(directory).write_text(json.dumps(state, indent=1))
    print(f"Ray head {head.gcs_address}, dashboard {head.dashboard_url} (token auth), PID {head.pid}", file=out)
    print(f"temp dir {head.temp_dir}; logs {head.temp_dir}/session_latest/logs", file=out)
    print(f"for ray CLIs: eval \"$({sys.executable} {Path(__file__).relative_to(REPO)} env --dir {directory})\"",
          file=out)
    return state


def down(directory: Path, out=sys.stdout) -> None:
    directory = directory.resolve()
    pid_file = directory / HEAD_PID_FILE
    if pid_file.exists():
        pid = int(pid_file.read_text().strip())
        temp_dir = json.loads(_state_path(directory).read_text())["temp_dir"] if _state_path(directory).exists() else ""
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") if _alive(pid) else ""
        if cmdline and "ray" in cmdline and temp_dir in cmdline:  # PIDs get reused: only ours
            killed = stop_session(pid)
            print(f"stopped Ray head PID {pid}" + (f" (killed {len(killed)} leftovers)" if killed else ""), file=out)
        else:
            print(f"Ray head PID {pid} is not running", file=out)
        pid_file.unlink(missing_ok=True)
    stopped = store_down(directory / "s3", keep_data=True)
    print("stopped the S3 endpoint" if stopped else "no running S3 endpoint", file=out)
    _state_path(directory).unlink(missing_ok=True)


def status(directory: Path, out=sys.stdout) -> int:
    try:
        state = read_state(directory.resolve())
    except FileNotFoundError as e:
        print(e, file=out)
        return 1
    head = "running" if _alive(state["head_pid"]) else "NOT running"
    weed = "running" if _alive(state["weed_pid"]) else "NOT running"
    try:
        nodes = alive_nodes(state["dashboard"], Path(state["token_file"]))
    except (OSError, ValueError) as e:
        nodes = f"? ({e})"
    print(f"Ray head PID {state['head_pid']} {head}, dashboard {state['dashboard']}, alive nodes {nodes}", file=out)
    print(f"S3 endpoint {state['s3_endpoint']} PID {state['weed_pid']} {weed}", file=out)
    return 0 if head == weed == "running" else 1


def env_lines(directory: Path) -> str:
    """Shell lines that point ray CLIs and S3 clients at the local cluster (no secrets printed
    inline: the token stays in its file; the S3 keys are sourced from s3.env)."""
    state = read_state(directory.resolve())
    return "\n".join([
        f"export RAY_ADDRESS={state['dashboard']}",
        f"export {LOOPBACK_SWITCH}=0  # drivers: keep 127.0.0.1 (see RayNode.start)",
        "export RAY_AUTH_MODE=token",
        f"export RAY_AUTH_TOKEN_PATH={state['token_file']}",
        "unset RAY_AUTH_TOKEN",
        f"set -a; . {Path(state['s3_dir']) / ENV_FILE}; set +a",
    ])


# --- the demo submission -------------------------------------------------------------------------


def demo_inputs(store_env: dict[str, str], out=sys.stdout) -> tuple[str, str]:
    """Tiny synthetic shards and a checkpoint in the local bucket; returns (shards, checkpoint) URLs."""
    os.environ.update(store_env)
    from pipeline.data.storage import exists, read_bytes, write_bytes_atomic
    from pipeline.datasets.synthetic import class_names, write_synthetic_shards

    base = f"s3://{DEMO_BUCKET}/{DEMO_PREFIX}"
    shards = f"{base}/shards/"
    if not exists(f"{base}/shards/demo-000000.tar"):
        write_synthetic_shards(shards, "demo", 48, seed=0, image_size=64, shard_size=16)
        print(f"wrote 3 synthetic shards (48 images) to {shards}", file=out)
    checkpoint = f"{base}/models/sat.safetensors"
    if DEMO_CHECKPOINT.exists():
        write_bytes_atomic(checkpoint, read_bytes(str(DEMO_CHECKPOINT)))
        print(f"uploaded the demo-trained {DEMO_CHECKPOINT} to {checkpoint}", file=out)
    elif not exists(checkpoint):
        import torch

        from model.checkpoint import default_config, save_checkpoint
        from model.factory import create_model

        torch.manual_seed(0)
        names = class_names("birds", 10)
        save_checkpoint(create_model(DEMO_MODEL, 10), checkpoint,
                        default_config(DEMO_MODEL, 10, class_names=names, threshold=0.4))
        print(f"wrote an untrained {DEMO_MODEL} checkpoint to {checkpoint} (run `make demo` for a trained one)",
              file=out)
    return shards, checkpoint


def submit_demo(directory: Path, submission_id: str | None, out=sys.stdout) -> int:
    directory = directory.resolve()
    state = read_state(directory)
    shards, checkpoint = demo_inputs(load_store_env(directory), out)
    entrypoint = ["python", "jobs/localize_shards.py", "--shards", shards, "--checkpoint", checkpoint,
                  "--output", f"s3://{DEMO_BUCKET}/{DEMO_PREFIX}/loc/", "--run-id", "demo",
                  "--num-actors", "1", "--batch-size", "16"]
    print(f"ray job submit --address {state['dashboard']} --working-dir . -- {' '.join(entrypoint)}", file=out,
          flush=True)
    result = submit(state["dashboard"], entrypoint, Path(state["token_file"]), submission_id=submission_id,
                    working_dir=str(REPO))
    out.write(result.stdout)
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-4000:])
    if result.duplicate:
        print(f"submission id {submission_id} was already used on this cluster: nothing submitted", file=out)
        return 0
    return result.returncode


# --- CLI -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    entrypoint: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, entrypoint = argv[:cut], argv[cut + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("up", "down", "status", "env", "submit-demo", "submit"))
    p.add_argument("--dir", default=str(REPO / ".cluster"), help="state directory (PIDs, token, S3 data, logs)")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count() or 1, help="up: CPUs the head offers")
    p.add_argument("--num-gpus", type=int, default=0, help="up: GPUs the head offers")
    p.add_argument("--address", help="submit: dashboard URL (default: the local cluster's)")
    p.add_argument("--token-file", help="submit: token file (default: the local cluster's)")
    p.add_argument("--submission-id", help="submit/submit-demo: the Ray submission id")
    p.add_argument("--dated", metavar="PREFIX", help="submit: submission id PREFIX-YYYYMMDD (UTC today)")
    p.add_argument("--date", type=dt.date.fromisoformat, help="submit --dated: this day instead of today (backfills)")
    p.add_argument("--working-dir", help="submit: upload this directory with the job")
    p.add_argument("--no-wait", action="store_true", help="submit: return once Ray accepted the job")
    args = p.parse_args(argv)
    directory = Path(args.dir)
    try:
        if args.action == "up":
            up(directory, args.num_cpus, args.num_gpus)
            return 0
        if args.action == "down":
            down(directory)
            return 0
        if args.action == "status":
            return status(directory)
        if args.action == "env":
            print(env_lines(directory))
            return 0
        if args.action == "submit-demo":
            return submit_demo(directory, args.submission_id)
        if not entrypoint:
            p.error("submit needs the job after '--', e.g. -- python jobs/localize_shards.py ...")
        if args.dated and args.submission_id:
            p.error("give --dated or --submission-id, not both")
        state = {} if (args.address and args.token_file) else read_state(directory.resolve())
        address = args.address or state["dashboard"]
        token_file = Path(args.token_file or state["token_file"])
        if args.date and not args.dated:
            p.error("--date goes with --dated PREFIX")
        submission_id = dated_submission_id(args.dated, args.date) if args.dated else args.submission_id
        result = submit(address, entrypoint, token_file, submission_id, args.working_dir, wait=not args.no_wait)
        sys.stdout.write(result.stdout)
        if result.duplicate:
            state_now = job_status(address, submission_id, token_file)
            print(f"[submit] {submission_id} was already submitted (status {state_now}): not submitted again")
            return 0
        sys.stderr.write(result.stderr)
        return result.returncode
    except (FileNotFoundError, TimeoutError, RuntimeError, ValueError) as e:
        print(f"cluster: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
