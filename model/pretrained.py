"""Seeding a model with foreign weights, through one filter function.

Accepted: timm state dicts of the backbones (DeiT, DINOv2 with or without registers,
DeiT III), the official DeiT / DeiT III ``.pth`` (weights under ``model``; DeiT III's
``gamma_1``/``gamma_2`` become ``ls1.gamma``/``ls2.gamma``), the official DINOv2 release
(``mask_token``, ``register_tokens``, a position embedding that includes the cls position;
converted as timm converts it), official SAT release checkpoints (``loc_token``,
``loc_embed``, a conv ``head``) and satloc checkpoints of either method (a CAM model's
backbone seeds a SAT model). Pickled files are
only opened with ``torch.load(weights_only=True)``: a file that needs arbitrary code is refused.

What was not taken over is said, never silent: :func:`load_pretrained_into` returns a
:class:`PretrainedReport` (tensors kept at their fresh init, checkpoint tensors dropped,
the position embedding resized) and logs its one-line summary on the ``satloc.pretrained``
logger; ``create_model`` attaches it to the model (:func:`pretrained_report`).
"""
from __future__ import annotations

import io
import logging
import os
import re
from dataclasses import dataclass, field

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

# Official SAT release names -> ours.
SAT_RENAMES = {"loc_token": "spatial_token", "loc_embed": "spatial_pos_embed"}
# Heads of other models and tokens we have no slot for.
DROPPED_PREFIXES = ("head.", "head_dist.", "fc_norm.", "dist_token")
# Tensors a foreign backbone is not expected to hold: SAT's token and the class head.
EXPECTED_FRESH = ("head.", "spatial_token", "spatial_pos_embed")

logger = logging.getLogger("satloc.pretrained")


