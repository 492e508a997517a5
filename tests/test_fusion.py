"""netforge.fusion: BatchNorm → Scale → ReLU runs of a deploy net applied in one pass give
what the layers one by one give, against a float64 formula, on numba's kernels and on the
numpy path; and every case that must see the layers one by one runs them."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from netforge import fusion
from netforge.backend import to_numpy
from netforge.builtin_layers import norm_kernels
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import parse_text
from netforge.timing import time_net
from tests.harness import KERNEL_PATHS, kernel_path

CHANNELS = 6
SHAPE = (2, 5, 5, 4)
#: float32 against the float64 formula: a few ulps of the values' scale (about 10)
TOLERANCE = {np.float32: {"rtol": 3e-5, "atol": 3e-5}, np.float64: {"rtol": 1e-12, "atol": 1e-12}}
#: Each case: the chain after the 1x1 convolution, as ``chain_text``'s keyword arguments.
CASES = {
    "bn_scale_relu": {},
    "bn_test_default_scale_leaky": {"global_stats": None, "slope": 0.2},
    "bn_scale": {"slope": None},
    "scale_without_bias_negative_slope": {"bias": False, "slope": -0.5},
    "bn_relu": {"scale": False},
    "bn_alone": {"scale": False, "slope": None},
    "bn_zero_normaliser": {"normaliser": 0.0},
    "bn_out_of_place": {"out_of_place": True, "slope": 0.1},
}


def chain_text(
    *,
    scale: bool = True,
    bias: bool = True,
    slope: float | None = 0.0,
    global_stats: bool | None = True,
    out_of_place: bool = False,
    conv: bool = True,
    force_backward: bool = False,
    normaliser: float = 2.5,
) -> str:
    """A deploy net: Input, a 1x1 Convolution (or none), BatchNorm (eps 1e-3), then Scale and
    ReLU in place on the BatchNorm's top when asked. ``normaliser`` is read by ``fill``."""
    blob = "bn" if out_of_place else "x"
    stats = "" if global_stats is None else f"use_global_stats: {str(global_stats).lower()}"
    dims = " ".join(f"dim: {d}" for d in SHAPE)
    lines = [
        f"name: 'chain' force_backward: {str(force_backward).lower()}",
        f"layer {{ name: 'data' type: 'Input' top: '{'data' if conv else 'x'}' "
        f"input_param {{ shape {{ {dims} }} }} }}",
    ]
    if conv:
        lines.append(
            "layer { name: 'conv' type: 'Convolution' bottom: 'data' top: 'x' "
            f"convolution_param {{ num_output: {CHANNELS} kernel_size: 1 }} }}"
        )
    lines.append(
        f"layer {{ name: 'bn' type: 'BatchNorm' bottom: 'x' top: '{blob}' "
        f"batch_norm_param {{ eps: 1e-3 {stats} }} }}"
    )
    if scale:
        lines.append(
            f"layer {{ name: 'scale' type: 'Scale' bottom: '{blob}' top: '{blob}' "
            f"scale_param {{ bias_term: {str(bias).lower()} }} }}"
        )
    if slope is not None:
        lines.append(
            f"layer {{ name: 'relu' type: 'ReLU' bottom: '{blob}' top: '{blob}' "
            f"relu_param {{ negative_slope: {slope} }} }}"
        )
    return "\n".join(lines)


def build(dtype=np.float32, phase=pb.TEST, backend=None, **case) -> Net:
    """The net of ``chain_text(**case)`` with random parameters (``fill``)."""
    net = Net(
        parse_text(chain_text(**case), pb.NetParameter),
        phase=phase,
        dtype=dtype,
        backend=backend,
        rng=np.random.default_rng(0),
    )
    fill(net, case.get("normaliser", 2.5))
    return net


def fill(net: Net, normaliser: float, seed: int = 1) -> None:
    """Random weights; BatchNorm's sums as Caffe keeps them, scaled by ``normaliser``; Scale
    factors of both signs."""
    rng = np.random.default_rng(seed)
    for name, blobs in net.params.items():
        if name == "bn":
            blobs[0].data[...] = normaliser * rng.normal(size=blobs[0].shape)
            blobs[1].data[...] = normaliser * rng.uniform(0.2, 2.0, blobs[1].shape)
            blobs[2].data[...] = normaliser
        else:
            for blob in blobs:
                blob.data[...] = rng.normal(size=blob.shape)


