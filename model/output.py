"""The result type every satloc model returns, so later stages work with SAT or CAM alike."""
from __future__ import annotations

from typing import NamedTuple

import torch


class LocOutput(NamedTuple):
    """``logits``: B x classes. ``loc_map``: B x 1 x h x w on the patch grid, values in [0, 1].

    A NamedTuple (not a dataclass) so DDP, autocast and ``torch.compile`` pass it through.
    """

    logits: torch.Tensor
    loc_map: torch.Tensor
