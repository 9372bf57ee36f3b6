"""pipeline/data/batches.py: samples -> batches."""
from __future__ import annotations

import itertools

import pytest

from pipeline.data.batches import batches


def test_fixed_size_batches_in_order_with_a_short_last_one():
    assert list(batches(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batches(range(6), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(batches(range(7), 3, drop_last=True)) == [[0, 1, 2], [3, 4, 5]]
    assert list(batches([], 3)) == []


def test_uncounted_items_ride_along_in_the_batch_they_arrive_in():
    items = ["a", "x", "b", "c", "y", "d", "z"]  # x, y, z: bad samples
    def good(s):
        return s not in "xyz"

    assert list(batches(items, 2, counts=good)) == [["a", "x", "b"], ["c", "y", "d"], ["z"]]
    assert list(batches(["x", "y"], 2, counts=good)) == [["x", "y"]]  # only bad samples: still one batch
    # drop_last drops a batch short of counted items, bad riders included
    assert list(batches(items, 2, counts=good, drop_last=True)) == [["a", "x", "b"], ["c", "y", "d"]]


def test_lazy_reads_no_further_than_the_batch_asked_for():
    seen = []

    def stream():
        for i in itertools.count():
            seen.append(i)
            yield i

    assert list(itertools.islice(batches(stream(), 4), 2)) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert seen == list(range(8))


def test_bad_size_is_refused():
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        next(batches(range(3), 0))