def reference(net: Net, x: np.ndarray, relu: bool = True) -> np.ndarray:
    """The chain's output in float64 (without the ReLU unless ``relu``), from the formulas
    of Caffe's layers and the net's parameters as they are now."""
    params = {
        name: [np.asarray(to_numpy(b.data), np.float64) for b in blobs]
        for name, blobs in net.params.items()
    }
    v = np.asarray(x, np.float64)
    if "conv" in params:
        weight, bias = params["conv"]
        v = np.einsum("oc,nchw->nohw", weight[:, :, 0, 0], v) + bias[None, :, None, None]
    mean_sum, var_sum, norm = params["bn"]
    factor = 0.0 if norm[0] == 0 else 1.0 / norm[0]
    v = (v - factor * mean_sum[None, :, None, None]) / np.sqrt(
        factor * var_sum[None, :, None, None] + float(np.float32(1e-3))
    )
    if "scale" in params:
        v = v * params["scale"][0][None, :, None, None]
        if len(params["scale"]) > 1:
            v = v + params["scale"][1][None, :, None, None]
    if relu and "relu" in net.layer_dict:
        slope = net.layer_dict["relu"].slope
        v = np.maximum(v, 0) + slope * np.minimum(v, 0)
    return v


def output(net: Net) -> np.ndarray:
    """A copy of the chain's output (the last layer's top)."""
    return np.array(to_numpy(net.blobs[net.layer_tops[-1][0]].data), copy=True)


def count_forwards(net: Net, monkeypatch) -> dict[str, int]:
    """Per layer name, the calls of its own forward from now on."""
    counts = dict.fromkeys(net.layer_names, 0)
    for layer in net.layers:

        def counted(bottom, top, _layer=layer, _forward=layer.forward):
            counts[_layer.name] += 1
            return _forward(bottom, top)

        monkeypatch.setattr(layer, "forward", counted)
    return counts


@pytest.fixture(params=KERNEL_PATHS)
def path(request, monkeypatch):
    """Each test body runs on numba's kernels, on one worker and with the channels split,
    and on the numpy path (``harness.kernel_path``)."""
    return kernel_path(request, monkeypatch, norm_kernels, ("batch_norm_fold", "channel_affine"))


def unfused_forward(net: Net, monkeypatch, **inputs) -> np.ndarray:
    with monkeypatch.context() as patch:
        patch.setenv(fusion.SETTING, "0")
        net.forward(**inputs)
    return output(net)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_chain_matches_layers_and_formula(case, dtype, path, monkeypatch) -> None:
    net = build(dtype, **CASES[case])
    x = np.random.default_rng(2).normal(size=SHAPE) * 3
    expected = reference(net, x)
    counts = count_forwards(net, monkeypatch)
    unfused = unfused_forward(net, monkeypatch, data=x)
    assert all(counts.values()), counts  # NETFORGE_FUSE=0: every layer ran
    kind, called = path
    called.clear()
    counts.update(dict.fromkeys(counts, 0))
    net.forward(data=x)
    fused = output(net)
    np.testing.assert_allclose(unfused, expected, **TOLERANCE[dtype])
    np.testing.assert_allclose(fused, expected, **TOLERANCE[dtype])
    chain = [name for name in ("bn", "scale", "relu") if name in net.layer_dict]
    if len(chain) == 1:  # BatchNorm alone: nothing to fuse, its own forward runs
        assert fusion.plan(net) == {}
        assert counts["bn"] == 1
        return
    [run] = fusion.plan(net).values()
    assert [net.layer_names[i] for i in range(run.first, run.last + 1)] == chain
    assert {name: counts[name] for name in chain} == dict.fromkeys(chain, 0)
    assert counts["conv"] == 1
    if kind == "numpy":
        assert called == []
    else:
        assert called == ["batch_norm_fold", "channel_affine"]


