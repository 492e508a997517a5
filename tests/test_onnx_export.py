"""ONNX export: every layer type a deploy net uses, run in ONNX Runtime beside netforge.

Each small net is exported with a dynamic batch and run at batch 1 and 3; ONNX Runtime's
outputs must match netforge's forward within 1e-4 of the largest output (at least 1).
netforge's own layers are checked against float64 formulas in their own tests; the real
models of ../shared/conformance are also checked against the outputs an independent Caffe
implementation gave.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx  # the test extra installs onnx and onnxruntime: these tests run in CI
import pytest
from conftest import SHARED, shared_path

from netforge.cli.main import main
from netforge.errors import ConfigError
from netforge.export import net_to_onnx
from netforge.export.onnx_check import compare, random_weights, session
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import parse_text

TOLERANCE = 1e-4


def build(body: str, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> Net:
    """A TEST net of Input layers for ``shapes`` followed by ``body``, random weights."""
    inputs = "".join(
        f'layer {{ name: "{name}" type: "Input" top: "{name}" '
        f"input_param {{ shape {{ {' '.join(f'dim: {d}' for d in shape)} }} }} }}\n"
        for name, shape in shapes.items()
    )
    net = Net(parse_text(inputs + body, pb.NetParameter), phase=pb.TEST)
    random_weights(net, seed)
    return net


def check(
    net: Net, batches=(1, 3), inputs=None, fold: bool = False, opset: int | None = None
) -> set[str]:
    """Export ``net`` with a dynamic batch, compare at ``batches``; returns the ops used."""
    kwargs = {"opset": opset} if opset else {}
    model = net_to_onnx(net, dynamic_batch=True, fold_batchnorm=fold, **kwargs)
    for result in compare(net, model, batches, inputs=inputs, threads=1):
        assert result.relative <= TOLERANCE, (result.batch, result.max_diff, result.max_output)
        assert result.max_output > 0  # an all-zero output would compare equal to anything
    return {node.op_type for node in model.graph.node}


def integers(high: int, seed: int):
    """An input maker: integers in [0, high) stored as floats (indices, or many ties)."""
    return lambda name, shape: (
        np.random.default_rng(seed).integers(0, high, shape).astype(np.float32)
    )


def normal(scale: float, seed: int):
    """An input maker: normal values of standard deviation ``scale``."""
    return lambda name, shape: (scale * np.random.default_rng(seed).standard_normal(shape)).astype(
        np.float32
    )


def layer(name: str, type_: str, bottom: str | list[str], top: str | list[str], extra="") -> str:
    """One layer's prototxt text."""
    bottoms = [bottom] if isinstance(bottom, str) else bottom
    tops = [top] if isinstance(top, str) else top
    links = " ".join([*(f'bottom: "{b}"' for b in bottoms), *(f'top: "{t}"' for t in tops)])
    return f'layer {{ name: "{name}" type: "{type_}" {links} {extra} }}\n'


