"""pipeline/data/handoff.py: items arrive in order, errors cross threads, close frees the producer."""
from __future__ import annotations

import threading

import pytest

from pipeline.data.handoff import Finished, Handoff


def _produce(handoff: Handoff, items, error: BaseException | None = None, sent: list | None = None):
    def run() -> None:
        for item in items:
            if not handoff.put(item):
                return
            if sent is not None:
                sent.append(item)
        handoff.fail(error) if error else handoff.finish()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_items_in_order_then_finished():
    handoff = Handoff(2)
    thread = _produce(handoff, range(10))
    assert list(handoff.items()) == list(range(10))
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_producer_error_is_raised_by_the_consumer_after_the_items_before_it():
    handoff = Handoff(3)
    _produce(handoff, ["a", "b"], error=OSError("network down reading s3://b/x.tar"))
    got = []
    with pytest.raises(OSError, match="network down"):
        for item in handoff.items():
            got.append(item)
    assert got == ["a", "b"]


def test_close_frees_a_producer_blocked_on_a_full_queue():
    handoff = Handoff(1)
    sent: list = []
    thread = _produce(handoff, range(1000), sent=sent)
    assert handoff.get() == 0
    handoff.close(thread, timeout=5)
    assert not thread.is_alive()
    assert handoff.closed and len(sent) < 5  # it stopped instead of producing the rest
    assert not handoff.put("late")


def test_get_after_finish_raises_finished():
    handoff = Handoff(1)
    handoff.finish()
    with pytest.raises(Finished):
        handoff.get()
