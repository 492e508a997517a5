"""Depthwise Convolution (group == channels) on both CPU paths, the compiled kernels
(``netforge.builtin_layers.depthwise``) and numpy's im2col + GEMM, against float64
references written from the formula with explicit windows, plus Caffe's gradient check."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.builtin_layers import depthwise
from tests.harness import KERNEL_PATHS, build, check_gradient, forward, kernel_path

SEED = 11


@pytest.fixture(params=KERNEL_PATHS)
def path(request, monkeypatch):
    """Which CPU path runs the layer: numba's kernels on one worker, the kernels with the
    planes split between the workers however few, or the numpy fallback."""
    kind, _ = kernel_path(request, monkeypatch, depthwise, ())
    return kind


# (batch, channels, multiplier, height, width, kernel, stride, pad, dilation, bias)
CASES = [
    (1, 4, 1, 9, 8, (3, 3), (1, 1), (1, 1), (1, 1), False),
    (2, 3, 1, 9, 10, (3, 3), (2, 2), (1, 1), (1, 1), True),
    (3, 2, 2, 8, 7, (3, 2), (2, 1), (1, 2), (2, 1), True),
    (1, 3, 2, 11, 9, (5, 5), (3, 2), (2, 0), (1, 2), False),
    (2, 2, 3, 5, 6, (1, 1), (2, 2), (0, 1), (1, 1), True),
    # More output rows than one block of the kernels' accumulator holds (depthwise.BLOCK).
    (2, 3, 1, 45, 40, (3, 3), (1, 1), (1, 1), (1, 1), True),
]


def _text(channels, mult, kernel, stride, pad, dilation, bias) -> str:
    return f"""
        type: "Convolution"
        convolution_param {{
          num_output: {channels * mult} group: {channels}
          kernel_h: {kernel[0]} kernel_w: {kernel[1]}
          stride_h: {stride[0]} stride_w: {stride[1]}
          pad_h: {pad[0]} pad_w: {pad[1]}
          dilation: {dilation[0]} dilation: {dilation[1]}
          bias_term: {str(bias).lower()}
          weight_filler {{ type: "gaussian" std: 0.5 }}
          bias_filler {{ type: "gaussian" std: 0.5 }}
        }}"""


def _windows(x, kernel, stride, pad, dilation):
    """x (N, C, H, W) as float64 windows (N, C, kh, kw, Ho, Wo): window[..., i, j, oh, ow] =
    x[..., oh·s − p + i·d, ow·s − p + j·d], zero outside the image."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2))
    out = [(x.shape[2 + a] - dilation[a] * (kernel[a] - 1) - 1) // stride[a] + 1 for a in range(2)]
    rows = np.arange(kernel[0])[:, None] * dilation[0] + np.arange(out[0]) * stride[0]
    cols = np.arange(kernel[1])[:, None] * dilation[1] + np.arange(out[1]) * stride[1]
    return x[:, :, rows[:, None, :, None], cols[None, :, None, :]]


def reference(x, w, b, kernel, stride, pad, dilation):
    """y[n, c·M + m] = b + Σ_ij w[c·M + m, 0, i, j] · window(x[n, c])_ij, in float64."""
    win = _windows(x, kernel, stride, pad, dilation)
    n, c = x.shape[:2]
    per = np.asarray(w, np.float64).reshape(c, -1, *kernel)
    y = np.einsum("ncijhw,cmij->ncmhw", win, per).reshape(n, per.shape[0] * per.shape[1], -1)
    if b is not None:
        y += np.asarray(b, np.float64)[None, :, None]
    return y.reshape(n, -1, *win.shape[-2:])


def reference_gradients(x, w, dy, kernel, stride, pad, dilation):
    """(dx, dw) of ``reference`` for top gradient dy: dw sums dy × the windows; dx adds
    each window tap's w·dy back where the tap read (np.add.at), then drops the padding."""
    n, c, height, width = x.shape
    win = _windows(x, kernel, stride, pad, dilation)
    dy = np.asarray(dy, np.float64).reshape(n, c, -1, *dy.shape[-2:])
    per = np.asarray(w, np.float64).reshape(c, -1, *kernel)
    dw = np.einsum("ncijhw,ncmhw->cmij", win, dy).reshape(w.shape)
    out = dy.shape[-2:]
    rows = np.arange(kernel[0])[:, None] * dilation[0] + np.arange(out[0]) * stride[0]
    cols = np.arange(kernel[1])[:, None] * dilation[1] + np.arange(out[1]) * stride[1]
    contrib = np.einsum("cmij,ncmhw->ncijhw", per, dy)
    dxpad = np.zeros((n, c, height + 2 * pad[0], width + 2 * pad[1]))
    index = (slice(None), slice(None), rows[:, None, :, None], cols[None, :, None, :])
    np.add.at(dxpad, index, contrib)
    return dxpad[:, :, pad[0] : pad[0] + height, pad[1] : pad[1] + width], dw


def _layer(case, dtype, rng):
    n, c, mult, height, width, kernel, stride, pad, dilation, bias = case
    x = rng.normal(size=(n, c, height, width))
    text = _text(c, mult, kernel, stride, pad, dilation, bias)
    return build(text, [x], dtype=dtype), x, (kernel, stride, pad, dilation)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_the_formula(case, dtype, path):
    rng = np.random.default_rng(SEED)  # the test's own draws, whatever ran before it
    (layer, bottom, top), x, geometry = _layer(case, dtype, rng)
    assert (layer._depthwise is not None) == (path != "numpy")
    w = layer.blobs[0].data.copy()
    b = layer.blobs[1].data.copy() if case[-1] else None
    (y,) = forward(layer, bottom, top)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == np.float32 else {"rtol": 1e-12, "atol": 1e-12}
    np.testing.assert_allclose(y, reference(x, w, b, *geometry), **tol)

    dy = rng.normal(size=y.shape)
    top[0].diff = dy.astype(dtype)
    layer.blobs[0].diff = np.full(w.shape, 0.25, dtype)  # the weight gradient adds to it
    bottom[0].diff = np.full(x.shape, np.nan, dtype)  # the bottom gradient overwrites it
    layer.backward(top, [True], bottom)
    dx, dw = reference_gradients(x, w, dy, *geometry)
    np.testing.assert_allclose(bottom[0].diff, dx, **tol)
    np.testing.assert_allclose(layer.blobs[0].diff, dw + 0.25, **tol)


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]])
def test_gradients_pass_caffes_check(case, path):
    n, c, mult, height, width, kernel, stride, pad, dilation, bias = case
    text = _text(c, mult, kernel, stride, pad, dilation, bias)
    x = np.random.default_rng(SEED).normal(size=(n, c, height, width))
    assert check_gradient(text, [x]) > 0


