"""Compiled CPU kernels for one image's 3×3, stride-1 Convolution by Winograd's F(2×2, 3×3).

A single image's 3×3 convolution otherwise runs as im2col and one GEMM of 9·C·Ho·Wo·O
multiply-adds (``ConvolutionLayer._forward_one``). Winograd's minimal filtering (Lavin and
Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) in two dimensions computes
each 2×2 block of outputs from a 4×4 tile of inputs with 16 products instead of 36:

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

per filter g (3×3) and input tile d (4×4, tiles overlapping by 2). Summed over the input
channels, point ξ of the 16 is one GEMM of the transformed filters ``U[ξ]`` (O, C) and
the transformed tiles ``V[ξ]`` (tiles, C): 4·C·Ho·Wo·O multiply-adds in all, 2.25x fewer,
and the transforms add passes proportional to C·Ho·Wo and O·Ho·Wo. ``conv_winograd``
applies the same idea along the rows only, F(4, kh), to batches.

- ``U = (G⊗G) · g`` for all filters is one GEMM of (16, 9) by (9, O·C), computed at every
  forward: pycaffe users edit ``net.params`` in place, and a kept copy would miss that. It
  is 16/9 of the weights' size, which is what confines the method to images with many
  tiles.
- The input rows a share of tiles reads are copied zero-padded and channels last, and the
  GEMMs' products are transformed channels last and copied back: the kernels then run
  along the channels with unit stride, which LLVM vectorises. ``input_tiles`` applies Bᵀ
  along y, then along x, writing ``V[ξ, tile, c]``; ``output_tiles`` applies Aᵀ along x,
  then along y, and adds the bias.
- GEMM ξ is ``V[ξ]`` (tiles, C) times ``U[ξ]ᵀ`` (C, O), on one BLAS thread per worker.

Each worker takes a share of the tile rows, after the filters are transformed (split by
points); with more filters than tiles, a share of the filters instead, which it transforms
itself, so that no worker reads the other's part of U, the GEMMs' largest operand.

F(4×4, 3×3), 36 products per 16 outputs, ran ResNet-50's res2 layers (56×56) faster still
(1.35 against 1.43 ms), but no faster at 28×28, slower at 14×14 (its U is 4x the weights),
and its coefficients (up to 8 in Aᵀ, 1/24 in G) cost float32 up to 1.3e-5 of a layer's
largest output. F(2×2)'s coefficients are 0, ±1 and ±1/2: float32 results stay within
about 8e-7 of the largest output, as im2col's within 7e-7 (the benchmark's error column).

Measured with ``tools/bench_winograd.py --all`` (batch-1 forward, float32, ms, median of 5
alternating rounds on the shared 2-core machine), F(2×2, 3×3) / im2col / PyTorch 2.13:

- ResNet-50: res2a_branch2b (64 channels, 56×56) 1.96 / 2.15 / 1.79, res3a_branch2b (128,
  28×28) 2.15 / 2.42 / 2.17, res4a_branch2b (256, 14×14) 1.87 / 2.72 / 2.05; but
  res5a_branch2b (512, 7×7: 16 tiles) 4.94 / 2.29 / 2.62, where the filter transform costs
  more than the GEMMs save;
- GoogLeNet: conv2/3x3 (64 → 192, 56×56) 3.91 / 5.34 / 4.33, inception_4e/3x3 (160, 14×14)
  1.34 / 1.71 / 1.33; inception_5a/3x3 (160, 7×7) 0.91 / 0.77 / 0.53;
- SqueezeNet's expand3x3 layers, few input channels: fire2 (16, 56×56) 0.91 / 0.75 / 0.55,
  fire6 (48, 14×14) 0.64 / 0.49 / 0.32, fire8 (64, 14×14) 0.65 / 0.82 / 0.59.

Compiling the two kernels costs 2-3 s per dtype on a machine's first run; later runs load
them from numba's cache in 0.04 s.
"""

from __future__ import annotations

import math

import numpy as np

from netforge.builtin_layers import _jit
from netforge.builtin_layers._threads import even_chunks, run_chunks
from netforge.builtin_layers.conv_ops import Workspace

#: Output rows and columns per tile (the m of F(m×m, 3×3)).
TILE = 2
#: Input rows and columns per tile: TILE + 3 − 1.
POINTS = TILE + 2
#: Least tiles per image at which a layer takes this path: below it the filter transform
#: costs more than the GEMMs save. 7×7 tiles (a 14×14 output) win, 4×4 tiles (7×7) lose
#: (the module docstring's figures).
MIN_TILES = 36
#: Least input channels, the GEMMs' depth: shallower GEMMs lose to im2col (SqueezeNet's
#: figures in the module docstring).
MIN_CHANNELS = 64

