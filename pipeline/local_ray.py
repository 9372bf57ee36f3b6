"""The embedded Ray cluster: what jobs start when no ``RAY_ADDRESS`` names a cluster."""
from __future__ import annotations

import os


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
    Ray Train polls.

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
    init_kwargs.setdefault("_node_ip_address", "127.0.0.1")  # every server on loopback
    ray.init(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=0,
             runtime_env={"worker_process_setup_hook": pin_ray_address}, **init_kwargs)
