"""Seeding a model with foreign weights, through one filter function.

Accepted: timm DeiT state dicts, the official DeiT ``.pth`` (weights under ``model``),
official SAT release checkpoints (``loc_token``, ``loc_embed``, a conv ``head``) and satloc
checkpoints of either method (a CAM model's backbone seeds a SAT model). Pickled files are
only opened with ``torch.load(weights_only=True)``: a file that needs arbitrary code is refused.
"""
from __future__ import annotations

import io

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

# Official SAT release names -> ours.
SAT_RENAMES = {"loc_token": "spatial_token", "loc_embed": "spatial_pos_embed"}
# Heads of other models and tokens we have no slot for.
DROPPED_PREFIXES = ("head.", "head_dist.", "fc_norm.", "dist_token")


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a foreign state dict to ``model``'s names and shapes.

    The classifier head is kept only when its shape matches (a checkpoint of the same
    class count); otherwise it is dropped and stays freshly initialised.
    """
    state_dict = state_dict.get("model", state_dict)
    state_dict = state_dict.get("state_dict", state_dict)
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    own = model.state_dict()
    head = state_dict.get("head.weight")
    conv_head = head is not None and head.ndim == 4  # official SAT: head is the conv itself
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = SAT_RENAMES.get(key, key)
        if conv_head and key in ("head.weight", "head.bias"):
            key = key.replace("head.", "head.conv.")
        if key.startswith(DROPPED_PREFIXES) and key not in own:
            continue
        if key == "pos_embed":
            value = _resize_pos_embed(value, model)
        elif key in ("spatial_token", "spatial_pos_embed") and value.ndim == 2:
            value = value.view(1, 1, -1)
        if key not in own:
            continue
        if key.startswith("head.") and own[key].shape != value.shape:
            continue  # another class count: keep the fresh head
        if own[key].shape != value.shape:
            raise ValueError(
                f"pretrained weight {key!r} has shape {tuple(value.shape)} but this model needs "
                f"{tuple(own[key].shape)}: use a checkpoint of the same backbone (width/depth)"
            )
        out[key] = value
    return out


def _resize_pos_embed(pos_embed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    n_prefix = model.num_prefix_tokens
    target = model.pos_embed.shape[1]
    if pos_embed.shape[1] == target:
        return pos_embed
    old = int(round((pos_embed.shape[1] - n_prefix) ** 0.5))
    return resample_abs_pos_embed(
        pos_embed, new_size=list(model.grid), old_size=[old, old], num_prefix_tokens=n_prefix
    )


def read_state_dict(url: str) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file or a weights-only ``.pth``, on any fsspec URL."""
    import fsspec
    from safetensors.torch import load as load_safetensors

    with fsspec.open(url, "rb") as f:
        data = f.read()
    if _looks_like_safetensors(data):
        return load_safetensors(data)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: name the file, refuse it
        raise ValueError(
            f"refusing to load {url}: it is not safetensors and not a weights-only PyTorch file "
            f"({type(exc).__name__}). Only plain tensors are accepted; re-save it with "
            f"torch.save(model.state_dict()) or convert it to safetensors"
        ) from None


def _looks_like_safetensors(data: bytes) -> bool:
    if len(data) < 9:
        return False
    header_len = int.from_bytes(data[:8], "little")
    return 0 < header_len < len(data) and data[8:9] == b"{"


def load_pretrained_into(model: nn.Module, source: str) -> dict[str, list[str]]:
    """Load ``source`` (a timm DeiT name for the hub, or a path/URL) into ``model``."""
    if "/" not in source and "." not in source:
        state_dict = _timm_hub_weights(source)
    else:
        state_dict = read_state_dict(source)
    filtered = checkpoint_filter_fn(state_dict, model)
    if not any(k.startswith("blocks.") for k in filtered):
        raise ValueError(f"{source} holds no ViT backbone weights this model can use")
    result = model.load_state_dict(filtered, strict=False)
    return {"missing": list(result.missing_keys), "unexpected": list(result.unexpected_keys)}


def _timm_hub_weights(backbone: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(backbone, pretrained=True).state_dict()
    except Exception as exc:
        raise ValueError(
            f"could not fetch timm's pretrained {backbone} weights ({type(exc).__name__}); "
            f"without a model hub, pass a local file: pretrained='/path/to/deit.pth'"
        ) from None
