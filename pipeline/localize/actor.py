"""The Ray actor that holds one model replica and localizes whole shards.

The model is built once in ``__init__`` from checkpoint bytes the driver put in the object
store (every actor runs exactly the bytes the driver fingerprinted). With ``num_gpus`` Ray
sets ``CUDA_VISIBLE_DEVICES`` to the actor's GPU, so the actor uses ``cuda`` (device 0 of
what it can see); without GPUs it runs on CPU with ``torch`` threads = its CPU allotment.
The actor is threaded (``max_concurrency=2``) only so ``progress()`` answers while a
shard runs; the scheduler never sends it two shards at once.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import ray
import torch

from model.checkpoint import load_checkpoint_bytes
from pipeline.localize.rows import RowSettings
from pipeline.localize.worker import ShardLocalizer, WorkerSettings
from pipeline.localize.messages import ShardJob, ShardResult
from pipeline.data.storage import apply_storage_env


def pick_device(gpu_ids: list) -> torch.device:
    """CUDA when Ray gave this actor a GPU and CUDA works; CPU otherwise (logical GPUs in tests)."""
    if gpu_ids and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


class LocalizeActor:
    def __init__(
        self,
        checkpoint: bytes,
        checkpoint_url: str,
        settings: WorkerSettings,
        row_settings: RowSettings,
        num_cpus: float = 1.0,
        storage_env: dict[str, str] | None = None,
    ) -> None:
        # Storage variables (AWS_*) arrive as an argument, never as runtime_env env_vars
        # (pipeline.data.storage says why). This process hosts only this actor.
        apply_storage_env(storage_env)
        self.num_threads = max(1, int(num_cpus))
        torch.set_num_threads(self.num_threads)
        self.gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        self.device = pick_device(self.gpu_ids)
        model, config = load_checkpoint_bytes(checkpoint, checkpoint_url)
        if config["sha256"] != row_settings.model_sha256:
            raise RuntimeError(
                f"checkpoint {checkpoint_url} changed: the actor got sha256 {config['sha256'][:12]} "
                f"but the run planned {row_settings.model_sha256[:12]}"
            )
        self.localizer = ShardLocalizer(model, config, settings, row_settings, self.device)

    def info(self) -> dict[str, Any]:
        return {
            "node": socket.gethostname(),
            "node_ip": ray.util.get_node_ip_address(),
            "pid": os.getpid(),
            "gpu_ids": self.gpu_ids,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
            "decode_threads": self.localizer.settings.decode_threads,
            "decode": self.localizer.decode,
        }

    def localize(self, job: ShardJob) -> ShardResult:
        return self.localizer.localize(job)

    def progress(self) -> int:
        """Samples done in the shard in progress (for the driver's progress line)."""
        return self.localizer.images_done


def localize_actor_class(num_cpus: float, num_gpus: float):
    """``LocalizeActor`` as a Ray actor class with its resources (storage variables are
    a constructor argument: see ``LocalizeActor.__init__``)."""
    options: dict[str, Any] = dict(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=2)
    return ray.remote(**options)(LocalizeActor)
