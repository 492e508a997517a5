"""Neuron layers: forward against float64 formulas, gradients with Caffe's checker settings
(test_neuron_layer.cpp and friends), in-place runs, Dropout's phases."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.backend import to_numpy
from netforge.blob import Blob
from netforge.builtin_layers import activation
from netforge.errors import ConfigError, ShapeError
from netforge.proto import pb
from tests.harness import SEED, build, check_gradient, forward, run

SHAPE = (2, 3, 4, 5)


def gaussian(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def positive(shape=SHAPE, seed=0, low=0.5, high=2.0):
    return np.random.default_rng(seed).uniform(low, high, shape)


def away_from(points, x, gap=0.05):
    """``x`` with every value closer than ``gap`` to one of ``points`` moved 2·gap up
    (Caffe's Clip test nudges its inputs off the clipping bounds the same way)."""
    x = x.copy()
    for point in points:
        x[np.abs(x - point) < gap] += 2 * gap
    return x


def check_in_place(text, bottoms, backend, phase=pb.TRAIN):
    """Forward and backward with top == bottom must give what separate blobs give.

    Returns the in-place output so callers can also check values.
    """
    dy = np.random.default_rng(7).standard_normal(bottoms[0].shape)

    def run_once(in_place):
        layer, bottom, top = build(text, bottoms, backend=backend, phase=phase)
        if in_place:
            top = [bottom[0]]
        layer.rng = np.random.default_rng(SEED)
        layer.reshape(bottom, top)
        layer.forward(bottom, top)
        y = to_numpy(top[0].data).copy()
        for p in layer.blobs:
            p.diff = backend.xp.zeros_like(p.data)
        top[0].diff = backend.asarray(dy.copy())
        layer.backward(top, [True] * len(bottom), bottom)
        grads = [to_numpy(b.diff).copy() for b in list(bottom) + list(layer.blobs)]
        return y, grads

    y_sep, grads_sep = run_once(False)
    y_in, grads_in = run_once(True)
    np.testing.assert_allclose(y_in, y_sep, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads_in, grads_sep):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    return y_in


def f32(value):
    """A prototxt float as the layer sees it (proto floats are single precision)."""
    return float(np.float32(value))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# (prototxt, input, float64 reference of the forward)
FORWARD_CASES = {
    "relu": ('type: "ReLU"', gaussian(), lambda x: np.where(x > 0, x, 0.0)),
    "leaky": (
        'type: "ReLU" relu_param { negative_slope: 0.01 }',
        gaussian(),
        lambda x: np.where(x > 0, x, f32(0.01) * x),
    ),
    "elu": (
        'type: "ELU" elu_param { alpha: 0.5 }',
        gaussian(),
        lambda x: np.where(x > 0, x, 0.5 * np.expm1(x)),
    ),
    "sigmoid": ('type: "Sigmoid"', 10 * gaussian(), sigmoid),
    "tanh": ('type: "TanH"', gaussian(), np.tanh),
    "absval": ('type: "AbsVal"', gaussian(), np.abs),
    "bnll": ('type: "BNLL"', 30 * gaussian(), lambda x: np.logaddexp(0.0, x)),
    "threshold": (
        'type: "Threshold" threshold_param { threshold: 0.3 }',
        gaussian(),
        lambda x: (x > f32(0.3)).astype(float),
    ),
    "swish": (
        'type: "Swish" swish_param { beta: 1.5 }',
        gaussian(),
        lambda x: x / (1.0 + np.exp(-1.5 * x)),
    ),
    "clip": (
        'type: "Clip" clip_param { min: -0.5 max: 0.75 }',
        gaussian(),
        lambda x: np.minimum(np.maximum(x, -0.5), 0.75),
    ),
    "clip_min_over_max": (
        'type: "Clip" clip_param { min: 1 max: -1 }',
        gaussian(),
        lambda x: np.ones_like(x),
    ),
    "exp": ('type: "Exp"', gaussian(), np.exp),
    "exp_base": (
        'type: "Exp" exp_param { base: 2 scale: 0.5 shift: -1 }',
        gaussian(),
        lambda x: 2.0 ** (-1 + 0.5 * x),
    ),
    "exp_e_shift": (
        'type: "Exp" exp_param { scale: 3 shift: 0.25 }',
        gaussian(),
        lambda x: np.exp(0.25 + 3 * x),
    ),
    "log": ('type: "Log"', positive(), np.log),
    "log_base": (
        'type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }',
        positive(),
        lambda x: np.log10(0.5 + 2 * x),
    ),
    "power": (
        'type: "Power" power_param { power: 0.37 scale: 0.83 shift: 0.5 }',
        positive(),
        lambda x: (0.5 + f32(0.83) * x) ** f32(0.37),
    ),
    "power_square": (
        'type: "Power" power_param { power: 2 scale: 0.34 shift: -2.4 }',
        gaussian(),
        lambda x: (-f32(2.4) + f32(0.34) * x) ** 2,
    ),
    "power_zero": (
        'type: "Power" power_param { power: 0 scale: 0.83 shift: -2.4 }',
        gaussian(),
        lambda x: np.ones_like(x),
    ),
    "power_scale_zero": (
        'type: "Power" power_param { power: 3 scale: 0 shift: -2 }',
        gaussian(),
        lambda x: np.full_like(x, -8.0),
    ),
}


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_forward_matches_formula(case, backend):
    text, x, reference = FORWARD_CASES[case]
    (y,) = run(text, [x], backend=backend)
    np.testing.assert_allclose(y, reference(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", sorted(FORWARD_CASES))
def test_float32_stays_float32(case, backend):
    text, x, reference = FORWARD_CASES[case]
    (y,) = run(text, [x], backend=backend, dtype=np.float32)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, reference(x.astype(np.float32)), rtol=2e-5, atol=1e-6)


# (prototxt, input, stepsize, threshold, kink, kink_range) as Caffe's tests set them
RELU_LIKE = (1e-2, 1e-3, 0.0, 0.01)
GRADIENT_CASES = {
    "relu": ('type: "ReLU"', gaussian(), *RELU_LIKE),
    "leaky": ('type: "ReLU" relu_param { negative_slope: 0.01 }', gaussian(), *RELU_LIKE),
    "elu": ('type: "ELU" elu_param { alpha: 0.5 }', gaussian(), *RELU_LIKE),
    "sigmoid": ('type: "Sigmoid"', gaussian(), *RELU_LIKE),
    "swish": ('type: "Swish" swish_param { beta: 1.5 }', gaussian(), *RELU_LIKE),
    "absval": ('type: "AbsVal"', gaussian(), *RELU_LIKE),
    "tanh": ('type: "TanH"', gaussian(), 1e-2, 1e-3, 0.0, -1.0),
    "bnll": ('type: "BNLL"', gaussian(), 1e-2, 1e-3, 0.0, -1.0),
    "exp": (
        'type: "Exp" exp_param { base: 2 scale: 0.5 shift: -1 }',
        gaussian(),
        1e-2,
        1e-3,
        0,
        -1,
    ),
    "log": (
        'type: "Log" log_param { base: 10 scale: 2 shift: 0.5 }',
        positive(),
        1e-2,
        1e-2,
        0,
        -1,
    ),
    "clip": (
        'type: "Clip" clip_param { min: -0.5 max: 0.75 }',
        away_from((-0.5, 0.75), 2 * gaussian()),
        1e-2,
        1e-3,
        0.0,
        -1.0,
    ),
    "power": (
        'type: "Power" power_param { power: 0.37 scale: 0.83 shift: 0.5 }',
        positive(),
        1e-3,
        1e-2,
        0.0,
        0.01,
    ),
    "power_shift_zero": (
        'type: "Power" power_param { power: -1.5 scale: 0.83 }',
        positive(),
        1e-3,
        1e-2,
        0.0,
        0.01,
    ),
    "power_one": (
        'type: "Power" power_param { scale: 0.83 shift: -2.4 }',
        gaussian(),
        1e-3,
        1e-2,
        0,
        0.01,
    ),
    "power_square": (
        'type: "Power" power_param { power: 2 scale: 0.34 shift: -2.4 }',
        gaussian(),
        1e-3,
        1e-2,
        0.0,
        0.01,
    ),
    "power_zero": (
        'type: "Power" power_param { power: 0 shift: 2 }',
        gaussian(),
        1e-3,
        1e-2,
        0,
        0.01,
    ),
}


@pytest.mark.parametrize("case", sorted(GRADIENT_CASES))
def test_gradient(case, backend):
    text, x, stepsize, threshold, kink, kink_range = GRADIENT_CASES[case]
    checked = check_gradient(
        text,
        [x],
        stepsize=stepsize,
        threshold=threshold,
        kink=kink,
        kink_range=kink_range,
        backend=backend,
    )
    assert checked > 0.9 * x.size


IN_PLACE_CASES = {
    "relu": 'type: "ReLU"',
    "leaky": 'type: "ReLU" relu_param { negative_slope: 0.1 }',
    "relu_negative_slope": 'type: "ReLU" relu_param { negative_slope: -0.5 }',
    "elu": 'type: "ELU"',
    "elu_negative_alpha": 'type: "ELU" elu_param { alpha: -0.5 }',
    "sigmoid": 'type: "Sigmoid"',
    "tanh": 'type: "TanH"',
    "absval": 'type: "AbsVal"',
    "bnll": 'type: "BNLL"',
    "swish": 'type: "Swish"',
    "clip": 'type: "Clip" clip_param { min: -0.5 max: 0.75 }',
    "exp": 'type: "Exp" exp_param { scale: 0.5 }',
    "log": 'type: "Log" log_param { shift: 3 }',
    "power": 'type: "Power" power_param { power: 1.7 scale: 0.5 shift: 3 }',
    "power_square": 'type: "Power" power_param { power: 2 scale: 0.5 shift: 3 }',
    "power_shift_zero": 'type: "Power" power_param { power: 3 scale: 0.5 }',
    "prelu": 'type: "PReLU" prelu_param { filler { type: "uniform" min: -1 max: 1 } }',
    "dropout": 'type: "Dropout" dropout_param { dropout_ratio: 0.3 }',
}


@pytest.mark.parametrize("case", sorted(IN_PLACE_CASES))
def test_in_place(case, backend):
    check_in_place(IN_PLACE_CASES[case], [gaussian()], backend)


def test_relu_backward_formula(backend):
    x = gaussian()
    layer, bottom, top = build(
        'type: "ReLU" relu_param { negative_slope: 0.2 }', [x], backend=backend
    )
    forward(layer, bottom, top)
    dy = gaussian(seed=3)
    top[0].diff = backend.asarray(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(to_numpy(bottom[0].diff), np.where(x > 0, dy, 0.2 * dy))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_zero_operand_grows_with_the_input_and_stays_zero(dtype):
    for shape, slope in [((2, 3), 0.0), ((4, 5, 6, 7), 0.0), ((3, 70, 7), -0.5)]:
        x = gaussian(shape, seed=len(shape)).astype(dtype)
        text = f'type: "ReLU" relu_param {{ negative_slope: {slope} }}'
        (y,) = run(text, [x], dtype=dtype)
        expected = np.maximum(x, 0) + slope * np.minimum(x, 0)
        np.testing.assert_allclose(
            y, expected.astype(dtype), rtol=1e-6 if dtype == np.float32 else 0
        )
        zeros = activation._ZEROS[np.dtype(dtype)]
        assert zeros.size >= x.size and not zeros.flags.writeable and not zeros.any()


def test_threshold_has_no_backward(backend):
    layer, bottom, top = build('type: "Threshold"', [gaussian()], backend=backend)
    forward(layer, bottom, top)
    with pytest.raises(ConfigError, match="Threshold"):
        layer.backward(top, [True], bottom)


@pytest.mark.parametrize(
    "text",
    [
        'type: "Exp" exp_param { base: 0 }',
        'type: "Log" log_param { base: -2 }',
        'type: "Log" log_param { base: 1 }',
        'type: "Dropout" dropout_param { dropout_ratio: 1 }',
        'type: "Clip" clip_param { min: 0 }',
    ],
)
def test_bad_parameters_raise_config_error(text):
    with pytest.raises(ConfigError, match="layer 'layer'"):
        build(text, [gaussian()])


# -- PReLU ---------------------------------------------------------------------------------
def prelu_reference(x, slope):
    slope = np.asarray(slope).reshape((-1,) + (1,) * (x.ndim - 2))
    return np.where(x > 0, x, slope * x)


def test_prelu_default_filler_and_forward(backend):
    x = gaussian()
    layer, bottom, top = build('type: "PReLU"', [x], backend=backend)
    assert layer.blobs[0].shape == (3,)
    np.testing.assert_array_equal(to_numpy(layer.blobs[0].data), [0.25] * 3)
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, np.where(x > 0, x, 0.25 * x))


def test_prelu_channel_shared_is_a_scalar_blob(backend):
    x = gaussian()
    layer, bottom, top = build(
        'type: "PReLU" prelu_param { channel_shared: true }', [x], backend=backend
    )
    assert layer.blobs[0].shape == ()
    layer.blobs[0].data = backend.asarray(np.array(-0.4))
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, np.where(x > 0, x, -0.4 * x))


def test_prelu_per_channel_forward(backend):
    x = gaussian((2, 3, 4))
    text = 'type: "PReLU" prelu_param { filler { type: "uniform" min: -1 max: 1 } }'
    layer, bottom, top = build(text, [x], backend=backend)
    slope = to_numpy(layer.blobs[0].data).copy()
    (y,) = forward(layer, bottom, top)
    np.testing.assert_allclose(y, prelu_reference(x, slope))


@pytest.mark.parametrize("shared", ["false", "true"])
def test_prelu_gradient(shared, backend):
    filler = 'filler { type: "uniform" min: -1 max: 1 }'
    text = f'type: "PReLU" prelu_param {{ channel_shared: {shared} {filler} }}'
    check_gradient(
        text,
        [gaussian()],
        stepsize=1e-2,
        threshold=1e-3,
        kink=0.0,
        kink_range=0.01,
        backend=backend,
    )


def test_prelu_keeps_loaded_slopes_and_checks_their_count():
    x = gaussian()
    layer, bottom, top = build('type: "PReLU"', [x])
    loaded = Blob((3,), np.float64)
    loaded.data = np.array([0.1, 0.2, 0.3])
    layer.blobs[0] = loaded
    layer.setup(bottom, top)
    assert layer.blobs[0] is loaded
    layer.blobs[0] = Blob((4,), np.float64)
    with pytest.raises(ShapeError, match="channel_shared"):
        layer.setup(bottom, top)


def test_prelu_param_diff_accumulates(backend):
    x = gaussian()
    layer, bottom, top = build('type: "PReLU"', [x], backend=backend)
    forward(layer, bottom, top)
    dy = gaussian(seed=5)
    top[0].diff = backend.asarray(dy)
    layer.blobs[0].diff = backend.asarray(np.ones(3))
    layer.backward(top, [False], bottom)
    expected = 1 + (dy * x * (x <= 0)).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(to_numpy(layer.blobs[0].diff), expected)


# -- Dropout -------------------------------------------------------------------------------
def test_dropout_train_keeps_and_scales(backend):
    x = gaussian((4, 50, 10))
    layer, bottom, top = build(
        'type: "Dropout" dropout_param { dropout_ratio: 0.3 }', [x], backend=backend
    )
    (y,) = forward(layer, bottom, top)
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.7)
    # 2000 Bernoulli(0.7) draws: the kept fraction is 0.7 ± 0.01 (one standard deviation).
    assert abs(kept.mean() - 0.7) < 0.05
    dy = gaussian((4, 50, 10), seed=9)
    top[0].diff = backend.asarray(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(to_numpy(bottom[0].diff), np.where(kept, dy / 0.7, 0.0))


def test_dropout_mask_follows_the_generator(backend):
    text = 'type: "Dropout"'
    x = gaussian()
    layer, bottom, top = build(text, [x], backend=backend)
    first = forward(layer, bottom, top, seed=1)[0]
    again = forward(layer, bottom, top, seed=1)[0]
    other = forward(layer, bottom, top, seed=2)[0]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first != 0, other != 0)


