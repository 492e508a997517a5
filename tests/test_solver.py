"""Solver updates against an independent float64 computation (Caffe's
test_gradient_based_solver idea): HDF5Data(solver_data.h5) → InnerProduct(1) → EuclideanLoss,
trained for a few iterations by each solver type, with weight decay (L2, L1), lr_mult and
decay_mult, gradient clipping and iter_size; and the learning-rate policies."""

from __future__ import annotations

import math
from pathlib import Path

import h5py
import numpy as np
import pytest

import netforge
from netforge.errors import ConfigError
from netforge.proto import pb
from netforge.prototxt import parse_text
from netforge.solvers import get_solver
from netforge.solvers.lr_policy import learning_rate
from tests.nets import TYPE_SETTINGS

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "solver_data.h5"

NET = """
name: "least_squares"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "targets"
        hdf5_data_param {{ source: "{source}" batch_size: {batch} {shuffle} }} }}
{extra}
layer {{ name: "innerprod" type: "InnerProduct" bottom: "{ip_bottom}" top: "innerprod"
        {params}
        inner_product_param {{ num_output: 1 weight_filler {{ type: "gaussian" std: 1.0 }}
                               bias_filler {{ type: "gaussian" std: 1.0 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "innerprod" bottom: "targets" top: "loss" }}
"""


def net_text(
    tmp_path: Path, batch: int = 4, params: str = "", dropout: bool = False, shuffle: bool = False
) -> str:
    listing = tmp_path / "solver_data_list.txt"
    listing.write_text(f"{FIXTURE}\n")
    extra = ""
    if dropout:
        extra = (
            'layer { name: "drop" type: "Dropout" bottom: "data" top: "dropped" '
            "dropout_param { dropout_ratio: 0.3 } }"
        )
    return NET.format(
        source=listing,
        batch=batch,
        params=params,
        extra=extra,
        ip_bottom="dropped" if dropout else "data",
        shuffle="shuffle: true" if shuffle else "",
    )


def solver_param(
    tmp_path: Path, solver_type: str, settings: str = "", **net_options
) -> pb.SolverParameter:
    text = (
        f'type: "{solver_type}" {TYPE_SETTINGS[solver_type]} base_lr: 0.01 '
        'lr_policy: "step" gamma: 0.5 stepsize: 2 max_iter: 100 random_seed: 7 '
        f'snapshot_after_train: false snapshot_prefix: "{tmp_path}/snap" display: 0'
    )
    param = parse_text(text, pb.SolverParameter)
    param.MergeFrom(parse_text(settings, pb.SolverParameter))  # settings override the base
    param.net_param.CopyFrom(parse_text(net_text(tmp_path, **net_options), pb.NetParameter))
    return param


def make_solver(
    tmp_path: Path, solver_type: str, settings: str = "", dtype=np.float64, **net_options
):
    return get_solver(solver_param(tmp_path, solver_type, settings, **net_options), dtype=dtype)


# -- the independent reference -------------------------------------------------------------
def batches(batch: int):
    """The rows HDF5Data serves, in order, wrapping around the 8 records."""
    with h5py.File(FIXTURE, "r") as f:
        x = f["data"][()].reshape(8, -1).astype(np.float64)
        y = f["targets"][()].astype(np.float64)
    start = 0
    while True:
        rows = [(start + i) % 8 for i in range(batch)]
        yield x[rows], y[rows]
        start = (start + batch) % 8


def least_squares_grads(w, b, x, y):
    """EuclideanLoss(x·wᵀ + b, y) = Σ(r²)/2N and its gradients."""
    r = x @ w.T + b - y
    n = x.shape[0]
    return (r**2).sum() / (2 * n), r.T @ x / n, r.sum(axis=0) / n


def f32(value: float) -> float:
    return float(np.float32(value))


