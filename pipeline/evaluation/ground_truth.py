"""Ground truth for evaluation, read from the source shards (DESIGN §2).

The Parquet rows carry ``gt_label``/``gt_boxes`` when the localize job saw them, but never
the foreground masks PxAP needs: those stay in the shards as ``.mask.png`` members. This
reads only the small members (``.cls``, ``.json``, ``.mask.png``); images are never decoded.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from pipeline.data.reader import decode_mask, read_samples
from pipeline.data.shards import expand_shards
from pipeline.results.run_dir import shard_stem


@dataclass
class GroundTruth:
    key: str
    shard: str
    label: int | None
    class_name: str | None
    boxes: list[list[float]] | None  # [x0, y0, x1, y1] in original pixels
    mask: np.ndarray | None  # uint8 HxW 0/255 at the original size, or bool at ``mask_size``
    mask_shape: tuple[int, int] | None  # the mask's original (height, width)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A 0/255 mask -> bool (height, width) = ``size``, nearest neighbour (pixel centres)."""
    rows = np.minimum(((np.arange(size[0]) + 0.5) * mask.shape[0] / size[0]).astype(int), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * mask.shape[1] / size[1]).astype(int), mask.shape[1] - 1)
    return np.asarray(mask)[np.ix_(rows, cols)] > 127


def read_ground_truth(
    spec: str, keys: Iterable[str] | None = None, mask_size: tuple[int, int] | None = None
) -> dict[str, GroundTruth]:
    """Ground truth by sample key from the shards named by ``spec``.

    ``keys`` limits what is kept (masks are decoded only for these). ``mask_size``
    resizes masks as they are read, so a large set's masks never sit in memory at full
    size. Bad samples are skipped (their rows are error rows anyway). A key found in two
    shards is an error: the join with the predictions would be ambiguous.
    """
    found: dict[str, GroundTruth] = {}
    for gt in _ground_truth(spec, keys, mask_size):
        if gt.key in found:
            raise ValueError(
                f"--gt-shards {spec!r}: key {gt.key!r} is in both {found[gt.key].shard} and "
                f"{gt.shard}; ground truth must have unique keys (point --gt-shards at one split)"
            )
        found[gt.key] = gt
    return found


def read_ground_truth_by_shard(
    spec: str, keys: Iterable[str] | None = None, mask_size: tuple[int, int] | None = None
) -> dict[tuple[str, str], GroundTruth]:
    """Ground truth by (shard stem, key): how evaluate joins it to the rows, whose ``shard``
    names the shard each row came from. The same key may be in several shards (data sets
    number their samples per shard); the same (stem, key) twice is an error (ambiguous)."""
    found: dict[tuple[str, str], GroundTruth] = {}
    for gt in _ground_truth(spec, keys, mask_size):
        pair = (shard_stem(gt.shard), gt.key)
        if pair in found:
            raise ValueError(
                f"--gt-shards {spec!r}: key {gt.key!r} is twice in shards named {pair[0]} "
                f"({found[pair].shard} and {gt.shard}); the join on (shard, key) would be ambiguous: "
                "point --gt-shards at the shards the run localized"
            )
        found[pair] = gt
    return found


def _ground_truth(spec: str, keys: Iterable[str] | None, mask_size: tuple[int, int] | None):
    wanted = set(keys) if keys is not None else None
    for url in expand_shards(spec):
        for sample in read_samples(url, decode=False):
            if sample.error is not None or (wanted is not None and sample.key not in wanted):
                continue
            mask, mask_shape = None, None
            if sample.mask_bytes is not None:
                try:
                    mask = decode_mask(sample.mask_bytes)
                except Exception as e:  # PIL raises many types for bad data
                    raise ValueError(f"shard {url}: undecodable .mask.png of key {sample.key!r}: {e}") from None
                mask_shape = mask.shape
                if mask_size is not None:
                    mask = resize_mask(mask, mask_size)
            yield GroundTruth(
                key=sample.key,
                shard=url,
                label=sample.label,
                class_name=sample.class_name,
                boxes=sample.gt_boxes,
                mask=mask,
                mask_shape=mask_shape,
            )
