"""BatchNorm, Scale and Bias on both CPU paths, numba's kernels (norm_kernels) and the numpy
code they override, against the same float64 formulas and numeric gradients: float32 and
float64, in place and not, batch and global statistics, one worker and split channels."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.builtin_layers import _jit, norm_kernels
from netforge.proto import pb
from tests.harness import KERNEL_PATHS, build, check_gradient, expect_path, kernel_path

BN_EPS = float(np.float32(1e-5))
#: float32 results against float64 formulas: a few ulps of the values' scale
TOLERANCE = {np.float32: {"rtol": 2e-5, "atol": 2e-5}, np.float64: {"rtol": 1e-12, "atol": 1e-12}}
CALLS = (
    "batch_norm_train_forward",
    "batch_norm_train_backward",
    "channel_affine",
    "scale_backward",
)


@pytest.fixture(params=KERNEL_PATHS)
def path(request, monkeypatch):
    """Each test body runs on numba's kernels, on one worker and with the channels split,
    and on the numpy path (``harness.kernel_path``)."""
    return kernel_path(request, monkeypatch, norm_kernels, CALLS)


def data(shape, seed=0, scale=3.0, offset=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape) + offset


def run_layer(text, bottoms, dtype, in_place, phase=pb.TRAIN, dy=None, setup=None):
    """Forward (and backward when ``dy`` is given) on fresh blobs; returns the layer, the
    top data, the bottom diffs and the parameter diffs, as float64."""
    # Copies: a float64 bottom is the caller's array itself, which in place is overwritten.
    layer, bottom, top = build(text, [b.copy() for b in bottoms], dtype=dtype, phase=phase)
    if setup is not None:
        setup(layer)
    if in_place:
        top = [bottom[0]]
        layer.reshape(bottom, top)
    layer.forward(bottom, top)
    y = top[0].data.astype(np.float64)
    if dy is None:
        return layer, y, None, None
    for blob in layer.blobs:
        blob.diff = np.zeros_like(blob.data)
    top[0].diff = np.array(dy, dtype=dtype)
    layer.backward(top, [True] * len(bottom), bottom)
    bottom_diffs = [b.diff.astype(np.float64) for b in bottom]
    return layer, y, bottom_diffs, [b.diff.astype(np.float64) for b in layer.blobs]


# -- float64 formulas ---------------------------------------------------------------------
def bn_axes(x):
    return (0,) + tuple(range(2, x.ndim))


def bn_forward(x, eps=BN_EPS):
    axes = bn_axes(x)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps), mean, var


def bn_backward(x, dy, eps=BN_EPS):
    """The batch-statistics gradient (dy − mean(dy) − y·mean(dy·y)) / sqrt(var + eps)."""
    y, _, var = bn_forward(x, eps)
    axes = bn_axes(x)
    mean_dy = dy.mean(axis=axes, keepdims=True)
    mean_dyy = (dy * y).mean(axis=axes, keepdims=True)
    return (dy - mean_dy - y * mean_dyy) / np.sqrt(var + eps)


# -- BatchNorm ----------------------------------------------------------------------------
BN_SHAPES = [(2, 3, 4, 5), (4, 6, 35), (5, 3), (7,)]


@pytest.mark.parametrize("shape", BN_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_batch_norm_train(shape, dtype, in_place, path):
    x, dy = data(shape), data(shape, seed=1, offset=0.0)
    text = 'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.5 }'
    layer, y, (dx,), _ = run_layer(text, [x], dtype, in_place, dy=dy)
    expect_path(path, "batch_norm_train_forward", "batch_norm_train_backward")
    x32 = x.astype(dtype).astype(np.float64)
    want, mean, var = bn_forward(x32)
    np.testing.assert_allclose(y, want, **TOLERANCE[dtype])
    np.testing.assert_allclose(dx, bn_backward(x32, dy.astype(dtype)), **TOLERANCE[dtype])
    # The running sums after one pass: maf·0 + mean, maf·0 + m/(m − 1)·var, maf·0 + 1.
    m = x.size // mean.size
    stats = [blob.data.astype(np.float64) for blob in layer.blobs]
    np.testing.assert_allclose(stats[0], mean.reshape(-1), **TOLERANCE[dtype])
    np.testing.assert_allclose(stats[1], var.reshape(-1) * m / (m - 1), **TOLERANCE[dtype])
    np.testing.assert_array_equal(stats[2], [1.0])


def test_batch_norm_float32_variance_about_a_far_mean(path):
    """Values 1000 away from 0 and 0.01 apart: E[x²] − E[x]² in float32 would lose every
    digit of the variance; the deviations about the mean keep it."""
    x = data((4, 3, 20, 20), scale=0.01, offset=1000.0)
    _, y, _, _ = run_layer('type: "BatchNorm"', [x], np.float32, False)
    x32 = x.astype(np.float32).astype(np.float64)
    # The mean rounded to float32 (ulp 6e-5 at 1000) is off by up to 0.3% of the spread;
    # E[x²] − E[x]² in float32 would be off by about 600 times the variance.
    np.testing.assert_allclose(y, bn_forward(x32)[0], rtol=0, atol=1e-2)


@pytest.mark.parametrize("norm", [2.0, 0.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_batch_norm_global_statistics(norm, dtype, in_place, path):
    """mean = blob0 / blob2 and var = blob1 / blob2, both 0 when blob2 is 0 (Caffe)."""
    x, dy = data((3, 4, 5, 6)), data((3, 4, 5, 6), seed=1)
    mean_sum, var_sum = np.array([1.0, -2.0, 0.5, 4.0]), np.array([4.0, 1.0, 9.0, 2.0])

    def load(layer):
        for blob, values in zip(layer.blobs, (mean_sum, var_sum, [norm])):
            blob.data = np.asarray(values, dtype=dtype)

    _, y, (dx,), _ = run_layer(
        'type: "BatchNorm"', [x], dtype, in_place, phase=pb.TEST, dy=dy, setup=load
    )
    expect_path(path, "channel_affine")
    x = x.astype(dtype).astype(np.float64)
    factor = 1 / norm if norm else 0.0
    mean = (factor * mean_sum).reshape(1, 4, 1, 1)
    std = np.sqrt(factor * var_sum + BN_EPS).reshape(1, 4, 1, 1)
    np.testing.assert_allclose(y, (x - mean) / std, **TOLERANCE[dtype])
    np.testing.assert_allclose(dx, dy.astype(dtype) / std, **TOLERANCE[dtype])


@pytest.mark.parametrize("global_stats", ["false", "true"])
def test_batch_norm_gradient(global_stats, path):
    text = f'type: "BatchNorm" batch_norm_param {{ use_global_stats: {global_stats} eps: 0.1 }}'
    shape = (2, 3, 3, 4)
    weights = [np.random.default_rng(11).standard_normal(shape)]
    check_gradient(text, [data(shape)], threshold=1e-4, check_params=False, top_weights=weights)


def test_batch_norm_nan_stays_in_its_channel(path):
    """A NaN (a diverging net) spreads to its own channel's outputs, as numpy's does, and
    to no other: the kernels keep IEEE NaN arithmetic."""
    x = data((2, 3, 4, 4))
    x[1, 1, 2, 3] = np.nan
    _, y, _, _ = run_layer('type: "BatchNorm"', [x], np.float32, False)
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(y[:, [0, 2]]).all()


# -- Scale and Bias -----------------------------------------------------------------------
UNIFORM = 'filler { type: "uniform" min: 0.5 max: 1.5 }'
BIAS = 'bias_term: true bias_filler { type: "uniform" min: -1 max: 1 }'
#: prototxt parameters, and the product of the bottom's axes before the scale's
SCALE_CASES = {
    "channel": ("", 2),
    "channel+bias": (BIAS, 2),
    "two-axes": ("axis: 1 num_axes: 2", 2),
    "last-axis+bias": (f"axis: 3 {BIAS}", 24),
    "scalar+bias": (f"num_axes: 0 {BIAS}", 1),
}


def scale_reference(x, dy, s, b, outer):
    """y = x·s + b, dx = dy·s, ds = Σ dy·x, db = Σ dy over the (outer, s.size, rest) view."""
    x3 = x.reshape(outer, s.size, -1)
    dy3 = dy.reshape(x3.shape)
    s3, b3 = s.reshape(1, -1, 1), b.reshape(1, -1, 1)
    return (
        (x3 * s3 + b3).reshape(x.shape),
        (dy3 * s3).reshape(x.shape),
        (dy3 * x3).sum(axis=(0, 2)),
        dy3.sum(axis=(0, 2)),
    )


@pytest.mark.parametrize("case", sorted(SCALE_CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_scale(case, dtype, in_place, path):
    params, outer = SCALE_CASES[case]
    text = f'type: "Scale" scale_param {{ {params} {UNIFORM} }}'
    x, dy = data((2, 3, 4, 5)), data((2, 3, 4, 5), seed=1)
    layer, y, (dx,), diffs = run_layer(text, [x], dtype, in_place, dy=dy)
    expect_path(path, "channel_affine", "scale_backward")
    s = layer.blobs[0].data.astype(np.float64)
    b = layer.blobs[1].data.astype(np.float64) if len(layer.blobs) > 1 else np.zeros(s.shape)
    x, dy = x.astype(dtype).astype(np.float64), dy.astype(dtype).astype(np.float64)
    want_y, want_dx, want_ds, want_db = scale_reference(x, dy, s, b, outer)
    np.testing.assert_allclose(y, want_y, **TOLERANCE[dtype])
    np.testing.assert_allclose(dx, want_dx, **TOLERANCE[dtype])
    np.testing.assert_allclose(diffs[0], want_ds.reshape(s.shape), **TOLERANCE[dtype])
    if len(diffs) > 1:
        np.testing.assert_allclose(diffs[1], want_db.reshape(s.shape), **TOLERANCE[dtype])


@pytest.mark.parametrize("in_place", [False, True])
def test_scale_two_bottoms_and_frozen_parameters(in_place, path):
    x, s, dy = data((2, 3, 4, 5)), data((3, 4), seed=2), data((2, 3, 4, 5), seed=1)
    text = f'type: "Scale" scale_param {{ {BIAS} }}'
    layer, bottom, top = build(text, [x.copy(), s])
    if in_place:
        top = [bottom[0]]
        layer.reshape(bottom, top)
    layer.forward(bottom, top)
    b = layer.blobs[0].data.copy()
    np.testing.assert_allclose(top[0].data, x * s[None, :, :, None] + b[None, :, :, None])
    top[0].diff = dy.copy()
    bottom[1].diff = np.full(s.shape, 7.0)
    layer.blobs[0].diff = np.full(s.shape, 5.0)
    # The bias frozen (lr_mult 0): its diff stays as it was; bottom 1's diff is overwritten.
    layer.param_propagate_down = [False]
    layer.backward(top, [True, True], bottom)
    np.testing.assert_allclose(bottom[1].diff, (dy * x).sum(axis=(0, 3)), rtol=1e-12)
    np.testing.assert_array_equal(layer.blobs[0].diff, np.full(s.shape, 5.0))
    np.testing.assert_allclose(bottom[0].diff, dy * s[None, :, :, None], rtol=1e-12)
    expect_path(path, "channel_affine", "scale_backward")


def test_scale_frozen_scale_and_bias_propagate_only_dx(path):
    x, dy = data((2, 3, 4, 5)), data((2, 3, 4, 5), seed=1)
    layer, bottom, top = build(f'type: "Scale" scale_param {{ {UNIFORM} {BIAS} }}', [x])
    layer.forward(bottom, top)
    top[0].diff = dy.copy()
    layer.param_propagate_down = [False, False]
    layer.backward(top, [True], bottom)
    s = layer.blobs[0].data.reshape(1, 3, 1, 1)
    np.testing.assert_allclose(bottom[0].diff, dy * s, rtol=1e-12)
    expect_path(path, "channel_affine")


@pytest.mark.parametrize("case", sorted(SCALE_CASES))
def test_scale_gradient(case, path):
    params, _ = SCALE_CASES[case]
    text = f'type: "Scale" scale_param {{ {params} {UNIFORM} }}'
    check_gradient(text, [data((2, 3, 4, 5))], threshold=1e-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("in_place", [False, True])
def test_bias(dtype, in_place, path):
    text = 'type: "Bias" bias_param { filler { type: "uniform" min: -1 max: 1 } }'
    x, dy = data((2, 3, 4, 5)), data((2, 3, 4, 5), seed=1)
    layer, y, (dx,), (db,) = run_layer(text, [x], dtype, in_place, dy=dy)
    expect_path(path, "channel_affine")
    b = layer.blobs[0].data.astype(np.float64).reshape(1, 3, 1, 1)
    x, dy = x.astype(dtype).astype(np.float64), dy.astype(dtype).astype(np.float64)
    np.testing.assert_allclose(y, x + b, **TOLERANCE[dtype])
    np.testing.assert_allclose(dx, dy, **TOLERANCE[dtype])
    np.testing.assert_allclose(db, dy.sum(axis=(0, 2, 3)), **TOLERANCE[dtype])


# -- the two paths agree ------------------------------------------------------------------
def test_kernels_and_numpy_agree_in_float32_on_a_resnet_shape(monkeypatch):
    """One BatchNorm + Scale training step on a (4, 64, 28, 28) float32 batch, large enough
    for the kernels to split the channels: both paths agree to float32 rounding."""
    if not _jit.enabled():
        pytest.skip("numba (the jit extra) is not installed or NETFORGE_JIT=0")
    x, dy = data((4, 64, 28, 28)), data((4, 64, 28, 28), seed=1)
    monkeypatch.setattr(norm_kernels, "SPLIT_MIN", 1 << 16)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(_jit, "enabled", lambda enabled=enabled: enabled)
        _, y, (dx,), _ = run_layer('type: "BatchNorm"', [x], np.float32, True, dy=dy)
        text = f'type: "Scale" scale_param {{ {UNIFORM} {BIAS} }}'
        _, z, (dz,), diffs = run_layer(text, [y], np.float32, True, dy=dy)
        results.append([y, dx, z, dz, *diffs])
    for kernel, numpy_result in zip(*results):
        scale = np.abs(numpy_result).max()
        np.testing.assert_allclose(kernel, numpy_result, rtol=1e-4, atol=1e-5 * scale)


def test_usable_only_for_contiguous_float_numpy_arrays(monkeypatch):
    monkeypatch.setattr(_jit, "enabled", lambda: True)
    a = np.zeros((2, 3, 4), np.float32)
    assert _jit.usable(a, a)
    assert not _jit.usable(a, a.astype(np.float64))
    assert not _jit.usable(a.astype(np.float16))
    assert not _jit.usable(a, a[:, :, ::2])
    monkeypatch.setattr(_jit, "enabled", lambda: False)
    assert not _jit.usable(a)


def test_kernels_over_one_memory_through_two_names():
    """In place through a second view of the input (not the object itself: the scalar
    loops) gives what the one-name loops and the formulas give."""
    if not _jit.enabled():
        pytest.skip("numba (the jit extra) is not installed or NETFORGE_JIT=0")
    x = data((2, 3, 40)).astype(np.float32)
    scale, shift = np.float32([0.5, 2.0, -1.0]), np.float32([1.0, 0.0, 3.0])
    want = x * scale[:, None] + shift[:, None]
    for target in (lambda a: a, lambda a: a.reshape(a.shape)):
        y = x.copy()
        norm_kernels.channel_affine(y, scale, shift, target(y))
        np.testing.assert_allclose(y, want, rtol=1e-6)
        y, centered = x.copy(), np.empty_like(x)
        mean, var = norm_kernels.batch_norm_train_forward(y, target(y), centered, BN_EPS)
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=1e-6)
        np.testing.assert_allclose(var, x64.var(axis=(0, 2)), rtol=1e-5)
        np.testing.assert_allclose(y, bn_forward(x64)[0], rtol=1e-5, atol=1e-5)
