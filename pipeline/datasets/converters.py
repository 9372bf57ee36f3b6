"""Image collections -> WebDataset shards (DESIGN §2).

Three layouts: an image folder with one subfolder per class, CUB-200-2011 (boxes, and
masks from its segmentations), and ImageNet (class folders; PASCAL-VOC XML boxes). Images
are copied byte for byte (no re-encoding); each sample gets ``.cls`` (label) and ``.json``
(label, class_name, width, height, boxes when known). Samples are shuffled with a fixed
seed (shards of one class each would make poor training streams), ``classes.txt`` (one
class name a line, in label order) is written beside the shards, and sources and outputs
may be any fsspec URL.
"""
from __future__ import annotations

import io
import json
import random
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

from pipeline.data.reader import IMAGE_EXTENSIONS
from pipeline.datasets.webdataset_writer import ShardWriter
from pipeline.data.storage import join_url, url_to_fs, write_bytes_atomic


@dataclass
class SourceImage:
    """One image to convert, before its bytes are read."""

    key: str
    image_url: str
    label: int
    class_name: str
    boxes: list[list[float]] | None = None
    mask_url: str | None = None
    extra: dict = field(default_factory=dict)


def _is_image(path: str) -> bool:
    return path.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS


def _safe_key(text: str) -> str:
    """A WebDataset key: no dots (they separate key and extension), no odd characters."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text)


def _url(base: str, fs_path: str, fs_root: str) -> str:
    """A listed path as a URL in the form the user gave ``base`` in."""
    return join_url(base, fs_path[len(fs_root) :].lstrip("/"))


def _image_size(data: bytes) -> tuple[int, int]:
    """Width and height from the header only (no full decode)."""
    return Image.open(io.BytesIO(data)).size


def _binary_mask_png(data: bytes) -> bytes:
    """Any grey mask (CUB's are soft) -> L-mode PNG with 0/255 at the 0.5 level."""
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    buf = io.BytesIO()
    Image.fromarray(np.where(arr >= 128, 255, 0).astype(np.uint8), "L").save(buf, format="PNG")
    return buf.getvalue()


def write_samples(
    sources: Iterable[SourceImage],
    out_url: str,
    prefix: str,
    shard_size: int = 1000,
    max_bytes: int = 1 << 30,
    shuffle_seed: int | None = 0,
) -> list[str]:
    """Read each source's bytes and write them as shards ``{prefix}-NNNNNN.tar``."""
    sources = list(sources)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(sources)
    keys = [s.key for s in sources]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"two source images map to the same sample key {dup!r}; rename one of them")
    with ShardWriter(out_url, prefix=prefix, max_count=shard_size, max_bytes=max_bytes) as writer:
        for src in sources:
            fs, path = url_to_fs(src.image_url)
            data = fs.cat_file(path)
            ext = src.image_url.rsplit(".", 1)[-1].lower()
            try:
                width, height = _image_size(data)
            except Exception:  # kept as is: the reader reports it as an error row
                width = height = 0
                print(f"warning: {src.image_url} is not a readable image", file=sys.stderr)
            meta = {"label": src.label, "class_name": src.class_name, "width": width, "height": height}
            if src.boxes is not None:
                meta["boxes"] = src.boxes
            meta.update(src.extra)
            members = {ext: data, "cls": str(src.label).encode(), "json": json.dumps(meta).encode()}
            if src.mask_url is not None:
                mfs, mpath = url_to_fs(src.mask_url)
                members["mask.png"] = _binary_mask_png(mfs.cat_file(mpath))
            writer.write(src.key, members)
    print(f"{prefix}: {writer.total_samples} samples in {len(writer.urls)} shards", flush=True)
    return writer.urls


def write_class_list(out_url: str, names: list[str]) -> None:
    write_bytes_atomic(join_url(out_url, "classes.txt"), ("\n".join(names) + "\n").encode())


def _class_dirs(fs, root: str) -> list[str]:
    dirs = sorted(p for p in fs.ls(root, detail=False) if fs.isdir(p))
    if not dirs:
        raise ValueError(f"{root} has no class subfolders (expected one folder of images per class)")
    return dirs


