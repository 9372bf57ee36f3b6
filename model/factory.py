"""One way in: ``create_model(name, num_classes, pretrained=False, **overrides)``.

Names are ``<method>_<backbone>``: method ``sat`` or ``cam``; backbone one of
``deit_{tiny,small,base}_patch16_224`` (the paper's) or ``vit_micro_patch8_64`` (a CPU-sized
config). Overrides change the backbone (img_size, patch_size, depth, embed_dim, num_heads,
drop_path_rate, ...) or SAT's ``reweight_blocks``.
"""
from __future__ import annotations

from torch import nn

from model.cam import CAMVisionTransformer
from model.pretrained import load_pretrained_into
from model.sat import SATVisionTransformer

BACKBONES: dict[str, dict] = {
    "deit_tiny_patch16_224": dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3),
    "deit_small_patch16_224": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6),
    "deit_base_patch16_224": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    # CPU work: 64 px, 8 x 8 grid, 1.2 M parameters (the size FINDINGS.md measured).
    "vit_micro_patch8_64": dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4),
}
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

    ``pretrained``: ``True`` for timm's DeiT ImageNet weights (needs a model hub), or a
    path/URL of a DeiT state dict (timm names, or the official ``.pth`` with ``model``),
    an official SAT release checkpoint, or a satloc checkpoint of either method. Old
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
        model.pretrained_report = load_pretrained_into(model, backbone if pretrained is True else pretrained)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["create_model", "model_names", "model_kwargs", "split_name", "count_parameters"]
