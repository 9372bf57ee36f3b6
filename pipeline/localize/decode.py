"""Raw samples -> model inputs, two ways: per sample on the CPU, or JPEGs in batches on a device.

``prepare_sample`` is the CPU path (``--decode cpu``): PIL decodes one sample (JPEG drafted
near the input size, EXIF orientation, any mode to RGB; ``pipeline.data.reader``) and
resizes it (``pipeline.data.preprocess``). Every bad sample becomes its error row here.

``BatchDecoder`` is the batched path (``--decode gpu``, and ``auto`` on CUDA actors):

    raw samples -> route       a cheap header check per sample on the CPU (PIL's lazy open:
                               no pixel is decoded); anything the CPU path treats specially
                               is routed to ``prepare_sample``, with its reason
    eligible -> pixels         ``torchvision.io.decode_jpeg`` on the whole list at once, on
                               the decoder's device (nvJPEG on CUDA, libjpeg-turbo on CPU),
                               then an antialiased bilinear resize there (the same rule as
                               PIL's, ``resize_on_device``), ``--resize-crop`` included
    refused -> retried         a batch the batched call refuses is decoded again one sample
                               at a time on the device; a sample refused alone goes to
                               ``prepare_sample``, whose verdict (pixels or error row) stands

So error rows are exactly the CPU path's: only a JPEG whose header the CPU path would
decode plainly (baseline RGB or greyscale, no EXIF rotation, within PIL's pixel limit,
ending on its end-of-image marker, with a mask of the right size if it has one) is decoded
on the device, and every other sample, or any failure, is the CPU path's to judge. Width
and height are the header's, which is what the CPU path records for such a file.

The same code runs on ``device="cpu"`` (torchvision's CPU ``decode_jpeg``): that is how
the tests cover the batching and the fallbacks on machines without a GPU.
"""
from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from PIL import ExifTags, Image

from pipeline.data.preprocess import ResizeCrop, resize_to_input
from pipeline.data.reader import Sample, checked_mask, decode_sample

DECODE_CHOICES = ("auto", "cpu", "gpu")  # what the job's --decode takes
# What a worker runs: "cpu" (per sample, PIL) or "batched" (BatchDecoder on the actor's
# device). Workers also take "batched" itself, which runs on whatever device the actor has
# (tests and benchmarks on CPU); the job's "gpu" is "batched" on a CUDA actor.
WORKER_DECODES = DECODE_CHOICES + ("batched",)
JPEG_END = b"\xff\xd9"


def resolve_decode(requested: str, device: torch.device) -> str:
    """The decode path of an actor on ``device``: "cpu" or "batched".

    ``auto`` is batched on CUDA and cpu elsewhere; ``gpu`` on an actor without CUDA is a
    ValueError saying what to do.
    """
    if requested not in WORKER_DECODES:
        raise ValueError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, got {requested!r}")
    if requested == "gpu" and device.type != "cuda":
        raise ValueError(
            f"--decode gpu needs a CUDA device and this actor runs on {device.type} "
            "(no GPU given to it, or CUDA does not work on its node): use --decode auto or cpu"
        )
    if requested == "auto":
        return "batched" if device.type == "cuda" else "cpu"
    return "batched" if requested in ("gpu", "batched") else "cpu"


@dataclass
class Prepared:
    sample: Sample  # image dropped once resized
    pixels: torch.Tensor | None  # 3 x S x S uint8 (on the CPU, or on the device when batch-decoded), None for bad samples


def prepare_sample(sample: Sample, size: int, resize_crop: ResizeCrop | None = None) -> Prepared:
    """Decode (JPEG drafted near ``size``) and resize one raw sample on the CPU; thread-safe.

    With ``resize_crop`` the input is its centre crop (``size`` must be its crop size).
    """
    decoded = decode_sample(sample, draft_size=resize_crop.resize if resize_crop else size)
    if not decoded.ok:
        return Prepared(replace(decoded, image=None, mask=None), None)
    try:
        pixels = resize_crop.to_input(decoded.image) if resize_crop else resize_to_input(decoded.image, size)
    except Exception as e:  # a decoded image PIL cannot resize is still one bad sample
        return Prepared(replace(decoded, image=None, mask=None, error=f"unusable image: {e}"), None)
    return Prepared(replace(decoded, image=None, mask=None), pixels)


def resize_on_device(image: torch.Tensor, side: int) -> torch.Tensor:
    """3 x H x W uint8 -> 3 x side x side uint8, bilinear with antialiasing, on the image's device.

    On the CPU torch's uint8 kernel is PIL's own algorithm (within 1 level of
    ``resize_to_input``, almost always equal); elsewhere the resize runs in float32 and is
    rounded (within 1 level, about 0.15 on average).
    """
    if image.shape[-2:] == (side, side):
        return image
    x = image[None]
    if image.device.type != "cpu":
        x = x.float()
    out = F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    return out if out.dtype == torch.uint8 else out.round_().clamp_(0, 255).to(torch.uint8)