@dataclass
class PretrainedReport:
    """What loading ``source`` into a model did, tensor by tensor."""

    source: str
    loaded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)  # the model's tensors left at their fresh init
    dropped: list[str] = field(default_factory=list)  # the checkpoint's tensors with no place in the model
    checkpoint_head: tuple[str, int] | None = None  # ("linear" | "conv", its class count)
    model_classes: int | None = None
    pos_embed_resized: tuple[tuple[int, int], tuple[int, int]] | None = None  # (old grid, new grid)

    @property
    def unexpected_fresh(self) -> list[str]:
        """Re-initialised tensors a backbone checkpoint should have held."""
        return [k for k in self.reinitialised if not k.startswith(EXPECTED_FRESH)]

    @property
    def conv_head_dropped(self) -> bool:
        """A class head like this model's (a satloc or official SAT checkpoint) was not used:
        another class count."""
        return self.checkpoint_head is not None and self.checkpoint_head[0] == "conv" and any(
            k.startswith("head.") for k in self.reinitialised
        )

    def summary(self) -> str:
        """One line, e.g. ``pretrained deit_small.pth: 150 tensors loaded; head.conv.weight,
        head.conv.bias re-initialised (checkpoint has 200 classes, model 1000); ...``."""
        parts = [f"{len(self.loaded)} tensors loaded"]
        if self.reinitialised:
            heads = [k for k in self.reinitialised if k.startswith("head.")]
            others = [k for k in self.reinitialised if not k.startswith("head.")]
            if heads:
                why = " (the checkpoint has no class head)"
                if self.checkpoint_head is not None:
                    kind, classes = self.checkpoint_head
                    why = f" (checkpoint has {classes} classes, model {self.model_classes})"
                    if kind == "linear":
                        why = (f" (checkpoint has a linear head of {classes} classes, "
                               f"model a conv head of {self.model_classes})")
                parts.append(f"{', '.join(heads)} re-initialised{why}")
            if others:
                parts.append(f"{', '.join(others)} re-initialised (not in the checkpoint)")
        if self.pos_embed_resized is not None:
            (h0, w0), (h1, w1) = self.pos_embed_resized
            parts.append(f"pos_embed resized {h0}x{w0} -> {h1}x{w1}")
        if self.dropped:
            parts.append(f"dropped from the checkpoint: {', '.join(self.dropped)}")
        return f"pretrained {os.path.basename(self.source.rstrip('/')) or self.source}: " + "; ".join(parts)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapt a foreign state dict to ``model``'s names and shapes.

    The classifier head is kept only when its shape matches (a checkpoint of the same
    class count); otherwise it is dropped and stays freshly initialised.
    """
    return _filter(state_dict, model, PretrainedReport(source=""))


def _filter(state_dict: dict[str, torch.Tensor], model: nn.Module, report: PretrainedReport) -> dict[str, torch.Tensor]:
    """:func:`checkpoint_filter_fn`, noting in ``report`` what it drops and resizes."""
    state_dict = _unwrap(state_dict)
    if "mask_token" in state_dict or "register_tokens" in state_dict:
        state_dict = _convert_dinov2(state_dict)
    own = model.state_dict()
    _check_register_tokens(state_dict, model)
    head = state_dict.get("head.weight")
    conv_head = head is not None and head.ndim == 4  # official SAT: head is the conv itself
    out: dict[str, torch.Tensor] = {}
    # In name order: a safetensors file's tensor order varies between reads, and the first
    # tensor that does not fit is the one the error names.
    for key, value in sorted(state_dict.items()):
        key = SAT_RENAMES.get(key, key)
        if conv_head and key in ("head.weight", "head.bias"):
            key = key.replace("head.", "head.conv.")
        if key in ("head.weight", "head.conv.weight") and value.ndim in (2, 4):
            report.checkpoint_head = ("linear" if value.ndim == 2 else "conv", int(value.shape[0]))
        if key.startswith(DROPPED_PREFIXES) and key not in own:
            report.dropped.append(key)
            continue
        if key == "pos_embed":
            resized = _resize_pos_embed(value, model)
            if resized is not value:
                old = int(round((value.shape[1] - _embedded_prefix(model)) ** 0.5))
                report.pos_embed_resized = ((old, old), tuple(model.grid))
            value = resized
        elif key in ("spatial_token", "spatial_pos_embed") and value.ndim == 2:
            value = value.view(1, 1, -1)
        if key not in own:
            report.dropped.append(key)
            continue
        if key.startswith("head.") and own[key].shape != value.shape:
            continue  # another class count: keep the fresh head (reported as re-initialised)
        if own[key].shape != value.shape:
            raise ValueError(
                f"pretrained weight {key!r} has shape {tuple(value.shape)} but this model needs "
                f"{tuple(own[key].shape)}: use a checkpoint of the same backbone (width/depth)"
            )
        out[key] = value
    return out


def _unwrap(state_dict: dict) -> dict[str, torch.Tensor]:
    """The backbone's tensors under their plain names, from the wrappers releases use:
    ``model`` / ``state_dict`` / ``teacher`` (a DINOv2 training checkpoint), ``module.``
    (DDP) and ``backbone.`` prefixes, DINOv2's chunked blocks (``blocks.0.3.`` ->
    ``blocks.3.``) and DeiT III's ``gamma_1`` / ``gamma_2``."""
    for wrapper in ("model", "state_dict", "teacher"):
        inner = state_dict.get(wrapper)
        if isinstance(inner, dict):
            state_dict = inner
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.").removeprefix("backbone.")
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)
        key = re.sub(r"^(blocks\.\d+)\.gamma_([12])$", r"\1.ls\2.gamma", key)
        out[key] = value
    return out


