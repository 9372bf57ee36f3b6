"""A bounded hand-off from one producer thread to one consumer, errors carried across.

Three places read ahead in a background thread (shard bytes in ``pipeline.data.reader``,
decoded samples in ``pipeline.localize.worker``, training batches in
``pipeline.train.data``); they share this one queue discipline:

- the producer ``put``s items, waiting while the queue is full, and gives up (``put``
  returns False) once the consumer has closed the hand-off, so it never blocks forever;
- the producer ends with ``finish()``, or ``fail(error)`` to have the consumer raise it;
- the consumer takes items with ``get()`` or iterates ``items()``, and calls ``close()``
  when it stops early (which also frees a producer blocked on a full queue).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

_POLL_SECONDS = 0.1


class _End:
    """The producer finished."""


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Finished(Exception):
    """``get()`` after the producer finished."""


class Handoff:
    def __init__(self, depth: int) -> None:
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._closed = threading.Event()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # --- producer side ----------------------------------------------------------------

    def put(self, item: Any) -> bool:
        """Queue ``item``; False (and nothing queued) once the consumer has closed."""
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return True
            except queue.Full:
                continue
        return False

    def finish(self) -> None:
        self.put(_End())

    def fail(self, error: BaseException) -> None:
        self.put(_Failure(error))

    # --- consumer side ----------------------------------------------------------------

    def get(self) -> Any:
        """The next item; raises the producer's error, or ``Finished`` after its end."""
        item = self._queue.get()
        if isinstance(item, _End):
            raise Finished
        if isinstance(item, _Failure):
            raise item.error
        return item

    def items(self) -> Iterator[Any]:
        while True:
            try:
                yield self.get()
            except Finished:
                return

    def close(self, producer: threading.Thread | None = None, timeout: float | None = None) -> None:
        """Stop the producer (its pending ``put`` returns False within 0.1 s); with
        ``producer``, wait for that thread to end (at most ``timeout`` seconds)."""
        self._closed.set()
        if producer is not None:
            producer.join(timeout=timeout)
