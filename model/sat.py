"""The Spatial-Aware Token (SAT) network (Wu et al., ICCV 2023) on timm's VisionTransformer.

One learnable spatial token, with its own position embedding, is appended after the patch
tokens: ``[cls, patches, spatial]``, or ``[cls, registers, patches, spatial]`` on backbones
with register tokens (DINOv2-reg): the prefix is timm's (``num_prefix_tokens``), so the map
and the head read the patch positions ``[num_prefix_tokens, num_prefix_tokens + h * w)``
whatever the backbone. In every re-weighted block its query row of the scaled
attention logits, averaged over heads and passed through a sigmoid, is a map M over all
keys; the block's softmax attention is multiplied column-wise by M (no renormalisation).
Scaling attention columns by M is the same as scaling the value rows by M, so the block
still runs on the fused ``scaled_dot_product_attention`` kernel. The localization map is
the mean of M over the re-weighted blocks, at patch positions.

Blocks before the re-weighted ones do not use M (the official code computes it there but
nothing reads it), so they skip it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn

from model.heads import ConvGapHead
from model.output import LocOutput


class SpatialQueryAttention(Attention):
    """timm ``Attention`` whose last token (the spatial token) gates the attention columns.

    With ``reweight`` off it is plain attention. With it on, ``forward`` also leaves the
    block's map (B x N, over all keys) in ``self.spatial_map`` for the model to collect.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reweight = False
        self.spatial_map: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if not self.reweight:
            self.spatial_map = None
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        # The spatial token's query row of the logits, averaged over heads on the logits.
        spatial_logits = (q[:, :, -1:, :] * self.scale) @ k.transpose(-2, -1)  # B x H x 1 x N
        spatial_map = torch.sigmoid(spatial_logits.mean(dim=1).squeeze(1))  # B x N
        self.spatial_map = spatial_map
        # softmax(QK^T) * M (column-wise) @ V == softmax(QK^T) @ (M * V)
        v = v * spatial_map[:, None, :, None].to(v.dtype)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0
            )
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            out = self.attn_drop(attn) @ v
        out = out.transpose(1, 2).reshape(b, n, self.attn_dim)
        out = self.norm(out)
        return self.proj_drop(self.proj(out))


class SATVisionTransformer(VisionTransformer):
    """timm ViT (DeiT, DINOv2, DeiT III layouts) with a spatial token, spatial-query attention
    and a conv + GAP head."""

    def __init__(self, *, num_classes: int, reweight_blocks: int = 3, **vit_kwargs) -> None:
        vit_kwargs.setdefault("class_token", True)
        super().__init__(num_classes=0, attn_layer=SpatialQueryAttention, block_fn=Block, **vit_kwargs)
        depth = len(self.blocks)
        if not 1 <= reweight_blocks <= depth:
            raise ValueError(f"reweight_blocks must be in 1..{depth} (the depth), got {reweight_blocks}")
        self.num_classes = num_classes
        self.reweight_blocks = reweight_blocks
        for block in self.blocks[depth - reweight_blocks:]:
            block.attn.reweight = True
        # One 1 x 1 x C token and its own position embedding, trunc-normal std 0.02.
        self.spatial_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        self.spatial_pos_embed = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.spatial_token, std=0.02)
        trunc_normal_(self.spatial_pos_embed, std=0.02)
        self.head = ConvGapHead(self.embed_dim, num_classes)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token", "spatial_token", "spatial_pos_embed"}

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        x = super()._pos_embed(x)  # [cls, (registers,) patches] with their position embeddings
        spatial = (self.spatial_token + self.spatial_pos_embed).expand(x.shape[0], -1, -1)
        return torch.cat([x, spatial], dim=1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> (final-norm tokens B x (prefix+N+1) x C, loc_map B x 1 x h x w)."""
        _check_images(x, self.patch_embed.img_size)
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.norm_pre(self.patch_drop(x))
        maps = []
        for block in self.blocks:
            x = block(x)
            if block.attn.spatial_map is not None:
                maps.append(block.attn.spatial_map)
                block.attn.spatial_map = None  # do not keep the graph alive on the module
        x = self.norm(x)
        n_prefix = self.num_prefix_tokens
        h, w = self.grid
        patch_map = torch.stack(maps, 0).mean(0)[:, n_prefix:n_prefix + h * w]
        return x, patch_map.reshape(-1, 1, h, w)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        n_prefix = self.num_prefix_tokens
        h, w = self.grid
        return self.head(tokens[:, n_prefix:n_prefix + h * w], (h, w))

    def forward(self, x: torch.Tensor) -> LocOutput:
        tokens, loc_map = self.forward_features(x)
        return LocOutput(self.forward_head(tokens), loc_map.float())


def _check_images(x: torch.Tensor, img_size) -> None:
    """A clear error for the wrong input instead of a shape mismatch deep in timm."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape B x 3 x H x W, got {tuple(x.shape)}")
    if tuple(x.shape[2:]) != tuple(img_size):
        raise ValueError(
            f"expected {img_size[0]}x{img_size[1]} images for this model, got "
            f"{x.shape[2]}x{x.shape[3]}: resize to the model's input size first"
        )