def _convert_dinov2(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official DINOv2 release -> timm's layout (as timm's ``_convert_dinov2``).

    The masking token is for pre-training only. With registers, the official model adds
    the cls position to the cls token and gives the registers no position: timm keeps the
    position embedding for the patches only (``no_embed_class``) and folds the cls
    position into the cls token, which computes the same tokens.
    """
    out = {k: v for k, v in state_dict.items() if k != "mask_token"}
    if "register_tokens" in out:
        out["reg_token"] = out.pop("register_tokens")
        pos_embed = out.pop("pos_embed")
        out["cls_token"] = out.pop("cls_token") + pos_embed[:, :1]
        out["pos_embed"] = pos_embed[:, 1:]
    return out


def _check_register_tokens(state_dict: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Registers in the checkpoint but not in the model, or the other way: the wrong backbone."""
    if not any(k.startswith("blocks.") for k in state_dict):
        return  # no backbone here: load_pretrained_into says so
    theirs = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    ours = getattr(model, "num_reg_tokens", 0)
    if theirs != ours:
        raise ValueError(
            f"pretrained weight 'reg_token': the checkpoint has {theirs} register tokens but this "
            f"model has {ours}: use the backbone {'with' if theirs else 'without'} registers "
            f"(e.g. dinov2_small_patch14{'_reg4' if theirs else ''})"
        )


def _embedded_prefix(model: nn.Module) -> int:
    """Prefix tokens (cls, registers) that have a position embedding: none with ``no_embed_class``."""
    return 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens


def _resize_pos_embed(pos_embed: torch.Tensor, model: nn.Module) -> torch.Tensor:
    n_prefix = _embedded_prefix(model)
    target = model.pos_embed.shape[1]
    if pos_embed.shape[1] == target:
        return pos_embed
    old = int(round(max(pos_embed.shape[1] - n_prefix, 0) ** 0.5))
    if pos_embed.ndim != 3 or old * old + n_prefix != pos_embed.shape[1] or pos_embed.shape[2] != model.embed_dim:
        raise ValueError(
            f"pretrained weight 'pos_embed' has shape {tuple(pos_embed.shape)}, which is not "
            f"{n_prefix} prefix position(s) and a square grid of width {model.embed_dim} as this "
            f"model needs {tuple(model.pos_embed.shape)}: the checkpoint is of another backbone "
            f"(a position for the cls token or not, another width); use one of the same backbone"
        )
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


def load_pretrained_into(model: nn.Module, source: str) -> PretrainedReport:
    """Load ``source`` (a timm model name for the hub, or a path/URL) into ``model``.

    Returns what was loaded, re-initialised, dropped and resized, and logs its summary on
    the ``satloc.pretrained`` logger: INFO, or WARNING where a backbone tensor stayed fresh
    or a class head was dropped for another class count (a checkpoint of this task whose
    head does not fit).
    """
    if "/" not in source and "." not in source:
        state_dict = _timm_hub_weights(source)
    else:
        state_dict = read_state_dict(source)
    head = model.state_dict().get("head.conv.weight")
    report = PretrainedReport(source=source, model_classes=None if head is None else int(head.shape[0]))
    filtered = _filter(state_dict, model, report)
    if not any(k.startswith("blocks.") for k in filtered):
        raise ValueError(f"{source} holds no ViT backbone weights this model can use")
    result = model.load_state_dict(filtered, strict=False)
    report.loaded = sorted(filtered)
    report.reinitialised = list(result.missing_keys)
    report.dropped = sorted(report.dropped + list(result.unexpected_keys))  # a file's key order varies
    level = logging.WARNING if report.unexpected_fresh or report.conv_head_dropped else logging.INFO
    logger.log(level, report.summary())
    return report


def pretrained_report(model: nn.Module) -> PretrainedReport | None:
    """What ``create_model(..., pretrained=...)`` loaded into ``model`` (None without
    pretrained weights): print ``.summary()`` where the user reads the run's log."""
    return getattr(model, "pretrained_report", None)


def _timm_hub_weights(backbone: str) -> dict[str, torch.Tensor]:
    import timm

    try:
        return timm.create_model(backbone, pretrained=True).state_dict()
    except Exception as exc:
        raise ValueError(
            f"could not fetch timm's pretrained {backbone} weights ({type(exc).__name__}); "
            f"without a model hub, pass a local file of the same backbone: pretrained='/path/to/weights.pth'"
        ) from None
