"""MAX and AVE Pooling on both CPU paths, numba's kernels (pool_kernels) and the numpy phase
layout they override, against the same float64 reference written from Caffe's loops
(pooling_layer.cpp): CEIL/FLOOR output sizes, padding, the AVE divisor clipped to the padded
extent, the first maximum in scan order and the mask top's flat indices; numeric gradients;
float32 and float64; one worker and planes split between the workers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from test_layers_vision import pooled_size

from netforge.builtin_layers import _jit, pool_kernels
from tests.harness import KERNEL_PATHS, build, check_gradient, expect_path, forward, kernel_path

CALLS = ("max_forward", "max_backward", "ave_forward", "ave_backward")
TOLERANCE = {np.float32: {"rtol": 1e-6, "atol": 1e-6}, np.float64: {"rtol": 1e-13, "atol": 1e-13}}

# (bottom shape, kernel, stride, pad, ceil)
CASES = [
    ((2, 3, 9, 10), (3, 3), (2, 2), (0, 0), True),  # CIFAR-10 quick's pools, CEIL overhang
    ((1, 2, 8, 8), (2, 2), (2, 2), (0, 0), True),  # batch 1, windows that tile the plane
    ((3, 2, 7, 9), (3, 3), (1, 1), (1, 1), True),  # stride 1 with padding
    ((2, 2, 11, 10), (5, 5), (3, 3), (2, 2), True),  # stride 3, kernel 5, padding
    ((2, 2, 9, 9), (3, 3), (2, 2), (1, 1), True),  # the last window starts in the padding
    ((2, 2, 9, 9), (3, 3), (2, 2), (1, 1), False),  # FLOOR: an input row no window reads
    ((2, 3, 10, 7), (3, 2), (2, 1), (1, 0), True),  # non-square kernel, stride and pad
    ((1, 2, 12, 13), (2, 5), (3, 2), (0, 2), False),  # stride 3 across, 2 down
    ((5, 4, 6, 5), (2, 3), (1, 3), (1, 1), True),  # many items, odd width at stride 3
    # More planes than the kernels stack in one group (113 of these 5 × 5 planes)
    ((16, 16, 5, 5), (2, 2), (2, 2), (0, 0), True),
    # A plane whose output rows take several blocks of the kernels (19 rows of 52 a block)
    ((1, 2, 40, 50), (3, 3), (1, 1), (1, 1), True),
]


@pytest.fixture(params=KERNEL_PATHS)
def path(request, monkeypatch):
    """Each test body runs on numba's kernels, on one worker and with the planes split, and
    on the numpy path (``harness.kernel_path``)."""
    # The tests' planes are small: let AVE forward take the kernel on them too.
    monkeypatch.setattr(pool_kernels, "AVE_PLANE_MIN", 0)
    return kernel_path(request, monkeypatch, pool_kernels, CALLS)


def text(method, kernel, stride, pad, ceil):
    return (
        f'type: "Pooling" pooling_param {{ pool: {method} kernel_h: {kernel[0]} '
        f"kernel_w: {kernel[1]} stride_h: {stride[0]} stride_w: {stride[1]} pad_h: {pad[0]} "
        f"pad_w: {pad[1]} round_mode: {'CEIL' if ceil else 'FLOOR'} }}"
    )


def reference(x, kernel, stride, pad, ceil):
    """Caffe's loops in float64, one window at a time: MAX values and masks (the first
    strictly greater element in scan order), AVE values, and each window's input positions
    with its AVE weight 1 / (window clipped to the padded extent), for the gradients."""
    n, c, height, width = x.shape
    out = pooled_size((height, width), kernel, stride, pad, ceil)
    top_max, mask, top_ave = (np.zeros((n, c, *out)) for _ in range(3))
    windows = {}
    for i, j in itertools.product(range(out[0]), range(out[1])):
        hs, ws = i * stride[0] - pad[0], j * stride[1] - pad[1]
        he, we = min(hs + kernel[0], height + pad[0]), min(ws + kernel[1], width + pad[1])
        weight = 1.0 / ((he - hs) * (we - ws))
        cells = [
            (h, w)
            for h in range(max(hs, 0), min(he, height))
            for w in range(max(ws, 0), min(we, width))
        ]
        windows[i, j] = (cells, weight)
        for item, channel in itertools.product(range(n), range(c)):
            plane = x[item, channel]
            best, where = -np.inf, -1
            for h, w in cells:
                if plane[h, w] > best:
                    best, where = plane[h, w], h * width + w
            top_max[item, channel, i, j] = best
            mask[item, channel, i, j] = where
            top_ave[item, channel, i, j] = sum(plane[h, w] for h, w in cells) * weight
    return top_max, mask, top_ave, windows


def reference_grads(shape, dy, mask, windows):
    """The bottom gradients: MAX routes each top gradient to its mask position, AVE spreads
    it, times the window's weight, over the window's inputs."""
    n, c, height, width = shape
    d_max, d_ave = np.zeros(shape), np.zeros(shape)
    for (i, j), (cells, weight) in windows.items():
        for item, channel in itertools.product(range(n), range(c)):
            g = dy[item, channel, i, j]
            where = int(mask[item, channel, i, j])
            d_max[item, channel, where // width, where % width] += g
            for h, w in cells:
                d_ave[item, channel, h, w] += g * weight
    return d_max, d_ave


def run_both(method, case, x, dy, dtype):
    """Forward and backward of one layer; returns the tops and the bottom gradient."""
    _, kernel, stride, pad, ceil = case
    tops = 2 if method == "MAX" else 1
    layer, bottom, top = build(
        text(method, kernel, stride, pad, ceil), [x], dtype=dtype, num_tops=tops
    )
    outs = forward(layer, bottom, top)
    top[0].diff = dy.astype(dtype)
    layer.backward(top, [True], bottom)
    return outs, bottom[0].diff.astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_max_and_ave_match_caffe_loops(path, case, dtype):
    rng = np.random.default_rng(3)
    shape = case[0]
    # Values of the data type exactly, so that the float64 reference sees the same inputs;
    # all negative in one item, so that zero padding would win where the lowest value cannot.
    x = rng.standard_normal(shape)
    x[0] = -np.abs(x[0]) - 1
    x = x.astype(dtype).astype(np.float64)
    top_max, mask, top_ave, windows = reference(x, *case[1:])
    dy = rng.standard_normal(top_max.shape).astype(dtype).astype(np.float64)
    d_max, d_ave = reference_grads(shape, dy, mask, windows)

    (y, m), dx = run_both("MAX", case, x, dy, dtype)
    np.testing.assert_array_equal(y, top_max)
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_allclose(dx, d_max, **TOLERANCE[dtype])
    expect_path(path, "max_forward", "max_backward")

    path[1].clear()
    (y,), dx = run_both("AVE", case, x, dy, dtype)
    np.testing.assert_allclose(y, top_ave, **TOLERANCE[dtype])
    np.testing.assert_allclose(dx, d_ave, **TOLERANCE[dtype])
    expect_path(path, "ave_forward", "ave_backward")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES)
def test_max_ties_go_to_the_first_maximum_in_scan_order(path, case, dtype):
    # Three levels, as after a ReLU: most windows hold several maxima.
    x = np.random.default_rng(4).integers(0, 3, size=case[0]).astype(np.float64)
    top_max, mask, _, windows = reference(x, *case[1:])
    dy = np.random.default_rng(5).standard_normal(top_max.shape).astype(dtype)
    d_max, _ = reference_grads(case[0], dy.astype(np.float64), mask, windows)
    (y, m), dx = run_both("MAX", case, x, dy, dtype)
    np.testing.assert_array_equal(y, top_max)
    np.testing.assert_array_equal(m, mask)
    np.testing.assert_allclose(dx, d_max, **TOLERANCE[dtype])
    expect_path(path, "max_forward", "max_backward")


@pytest.mark.parametrize("case", CASES[:5])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_numeric_gradients(path, case, method):
    shape = case[0]
    # Distinct values 0.1 apart: no maximum within a step of another.
    x = np.random.default_rng(6).permutation(math.prod(shape)).reshape(shape) * 0.1
    check_gradient(text(method, *case[1:]), [x], stepsize=1e-3, threshold=1e-3)
    expect_path(path, f"{method.lower()}_forward", f"{method.lower()}_backward")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_pooling(path, dtype):
    x = np.random.default_rng(7).standard_normal((3, 4, 6, 7)).astype(dtype).astype(np.float64)
    dy = np.random.default_rng(8).standard_normal((3, 4, 1, 1))
    flat = x.reshape(3, 4, -1)
    layer, bottom, top = build(
        'type: "Pooling" pooling_param { global_pooling: true }', [x], dtype=dtype, num_tops=2
    )
    y, mask = forward(layer, bottom, top)
    np.testing.assert_array_equal(y[..., 0, 0], flat.max(-1))
    np.testing.assert_array_equal(mask[..., 0, 0], flat.argmax(-1))
    top[0].diff = dy.astype(dtype)
    layer.backward(top, [True], bottom)
    expected = np.zeros_like(flat)
    np.put_along_axis(expected, flat.argmax(-1)[..., None], dy.reshape(3, 4, 1), -1)
    np.testing.assert_allclose(bottom[0].diff.reshape(3, 4, -1), expected, **TOLERANCE[dtype])
    expect_path(path, "max_forward", "max_backward")

    path[1].clear()
    layer, bottom, top = build(
        'type: "Pooling" pooling_param { pool: AVE global_pooling: true }', [x], dtype=dtype
    )
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y[..., 0, 0], flat.mean(-1), **TOLERANCE[dtype])
    top[0].diff = dy.astype(dtype)
    layer.backward(top, [True], bottom)
    expected = np.broadcast_to(dy / 42, x.shape)
    np.testing.assert_allclose(bottom[0].diff, expected, **TOLERANCE[dtype])
    # Global AVE forward stays one BLAS matrix-vector product on both paths.
    expect_path(path, "ave_backward")


def test_max_window_of_minus_infinity_gets_caffe_s_mask(monkeypatch):
    """The kernels start each window at the lowest value with mask -1, as Caffe starts at
    -FLT_MAX: a window whose inputs are all -inf gives that value, mask -1 and no gradient."""
    if not _jit.enabled():
        pytest.skip("numba (the jit extra) is not installed or NETFORGE_JIT=0")
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[..., :2, :2] = -np.inf
    layer, bottom, top = build(
        'type: "Pooling" pooling_param { kernel_size: 2 stride: 2 }',
        [x],
        dtype=np.float32,
        num_tops=2,
    )
    y, mask = forward(layer, bottom, top)
    assert y[0, 0, 0, 0] == np.finfo(np.float32).min and mask[0, 0, 0, 0] == -1
    np.testing.assert_array_equal(mask[0, 0], [[-1, 2], [8, 10]])
    top[0].diff = np.ones(y.shape, np.float32)
    layer.backward(top, [True], bottom)
    expected = np.zeros((4, 4))
    expected[[0, 2, 2], [2, 0, 2]] = 1
    np.testing.assert_array_equal(bottom[0].diff[0, 0], expected)


def test_max_passes_a_nan_on_as_numpy_does(path):
    """A NaN upstream must reach the loss, where the solver names the diverged layer: MAX
    gives NaN for every window holding one, on both paths, and the other windows' maxima."""
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 1, 0] = np.nan  # in the first window only, not its maximum's position
    layer, bottom, top = build(
        'type: "Pooling" pooling_param { kernel_size: 2 stride: 2 }', [x], dtype=np.float32
    )
    (y,) = forward(layer, bottom, top)
    assert np.isnan(y[0, 0, 0, 0])
    np.testing.assert_array_equal(y[0, 0].ravel()[1:], [7, 13, 15])
