"""One image's 3×3 Convolution by Winograd's F(2×2, 3×3) (``winograd_kernels``) against the
direct float64 formula, and the rule that chooses it."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.builtin_layers import _jit, winograd_kernels
from netforge.builtin_layers.conv_ops import Workspace
from tests.harness import SEED, build, check_gradient, forward
from tests.test_layers_vision import _conv_text, conv_reference

needs_numba = pytest.mark.skipif(
    not _jit.enabled(), reason="the compiled kernels need numba (the jit extra)"
)


@pytest.fixture
def any_size(monkeypatch):
    """Every 3×3, stride-1 image takes F(2×2, 3×3), however small."""
    monkeypatch.setattr(winograd_kernels, "MIN_TILES", 1)
    monkeypatch.setattr(winograd_kernels, "MIN_CHANNELS", 1)


def test_the_transforms_are_minimal_filtering():
    """Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A, with the kernels' Bᵀ and Aᵀ written out from their
    helpers and G from the filter transform, is the correlation of a tile with a 3×3
    filter."""
    rng = np.random.default_rng(SEED)
    points, size = winograd_kernels.POINTS, winograd_kernels.TILE
    unit = np.eye(points)
    b_t = np.array([[winograd_kernels._input_point(k, *e) for e in unit] for k in range(points)])
    a_t = np.array([[winograd_kernels._output_point(k, *e) for e in unit] for k in range(size)])
    both = winograd_kernels.FILTER_TRANSFORM  # G⊗G: G[a, c]·G[b, d] at (a·points + b, 3c + d)
    g = both.reshape(points, points, 3, 3)[:, 0, :, 0] / np.sqrt(both[0, 0])
    tile, taps = rng.normal(size=(points, points)), rng.normal(size=(3, 3))
    products = (g @ taps @ g.T) * (b_t @ tile @ b_t.T)
    expected = [
        [np.sum(tile[i : i + 3, j : j + 3] * taps) for j in range(size)] for i in range(size)
    ]
    np.testing.assert_allclose(a_t @ products @ a_t.T, expected, rtol=1e-12, atol=1e-12)


@needs_numba
@pytest.mark.parametrize(
    "channels,filters,size,pad,bias",
    [
        (3, 5, (9, 11), 1, True),  # 5×6 tiles, fewer filters than tiles: split by tile rows
        (4, 20, (8, 8), 1, False),  # 4×4 tiles, 20 filters: split by filters
        (2, 3, (4, 7), 0, True),  # unpadded, one tile row
        (2, 3, (5, 5), 2, True),  # the last tiles reach past the output's edge
        (3, 4, (2, 1), 5, True),  # padding wider than a tile
    ],
)
def test_forward_matches_the_direct_formula(
    any_size, two_workers, channels, filters, size, pad, bias
):
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(1, channels, *size))
    text = _conv_text("Convolution", filters, f"kernel_size: 3 pad: {pad}", bias)
    layer, bottom, top = build(text, [x])
    assert layer._winograd_one
    (y,) = forward(layer, bottom, top)
    b = layer.blobs[1].data if bias else None
    expected = conv_reference(x, layer.blobs[0].data, b, (1, 1), (pad, pad), (1, 1), 1)
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@needs_numba
def test_each_share_of_tile_rows_pads_its_own_rows():
    """Shares of one tile row each, of a 1-row image padded by 5: a share whose rows lie
    wholly in the padding reads only zeros."""
    rng = np.random.default_rng(SEED)
    x, w, b = rng.normal(size=(3, 1, 2)), rng.normal(size=(4, 3, 3, 3)), rng.normal(size=4)
    y = np.empty((4, 9, 10))
    workspaces = [Workspace() for _ in range(6)]
    winograd_kernels.forward_image(x, w, b, y, (5, 5), workspaces)
    expected = conv_reference(x[None], w, b, (1, 1), (5, 5), (1, 1), 1)[0]
    np.testing.assert_allclose(y, expected, rtol=1e-12, atol=1e-12)


@needs_numba
def test_float32_error_is_bounded(two_workers):
    """A ResNet-like layer large enough to take the path unpatched, in float32: within
    2e-6 of the largest output (the module docstring's 8e-7, with room)."""
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(1, 64, 24, 24)).astype(np.float32)
    layer, bottom, top = build(
        _conv_text("Convolution", 48, "kernel_size: 3 pad: 1"), [x], dtype=np.float32
    )
    assert layer._winograd_one
    (y,) = forward(layer, bottom, top)
    w, b = (p.data.astype(np.float64) for p in layer.blobs)
    expected = conv_reference(x.astype(np.float64), w, b, (1, 1), (1, 1), (1, 1), 1)
    assert np.abs(y - expected).max() < 2e-6 * np.abs(expected).max()


@needs_numba
def test_backward_after_it_recomputes_the_columns(any_size):
    """Forward keeps no columns for backward on this path; Caffe's gradient check runs
    backward after it."""
    x = np.random.default_rng(SEED).normal(size=(1, 3, 7, 6))
    text = _conv_text("Convolution", 4, "kernel_size: 3 pad: 1")
    layer, bottom, top = build(text, [x])
    assert layer._winograd_one
    assert check_gradient(text, [x]) > 0


@pytest.mark.parametrize(
    "shape,params,chosen",
    [
        ((1, 64, 12, 12), "kernel_size: 3 pad: 1", True),  # 6×6 tiles, 64 channels
        ((1, 64, 10, 10), "kernel_size: 3 pad: 1", False),  # 5×5 tiles
        ((1, 32, 48, 48), "kernel_size: 3 pad: 1", False),  # too few channels
        ((2, 64, 12, 12), "kernel_size: 3 pad: 1", False),  # a batch: row shifts, im2col
        ((1, 64, 12, 12), "kernel_size: 3 pad: 1 group: 2", False),
        ((1, 64, 24, 24), "kernel_size: 3 pad: 1 stride: 2", False),
        ((1, 64, 16, 16), "kernel_size: 3 dilation: 2", False),
        ((1, 64, 12, 12), "kernel_size: 5 pad: 2", False),
    ],
)
def test_it_is_chosen_for_one_large_enough_image_with_a_3x3_stride_1_kernel(shape, params, chosen):
    layer, _, _ = build(_conv_text("Convolution", 8, params), [np.zeros(shape)])
    assert layer._winograd_one == (chosen and _jit.enabled())
