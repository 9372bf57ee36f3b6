"""The localize job's settings: one frozen dataclass, checked once, before Ray starts.

``jobs/localize_shards.py`` builds a ``LocalizeConfig`` from its flags; every check of a
flag lives in ``__post_init__`` and raises ``BadInputError`` naming the flag, so a wrong
value stops the job before any shard is listed. What the actors and the row builder get
(``WorkerSettings``, ``RowSettings``) is derived from it and not checked again.
"""
from __future__ import annotations

from dataclasses import dataclass

from model.boxes import MODES, check_threshold
from model.precision import PRECISION_CHOICES
from pipeline.localize.decode import DECODE_CHOICES
from pipeline.data.preprocess import ResizeCrop, parse_resize_crop


class BadInputError(ValueError):
    """The inputs are wrong (exit code 2); nothing was written."""


@dataclass(frozen=True)
class LocalizeConfig:
    shards: str
    checkpoint: str
    output: str
    run_id: str | None = None
    num_actors: int | None = None  # default: one per GPU group, else one per cpus_per_actor CPUs
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # default: 1 on CPU; the cluster's CPUs per GPU actor on GPU
    batch_size: int = 64
    precision: str = "auto"  # bf16 on GPU actors and native-bf16 CPUs, else fp32 (model.precision)
    decode: str = "auto"  # JPEGs in batches on the GPU of CUDA actors, else per sample on CPU (pipeline.localize.decode)
    threshold: float | None = None  # default: the checkpoint's
    topk: int = 5
    box_mode: str = "largest"
    max_boxes: int | None = None
    # "256,224" or (256, 224): the official SAT test frame; stored as a ResizeCrop (None: whole image)
    resize_crop: ResizeCrop | str | tuple[int, int] | None = None
    max_retries: int = 2
    limit: int | None = None
    overwrite: bool = False
    dry_run: bool = False
    progress_seconds: float = 5.0

    def __post_init__(self) -> None:
        for flag, value, low in (
            ("--batch-size", self.batch_size, 1),
            ("--topk", self.topk, 1),
            ("--max-retries", self.max_retries, 0),
            ("--limit", self.limit, 1),
            ("--num-actors", self.num_actors, 1),
            ("--gpus-per-actor", self.gpus_per_actor, 0),
            ("--max-boxes", self.max_boxes, 1),
        ):
            if value is not None and value < low:
                raise BadInputError(f"{flag} must be >= {low}, got {value}")
        if self.cpus_per_actor is not None and self.cpus_per_actor <= 0:
            raise BadInputError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.precision not in PRECISION_CHOICES:
            raise BadInputError(f"--precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if self.decode not in DECODE_CHOICES:
            raise BadInputError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {self.decode!r}")
        if self.decode == "gpu" and self.gpus_per_actor == 0:
            raise BadInputError(decode_gpu_without_gpus())
        if self.box_mode not in MODES:
            raise BadInputError(f"--box-mode must be one of {', '.join(MODES)}, got {self.box_mode!r}")
        if self.threshold is not None:
            object.__setattr__(self, "threshold", resolve_threshold(self.threshold, "--threshold"))
        if self.run_id is not None and (not self.run_id or "/" in self.run_id or self.run_id.startswith(".")):
            raise BadInputError(f"--run-id {self.run_id!r} must be a non-empty name without '/', not starting with '.'")
        object.__setattr__(self, "resize_crop", _frame(self.resize_crop))


def decode_gpu_without_gpus() -> str:
    return (
        "--decode gpu needs GPUs (this run has --gpus-per-actor 0 or a cluster without GPUs): "
        "use --decode cpu (or auto, which decodes on GPUs only when actors have one)"
    )


def resolve_threshold(value: float, source: str) -> float:
    """A threshold from a flag or a checkpoint, checked; BadInputError naming ``source``."""
    try:
        return check_threshold(value, source)
    except (TypeError, ValueError) as e:
        raise BadInputError(str(e)) from None


def _frame(value: ResizeCrop | str | tuple[int, int] | None) -> ResizeCrop | None:
    """``--resize-crop`` as a ResizeCrop; None: the whole image (the default frame)."""
    try:
        if value is None or isinstance(value, ResizeCrop):
            return value
        if isinstance(value, (tuple, list)):
            return ResizeCrop(*(int(v) for v in value))
        if isinstance(value, str):
            return parse_resize_crop(value)
        raise TypeError(f"expected RESIZE,CROP, got {type(value).__name__}")
    except (TypeError, ValueError) as e:
        raise BadInputError(str(e) if "--resize-crop" in str(e) else f"--resize-crop: {e}") from None
