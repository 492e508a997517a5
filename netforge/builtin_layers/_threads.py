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
the 2-core machine where two plain locks ping-pong in 93 µs. With numba (the ``jit`` extra)
on Linux they first watch for the next call for about a millisecond, and the caller watches
for their shares, in compiled loops that yield the core and hold no GIL (``_spin_waits``):
no thread sleeps between the calls of a forward. Batch-1 forward against locks alone:
MobileNet v1 1.21x, ResNet-50 1.12x, SqueezeNet 1.04x faster (see ``_spin_waits``).

The pool is numpy-only: cupy work stays on the calling thread (its kernels are already
asynchronous). Work is split statically, chunk i to worker i mod W, so every run adds
partial results in the same order and results are reproducible. One call runs on the pool
at a time; a call made while another is running (from another thread, or from inside a
worker) runs all its chunks on its own thread.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from netforge._blas import set_blas_threads
from netforge.builtin_layers import _jit


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


#: Workers, the calling thread included: one per core the process may run on.
WORKERS = _cores()


class _Worker:
    """A pooled thread that runs one share of a call each time one is posted to it.

    With spinning hand-offs (``_spin_waits``) a call is posted by writing its number into
    the thread's row of ``_Pool.flags``, which the thread watches for ``SPIN_ROUNDS`` after
    each share before it sleeps on its ``go`` lock; at the start of each watch it writes the
    number of the call it has just finished, which the caller watches. Otherwise the caller
    releases ``go`` for each share and the thread releases ``done`` after it."""

    def __init__(self, index: int, flags: Any, watch: Callable | None) -> None:
        self.flags = flags
        #: The compiled watch (``_watch``) where hand-offs spin, else None: locks.
        self.watch = watch
        self.go = threading.Lock()
        self.done = threading.Lock()
        self.go.acquire()
        self.done.acquire()
        #: Orders a post against the thread's decision to sleep: see ``post`` and ``_next``.
        self.mutex = threading.Lock()
        self.asleep = False
        self.share: Callable[[], None] | None = None
        self.error: BaseException | None = None
        threading.Thread(target=self._serve, name=f"netforge-{index}", daemon=True).start()

    def post(self, share: Callable[[], None], call: int) -> None:
        """Hand the thread ``share``, as call number ``call``."""
        self.share = share
        if self.watch is None:
            self.go.release()
            return
        with self.mutex:
            self.flags[_POSTED] = call
            wake, self.asleep = self.asleep, False
        if wake:
            self.go.release()

    def _next(self, finished: int) -> int:
        """Wait for the call after ``finished`` and return its number."""
        if self.watch is None:
            self.go.acquire()
            return finished + 1
        while True:
            posted = self.watch(self.flags, finished, SPIN_ROUNDS)
            if posted != finished:
                return posted
            # Nothing posted while watching: sleep, unless a post came in meanwhile. The
            # mutex makes the poster see ``asleep`` exactly when this thread will wait.
            with self.mutex:
                self.asleep = self.flags[_POSTED] == finished
            if self.asleep:
                self.go.acquire()

    def _serve(self) -> None:
        call = 0
        while True:
            call = self._next(call)
            try:
                self.share()
            except BaseException as error:  # handed to the caller, which raises it
                self.error = error
            self.share = None
            if self.watch is None:
                self.done.release()


#: Columns of ``_Pool.flags``: the last call posted to a pooled thread, the last it finished.
_POSTED, _FINISHED = 0, 1

#: The environment variable that turns spinning hand-offs off (``0``, off, false, no): the
#: pool then hands off through locks, and an idle pooled thread takes no CPU time at all.
SPIN_SETTING = "NETFORGE_SPIN"

#: sched_yield rounds (about 0.6 µs each on the 2-core machine) that a pooled thread watches
#: for the next call after its share before it sleeps, and that the caller watches for the
#: pooled threads' shares between its checks for signals: about 1 ms, longer than the other
#: layers between two calls of a batch-1 forward take.
SPIN_ROUNDS = 1500


@_jit.kernel
def _watch(flags, finished, rounds):  # pragma: no cover - numba
    """A pooled thread's watch (``_Worker._next``): record call ``finished`` as done, then
    yield the core until another call is posted or ``rounds`` yields have passed; returns
    the last call posted."""
    flags[_FINISHED] = finished
    for _ in range(rounds):
        if flags[_POSTED] != finished:
            break
        _sched_yield()
    return flags[_POSTED]