def cpu_reason(sample: Sample) -> str | None:
    """Why ``sample`` must take the CPU path, or None when its JPEG can be batch-decoded."""
    return jpeg_header(sample)[0]


def jpeg_header(sample: Sample) -> tuple[str | None, int, int]:
    """(why the CPU path must decode it, or None; width; height) from the header alone.

    PIL opens lazily, so no pixel is decoded; any exception is a reason (the CPU path then
    gives the sample its error row, e.g. PIL's decompression-bomb error).
    """
    data = sample.image_bytes
    if sample.error is not None or data is None:
        return "no image to decode", 0, 0
    if not data.startswith(b"\xff\xd8"):
        return "not a JPEG", 0, 0
    if not data.endswith(JPEG_END):
        return "no JPEG end-of-image marker (truncated?)", 0, 0
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if image.format != "JPEG":
            return f"format {image.format}", 0, 0
        if image.mode not in ("RGB", "L"):
            return f"mode {image.mode}", 0, 0
        if "exif" in image.info and image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            return "EXIF orientation", 0, 0
    except Exception as e:
        return f"header: {type(e).__name__}", 0, 0
    if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
        return "over PIL's pixel limit", 0, 0
    if sample.mask_bytes is not None and checked_mask(sample.mask_bytes, width, height)[1] is not None:
        return "mask", 0, 0
    return None, width, height


class BatchDecoder:
    """JPEGs of a chunk decoded together on ``device``; the rest per sample on the CPU.

    ``decode_chunk`` runs in one thread (the device's); CPU work goes to ``cpu_submit``
    (the actor's decode pool), so a chunk of PNGs still decodes in parallel.
    """

    def __init__(self, size: int, device: torch.device | str, resize_crop: ResizeCrop | None = None) -> None:
        self.size = size
        self.device = torch.device(device)
        self.resize_crop = resize_crop
        self.counts = {"batched": 0, "retried alone": 0, "cpu": 0}  # samples, for logs and tests

    def fallback(self, sample: Sample) -> Prepared:
        return prepare_sample(sample, self.size, self.resize_crop)

    def decode_chunk(
        self, samples: Sequence[Sample], cpu_submit: Callable[..., Future]
    ) -> list[Prepared | Future]:
        """One chunk -> its samples in order, each a ``Prepared`` or a Future of one (CPU path)."""
        out: list[Prepared | Future | None] = [None] * len(samples)
        eligible: list[int] = []
        sizes: dict[int, tuple[int, int]] = {}
        for i, sample in enumerate(samples):
            reason, width, height = jpeg_header(sample)
            if reason is None:
                eligible.append(i)
                sizes[i] = (width, height)
            else:
                out[i] = cpu_submit(self.fallback, sample)
                self.counts["cpu"] += 1
        for i, pixels in zip(eligible, self.decode_jpegs([samples[i].image_bytes for i in eligible])):
            if pixels is None:  # refused on the device: the CPU path judges it
                out[i] = cpu_submit(self.fallback, samples[i])
                self.counts["cpu"] += 1
            else:
                out[i] = self.finish(samples[i], pixels, *sizes[i])
        return out  # type: ignore[return-value]

    def decode_jpegs(self, blobs: Sequence[bytes]) -> list[torch.Tensor | None]:
        """Model inputs (3 x S x S uint8 on the device) for JPEG ``blobs``; None where refused."""
        if not blobs:
            return []
        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            images = self._decode(tensors)
            self.counts["batched"] += len(blobs)
        except Exception:  # one bad file fails the whole call: try each alone
            images = []
            for t in tensors:
                try:
                    images.append(self._decode([t])[0])
                    self.counts["retried alone"] += 1
                except Exception:
                    images.append(None)
        return [None if im is None else self.to_input(im) for im in images]

    def _decode(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device)

    def to_input(self, image: torch.Tensor) -> torch.Tensor:
        """A decoded 3 x H x W image -> the model input, in the run's frame."""
        frame = self.resize_crop
        if frame is None:
            return resize_on_device(image, self.size)
        o = frame.offset
        return resize_on_device(image, frame.resize)[:, o : o + frame.crop, o : o + frame.crop].contiguous()

    @staticmethod
    def finish(sample: Sample, pixels: torch.Tensor, width: int, height: int) -> Prepared:
        """The sample as the CPU path leaves it: original size, no bytes, no image."""
        return Prepared(replace(sample, image_bytes=None, mask_bytes=None, width=width, height=height), pixels)