def imagefolder_sources(src: str, class_names: list[str] | None = None) -> tuple[list[SourceImage], list[str]]:
    """Sources from ``src/<class>/**/<image>``; labels follow sorted folder names
    (or ``class_names`` order, e.g. the ImageNet wnid list)."""
    fs, root = url_to_fs(src)
    root = root.rstrip("/")
    if not fs.isdir(root):
        raise ValueError(f"image folder {src} does not exist or is not a directory")
    dirs = {PurePosixPath(d).name: d for d in _class_dirs(fs, root)}
    names = class_names or sorted(dirs)
    missing = [n for n in names if n not in dirs]
    if class_names and missing:
        raise ValueError(f"{src}: class folders missing for {missing[:5]} (of {len(missing)})")
    sources = []
    for label, name in enumerate(names):
        for path in sorted(p for p in fs.find(dirs[name]) if _is_image(p)):
            stem = PurePosixPath(path).name.rsplit(".", 1)[0]
            sources.append(SourceImage(f"{_safe_key(name)}/{_safe_key(stem)}", _url(src, path, root), label, name))
    if not sources:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {src}")
    return sources, names


def convert_imagefolder(
    src: str, out: str, prefix: str = "train", shard_size: int = 1000, max_bytes: int = 1 << 30
) -> list[str]:
    sources, names = imagefolder_sources(src)
    write_class_list(out, names)
    return write_samples(sources, out, prefix, shard_size, max_bytes)


def _read_table(url: str) -> dict[int, list[str]]:
    """CUB's 'id value...' text files -> {id: [values]}."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise ValueError(f"CUB file {url} is missing: is --src the CUB_200_2011 folder?")
    rows = {}
    for line in fs.cat_file(path).decode().splitlines():
        parts = line.split()
        if parts:
            rows[int(parts[0])] = parts[1:]
    return rows


def cub_sources(src: str, segmentations: str | None = None) -> dict[str, list[SourceImage]]:
    """{'train': [...], 'test': [...]} from the CUB-200-2011 metadata files.

    CUB boxes are (x, y, width, height) in pixels; they become [x, y, x+w, y+h].
    """
    images = _read_table(join_url(src, "images.txt"))
    labels = _read_table(join_url(src, "image_class_labels.txt"))
    boxes = _read_table(join_url(src, "bounding_boxes.txt"))
    is_train = _read_table(join_url(src, "train_test_split.txt"))
    classes = _read_table(join_url(src, "classes.txt"))
    # '001.Black_footed_Albatross' -> 'Black_footed_Albatross'
    names = {cid: re.sub(r"^\d+\.", "", v[0]) for cid, v in classes.items()}
    out: dict[str, list[SourceImage]] = {"train": [], "test": []}
    for image_id, (rel_path,) in sorted(images.items()):
        class_id = int(labels[image_id][0])
        x, y, w, h = (float(v) for v in boxes[image_id])
        stem = PurePosixPath(rel_path).name.rsplit(".", 1)[0]
        mask_url = None
        if segmentations:
            mask_url = join_url(segmentations, rel_path.rsplit(".", 1)[0] + ".png")
        out["train" if is_train[image_id][0] == "1" else "test"].append(
            SourceImage(
                key=_safe_key(stem),
                image_url=join_url(src, "images", rel_path),
                label=class_id - 1,
                class_name=names[class_id],
                boxes=[[x, y, x + w, y + h]],
                mask_url=mask_url,
                extra={"image_id": image_id},
            )
        )
    return out


def convert_cub(
    src: str,
    out: str,
    split: str | None = None,
    segmentations: str | None = None,
    shard_size: int = 1000,
    max_bytes: int = 1 << 30,
) -> list[str]:
    by_split = cub_sources(src, segmentations)
    classes = _read_table(join_url(src, "classes.txt"))
    write_class_list(out, [re.sub(r"^\d+\.", "", classes[c][0]) for c in sorted(classes)])
    urls = []
    for name in [split] if split else ["train", "test"]:
        urls += write_samples(by_split[name], out, name, shard_size, max_bytes)
    return urls


def parse_voc_xml(data: bytes) -> tuple[list[tuple[str, list[float]]], tuple[int, int] | None]:
    """PASCAL-VOC annotation -> ([(object name, [xmin, ymin, xmax, ymax])], (width, height))."""
    root = ET.fromstring(data)
    size = root.find("size")
    wh = None
    if size is not None and size.findtext("width"):
        wh = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    objects = []
    for obj in root.iter("object"):
        box = obj.find("bndbox")
        if box is None:
            continue
        coords = [float(box.findtext(t)) for t in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((obj.findtext("name", "").strip(), coords))
    return objects, wh


def _voc_boxes(fs, xml_path: str, wnid: str | None) -> tuple[list[list[float]] | None, str | None]:
    """Boxes of ``wnid`` (all objects if None) and the first object's name, or (None, None)."""
    if not fs.exists(xml_path):
        return None, None
    objects, _ = parse_voc_xml(fs.cat_file(xml_path))
    if not objects:
        return None, None
    first = objects[0][0]
    want = wnid or first
    return [c for n, c in objects if n == want] or None, first


