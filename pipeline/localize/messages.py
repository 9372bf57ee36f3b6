"""What the driver sends an actor (``ShardJob``) and what comes back (``ShardResult``).

Plain dataclasses in a module without torch, so the scheduler and its tests stay light.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardJob:
    """One shard to localize.

    ``write_token`` identifies the run attempt. Without ``overwrite`` an existing output
    means done; with it, an output carrying this run's token was written by an earlier
    try of this same run (an actor that died after its write), so it is not redone.
    """

    shard_url: str
    out_url: str
    overwrite: bool = False
    write_token: str = ""


@dataclass
class ShardResult:
    shard_url: str
    out_url: str
    rows: int = 0
    errors: int = 0
    seconds: float = 0.0  # wall time inside the actor
    skipped: bool = False  # output already there: nothing done
    decode_wait_seconds: float = 0.0  # model stage waiting for decoded images
    model_seconds: float = 0.0  # in the model (with the copy of the batch to its device)
    decode: str = ""  # the actor's decode path: "cpu" or "batched" (pipeline.localize.decode)
    decode_fallbacks: int = 0  # batched: samples the CPU path decoded (not JPEG, CMYK, refused ...)
    write_seconds: float = 0.0
    bytes_written: int = 0
    # Ground-truth labels outside the checkpoint's classes (negative or >= num_classes):
    # kept in the rows, counted here for the job summary and the manifest.
    gt_labels_outside: int = 0
    gt_label_range: tuple[int, int] | None = None  # (min, max) of the shard's gt labels

    @property
    def images(self) -> int:
        return self.rows - self.errors
