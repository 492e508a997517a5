"""im2col / col2im as strided views: the data movement behind Convolution, Deconvolution,
Im2col and Pooling.

An image batch is ``(N, C, *spatial)``. ``windows`` views a padded batch as
``(N, C, *kernel, *out)`` without copying (Caffe's im2col layout per image is
``(C·prod(kernel), *out)``, the same element order). The convolution layers copy that view
once into a column buffer laid out ``(C, *kernel, N, *out)``, so that each group's columns
are one contiguous ``(K, N·prod(out))`` matrix and a whole batch chunk is one GEMM (Chainer's
``utils/conv.py`` idea, with the batch folded into the GEMM's long axis). ``col2im`` is the
adjoint: a scatter-add over the kernel offsets (one whole-array add per offset, never a loop
over pixels). Everything works on numpy and cupy arrays alike.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from netforge.backend import get_array_module


class Geometry(NamedTuple):
    """Kernel, stride, pad and dilation per spatial axis."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    pad: tuple[int, ...]
    dilation: tuple[int, ...]

    def conv_out(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Caffe's convolution output size (H + 2p − (d(k−1)+1)) / s + 1 per axis."""
        return tuple(
            (h + 2 * p - (d * (k - 1) + 1)) // s + 1
            for h, k, s, p, d in zip(spatial, self.kernel, self.stride, self.pad, self.dilation)
        )

    def deconv_out(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Caffe's deconvolution output size s(H − 1) + d(k − 1) + 1 − 2p per axis."""
        return tuple(
            s * (h - 1) + d * (k - 1) + 1 - 2 * p
            for h, k, s, p, d in zip(spatial, self.kernel, self.stride, self.pad, self.dilation)
        )


class Workspace:
    """Buffers a layer reuses from one pass to the next, keyed by purpose.

    A buffer without ``fill`` is a contiguous view of a flat allocation that grows when a
    larger size is asked for, so batch chunks of different sizes share it. A buffer with
    ``fill`` is set to ``fill`` when it is allocated, and padded copies rely on that: their
    border is written once and only their interior is rewritten on every pass. It serves
    any leading (batch) size up to its own, as a view of its first items, so a smaller last
    chunk keeps the border; other shape or dtype changes reallocate it.

    Buffers whose contents are dead once a layer's call returns (GEMM products, transposed
    copies, gradient sums) come from ``scratch`` instead: one workspace per thread, shared
    by every layer that thread runs, so a net holds the largest layer's scratch rather than
    the sum of all of them (CIFAR-10 quick's training at batch 100: peak growth 230 -> 210 MiB).
    """

    _threads = threading.local()

    def __init__(self, shared: bool = False) -> None:
        self._buffers: dict[str, Any] = {}
        self._shared = shared

    @property
    def scratch(self) -> Workspace:
        """The calling thread's workspace for buffers that do not outlive a layer's call.
        It holds no ``fill`` buffers: another layer would find their border overwritten."""
        space = getattr(Workspace._threads, "space", None)
        if space is None:
            space = Workspace._threads.space = Workspace(shared=True)
        return space

    def get(
        self, key: str, shape: Sequence[int], dtype: Any, xp: Any, fill: float | None = None
    ) -> Any:
        if fill is not None and self._shared:
            raise ValueError(f"scratch buffer {key!r}: a filled buffer must be a layer's own")
        shape = tuple(shape)
        if self._shared:  # nets of both dtypes, or both devices, must not thrash one buffer
            key = f"{key}:{xp.__name__}:{xp.dtype(dtype).str}"
        buf = self._buffers.get(key)
        size = math.prod(shape)
        if fill is None:
            stale = buf is None or buf.size < size
        else:
            stale = buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]
        if stale or buf.dtype != dtype or get_array_module(buf) is not xp:
            buf = xp.empty(shape if fill is not None else size, dtype=dtype)
            if fill is not None:
                buf.fill(fill)
            self._buffers[key] = buf
        return buf[: shape[0]] if fill is not None else buf[:size].reshape(shape)

    def matrix(self, key: str, rows: int, cols: int, dtype: Any, xp: Any) -> Any:
        """A (rows, cols) GEMM operand or product, as a view of the flat buffer ``key``: on
        numpy its rows are ``gemm_row_stride`` elements apart, on other array modules
        contiguous. Reshapes that only split its axes stay views of it."""
        import numpy as np

        stride = gemm_row_stride(cols, np.dtype(dtype).itemsize) if xp is np else cols
        flat = self.get(key, (rows * stride,), dtype, xp)
        return flat.reshape(rows, stride)[:, :cols]


#: Bytes per cache line, the unit of a GEMM row stride.
CACHE_LINE = 64


def gemm_row_stride(cols: int, itemsize: int) -> int:
    """Elements from one row of a numpy GEMM matrix to the next: ``cols`` rounded up to an
    odd number of cache lines.

    When the stride is a multiple of 4 KiB, every row's start falls in the same cache sets
    and OpenBLAS's GEMM thrashes them. Convolution column matrices hit that whenever a
    batch chunk covers a multiple of 1024 float32 pixels: on one core, CIFAR-10 quick's
    conv1 forward GEMM (32 × 75 by 75 × 13312) took 0.64 ms with contiguous rows and 0.39
    ms with each row one cache line longer; LeNet's (20 × 25 by 25 × 18432) 0.28 and 0.14.
    """
    per_line = max(1, CACHE_LINE // itemsize)
    lines = -(-cols // per_line)
    return (lines + 1 - lines % 2) * per_line


def interior(pad_before: Sequence[int], spatial: Sequence[int]) -> tuple[slice, ...]:
    """The index of the unpadded image inside a padded ``(N, C, *padded)`` array."""
    return (slice(None), slice(None)) + tuple(slice(p, p + h) for p, h in zip(pad_before, spatial))


def padded(x: Any, pad: Sequence[int], ws: Workspace, key: str) -> Any:
    """``x`` (N, C, *spatial) with ``pad`` zeros on both sides of every spatial axis.

    The zero border is written once: the workspace buffer keeps it, and each call copies
    only the interior.
    """
    if not any(pad):
        return x
    xp = get_array_module(x)
    shape = x.shape[:2] + tuple(h + 2 * p for h, p in zip(x.shape[2:], pad))
    buf = ws.get(key, shape, x.dtype, xp, fill=0)
    buf[interior(pad, x.shape[2:])] = x
    return buf


def windows(xpad: Any, geom: Geometry, out: Sequence[int]) -> Any:
    """A read-only ``(N, C, *kernel, *out)`` view of the padded batch ``xpad``."""
    xp = get_array_module(xpad)
    strides = xpad.strides
    spatial = strides[2:]
    view_strides = (
        strides[:2]
        + tuple(s * d for s, d in zip(spatial, geom.dilation))
        + tuple(s * t for s, t in zip(spatial, geom.stride))
    )
    shape = xpad.shape[:2] + geom.kernel + tuple(out)
    return xp.lib.stride_tricks.as_strided(xpad, shape, view_strides)


def offset_slices(geom: Geometry, out: Sequence[int]) -> Iterator[tuple[tuple[int, ...], tuple]]:
    """Each kernel offset (row-major, Caffe's scan order) with the index, into a padded
    ``(N, C, *padded)`` array, of the input elements that offset touches for every output."""
    for offset in itertools.product(*(range(k) for k in geom.kernel)):
        index = tuple(
            slice(o * d, o * d + s * (m - 1) + 1, s)
            for o, d, s, m in zip(offset, geom.dilation, geom.stride, out)
        )
        yield offset, (slice(None), slice(None)) + index


def im2col(
    x: Any, geom: Geometry, out: Sequence[int], col: Any, ws: Workspace, key: str = "im2col_pad"
) -> Any:
    """Write the columns of ``x`` (N, C, *spatial) into ``col``, shaped (C, *kernel, N, *out);
    the padded copy of ``x``, if needed, is the workspace buffer ``key``."""
    view = windows(padded(x, geom.pad, ws, key), geom, out)
    nk = len(geom.kernel)
    order = (1,) + tuple(range(2, 2 + nk)) + (0,) + tuple(range(2 + nk, 2 + 2 * nk))
    xp = get_array_module(x)
    xp.copyto(col, view.transpose(order))
    return col


def col2im(cols: Any, geom: Geometry, out: Sequence[int], image: Any, ws: Workspace) -> Any:
    """Sum columns back into ``image`` (N, C, *spatial), overwriting it (Caffe's col2im).

    ``cols`` is any view shaped ``(N, C, *kernel, *out)`` and ``image`` any view shaped
    ``(N, C, *spatial)`` (the two leading axes may be swapped in both); each input element
    receives the sum of the column entries that copied it: the adjoint of ``im2col``. The
    sums go to a workspace buffer unless ``image`` is contiguous and unpadded.
    """
    xp = get_array_module(image)
    pad = geom.pad
    direct = not any(pad) and image.flags.c_contiguous
    if direct:
        acc = image
    else:
        shape = image.shape[:2] + tuple(h + 2 * p for h, p in zip(image.shape[2:], pad))
        acc = ws.scratch.get("col2im_acc", shape, image.dtype, xp)
    acc.fill(0)
    lead = (slice(None), slice(None))
    for offset, index in offset_slices(geom, out):
        target = acc[index]
        xp.add(target, cols[lead + offset], out=target)
    if not direct:
        image[...] = acc[interior(pad, image.shape[2:])]
    return image


def batch_chunks(num: int, per_item: int, limit: int, multiple: int = 1) -> list[tuple[int, int]]:
    """Split ``num`` batch items into runs whose buffers hold at most ``limit`` elements
    (at least one item per run), so that column buffers stay bounded on large batches.

    The number of runs is rounded up to a multiple of ``multiple`` where there are items
    enough, so that a pool of that many workers gets equal shares (an odd run count on two
    workers leaves one idle for a whole run).
    """
    step = max(1, min(num, limit // max(per_item, 1)))
    count = math.ceil(num / step) if num else 0
    count = min(num, -(-count // multiple) * multiple)
    return [(i * num // count, (i + 1) * num // count) for i in range(count)]