# -- pooling: Caffe's sizes and divisors ------------------------------------------------------
POOLING = [
    # (H, W, pooling_param): ceil windows overhanging the padded input, the clipped last
    # window ((out-1)*stride >= H + pad drops it), floor mode, asymmetric geometry
    (6, 7, "kernel_size: 3 stride: 2"),
    (3, 5, "kernel_size: 3 stride: 3 pad: 2"),
    (7, 7, "kernel_size: 3 stride: 2 pad: 1"),
    (8, 9, "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 3 pad_h: 1 pad_w: 1"),
    (9, 8, "kernel_size: 2 stride: 2 round_mode: FLOOR"),
    (7, 6, "kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR"),
    (5, 6, "global_pooling: true"),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize(("h", "w", "param"), POOLING)
def test_pooling_matches_caffe_windows_and_divisors(method: str, h: int, w: int, param: str):
    body = layer("pool", "Pooling", "x", "y", f"pooling_param {{ pool: {method} {param} }}")
    check(build(body, {"x": (2, 3, h, w)}))


def test_ave_pooling_border_divisor_is_caffes() -> None:
    # H=3, kernel 3, stride 3, pad 2, CEIL: Caffe drops the window starting in the far
    # padding, and divides the first by 3·3 (padding counted), computed here by hand.
    body = layer(
        "pool", "Pooling", "x", "y", "pooling_param { pool: AVE kernel_size: 3 stride: 3 pad: 2 }"
    )
    net = build(body, {"x": (1, 1, 3, 3)})
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    model = net_to_onnx(net)
    (got,) = session(model).run(["y"], {"x": x})
    padded = np.pad(x[0, 0].astype(np.float64), 2)
    expected = np.array([[padded[r : r + 3, c : c + 3].sum() / 9 for c in (0, 3)] for r in (0, 3)])
    assert got.shape == (1, 1, 2, 2)
    np.testing.assert_allclose(got[0, 0], expected, rtol=1e-6)


def test_max_pooling_mask_top_and_stochastic_test_pooling() -> None:
    body = layer(
        "pool",
        "Pooling",
        "x",
        ["y", "mask"],
        "pooling_param { pool: MAX kernel_size: 3 stride: 2 pad: 1 }",
    )
    body += layer(
        "stoch", "Pooling", "p", "s", "pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }"
    )
    net = build(body, {"x": (2, 3, 7, 8), "p": (2, 3, 7, 8)})

    def make(name, shape):
        # stochastic pooling reads activations (ReLU outputs): non-negative
        value = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
        return np.abs(value) + 0.1 if name == "p" else value

    check(net, inputs=make)


def test_max_pooling_window_wholly_past_the_input_is_caffes() -> None:
    # kernel 1, stride 3, no pad, CEIL on 5x5: the third window starts at 6, past the
    # input; Caffe's loop over it is empty and leaves -FLT_MAX and mask -1 (by hand here)
    body = layer(
        "pool",
        "Pooling",
        "x",
        ["y", "mask"],
        "pooling_param { pool: MAX kernel_size: 1 stride: 3 }",
    )
    net = build(body, {"x": (2, 3, 5, 5)})
    x = np.arange(2 * 3 * 25, dtype=np.float32).reshape(2, 3, 5, 5)
    y, mask = session(net_to_onnx(net, dynamic_batch=True)).run(["y", "mask"], {"x": x})
    lowest = np.finfo(np.float32).min
    expected = np.full((2, 3, 3, 3), lowest, np.float32)
    expected[:, :, :2, :2] = x[:, :, ::3, ::3]
    expected_mask = np.full((3, 3), -1.0)
    expected_mask[:2, :2] = [[0, 3], [15, 18]]
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(mask, np.broadcast_to(expected_mask, (2, 3, 3, 3)))
    single = layer("p", "Pooling", "x", "y", "pooling_param { pool: MAX kernel_size: 2 stride: 3 }")
    check(build(single, {"x": (2, 3, 7, 8)}))


# -- convolution --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "param",
    [
        "num_output: 4 kernel_size: 3",
        "num_output: 6 kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0 group: 3",
        "num_output: 4 kernel_size: 3 dilation: 2 pad: 2 bias_term: false",
        "num_output: 6 kernel_size: 1 group: 6",
    ],
)
@pytest.mark.parametrize("type_", ["Convolution", "Deconvolution"])
def test_convolution_and_deconvolution(type_: str, param: str) -> None:
    body = layer("conv", type_, "x", "y", f"convolution_param {{ {param} }}")
    check(build(body, {"x": (2, 6, 7, 9)}))


@pytest.mark.parametrize(
    ("param", "shape"),
    [
        ("kernel_size: 3 stride: 2 pad: 1", (2, 3, 6, 7)),
        (
            "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 pad_h: 1 pad_w: 0 dilation: 2",
            (2, 2, 6, 7),
        ),
        ("kernel_size: 2", (2, 2, 4, 5, 3)),
    ],
)
def test_im2col_columns_in_caffes_order(param: str, shape: tuple[int, ...]) -> None:
    net = build(layer("cols", "Im2col", "x", "y", f"convolution_param {{ {param} }}"), {"x": shape})
    assert check(net) == {"Conv"}


def test_im2col_column_layout_by_hand() -> None:
    # column c·9 + ky·3 + kx holds channel c's pixel at offset (ky, kx) of every window
    body = layer(
        "cols", "Im2col", "x", "y", "convolution_param { kernel_size: 3 stride: 2 pad: 1 }"
    )
    net = build(body, {"x": (1, 3, 6, 7)})
    x = np.random.default_rng(1).standard_normal((1, 3, 6, 7)).astype(np.float32)
    (y,) = session(net_to_onnx(net)).run(["y"], {"x": x})
    padded = np.pad(x[0], ((0, 0), (1, 1), (1, 1)))
    assert y.shape == (1, 27, 3, 4)
    for c, ky, kx in [(0, 0, 0), (1, 2, 1), (2, 1, 2)]:
        window = padded[c, ky : ky + 5 : 2, kx : kx + 7 : 2]
        np.testing.assert_array_equal(y[0, c * 9 + ky * 3 + kx], window)


def test_batch_reindex_gathers_items_at_truncated_indices() -> None:
    body = layer("pick", "BatchReindex", ["x", "index"], "y")
    net = build(body, {"x": (4, 3), "index": (5,)})
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    index = np.array([3.7, 0, 0.2, 2, 1], np.float32)
    (y,) = session(net_to_onnx(net)).run(["y"], {"x": x, "index": index})
    np.testing.assert_array_equal(y, x[[3, 0, 0, 2, 1]])
    net.blobs["x"].data[...] = x
    net.blobs["index"].data[...] = index
    net.forward()
    np.testing.assert_array_equal(net.blobs["y"].data, y)


