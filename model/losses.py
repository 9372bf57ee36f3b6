"""The SAT loss (DESIGN §5): CE + |mean(M) - alpha| + mean(M~ (1 - M~)).

Every term is a mean over the *global* batch, so that training on W ranks under DDP
follows the same gradient as one process on the concatenated batch:

- The area term's value uses the global batch (the official code used each GPU's own
  batch under DDP): per-rank sums and counts are all-reduced whenever
  ``torch.distributed`` is initialised with more than one rank.
- DDP averages the ranks' gradients, i.e. divides their sum by W. So the local part of
  each global mean carries a gradient of W / N_global per element (not 1 / N_global, which
  trained the area term at 1/W of its weight): after DDP's averaging every element of
  every rank contributes 1 / N_global, as on one process. CE and the normalisation term
  go through the same global mean, which also keeps them right when the ranks' batches
  differ in size (a plain local mean weighs a short batch's images up).

This assumes the model is wrapped in DDP (or anything that averages gradients over the
ranks) whenever a process group of several ranks is up; with no group, or one rank, every
mean is the plain local mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F


def gaussian_kernel_3x3(nsig: float = 6.0) -> torch.Tensor:
    """The fixed 3x3 smoothing kernel of the official code (the well-known ``gkern``).

    Per-cell normal CDF mass over ``[-nsig - h/2, nsig + h/2]`` split in 3, geometric mean
    of the 1-D masses, normalised: for nsig 6 the centre is ~0.805, edges ~0.046, corners
    ~0.0026 (a sharp kernel, not a sigma-6 blur).
    """
    interval = (2 * nsig + 1.0) / 3
    edges = torch.linspace(-nsig - interval / 2, nsig + interval / 2, 4, dtype=torch.float64)
    mass = torch.diff(torch.special.ndtr(edges))
    kernel = torch.sqrt(torch.outer(mass, mass))
    return (kernel / kernel.sum()).float()


@dataclass(frozen=True)
class SATLossConfig:
    alpha: float = 0.25  # target mean map area (0.25 CUB, 0.35 ImageNet)
    area_weight: float = 1.0
    norm_weight: float = 1.0
    smooth_nsig: float = 6.0
    # "batch": |mean over batch and pixels - alpha| (official). "image": mean over images of
    # |each image's mean - alpha|, which stops a batch meeting alpha with some maps all on
    # and others all off (the per-image polarity flips FINDINGS.md saw).
    area_mode: str = "batch"

    def __post_init__(self) -> None:
        if self.area_mode not in ("batch", "image"):
            raise ValueError(f"area_mode must be 'batch' or 'image', got {self.area_mode!r}")


class SATLossParts(NamedTuple):
    total: torch.Tensor
    ce: torch.Tensor
    area: torch.Tensor
    norm: torch.Tensor


def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def global_means(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The mean of each ``x`` over all ranks' elements, in one all-reduce.

    Forward: global sum / global count. Backward: W / N_global per local element, so that
    DDP's averaging over the W ranks leaves 1 / N_global, the one-process gradient on the
    concatenated batch. Without a process group (or with one rank) this is ``x.mean()``.
    """
    world = _world_size()
    if world == 1:
        return tuple(x.mean() for x in xs)
    sums = [x.sum() for x in xs]
    stats = torch.stack(
        [t for x, s in zip(xs, sums) for t in (s.detach().float(), torch.tensor(float(x.numel()), device=x.device))]
    )
    dist.all_reduce(stats)
    means = []
    for i, s in enumerate(sums):
        total, count = stats[2 * i], stats[2 * i + 1]
        # (s - s.detach()) is exactly 0 forward and carries s's graph backward.
        means.append((total / count).to(s.dtype) + (s - s.detach()) * (world / count))
    return tuple(means)


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """``global_means`` of one tensor."""
    return global_means(x)[0]


def smooth_map(loc_map: torch.Tensor, nsig: float = 6.0) -> torch.Tensor:
    kernel = gaussian_kernel_3x3(nsig).to(loc_map)
    return F.conv2d(loc_map, kernel.view(1, 1, 3, 3), padding=1)


def sat_loss_terms(
    logits: torch.Tensor, loc_map: torch.Tensor, targets: torch.Tensor, config: SATLossConfig = SATLossConfig()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unweighted (ce, area, norm) terms, each with its graph (one all-reduce under DDP)."""
    if loc_map.ndim != 4 or loc_map.shape[1] != 1:
        raise ValueError(f"loc_map must be B x 1 x h x w, got {tuple(loc_map.shape)}")
    ce_each = F.cross_entropy(logits.float(), targets, reduction="none")
    loc_map = loc_map.float()
    smoothed = smooth_map(loc_map, config.smooth_nsig)
    if config.area_mode == "batch":
        area_of = loc_map  # |global mean over images and pixels - alpha|
    else:
        area_of = (loc_map.mean(dim=(1, 2, 3)) - config.alpha).abs()  # then the global mean
    ce, area_mean, norm = global_means(ce_each, area_of, smoothed * (1 - smoothed))
    area = (area_mean - config.alpha).abs() if config.area_mode == "batch" else area_mean
    return ce, area, norm


def sat_loss(
    logits: torch.Tensor,
    loc_map: torch.Tensor,
    targets: torch.Tensor,
    config: SATLossConfig = SATLossConfig(),
    spatial_scale: float = 1.0,
) -> SATLossParts:
    """Total loss and its parts. ``spatial_scale`` (0..1) ramps the two map terms in."""
    ce, area, norm = sat_loss_terms(logits, loc_map, targets, config)
    total = ce + spatial_scale * (config.area_weight * area + config.norm_weight * norm)
    return SATLossParts(total, ce.detach(), area.detach(), norm.detach())
