"""Images -> model input tensors (DESIGN §5, §6).

Two evaluation frames, both bilinear with antialiasing (PIL's, which is what torchvision's
Resize does on PIL images) and both ignoring the aspect ratio:

* the default, Choe et al.'s frame (``resize_to_input``): the whole image resized straight
  to the square model input (``size`` x ``size``, no crop), so the map covers the whole
  image and boxes map back by scaling x by width/size and y by height/size. This is NOT
  the official SAT evaluator's frame;
* the official SAT test frame (``ResizeCrop``, ``--resize-crop 256,224``): resize to
  256 x 256, then centre crop 224 x 224 (torchvision's ``Resize((256, 256))`` +
  ``CenterCrop(224)``). The map then covers only the crop, which is the window
  ``[16 W/256, 240 W/256) x [16 H/256, 240 H/256)`` of a W x H original image
  (``ResizeCrop.window``); the edges of the image are never seen by the model.

Tensors stay uint8 (4x smaller to move between Ray actors) until ``normalize`` right
before the model, with the checkpoint's mean and std in 0..1 units.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ResizeCrop:
    """The official SAT test frame: square resize to ``resize``, then centre crop ``crop``."""

    resize: int = 256
    crop: int = 224

    def __post_init__(self) -> None:
        if self.crop < 1 or self.resize < self.crop:
            raise ValueError(
                f"--resize-crop {self.resize},{self.crop}: need RESIZE >= CROP >= 1 (the official frame is 256,224)"
            )

    @property
    def offset(self) -> int:
        """Left/top of the crop in the resized image, as torchvision's CenterCrop places it."""
        return int(round((self.resize - self.crop) / 2.0))

    def window(self, width: float, height: float) -> tuple[float, float, float, float]:
        """The crop's region of a ``width`` x ``height`` original image, in original pixels.

        ``(x0, y0, x1, y1)`` are pixel edges (x1, y1 exclusive): resized pixel u covers
        original x in [u W/R, (u+1) W/R), so the crop [o, o + C) covers
        [o W/R, (o + C) W/R), e.g. [16 W/256, 240 W/256) for the official frame.
        """
        sx, sy = width / self.resize, height / self.resize
        o, end = self.offset, self.offset + self.crop
        return o * sx, o * sy, end * sx, end * sy

    def to_input(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> uint8 tensor 3 x crop x crop: resize, then centre crop."""
        o = self.offset
        return resize_to_input(image, self.resize)[:, o : o + self.crop, o : o + self.crop].contiguous()

    def describe(self) -> str:
        return f"resize {self.resize}x{self.resize}, centre crop {self.crop}x{self.crop}"


def parse_resize_crop(text: str) -> ResizeCrop:
    """``"256,224"`` -> ResizeCrop(256, 224); ValueError naming ``--resize-crop`` otherwise."""
    parts = str(text).replace(" ", "").split(",")
    try:
        resize, crop = (int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"--resize-crop must be RESIZE,CROP in pixels, e.g. 256,224 (the official SAT frame), got {text!r}"
        ) from None
    return ResizeCrop(resize, crop)


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
    """Bx3xHxW uint8 -> float32 (x/255 - mean) / std, mean and std in 0..1 units.

    Runs on the batch's device: move the uint8 batch first (4x cheaper than float).
    """
    if batch.dtype != torch.uint8:
        raise ValueError(f"normalize expects a uint8 batch, got {batch.dtype}")
    if len(mean) != batch.shape[-3] or len(std) != batch.shape[-3]:
        raise ValueError(f"mean/std need {batch.shape[-3]} values, got {len(mean)} and {len(std)}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std values must be positive, got {tuple(std)}")
    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(-1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(-1, 1, 1) * 255.0
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