def reference_rate(it: int, base_lr=0.01, gamma=0.5, stepsize=2) -> float:
    return base_lr * gamma ** (it // stepsize)


def reference_run(
    solver_type,
    w,
    b,
    iters,
    *,
    batch=4,
    iter_size=1,
    weight_decay=0.0,
    l1=False,
    lr_mults=(1.0, 1.0),
    decay_mults=(1.0, 1.0),
    clip=-1.0,
    base_lr=0.01,
):
    """Train in float64 with the textbook form of Caffe's update rules."""
    settings = dict(momentum=0.9, momentum2=0.999, rms_decay=0.95, delta=1e-6)
    if solver_type == "AdaDelta":
        settings["momentum"] = 0.95
    # The solver's settings are float fields: the solver sees their float32 roundings.
    settings = {key: f32(value) for key, value in settings.items()}
    weight_decay, clip, base_lr = f32(weight_decay), f32(clip), f32(base_lr)
    params = [w.copy(), b.copy()]
    state = [[np.zeros_like(p), np.zeros_like(p)] for p in params]
    data = batches(batch)
    losses = []
    for it in range(iters):
        grads = [np.zeros_like(p) for p in params]
        loss = 0.0
        for _ in range(iter_size):
            x, y = next(data)
            part, gw, gb = least_squares_grads(params[0], params[1], x, y)
            loss += part
            grads[0] += gw
            grads[1] += gb
        losses.append(loss / iter_size)
        norm = math.sqrt(sum((g**2).sum() for g in grads))
        if 0 <= clip < norm:
            grads = [g * clip / norm for g in grads]
        rate = reference_rate(it, base_lr=base_lr)
        for k, (p, g) in enumerate(zip(params, grads)):
            g = g / iter_size
            decay = weight_decay * decay_mults[k]
            g = g + decay * (np.sign(p) if l1 else p)
            lr = rate * lr_mults[k]
            h, h2 = state[k]
            m, eps = settings["momentum"], settings["delta"]
            if solver_type == "SGD":
                h[...] = m * h + lr * g
                step = h.copy()
            elif solver_type == "Nesterov":
                previous = h.copy()
                h[...] = m * h + lr * g
                step = (1 + m) * h - m * previous
            elif solver_type == "AdaGrad":
                h += g**2
                step = lr * g / (np.sqrt(h) + eps)
            elif solver_type == "RMSProp":
                rho = settings["rms_decay"]
                h[...] = rho * h + (1 - rho) * g**2
                step = lr * g / (np.sqrt(h) + eps)
            elif solver_type == "AdaDelta":
                h[...] = m * h + (1 - m) * g**2
                u = g * np.sqrt((h2 + eps) / (h + eps))
                h2[...] = m * h2 + (1 - m) * u**2
                step = lr * u
            else:  # Adam
                b2, t = settings["momentum2"], it + 1
                h[...] = m * h + (1 - m) * g
                h2[...] = b2 * h2 + (1 - b2) * g**2
                step = lr * math.sqrt(1 - b2**t) / (1 - m**t) * h / (np.sqrt(h2) + eps)
            p -= step
    return params, losses


def record_losses(solver) -> list[float]:
    losses: list[float] = []
    solver.add_callback(on_gradients_ready=lambda: losses.append(solver.loss))
    return losses


CASES = {
    "plain": ("", {}, {}),
    "l2_mults": (
        "weight_decay: 0.1",
        {"params": "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }"},
        {"weight_decay": 0.1, "lr_mults": (1.0, 2.0), "decay_mults": (1.0, 0.0)},
    ),
    "l1": ('weight_decay: 0.05 regularization_type: "L1"', {}, {"weight_decay": 0.05, "l1": True}),
    "clip": ("clip_gradients: 1.5", {}, {"clip": 1.5}),
    "iter_size": (
        "iter_size: 2 clip_gradients: 3",
        {"batch": 2},
        {"iter_size": 2, "batch": 2, "clip": 3.0},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("solver_type", sorted(TYPE_SETTINGS))
def test_updates_match_float64_reference(tmp_path, solver_type, case):
    settings, net_options, reference_options = CASES[case]
    solver = make_solver(tmp_path, solver_type, settings, **net_options)
    w0, b0 = (p.data.copy() for p in solver.net.params["innerprod"])
    losses = record_losses(solver)
    solver.step(5)
    assert solver.iter == 5
    (w, b), expected_losses = reference_run(solver_type, w0, b0, 5, **reference_options)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-10)
    np.testing.assert_allclose(solver.net.params["innerprod"][0].data, w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(solver.net.params["innerprod"][1].data, b, rtol=1e-9, atol=1e-12)
    # The weights actually moved: the comparison is not between two unchanged arrays.
    assert not np.allclose(w, w0)


def test_float32_training_stays_close_to_reference(tmp_path):
    solver = make_solver(tmp_path, "Adam", "weight_decay: 0.01", dtype=np.float32)
    w0, b0 = (p.data.astype(np.float64) for p in solver.net.params["innerprod"])
    solver.step(4)
    (w, _), _ = reference_run("Adam", w0, b0, 4, weight_decay=0.01)
    assert solver.net.params["innerprod"][0].data.dtype == np.float32
    np.testing.assert_allclose(solver.net.params["innerprod"][0].data, w, rtol=1e-4, atol=1e-5)


def test_history_layout_and_step_left_in_diff(tmp_path):
    """AdaDelta/Adam keep 2 buffers per param (all firsts, then all seconds); after an
    update the param diff holds the step, as Caffe leaves it."""
    solver = make_solver(tmp_path, "Adam")
    assert [h.shape for h in solver.history] == [(1, 300), (1,), (1, 300), (1,)]
    weight = solver.net.params["innerprod"][0]
    before = weight.data.copy()
    solver.step(1)
    np.testing.assert_allclose(before - weight.diff, weight.data, rtol=0, atol=1e-15)
    assert len(make_solver(tmp_path, "SGD").history) == 2


def test_iter_size_k_at_batch_b_equals_batch_k_times_b(tmp_path):
    small = make_solver(tmp_path, "SGD", "iter_size: 2", batch=2)
    big = make_solver(tmp_path, "SGD", batch=4)
    for p_small, p_big in zip(small.net.learnable_params, big.net.learnable_params):
        p_big.data[...] = p_small.data
    small.step(4)
    big.step(4)
    for p_small, p_big in zip(small.net.learnable_params, big.net.learnable_params):
        np.testing.assert_allclose(p_small.data, p_big.data, rtol=1e-12)


def test_lr_mult_zero_freezes_and_sgd_history_stays_zero(tmp_path):
    solver = make_solver(
        tmp_path, "SGD", "weight_decay: 0.1", params="param { lr_mult: 0 } param { lr_mult: 1 }"
    )
    weight = solver.net.params["innerprod"][0]
    before = weight.data.copy()
    solver.step(3)
    np.testing.assert_array_equal(weight.data, before)
    assert not solver.history[0].any()
    assert solver.history[1].any()


def test_shared_params_updated_once_with_summed_gradient(tmp_path):
    """Two InnerProducts sharing their parameters by ParamSpec name: the owner is updated
    once with the sum of both layers' gradients."""
    text = (
        net_text(tmp_path)
        .replace(
            'layer { name: "loss"',
            'layer { name: "innerprod2" type: "InnerProduct" bottom: "data" top: "innerprod2" '
            'param { name: "w" } param { name: "b" } inner_product_param { num_output: 1 } }\n'
            'layer { name: "sum" type: "Eltwise" bottom: "innerprod" bottom: "innerprod2" '
            'top: "twice" }\nlayer { name: "loss"',
        )
        .replace('bottom: "innerprod" bottom: "targets"', 'bottom: "twice" bottom: "targets"')
    )
    text = text.replace(
        'top: "innerprod"\n', 'top: "innerprod"\n param { name: "w" } param { name: "b" }\n', 1
    )
    param = solver_param(tmp_path, "SGD")
    param.net_param.CopyFrom(parse_text(text, pb.NetParameter))
    solver = get_solver(param, dtype=np.float64)
    assert len(solver.net.learnable_params) == 2
    w0, b0 = (p.data.copy() for p in solver.net.params["innerprod"])
    solver.step(1)
    x, y = next(batches(4))
    # Output 2(xwᵀ + b): the gradient w.r.t. the shared w is twice that of one layer.
    r = 2 * (x @ w0.T + b0) - y
    grad_w = 2 * r.T @ x / 4
    np.testing.assert_allclose(
        solver.net.params["innerprod"][0].data, w0 - f32(0.01) * grad_w, rtol=1e-10
    )
    np.testing.assert_array_equal(
        solver.net.params["innerprod2"][0].data, solver.net.params["innerprod"][0].data
    )


# -- learning-rate policies ----------------------------------------------------------------
def lr_param(text: str) -> pb.SolverParameter:
    return parse_text(f"base_lr: 0.125 max_iter: 100 {text}", pb.SolverParameter)


# Constants exact in float32 (the fields are floats), so the formulas can be compared tightly.
@pytest.mark.parametrize(
    "text, formula",
    [
        ('lr_policy: "fixed"', lambda it: 0.125),
        ('lr_policy: "step" gamma: 0.5 stepsize: 30', lambda it: 0.125 * 0.5 ** (it // 30)),
        ('lr_policy: "exp" gamma: 0.96875', lambda it: 0.125 * 0.96875**it),
        (
            'lr_policy: "inv" gamma: 0.0001220703125 power: 0.75',
            lambda it: 0.125 * (1 + 2**-13 * it) ** -0.75,
        ),
        ('lr_policy: "poly" power: 2', lambda it: 0.125 * (1 - it / 100) ** 2),
        (
            'lr_policy: "sigmoid" gamma: 0.0625 stepsize: 50',
            lambda it: 0.125 / (1 + math.exp(-0.0625 * (it - 50))),
        ),
    ],
)
def test_lr_policies(text, formula):
    param = lr_param(text)
    for it in (0, 1, 29, 30, 31, 59, 60, 99):
        rate, _ = learning_rate(param, it, 0)
        assert rate == pytest.approx(formula(it), rel=1e-12), it


def test_step_policy_sets_current_step():
    assert learning_rate(lr_param('lr_policy: "step" gamma: 0.5 stepsize: 30'), 65, 0)[1] == 2


def test_multistep_advances_at_most_one_step_per_call():
    param = lr_param('lr_policy: "multistep" gamma: 0.1 stepvalue: 10 stepvalue: 12')
    step = 0
    rates = []
    for it in range(9, 14):
        rate, step = learning_rate(param, it, step)
        rates.append(rate)
    gamma = f32(0.1)
    assert rates == pytest.approx(
        [0.125, 0.125 * gamma, 0.125 * gamma, 0.125 * gamma**2, 0.125 * gamma**2], rel=1e-12
    )
    # Resumed far past both values, the step advances one per call, as Caffe's does.
    rate, step = learning_rate(param, 50, 0)
    assert step == 1 and rate == pytest.approx(0.125 * gamma, rel=1e-12)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "unknown learning rate policy none"),
        ('lr_policy: "cosine"', "'cosine'"),
        ('lr_policy: "exp" gamma: -1', "gamma is -1.0; it must be >= 0"),
        ('lr_policy: "step" gamma: 0.1', "stepsize > 0"),
        ('lr_policy: "fixed" regularization_type: "L3"', "regularization_type"),
    ],
)
def test_bad_solver_settings_are_config_errors(tmp_path, text, message):
    param = solver_param(tmp_path, "SGD")
    param.ClearField("lr_policy")
    param.ClearField("stepsize")
    param.MergeFrom(parse_text(text, pb.SolverParameter))
    with pytest.raises(ConfigError, match=message):
        get_solver(param)


def test_type_specific_checks(tmp_path):
    with pytest.raises(ConfigError, match="momentum cannot be used with AdaGrad"):
        make_solver(tmp_path, "AdaGrad", "momentum: 0.9")
    with pytest.raises(ConfigError, match="rms_decay"):
        make_solver(tmp_path, "RMSProp", "rms_decay: 1.5")


def test_pycaffe_solver_classes(tmp_path):
    solver_file = tmp_path / "solver.prototxt"
    net_file = tmp_path / "net.prototxt"
    net_file.write_text(net_text(tmp_path))
    solver_file.write_text(
        f'net: "{net_file}" type: "Adam" base_lr: 0.001 lr_policy: "fixed" max_iter: 2\n'
        f'snapshot_prefix: "{tmp_path}/s" snapshot_after_train: false\n'
    )
    assert type(netforge.get_solver(str(solver_file))).__name__ == "AdamSolver"
    sgd = netforge.SGDSolver(str(solver_file))
    assert type(sgd).__name__ == "SGDSolver" and sgd.iter == 0 and sgd.test_nets == []
    sgd.step(2)
    assert sgd.iter == 2
    for name in ("NesterovSolver", "AdaGradSolver", "RMSPropSolver", "AdaDeltaSolver"):
        assert getattr(netforge, name).type == name.removesuffix("Solver")


@pytest.mark.parametrize("solver_type", ["SGD", "Adam"])
def test_updates_on_each_backend(tmp_path, backend, solver_type):
    """The same update code on numpy and, with a GPU, cupy."""
    from netforge.backend import to_numpy

    param = solver_param(tmp_path, solver_type, "weight_decay: 0.1 clip_gradients: 2")
    solver = get_solver(param, dtype=np.float64, backend=backend)
    w0, b0 = (to_numpy(p.data).copy() for p in solver.net.params["innerprod"])
    solver.step(3)
    (w, _), _ = reference_run(solver_type, w0, b0, 3, weight_decay=0.1, clip=2.0)
    np.testing.assert_allclose(to_numpy(solver.net.params["innerprod"][0].data), w, rtol=1e-9)


def test_test_net_sources_and_states(tmp_path):
    """Caffe's InitTestNets: test_net_param first, then copies of net_param for the
    remaining test_iter entries, each with its test_state."""
    param = solver_param(tmp_path, "SGD")
    param.test_net_param.add().CopyFrom(param.net_param)
    param.test_iter.extend([1, 2, 3])
    param.test_interval = 5
    for stage in ("a", "b", "c"):
        param.test_state.add().stage.append(stage)
    solver = get_solver(param)
    assert len(solver.test_nets) == 3
    assert all(net.phase == pb.TEST for net in solver.test_nets)
    del param.test_state[2]
    with pytest.raises(ConfigError, match="test_state must be absent or given once"):
        get_solver(param)
    param.ClearField("net_param")
    param.train_net_param.CopyFrom(param.test_net_param[0])
    del param.test_state[:]
    with pytest.raises(ConfigError, match="test_iter must be given once per test net"):
        get_solver(param)


def test_debug_info_logs_update_lines(tmp_path, caplog):
    solver = make_solver(tmp_path, "SGD", "debug_info: true display: 1")
    with caplog.at_level("INFO", logger="netforge"):
        solver.step(1)
    lines = [r.getMessage() for r in caplog.records]
    update = [line for line in lines if line.startswith("    [Update] Layer innerprod, param 0")]
    assert len(update) == 1
    weight = solver.net.params["innerprod"][0]
    mean_abs_step = float(np.abs(weight.diff).mean())
    assert update[0].endswith(f"diff: {mean_abs_step:.6g}")
    assert any(line.startswith("    [Forward] Layer innerprod") for line in lines)