#: G of F(2, 3) with the points 0, ±1 and ∞ (Lavin and Gray's), filter taps to points.
_G = np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]])
#: (G⊗G): a 3×3 filter, flattened, to its 16 points, point ξ = 4·i + j for rows i, columns j.
FILTER_TRANSFORM = np.kron(_G, _G)


def fits(kernel: tuple[int, ...], stride: tuple[int, ...], dilation: tuple[int, ...]) -> bool:
    """Whether F(2×2, 3×3) computes a convolution of this geometry: 2-D, 3×3, stride 1, no
    dilation (any padding)."""
    return kernel == (3, 3) and stride == (1, 1) and dilation == (1, 1)


def tiles(out: tuple[int, ...]) -> tuple[int, int]:
    """Tile rows and columns that cover an output of ``out`` (rows, columns)."""
    return -(-out[0] // TILE), -(-out[1] // TILE)


@_jit.helper
def _input_point(k, d0, d1, d2, d3):  # pragma: no cover - numba
    """Row ``k`` of Bᵀ times (d0, d1, d2, d3)."""
    if k == 0:
        return d0 - d2
    if k == 1:
        return d1 + d2
    if k == 2:
        return d2 - d1
    return d1 - d3


@_jit.helper
def _output_point(k, m0, m1, m2, m3):  # pragma: no cover - numba
    """Row ``k`` of Aᵀ times (m0, m1, m2, m3)."""
    if k == 0:
        return m0 + m1 + m2
    return m1 - m2 - m3


# Both kernels run along the channels innermost, one output row of a transform per loop:
# each loop then stores to one array with unit stride, which LLVM vectorises (a loop that
# stored all the rows ran 1.6x slower), and the branch on k in the helpers is lifted out.


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def input_tiles(image, v):  # pragma: no cover - numba
    """``V[ξ, t, c]`` = (Bᵀ d B)[ξ] of every tile t of ``image``, zero-padded rows and
    columns, channels last (2·rows + 2, 2·columns + 2, C); tiles counted along the rows."""
    tiles_w = (image.shape[1] - 2) // TILE
    channels = image.shape[2]
    along_y = np.empty((POINTS, POINTS, channels), image.dtype)
    for ty in range((image.shape[0] - 2) // TILE):
        for tx in range(tiles_w):
            top, left = TILE * ty, TILE * tx
            for j in range(POINTS):
                x = left + j
                for k in range(POINTS):
                    for c in range(channels):
                        along_y[k, j, c] = _input_point(
                            k,
                            image[top, x, c],
                            image[top + 1, x, c],
                            image[top + 2, x, c],
                            image[top + 3, x, c],
                        )
            tile = ty * tiles_w + tx
            for i in range(POINTS):
                for k in range(POINTS):
                    for c in range(channels):
                        v[POINTS * i + k, tile, c] = _input_point(
                            k,
                            along_y[i, 0, c],
                            along_y[i, 1, c],
                            along_y[i, 2, c],
                            along_y[i, 3, c],
                        )


@_jit.kernel(fastmath=_jit.VECTOR_SUMS)
def output_tiles(m, bias, out):  # pragma: no cover - numba
    """``out`` (2·rows, 2·columns, O), channels last, = Aᵀ M A + ``bias`` of the GEMMs'
    products ``m`` (16, tiles, O)."""
    tiles_w = out.shape[1] // TILE
    outputs = out.shape[2]
    along_x = np.empty((POINTS, TILE, outputs), m.dtype)
    for ty in range(out.shape[0] // TILE):
        for tx in range(tiles_w):
            tile = ty * tiles_w + tx
            for i in range(POINTS):
                point = POINTS * i
                for k in range(TILE):
                    for o in range(outputs):
                        along_x[i, k, o] = _output_point(
                            k,
                            m[point, tile, o],
                            m[point + 1, tile, o],
                            m[point + 2, tile, o],
                            m[point + 3, tile, o],
                        )
            top, left = TILE * ty, TILE * tx
            for col in range(TILE):
                for k in range(TILE):
                    for o in range(outputs):
                        out[top + k, left + col, o] = bias[o] + _output_point(
                            k,
                            along_x[0, col, o],
                            along_x[1, col, o],
                            along_x[2, col, o],
                            along_x[3, col, o],
                        )


def forward_image(
    x: np.ndarray,
    weights: np.ndarray,
    bias: np.ndarray | None,
    y: np.ndarray,
    pad: tuple[int, int],
    workspaces: list[Workspace],
) -> None:
    """``y`` (O, Ho, Wo) = the 3×3 convolution of ``x`` (C, H, W) padded by ``pad`` with
    ``weights`` (O, C, 3, 3), plus ``bias`` (or None), on the worker pool; ``workspaces``
    holds a workspace per worker (their scratch buffers hold the transforms), and the work
    is cut into as many shares, of tile rows or of filters (the module docstring)."""
    outputs, channels = weights.shape[:2]
    tiles_h, tiles_w = tiles(y.shape[1:])
    dtype = x.dtype
    points = POINTS * POINTS
    transform = FILTER_TRANSFORM.astype(dtype)
    bias = np.zeros(outputs, dtype) if bias is None else bias

    def apply(u: np.ndarray, first: int, last: int, start: int, stop: int, worker: int) -> None:
        """Tile rows ``first`` … ``last`` − 1 of output channels ``start`` … ``stop`` − 1,
        by the transformed filters ``u`` (16, stop − start, C) of those channels."""
        space = workspaces[worker].scratch
        image = _padded_rows(x, pad, first, last, tiles_w, space)
        count = (last - first) * tiles_w
        v = space.get("winograd_v", (points, count, channels), dtype, np)
        input_tiles(image, v)
        products = space.get("winograd_m", (points, count, stop - start), dtype, np)
        np.matmul(v, u.transpose(0, 2, 1), out=products)
        shape = (TILE * (last - first), TILE * tiles_w, stop - start)
        out = space.get("winograd_out", shape, dtype, np)
        output_tiles(products, bias[start:stop], out)
        rows = min(TILE * last, y.shape[1]) - TILE * first
        np.copyto(
            y[start:stop, TILE * first : TILE * first + rows],
            out[:rows, : y.shape[2]].transpose(2, 0, 1),
        )

    if outputs > tiles_h * tiles_w:

        def by_filters(start: int, stop: int, worker: int) -> None:
            shape = (points, stop - start, channels)
            u = workspaces[worker].scratch.get("winograd_u", shape, dtype, np)
            taps = weights[start:stop].reshape(-1, 9).T  # (9, filters·C), read in place
            np.matmul(transform, taps, out=u.reshape(points, -1))
            apply(u, 0, tiles_h, start, stop, worker)

        run_chunks(np, by_filters, even_chunks(outputs, len(workspaces)))
        return
    u = workspaces[0].scratch.get("winograd_u", (points, outputs, channels), dtype, np)
    taps = weights.reshape(-1, 9).T
    flat_u = u.reshape(points, -1)

    def transform_filters(start: int, stop: int, _worker: int) -> None:
        np.matmul(transform[start:stop], taps, out=flat_u[start:stop])

    run_chunks(np, transform_filters, even_chunks(points, len(workspaces)))
    run_chunks(
        np,
        lambda first, last, worker: apply(u, first, last, 0, outputs, worker),
        even_chunks(tiles_h, len(workspaces)),
    )


def _padded_rows(
    x: np.ndarray, pad: tuple[int, int], first: int, last: int, tiles_w: int, space: Workspace
) -> np.ndarray:
    """The input rows that tile rows ``first`` … ``last`` − 1 read, zero-padded and
    channels last: (2·(last − first) + 2, 2·tiles_w + 2, C), in ``space``."""
    channels, height, width = x.shape
    top = TILE * first - pad[0]  # the image row of the buffer's first row
    shape = (TILE * (last - first) + 2, TILE * tiles_w + 2, channels)
    image = space.get("winograd_image", shape, x.dtype, np)
    start, stop = max(top, 0), min(top + shape[0], height)
    if start >= stop:  # a padding wider than a tile: these rows read none of the image
        image.fill(0)
        return image
    image[: start - top] = 0
    image[stop - top :] = 0
    rows = image[start - top : stop - top]
    rows[:, : pad[1]] = 0
    rows[:, pad[1] + width :] = 0
    np.copyto(rows[:, pad[1] : pad[1] + width], x[:, start:stop].transpose(1, 2, 0))
    return image


def worth_it(channels: int, out: tuple[int, ...]) -> bool:
    """Whether the transforms repay themselves on ``channels`` input channels and an output
    of ``out``: ``MIN_CHANNELS`` and ``MIN_TILES`` at least."""
    return channels >= MIN_CHANNELS and math.prod(tiles(out)) >= MIN_TILES
