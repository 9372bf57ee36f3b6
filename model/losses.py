"""The SAT loss (DESIGN §5): CE + |mean(M) - alpha| + mean(M~ (1 - M~)).

The area term uses the mean map area over the *global* batch: under DDP the official
code used each GPU's own batch; here the per-rank sums are all-reduced (with gradients
flowing to the local part) whenever ``torch.distributed`` is initialised.
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


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over all ranks' elements; the gradient flows through the local part."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.mean()
    stats = torch.stack([x.sum().detach(), torch.tensor(float(x.numel()), device=x.device)])
    dist.all_reduce(stats)
    # value = global sum / global count; d/dx_local = 1 / global count
    return (x.sum() + (stats[0] - x.sum().detach())) / stats[1]


def smooth_map(loc_map: torch.Tensor, nsig: float = 6.0) -> torch.Tensor:
    kernel = gaussian_kernel_3x3(nsig).to(loc_map)
    return F.conv2d(loc_map, kernel.view(1, 1, 3, 3), padding=1)


def sat_loss(
    logits: torch.Tensor,
    loc_map: torch.Tensor,
    targets: torch.Tensor,
    config: SATLossConfig = SATLossConfig(),
    spatial_scale: float = 1.0,
) -> SATLossParts:
    """Total loss and its parts. ``spatial_scale`` (0..1) ramps the two map terms in."""
    if loc_map.ndim != 4 or loc_map.shape[1] != 1:
        raise ValueError(f"loc_map must be B x 1 x h x w, got {tuple(loc_map.shape)}")
    ce = F.cross_entropy(logits.float(), targets)
    loc_map = loc_map.float()
    if config.area_mode == "batch":
        area = (global_mean(loc_map) - config.alpha).abs()
    else:
        area = global_mean((loc_map.mean(dim=(1, 2, 3)) - config.alpha).abs())
    smoothed = smooth_map(loc_map, config.smooth_nsig)
    norm = (smoothed * (1 - smoothed)).mean()
    total = ce + spatial_scale * (config.area_weight * area + config.norm_weight * norm)
    return SATLossParts(total, ce.detach(), area.detach(), norm.detach())
