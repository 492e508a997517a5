"""The static Net: construction rules, loss weights, backward analysis, sharing, weights I/O
and the pycaffe-compatible API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import netforge
from netforge.errors import ConfigError, DataError, ShapeError
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import parse_text


def net_from(text: str, phase: int = pb.TRAIN, **kwargs) -> Net:
    return Net(
        parse_text(text, pb.NetParameter), phase=phase, rng=np.random.default_rng(0), **kwargs
    )


MLP = """
name: "mlp"
layer { name: "data" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 4 dim: 3 } shape { dim: 4 dim: 2 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "h"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "relu" type: "ReLU" bottom: "h" top: "h" }
layer { name: "ip2" type: "InnerProduct" bottom: "h" top: "out"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "target" top: "loss" }
"""


def feed(net: Net, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    for name in net.inputs:
        net.blobs[name].data[...] = rng.normal(size=net.blobs[name].shape)


def test_mlp_structure_and_shapes() -> None:
    net = net_from(MLP)
    assert net.layer_names == ["data", "ip1", "relu", "ip2", "loss"]
    assert net.inputs == ["data", "target"]
    assert net.outputs == ["loss"]
    assert net.blobs["h"].shape == (4, 5) and net.blobs["out"].shape == (4, 2)
    assert [b.shape for b in net.params["ip1"]] == [(5, 3), (5,)]
    assert len(net.learnable_params) == 4
    assert net.loss_weights == {"loss": 1.0}
    assert net.layer_need_backward == [False, True, True, True, True]
    assert net.bottom_need_backward[1] == [False]


def test_forward_backward_matches_numeric_gradient() -> None:
    net = net_from(MLP, dtype=np.float64)
    feed(net)
    for p in net.learnable_params:
        p.diff[...] = 0
    net.forward_backward()
    step = 1e-6
    for blob in net.learnable_params:
        analytic = blob.diff.copy()
        for index in np.ndindex(blob.shape):
            saved = blob.data[index]
            blob.data[index] = saved + step
            plus = net.forward_loss()
            blob.data[index] = saved - step
            minus = net.forward_loss()
            blob.data[index] = saved
            assert analytic[index] == pytest.approx((plus - minus) / (2 * step), abs=1e-6)


def test_loss_weight_scales_objective_and_gradient() -> None:
    weighted = MLP.replace('top: "loss" }', 'top: "loss" loss_weight: 3 }')
    a, b = net_from(MLP, dtype=np.float64), net_from(weighted, dtype=np.float64)
    feed(a), feed(b)
    loss_a, loss_b = a.forward_backward(), b.forward_backward()
    assert loss_b == pytest.approx(3 * loss_a)
    np.testing.assert_allclose(b.params["ip1"][0].diff, 3 * a.params["ip1"][0].diff)


def test_non_loss_top_with_loss_weight_counts() -> None:
    net = net_from(
        """
        layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
        layer { name: "p" type: "Parameter" top: "w" parameter_param { shape { dim: 2 dim: 3 } } }
        layer { name: "prod" type: "Python" bottom: "x" top: "y" loss_weight: 0.5
                python_param { module: "pylayers" layer: "ScaleByParamStr" param_str: "2" } }
        """,
        dtype=np.float64,
    )
    net.blobs["x"].data[...] = np.arange(6).reshape(2, 3)
    assert net.forward_loss() == pytest.approx(0.5 * 2 * 15)
    assert net.outputs == ["w", "y"]


def test_layer_not_feeding_a_loss_skips_backward() -> None:
    text = (
        MLP + 'layer { name: "side" type: "InnerProduct" bottom: "h" top: "side" '
        "inner_product_param { num_output: 1 } }"
    )
    net = net_from(text)
    assert net.layer_need_backward[net.layer_names.index("side")] is False


def test_propagate_down_and_force_backward() -> None:
    stopped = MLP.replace('top: "out"\n', 'top: "out" propagate_down: false\n')
    net = net_from(stopped)
    i = net.layer_names.index("ip2")
    assert net.bottom_need_backward[i] == [False]
    assert net.layer_need_backward[net.layer_names.index("ip1")] is False
    forced = net_from("force_backward: true\n" + MLP)
    assert forced.bottom_need_backward[1] == [True]
    # the label bottom of a loss refuses force_backward only where the layer says so
    assert forced.layer_need_backward == [True] * 5


def test_lr_mult_zero_turns_off_param_gradients() -> None:
    frozen = MLP.replace(
        'top: "h"\n        inner_product_param',
        'top: "h" param { lr_mult: 0 } param { lr_mult: 0 }\n        inner_product_param',
    )
    net = net_from(frozen)
    assert net.layers[1].param_propagate_down == [False, False]
    assert net.params_lr[:2] == [0.0, 0.0]
    assert net.layer_need_backward[1] is False


SHARED = """
layer { name: "data" type: "Input" top: "a" top: "b"
        input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "a" top: "fa"
        param { name: "w" lr_mult: 1 } param { name: "bias" }
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "b" top: "fb"
        param { name: "w" %s } param { name: "bias" }
        inner_product_param { num_output: %d weight_filler { type: "gaussian" } } }