@pytest.mark.parametrize(
    ("type_", "param"),
    [
        ("Convolution", "num_output: 3 kernel_size: 3 group: 3 axis: 2"),
        ("Deconvolution", "num_output: 4 kernel_size: 3 stride: 2 axis: 2"),
        ("Im2col", "kernel_size: 2 pad: 1 axis: 2"),
    ],
)
def test_convolution_channel_axis_after_several_item_axes(type_: str, param: str) -> None:
    # axis 2 of (N, 2, C, H, W): Caffe convolves 2·N items
    body = layer("conv", type_, "x", "y", f"convolution_param {{ {param} }}")
    assert "Reshape" in check(build(body, {"x": (2, 2, 3, 6, 7)}))


def test_convolution_with_two_bottoms_shares_its_weights() -> None:
    body = layer(
        "conv",
        "Convolution",
        ["a", "b"],
        ["ya", "yb"],
        "convolution_param { num_output: 2 kernel_size: 3 }",
    )
    check(build(body, {"a": (2, 3, 5, 5), "b": (2, 3, 5, 5)}))


# -- normalization ------------------------------------------------------------------------------
@pytest.mark.parametrize("region", ["ACROSS_CHANNELS", "WITHIN_CHANNEL"])
def test_lrn(region: str) -> None:
    param = f"lrn_param {{ local_size: 5 alpha: 0.5 beta: 0.75 k: 2 norm_region: {region} }}"
    check(build(layer("lrn", "LRN", "x", "y", param), {"x": (2, 7, 6, 5)}))


@pytest.mark.parametrize(
    ("param", "shape"),
    [
        ("", (2, 3, 4, 5)),
        ("mvn_param { across_channels: true eps: 0.01 }", (2, 3, 4, 5)),
        ("mvn_param { normalize_variance: false }", (2, 3, 4, 5)),
        ("mvn_param { across_channels: true }", (2, 6)),
    ],
)
def test_mvn(param: str, shape: tuple[int, ...]) -> None:
    check(build(layer("mvn", "MVN", "x", "y", param), {"x": shape}))


@pytest.mark.parametrize("height", [1, 3])
@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_spp(method: str, height: int) -> None:
    param = f"spp_param {{ pool: {method} pyramid_height: {height} }}"
    check(build(layer("spp", "SPP", "x", "y", param), {"x": (2, 3, 7, 10)}))


def test_parameter_and_constant_dummy_data_layers_are_constants() -> None:
    body = layer("p", "Parameter", [], "w", "parameter_param { shape { dim: 1 dim: 4 } }")
    param = "dummy_data_param { shape { dim: 1 dim: 4 } data_filler { value: 0.5 } }"
    body += layer("c", "DummyData", [], "c", param)
    body += layer("sum", "Eltwise", ["x", "w", "c"], "y")
    check(build(body, {"x": (1, 4)}), batches=(1,))


@pytest.mark.parametrize("global_stats", [True, False])
def test_batchnorm_of_a_1_axis_blob_is_one_channel(global_stats: bool) -> None:
    param = f"batch_norm_param {{ use_global_stats: {str(global_stats).lower()} eps: 0.01 }}"
    net = build(layer("bn", "BatchNorm", "x", "y", param), {"x": (5,)})
    assert "Reshape" in check(net, batches=(5, 7))
    x = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    mean, var, factor = (b.data.reshape(-1)[0] for b in net.layers[1].blobs)
    if global_stats:  # Caffe divides both statistics by the scale-factor blob
        mean, var = mean / factor, var / factor
    else:
        mean, var = x.mean(), x.var()
    (y,) = session(net_to_onnx(net, dynamic_batch=True)).run(["y"], {"x": x})
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 0.01), rtol=1e-5)


@pytest.mark.parametrize("fold", [False, True])
def test_batchnorm_scale_bias_with_scale_factor(fold: bool) -> None:
    body = layer(
        "conv", "Convolution", "x", "c", "convolution_param { num_output: 4 kernel_size: 3 }"
    )
    body += layer("bn", "BatchNorm", "c", "c", "batch_norm_param { eps: 0.001 }")
    body += layer("scale", "Scale", "c", "c", "scale_param { bias_term: true }")
    body += layer("bias", "Bias", "c", "d")
    body += layer("ip", "InnerProduct", "d", "f", "inner_product_param { num_output: 5 }")
    body += layer("bn2", "BatchNorm", "f", "g")
    net = build(body, {"x": (2, 3, 6, 6)})
    ops = check(net, fold=fold)
    assert ("BatchNormalization" in ops) != fold
    assert ("Mul" in ops) != fold