def test_parameters_edited_in_place_are_used(path, monkeypatch) -> None:
    net = build(slope=0.3)
    x = np.random.default_rng(3).normal(size=SHAPE)
    net.forward(data=x)
    np.testing.assert_allclose(output(net), reference(net, x), rtol=3e-5, atol=3e-5)
    (mean, var, norm), (factors, bias) = net.params["bn"], net.params["scale"]
    # Each written into the blob's own array, as pycaffe users do (net.params[...].data[...]).
    for blob, values in (
        (mean, mean.data + 1.5),
        (var, var.data * 4),
        (factors, -2 * factors.data),
        (bias, bias.data - 0.7),
        (norm, 0),
    ):
        before = output(net)
        blob.data[...] = values
        net.forward(data=x)
        np.testing.assert_allclose(output(net), reference(net, x), rtol=3e-5, atol=3e-5)
        assert not np.allclose(output(net), before)


def test_nan_and_infinity_as_the_layers_give_them(path, monkeypatch) -> None:
    for slope in (0.0, 0.25):
        net = build(conv=False, slope=slope)
        x = np.random.default_rng(4).normal(size=SHAPE)
        x[0, :, 0, 0] = np.nan
        x[0, :, 1, 0] = -np.inf
        x[0, :, 2, 0] = np.inf
        unfused = unfused_forward(net, monkeypatch, x=x)
        net.forward(x=x)
        assert fusion.plan(net)
        fused = output(net)
        np.testing.assert_allclose(fused, unfused, rtol=3e-6, atol=1e-6)  # NaN where NaN
        with np.errstate(invalid="ignore"):  # Caffe's formula: 0·(−inf)
            finite = reference(net, x)[..., 1:]  # the special values are all in column 0
        np.testing.assert_allclose(fused[..., 1:], finite, rtol=3e-5, atol=3e-5)
        # The infinities exactly: ±inf through the affine map, then 0 or slope·(−inf).
        np.testing.assert_array_equal(fused[0, :, 1:3, 0], unfused[0, :, 1:3, 0])
        assert np.isinf(fused[0, :, 1:3, 0]).any() and (fused[0, :, 1:3, 0] == 0).any() == (
            slope == 0
        )


def test_force_backward_net_is_not_fused_and_backpropagates(monkeypatch) -> None:
    net = build(np.float64, conv=False, slope=0.1, force_backward=True)
    assert fusion.plan(net) == {}
    x = np.random.default_rng(5).normal(size=SHAPE)
    counts = count_forwards(net, monkeypatch)
    net.forward(x=x)
    assert all(counts.values())
    np.testing.assert_allclose(output(net), reference(net, x), rtol=1e-12)
    # Global statistics are constants (Caffe's choice): dx = dy·a where the output is
    # positive, else dy·a·slope, a = s / sqrt(var + eps).
    dy = np.random.default_rng(6).normal(size=SHAPE)
    dx = net.backward(x=dy)["x"]
    var = net.params["bn"][1].data / net.params["bn"][2].data[0]
    a = (net.params["scale"][0].data / np.sqrt(var + float(np.float32(1e-3))))[:, None, None]
    slope = net.layer_dict["relu"].slope  # 0.1 as the prototxt's float holds it
    np.testing.assert_allclose(dx, dy * a * np.where(output(net) > 0, 1, slope), rtol=1e-10)


def test_train_net_is_not_fused_and_learns(monkeypatch) -> None:
    # BatchNorm keeps global statistics: the Scale's gradient, not the statistics, rules
    # fusion out. Loss 1/(2N)·Σ(y − t)², so the bias gradient is Σ (y − t)/N · relu'(v).
    shape = " ".join(f"dim: {d}" for d in SHAPE)
    text = chain_text(conv=False, slope=0.1) + (
        f"\nlayer {{ name: 't' type: 'Input' top: 't' input_param {{ shape {{ {shape} }} }} }}"
        "\nlayer { name: 'loss' type: 'EuclideanLoss' bottom: 'x' bottom: 't' top: 'loss' }"
    )
    net = Net(parse_text(text, pb.NetParameter), phase=pb.TRAIN, dtype=np.float64)
    fill(net, 2.5)
    assert fusion.plan(net) == {}
    rng = np.random.default_rng(9)
    x, t = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    counts = count_forwards(net, monkeypatch)
    net.forward(x=x, t=t)
    assert all(counts.values())
    y = np.array(net.blobs["x"].data)
    np.testing.assert_allclose(y, reference(net, x), rtol=1e-12)
    net.clear_param_diffs()
    net.backward()
    slope = np.where(y > 0, 1.0, net.layer_dict["relu"].slope)
    expected = ((y - t) / SHAPE[0] * slope).sum(axis=(0, 2, 3))
    np.testing.assert_allclose(net.params["scale"][1].diff, expected, rtol=1e-10)