"""


def test_shared_params_are_one_blob() -> None:
    net = net_from(SHARED % ("", 4))
    assert net.params["ip_a"][0] is net.params["ip_b"][0]
    assert len(net.learnable_params) == 2
    conflict = SHARED % ("lr_mult: 2", 4)
    with pytest.raises(ConfigError, match="lr_mult"):
        net_from(conflict)
    with pytest.raises(ShapeError, match=r"\(5, 3\) vs \(4, 3\)"):
        net_from(SHARED % ("", 5))


def test_sharer_sets_lr_mult_for_owner() -> None:
    text = SHARED.replace('param { name: "w" lr_mult: 1 }', 'param { name: "w" }')
    net = net_from(text % ("lr_mult: 3", 4))
    assert net.params_lr[0] == 3


BOUNDED = """
layer { name: "data" type: "Input" top: "a" top: "target"
        input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 4 } } }
layer { name: "ip_a" type: "InnerProduct" bottom: "a" top: "fa" param { name: "w" }
        param { name: "bias" } inner_product_param { num_output: 4
        weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "ip_b" type: "InnerProduct" bottom: "a" top: "fb" param { name: "w" }
        param { name: "bias" } inner_product_param { num_output: 4 } }
layer { name: "prelu" type: "PReLU" bottom: "fa" top: "fa" }
layer { name: "sum" type: "Eltwise" bottom: "fa" bottom: "fb" top: "f" }
layer { name: "loss" type: "EuclideanLoss" bottom: "f" bottom: "target" top: "loss" }
"""


def test_param_diff_bounds_add_up_over_sharers_and_passes() -> None:
    """Each backward adds to a learnable parameter's bound what its layers report (both
    sharers of a weight), so the bound keeps covering the accumulating diff; a layer that
    reports nothing (PReLU) leaves it infinite, as is every bound until a reset."""
    net = net_from(BOUNDED, dtype=np.float32)
    feed(net)
    weight, bias, slope = net.learnable_params
    assert net.param_diff_bounds == [np.inf] * 3
    net.reset_param_diff_bounds(0.0)
    net.forward_backward()
    ip_a, ip_b = net.layer_dict["ip_a"], net.layer_dict["ip_b"]
    first = list(net.param_diff_bounds)
    assert first[:2] == [a + b for a, b in zip(ip_a.diff_bounds, ip_b.diff_bounds)]
    assert first[2] == np.inf
    assert 0 < np.abs(weight.diff).max() <= first[0] and 0 < np.abs(bias.diff).max() <= first[1]
    net.forward_backward()
    assert net.param_diff_bounds[:2] == pytest.approx([2 * b for b in first[:2]])
    assert np.abs(weight.diff).max() <= net.param_diff_bounds[0]


#: BOUNDED with ip_c (frozen bias) between fb and the sum, and a layer feeding no loss.
STALE = BOUNDED.replace(
    'layer { name: "sum" type: "Eltwise" bottom: "fa" bottom: "fb" top: "f" }',
    """layer { name: "ip_c" type: "InnerProduct" bottom: "fb" top: "fc" param { lr_mult: 1 }
        param { lr_mult: 0 } inner_product_param { num_output: 4
        weight_filler { type: "gaussian" } bias_filler { type: "gaussian" } } }
