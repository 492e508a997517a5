"""A small worker pool for the numpy convolution and pooling paths.

numpy releases the GIL inside copies, ufuncs and BLAS calls, so two Python threads that
each run im2col + GEMM on their own batch chunk use both cores at once, and each chunk's
column buffer stays in cache (measured on CIFAR-10 quick's conv2 forward, 2 cores: 15 ms for
the whole-batch copy + two-threaded GEMM, 8 ms for 5-image chunks on two workers). While
the workers run, OpenBLAS is limited to one thread (``netforge._blas.set_blas_threads``), so
the workers do not oversubscribe the cores; the count is restored afterwards, for the other layers'
GEMMs. Without that symbol the pool still works, with OpenBLAS threading inside each
worker's calls (slower: the calls contend for OpenBLAS's threads).

The calling thread is worker 0 and runs its own share instead of waiting: waking a pooled
thread costs tens of microseconds on a virtual machine, and LeNet calls the pool about ten
times per iteration (measured with ``netforge.timing.time_net`` on LeNet, 2 cores: 9.2-9.8
ms per iteration with every share on the pool, 8.4-8.5 ms with the caller taking one).

The pooled threads wait on a lock each rather than on a ``concurrent.futures`` executor's
queue: a call that runs nothing took a median 183 µs through an executor (its future,
waiter and condition objects on top of the two thread wake-ups) and 104-130 µs this way, on
the 2-core machine where two plain locks ping-pong in 93 µs. Batch-1 forward, alternating
in one process (median of 5 rounds): SqueezeNet 25.7 -> 22.4 ms and MobileNet 25.2 -> 23.4
(28 pool calls each), ResNet-50 114.9 -> 113.9 (54 calls; within its spread).

The pool is numpy-only: cupy work stays on the calling thread (its kernels are already
asynchronous). Work is split statically, chunk i to worker i mod W, so every run adds
partial results in the same order and results are reproducible. One call runs on the pool
at a time; a call made while another is running (from another thread, or from inside a
worker) runs all its chunks on its own thread.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from netforge._blas import set_blas_threads


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: Workers, the calling thread included: one per core the process may run on.
WORKERS = _cores()


class _Worker:
    """A pooled thread that runs one share of a call each time its ``go`` lock is released,
    and releases ``done`` when the share is over."""

    def __init__(self, index: int) -> None:
        self.go = threading.Lock()
        self.done = threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.share: Callable[[], None] | None = None
        self.error: BaseException | None = None
        threading.Thread(target=self._serve, name=f"netforge-{index}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            self.go.acquire()
            try:
                self.share()
            except BaseException as error:  # handed to the caller, which raises it
                self.error = error
            self.share = None
            self.done.release()


#: Held while a call runs on the pool.
_busy = threading.Lock()
#: The ``WORKERS - 1`` pooled threads, started on first use.
_workers: list[_Worker] = []


def _forget_pool() -> None:
    """In a forked child the pooled threads are gone: start new ones when next needed."""
    global _busy
    _busy = threading.Lock()
    _workers.clear()


os.register_at_fork(after_in_child=_forget_pool)


def _wait_for(helpers: Sequence[_Worker]) -> None:
    """Wait until every helper has finished its share, even through a KeyboardInterrupt
    (a lock wait is interruptible), which is raised once they all have: a helper left
    running would still write to the layer's buffers, and its late ``done`` would end the
    next call's wait before that call's share was over."""
    interrupted: BaseException | None = None
    for helper in helpers:
        while True:
            try:
                helper.done.acquire()
                break
            except BaseException as error:  # a signal (KeyboardInterrupt) during the wait
                interrupted = interrupted or error
    if interrupted is not None:
        raise interrupted


def even_chunks(count: int, parts: int = WORKERS) -> list[tuple[int, int]]:
    """``range(count)`` as at most ``parts`` contiguous (start, stop) ranges whose sizes
    differ by at most one, none empty: a worker's share of planes, channels or rows."""
    parts = min(parts, count)
    return [(k * count // parts, (k + 1) * count // parts) for k in range(parts)]


def run_chunks(
    xp: Any, work: Callable[[int, int, int], None], chunks: Sequence[tuple[int, int]]
) -> None:
    """Call ``work(start, stop, worker)`` for every chunk; ``worker`` (< ``WORKERS``) names
    the worker, so that ``work`` can use per-worker buffers. On numpy with more than one
    chunk and core, worker w runs chunks w, w + W, ...: worker 0 here, the others on the
    pool; otherwise everything runs here, as worker 0."""
    import numpy as np

    workers = min(WORKERS, len(chunks))
    if xp is not np or workers < 2:
        for start, stop in chunks:
            work(start, stop, 0)
        return

    def serve(worker: int) -> None:
        for start, stop in chunks[worker::workers]:
            work(start, stop, worker)

    if not _busy.acquire(blocking=False):  # the pool is running another call
        for start, stop in chunks:
            work(start, stop, 0)
        return
    try:
        if not _workers:
            _workers.extend(_Worker(w) for w in range(1, WORKERS))
        previous = set_blas_threads(1)
        helpers = _workers[: workers - 1]
        for worker, helper in enumerate(helpers, start=1):
            helper.share = functools.partial(serve, worker)
            helper.go.release()
        try:
            serve(0)
        finally:
            # Even when worker 0 fails, the others still use the buffers: let them finish.
            _wait_for(helpers)
            set_blas_threads(previous)
        for helper in helpers:
            error, helper.error = helper.error, None
            if error is not None:
                raise error
    finally:
        _busy.release()
