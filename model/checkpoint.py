"""satloc checkpoints (DESIGN §4): one safetensors file, the model config as JSON metadata.

The config says everything needed to rebuild and use the model: ``model`` (a
``create_model`` name), ``num_classes``, ``model_kwargs`` (img_size, patch_size, ...),
``class_names``, ``mean``/``std`` normalisation, ``threshold`` and ``training`` info.
The file's sha256 is the model fingerprint the localize job writes next to every row.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from model.factory import create_model, split_name

CONFIG_KEY = "satloc_config"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REQUIRED = ("model", "num_classes")


def default_config(model_name: str, num_classes: int, **extra: Any) -> dict[str, Any]:
    """A complete config with the usual defaults; ``extra`` overrides any field."""
    method, _ = split_name(model_name)
    config = {
        "model": model_name,
        "method": method,
        "num_classes": num_classes,
        "model_kwargs": {},
        "class_names": None,
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
        "threshold": 0.4,
        "training": {},
    }
    config.update(extra)
    return config


def checkpoint_bytes(model: nn.Module, config: dict[str, Any]) -> bytes:
    """The serialised checkpoint (for object stores: one PUT of finished bytes)."""
    _validate_config(config, "the config passed to checkpoint_bytes")
    if config["num_classes"] != model.num_classes:
        raise ValueError(f"config says {config['num_classes']} classes but the model has {model.num_classes}")
    state = {k: v.detach().cpu().contiguous() for k, v in unwrap_model(model).state_dict().items()}
    return save_safetensors(state, metadata={CONFIG_KEY: json.dumps(config)})


def load_checkpoint_bytes(
    data: bytes, source: str = "<bytes>", expected_num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    config = read_config(data, source)
    if expected_num_classes is not None and expected_num_classes != config["num_classes"]:
        raise ValueError(
            f"checkpoint {source} has {config['num_classes']} classes but {expected_num_classes} "
            f"were expected: use a checkpoint trained on the same class list"
        )
    model = create_model(config["model"], config["num_classes"], **config.get("model_kwargs", {}))
    try:
        state = load_safetensors(data)
    except Exception as e:  # safetensors' SafetensorError names no file
        raise ValueError(f"{source}: not a readable safetensors file ({e}); copy or export it again") from None
    model.load_state_dict(state, strict=True)
    model.eval()
    config["sha256"] = fingerprint(data)
    return model, config


def read_config(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
    """The config stored in a checkpoint's metadata, without building the model."""
    if len(data) < 8:
        raise ValueError(f"{source} is not a satloc checkpoint (file too short)")
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8: 8 + header_len])
        config = json.loads(header["__metadata__"][CONFIG_KEY])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(
            f"{source} is not a satloc checkpoint (no safetensors header with '{CONFIG_KEY}' "
            f"metadata); foreign weights go through create_model(..., pretrained=URL)"
        ) from None
    _validate_config(config, source)
    return config


def _validate_config(config: dict[str, Any], source: str) -> None:
    missing = [k for k in REQUIRED if k not in config]
    if missing:
        raise ValueError(f"{source}: checkpoint config lacks {missing}")
    split_name(config["model"])
    names = config.get("class_names")
    if names is not None and len(names) != config["num_classes"]:
        raise ValueError(f"{source}: {len(names)} class names for {config['num_classes']} classes")


def check_weights(data: bytes, source: str = "<bytes>") -> dict[str, Any]:
    """The config, after checking without loading them that the weights are whole and fit it.

    ValueError naming ``source``: a file cut short (the header promises more bytes than there
    are), or tensors whose names or shapes differ from the model the config describes (e.g.
    5-class weights under a 10-class config). The model is built on the meta device: no memory.
    """
    import torch

    config = read_config(data, source)
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + header_len])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: tuple(int(d) for d in v["shape"]) for k, v in tensors.items()}
    except (KeyError, TypeError, ValueError, IndexError):
        raise ValueError(f"{source}: the safetensors header is malformed; export the checkpoint again") from None
    if len(data) < 8 + header_len + end:
        raise ValueError(
            f"{source} is truncated: {len(data):,} bytes, its header needs {8 + header_len + end:,}; "
            "the file was cut while copying or writing: copy or export it again"
        )
    with torch.device("meta"):
        model = create_model(config["model"], config["num_classes"], **config.get("model_kwargs", {}))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"{k}: missing" for k in expected if k not in shapes]
    problems += [f"{k}: not in the model" for k in shapes if k not in expected]
    problems += [
        f"{k}: shape {list(shapes[k])} in the file, {list(v)} for the config"
        for k, v in expected.items() if k in shapes and shapes[k] != v
    ]
    if problems:
        listed = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise ValueError(
            f"{source}: the weights do not match the checkpoint's config (model {config['model']}, "
            f"{config['num_classes']} classes): {listed}. Export weights and config together "
            "(the jobs' save_checkpoint)"
        )
    return config


def unwrap_model(model: nn.Module) -> nn.Module:
    """DDP / torch.compile wrappers hold the real module under ``module`` / ``_orig_mod``."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


def fingerprint(data: bytes) -> str:
    """The sha256 of a checkpoint's bytes: the model fingerprint next to every row."""
    return hashlib.sha256(data).hexdigest()


__all__ = [
    "check_weights", "checkpoint_bytes", "default_config", "fingerprint", "load_checkpoint_bytes", "read_config",
    "unwrap_model",
]
