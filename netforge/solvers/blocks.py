"""The solver's element-wise passes over every learnable parameter, in cache-sized blocks.

An update is a chain of element-wise operations per parameter (regularise, fold into the
history, leave the step in the diff, subtract it from the weights). Done whole-array, each
operation streams the parameter's arrays through main memory again: for CaffeNet's 61M
parameters about 20 passes of 244 MB per iteration. Done block by block, the weights,
gradient and history of one block are read from memory once, every operation of the chain
runs on them while they sit in the core's cache, and they are written back once. Each
element still goes through the same operations in the same order, so the results are
bit-for-bit those of the whole-array code (Caffe's formulas, in Caffe's order). SGD's
update on numpy is three BLAS calls per block instead of the chain (``sgd.py``); they too
give every element the same result wherever the blocks are cut.

On numpy the blocks are shared among the cores' threads (numpy releases the GIL inside its
loops, and each core brings its own L2 cache). On cupy whole-array operations are already
fast: the blocks are large and run on one thread, only to bound the scratch memory.

Measured on CaffeNet with the layers replaced by a no-op (2-core AMD EPYC, ms per SGD
iteration with weight decay: zeroing, finiteness check and update): whole arrays 101;
blocks of the numpy chain on one thread about 65, on two threads about 43; SGD's BLAS
update on two threads 21-25 (``tools/bench_update.py``), near what the memory allows: it
reads the weights, gradients and history once and writes the weights and history once,
5 × 244 MB, which the traffic floor of that tool streams in 17-20 ms.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from netforge._blas import set_blas_threads
from netforge.builtin_layers._threads import WORKERS, run_chunks

#: Elements per block on numpy: 128 Ki, 512 KiB per float32 array. Each operation of an
#: update touches two or three of a block's arrays, which stay in the core's L2 (1 MiB here)
#: and the shared L3 between operations. Measured on one array set of CaffeNet's 61M
#: parameters, two threads, ms per pass with 64 Ki, 128 Ki and 256 Ki blocks: the numpy
#: chain (weight decay, momentum, step, zeroing) 31.3-32.6, 28.6-29.0 and 31.4; SGD's BLAS
#: calls (in an earlier form, a rotation zeroing the gradient) 24.9-25.1, 23.3-23.8 and
#: 23.8. Smaller blocks lose more to handing the GIL back and forth.
CPU_BLOCK = 1 << 17
#: Elements per block on cupy: large enough that kernel launches do not count.
GPU_BLOCK = 1 << 24
#: At most this many threads; fewer when the blocks would not keep them busy.
MAX_THREADS = 4
#: A thread is worth its hand-off cost only with at least this many blocks to run.
BLOCKS_PER_THREAD = 8


class Block(NamedTuple):
    """One block of learnable parameter ``index``: views of its weights, gradient and history
    buffers (one per history set), and per thread a pair of scratch arrays, all of one shape;
    on numpy, the addresses of the weights, gradient and history views, for BLAS calls.
    """

    index: int
    data: Any
    diff: Any
    history: tuple[Any, ...]
    scratch: tuple[tuple[Any, Any], ...]
    addresses: tuple[int, ...] | None


#: What ``ParamBlocks.run`` calls per block: ``work(block, scratch)``, with the scratch pair
#: of the thread it runs on.
BlockWork = Callable[[Block, tuple[Any, Any]], Any]


class ParamBlocks:
    """Cuts the learnable parameters and their history into blocks and runs a function over
    all blocks, on one thread or several.

    Threads claim blocks one at a time from a shared counter rather than taking fixed
    shares: on a machine other processes also load, a thread that loses its core for a
    while then simply runs fewer blocks, instead of holding every other thread up at the
    end. The cut is cached and redone only when one of the arrays is replaced (a restored
    history, weights set with ``blob.data = ...``).
    """

    def __init__(self, xp: Any, dtype: Any) -> None:
        self.xp = xp
        self.dtype = np.dtype(dtype)
        self.block = CPU_BLOCK if xp is np else GPU_BLOCK
        self._key: tuple[int, ...] | None = None
        self._blocks: list[Block] = []
        #: Every block is a contiguous numpy view with its ``addresses`` (none was set by
        #: the user as a strided array).
        self.contiguous = True
        self._ones: Any = None
        self._threads = 1

    def blocks(self, params: Sequence[Any], history: Sequence[Any]) -> list[Block]:
        """The blocks of ``params`` (Blobs) and ``history`` (``k·len(params)`` arrays, set
        by set), parameter by parameter."""
        arrays = [a for blob in params for a in (blob.data, blob.diff)]
        key = tuple(map(id, arrays + list(history)))
        if key != self._key:
            self._cut(params, history)
            self._key = key
        return self._blocks

    def _cut(self, params: Sequence[Any], history: Sequence[Any]) -> None:
        count = len(params)
        sets = len(history) // count if count else 0
        pieces: list[list[Any]] = []
        self.contiguous = self.xp is np
        for i, blob in enumerate(params):
            arrays = [blob.data, blob.diff, *(history[i + k * count] for k in range(sets))]
            if not all(a.flags.c_contiguous for a in arrays):
                # A non-contiguous array set by the user has no flat view: one whole block.
                pieces.append([i, *arrays])
                self.contiguous = False
                continue
            flat = [a.reshape(-1) for a in arrays]
            for start in range(0, blob.count, self.block):
                pieces.append([i, *(a[start : start + self.block] for a in flat)])
        threads = 1
        if self.xp is np:
            # The cores this process may run on, not the machine's: a data-parallel rank
            # pinned to one core would otherwise run two update threads on it.
            threads = min(MAX_THREADS, WORKERS, len(pieces) // BLOCKS_PER_THREAD)
            threads = max(1, threads)
        size = max((p[2].size for p in pieces), default=0)
        scratch = [
            (self.xp.empty(size, self.dtype), self.xp.empty(size, self.dtype))
            for _ in range(threads)
        ]
        self._blocks = [
            Block(
                p[0],
                p[1],
                p[2],
                tuple(p[3:]),
                tuple(_views(pair, p[2]) for pair in scratch),
                tuple(a.ctypes.data for a in p[1:]) if self.contiguous else None,
            )
            for p in pieces
        ]
        self._ones = np.ones(size, self.dtype) if self.xp is np else None
        self._threads = threads

    def total(self, array: Any) -> Any:
        """The sum of a block: a float on numpy, a device scalar on cupy (no sync).

        On numpy through a BLAS dot product with ones, which reads the block at memory speed
        where ``sum``'s pairwise loop does not; only its finiteness matters to the caller."""
        if self.xp is np and array.ndim == 1:
            return float(np.dot(array, self._ones[: array.size]))
        return self.xp.sum(array)

    def run(self, blocks: list[Block], work: BlockWork) -> list[Any]:
        """``work(block, scratch)`` for every block, on threads when there are several; the
        results, in block order on one thread, in no fixed order on several. The calling
        thread claims blocks too, rather than sleeping while the pool's threads wake up. An
        exception in a thread is raised here.

        OpenBLAS runs on one thread meanwhile: a BLAS call on one block (the finiteness
        check's dot product, the SGD update) is too small to share, and threading it costs
        more than it saves (a 64 Ki-element ``saxpy``: 5.6 µs on one thread, 18.7 on two).
        """
        if self.xp is not np:
            return [work(block, block.scratch[0]) for block in blocks]
        previous = set_blas_threads(1)
        try:
            return self._run_numpy(blocks, work)
        finally:
            set_blas_threads(previous)

    def _run_numpy(self, blocks: list[Block], work: BlockWork) -> list[Any]:
        # ``next`` on itertools.count runs under the GIL: each block is claimed once.
        claims = itertools.count()
        results: list[list[Any]] = [[] for _ in range(self._threads)]

        def lane(thread: int, _stop: int, _worker: int) -> None:
            while (i := next(claims)) < len(blocks):
                block = blocks[i]
                results[thread].append(work(block, block.scratch[thread]))

        # One lane per thread, on the layers' worker pool (the calling thread runs lane 0).
        run_chunks(np, lane, [(t, t + 1) for t in range(self._threads)])
        return [result for lane_results in results for result in lane_results]


def _views(scratch: tuple[Any, Any], like: Any) -> tuple[Any, Any]:
    """Views of the two scratch arrays with ``like``'s shape."""
    first, second = scratch
    return first[: like.size].reshape(like.shape), second[: like.size].reshape(like.shape)
