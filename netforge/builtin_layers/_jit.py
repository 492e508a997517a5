"""Optional compiled CPU kernels: numba, for the hot spots numpy cannot do in one pass.

numpy runs an expression such as BatchNorm's ``(x − mean) / std · γ + β`` as one pass over
memory per operation, with a temporary between them, and a per-channel reduction over a
strided axis as a slow generic loop. Where those passes bound a layer (BatchNorm, Scale,
depthwise convolution: measured in ``tools/bench_models.py``), a kernel compiled by numba
does the same arithmetic in one or two passes. The kernels are an override, never the only
path: every layer keeps its numpy implementation, the tests run both against the same
references, and a layer uses a kernel only where it measured faster.

numba is the ``jit`` extra (``pip install netforge[jit]``). ``NETFORGE_JIT`` chooses:
``auto`` (the default) uses numba when it imports, ``0`` never, ``1`` requires it (a
ConfigError when it is missing). The kernels compile on their first call for each dtype and
are cached on disk (numba's ``cache=True``: beside this module, or under the user's cache
directory when that is read-only), so only the first run on a machine pays for compiling.

The kernels are serial and release the GIL (``nogil``): the layers split work among their
own worker threads (``_threads.run_chunks``), as they do for numpy's calls. numba's own
parallel loops are not used because its default threading layer refuses calls from two
threads at once, which is what the worker pool does.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from netforge.errors import ConfigError

#: The environment variable that turns the kernels on or off (see the module docstring).
SETTING = "NETFORGE_JIT"


@functools.cache
def numba() -> Any:
    """The numba module when kernels are enabled and it imports, else None."""
    setting = os.environ.get(SETTING, "auto").strip().lower()
    if setting in ("0", "off", "false", "no"):
        return None
    try:
        import numba as module
    except ImportError as exc:
        if setting in ("1", "on", "true", "yes"):
            raise ConfigError(
                f"{SETTING}={setting} asks for compiled CPU kernels, but numba does not import "
                f"({exc}): pip install 'netforge[jit]', or unset {SETTING}"
            ) from exc
        return None
    return module


def enabled() -> bool:
    """Whether the layers use the compiled kernels."""
    return numba() is not None


#: numba's ``fastmath`` flags that let LLVM vectorise a sum (keep it as several partial sums,
#: so the order of the additions changes) and fuse a·b + c into one rounding, and nothing
#: more: NaN and infinity keep their IEEE meaning, so a diverging net still shows them. A
#: float32 sum without them runs one add per cycle's latency, 3x slower (BatchNorm's).
VECTOR_SUMS = frozenset({"reassoc", "contract"})


#: ``helper`` functions not yet made callable from compiled code.
_helpers: list[Callable] = []
#: Held while a kernel's first call registers the helpers and creates its dispatcher.
_first_call = threading.Lock()


def helper(function: Callable) -> Callable:
    """``function``, a piece that several kernels share, callable from their compiled code:
    numba compiles it into each kernel that calls it (its ``register_jitable``). It is
    registered when the next kernel compiles, so importing a module of kernels does not
    import numba; until then, and without numba, it is the plain Python function."""
    _helpers.append(function)
    return function


def kernel(function: Callable | None = None, *, fastmath: frozenset[str] = frozenset()) -> Callable:
    """``function`` compiled by numba on its first call (nopython, GIL released, cached on
    disk, numpy's error model so that a division by zero gives inf as numpy does), with the
    ``fastmath`` flags given (``@kernel(fastmath=VECTOR_SUMS)``; none for ``@kernel``).
    Calling it without numba is a programming error: callers check ``enabled()`` first."""
    if function is None:
        return functools.partial(kernel, fastmath=fastmath)
    compiled = None

    @functools.wraps(function)
    def call(*args: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            # The layers' workers make their first calls at once.
            with _first_call:
                while _helpers:
                    numba().extending.register_jitable(_helpers.pop())
                if compiled is None:
                    compiled = numba().njit(
                        nogil=True, cache=True, error_model="numpy", fastmath=set(fastmath)
                    )(function)
        return compiled(*args)

    return call


def usable(*arrays: Any) -> bool:
    """Whether kernels may run on ``arrays``: numba is enabled and they are C-ordered numpy
    arrays of one floating type, float32 or float64 (anything else, cupy included, takes
    the numpy path)."""
    if not enabled():
        return False
    first = arrays[0]
    return all(
        type(a) is np.ndarray and a.dtype == first.dtype and a.flags.c_contiguous for a in arrays
    ) and first.dtype in (np.float32, np.float64)