def test_batchnorm_zero_scale_factor_gives_zero_statistics() -> None:
    net = build(layer("bn", "BatchNorm", "x", "y"), {"x": (2, 3, 4, 4)})
    for blob in net.layer_dict["bn"].blobs:
        blob.data[...] = 5.0
    net.layer_dict["bn"].blobs[2].data[...] = 0.0
    model = net_to_onnx(net)
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
    (got,) = session(model).run(["y"], {"x": x})
    np.testing.assert_allclose(got, x / np.sqrt(1e-5), rtol=1e-5)


def test_batchnorm_with_batch_statistics_and_two_bottom_scale_and_bias() -> None:
    # every input's axis 0 is the batch, so the second bottoms span axis 0 (axis: 0)
    body = layer("bn", "BatchNorm", "x", "y", "batch_norm_param { use_global_stats: false }")
    body += layer("scale", "Scale", ["y", "s"], "z", "scale_param { axis: 0 }")
    body += layer("bias", "Bias", ["z", "b"], "w", "bias_param { axis: 0 }")
    check(build(body, {"x": (3, 4, 5, 2), "s": (3, 4), "b": (3, 4, 5, 2)}), batches=(3,))


# -- fully connected, softmax, routing -----------------------------------------------------------
@pytest.mark.parametrize(
    "param",
    [
        "num_output: 5",
        "num_output: 5 transpose: true",
        "num_output: 3 axis: 2",
        "num_output: 3 axis: 2 transpose: true bias_term: false",
    ],
)
def test_inner_product(param: str) -> None:
    body = layer("ip", "InnerProduct", "x", "y", f"inner_product_param {{ {param} }}")
    check(build(body, {"x": (2, 3, 4, 5)}))


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_axis(axis: int) -> None:
    body = layer("prob", "Softmax", "x", "y", f"softmax_param {{ axis: {axis} }}")
    check(build(body, {"x": (2, 3, 4, 5)}))


def test_concat_slice_split_and_eltwise() -> None:
    body = layer("cat", "Concat", ["a", "b"], "ab", "concat_param { axis: 1 }")
    body += layer(
        "cut",
        "Slice",
        "ab",
        ["p", "q", "r"],
        "slice_param { axis: 1 slice_point: 2 slice_point: 3 }",
    )
    body += layer("halves", "Slice", "a", ["h1", "h2"], "slice_param { axis: 3 }")
    body += layer(
        "sum",
        "Eltwise",
        ["p", "r", "p"],
        "s",
        "eltwise_param { operation: SUM coeff: 0.5 coeff: -2 coeff: 1 }",
    )
    body += layer("prod", "Eltwise", ["h1", "h2"], "m", "eltwise_param { operation: PROD }")
    body += layer("max", "Eltwise", ["p", "r", "s"], "x", "eltwise_param { operation: MAX }")
    body += layer("cat2", "Concat", ["x", "m"], "out", "concat_param { axis: 3 }")
    check(build(body, {"a": (2, 2, 3, 4), "b": (2, 3, 3, 4)}))


def test_reshaping_layers() -> None:
    body = layer("flat", "Flatten", "x", "f", "flatten_param { axis: 2 }")
    body += layer("flat2", "Flatten", "x", "f2", "flatten_param { axis: 1 end_axis: 2 }")
    body += layer("re", "Reshape", "x", "r", "reshape_param { shape { dim: 0 dim: -1 dim: 2 } }")
    body += layer(
        "re2", "Reshape", "x", "r2", "reshape_param { axis: 1 num_axes: 2 shape { dim: 12 } }"
    )
    body += layer("perm", "Permute", "x", "p", "permute_param { order: 0 order: 3 order: 1 }")
    body += layer("tile", "Tile", "x", "t", "tile_param { axis: 2 tiles: 3 }")
    body += layer("crop", "Crop", ["x", "small"], "c", "crop_param { axis: 2 offset: 1 offset: 2 }")
    check(build(body, {"x": (2, 3, 4, 5), "small": (2, 3, 2, 3)}))


def test_routing_over_the_batch_axis_follows_a_dynamic_batch() -> None:
    # built at batch 2, run at 2 and 3: Crop keeps bottom 1's batch, Slice's last part runs
    # to the end, ArgMax over axis 0 counts the batch it is given
    body = layer(
        "crop", "Crop", ["x", "small"], "c", "crop_param { axis: 0 offset: 0 offset: 1 offset: 0 }"
    )
    body += layer("cut", "Slice", "x", ["p", "q"], "slice_param { axis: 0 slice_point: 1 }")
    body += layer("arg", "ArgMax", "x", "a", "argmax_param { axis: 0 }")
    check(build(body, {"x": (2, 3, 4), "small": (2, 2, 3)}), batches=(2, 3))
    halves = layer("halves", "Slice", "x", ["h1", "h2"], "slice_param { axis: 0 }")
    net = build(halves, {"x": (2, 3)})
    for result in compare(net, net_to_onnx(net), (2,), threads=1):
        assert result.relative <= TOLERANCE and result.max_output > 0
    with pytest.raises(ConfigError, match=r"layer 'halves' \(Slice\).*change with the batch"):
        net_to_onnx(net, dynamic_batch=True)


