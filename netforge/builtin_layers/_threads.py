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

The pool is numpy-only: cupy work stays on the calling thread (its kernels are already
asynchronous). Work is split statically, chunk i to worker i mod W, so every run adds
partial results in the same order and results are reproducible.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from netforge._blas import set_blas_threads

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: Workers, the calling thread included: one per core the process may run on.
WORKERS = _cores()


def pool() -> ThreadPoolExecutor:
    """The process-wide pool of the ``WORKERS - 1`` threads beside the caller, started on
    first use."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(WORKERS - 1, thread_name_prefix="netforge")
        return _pool


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

    previous = set_blas_threads(1)
    try:
        futures = [pool().submit(serve, w) for w in range(1, workers)]
        try:
            serve(0)
        finally:
            # Even when worker 0 fails, the others still use the buffers: let them finish.
            wait(futures)
        for future in futures:
            future.result()
    finally:
        set_blas_threads(previous)