def test_dropout_test_phase_is_identity(backend):
    x = gaussian()
    layer, bottom, top = build(
        'type: "Dropout" dropout_param { dropout_ratio: 0.6 }', [x], backend=backend, phase=pb.TEST
    )
    (y,) = forward(layer, bottom, top)
    np.testing.assert_array_equal(y, x)
    dy = gaussian(seed=4)
    top[0].diff = backend.asarray(dy)
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(to_numpy(bottom[0].diff), dy)
    y_in = check_in_place('type: "Dropout"', [x], backend, phase=pb.TEST)
    np.testing.assert_array_equal(y_in, x)


@pytest.mark.parametrize("phase", [pb.TRAIN, pb.TEST])
def test_dropout_gradient(phase, backend):
    check_gradient(
        'type: "Dropout" dropout_param { dropout_ratio: 0.4 }',
        [gaussian()],
        stepsize=1e-2,
        threshold=1e-3,
        phase=phase,
        backend=backend,
    )


def test_prelu_leaves_the_slope_diff_alone_when_not_learning(backend):
    layer, bottom, top = build('type: "PReLU"', [gaussian()], backend=backend)
    forward(layer, bottom, top)
    top[0].diff = backend.asarray(gaussian(seed=5))
    layer.blobs[0].diff = backend.asarray(np.full(3, 2.0))
    layer.param_propagate_down = [False]
    layer.backward(top, [True], bottom)
    np.testing.assert_array_equal(to_numpy(layer.blobs[0].diff), [2.0] * 3)
