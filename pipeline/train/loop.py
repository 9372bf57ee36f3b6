"""The training loop, free of Ray: what one worker does with a batch and an epoch.

``jobs/train_sat.py`` runs this inside Ray Train workers; benchmarks and tests call it
directly. Read top to bottom: config, model and optimiser, the step, the epoch.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from model import SATLossConfig, create_model, sat_loss
from model.factory import split_name
from model.precision import autocast_for
from model.sat import SATVisionTransformer
from pipeline.data.preprocess import IMAGENET_MEAN, IMAGENET_STD, normalize

# none: everything trains; token: the spatial token, its embedding, the head and the gated
# blocks; backbone: the spatial token, its embedding and the head only (a frozen backbone).
FREEZE_MODES = ("none", "token", "backbone")
# After the warm-up: cosine to zero, or constant (the official runs: constant lr, no warm-up).
SCHEDULES = ("cosine", "constant")
# fp16 would need a gradient scaler; bf16 does not. "auto" is resolved by the job
# (model.precision.resolve_precision) before a TrainConfig is built.
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """What one worker trains with, resolved: a full model name, fp32 or bf16, the class
    count of the data. The job builds it from its options (pipeline.train.job)."""

    model: str = "sat_vit_micro_patch8_64"
    num_classes: int = 10
    model_kwargs: dict = field(default_factory=dict)
    pretrained: str | None = None
    epochs: int = 16
    batch_size: int = 128  # global, across workers
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    schedule: str = "cosine"  # after the warm-up: "cosine" to zero or "constant"
    loss: SATLossConfig = field(default_factory=SATLossConfig)  # alpha, the terms' weights, area mode
    spatial_loss_start: float = 0.0  # epochs before the area/normalization terms start
    spatial_loss_ramp: float = 0.0  # epochs over which they ramp to full weight
    backbone_lr_scale: float = 1.0
    freeze: str = "none"
    precision: str = "fp32"  # resolved: fp32 or bf16 (the jobs' "auto" picks one, model.precision)
    seed: int = 0
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self) -> None:
        split_name(self.model)
        if self.freeze not in FREEZE_MODES:
            raise ValueError(f"--freeze must be one of {FREEZE_MODES}, got {self.freeze!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("epochs, batch size and lr must be positive")

    @property
    def method(self) -> str:
        return split_name(self.model)[0]

    def to_dict(self) -> dict[str, Any]:
        """Flat, the loss's fields beside the others: the shape checkpoints have always stored."""
        flat = asdict(self)
        return {**flat.pop("loss"), **flat}

    @classmethod
    def from_dict(cls, flat: dict[str, Any]) -> "TrainConfig":
        """The inverse of ``to_dict`` (reads checkpoints written before ``loss`` was nested)."""
        loss_names = {f.name for f in fields(SATLossConfig)}
        loss = SATLossConfig(**{k: v for k, v in flat.items() if k in loss_names})
        rest = {k: tuple(v) if k in ("mean", "std") else v for k, v in flat.items() if k not in loss_names}
        return cls(**rest, loss=loss)


# --- model and optimiser ---------------------------------------------------------------

TOKEN_PARAMS = ("spatial_token", "spatial_pos_embed")
NO_DECAY_NAMES = ("pos_embed", "cls_token", "spatial_token", "spatial_pos_embed", "dist_token")


def build_model(cfg: TrainConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)
    model = create_model(cfg.model, cfg.num_classes, pretrained=cfg.pretrained or False, **cfg.model_kwargs)
    apply_freeze(model, cfg.freeze)
    return model


def reweighted_block_ids(model: nn.Module) -> list[int]:
    if isinstance(model, SATVisionTransformer):
        return list(range(len(model.blocks) - model.reweight_blocks, len(model.blocks)))
    return []


def is_token_or_head(name: str, model: nn.Module) -> bool:
    """The parts SAT adds or re-learns: spatial token, its embedding, the head, gated blocks."""
    if name.startswith(TOKEN_PARAMS) or name.startswith("head."):
        return True
    return any(name.startswith(f"blocks.{i}.") for i in reweighted_block_ids(model))


def is_token_or_head_only(name: str) -> bool:
    """What trains on a frozen backbone: the spatial token, its embedding and the head."""
    return name.startswith(TOKEN_PARAMS) or name.startswith("head.")