def test_filter_keeps_the_selected_items_of_a_dynamic_batch() -> None:
    body = layer("keep", "Filter", ["x", "z", "selector"], ["y", "w"])
    body += layer("ip", "InnerProduct", "w", "out", "inner_product_param { num_output: 2 }")
    net = build(body, {"x": (4, 3), "z": (4, 3, 2), "selector": (4, 1)})

    def make(name, shape):
        value = np.random.default_rng(len(name) + shape[0]).standard_normal(shape)
        # a selector of 0s and 1s: at batch 6, 3 items kept (seeded), checked below
        return (value > 0 if name == "selector" else value).astype(np.float32)

    assert "Compress" in check(net, batches=(3, 6), inputs=make)
    assert net.blobs["y"].shape[0] == int(make("selector", (6, 1)).sum()) < 6
    with pytest.raises(ConfigError, match=r"layer 'keep' \(Filter\).*--dynamic-batch"):
        net_to_onnx(net)


@pytest.mark.parametrize("operation", ["SUM", "ASUM", "SUMSQ", "MEAN"])
@pytest.mark.parametrize("axis", [1, 2])
def test_reduction(operation: str, axis: int) -> None:
    param = f"reduction_param {{ operation: {operation} axis: {axis} coeff: -1.5 }}"
    check(build(layer("red", "Reduction", "x", "y", param), {"x": (2, 3, 4, 5)}))


@pytest.mark.parametrize(
    "param",
    ["", "top_k: 3", "top_k: 2 out_max_val: true", "axis: 1", "axis: 2 top_k: 2 out_max_val: true"],
)
def test_argmax_ties_go_to_the_larger_index(param: str) -> None:
    net = build(
        layer("arg", "ArgMax", "x", "y", f"argmax_param {{ {param} }}"), {"x": (2, 4, 3, 2)}
    )
    # integers in a small range: many ties, which Caffe breaks towards the larger index
    check(net, inputs=integers(3, seed=1))


@pytest.mark.parametrize(
    ("type_", "param"),
    [
        ("Upsample", "upsample_param { scale: 2 }"),
        ("Upsample", "upsample_param { scale_h: 3 scale_w: 2 pad_out_h: 1 }"),
        ("Upsample", "upsample_param { upsample_h: 9 upsample_w: 7 }"),
        ("Interp", "interp_param { zoom_factor: 3 }"),
        ("Interp", "interp_param { height: 5 width: 11 pad_beg: 0 pad_end: -1 }"),
        ("Interp", "interp_param { shrink_factor: 2 }"),
    ],
)
def test_resizing_layers(type_: str, param: str) -> None:
    check(build(layer("resize", type_, "x", "y", param), {"x": (2, 3, 5, 4)}))


def test_embed() -> None:
    net = build(
        layer("emb", "Embed", "x", "y", "embed_param { num_output: 4 input_dim: 7 }"), {"x": (2, 5)}
    )
    check(net, inputs=integers(7, seed=2))


# -- neurons -----------------------------------------------------------------------------------
NEURONS = [
    ("ReLU", ""),
    ("ReLU", "relu_param { negative_slope: 0.1 }"),
    ("PReLU", ""),
    ("PReLU", "prelu_param { channel_shared: true }"),
    ("ELU", "elu_param { alpha: 0.7 }"),
    ("Sigmoid", ""),
    ("TanH", ""),
    ("AbsVal", ""),
    ("Power", "power_param { power: 2 scale: 0.5 shift: 3 }"),
    ("Power", "power_param { power: 0.5 scale: 1 shift: 50 }"),
    ("Power", "power_param { power: 3 scale: 0 shift: 2 }"),
    ("Power", "power_param { power: 1 scale: -2 }"),
    ("Exp", ""),
    ("Exp", "exp_param { base: 2 scale: 0.5 shift: 1 }"),
    ("Log", "log_param { shift: 50 scale: 0.5 }"),
    ("Log", "log_param { base: 10 shift: 60 scale: 2 }"),
    ("BNLL", ""),
    ("Threshold", "threshold_param { threshold: 0.3 }"),
    ("Swish", "swish_param { beta: 1.5 }"),
    ("Clip", "clip_param { min: -0.5 max: 0.7 }"),
    ("Dropout", "dropout_param { dropout_ratio: 0.3 }"),
]


