"""Stride-1 2-D convolution with Winograd's minimal filtering along the kernel rows.

``RowShiftConv`` sums kh GEMMs, one per kernel row i, over the window rows shifted down by i.
Along the image's y axis that sum is a 1-D correlation of the window rows with the kh filter
rows, and Winograd's minimal filtering algorithm F(m, kh) computes m outputs of a 1-D
correlation with m + kh − 1 products instead of m·kh (Lavin and Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016). Here each product is a GEMM:

- the padded input is cut into tiles of m + kh − 1 rows, one tile per m output rows, and
  each tile is transformed by ``Bᵀ`` (a small GEMM over whole rows of every item, before the
  window-row copy, with which it commutes);
- the filters are transformed by ``G``, so that point ξ has its own ``(kw·C, O)`` filter;
- point ξ's window rows of every tile times point ξ's filter is one GEMM per point;
- ``Aᵀ`` maps the points of a tile back to its m output rows.

With m = 4, CIFAR-10 quick's 5×5 convolutions run 8 GEMMs per 4 output rows where the row
shifts run 20: 2.5× fewer FLOPs. Measured with ``netforge time``'s per-layer split on 2 cores,
its conv2 takes 13 ms (forward + backward) against 18.4 ms with the row shifts, and a
CaffeNet iteration's layers 484 ms against 554.

The filter gradient is the same computation transposed (``Gᵀ`` of the sum over tiles of the
transformed window rows times the ``A``-transformed top gradient), and the bottom gradient
is either the full correlation, itself a ``WinogradRowConv``, or the adjoint of the plain
row shifts (``RowShiftConv``'s).

The transforms use the points 0, ±1, ±2, ±1/2 and ∞. In float32 they keep results within
about 2e-6 of the largest output's magnitude (measured on CIFAR-10 quick's conv2, against
3e-7 for the row shifts); kernels taller than ``MAX_KERNEL_ROWS`` would need points that
lose more, and keep the row shifts.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from netforge.backend import get_array_module
from netforge.builtin_layers.conv_ops import Geometry, Workspace
from netforge.builtin_layers.conv_rows import RowShiftConv

#: Output rows per tile (the m of F(m, kh)).
TILE = 4
#: The finite interpolation points, in the order they are taken; ∞ is always the last point.
_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)
#: The tallest kernel F(TILE, kh) has finite points for.
MAX_KERNEL_ROWS = len(_POINTS) + 2 - TILE


def minimal_filtering(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The float64 matrices ``(Aᵀ, G, Bᵀ)`` of F(m, r): for a filter g of r taps and an
    input d of m + r − 1 values, ``Aᵀ · ((G·g) ⊙ (Bᵀ·d))`` is the correlation
    ``y_i = Σ_j g_j · d_(i+j)``, i < m.

    The Toom–Cook construction, transposed: a linear convolution of polynomials of degrees
    r − 1 and m − 1 evaluates both at the points (the rows of G and A), multiplies, and
    interpolates the product (the inverse of the Vandermonde matrix V of degree m + r − 2);
    the correlation is its transpose, hence ``Bᵀ = V⁻ᵀ``. The point ∞ takes the leading
    coefficients."""
    count = m + r - 1
    points = np.array(_POINTS[: count - 1])

    def vandermonde(columns: int) -> np.ndarray:
        matrix = np.zeros((count, columns))
        matrix[:-1] = points[:, None] ** np.arange(columns)
        matrix[-1, -1] = 1.0
        return matrix

    return vandermonde(m).T, vandermonde(r), np.linalg.inv(vandermonde(count)).T


@functools.cache
def _cast_transforms(rows: int, xp: Any, dtype: np.dtype) -> tuple[Any, Any, Any]:
    """``minimal_filtering(TILE, rows)`` as arrays of ``xp`` in ``dtype``, made once."""
    return tuple(xp.asarray(a, dtype=dtype) for a in minimal_filtering(TILE, rows))