def test_forward_range_inside_a_run_runs_the_layers(path, monkeypatch) -> None:
    net = build(conv=False, slope=0.0)
    x = np.random.default_rng(7).normal(size=SHAPE) * 3
    counts = count_forwards(net, monkeypatch)
    net.forward(x=x, end="scale")  # stops before the ReLU: negative values stay
    assert counts == {"data": 1, "bn": 1, "scale": 1, "relu": 0}
    assert (output(net) < 0).any()
    np.testing.assert_allclose(output(net), reference(net, x, relu=False), rtol=3e-5, atol=3e-5)
    # From the Scale on: Scale and ReLU on the blob as it is.
    v = np.random.default_rng(8).normal(size=SHAPE).astype(np.float32)
    net.blobs["x"].data[...] = v
    net.forward(start="scale")
    assert counts == {"data": 1, "bn": 1, "scale": 2, "relu": 1}
    scale, bias = (b.data[:, None, None] for b in net.params["scale"])
    np.testing.assert_allclose(output(net), np.maximum(v * scale + bias, 0), rtol=3e-5, atol=3e-5)
    # The whole run: fused.
    net.forward(x=x)
    assert counts == {"data": 2, "bn": 1, "scale": 2, "relu": 1}
    np.testing.assert_allclose(output(net), reference(net, x), rtol=3e-5, atol=3e-5)


def test_hooks_and_debug_info_see_every_layer(monkeypatch, caplog) -> None:
    net = build(slope=0.0)
    x = np.random.default_rng(10).normal(size=SHAPE)
    seen: list[int] = []
    net.after_forward(seen.append)
    counts = count_forwards(net, monkeypatch)
    net.forward(data=x)
    assert seen == list(range(len(net.layers)))
    assert all(counts.values())
    np.testing.assert_allclose(output(net), reference(net, x), rtol=3e-5, atol=3e-5)
    quiet = build(slope=0.0)
    quiet.debug_info = True
    with caplog.at_level(logging.INFO, logger="netforge"):
        quiet.forward(data=x)
    logged = caplog.text
    assert all(f"[Forward] Layer {name}, top blob" in logged for name in ("bn", "scale", "relu"))


def test_time_net_times_every_layer(monkeypatch) -> None:
    net = build(slope=0.0)
    counts = count_forwards(net, monkeypatch)
    timings = time_net(net, iterations=2, log=logging.getLogger("test_fusion.quiet"))
    assert timings.layer_names == net.layer_names
    # The warm-up pass runs the chain fused; each timed pass runs every layer alone.
    assert counts == {"data": 3, "conv": 3, "bn": 2, "scale": 2, "relu": 2}


def test_other_array_modules_run_the_layers(backend, monkeypatch) -> None:
    net = build(backend=backend, slope=0.2)
    x = np.random.default_rng(11).normal(size=SHAPE)
    counts = count_forwards(net, monkeypatch)
    net.forward(data=x)
    fused = backend.xp is np
    assert {name: counts[name] for name in ("bn", "scale", "relu")} == dict.fromkeys(
        ("bn", "scale", "relu"), 0 if fused else 1
    )
    result = to_numpy(net.blobs["x"].data)
    np.testing.assert_allclose(result, reference(net, x), rtol=3e-5, atol=3e-5)