@pytest.mark.parametrize(("type_", "param"), NEURONS, ids=lambda v: v or "-")
def test_neuron_layers(type_: str, param: str) -> None:
    # the neuron reads a convolution's output (so that Dropout's identity has a node before
    # it); BNLL and Exp see large magnitudes too
    body = layer(
        "conv", "Convolution", "x", "c", "convolution_param { num_output: 3 kernel_size: 1 }"
    )
    body += layer("neuron", type_, "c", "y", param)
    check(build(body, {"x": (2, 3, 4, 5)}), inputs=normal(3.0, seed=4))


def test_in_place_chain_keeps_caffe_output_names() -> None:
    body = layer(
        "conv", "Convolution", "data", "conv", "convolution_param { num_output: 3 kernel_size: 1 }"
    )
    body += layer("relu", "ReLU", "conv", "conv")
    body += layer("drop", "Dropout", "conv", "drop")
    net = build(body, {"data": (1, 3, 4, 4)})
    model = net_to_onnx(net)
    assert [i.name for i in model.graph.input] == ["data"]
    assert sorted(o.name for o in model.graph.output) == ["drop"]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 3, 4, 4]
    check(net)


@pytest.mark.parametrize("opset", [13, 18, 21])
def test_opsets(opset: int) -> None:
    body = layer("red", "Reduction", "x", "r", "reduction_param { operation: ASUM axis: 2 }")
    body += layer("bn", "BatchNorm", "x", "b", "batch_norm_param { use_global_stats: false }")
    model_ops = check(build(body, {"x": (3, 2, 3, 4)}), batches=(3,), opset=opset)
    assert "ReduceL1" in model_ops


# -- recurrent ----------------------------------------------------------------------------------
def run_both(net: Net, feeds: dict[str, np.ndarray], tops: list[str]) -> None:
    """One forward of ``net`` (fresh: a recurrent state starts at zeros) and of its static
    export on ``feeds``; every top within the tolerance, none all zero."""
    model = net_to_onnx(net)
    for name, value in feeds.items():
        net.blobs[name].data[...] = value
    net.forward()
    for top, got in zip(tops, session(model, threads=1).run(tops, feeds)):
        expected = net.blobs[top].data
        assert got.shape == expected.shape
        peak = np.max(np.abs(expected))
        assert 0 < peak and np.max(np.abs(got - expected)) <= TOLERANCE * max(1.0, peak)


# cont 0 starts a sequence: at t = 0 and in the middle of streams 1 and 2
CONT = np.array([[0, 0, 1], [1, 1, 1], [1, 0, 1], [1, 1, 0]], np.float32)


@pytest.mark.parametrize("static", [False, True], ids=["", "static"])
@pytest.mark.parametrize("exposed", [False, True], ids=["", "exposed"])
@pytest.mark.parametrize("type_", ["RNN", "LSTM"])
def test_recurrent_layers_unrolled(type_: str, exposed: bool, static: bool) -> None:
    rng = np.random.default_rng(4)
    shapes = {"x": (4, 3, 2, 3), "cont": (4, 3)}
    if static:
        shapes["s"] = (3, 2)
    states = ["h0", "c0"][: 2 if type_ == "LSTM" else 1] if exposed else []
    shapes.update({name: (1, 3, 5) for name in states})
    tops = ["y", *(name.replace("0", "T") for name in states)]
    param = f"recurrent_param {{ num_output: 5 expose_hidden: {str(exposed).lower()} }}"
    net = build(layer("rec", type_, list(shapes), tops, param), shapes, seed=2)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    feeds["cont"] = CONT
    run_both(net, feeds, tops)
    with pytest.raises(ConfigError, match=r"layer 'rec'.*time, fixed at T = 4"):
        net_to_onnx(net, dynamic_batch=True)


def test_lstm_unit() -> None:
    shapes = {"c_prev": (1, 3, 4), "gates": (1, 3, 16), "cont": (1, 3)}
    net = build(layer("unit", "LSTMUnit", list(shapes), ["c", "h"]), shapes)
    rng = np.random.default_rng(5)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    feeds["cont"] = np.array([[1, 0, 0.5]], np.float32)
    run_both(net, feeds, ["c", "h"])


# -- refusals ------------------------------------------------------------------------------------
def test_layers_without_a_faithful_form_are_named() -> None:
    # Caffe's DummyData refills a gaussian blob at every forward: no ONNX form
    param = 'dummy_data_param { shape { dim: 1 dim: 2 } data_filler { type: "gaussian" } }'
    body = layer("noise", "DummyData", [], "n", param)
    body += layer("sum", "Eltwise", ["x", "n"], "y")
    net = build(body, {"x": (1, 2)})
    with pytest.raises(
        ConfigError, match=r"layer 'noise' \(DummyData\).*cannot be exported to ONNX"
    ):
        net_to_onnx(net)


