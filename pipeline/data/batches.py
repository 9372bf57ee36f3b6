"""samples -> batches: one stage, shared by localize and training.

``batches(items, size)`` groups a stream into lists of ``size`` items, in order, the last
one shorter (or dropped with ``drop_last``). With ``counts``, only the items it accepts
count towards ``size`` and the others ride along in the batch they arrive in: localize
batches ``size`` decodable images and carries each bad sample with its neighbours, so its
error row lands in shard order.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def batches(
    items: Iterable[T], size: int, counts: Callable[[T], bool] | None = None, drop_last: bool = False
) -> Iterator[list[T]]:
    """Lists of ``size`` (counted) items from ``items``, lazily: nothing is read ahead."""
    if size < 1:
        raise ValueError(f"batch size must be >= 1, got {size}")
    batch: list[T] = []
    counted = 0
    for item in items:
        batch.append(item)
        counted += 1 if counts is None or counts(item) else 0
        if counted == size:
            yield batch
            batch, counted = [], 0
    if batch and not (drop_last and counted < size):
        yield batch
