"""One way in: ``create_model(name, num_classes, pretrained=False, **overrides)``.

Names are ``<method>_<backbone>``: method ``sat`` or ``cam``; backbone one of
``deit_{tiny,small,base}_patch16_224`` (the paper's), the self-supervised or newer backbones
``dinov2_{small,base}_patch14`` (``_reg4``: with 4 register tokens) and
``deit3_small_patch16_224``, or ``vit_micro_patch8_64`` (a CPU-sized config). Overrides change
the backbone (img_size, patch_size, depth, embed_dim, num_heads, drop_path_rate, ...) or
SAT's ``reweight_blocks``.

The DINOv2 and DeiT III layouts are timm's (``vit_*_patch14_dinov2``,
``vit_*_patch14_reg4_dinov2``, ``deit3_small_patch16_224``): LayerScale in every block;
the register models and DeiT III keep no position embedding for their prefix tokens
(``no_embed_class``). SAT's token order is ``[cls, registers, patches, spatial]``: the map
and the head read the patch positions only. DINOv2 runs at 224 px here (a 16 x 16 grid);
its 518 px position embeddings are resized when the weights are loaded.
"""
from __future__ import annotations

from torch import nn

from model.cam import CAMVisionTransformer
from model.pretrained import load_pretrained_into
from model.sat import SATVisionTransformer

_DINOV2 = dict(img_size=224, patch_size=14, depth=12, init_values=1e-5)  # 224 / 14: a 16 x 16 grid
_REG4 = dict(reg_tokens=4, no_embed_class=True)
BACKBONES: dict[str, dict] = {
    "deit_tiny_patch16_224": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    # Self-supervised / newer backbones, timm's layouts (LayerScale; registers without pos embed).
    "dinov2_small_patch14": dict(_DINOV2, embed_dim=384, num_heads=6),
    "dinov2_small_patch14_reg4": dict(_DINOV2, embed_dim=384, num_heads=6, **_REG4),
    "dinov2_base_patch14": dict(_DINOV2, embed_dim=768, num_heads=12),
    "dinov2_base_patch14_reg4": dict(_DINOV2, embed_dim=768, num_heads=12, **_REG4),
    "deit3_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                    no_embed_class=True, init_values=1e-6),
    # CPU work: 64 px, 8 x 8 grid, 1.2 M parameters (the size FINDINGS.md measured).
    "vit_micro_patch8_64": dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4),
}
# The timm model whose hub weights ``pretrained=True`` fetches, where its name differs.
TIMM_NAMES = {
    "dinov2_small_patch14": "vit_small_patch14_dinov2",
    "dinov2_small_patch14_reg4": "vit_small_patch14_reg4_dinov2",
    "dinov2_base_patch14": "vit_base_patch14_dinov2",
    "dinov2_base_patch14_reg4": "vit_base_patch14_reg4_dinov2",
}
# Backbones meant to start from pretrained weights (all but the CPU-sized config).
PRETRAINED_BACKBONES = tuple(b for b in BACKBONES if b != "vit_micro_patch8_64")
METHODS = {"sat": SATVisionTransformer, "cam": CAMVisionTransformer}
SAT_ONLY_OPTIONS = {"reweight_blocks"}
DEFAULTS = dict(drop_path_rate=0.1)


def model_names() -> list[str]:
    return sorted(f"{m}_{b}" for m in METHODS for b in BACKBONES)


def split_name(name: str) -> tuple[str, str]:
    """``sat_deit_small_patch16_224`` -> ("sat", "deit_small_patch16_224"), or a clear error."""
    method, _, backbone = name.partition("_")
    if method not in METHODS or backbone not in BACKBONES:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(model_names())}")
    return method, backbone


def model_kwargs(name: str, **overrides) -> dict:
    """The full constructor arguments a name and its overrides resolve to."""
    method, backbone = split_name(name)
    if overrides.get("dynamic_img_size"):
        raise ValueError(
            f"{name!r} takes a fixed input size: give img_size instead of dynamic_img_size "
            f"(pretrained position embeddings are resized to it when loaded)"
        )
    kwargs = {**BACKBONES[backbone], **DEFAULTS, **overrides}
    if method != "sat":
        unused = SAT_ONLY_OPTIONS & set(overrides)
        if unused:
            raise ValueError(f"{sorted(unused)} only apply to SAT models, not {name!r}")
    return kwargs


def create_model(
    name: str, num_classes: int, pretrained: bool | str = False, **overrides
) -> nn.Module:
    """Build any ``sat_*`` / ``cam_*`` variant, optionally seeded with pretrained weights.

    ``pretrained``: ``True`` for timm's weights of the backbone (DeiT ImageNet, DINOv2
    LVD-142M, DeiT III; needs a model hub), or a path/URL of a state dict of the same
    backbone (timm names; the official DeiT / DeiT III ``.pth``; the official DINOv2
    release, with or without registers), an official SAT release checkpoint, or a
    satloc checkpoint of either method. Old
    heads are dropped; position embeddings are resized to this model's grid. What was
    dropped, re-initialised or resized is logged (``satloc.pretrained``) and kept on the
    model: ``model.pretrained.pretrained_report(model).summary()``.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    method, backbone = split_name(name)
    kwargs = model_kwargs(name, **overrides)
    model = METHODS[method](num_classes=num_classes, **kwargs)
    if pretrained:
        model.pretrained_report = load_pretrained_into(
            model, TIMM_NAMES.get(backbone, backbone) if pretrained is True else pretrained
        )
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["create_model", "model_names", "model_kwargs", "split_name", "count_parameters"]
