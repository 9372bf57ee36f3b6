"""The CAM baseline on the same ViT backbone: conv + GAP head, map = the class's activation map."""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from model.heads import ConvGapHead
from model.output import LocOutput
from model.sat import _check_images


class CAMVisionTransformer(VisionTransformer):
    """DeiT-style ViT whose conv + GAP head doubles as a class activation map."""

    def __init__(self, *, num_classes: int, **vit_kwargs) -> None:
        vit_kwargs.setdefault("class_token", True)
        super().__init__(num_classes=0, **vit_kwargs)
        self.num_classes = num_classes
        self.head = ConvGapHead(self.embed_dim, num_classes)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> LocOutput:
        """``target`` (B,) picks whose map to return; by default the predicted class's."""
        _check_images(x, self.patch_embed.img_size)
        tokens = self.forward_features(x)
        n_prefix = self.num_prefix_tokens
        h, w = self.grid
        class_maps = self.head.class_maps(tokens[:, n_prefix:n_prefix + h * w], (h, w))
        logits = class_maps.mean(dim=(2, 3))
        if target is None:
            target = logits.argmax(dim=1)
        cam = class_maps[torch.arange(x.shape[0], device=x.device), target].unsqueeze(1).float()
        return LocOutput(logits, normalize_cam(cam))


def normalize_cam(cam: torch.Tensor) -> torch.Tensor:
    """ReLU then per-image min-max to [0, 1], the usual CAM convention (B x 1 x h x w)."""
    cam = cam.clamp(min=0)
    flat = cam.flatten(1)
    lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
    hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
    return (cam - lo) / (hi - lo).clamp(min=1e-12)