class WinogradRowConv(RowShiftConv):
    """``RowShiftConv`` with F(``TILE``, kh) along the rows: same operands and results, on
    the row transforms' tiles. Only for geometries that ``fits`` accepts (its full
    correlation, ``data_gradient_conv``, shares the kernel and dilation, so fits too)."""

    # Its full correlation's GEMMs shrink as forward's do, so that correlation beats the
    # adjoint on wide tops too (CIFAR-10 quick's conv3: 4.3–4.5 ms against 4.7–4.8 ms).
    adjoint_for_wide_tops = False

    @staticmethod
    def fits(geom: Geometry) -> bool:
        """Whether F(``TILE``, kh) applies: 2-D, stride 1, 2 ≤ kh ≤ ``MAX_KERNEL_ROWS``,
        no dilation along y."""
        return (
            len(geom.kernel) == 2
            and geom.stride == (1, 1)
            and 2 <= geom.kernel[0] <= MAX_KERNEL_ROWS
            and geom.dilation[0] == 1
        )

    @property
    def tiles(self) -> int:
        """Tiles per image, of ``TILE`` output rows each (the last may reach past the output)."""
        return -(-self.out[0] // TILE)

    @property
    def points(self) -> int:
        """Transform points per tile: its input rows."""
        return TILE + self.kernel[0] - 1

    def _transforms(self, xp: Any, dtype: Any) -> tuple[Any, Any, Any]:
        """(Aᵀ, G, Bᵀ) as arrays of ``xp`` in ``dtype``."""
        return _cast_transforms(self.kernel[0], xp, np.dtype(dtype))

    @property
    def filters_shape(self) -> tuple[int, ...]:
        """(group, points, kw·in_group, out_group): one filter matrix per point."""
        return (self.group, self.points, self.depth, self.out_group)

    def items_size(self, n: int) -> int:
        return self.group * self.points * self.tiles * n * self.out[1] * self.depth

    def filters(self, w: Any) -> Any:
        """The ``G``-transformed ``weights`` stack, shaped ``filters_shape``."""
        xp = get_array_module(w)
        stack = self.weights(w)
        g_matrix = self._transforms(xp, w.dtype)[1]
        points = xp.matmul(g_matrix, stack.reshape(len(stack), -1))
        per_point = points.reshape(self.points, self.group, self.depth, self.out_group)
        return xp.ascontiguousarray(per_point.transpose(1, 0, 2, 3))

    def weight_diff(self, stack: Any) -> Any:
        """``Gᵀ`` of a per-point filter gradient, as filters (num_output, in_group, kh, kw)."""
        xp = get_array_module(stack)
        g_matrix = self._transforms(xp, stack.dtype)[1]
        per_point = stack.transpose(1, 0, 2, 3).reshape(self.points, -1)
        return super().weight_diff(xp.matmul(g_matrix.T, per_point))

    def rows_buffer(self, ws: Workspace, key: str, n: int, dtype: Any, xp: Any) -> Any:
        """The buffer ``key`` that ``rows`` fills: the window rows of the transformed tiles,
        ``(group, points, tiles·n·Wo, kw·in_group)``."""
        wo, kw = self.out[1], self.kernel[1]
        shape = (self.group, self.points, self.tiles, n, wo, kw, self.in_group)
        return ws.get(key, shape, dtype, xp).reshape(self.group, self.points, -1, self.depth)

    def rows(self, x: Any, ws: Workspace, key: str, scratch: bool = False) -> Any:
        """Fill ``rows_buffer(key)`` from the chunk ``x`` (n, C, H, W): pad it, channels
        last and rows outermost, transform each tile's rows by ``Bᵀ``, and copy the window
        rows of every point (into ``ws.scratch`` when ``scratch``)."""
        xp = get_array_module(x)
        n, c = x.shape[:2]
        (ph, pw), wp = self.pad, self.padded[1]
        height = self.tiles * TILE + self.kernel[0] - 1  # the rows the tiles read
        # One zero-bordered buffer per chunk size: only its interior is written.
        image = ws.get(f"{self.name}_hnwc{n}", (height, n, wp, c), x.dtype, xp, fill=0)
        xp.copyto(image[ph : ph + x.shape[2], :, pw : pw + x.shape[3]], x.transpose(2, 0, 3, 1))
        row = n * wp * c
        step = image.strides[0]
        tiles = xp.lib.stride_tricks.as_strided(
            image, (self.tiles, self.points, row), (TILE * step, step, image.itemsize)
        )
        transformed = ws.scratch.get(
            self.name + "_tiles", (self.points, self.tiles, row), x.dtype, xp
        )
        b_matrix = self._transforms(xp, x.dtype)[2]
        xp.matmul(b_matrix, tiles, out=transformed.transpose(1, 0, 2))
        view = transformed.reshape(self.points, self.tiles, n, wp, c)
        s_p, s_t, s_n, s_x, s_c = view.strides
        g, kw, wo = self.group, self.kernel[1], self.out[1]
        window = xp.lib.stride_tricks.as_strided(
            view,
            (g, self.points, self.tiles, n, wo, kw, self.in_group),
            (self.in_group * s_c, s_p, s_t, s_n, s_x, self.dilation[1] * s_x, s_c),
        )
        rows = self.rows_buffer(ws.scratch if scratch else ws, key, n, x.dtype, xp)
        xp.copyto(rows.reshape(window.shape), window)
        return rows

    def apply(self, rows: Any, weights: Any, y: Any, bias: Any, ws: Workspace) -> None:
        """One GEMM per (group, point), then ``Aᵀ`` per tile into the output rows."""
        xp = get_array_module(rows)
        n, g, wo, og = y.shape[0], self.group, self.out[1], self.out_group
        span = self.tiles * n * wo
        products = ws.scratch.get("winograd_products", (g, self.points, span, og), rows.dtype, xp)
        xp.matmul(rows, weights, out=products)
        out_rows = ws.scratch.get(
            "winograd_out", (g, self.tiles, TILE, n * wo * og), rows.dtype, xp
        )
        a_matrix = self._transforms(xp, rows.dtype)[0]
        per_tile = products.reshape(g, self.points, self.tiles, -1).transpose(0, 2, 1, 3)
        xp.matmul(a_matrix, per_tile, out=out_rows)
        tiled = out_rows.reshape(g, self.tiles * TILE, n, wo, og)
        self._store(tiled[:, : self.out[0]], y, bias)

    def channels_last(self, dy: Any, ws: Workspace) -> Any:
        """The top gradient chunk ``dy`` (n, num_output, Ho, Wo) as ``(group, tiles·TILE·n·Wo,
        out_group)``, rows outermost: ``RowShiftConv``'s layout followed by zero rows up to
        the last tile's end."""
        xp = get_array_module(dy)
        n, (ho, wo), g, og = dy.shape[0], self.out, self.group, self.out_group
        rows = self.tiles * TILE
        dy_last = ws.get(f"winograd_dy{n}", (g, rows, n, wo, og), dy.dtype, xp, fill=0)
        xp.copyto(dy_last[:, :ho], dy.reshape(n, g, og, ho, wo).transpose(1, 3, 0, 4, 2))
        return dy_last.reshape(g, rows * n * wo, og)

    def add_weight_gradient(self, rows: Any, dy_last: Any, stack: Any, ws: Workspace) -> None:
        """Add one chunk's per-point filter gradient to ``stack`` (``filters_shape``): the
        ``A``-transformed top gradient of each tile, then per point (window rows)ᵀ · that."""
        xp = get_array_module(rows)
        g, og = self.group, self.out_group
        items_row = dy_last.shape[1] // (self.tiles * TILE)  # n·Wo
        shape = (g, self.points, self.tiles, items_row * og)
        points = ws.scratch.get("winograd_dpoints", shape, rows.dtype, xp)
        a_matrix = self._transforms(xp, rows.dtype)[0]
        xp.matmul(
            a_matrix.T,
            dy_last.reshape(g, self.tiles, TILE, -1),
            out=points.transpose(0, 2, 1, 3),
        )
        points = points.reshape(g, self.points, -1, og)
        term = ws.scratch.get("winograd_dw", stack.shape, rows.dtype, xp)
        xp.add(stack, xp.matmul(rows.transpose(0, 1, 3, 2), points, out=term), out=stack)