def test_batch_statistics_and_scalar_scale_are_not_fused(monkeypatch) -> None:
    x = np.random.default_rng(12).normal(size=SHAPE) * 2 + 1
    # TEST phase, but batch statistics asked for: each channel of the BatchNorm's output
    # has mean 0, so each channel of the Scale's has the Scale's bias as its mean. A
    # training run (no backward here), not an inference one.
    net = build(conv=False, global_stats=False, slope=None)
    assert [type(run) for run in fusion.plan(net).values()] == [fusion.TrainingRun]
    net.forward(x=x)
    means = output(net).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(means, net.params["scale"][1].data, rtol=1e-5, atol=1e-5)
    # A Scale with one factor for the whole blob (num_axes 0) is not a per-channel map: the
    # BatchNorm, Scale and ReLU run one by one, with or without NETFORGE_FUSE.
    text = chain_text(conv=False).replace("bias_term: true", "bias_term: true num_axes: 0")
    net = Net(parse_text(text, pb.NetParameter), phase=pb.TEST)
    fill(net, 2.5)
    assert net.params["scale"][0].shape == ()
    assert fusion.plan(net) == {}
    counts = count_forwards(net, monkeypatch)
    net.forward(x=x)
    assert all(counts.values())
    mean, var, norm = (b.data for b in net.params["bn"])
    factor, bias = (float(b.data) for b in net.params["scale"])
    normalised = (x - mean[:, None, None] / 2.5) / np.sqrt(var[:, None, None] / 2.5 + 1e-3)
    expected = np.maximum(normalised * factor + bias, 0)
    np.testing.assert_allclose(output(net), expected, rtol=3e-5, atol=3e-5)


# -- training runs: BatchNorm with batch statistics → Scale → ReLU, forward and backward --
def training_text(*, slope: float | None = 0.0, bias: bool = True, frozen: bool = False) -> str:
    """A training net: two 1x1 Convolutions, each followed by BatchNorm (batch statistics),
    Scale and, after the first, ReLU (``slope``; none when None), all in place, then a
    Euclidean loss; ``frozen``: the first Scale learns nothing (lr_mult 0)."""
    dims = " ".join(f"dim: {d}" for d in SHAPE)
    lines = [
        "name: 'training'",
        f"layer {{ name: 'data' type: 'Input' top: 'data' top: 't' "
        f"input_param {{ shape {{ {dims} }} shape {{ {dims} }} }} }}",
    ]
    frozen_params = "param { lr_mult: 0 } param { lr_mult: 0 }" if frozen else ""
    for k, after in ((1, slope), (2, None)):
        source = "data" if k == 1 else "x1"
        lines += [
            f"layer {{ name: 'conv{k}' type: 'Convolution' bottom: '{source}' top: 'x{k}' "
            f"convolution_param {{ num_output: {SHAPE[1]} kernel_size: 1 }} }}",
            f"layer {{ name: 'bn{k}' type: 'BatchNorm' bottom: 'x{k}' top: 'x{k}' "
            "batch_norm_param { eps: 1e-3 moving_average_fraction: 0.9 } }",
            f"layer {{ name: 'scale{k}' type: 'Scale' bottom: 'x{k}' top: 'x{k}' "
            f"{frozen_params if k == 1 else ''} "
            f"scale_param {{ bias_term: {str(bias).lower()} }} }}",
        ]
        if after is not None:
            lines.append(
                f"layer {{ name: 'relu{k}' type: 'ReLU' bottom: 'x{k}' top: 'x{k}' "
                f"relu_param {{ negative_slope: {after} }} }}"
            )
    lines.append("layer { name: 'loss' type: 'EuclideanLoss' bottom: 'x2' bottom: 't' }")
    return "\n".join(lines)


def training_pair(dtype, **case) -> tuple[Net, Net]:
    """Two copies of ``training_text(**case)`` with the same random parameters."""
    nets = []
    for _ in range(2):
        net = Net(parse_text(training_text(**case), pb.NetParameter), pb.TRAIN, dtype=dtype)
        rng = np.random.default_rng(13)
        for name, blobs in net.params.items():
            if not name.startswith("bn"):
                for blob in blobs:
                    blob.data[...] = rng.normal(size=blob.shape)
        nets.append(net)
    return nets[0], nets[1]


def training_pass(net: Net, monkeypatch, fuse: bool, **backward) -> float:
    """Forward and backward of ``net`` from stale parameter diffs, as the solver runs it,
    with fusion allowed or not; returns the loss."""
    rng = np.random.default_rng(14)
    net.blobs["data"].data[...] = rng.normal(size=SHAPE) * 2 + 0.5
    net.blobs["t"].data[...] = rng.normal(size=SHAPE)
    with monkeypatch.context() as patch:
        patch.setenv(fusion.SETTING, "1" if fuse else "0")
        net.mark_param_diffs_stale()
        loss = net.forward_loss()
        net.backward(**backward)
    return loss