def test_python_layer_is_refused(monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    body = layer(
        "py",
        "Python",
        "x",
        "y",
        'python_param { module: "pylayers" layer: "ScaleByParamStr" param_str: "2" }',
    )
    net = build(body, {"x": (1, 2)})
    with pytest.raises(ConfigError, match=r"layer 'py' \(Python\).*user code"):
        net_to_onnx(net)


def test_train_nets_inputless_nets_and_bad_opsets_are_refused() -> None:
    text = 'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }'
    train = Net(parse_text(text, pb.NetParameter), phase=pb.TRAIN)
    with pytest.raises(ConfigError, match="TEST-phase"):
        net_to_onnx(train)
    test = Net(parse_text(text, pb.NetParameter), phase=pb.TEST)
    with pytest.raises(ConfigError, match="opset 12 is not supported"):
        net_to_onnx(test, opset=12)
    dummy = 'layer { name: "d" type: "DummyData" top: "d" dummy_data_param { shape { dim: 1 } } }'
    with pytest.raises(ConfigError, match="no Input layer"):
        net_to_onnx(Net(parse_text(dummy, pb.NetParameter), phase=pb.TEST))


def test_reshape_fixing_the_batch_is_refused_only_for_a_dynamic_batch() -> None:
    body = layer("re", "Reshape", "x", "y", "reshape_param { shape { dim: 6 dim: 4 } }")
    net = build(body, {"x": (2, 3, 4)})
    net_to_onnx(net)
    with pytest.raises(ConfigError, match=r"layer 're' \(Reshape\).*fixes the batch size"):
        net_to_onnx(net, dynamic_batch=True)


# -- CLI and Net.to_onnx --------------------------------------------------------------------------
def test_cli_exports_a_model_with_its_weights(tmp_path: Path, capsys) -> None:
    deploy = Path(__file__).resolve().parents[1] / "models" / "digits" / "deploy.prototxt"
    net = Net(deploy, phase=pb.TEST)
    random_weights(net, 5)
    weights = tmp_path / "digits.caffemodel"
    net.save(weights)
    out = tmp_path / "digits.onnx"
    code = main(
        [
            "export",
            "onnx",
            "--model",
            str(deploy),
            "--weights",
            str(weights),
            "--output",
            str(out),
            "--dynamic-batch",
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    assert str(out) in printed.out
    # the stages, on stderr: a large model's check takes seconds
    assert "building" in printed.err and "checking" in printed.err and "writing" in printed.err
    model = onnx.load(out)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    for result in compare(net, str(out), (1, 3), threads=1):
        assert result.relative <= TOLERANCE


def test_cli_reports_a_missing_weights_file_in_one_line(tmp_path: Path, capsys) -> None:
    deploy = Path(__file__).resolve().parents[1] / "models" / "digits" / "deploy.prototxt"
    code = main(
        ["export", "onnx", "--model", str(deploy), "--weights", str(tmp_path / "none.caffemodel")]
    )
    assert code != 0
    err = capsys.readouterr().err
    assert "none.caffemodel" in err and "Traceback" not in err


def test_cli_reports_an_unwritable_output_in_one_line(tmp_path: Path, capsys) -> None:
    deploy = Path(__file__).resolve().parents[1] / "models" / "digits" / "deploy.prototxt"
    net = Net(deploy, phase=pb.TEST)
    weights = tmp_path / "digits.caffemodel"
    net.save(weights)
    for output in (tmp_path / "missing" / "m.onnx", tmp_path):
        args = ["--model", str(deploy), "--weights", str(weights), "--output", str(output)]
        assert main(["export", "onnx", *args]) == 4
        err = capsys.readouterr().err
        assert f"{output}: cannot write the ONNX model" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits.caffemodel"]


def test_cli_refuses_weights_that_miss_a_layer(tmp_path: Path, capsys) -> None:
    # a layer renamed in the prototxt gets no weights: it would be exported untrained
    deploy = Path(__file__).resolve().parents[1] / "models" / "digits" / "deploy.prototxt"
    weights = tmp_path / "digits.caffemodel"
    Net(deploy, phase=pb.TEST).save(weights)
    renamed = tmp_path / "deploy.prototxt"
    renamed.write_text(deploy.read_text().replace('name: "ip2"', 'name: "classifier"'))
    args = ["--model", str(renamed), "--weights", str(weights), "--output", str(tmp_path / "m")]
    assert main(["export", "onnx", *args]) == 4
    assert "no weights for layer(s) classifier" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_loss_layer_is_refused_as_training_only() -> None:
    body = layer("ip", "InnerProduct", "x", "y", "inner_product_param { num_output: 4 }")
    body += layer("loss", "SoftmaxWithLoss", ["y", "label"], "loss")
    net = build(body, {"x": (2, 3), "label": (2,)}, seed=0)
    with pytest.raises(ConfigError, match=r"layer 'loss' \(SoftmaxWithLoss\).*training"):
        net_to_onnx(net)


def test_net_to_onnx_writes_the_file(tmp_path: Path) -> None:
    net = build(
        layer("ip", "InnerProduct", "x", "y", "inner_product_param { num_output: 2 }"),
        {"x": (1, 3)},
    )
    path = tmp_path / "m.onnx"
    model = net.to_onnx(path, opset=15)
    assert onnx.load(path) == model
    onnx.checker.check_model(str(path), full_check=True)
    assert model.opset_import[0].version == 15


# -- real models ----------------------------------------------------------------------------------
CONFORMANCE = sorted(p for p in (SHARED / "conformance").glob("*") if p.is_dir())


@pytest.mark.parametrize("folder", CONFORMANCE, ids=lambda p: p.name)
def test_conformance_models_in_onnx_runtime(folder: Path) -> None:
    shared_path("conformance")
    net = Net(
        next(folder.glob("*.prototxt")), phase=pb.TEST, weights=next(folder.glob("*.caffemodel"))
    )
    image = np.load(folder / "input.npy")
    # export at the stored input's shape (the fully convolutional ones take any size)
    net.blobs[net.inputs[0]].reshape(image.shape)
    net.reshape()
    check(net)
    # and against the independent Caffe implementation's outputs on the stored input
    expected = np.load(folder / "expected.npz")
    model = net_to_onnx(net, dynamic_batch=True)
    names = [o.name for o in model.graph.output]
    got = session(model, threads=1).run(names, {net.inputs[0]: image})
    for name, value in zip(names, got):
        reference = expected[name]
        assert np.max(np.abs(value - reference)) <= TOLERANCE * max(1.0, np.max(np.abs(reference)))


SMALL_MODELS = ["digits/deploy.prototxt", "mnist/lenet.prototxt", "cifar10/cifar10_quick.prototxt"]


@pytest.mark.parametrize("path", SMALL_MODELS)
def test_small_repository_models(path: str) -> None:
    net = Net(Path(__file__).resolve().parents[1] / "models" / path, phase=pb.TEST)
    random_weights(net)
    check(net)


INPUT_X = 'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        # the module does not exist: the refusal must come before any import is tried
        (
            INPUT_X
            + layer("py", "Python", "x", "y", 'python_param { module: "no_such" layer: "L" }'),
            "layer 'py' (Python): a Python layer runs user code",
        ),
        # a train net: its data layer is named before its (missing) source is opened
        (
            layer(
                "mnist",
                "Data",
                [],
                ["x", "label"],
                'data_param { source: "no/such/lmdb" batch_size: 2 backend: LMDB }',
            )
            + layer("ip", "InnerProduct", "x", "y", "inner_product_param { num_output: 2 }"),
            "layer 'mnist' (Data): a data layer reads its inputs from a source; export the deploy",
        ),
    ],
    ids=["python", "data"],
)
def test_cli_refuses_a_layer_before_building_it(
    tmp_path: Path, capsys, text: str, refusal: str
) -> None:
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(text)
    weights = tmp_path / "w.caffemodel"
    weights.write_bytes(pb.NetParameter().SerializeToString())
    code = main(["export", "onnx", "--model", str(deploy), "--weights", str(weights)])
    assert code == 2
    assert refusal in capsys.readouterr().err


def test_cli_takes_zoo_weights_and_names_the_output_after_them(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    deploy = Path(__file__).resolve().parents[1] / "models" / "digits" / "deploy.prototxt"
    net = Net(deploy, phase=pb.TEST)
    random_weights(net, 6)
    weights = tmp_path / "downloaded.caffemodel"
    net.save(weights)
    asked = []

    def fetch_weights(name: str) -> Path:
        asked.append(name)
        return weights

    import netforge.zoo

    monkeypatch.setattr(netforge.zoo, "fetch_weights", fetch_weights)
    monkeypatch.chdir(tmp_path)
    assert main(["export", "onnx", "--model", str(deploy), "--weights", "zoo:digits"]) == 0
    assert asked == ["digits"]
    assert "wrote digits.onnx" in capsys.readouterr().out
    for result in compare(net, str(tmp_path / "digits.onnx"), (1,), threads=1):
        assert result.relative <= TOLERANCE


def test_inner_product_over_axis_0_is_static_only() -> None:
    body = layer("ip", "InnerProduct", "x", "y", "inner_product_param { num_output: 3 axis: 0 }")
    net = build(body, {"x": (2, 4)})
    for result in compare(net, net_to_onnx(net), (2,), threads=1):
        assert result.relative <= TOLERANCE and result.max_output > 0
    with pytest.raises(ConfigError, match="fixes the batch size"):
        net_to_onnx(net, dynamic_batch=True)
