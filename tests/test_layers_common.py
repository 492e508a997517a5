"""Common/utility layers: forward against float64 references, shapes, and gradient checks.

Gradient thresholds are Caffe's (inventory §8.3); references are written from the formulas,
independently of netforge/layers/common.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from netforge.backend import to_numpy
from netforge.errors import ConfigError, DataError, ShapeError
from netforge.proto import pb
from tests.harness import build, check_gradient, forward, run


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


# -- InnerProduct -------------------------------------------------------------------------
IP = """type: "InnerProduct" inner_product_param {{ num_output: {n} {extra}
  weight_filler {{ type: "gaussian" std: 1 }} bias_filler {{ type: "gaussian" std: 1 }} }}"""


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_forward(backend, transpose):
    x = rand(2, 3, 2, 2)
    text = IP.format(n=4, extra=f"transpose: {str(transpose).lower()}")
    layer, bottom, top = build(text, [x], backend=backend)
    (y,) = forward(layer, bottom, top)
    w, b = (to_numpy(p.data) for p in layer.blobs)
    assert w.shape == ((12, 4) if transpose else (4, 12))
    weight = w if transpose else w.T
    expected = np.einsum("nk,ko->no", x.reshape(2, 12), weight) + b
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_inner_product_axis_and_no_bias(backend):
    x = rand(2, 3, 5)
    layer, bottom, top = build(
        IP.format(n=3, extra="axis: 2 bias_term: false"), [x], backend=backend
    )
    assert len(layer.blobs) == 1
    (y,) = forward(layer, bottom, top)
    assert y.shape == (2, 3, 3)
    w = to_numpy(layer.blobs[0].data)
    np.testing.assert_allclose(y, np.einsum("abk,ok->abo", x, w), rtol=1e-12)


def test_inner_product_float32_hot_path():
    x = rand(4, 8).astype(np.float32)
    layer, bottom, top = build(IP.format(n=5, extra=""), [x], dtype=np.float32)
    (y,) = forward(layer, bottom, top)
    assert y.dtype == np.float32 and top[0].data.flags.c_contiguous
    w, b = (p.data.astype(np.float64) for p in layer.blobs)
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_weight_gradient_adds_to_the_diff(transpose):
    """Parameter gradients accumulate (shared weights, iter_size): the float32 GEMM that adds
    into the diff keeps what was there."""
    x, dy = rand(6, 8).astype(np.float32), rand(6, 5, seed=1).astype(np.float32)
    text = IP.format(n=5, extra=f"transpose: {str(transpose).lower()}")
    layer, bottom, top = build(text, [x], dtype=np.float32)
    forward(layer, bottom, top)
    before = rand(*layer.blobs[0].shape, seed=2).astype(np.float32)
    layer.blobs[0].diff[...] = before
    top[0].diff[...] = dy
    layer.backward(top, [False], bottom)
    product = x.astype(np.float64).T @ dy if transpose else dy.astype(np.float64).T @ x
    np.testing.assert_allclose(layer.blobs[0].diff, before + product, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_bounds_its_gradients(transpose):
    """``diff_bounds`` covers the largest magnitude backward adds to each diff (products near
    float32's range, exact in float64 here) without being loose, is 0 for a gradient not
    computed, and is not finite when an input is not."""
    x, dy = rand(6, 8).astype(np.float32) * 1e18, rand(6, 5, seed=1).astype(np.float32) * 1e18
    text = IP.format(n=5, extra=f"transpose: {str(transpose).lower()}")
    layer, bottom, top = build(text, [x], dtype=np.float32)
    forward(layer, bottom, top)

    def bounds(x, dy, wanted=(True, True)):
        bottom[0].data[...], top[0].diff[...] = x, dy
        layer.param_propagate_down = list(wanted)
        layer.backward(top, [False], bottom)
        return layer.diff_bounds

    weight, bias = bounds(x, dy)
    product = dy.astype(np.float64).T @ x
    assert np.abs(product).max() <= weight <= 1.01 * 6 * np.abs(dy).max() * np.abs(x).max()
    assert np.abs(dy.astype(np.float64).sum(axis=0)).max() <= bias <= 1.01 * 6 * np.abs(dy).max()
    assert bounds(x, dy, (False, True)) == [0.0, bias]
    assert bounds(x, dy, (True, False)) == [weight, 0.0]
    poisoned = x.copy()
    poisoned[2, 3] = np.nan
    assert np.isnan(bounds(poisoned, dy)[0])
    dy[1, 1] = np.inf
    assert bounds(x, dy)[1] == np.inf


def test_inner_product_rejects_wrong_input_size():
    layer, bottom, top = build(IP.format(n=3, extra=""), [rand(2, 6)])
    bottom[0].reshape(2, 7)
    with pytest.raises(ShapeError, match="incompatible"):
        layer.reshape(bottom, top)


@pytest.mark.parametrize("extra", ["", "transpose: true", "axis: 2"])
def test_inner_product_gradient(backend, extra):
    check_gradient(IP.format(n=3, extra=extra), [rand(2, 3, 2)], backend=backend)


# -- Embed --------------------------------------------------------------------------------
EMBED = """type: "Embed" embed_param { num_output: 3 input_dim: 5
  weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }"""


def test_embed_forward(backend):
    idx = np.array([[0, 4, 2], [2, 2, 1]], dtype=np.float64)
    layer, bottom, top = build(EMBED, [idx], backend=backend)
    (y,) = forward(layer, bottom, top)
    w, b = (to_numpy(p.data) for p in layer.blobs)
    assert y.shape == (2, 3, 3)
    np.testing.assert_array_equal(y, w[idx.astype(int)] + b)


def test_embed_gradient_accumulates_repeated_indices(backend):
    idx = np.array([[0, 4, 2], [2, 2, 1]], dtype=np.float64)
    check_gradient(EMBED, [idx], check_bottoms=[], backend=backend)


def test_embed_rejects_bad_indices():
    for bad in (np.array([1.5]), np.array([5.0]), np.array([-1.0])):
        layer, bottom, top = build(EMBED, [bad])
        with pytest.raises(DataError, match="Embed"):
            forward(layer, bottom, top)


# -- Softmax ------------------------------------------------------------------------------
def softmax_ref(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@pytest.mark.parametrize("axis", [1, 2, -1])
def test_softmax_forward(backend, axis):
    x = rand(2, 3, 4) * 30  # large values: the max subtraction keeps exp finite
    (y,) = run(f'type: "Softmax" softmax_param {{ axis: {axis} }}', [x], backend=backend)
    np.testing.assert_allclose(y, softmax_ref(x, axis), rtol=1e-12)


def test_softmax_in_place(backend):
    x = rand(2, 5)
    expected = softmax_ref(x, 1)
    layer, bottom, _ = build('type: "Softmax"', [x.copy()], backend=backend)
    layer.reshape(bottom, bottom)
    layer.forward(bottom, bottom)
    np.testing.assert_allclose(to_numpy(bottom[0].data), expected, rtol=1e-12)


@pytest.mark.parametrize("axis", [1, 2])
def test_softmax_gradient(backend, axis):
    check_gradient(
        f'type: "Softmax" softmax_param {{ axis: {axis} }}', [rand(2, 3, 2)], backend=backend
    )


# -- Eltwise ------------------------------------------------------------------------------
def test_eltwise_forward(backend):
    a, b, c = rand(2, 3, seed=1), rand(2, 3, seed=2), rand(2, 3, seed=3)
    (p,) = run('type: "Eltwise" eltwise_param { operation: PROD }', [a, b, c], backend=backend)
    np.testing.assert_allclose(p, a * b * c, rtol=1e-12)
    (s,) = run(
        'type: "Eltwise" eltwise_param { coeff: 1 coeff: -0.5 coeff: 2 }',
        [a, b, c],
        backend=backend,
    )
    np.testing.assert_allclose(s, a - 0.5 * b + 2 * c, rtol=1e-12)
    (m,) = run('type: "Eltwise" eltwise_param { operation: MAX }', [a, b, c], backend=backend)
    np.testing.assert_array_equal(m, np.maximum(np.maximum(a, b), c))


def test_eltwise_max_tie_mask(backend):
    # Caffe: a tie between bottoms 0 and 1 goes to 1; a later bottom must be strictly greater.
    a = np.array([[1.0, 2.0, 0.0]])
    b = np.array([[1.0, 0.0, 3.0]])
    c = np.array([[1.0, 2.0, 3.0]])
    layer, bottom, top = build(
        'type: "Eltwise" eltwise_param { operation: MAX }', [a, b, c], backend=backend
    )
    forward(layer, bottom, top)
    top[0].diff = backend.asarray(np.array([[10.0, 20.0, 30.0]]))
    layer.backward(top, [True] * 3, bottom)
    np.testing.assert_array_equal(to_numpy(bottom[0].diff), [[0, 20, 0]])
    np.testing.assert_array_equal(to_numpy(bottom[1].diff), [[10, 0, 30]])
    np.testing.assert_array_equal(to_numpy(bottom[2].diff), [[0, 0, 0]])


@pytest.mark.parametrize(
    "param",
    [
        "operation: PROD",
        "operation: PROD stable_prod_grad: false",
        "operation: SUM coeff: 1 coeff: -0.5 coeff: 2",
        "operation: MAX",
    ],
)
def test_eltwise_gradient(backend, param):
    bottoms = [rand(2, 3, 2, seed=s) for s in (1, 2, 3)]
    check_gradient(f'type: "Eltwise" eltwise_param {{ {param} }}', bottoms, backend=backend)


def test_eltwise_config_errors():
    with pytest.raises(ConfigError, match="one coeff per bottom"):
        build('type: "Eltwise" eltwise_param { coeff: 1 }', [rand(2), rand(2)])
    with pytest.raises(ConfigError, match="only takes coefficients for SUM"):
        build(
            'type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }',
            [rand(2), rand(2)],
        )
    with pytest.raises(ShapeError, match="bottom 1"):
        build('type: "Eltwise"', [rand(2, 3), rand(3, 2)])


# -- Concat, Slice, Split, Silence --------------------------------------------------------
def test_concat_forward(backend):
    a, b = rand(2, 3, 4, seed=1), rand(2, 1, 4, seed=2)
    (y,) = run('type: "Concat"', [a, b], backend=backend)
    np.testing.assert_array_equal(y, np.concatenate([a, b], axis=1))
    (y,) = run('type: "Concat" concat_param { axis: -1 }', [a, a], backend=backend)
    np.testing.assert_array_equal(y, np.concatenate([a, a], axis=2))
    (y,) = run('type: "Concat" concat_param { concat_dim: 0 }', [a, a], backend=backend)
    assert y.shape == (4, 3, 4)
    with pytest.raises(ShapeError, match="outside the concat axis"):
        build('type: "Concat"', [a, rand(3, 3, 4)])


def test_concat_gradient(backend):
    check_gradient(
        'type: "Concat"',
        [rand(2, 3, 2, seed=1), rand(2, 2, 2, seed=2)],
        threshold=1e-2,
        backend=backend,
    )


def test_slice_points_and_equal_split(backend):
    x = rand(2, 6, 3)
    ys = run(
        'type: "Slice" slice_param { slice_point: 1 slice_point: 4 }',
        [x],
        num_tops=3,
        backend=backend,
    )
    for y, ref in zip(ys, np.split(x, [1, 4], axis=1)):
        np.testing.assert_array_equal(y, ref)
    ys = run('type: "Slice" slice_param { axis: -1 }', [x], num_tops=3, backend=backend)
    assert [y.shape for y in ys] == [(2, 6, 1)] * 3
    np.testing.assert_array_equal(np.concatenate(ys, axis=2), x)
    with pytest.raises(ShapeError, match="equal parts"):
        build('type: "Slice"', [x], num_tops=4)
    with pytest.raises(ConfigError, match="slice_point"):
        build('type: "Slice" slice_param { slice_point: 2 }', [x], num_tops=3)


def test_slice_gradient(backend):
    check_gradient(
        'type: "Slice" slice_param { slice_point: 1 }', [rand(2, 3, 2)], num_tops=2, backend=backend
    )


def test_split_shares_data_and_sums_diffs(backend):
    x = rand(2, 3)
    layer, bottom, top = build('type: "Split"', [x], num_tops=3, backend=backend)
    for y in forward(layer, bottom, top):
        np.testing.assert_array_equal(y, x)
    diffs = [rand(2, 3, seed=s) for s in (4, 5, 6)]
    for t, d in zip(top, diffs):
        t.diff = backend.asarray(d)
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(to_numpy(bottom[0].diff), sum(diffs), rtol=1e-12)
    check_gradient('type: "Split"', [x], num_tops=2, threshold=1e-2, backend=backend)


def test_silence_zeroes_diffs(backend):
    layer, bottom, top = build('type: "Silence"', [rand(2), rand(3)], num_tops=0, backend=backend)
    for b in bottom:
        b.diff = backend.asarray(np.ones(b.shape))
    layer.forward(bottom, top)
    layer.backward(top, [True, False], bottom)
    np.testing.assert_array_equal(to_numpy(bottom[0].diff), 0)
    np.testing.assert_array_equal(to_numpy(bottom[1].diff), 1)


# -- Flatten, Reshape, Permute, Tile ------------------------------------------------------
@pytest.mark.parametrize(
    "param, shape",
    [
        ("", (2, 60)),
        ("axis: 2", (2, 3, 20)),
        ("end_axis: 2", (2, 12, 5)),
        ("axis: 0 end_axis: -2", (24, 5)),
    ],
)
def test_flatten_shapes(param, shape):
    x = rand(2, 3, 4, 5)
    (y,) = run(f'type: "Flatten" flatten_param {{ {param} }}', [x])
    np.testing.assert_array_equal(y, x.reshape(shape))


def test_flatten_gradient(backend):
    check_gradient('type: "Flatten"', [rand(2, 3, 2)], threshold=1e-2, backend=backend)


@pytest.mark.parametrize(
    "param, shape",
    [
        ("shape { dim: 0 dim: -1 }", (2, 60)),
        ("shape { dim: 0 dim: 2 dim: -1 dim: 0 }", (2, 2, 6, 5)),
        ("shape { dim: 6 dim: 2 } axis: 1 num_axes: 2", (2, 6, 2, 5)),
        ("shape { dim: 1 dim: 1 } axis: -1 num_axes: 0", (2, 3, 4, 5, 1, 1)),
        ("shape { dim: -1 } axis: 0 num_axes: 2", (6, 4, 5)),
        ("shape { dim: 1 } axis: 0 num_axes: 0", (1, 2, 3, 4, 5)),
    ],
)
def test_reshape_shapes(param, shape):
    x = rand(2, 3, 4, 5)
    (y,) = run(f'type: "Reshape" reshape_param {{ {param} }}', [x])
    np.testing.assert_array_equal(y, x.reshape(shape))


def test_reshape_errors():
    x = rand(2, 3, 4)
    with pytest.raises(ConfigError, match="more than one -1"):
        build('type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [x])
    with pytest.raises(ShapeError, match="divisible"):
        build('type: "Reshape" reshape_param { shape { dim: 5 dim: -1 } }', [x])
    with pytest.raises(ShapeError, match="no axis"):
        build('type: "Reshape" reshape_param { shape { dim: 0 dim: 0 } axis: 2 }', [x])
    with pytest.raises(ShapeError, match="has 24"):
        build('type: "Reshape" reshape_param { shape { dim: 5 } }', [x])


def test_reshape_gradient(backend):
    check_gradient(
        'type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }',
        [rand(2, 3, 2)],
        threshold=1e-2,
        backend=backend,
    )


def test_permute_forward(backend):
    x = rand(2, 3, 4, 5)
    text = 'type: "Permute" permute_param { order: 0 order: 2 order: 3 order: 1 }'
    (y,) = run(text, [x], backend=backend)
    np.testing.assert_array_equal(y, np.transpose(x, (0, 2, 3, 1)))
    (y,) = run('type: "Permute" permute_param { order: 1 }', [x], backend=backend)
    np.testing.assert_array_equal(y, np.transpose(x, (1, 0, 2, 3)))
    (y,) = run('type: "Permute" permute_param { order: 0 order: 1 }', [x], backend=backend)
    np.testing.assert_array_equal(y, x)
    with pytest.raises(ConfigError, match="repeats"):
        build('type: "Permute" permute_param { order: 1 order: 1 }', [x])


@pytest.mark.parametrize("order", ["order: 0 order: 2 order: 3 order: 1", "order: 0"])
def test_permute_gradient(backend, order):
    check_gradient(
        f'type: "Permute" permute_param {{ {order} }}', [rand(2, 3, 2, 2)], backend=backend
    )


def test_permute_param_wire_number():
    # The SSD fork's field number, so its binary models decode the same order.
    param = pb.LayerParameter(permute_param=pb.PermuteParameter(order=[0, 2, 3, 1]))
    assert param.SerializeToString().startswith(bytes([0xD2, 0x0C]))  # (202 << 3) | 2


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_tile_forward(backend, axis):
    x = rand(2, 3, 2)
    (y,) = run(f'type: "Tile" tile_param {{ axis: {axis} tiles: 3 }}', [x], backend=backend)
    np.testing.assert_array_equal(y, np.concatenate([x] * 3, axis=axis))


def test_tile_gradient(backend):
    check_gradient(
        'type: "Tile" tile_param { axis: 1 tiles: 3 }',
        [rand(2, 2, 2)],
        threshold=1e-2,
        backend=backend,
    )


# -- Reduction, ArgMax --------------------------------------------------------------------
REDUCTIONS = {
    "SUM": lambda x: x.sum(axis=1),
    "ASUM": lambda x: np.abs(x).sum(axis=1),
    "SUMSQ": lambda x: (x**2).sum(axis=1),
    "MEAN": lambda x: x.mean(axis=1),
}


@pytest.mark.parametrize("op", sorted(REDUCTIONS))
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_reduction_forward(backend, op, axis):
    x = rand(2, 3, 4)
    (y,) = run(
        f'type: "Reduction" reduction_param {{ operation: {op} axis: {axis} coeff: 1.5 }}',
        [x],
        backend=backend,
    )
    assert y.shape == x.shape[:axis]
    expected = 1.5 * REDUCTIONS[op](x.reshape(int(np.prod(x.shape[:axis])), -1))
    np.testing.assert_allclose(y.reshape(-1), expected, rtol=1e-12)


@pytest.mark.parametrize("op", sorted(REDUCTIONS))
def test_reduction_gradient(backend, op):
    check_gradient(
        f'type: "Reduction" reduction_param {{ operation: {op} axis: 1 coeff: 2 }}',
        [rand(2, 3, 2)],
        threshold=2e-3,
        backend=backend,
    )


def argmax_ref(x, k):
    """Top k (index, value) pairs per row of x, by descending (value, index) as Caffe sorts."""
    rows = [sorted(((v, j) for j, v in enumerate(row)), reverse=True)[:k] for row in x]
    return (
        np.array([[j for _, j in r] for r in rows], dtype=float),
        np.array([[v for v, _ in r] for r in rows]),
    )


def test_argmax_without_axis(backend):
    x = rand(2, 3, 2, 2)
    x[0, 0, 0, 0] = x[0, 2, 1, 1] = 9.0  # a tie: Caffe reports the larger index first
    index, value = argmax_ref(x.reshape(2, -1), 3)
    (y,) = run('type: "ArgMax" argmax_param { top_k: 3 }', [x], backend=backend)
    assert y.shape == (2, 1, 3, 1)
    np.testing.assert_array_equal(y.reshape(2, 3), index)
    assert index[0, 0] == 11 and index[0, 1] == 0
    (y,) = run('type: "ArgMax" argmax_param { top_k: 3 out_max_val: true }', [x], backend=backend)
    assert y.shape == (2, 2, 3, 1)
    np.testing.assert_array_equal(y[:, 0, :, 0], index)
    np.testing.assert_array_equal(y[:, 1, :, 0], value)
    (y,) = run('type: "ArgMax"', [rand(4, 5)], backend=backend)
    assert y.shape == (4, 1, 1)


@pytest.mark.parametrize("out_max_val", [False, True])
def test_argmax_with_axis(backend, out_max_val):
    x = rand(2, 4, 3)
    flag = str(out_max_val).lower()
    text = f'type: "ArgMax" argmax_param {{ axis: 1 top_k: 2 out_max_val: {flag} }}'
    (y,) = run(text, [x], backend=backend)
    assert y.shape == (2, 2, 3)
    rows = np.moveaxis(x, 1, -1).reshape(-1, 4)
    index, value = argmax_ref(rows, 2)
    expected = (value if out_max_val else index).reshape(2, 3, 2)
    np.testing.assert_array_equal(y, np.moveaxis(expected, -1, 1))


def test_argmax_top_k_too_large():
    with pytest.raises(ShapeError, match="top_k"):
        build('type: "ArgMax" argmax_param { axis: 1 top_k: 5 }', [rand(2, 4)])


# -- Filter, BatchReindex -----------------------------------------------------------------
def test_filter_forward_and_backward(backend):
    x, z = rand(4, 3, seed=1), rand(4, 2, 2, seed=2)
    selector = np.array([[1.0], [0.0], [1.0], [0.0]])
    layer, bottom, top = build('type: "Filter"', [x, z, selector], num_tops=2, backend=backend)
    assert top[0].shape == (4, 3)  # the first reshape sizes for the whole batch, as Caffe
    y0, y1 = forward(layer, bottom, top)
    np.testing.assert_array_equal(y0, x[[0, 2]])
    np.testing.assert_array_equal(y1, z[[0, 2]])
    check_gradient(
        'type: "Filter"', [x, z, selector], num_tops=2, check_bottoms=[0, 1], backend=backend
    )


def test_batch_reindex(backend):
    x = rand(3, 2, 2)
    index = np.array([2.0, 0.0, 2.0, 1.0])
    (y,) = run('type: "BatchReindex"', [x, index], backend=backend)
    np.testing.assert_array_equal(y, x[[2, 0, 2, 1]])
    check_gradient(
        'type: "BatchReindex"',
        [x, index],
        stepsize=1e-4,
        threshold=1e-2,
        check_bottoms=[0],
        backend=backend,
    )
    layer, bottom, top = build('type: "BatchReindex"', [x, np.array([3.0])])
    with pytest.raises(DataError, match="outside the batch"):
        forward(layer, bottom, top)


# -- Upsample, Interp ---------------------------------------------------------------------
def test_upsample_nearest(backend):
    x = rand(2, 3, 2, 3)
    (y,) = run('type: "Upsample" upsample_param { scale: 2 }', [x], backend=backend)
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3))
    (y,) = run(
        'type: "Upsample" upsample_param { scale_h: 3 scale_w: 2 pad_out_h: true }',
        [x],
        backend=backend,
    )
    np.testing.assert_array_equal(y, x.repeat(3, axis=2).repeat(2, axis=3)[:, :, :5])
    (y,) = run(
        'type: "Upsample" upsample_param { upsample_h: 3 upsample_w: 6 }', [x], backend=backend
    )
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3)[:, :, :3])


@pytest.mark.parametrize("param", ["scale: 2", "scale_h: 3 scale_w: 2 pad_out_w: true"])
def test_upsample_gradient(backend, param):
    check_gradient(
        f'type: "Upsample" upsample_param {{ {param} }}', [rand(1, 2, 2, 3)], backend=backend
    )


def interp_ref(x, oh, ow, pad_beg=0, pad_end=0):
    """Bilinear with aligned corners, one output pixel at a time (float32 coordinates)."""
    h, w = x.shape[2:]
    he, we = h + pad_beg + pad_end, w + pad_beg + pad_end
    out = np.zeros(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            yr = np.float32(i) * (np.float32(he - 1) / np.float32(oh - 1) if oh > 1 else 0)
            xr = np.float32(j) * (np.float32(we - 1) / np.float32(ow - 1) if ow > 1 else 0)
            y0, x0 = int(yr), int(xr)
            y1, x1 = min(y0 + 1, he - 1), min(x0 + 1, we - 1)
            fy, fx = float(yr - y0), float(xr - x0)
            crop = x[:, :, -pad_beg:, -pad_beg:]
            out[:, :, i, j] = (1 - fy) * (
                (1 - fx) * crop[:, :, y0, x0] + fx * crop[:, :, y0, x1]
            ) + fy * ((1 - fx) * crop[:, :, y1, x0] + fx * crop[:, :, y1, x1])
    return out


@pytest.mark.parametrize(
    "param, size",
    [
        ("zoom_factor: 3", (7, 10)),
        ("shrink_factor: 2", (2, 2)),
        ("height: 5 width: 2", (5, 2)),
        ("shrink_factor: 2 zoom_factor: 2", (3, 3)),
        ("height: 1 width: 1", (1, 1)),
    ],
)
def test_interp_forward(backend, param, size):
    x = rand(2, 3, 3, 4)
    (y,) = run(f'type: "Interp" interp_param {{ {param} }}', [x], backend=backend)
    assert y.shape == (2, 3) + size
    np.testing.assert_allclose(y, interp_ref(x, *size), rtol=1e-12, atol=1e-12)


def test_interp_crop(backend):
    x = rand(1, 2, 6, 6)
    (y,) = run(
        'type: "Interp" interp_param { zoom_factor: 2 pad_beg: -1 pad_end: -2 }',
        [x],
        backend=backend,
    )
    assert y.shape == (1, 2, 5, 5)
    np.testing.assert_allclose(y, interp_ref(x, 5, 5, -1, -2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "param", ["zoom_factor: 2", "height: 4 width: 2", "zoom_factor: 2 pad_beg: -1"]
)
def test_interp_gradient(backend, param):
    check_gradient(
        f'type: "Interp" interp_param {{ {param} }}', [rand(1, 2, 3, 3)], backend=backend
    )


def test_interp_needs_a_size():
    with pytest.raises(ConfigError, match="zoom_factor"):
        build('type: "Interp"', [rand(1, 1, 2, 2)])


# -- pass-through and in-place cases ----------------------------------------------------------
def test_eltwise_in_place(backend):
    a, b = rand(2, 3, seed=1), rand(2, 3, seed=2)
    expected = a + 2 * b
    layer, bottom, _ = build(
        'type: "Eltwise" eltwise_param { coeff: 1 coeff: 2 }', [a.copy(), b], backend=backend
    )
    layer.forward(bottom, bottom[:1])
    np.testing.assert_allclose(to_numpy(bottom[0].data), expected, rtol=1e-12)


def test_single_blob_concat_and_slice_pass_through(backend):
    x = rand(2, 3)
    for text in ('type: "Concat"', 'type: "Slice"'):
        layer, bottom, top = build(text, [x], backend=backend)
        (y,) = forward(layer, bottom, top)
        np.testing.assert_array_equal(y, x)
        top[0].diff = backend.asarray(rand(2, 3, seed=7))
        layer.backward(top, [True], bottom)
        np.testing.assert_array_equal(to_numpy(bottom[0].diff), rand(2, 3, seed=7))


def test_inner_product_checks_loaded_weights():
    layer, bottom, top = build(IP.format(n=3, extra=""), [rand(2, 4)])
    with pytest.raises(ShapeError, match="parameter blob 0"):
        layer.blobs[0].reshape(4, 3)
        layer.setup(bottom, top)


def test_upsample_rejects_sizes_that_do_not_fit():
    with pytest.raises(ShapeError, match="does not fit"):
        build(
            'type: "Upsample" upsample_param { scale: 2 upsample_h: 9 upsample_w: 4 }',
            [rand(1, 1, 2, 2)],
        )


# -- conformance: layers of a real trained model against an independent Caffe's blobs ------------
def test_mtcnn_det4_slice_concat_inner_product():
    from google.protobuf import text_format

    from tests.conftest import shared_path

    folder = shared_path("conformance", "mtcnn_det4")
    deploy = text_format.Parse((folder / "det4.prototxt").read_text(), pb.NetParameter())
    trained = pb.NetParameter.FromString((folder / "det4.caffemodel").read_bytes())
    weights = {layer.name: layer.blobs for layer in trained.layer}
    expected = np.load(folder / "expected.npz")
    checked = 0
    for param in deploy.layer:
        if param.type not in ("Slice", "Concat", "InnerProduct"):
            continue
        if param.type == "InnerProduct" and param.top[0] in {
            t for p in deploy.layer if p is not param for t in p.top
        }:
            continue  # an in-place layer rewrote this top: the stored blob is not this layer's
        bottoms = [expected[name] for name in param.bottom]
        text = text_format.MessageToString(param)
        layer, bottom, top = build(text, bottoms, num_tops=len(param.top), dtype=np.float32)
        for blob, proto in zip(layer.blobs, weights[param.name]):
            blob.data = np.asarray(proto.data, dtype=np.float32).reshape(blob.shape)
        for name, got in zip(param.top, forward(layer, bottom, top)):
            want = expected[name]
            assert np.max(np.abs(got - want)) <= 1e-4 * max(1.0, np.max(np.abs(want))), name
            checked += 1
    assert checked == 11  # 5 slices, the concat, fc5_1..fc5_5
