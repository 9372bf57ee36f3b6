"""Images -> model input tensors (DESIGN §5, §6).

Evaluation rule: like the official SAT evaluator, every image is resized straight to the
square model input (``size`` x ``size``, aspect ratio not kept, no crop), bilinear with
antialiasing (PIL's, which is what torchvision's Resize does on PIL images). Boxes found
on the input grid then map back to the original image by scaling x by width/size and y
by height/size.

Tensors stay uint8 (4x smaller to move between Ray actors) until ``normalize`` right
before the model, with the checkpoint's mean and std in 0..1 units.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    if image.mode != "RGB":
        image = image.convert("RGB")
    # HWC -> CHW in numpy: torch's permute().contiguous() on uint8 is ~100x slower here.
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


def resize_to_input(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor 3 x size x size (the evaluation rule above)."""
    if size <= 0:
        raise ValueError(f"input size must be positive, got {size}")
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    return _to_tensor(image)


def stack_uint8(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """List of 3xSxS uint8 tensors -> Bx3xSxS uint8."""
    if not tensors:
        raise ValueError("cannot stack an empty list of images")
    first = tensors[0].shape
    for i, t in enumerate(tensors):
        if t.dtype != torch.uint8 or t.shape != first:
            raise ValueError(
                f"image {i} is {tuple(t.shape)} {t.dtype}, expected {tuple(first)} torch.uint8 "
                "(resize every image with resize_to_input first)"
            )
    return torch.stack(list(tensors))


def normalize(batch: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Bx3xHxW uint8 -> float32 (x/255 - mean) / std, mean and std in 0..1 units."""
    if batch.dtype != torch.uint8:
        raise ValueError(f"normalize expects a uint8 batch, got {batch.dtype}")
    if len(mean) != batch.shape[-3] or len(std) != batch.shape[-3]:
        raise ValueError(f"mean/std need {batch.shape[-3]} values, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1) * 255.0
    return (batch.to(torch.float32) - m) / s


def train_resize_size(size: int) -> int:
    """Side of the square resize before the random crop: 256 for a 224 input (DESIGN §5)."""
    return int(round(size * 256 / 224))


def _randint(rng: torch.Generator | random.Random, high: int) -> int:
    """Uniform integer in [0, high]."""
    if isinstance(rng, random.Random):
        return rng.randint(0, high)
    return int(torch.randint(0, high + 1, (1,), generator=rng).item())


def _coin(rng: torch.Generator | random.Random) -> bool:
    if isinstance(rng, random.Random):
        return rng.random() < 0.5
    return bool(torch.rand((), generator=rng).item() < 0.5)


def train_transform(image: Image.Image, size: int, rng: torch.Generator | random.Random) -> torch.Tensor:
    """The official training augmentation: square resize to size*256/224, random crop
    ``size``, horizontal flip with p=0.5. Deterministic given ``rng``."""
    if not isinstance(rng, (torch.Generator, random.Random)):
        raise TypeError(f"rng must be a torch.Generator or random.Random, got {type(rng).__name__}")
    big = train_resize_size(size)
    tensor = resize_to_input(image, big)
    top, left = _randint(rng, big - size), _randint(rng, big - size)
    tensor = tensor[:, top : top + size, left : left + size]
    if _coin(rng):
        tensor = tensor.flip(-1)
    return tensor.contiguous()