@pytest.mark.parametrize("want", ["bottom", "weights"])
def test_backward_computes_only_what_is_asked(want, path):
    case = CASES[1]
    rng = np.random.default_rng(SEED)
    (layer, bottom, top), x, geometry = _layer(case, np.float64, rng)
    w = layer.blobs[0].data.copy()
    (y,) = forward(layer, bottom, top)
    dy = rng.normal(size=y.shape)
    top[0].diff = dy
    layer.param_propagate_down = [want == "weights", False]
    layer.blobs[0].diff = np.zeros(w.shape)
    bottom[0].diff = np.full(x.shape, 7.0)
    layer.backward(top, [want == "bottom"], bottom)
    dx, dw = reference_gradients(x, w, dy, *geometry)
    if want == "bottom":
        np.testing.assert_allclose(bottom[0].diff, dx, rtol=1e-12, atol=1e-12)
        assert not layer.blobs[0].diff.any()
    else:
        np.testing.assert_allclose(layer.blobs[0].diff, dw, rtol=1e-12, atol=1e-12)
        assert (bottom[0].diff == 7.0).all()


def test_a_single_channel_convolution_is_not_depthwise():
    """One input channel is an ordinary convolution: im2col + GEMM runs it either way."""
    (layer, _, _), _, _ = _layer(
        (2, 1, 4, 6, 6, (3, 3), (1, 1), (1, 1), (1, 1), True),
        np.float64,
        np.random.default_rng(SEED),
    )
    assert layer._depthwise is None
