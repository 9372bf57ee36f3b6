"""Small shards built by hand, for reader and shard tests (kept tiny: a few KB each)."""
from __future__ import annotations

import io
import json
import tarfile

import numpy as np
from PIL import Image


def image_bytes(width=8, height=6, color=(200, 30, 40), fmt="JPEG", mode="RGB", **save) -> bytes:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:] = color
    arr[0, 0] = (0, 255, 0)  # a marker pixel, so orientation is testable
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def mask_bytes(width=8, height=6) -> bytes:
    arr = np.zeros((height, width), np.uint8)
    arr[1:4, 2:6] = 255
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, format="PNG")
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def good_sample(key: str, label: int = 1, fmt: str = "JPEG", ext: str = "jpg") -> list[tuple[str, bytes]]:
    meta = {"label": label, "class_name": f"class{label}", "width": 8, "height": 6, "boxes": [[2, 1, 6, 4]]}
    return [
        (f"{key}.cls", str(label).encode()),
        (f"{key}.{ext}", image_bytes(fmt=fmt)),
        (f"{key}.json", json.dumps(meta).encode()),
        (f"{key}.mask.png", mask_bytes()),
    ]
