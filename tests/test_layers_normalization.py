"""BatchNorm, MVN, Scale and Bias: forward against float64 formulas, BatchNorm's running
statistics and phases, gradients with Caffe's checker settings, in-place runs."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.backend import to_numpy
from netforge.blob import Blob
from netforge.errors import ConfigError, ShapeError
from netforge.proto import pb
from tests.harness import build, check_gradient, forward, run
from tests.test_layers_activation import check_in_place, f32, gaussian

SHAPE = (2, 3, 4, 5)
#: the default eps of BatchNorm and MVN, as the single-precision proto fields hold them
BN_EPS, MVN_EPS = f32(1e-5), f32(1e-9)


def weights(shape, seed=11):
    """Random top weights: the objective Σ w·y, since ½Σy² is nearly constant after a
    normalisation and would hide a wrong gradient (Caffe checks these exhaustively)."""
    return [np.random.default_rng(seed).standard_normal(shape)]


def set_blob(layer, i, values, backend):
    layer.blobs[i].data = backend.asarray(np.asarray(values, dtype=np.float64))


# -- BatchNorm -----------------------------------------------------------------------------
def batch_norm_reference(x, eps=BN_EPS):
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(var + eps)


@pytest.mark.parametrize("shape", [SHAPE, (5, 3)])
def test_batch_norm_train_uses_batch_statistics(shape, backend):
    x = 3 * gaussian(shape) + 1
    (y,) = run('type: "BatchNorm"', [x], backend=backend)
    np.testing.assert_allclose(y, batch_norm_reference(x), rtol=1e-10, atol=1e-10)


def test_batch_norm_one_axis_is_one_channel(backend):
    x = gaussian((6,))
    layer, bottom, top = build('type: "BatchNorm"', [x], backend=backend)
    assert [b.shape for b in layer.blobs] == [(1,), (1,), (1,)]
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, (x - x.mean()) / np.sqrt(x.var() + BN_EPS))


def test_batch_norm_running_statistics_after_two_passes(backend):
    text = 'type: "BatchNorm" batch_norm_param { moving_average_fraction: 0.9 }'
    x1, x2 = 2 * gaussian(seed=1) + 1, gaussian(seed=2) - 3
    layer, bottom, top = build(text, [x1], backend=backend)
    assert [b.shape for b in layer.blobs] == [(3,), (3,), (1,)]
    forward(layer, bottom, top)
    bottom[0].data = backend.asarray(x2)
    forward(layer, bottom, top)
    maf, m = f32(0.9), 2 * 4 * 5
    means = [x.mean(axis=(0, 2, 3)) for x in (x1, x2)]
    variances = [x.var(axis=(0, 2, 3)) * m / (m - 1) for x in (x1, x2)]
    np.testing.assert_allclose(to_numpy(layer.blobs[2].data), [maf * 1 + 1])
    np.testing.assert_allclose(to_numpy(layer.blobs[0].data), maf * means[0] + means[1])
    np.testing.assert_allclose(to_numpy(layer.blobs[1].data), maf * variances[0] + variances[1])


def test_batch_norm_test_phase_uses_stored_statistics(backend):
    x = gaussian()
    layer, bottom, top = build('type: "BatchNorm"', [x], backend=backend, phase=pb.TEST)
    mean_sum, var_sum, norm = np.array([1.0, -2.0, 0.5]), np.array([4.0, 1.0, 9.0]), 2.0
    for i, values in enumerate((mean_sum, var_sum, [norm])):
        set_blob(layer, i, values, backend)
    (y,) = forward(layer, bottom, top)
    mean = (mean_sum / norm).reshape(1, 3, 1, 1)
    var = (var_sum / norm).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + BN_EPS))
    # Global statistics are constants: the gradient is dy / sqrt(var + eps), and no
    # statistic moves.
    dy = gaussian(seed=4)
    top[0].diff = backend.asarray(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(to_numpy(bottom[0].diff), dy / np.sqrt(var + BN_EPS))
    np.testing.assert_array_equal(to_numpy(layer.blobs[2].data), [norm])


def test_batch_norm_zero_normaliser_means_zero_statistics(backend):
    x = gaussian()
    layer, bottom, top = build('type: "BatchNorm"', [x], backend=backend, phase=pb.TEST)
    set_blob(layer, 0, [5.0, 5.0, 5.0], backend)
    set_blob(layer, 1, [7.0, 7.0, 7.0], backend)
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, x / np.sqrt(BN_EPS))


@pytest.mark.parametrize(
    ("phase", "flag", "global_stats"),
    [
        (pb.TRAIN, "", False),
        (pb.TEST, "", True),
        (pb.TEST, "false", False),
        (pb.TRAIN, "true", True),
    ],
)
def test_batch_norm_use_global_stats_default_and_override(phase, flag, global_stats, backend):
    text = 'type: "BatchNorm"' + (
        f" batch_norm_param {{ use_global_stats: {flag} }}" if flag else ""
    )
    x = gaussian() + 2
    layer, bottom, top = build(text, [x], backend=backend, phase=phase)
    (y,) = forward(layer, bottom, top)
    if global_stats:
        np.testing.assert_allclose(y, x / np.sqrt(BN_EPS))
        np.testing.assert_array_equal(to_numpy(layer.blobs[2].data), [0.0])
    else:
        np.testing.assert_allclose(y, batch_norm_reference(x), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(to_numpy(layer.blobs[2].data), [1.0])


@pytest.mark.parametrize("shape", [SHAPE, (4, 3)])
def test_batch_norm_gradient(shape, backend):
    text = 'type: "BatchNorm" batch_norm_param { eps: 0.1 }'
    check_gradient(
        text,
        [gaussian(shape)],
        stepsize=1e-2,
        threshold=1e-4,
        top_weights=weights(shape),
        backend=backend,
    )


def test_batch_norm_gradient_with_global_stats(backend):
    text = 'type: "BatchNorm" batch_norm_param { use_global_stats: true eps: 0.5 }'
    check_gradient(
        text,
        [gaussian()],
        stepsize=1e-2,
        threshold=1e-4,
        check_params=False,
        top_weights=weights(SHAPE),
        backend=backend,
    )


@pytest.mark.parametrize("phase", [pb.TRAIN, pb.TEST])
def test_batch_norm_in_place(phase, backend):
    check_in_place(
        'type: "BatchNorm" batch_norm_param { eps: 0.1 }', [gaussian()], backend, phase=phase
    )


def test_batch_norm_statistics_are_not_learned():
    layer, _, _ = build('type: "BatchNorm"', [gaussian()])
    assert [p.lr_mult for p in layer.layer_param.param] == [0, 0, 0]
    text = 'type: "BatchNorm" param { lr_mult: 0 } param { lr_mult: 1 }'
    with pytest.raises(ConfigError, match="lr_mult"):
        build(text, [gaussian()])


def test_batch_norm_keeps_loaded_statistics_and_checks_them():
    x = gaussian()
    layer, bottom, top = build('type: "BatchNorm"', [x], phase=pb.TEST)
    loaded = [Blob((3,), np.float64), Blob((3,), np.float64), Blob((1,), np.float64)]
    loaded[2].data = np.array([1.0])
    layer.blobs[:] = loaded
    layer.setup(bottom, top)
    assert all(a is b for a, b in zip(layer.blobs, loaded))
    layer.blobs[1] = Blob((4,), np.float64)
    with pytest.raises(ShapeError, match="statistics"):
        layer.setup(bottom, top)


# -- MVN -----------------------------------------------------------------------------------
def mvn_reference(x, axes, normalize_variance=True, eps=MVN_EPS):
    centered = x - x.mean(axis=axes, keepdims=True)
    if not normalize_variance:
        return centered
    return centered / (np.sqrt((centered**2).mean(axis=axes, keepdims=True)) + eps)


MVN_CASES = {
    "default": ('type: "MVN"', (2, 3)),
    "across_channels": ('type: "MVN" mvn_param { across_channels: true }', (1, 2, 3)),
    "mean_only": ('type: "MVN" mvn_param { normalize_variance: false }', (2, 3)),
    "mean_only_across": (
        'type: "MVN" mvn_param { normalize_variance: false across_channels: true }',
        (1, 2, 3),
    ),
}


@pytest.mark.parametrize("case", sorted(MVN_CASES))
def test_mvn_forward(case, backend):
    text, axes = MVN_CASES[case]
    x = 2 * gaussian() + 1
    (y,) = run(text, [x], backend=backend)
    np.testing.assert_allclose(y, mvn_reference(x, axes, "false" not in text), rtol=1e-10)


def test_mvn_adds_eps_to_the_standard_deviation(backend):
    x = gaussian()
    (y,) = run('type: "MVN" mvn_param { eps: 0.5 }', [x], backend=backend)
    np.testing.assert_allclose(y, mvn_reference(x, (2, 3), eps=0.5))


def test_mvn_top_is_the_legacy_four_axis_shape(backend):
    x = gaussian((4, 3))
    (y,) = run('type: "MVN" mvn_param { across_channels: true }', [x], backend=backend)
    assert y.shape == (4, 3, 1, 1)
    np.testing.assert_allclose(y.reshape(4, 3), mvn_reference(x, (1,)))
    with pytest.raises(ShapeError, match="1 to 4 axes"):
        run('type: "MVN"', [gaussian((1, 2, 2, 2, 2))])


@pytest.mark.parametrize("case", sorted(MVN_CASES))
def test_mvn_gradient(case, backend):
    text, _ = MVN_CASES[case]
    check_gradient(
        text,
        [gaussian()],
        stepsize=1e-2,
        threshold=1e-3,
        top_weights=weights(SHAPE),
        backend=backend,
    )


@pytest.mark.parametrize("case", sorted(MVN_CASES))
def test_mvn_in_place(case, backend):
    check_in_place(MVN_CASES[case][0], [gaussian()], backend)


# -- Scale ---------------------------------------------------------------------------------
UNIFORM = 'filler { type: "uniform" min: 0.5 max: 1.5 }'
BIAS_UNIFORM = 'bias_filler { type: "uniform" min: -1 max: 1 }'


def broadcast(values, axis, ndim):
    """``values`` placed at ``axis`` of an ``ndim``-axis array, 1 elsewhere."""
    values = np.asarray(values)
    return values.reshape((1,) * axis + values.shape + (1,) * (ndim - axis - values.ndim))


@pytest.mark.parametrize(
    ("params", "axis", "shape"),
    [
        ("", 1, (3,)),
        ("axis: 0 num_axes: 2", 0, (2, 3)),
        ("axis: 1 num_axes: -1", 1, (3, 4, 5)),
        ("axis: -2 num_axes: 2", 2, (4, 5)),
        ("num_axes: 0", 0, ()),
    ],
)
@pytest.mark.parametrize("bias", [False, True])
def test_scale_learned_forward(params, axis, shape, bias, backend):
    extra = f"bias_term: true {BIAS_UNIFORM}" if bias else ""
    text = f'type: "Scale" scale_param {{ {params} {UNIFORM} {extra} }}'
    x = gaussian()
    layer, bottom, top = build(text, [x], backend=backend)
    assert [b.shape for b in layer.blobs] == [shape] * (1 + bias)
    scale = to_numpy(layer.blobs[0].data)
    (y,) = forward(layer, bottom, top)
    expected = x * broadcast(scale, axis, 4)
    if bias:
        expected = expected + broadcast(to_numpy(layer.blobs[1].data), axis, 4)
    np.testing.assert_allclose(y, expected)


def test_scale_default_fillers_are_one_and_zero(backend):
    x = gaussian()
    layer, bottom, top = build(
        'type: "Scale" scale_param { bias_term: true }', [x], backend=backend
    )
    np.testing.assert_array_equal(to_numpy(layer.blobs[0].data), np.ones(3))
    np.testing.assert_array_equal(to_numpy(layer.blobs[1].data), np.zeros(3))
    np.testing.assert_array_equal(forward(layer, bottom, top)[0], x)


@pytest.mark.parametrize(
    ("params", "scale_shape", "axis"),
    [("", (3,), 1), ("", (3, 4), 1), ("axis: 0", (2, 3, 4, 5), 0), ("", (), 0)],
)
@pytest.mark.parametrize("bias", [False, True])
def test_scale_two_bottoms(params, scale_shape, axis, bias, backend):
    extra = f"bias_term: true {BIAS_UNIFORM}" if bias else ""
    text = f'type: "Scale" scale_param {{ {params} {extra} }}'
    x, s = gaussian(), gaussian(scale_shape, seed=3)
    layer, bottom, top = build(text, [x, s], backend=backend)
    assert [b.shape for b in layer.blobs] == [scale_shape] * bias
    (y,) = forward(layer, bottom, top)
    expected = x * broadcast(s, axis, 4)
    if bias:
        expected = expected + broadcast(to_numpy(layer.blobs[0].data), axis, 4)
    np.testing.assert_allclose(y, expected)
    check_gradient(text, [x, s], stepsize=1e-2, threshold=1e-3, backend=backend)
    check_in_place(text, [x, s], backend)


@pytest.mark.parametrize(
    "params",
    ["", "axis: 0 num_axes: 2", "num_axes: -1", "num_axes: 0", "axis: 2 num_axes: 1"],
)
@pytest.mark.parametrize("bias", [False, True])
def test_scale_learned_gradient_and_in_place(params, bias, backend):
    extra = f"bias_term: true {BIAS_UNIFORM}" if bias else ""
    text = f'type: "Scale" scale_param {{ {params} {UNIFORM} {extra} }}'
    check_gradient(text, [gaussian()], stepsize=1e-2, threshold=1e-3, backend=backend)
    check_in_place(text, [gaussian()], backend)


def test_scale_accumulates_param_diffs_but_overwrites_bottom_diffs(backend):
    x, s, dy = gaussian(), gaussian((3,), seed=1), gaussian(seed=2)
    expected = (dy * x).sum(axis=(0, 2, 3))
    layer, bottom, top = build('type: "Scale"', [x], backend=backend)
    forward(layer, bottom, top)
    top[0].diff = backend.asarray(dy)
    layer.blobs[0].diff = backend.asarray(np.full(3, 10.0))
    layer.backward(top, [False], bottom)
    np.testing.assert_allclose(to_numpy(layer.blobs[0].diff), 10 + expected)
    layer, bottom, top = build('type: "Scale"', [x, s], backend=backend)
    forward(layer, bottom, top)
    top[0].diff = backend.asarray(dy)
    bottom[1].diff = backend.asarray(np.full(3, 10.0))
    layer.backward(top, [True, True], bottom)
    np.testing.assert_allclose(to_numpy(bottom[1].diff), expected)
    np.testing.assert_allclose(to_numpy(bottom[0].diff), dy * s.reshape(1, 3, 1, 1))


@pytest.mark.parametrize(
    ("text", "bottoms", "error"),
    [
        ('type: "Scale"', [gaussian(), gaussian((4,))], ShapeError),
        ('type: "Scale" scale_param { axis: 3 num_axes: 2 }', [gaussian()], ShapeError),
        ('type: "Scale" scale_param { axis: 4 }', [gaussian()], ShapeError),
        ('type: "Scale" scale_param { num_axes: -2 }', [gaussian()], ConfigError),
        ('type: "Bias"', [gaussian(), gaussian((3, 5))], ShapeError),
    ],
)
def test_scale_and_bias_shape_errors(text, bottoms, error):
    with pytest.raises(error, match="layer 'layer'"):
        build(text, bottoms)


def test_scale_rejects_loaded_weights_of_the_wrong_number():
    x = gaussian()
    layer, bottom, top = build('type: "Scale"', [x])
    layer.blobs.append(Blob((3,), np.float64))
    with pytest.raises(ConfigError, match="parameter blobs"):
        layer.setup(bottom, top)


# -- Bias ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("params", "axis", "shape"),
    [("", 1, (3,)), ("axis: 2 num_axes: -1", 2, (4, 5)), ("num_axes: 0", 0, ())],
)
def test_bias_learned(params, axis, shape, backend):
    text = f'type: "Bias" bias_param {{ {params} filler {{ type: "uniform" min: -1 max: 1 }} }}'
    x = gaussian()
    layer, bottom, top = build(text, [x], backend=backend)
    assert layer.blobs[0].shape == shape
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, x + broadcast(to_numpy(layer.blobs[0].data), axis, 4))
    check_gradient(text, [x], stepsize=1e-2, threshold=1e-3, backend=backend)
    check_in_place(text, [x], backend)


def test_bias_default_filler_is_zero(backend):
    x = gaussian()
    layer, bottom, top = build('type: "Bias"', [x], backend=backend)
    np.testing.assert_array_equal(forward(layer, bottom, top)[0], x)


@pytest.mark.parametrize(("bias_shape", "axis"), [((3, 4), 1), ((5,), 3), ((), 0)])
def test_bias_two_bottoms(bias_shape, axis, backend):
    params = "" if axis in (0, 1) else f"bias_param {{ axis: {axis} }}"
    text = f'type: "Bias" {params}'
    x, b = gaussian(), gaussian(bias_shape, seed=5)
    (y,) = run(text, [x, b], backend=backend)
    np.testing.assert_allclose(y, x + broadcast(b, axis, 4))
    check_gradient(text, [x, b], stepsize=1e-2, threshold=1e-3, backend=backend)
    check_in_place(text, [x, b], backend)


def test_float32_forward_stays_float32(backend):
    x = gaussian()
    for text in ('type: "BatchNorm"', 'type: "MVN"', 'type: "Scale"', 'type: "Bias"'):
        (y,) = run(text, [x], backend=backend, dtype=np.float32)
        assert y.dtype == np.float32, text


def test_scale_updates_only_the_params_that_learn(backend):
    x, dy = gaussian(), gaussian(seed=2)
    layer, bottom, top = build(
        'type: "Scale" scale_param { bias_term: true }', [x], backend=backend
    )
    forward(layer, bottom, top)
    top[0].diff = backend.asarray(dy)
    for blob in layer.blobs:
        blob.diff = backend.asarray(np.full(3, 2.0))
    layer.param_propagate_down = [False, True]
    layer.backward(top, [False], bottom)
    np.testing.assert_array_equal(to_numpy(layer.blobs[0].diff), [2.0] * 3)
    np.testing.assert_allclose(to_numpy(layer.blobs[1].diff), 2 + dy.sum(axis=(0, 2, 3)))
