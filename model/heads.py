"""Classifier heads on the patch grid, shared by SAT and CAM."""
from __future__ import annotations

import torch
from torch import nn


class ConvGapHead(nn.Module):
    """3x3 conv from the final patch tokens to class maps, then global average pooling.

    SAT's official head: the class score is the mean of per-patch class evidence, which
    is also exactly what CAM reads as its map (``class_maps``).
    """

    def __init__(self, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(embed_dim, num_classes, kernel_size=3, padding=1)

    def class_maps(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """B x N x C patch tokens -> B x classes x h x w."""
        b, n, c = patch_tokens.shape
        h, w = grid
        fmap = patch_tokens.transpose(1, 2).reshape(b, c, h, w)
        return self.conv(fmap)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return self.class_maps(patch_tokens, grid).mean(dim=(2, 3))