layer { name: "side" type: "InnerProduct" bottom: "a" top: "unused"
        inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
layer { name: "sum" type: "Eltwise" bottom: "fa" bottom: "fc" top: "f" }""",
)


@pytest.mark.parametrize("passes", [1, 2])
def test_stale_param_diffs_end_as_if_zeroed(passes) -> None:
    """Diffs marked stale (holding NaN here) come out of the backward passes exactly as
    zeroed ones do: InnerProduct writes over the stale diffs it computes (the first sharer
    to run, both of ip_b's), the net zeroes the rest before their layer runs (PReLU's
    slope, ip_c's frozen bias) or when the pass ends (side, which feeds no loss)."""
    zeroed, stale = net_from(STALE), net_from(STALE)
    for net, value in ((zeroed, 0.0), (stale, np.nan)):
        feed(net)
        for blob in net.learnable_params:
            blob.diff[...] = value
    seen: dict[str, list[list[bool]]] = {}
    for layer in stale.layers:
        if layer.type == "InnerProduct":
            backward = layer.backward

            def record(*args, layer=layer, backward=backward):
                seen.setdefault(layer.name, []).append(list(layer.stale_param_diffs))
                backward(*args)

            layer.backward = record
    stale.mark_param_diffs_stale()
    assert stale.param_diff_bounds == [0.0] * len(stale.learnable_params)
    for _ in range(passes):
        zeroed.forward_backward()
        stale.forward_backward()
    for mine, theirs in zip(stale.learnable_params, zeroed.learnable_params, strict=True):
        np.testing.assert_array_equal(mine.diff, theirs.diff)
    later = [[]] * (passes - 1)
    # ip_b runs before its sharer ip_a and leaves it nothing stale; side never runs.
    expected = {"ip_c": [[True, False], *later], "ip_b": [[True, True], *later]}
    assert seen == {**expected, "ip_a": [[]] * passes}
    assert not stale.layer_dict["ip_c"].stale_param_diffs  # reset after backward


def test_construction_errors_name_the_layer() -> None:
    with pytest.raises(ConfigError, match=r"layer 'r'.*'missing'"):
        net_from('layer { name: "r" type: "ReLU" bottom: "missing" top: "y" }')
    with pytest.raises(ConfigError, match="multiple sources"):
        net_from(
            'layer { name: "a" type: "Input" top: "x" input_param { shape { dim: 1 } } }\n'
            'layer { name: "b" type: "Input" top: "x" input_param { shape { dim: 1 } } }'
        )
    with pytest.raises(ConfigError, match="did you mean 'SoftmaxWithLoss'"):
        net_from('layer { name: "c" type: "SoftmaxWithLos" }')


def test_python_layers_load_and_can_be_refused() -> None:
    text = """
    layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 3 } } }
    layer { name: "py" type: "Python" bottom: "x" top: "y"
            python_param { module: "pylayers" layer: "ScaleByParamStr" param_str: "1.5" } }
    """
    net = net_from(text)
    out = net.forward(x=np.array([1.0, 2.0, 4.0]))
    np.testing.assert_allclose(out["y"], [1.5, 3.0, 6.0])
    with pytest.raises(ConfigError, match="Python layer"):
        net_from(text, allow_python_layers=False)


def test_pycaffe_forward_and_reshape_on_new_input_size() -> None:
    net = net_from(MLP, phase=pb.TEST)
    out = net.forward(data=np.ones((7, 3)), target=np.zeros((7, 2)))
    assert set(out) == {"loss"}
    assert net.blobs["h"].shape == (7, 5)
    h = net.forward(blobs=["h"], end="relu")
    assert set(h) == {"h"} and (h["h"] >= 0).all()


def test_forward_reshapes_a_layer_again_only_when_a_shape_changed() -> None:
    """A layer whose reshape reads only shapes (``reshape_follows_shapes``) reshapes at a
    forward only when a bottom, top or parameter shape differs from what its last reshape
    left; a Python layer reshapes at every forward, and ``Net.reshape`` runs them all."""
    text = """
    layer { name: "data" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }
    layer { name: "py" type: "Python" bottom: "x" top: "y"
            python_param { module: "pylayers" layer: "ScaleByParamStr" param_str: "2" } }
    layer { name: "ip" type: "InnerProduct" bottom: "y" top: "z"
            inner_product_param { num_output: 2 weight_filler { type: "gaussian" } } }
    """
    net = net_from(text, phase=pb.TEST)
    calls = {"py": 0, "ip": 0}
    for name in calls:
        layer = net.layer_dict[name]

        def counted(bottom, top, name=name, reshape=layer.reshape):
            calls[name] += 1
            reshape(bottom, top)

        layer.reshape = counted
    net.forward()
    net.forward()
    assert calls == {"py": 2, "ip": 1}
    net.reshape()
    assert calls == {"py": 3, "ip": 2}
    net.forward()
    assert calls == {"py": 4, "ip": 2}
    # A new bottom shape, set on the input blob directly rather than through forward(x=...).
    net.blobs["x"].reshape(5, 3)
    net.forward()
    assert calls == {"py": 5, "ip": 3} and net.blobs["z"].shape == (5, 2)
    # A top reshaped by the caller is set back by the layer's reshape.
    net.blobs["z"].reshape(1, 1)
    net.forward()
    assert calls == {"py": 6, "ip": 4} and net.blobs["z"].shape == (5, 2)
    x = np.random.default_rng(3).standard_normal((5, 3))
    w, b = (p.data.astype(np.float64) for p in net.params["ip"])
    np.testing.assert_allclose(net.forward(x=x)["z"], 2 * x @ w.T + b, rtol=1e-5, atol=1e-6)


def test_save_and_copy_round_trip(tmp_path: Path) -> None:
    a, b = net_from(MLP), net_from(MLP)
    a.save(tmp_path / "w.caffemodel")
    a.save_hdf5(tmp_path / "w.caffemodel.h5")
    for source in ("w.caffemodel", "w.caffemodel.h5"):
        b.params["ip1"][0].data[...] = 0
        report = b.copy_from(tmp_path / source)
        assert report.copied == ["ip1", "ip2"] and not report.missing
        for name in ("ip1", "ip2"):
            for mine, theirs in zip(b.params[name], a.params[name]):
                np.testing.assert_array_equal(mine.data, theirs.data)
    (tmp_path / "m.prototxt").write_text(MLP)
    # pycaffe's positional form: Net(model, weights, phase)
    c = Net(str(tmp_path / "m.prototxt"), str(tmp_path / "w.caffemodel"), netforge.TEST)
    assert c.phase == netforge.TEST
    np.testing.assert_array_equal(c.params["ip2"][0].data, a.params["ip2"][0].data)


def test_copy_report_and_errors(tmp_path: Path) -> None:
    a = net_from(MLP)
    a.save(tmp_path / "w.caffemodel")
    renamed = MLP.replace('name: "ip2"', 'name: "head"')
    report = net_from(renamed).copy_from(tmp_path / "w.caffemodel", exclude=["ip1"])
    assert report.copied == [] and report.reinitialised == ["ip1"]
    assert report.missing == ["head"] and report.unused == ["ip2"]
    wider = MLP.replace("num_output: 5", "num_output: 6")
    with pytest.raises(ShapeError, match=r"layer 'ip1' blob 0 has shape \(5, 3\).*\(6, 3\)"):
        net_from(wider).copy_from(tmp_path / "w.caffemodel")
    data = (tmp_path / "w.caffemodel").read_bytes()
    (tmp_path / "cut.caffemodel").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        net_from(MLP).copy_from(tmp_path / "cut.caffemodel")
    with pytest.raises(DataError, match="no such weights file"):
        net_from(MLP).copy_from(tmp_path / "absent.caffemodel")


def test_legacy_4d_blob_shapes_load_into_nd_params() -> None:
    source = pb.NetParameter()
    layer = source.layer.add(name="ip1")
    weight = layer.blobs.add(num=1, channels=1, height=5, width=3)
    weight.data.extend(np.arange(15, dtype=np.float32))
    bias = layer.blobs.add(num=1, channels=1, height=1, width=5)
    bias.data.extend(np.ones(5, dtype=np.float32))
    net = net_from(MLP)
    net.copy_from(source)
    np.testing.assert_array_equal(net.params["ip1"][0].data, np.arange(15).reshape(5, 3))


def test_debug_info_and_first_nonfinite(caplog) -> None:
    net = net_from(MLP)
    feed(net)
    net.debug_info = True
    with caplog.at_level("INFO", logger="netforge"):
        net.forward_backward()
    assert "[Forward] Layer ip1, top blob h data:" in caplog.text
    assert "[Backward] Layer ip2, param blob 0 diff:" in caplog.text
    assert net.first_nonfinite() is None
    net.params["ip2"][0].data[0, 0] = np.nan
    net.forward_backward()
    assert net.first_nonfinite() == ("ip2", "out", "data")


def test_pycaffe_module_surface() -> None:
    assert netforge.TRAIN == 0 and netforge.TEST == 1
    netforge.set_mode_cpu()
    netforge.set_device(0)


def test_set_input_arrays_feeds_the_memory_data_layer() -> None:
    net = net_from(
        """
        layer { name: "mem" type: "MemoryData" top: "data" top: "label"
                memory_data_param { batch_size: 2 channels: 1 height: 1 width: 3 } }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "out"
                inner_product_param { num_output: 1 weight_filler { type: "constant" value: 1 } } }
        layer { name: "silence" type: "Silence" bottom: "label" }
        """,
        phase=pb.TEST,
    )
    data = np.arange(12, dtype=np.float32).reshape(4, 1, 1, 3)
    net.set_input_arrays(data, np.arange(4, dtype=np.float32))
    np.testing.assert_allclose(net.forward()["out"].ravel(), [3, 12])
    np.testing.assert_allclose(net.forward()["out"].ravel(), [21, 30])
    with pytest.raises(ConfigError, match="no MemoryData"):
        net_from(MLP).set_input_arrays(data, np.zeros(4))