def imagenet_sources(
    src: str, split: str, boxes: str | None = None, class_index: str | None = None
) -> tuple[list[SourceImage], list[str]]:
    """ImageNet ``src/train/<wnid>/*.JPEG`` or ``src/val`` (class folders, or flat with the
    label read from each image's XML). Boxes from ``boxes/<stem>.xml`` (default
    ``src/bbox/<split>``, searched also under ``<wnid>/``); VOC coordinates are kept."""
    if split not in ("train", "val"):
        raise ValueError(f"ImageNet split must be 'train' or 'val', got {split!r}")
    fs, root = url_to_fs(join_url(src, split))
    if not fs.isdir(root):
        raise ValueError(f"{join_url(src, split)} does not exist: is --src the ImageNet folder?")
    box_url = boxes or join_url(src, "bbox", split)
    bfs, broot = url_to_fs(box_url)
    wnids = None
    if class_index:
        ifs, ipath = url_to_fs(class_index)
        wnids = [ln.split()[0] for ln in ifs.cat_file(ipath).decode().splitlines() if ln.strip()]
    has_class_dirs = any(fs.isdir(p) for p in fs.ls(root, detail=False))
    if has_class_dirs:
        sources, names = imagefolder_sources(join_url(src, split), wnids)
    else:
        names = wnids or []
        sources = []
        for path in sorted(p for p in fs.ls(root, detail=False) if _is_image(p)):
            stem = PurePosixPath(path).name.rsplit(".", 1)[0]
            sources.append(SourceImage(_safe_key(stem), _url(join_url(src, split), path, root), -1, ""))
    index = {n: i for i, n in enumerate(names)}
    result = []
    for s in sources:
        stem = s.image_url.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        wnid = s.class_name or None
        found, first = None, None
        for xml in (f"{broot.rstrip('/')}/{stem}.xml", f"{broot.rstrip('/')}/{wnid}/{stem}.xml"):
            found, first = _voc_boxes(bfs, xml, wnid)
            if first is not None:
                break
        if wnid is None:  # flat val folder: the XML names the class
            if first is None:
                raise ValueError(f"no class for {s.image_url}: no folder and no XML in {box_url}")
            wnid = first
            if wnid not in index:
                if wnids:
                    raise ValueError(f"{s.image_url}: class {wnid} is not in {class_index}")
                index[wnid] = -1  # numbered after the scan, in sorted order
        s.class_name, s.boxes = wnid, found
        result.append(s)
    if any(v == -1 for v in index.values()):
        names = sorted(index)
        index = {n: i for i, n in enumerate(names)}
    for s in result:
        s.label = index[s.class_name]
    return result, names


def convert_imagenet(
    src: str,
    out: str,
    split: str,
    boxes: str | None = None,
    class_index: str | None = None,
    shard_size: int = 1000,
    max_bytes: int = 1 << 30,
) -> list[str]:
    sources, names = imagenet_sources(src, split, boxes, class_index)
    write_class_list(out, names)
    return write_samples(sources, out, split, shard_size, max_bytes)