def apply_freeze(model: nn.Module, mode: str) -> None:
    """``token``: only the spatial token, its embedding, the head and the gated blocks train.
    ``backbone``: only the spatial token, its embedding and the head train; the backbone's
    weights get no gradient (backward still runs through it to reach the spatial token,
    which every block attends to), so the step skips their weight gradients and updates."""
    if mode not in FREEZE_MODES:
        raise ValueError(f"freeze must be one of {FREEZE_MODES}, got {mode!r}")
    for name, p in model.named_parameters():
        if mode == "backbone":
            p.requires_grad_(is_token_or_head_only(name))
        else:
            p.requires_grad_(mode == "none" or is_token_or_head(name, model))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The official groups (no decay on 1-D params, biases, embeddings), and a backbone lr scale.

    ``backbone_lr_scale`` applies to everything but the spatial token, its embedding, the
    head and the gated blocks.
    """
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.endswith(".bias") or name.split(".")[0] in NO_DECAY_NAMES
        backbone = not is_token_or_head(name, model)
        groups.setdefault((no_decay, backbone), []).append(p)
    out = []
    for (no_decay, backbone), params in sorted(groups.items()):
        scale = cfg.backbone_lr_scale if backbone else 1.0
        out.append({"params": params, "weight_decay": 0.0 if no_decay else cfg.weight_decay, "lr_scale": scale})
    return out


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine") -> float:
    """Linear warmup, then cosine to zero (the schedule the official code built but never
    applied) or constant (what the official runs actually used)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g.get("lr_scale", 1.0) * factor


def spatial_scale(epoch_progress: float, start: float, ramp: float) -> float:
    """Weight of the map terms at a (fractional) epoch: 0 before ``start``, ramping over ``ramp``."""
    if epoch_progress < start:
        return 0.0
    if ramp <= 0:
        return 1.0
    return min(1.0, (epoch_progress - start) / ramp)


# --- one step, one epoch ---------------------------------------------------------------

def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    epoch: int,
    steps_per_epoch: int,
    device: torch.device = torch.device("cpu"),
) -> dict[str, float]:
    """One epoch over (uint8 images, labels) batches; returns the epoch's mean metrics and
    ``input_wait``, the share of the epoch's time spent waiting for the next batch."""
    model.train()
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)
    sums: dict[str, float] = {}
    seen = 0
    waited_for = [0.0]  # seconds blocked on the next batch: input the step had to wait for
    start = time.perf_counter()
    for i, (images, labels) in enumerate(_timed(batches, waited_for)):
        step = epoch * steps_per_epoch + i
        set_lr(optimizer, cfg.lr, lr_factor(step, total_steps, warmup_steps, cfg.schedule))
        scale = spatial_scale(epoch + i / steps_per_epoch, cfg.spatial_loss_start, cfg.spatial_loss_ramp)
        # non_blocking: from pinned batches (TrainLoader(pin_memory=True)) the copy overlaps
        # the step; on the same stream, the kernels that read it still wait for it.
        x = normalize(images.to(device, non_blocking=True), cfg.mean, cfg.std)
        labels = labels.to(device, non_blocking=True)
        with autocast_for(cfg.precision, device):
            out = model(x)
        if cfg.method == "sat":
            parts = sat_loss(out.logits, out.loc_map, labels, cfg.loss, spatial_scale=scale)
            loss, named = parts.total, {"ce": parts.ce, "area": parts.area, "norm": parts.norm}
        else:
            loss = nn.functional.cross_entropy(out.logits.float(), labels)
            named = {"ce": loss.detach()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        n = labels.shape[0]
        seen += n
        batch_stats = {
            "loss": loss.item(),
            **{k: v.item() for k, v in named.items()},
            "train_acc": (out.logits.argmax(1) == labels).float().mean().item(),
            "map_area": out.loc_map.detach().float().mean().item(),
        }
        for k, v in batch_stats.items():
            sums[k] = sums.get(k, 0.0) + v * n
    metrics = {k: v / max(seen, 1) for k, v in sums.items()}
    seconds = time.perf_counter() - start
    metrics.update(images=seen, seconds=seconds, spatial_scale=scale if seen else 0.0,
                   input_wait=waited_for[0] / max(seconds, 1e-9))
    return metrics


def _timed(items: Iterable, waited: list[float]) -> Iterator:
    """``items``, adding the seconds spent blocked on each ``next`` to ``waited[0]``."""
    iterator = iter(items)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            waited[0] += time.perf_counter() - start
            return
        waited[0] += time.perf_counter() - start
        yield item


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[torch.Tensor], cfg: TrainConfig, device=torch.device("cpu")
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, loc_map) per batch of uint8 images, in eval mode."""
    model.eval()
    for images in batches:
        with autocast_for(cfg.precision, device):
            out = model(normalize(images.to(device), cfg.mean, cfg.std))
        yield out.logits.float().cpu(), out.loc_map.float().cpu()
