"""satloc checkpoints at a URL: the file format is model/checkpoint.py's, the bytes go
through pipeline.data.storage (any fsspec URL; S3 endpoints from the AWS variables; a
write is atomic, so a half-written checkpoint is never read)."""
from __future__ import annotations

from typing import Any

from torch import nn

from model.checkpoint import checkpoint_bytes, fingerprint, load_checkpoint_bytes
from pipeline.data.storage import read_bytes, write_bytes_atomic


def save_checkpoint(model: nn.Module, url: str, config: dict[str, Any]) -> str:
    """Write the checkpoint to ``url`` atomically; returns its sha256."""
    data = checkpoint_bytes(model, config)
    write_bytes_atomic(url, data)
    return fingerprint(data)


def load_checkpoint(url: str, expected_num_classes: int | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint URL. ``config['sha256']`` is the file's fingerprint."""
    try:
        data = read_bytes(url)
    except FileNotFoundError:
        raise ValueError(f"checkpoint {url} does not exist: check the --checkpoint URL") from None
    return load_checkpoint_bytes(data, url, expected_num_classes)
