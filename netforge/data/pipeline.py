"""The prefetch pipeline: batches built ahead of the net by a background thread.

A *source* builds batches one after another (``next_batch``) and can save and restore its
position (``get_state``/``set_state``, JSON-serialisable dicts: cursor, epoch, shuffle order,
random generator state). A ``Prefetcher`` runs one source in a producer thread and keeps up
to ``depth`` finished batches in a bounded queue, as Caffe's BasePrefetchingDataLayer does
with its ``prefetch`` batches.

Determinism: only the producer thread calls the source, so records are read and random
numbers drawn in one fixed order; image decoding fans out to a thread pool whose results
are collected in submission order (Pillow releases the GIL while decoding). Each queued
batch carries the source state *after* it, so ``state()`` is the position after the last
batch the net consumed, however far the producer has run ahead: restoring it replays
exactly the batches an uninterrupted run would have read next.
"""

from __future__ import annotations

import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def decode_map(function: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[function(x) for x in items]`` on the shared decoding pool, results in order."""
    global _pool
    items = list(items)
    if len(items) < 2:
        return [function(x) for x in items]
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=max(2, os.cpu_count() or 1), thread_name_prefix="netforge-decode"
            )
    return list(_pool.map(function, items))


class Source(Protocol):
    """What a Prefetcher runs: a resumable producer of batches (one numpy array per top)."""

    def next_batch(self) -> list[Any]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


class Prefetcher:
    """Runs ``source.next_batch`` in a daemon thread, ``depth`` batches ahead.

    ``wait_seconds`` adds up the time ``next()`` spent blocked waiting for a batch: the
    share of training time the net waited for data. The thread starts on the first
    ``next()``, so a ``restore`` right after construction costs nothing.
    """

    def __init__(self, source: Source, depth: int, name: str) -> None:
        self.source = source
        self.depth = max(1, int(depth))
        self.name = name
        self.wait_seconds = 0.0
        self._consumed_state = source.get_state()
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- consumer side -------------------------------------------------------------------
    def next(self) -> list[Any]:
        """The next batch, in the order the source produced them."""
        if self._thread is None:
            self._start()
        start = time.perf_counter()
        item = self._queue.get()
        self.wait_seconds += time.perf_counter() - start
        if isinstance(item, BaseException):
            self._thread = None
            raise item
        batch, self._consumed_state = item
        return batch

    def state(self) -> dict:
        """The source's state after the last batch returned by ``next()``."""
        return self._consumed_state

    def restore(self, state: dict) -> None:
        """Continue from ``state`` (as returned by ``state()``), dropping queued batches."""
        self.close()
        self.source.set_state(state)
        self._consumed_state = self.source.get_state()

    def close(self) -> None:
        """Stop the producer thread and drop what it prepared."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:  # unblock a producer waiting for room in the queue
                self._queue.get(timeout=0.01)
            except queue.Empty:
                pass
        self._thread = None
        # The producer ran ahead: rewind the source to what the net actually consumed.
        self.source.set_state(self._consumed_state)

    # -- producer side -------------------------------------------------------------------
    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self.depth)
        # The thread holds the source, not this object, so a dropped net's prefetcher is
        # collected, and its finalizer stops the thread.
        self._thread = threading.Thread(
            target=_produce,
            args=(self.source, self._queue, self._stop),
            name=f"netforge-data-{self.name}",
            daemon=True,
        )
        weakref.finalize(self, self._stop.set)
        self._thread.start()


def _produce(source: Source, out: queue.Queue, stop: threading.Event) -> None:
    """The producer loop: batches with the source state after each, until told to stop."""
    while not stop.is_set():
        try:
            item: Any = (source.next_batch(), source.get_state())
        except BaseException as exc:  # handed to the consumer, which raises it
            item = exc
        while not stop.is_set():
            try:
                out.put(item, timeout=0.05)
                break
            except queue.Full:
                continue
        if isinstance(item, BaseException):
            return
