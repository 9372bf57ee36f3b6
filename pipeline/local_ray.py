"""The embedded Ray cluster: what jobs start when no ``RAY_ADDRESS`` names a cluster.

Loopback. Ray turns a node address of ``127.0.0.1`` into the machine's own address
(``services.resolve_ip_for_localhost``) and its servers then listen on every interface,
unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says the cluster is one machine's: with it,
the GCS, raylet, workers, agents, dashboard and metrics servers all listen on 127.0.0.1
(tests/pipeline/test_local_ray.py lists them). The variable is set while ``ray.init``
starts the cluster; its processes inherit it.

No orphans. When the driver dies without ``ray.shutdown()`` (SIGKILL, OOM), Ray's dashboard
and runtime-env agents survive it. A small reaper process (``python -m pipeline.local_ray
reap PID``) records the driver's descendants while it lives and stops them, by PID and
start time, once it is gone.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

SINGLE_MACHINE = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # keep 127.0.0.1 as the node address
REAP_POLL_SECONDS = 0.5
REAP_GRACE_SECONDS = 5.0
_reaper: subprocess.Popen | None = None  # one per driver process, however many clusters it starts


def ensure_ray(**local_kwargs) -> None:
    """Use the connected cluster, RAY_ADDRESS's (``ray job submit`` sets it), or start the
    embedded one with ``local_kwargs`` (never join some other cluster found on the machine)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # the job's runtime_env stays; storage variables reach workers per call
        return
    start_local_ray(**local_kwargs)


def start_local_ray(**init_kwargs) -> None:
    """``ray.init(**init_kwargs)`` for a new in-process cluster on loopback, with the state API
    Ray Train polls, and a reaper for the driver's death.

    Ray Train's PlacementGroupCleaner asks the state API (served by the dashboard) once a
    second whether the controller lives, and logs "Failed to query Ray Train Controller actor
    state" every time it cannot. So: the dashboard, on loopback, on a free port (two clusters
    on one machine do not collide). Its state client finds the cluster from RAY_ADDRESS; a
    worker has none and would scan the machine ("Found multiple active Ray instances" when
    another cluster runs), so a setup hook sets it in every worker of this cluster.
    """
    import ray

    def pin_ray_address() -> None:  # local: pickled by value, workers do not import this module
        import os

        import ray

        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address

    init_kwargs.setdefault("address", "local")  # a new cluster: never join one found on the machine
    init_kwargs.setdefault("_node_ip_address", "127.0.0.1")
    start_reaper()
    from ray._private import ray_constants

    # The cluster's processes read the variable when they start; this process read it when
    # it imported ray, so its copy of the switch is set too, for the length of ray.init.
    saved = {k: os.environ.get(k) for k in SINGLE_MACHINE}
    saved_switch = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(SINGLE_MACHINE)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
                 runtime_env={"worker_process_setup_hook": pin_ray_address}, **init_kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_switch
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_reaper() -> subprocess.Popen:
    """The reaper of this process's descendants (one per process), detached from its session
    and its pipes."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return _reaper
    _reaper = subprocess.Popen(
        [sys.executable, "-m", "pipeline.local_ray", "reap", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True, close_fds=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    return _reaper


# --- the reaper (a process of its own: /proc only, no Ray) ----------------------------------


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    if fields[0] == "Z":  # a zombie has exited
        return None
    return int(fields[1]), int(fields[19])


def _processes() -> dict[int, tuple[int, int]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            out[int(name)] = st
    return out


def descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """PID -> start time of every descendant of ``root`` in ``table``."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found[child] = table[child][1]
            todo.append(child)
    return found


def reap(driver: int, poll: float = REAP_POLL_SECONDS, grace: float = REAP_GRACE_SECONDS) -> list[int]:
    """Watch ``driver``; when it is gone, stop every descendant it had (SIGTERM, then SIGKILL
    after ``grace`` seconds). Returns the PIDs it had to signal."""
    me = os.getpid()
    started = (_stat(driver) or (0, None))[1]
    known: dict[int, int] = {}
    while started is not None and (_stat(driver) or (0, None))[1] == started:
        known.update(descendants(driver, _processes()))
        known.pop(me, None)
        time.sleep(poll)

    def alive() -> list[int]:
        table = _processes()
        # orphans keep their start time; their own children were reparented with them
        pids = {p for p, t in known.items() if p in table and table[p][1] == t}
        for p in list(pids):
            pids.update(descendants(p, table))
        pids.discard(me)
        return sorted(pids)

    signalled = alive()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        for pid in alive():
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    return signalled


if __name__ == "__main__":
    if sys.argv[1:2] != ["reap"] or len(sys.argv) != 3:
        sys.exit("usage: python -m pipeline.local_ray reap DRIVER_PID")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver's Ctrl-C is not ours
    reap(int(sys.argv[2]))