def assert_same_state(fused: Net, layers: Net, **tolerance) -> None:
    """Every blob's data and diff, and every parameter's data and diff (BatchNorm's running
    statistics among them), alike in both nets."""
    for name in layers.blobs:
        for what in ("data", "diff"):
            np.testing.assert_allclose(
                getattr(fused.blobs[name], what),
                getattr(layers.blobs[name], what),
                err_msg=f"blob {name} {what}",
                **tolerance,
            )
    for name, blobs in layers.params.items():
        for k, blob in enumerate(blobs):
            for what in ("data", "diff"):
                np.testing.assert_allclose(
                    getattr(fused.params[name][k], what),
                    getattr(blob, what),
                    err_msg=f"{name}[{k}] {what}",
                    **tolerance,
                )


TRAINING_CASES = {
    "relu": {},
    "leaky_relu": {"slope": 0.1},
    "no_relu": {"slope": None},
    "scale_without_bias": {"bias": False},
    "frozen_scale": {"frozen": True},
}


@pytest.mark.skipif(not norm_kernels._jit.enabled(), reason="training runs need numba")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", list(TRAINING_CASES))
def test_training_run_matches_the_layers_forward_and_backward(case, dtype, monkeypatch):
    fused, layers = training_pair(dtype, **TRAINING_CASES[case])
    runs = list(fusion.plan(fused).values())
    assert [type(run) for run in runs] == [fusion.TrainingRun] * 2
    assert [fused.layer_names[run.first] for run in runs] == ["bn1", "bn2"]
    counts = count_forwards(fused, monkeypatch)
    backward_calls = []
    for layer in fused.layers:
        original = layer.backward
        monkeypatch.setattr(
            layer,
            "backward",
            lambda *a, _name=layer.name, _f=original: backward_calls.append(_name) or _f(*a),
        )
    tolerance = TOLERANCE[dtype]
    for _ in range(2):  # twice: the running statistics move on, the kept buffers are reused
        loss = training_pass(fused, monkeypatch, True)
        assert loss == pytest.approx(training_pass(layers, monkeypatch, False), rel=1e-5)
        assert_same_state(fused, layers, **tolerance)
    chains = {"bn1", "scale1", "relu1", "bn2", "scale2"} & set(fused.layer_names)
    assert not any(counts[name] for name in chains)
    assert not chains & set(backward_calls)
    # The running statistics are Caffe's: the normaliser 1 + 0.9 after two passes.
    np.testing.assert_allclose(fused.params["bn1"][2].data, [1.9])


@pytest.mark.skipif(not norm_kernels._jit.enabled(), reason="training runs need numba")
def test_after_a_fused_forward_the_layers_backward_one_by_one_when_watched(monkeypatch):
    """A backward hook, debug_info, a backward that starts inside a run, or a forward of
    one of its layers alone in between: the run's layers run their own backward, the Scale
    from the input it had in the fused forward, rebuilt from the BatchNorm's kept values."""
    for watch in ("hook", "debug_info", "start", "bn1 alone"):
        fused, layers = training_pair(np.float64, slope=0.2)
        backward = {"start": "scale1"} if watch == "start" else {}
        if watch == "hook":
            seen: list[int] = []
            fused.before_backward(seen.append)
            layers.before_backward(seen.append)
        calls = count_forwards(fused, monkeypatch)
        rng = np.random.default_rng(15)
        x, t = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
        for net in (fused, layers):
            net.blobs["data"].data[...], net.blobs["t"].data[...] = x, t
            net.clear_param_diffs()
        with monkeypatch.context() as patch:
            patch.setenv(fusion.SETTING, "1")
            fused.forward_loss()  # no hook on forward: fused
            assert calls["bn1"] == 0 and calls["scale1"] == 0
            if watch == "bn1 alone":
                fused.forward(start="bn1", end="bn1")
            fused.debug_info = watch == "debug_info"
            fused.backward(**backward)
        with monkeypatch.context() as patch:
            patch.setenv(fusion.SETTING, "0")
            layers.forward_loss()
            if watch == "bn1 alone":
                layers.forward(start="bn1", end="bn1")
            layers.backward(**backward)
        assert_same_state(fused, layers, rtol=1e-12, atol=1e-12)