@_jit.kernel
def _await_shares(flags, helpers, call, rounds):  # pragma: no cover - numba
    """The caller's watch: yield the core until pooled threads 1 … ``helpers`` have finished
    call ``call``; False if they have not after ``rounds`` yields."""
    for _ in range(rounds):
        finished = True
        for worker in range(1, helpers + 1):
            if flags[worker, _FINISHED] != call:
                finished = False
        if finished:
            return True
        _sched_yield()
    return False


#: libc's sched_yield as numba calls it (set by ``_spin_waits``, which compiles the watches).
_sched_yield: Any = None


@functools.cache
def _spin_waits() -> tuple[Callable, Callable] | None:
    """The compiled watches (``_watch``, ``_await_shares``) where hand-offs spin: on Linux,
    with numba enabled (``_jit``), unless ``NETFORGE_SPIN`` is 0; else None, and the pool
    hands off through locks.

    A thread that sleeps on a lock takes tens of microseconds to wake on a virtual machine,
    and the GIL keeps a Python thread from spinning while another runs Python: the watches
    are compiled, run without the GIL and yield the core at each round (other threads that
    need it get it). Per pool call of a batch-1 forward, through locks (a ``/tmp`` trace of
    MobileNet v1's 17 calls, medians): 24 µs for the caller to release the pooled thread's
    lock, 43 µs more before the thread ran, 51 µs for the caller to wake after the thread's
    share. Batch-1 forward, the two protocols alternating in one process (median of 9
    rounds, ms): MobileNet v1 18.1 -> 15.0, ResNet-50 83.6 -> 74.6, SqueezeNet 16.3 -> 15.8,
    GoogLeNet 58.5 -> 57.6, CaffeNet 24.9 -> 24.7."""
    global _sched_yield
    passive = os.environ.get(SPIN_SETTING, "1").strip().lower() in ("0", "off", "false", "no")
    if passive or not sys.platform.startswith("linux") or not _jit.enabled():
        return None
    numba = _jit.numba()
    _sched_yield = numba.core.types.ExternalFunction("sched_yield", numba.int32())
    return _watch, _await_shares


class _Pool:
    """The ``WORKERS - 1`` pooled threads and the flags they watch (one 64-byte row each)."""

    def __init__(self) -> None:
        import numpy as np

        self.waits = _spin_waits()
        watch = self.waits[0] if self.waits is not None else None
        self.flags = np.zeros((WORKERS, 8), np.int64)
        self.workers = [_Worker(w, self.flags[w], watch) for w in range(1, WORKERS)]
        self.calls = 0

    def wait_for(self, helpers: Sequence[_Worker]) -> None:
        """Wait until every helper has finished its share of the current call, even through
        a KeyboardInterrupt, which is raised once they all have: a helper left running would
        still write to the layer's buffers, and its late finish would end the next call's
        wait before that call's share was over."""
        interrupted: BaseException | None = None
        if self.waits is not None:
            _, await_shares = self.waits
            finished = False
            while not finished:
                try:  # a signal is handled between the compiled watches
                    finished = await_shares(self.flags, len(helpers), self.calls, SPIN_ROUNDS)
                except BaseException as error:
                    interrupted = interrupted or error
        else:
            for helper in helpers:
                while True:
                    try:
                        helper.done.acquire()
                        break
                    except BaseException as error:  # a signal during the wait
                        interrupted = interrupted or error
        if interrupted is not None:
            raise interrupted


#: Held while a call runs on the pool.
_busy = threading.Lock()
#: The pool, started on first use.
_pool: _Pool | None = None


def _forget_pool() -> None:
    """In a forked child the pooled threads are gone: start new ones when next needed."""
    global _busy, _pool
    _busy = threading.Lock()
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


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
    global _pool
    try:
        if _pool is None:
            _pool = _Pool()
        pool = _pool
        previous = set_blas_threads(1)
        helpers = pool.workers[: workers - 1]
        pool.calls += 1
        for worker, helper in enumerate(helpers, start=1):
            helper.post(functools.partial(serve, worker), pool.calls)
        try:
            serve(0)
        finally:
            # Even when worker 0 fails, the others still use the buffers: let them finish.
            pool.wait_for(helpers)
            set_blas_threads(previous)
        for helper in helpers:
            error, helper.error = helper.error, None
            if error is not None:
                raise error
    finally:
        _busy.release()
