"""RNN, LSTM and LSTMUnit: forward against step-by-step float64 references written here
(one stream at a time), state carry-over between passes, expose_hidden, and gradients
through time with Caffe's checker (1e-2, 1e-3)."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.backend import to_numpy
from netforge.errors import ConfigError, ShapeError
from tests.harness import build, check_gradient, forward

T, N, IN, I_STATIC, D = 3, 2, 3, 2, 2
FILLERS = """weight_filler { type: "uniform" min: -0.6 max: 0.6 }
             bias_filler { type: "uniform" min: -0.3 max: 0.3 }"""


def rnn_text(kind: str, expose: bool = False, num_output: int = D) -> str:
    return f"""type: "{kind}" recurrent_param {{ num_output: {num_output} {FILLERS}
        expose_hidden: {str(expose).lower()} }}"""


def data(seed: int = 0):
    g = np.random.default_rng(seed)
    x = g.uniform(-1, 1, size=(T, N, IN))
    static = g.uniform(-1, 1, size=(N, I_STATIC))
    # Caffe's test pattern (i > 2): every stream starts a sequence at t = 0.
    cont = (np.arange(T * N) > 2).reshape(T, N).astype(np.float64)
    return x, cont, static


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def rnn_ref(params, x, cont, h0, static=None):
    """Per-stream Elman RNN; returns outputs (T, N, D) and the final hidden state (N, D)."""
    if static is None:
        w_xh, b_h, w_hh, w_ho, b_o = params
    else:
        w_xh, b_h, w_s, w_hh, w_ho, b_o = params
    out = np.zeros((x.shape[0], x.shape[1], w_hh.shape[0]))
    final = np.zeros_like(h0)
    for n in range(x.shape[1]):
        h = h0[n]
        for t in range(x.shape[0]):
            a = w_hh @ (cont[t, n] * h) + w_xh @ x[t, n].ravel() + b_h
            if static is not None:
                a = a + w_s @ static[n]
            h = np.tanh(a)
            out[t, n] = np.tanh(w_ho @ h + b_o)
        final[n] = h
    return out, final


def lstm_step_ref(c_prev, gates, cont):
    d = c_prev.shape[0]
    i = sigmoid(gates[:d])
    f = cont * sigmoid(gates[d : 2 * d]) if cont != 0 else np.zeros(d)
    o = sigmoid(gates[2 * d : 3 * d])
    g = np.tanh(gates[3 * d :])
    c = f * c_prev + i * g
    return c, o * np.tanh(c)


def lstm_ref(params, x, cont, h0, c0, static=None):
    """Per-stream LSTM; returns h for every step (T, N, D) and the final (h, c)."""
    if static is None:
        w_xc, b_c, w_hc = params
    else:
        w_xc, b_c, w_s, w_hc = params
    out = np.zeros((x.shape[0], x.shape[1], w_hc.shape[1]))
    h_final, c_final = np.zeros_like(h0), np.zeros_like(c0)
    for n in range(x.shape[1]):
        h, c = h0[n], c0[n]
        for t in range(x.shape[0]):
            gates = w_hc @ (cont[t, n] * h) + w_xc @ x[t, n].ravel() + b_c
            if static is not None:
                gates = gates + w_s @ static[n]
            c, h = lstm_step_ref(c, gates, cont[t, n])
            out[t, n] = h
        h_final[n], c_final[n] = h, c
    return out, h_final, c_final


def params_of(layer):
    return [to_numpy(b.data).astype(np.float64) for b in layer.blobs]


# -- parameters ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "static", "shapes"),
    [
        ("RNN", False, [(D, IN), (D,), (D, D), (D, D), (D,)]),
        ("RNN", True, [(D, IN), (D,), (D, I_STATIC), (D, D), (D, D), (D,)]),
        ("LSTM", False, [(4 * D, IN), (4 * D,), (4 * D, D)]),
        ("LSTM", True, [(4 * D, IN), (4 * D,), (4 * D, I_STATIC), (4 * D, D)]),
    ],
)
def test_parameter_order_and_shapes(backend, kind, static, shapes):
    x, cont, xs = data()
    bottoms = [x, cont, xs] if static else [x, cont]
    layer, _, top = build(rnn_text(kind), bottoms, backend=backend)
    assert [b.shape for b in layer.blobs] == shapes
    assert top[0].shape == (T, N, D)
    assert layer.allow_force_backward(0) and not layer.allow_force_backward(1)


def test_default_fillers_are_zero(backend):
    x, cont, _ = data()
    layer, bottom, top = build(
        'type: "LSTM" recurrent_param { num_output: 2 }', [x, cont], backend=backend
    )
    assert all(not np.any(to_numpy(b.data)) for b in layer.blobs)


@pytest.mark.parametrize(("kind", "seed"), [("RNN", 1), ("LSTM", 8)])
@pytest.mark.parametrize("static", [False, True])
def test_forward_from_zero_state(backend, kind, seed, static):
    x, cont, xs = data(seed)
    bottoms = [x, cont, xs] if static else [x, cont]
    layer, bottom, top = build(rnn_text(kind), bottoms, backend=backend)
    (out,) = forward(layer, bottom, top)
    zeros = np.zeros((N, D))
    states = [zeros] if kind == "RNN" else [zeros, zeros]
    reference = rnn_ref if kind == "RNN" else lstm_ref
    expected = reference(params_of(layer), x, cont, *states, xs if static else None)[0]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)


# -- RNN -----------------------------------------------------------------------------------


def test_rnn_state_carries_over_to_the_next_pass(backend):
    x, cont, _ = data(2)
    layer, bottom, top = build(rnn_text("RNN"), [x, cont], backend=backend)
    forward(layer, bottom, top)
    params = params_of(layer)
    _, h_last = rnn_ref(params, x, cont, np.zeros((N, D)))
    # Second pass: stream 0 continues its sequence, stream 1 starts a new one.
    x2 = x[::-1].copy()
    cont2 = np.ones((T, N))
    cont2[0, 1] = 0
    bottom[0].data = backend.asarray(x2)
    bottom[1].data = backend.asarray(cont2)
    (out,) = forward(layer, bottom, top)
    expected, _ = rnn_ref(params, x2, cont2, h_last)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
    assert np.any(np.abs(h_last[0]) > 1e-3)


def test_rnn_expose_hidden(backend):
    x, cont, xs = data(3)
    cont[:] = 1
    h0 = np.random.default_rng(4).uniform(-1, 1, size=(1, N, D))
    layer, bottom, top = build(
        rnn_text("RNN", expose=True), [x, cont, xs, h0], num_tops=2, backend=backend
    )
    out, h_t = forward(layer, bottom, top)
    expected, final = rnn_ref(params_of(layer), x, cont, h0[0], xs)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h_t, final[None], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("static", [False, True])
def test_rnn_gradient(backend, static):
    x, cont, xs = data(5)
    bottoms = [x, cont, xs] if static else [x, cont]
    check_bottoms = [0, 2] if static else [0]
    checked = check_gradient(rnn_text("RNN"), bottoms, check_bottoms=check_bottoms, backend=backend)
    params = (D * IN + D + D * D + D * D + D) + (D * I_STATIC if static else 0)
    assert checked == x.size + (xs.size if static else 0) + params


def test_rnn_gradient_through_exposed_state(backend):
    x, cont, _ = data(6)
    cont[0] = 1  # the initial state matters at every step
    h0 = np.random.default_rng(7).uniform(-1, 1, size=(1, N, D))
    check_gradient(
        rnn_text("RNN", expose=True),
        [x, cont, h0],
        num_tops=2,
        check_bottoms=[0, 2],
        backend=backend,
    )


# -- LSTM ----------------------------------------------------------------------------------
def test_lstm_state_carries_over_to_the_next_pass(backend):
    x, cont, _ = data(9)
    layer, bottom, top = build(rnn_text("LSTM"), [x, cont], backend=backend)
    forward(layer, bottom, top)
    params = params_of(layer)
    zeros = np.zeros((N, D))
    _, h_last, c_last = lstm_ref(params, x, cont, zeros, zeros)
    cont2 = np.ones((T, N))
    bottom[1].data = backend.asarray(cont2)
    (out,) = forward(layer, bottom, top)
    expected, _, _ = lstm_ref(params, x, cont2, h_last, c_last)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)


def test_lstm_expose_hidden(backend):
    x, cont, _ = data(10)
    g = np.random.default_rng(11)
    h0, c0 = g.uniform(-1, 1, size=(2, 1, N, D))
    layer, bottom, top = build(
        rnn_text("LSTM", expose=True), [x, cont, h0, c0], num_tops=3, backend=backend
    )
    out, h_t, c_t = forward(layer, bottom, top)
    expected, h_final, c_final = lstm_ref(params_of(layer), x, cont, h0[0], c0[0])
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(h_t[0], h_final, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(c_t[0], c_final, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("static", [False, True])
def test_lstm_gradient(backend, static):
    x, cont, xs = data(12)
    bottoms = [x, cont, xs] if static else [x, cont]
    check_gradient(
        rnn_text("LSTM"), bottoms, check_bottoms=[0, 2] if static else [0], backend=backend
    )


def test_lstm_gradient_through_exposed_state(backend):
    x, cont, _ = data(13)
    cont[0, 0] = 1
    g = np.random.default_rng(14)
    h0, c0 = g.uniform(-1, 1, size=(2, 1, N, D))
    check_gradient(
        rnn_text("LSTM", expose=True),
        [x, cont, h0, c0],
        num_tops=3,
        check_bottoms=[0, 2, 3],
        backend=backend,
    )


# -- errors --------------------------------------------------------------------------------
def test_recurrent_errors(backend):
    x, cont, _ = data()
    with pytest.raises(ConfigError, match="num_output must be positive"):
        build(rnn_text("RNN", num_output=0), [x, cont], backend=backend)
    with pytest.raises(ShapeError, match="cont"):
        build(rnn_text("RNN"), [x, cont[:, :1]], backend=backend)
    with pytest.raises(ConfigError, match="exposed state"):
        build(rnn_text("LSTM", expose=True), [x, cont, np.zeros((1, N, D))], backend=backend)
    layer, bottom, top = build(rnn_text("LSTM"), [x, cont], backend=backend)
    bottom[0].reshape((T + 1, N, IN))
    bottom[1].reshape((T + 1, N))
    with pytest.raises(ShapeError, match="timesteps changed"):
        layer.reshape(bottom, top)
    layer, bottom, top = build(rnn_text("RNN"), [x, cont], backend=backend)
    forward(layer, bottom, top)
    with pytest.raises(ConfigError, match="sequence indicators"):
        layer.backward(top, [True, True], bottom)


def test_recurrent_keeps_loaded_weights_and_checks_them(backend):
    x, cont, _ = data()
    layer, bottom, top = build(rnn_text("RNN"), [x, cont], backend=backend)
    before = params_of(layer)
    layer.setup(bottom, top)
    assert all(np.array_equal(a, b) for a, b in zip(before, params_of(layer)))
    bottom[0].reshape((T, N, IN + 1))
    with pytest.raises(ShapeError, match="parameter shapes"):
        layer.setup(bottom, top)


# -- LSTMUnit ------------------------------------------------------------------------------
UNIT_TEXT = 'type: "LSTMUnit"'


def unit_data(seed: int = 15):
    g = np.random.default_rng(seed)
    n, d = 3, 2
    c_prev = g.uniform(-1, 1, size=(1, n, d))
    gates = g.uniform(-1, 1, size=(1, n, 4 * d))
    cont = np.array([[1.0, 0.0, 1.0]])
    return c_prev, gates, cont


def test_lstm_unit_forward(backend):
    c_prev, gates, cont = unit_data()
    c, h = forward(*build(UNIT_TEXT, [c_prev, gates, cont], num_tops=2, backend=backend))
    for n in range(3):
        want_c, want_h = lstm_step_ref(c_prev[0, n], gates[0, n], cont[0, n])
        np.testing.assert_allclose(c[0, n], want_c, rtol=1e-12)
        np.testing.assert_allclose(h[0, n], want_h, rtol=1e-12)


def test_lstm_unit_gradient(backend):
    bottoms = unit_data(16)
    checked = check_gradient(UNIT_TEXT, bottoms, num_tops=2, check_bottoms=[0, 1], backend=backend)
    assert checked == bottoms[0].size + bottoms[1].size
    layer, bottom, top = build(UNIT_TEXT, bottoms, num_tops=2, backend=backend)
    assert not layer.allow_force_backward(2)
    layer.forward(bottom, top)
    with pytest.raises(ConfigError, match="sequence indicators"):
        layer.backward(top, [True, True, True], bottom)


def test_lstm_unit_shape_checks(backend):
    c_prev, gates, cont = unit_data()
    with pytest.raises(ShapeError, match="4 x 2"):
        build(UNIT_TEXT, [c_prev, gates[..., :6], cont], num_tops=2, backend=backend)
    with pytest.raises(ShapeError, match="bottom 2"):
        build(UNIT_TEXT, [c_prev, gates, cont[:, :2]], num_tops=2, backend=backend)


# -- in a Net ------------------------------------------------------------------------------
LRCN = """
name: "tiny_lrcn"
layer { name: "in" type: "Input" top: "x" top: "cont" top: "label"
        input_param { shape { dim: 3 dim: 2 dim: 3 } shape { dim: 3 dim: 2 }
                      shape { dim: 3 dim: 2 } } }
layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
        recurrent_param { num_output: 2 weight_filler { type: "uniform" min: -0.6 max: 0.6 }
                          bias_filler { type: "uniform" min: -0.3 max: 0.3 } } }
layer { name: "score" type: "InnerProduct" bottom: "h" top: "score"
        inner_product_param { num_output: 4 axis: 2
                              weight_filler { type: "uniform" min: -1 max: 1 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "score" bottom: "label" top: "loss"
        loss_weight: 2.5 softmax_param { axis: 2 } }
layer { name: "acc" type: "Accuracy" bottom: "score" bottom: "label" top: "acc"
        accuracy_param { axis: 2 } }
"""


def test_lstm_and_losses_in_a_net_match_numeric_gradients():
    from netforge.net import Net
    from netforge.proto import pb
    from netforge.prototxt import parse_text

    net = Net(
        parse_text(LRCN, pb.NetParameter),
        phase=pb.TRAIN,
        dtype=np.float64,
        rng=np.random.default_rng(0),
    )
    x, cont, _ = data(20)
    net.blobs["x"].data = x
    net.blobs["cont"].data = cont
    net.blobs["label"].data = np.array([[0.0, 3.0], [1.0, 1.0], [2.0, 0.0]])
    lstm = net.layers[net.layer_names.index("lstm")]

    def loss() -> float:
        # cont is 0 at t = 0, so the state carried from the previous pass does not matter.
        return net.forward_from_to()

    for p in lstm.blobs:
        p.diff = np.zeros_like(p.data)
    loss()
    net.backward_from_to()
    step = 1e-5
    for p in lstm.blobs:
        flat = p.data.reshape(-1)
        for j in range(0, flat.size, 3):
            saved = flat[j]
            flat[j] = saved + step
            plus = loss()
            flat[j] = saved - step
            minus = loss()
            flat[j] = saved
            np.testing.assert_allclose(
                p.diff.reshape(-1)[j], (plus - minus) / (2 * step), rtol=1e-5, atol=1e-8
            )
    assert 0.0 <= float(net.blobs["acc"].data) <= 1.0
