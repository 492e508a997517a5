"""Vision layers against direct float64 loop references written from Caffe's formulas, plus
Caffe's gradient checks (thresholds from Caffe's test suite)."""

from __future__ import annotations

import itertools
import math
import multiprocessing
import signal
import sys
import threading
import time

import numpy as np
import pytest

from netforge._blas import set_blas_threads
from netforge.backend import to_numpy
from netforge.builtin_layers import _jit, _threads, conv_ops, convolution, pooling
from netforge.builtin_layers.conv_rows import RowShiftConv
from netforge.builtin_layers.conv_winograd import (
    MAX_KERNEL_ROWS,
    TILE,
    WinogradRowConv,
    minimal_filtering,
)
from netforge.errors import ConfigError, ShapeError
from netforge.proto import pb
from tests.harness import SEED, build, check_gradient, forward, run

RNG = np.random.default_rng(7)


def distinct(*shape: int, spacing: float = 0.01) -> np.ndarray:
    """Values at least ``spacing`` apart, so max pooling never sees a near tie."""
    count = math.prod(shape)
    return (RNG.permutation(count).reshape(shape) - count / 2) * spacing


# -- references --------------------------------------------------------------------------
def conv_reference(x, w, b, stride, pad, dilation, group):
    """Direct N-D convolution: every output is a dot product with its dilated window."""
    n, c = x.shape[:2]
    out_c, c_per_group = w.shape[:2]
    kernel = w.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in pad])
    out = [
        (h + 2 * p - (d * (k - 1) + 1)) // s + 1
        for h, k, s, p, d in zip(x.shape[2:], kernel, stride, pad, dilation)
    ]
    y = np.zeros((n, out_c, *out))
    per_group = out_c // group
    for o in range(out_c):
        g = o // per_group
        for pos in np.ndindex(*out):
            index = tuple(
                slice(q * s, q * s + d * (k - 1) + 1, d)
                for q, s, d, k in zip(pos, stride, dilation, kernel)
            )
            patch = xp[(slice(None), slice(g * c_per_group, (g + 1) * c_per_group)) + index]
            y[(slice(None), o) + pos] = (patch * w[o]).reshape(n, -1).sum(1)
    if b is not None:
        y += b.reshape((1, -1) + (1,) * len(out))
    return y


def deconv_reference(x, w, b, stride, pad, dilation, group):
    """Direct transposed convolution: every input scatters its weighted kernel."""
    n, c = x.shape[:2]
    per_group = w.shape[1]
    kernel = w.shape[2:]
    out = [
        s * (h - 1) + d * (k - 1) + 1 - 2 * p
        for h, k, s, p, d in zip(x.shape[2:], kernel, stride, pad, dilation)
    ]
    full = np.zeros((n, per_group * group, *[o + 2 * p for o, p in zip(out, pad)]))
    in_group = c // group
    for ci in range(c):
        g = ci // in_group
        for pos in np.ndindex(*x.shape[2:]):
            for off in np.ndindex(*kernel):
                at = tuple(q * s + o * d for q, s, o, d in zip(pos, stride, off, dilation))
                value = x[(slice(None), ci) + pos][:, None] * w[(ci, slice(None)) + off]
                full[(slice(None), slice(g * per_group, (g + 1) * per_group)) + at] += value
    y = full[(slice(None), slice(None)) + tuple(slice(p, p + o) for p, o in zip(pad, out))]
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * len(out))
    return y


def pooled_size(spatial, kernel, stride, pad, ceil=True) -> list[int]:
    """Caffe's pooling output size per axis: CEIL (or FLOOR) of (size + 2p − k) / s, plus
    one, less the last window when it would start in the padding."""
    out = []
    for size, k, s, p in zip(spatial, kernel, stride, pad):
        o = (math.ceil if ceil else math.floor)((size + 2 * p - k) / s) + 1
        if any(pad) and (o - 1) * s >= size + p:
            o -= 1
        out.append(o)
    return out


def pool_reference(x, kernel, stride, pad, method, ceil=True):
    """Caffe's pooling loops: window bounds, AVE divisor and MAX argmax per output."""
    n, c, height, width = x.shape
    out = pooled_size((height, width), kernel, stride, pad, ceil)
    y = np.zeros((n, c, *out))
    mask = np.zeros((n, c, *out))
    for i, j in itertools.product(range(out[0]), range(out[1])):
        hs, ws = i * stride[0] - pad[0], j * stride[1] - pad[1]
        he, we = min(hs + kernel[0], height + pad[0]), min(ws + kernel[1], width + pad[1])
        size = (he - hs) * (we - ws)
        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, height), min(we, width)
        window = x[:, :, hs:he, ws:we].reshape(n, c, -1)
        if method == "MAX":
            arg = window.argmax(-1)
            y[:, :, i, j] = window.max(-1)
            mask[:, :, i, j] = (hs + arg // (we - ws)) * width + ws + arg % (we - ws)
        else:
            y[:, :, i, j] = window.sum(-1) / size
    return y, mask


# -- Convolution -------------------------------------------------------------------------
CONV_CASES = [
    # (bottom shape, conv_param text, stride, pad, dilation, group)
    ((2, 3, 6, 5), "kernel_size: 3", (1, 1), (0, 0), (1, 1), 1),
    ((2, 4, 7, 6), "kernel_size: 3 stride: 2 pad: 1 group: 2", (2, 2), (1, 1), (1, 1), 2),
    (
        (1, 2, 7, 8),
        "kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1 pad_w: 0",
        (2, 1),
        (1, 0),
        (1, 1),
        1,
    ),
    ((2, 2, 8, 7), "kernel_size: 3 dilation: 2 pad: 2", (1, 1), (2, 2), (2, 2), 1),
    (
        (1, 3, 6, 7),
        "kernel_size: 2 kernel_size: 3 stride: 1 stride: 2 dilation: 2 dilation: 1",
        (1, 2),
        (0, 0),
        (2, 1),
        1,
    ),
    ((2, 4, 5, 5), "kernel_size: 3 pad: 1 group: 4", (1, 1), (1, 1), (1, 1), 4),  # depthwise
    ((2, 3, 9), "kernel_size: 3 stride: 2 pad: 1", (2,), (1,), (1,), 1),  # 1-D
    (
        (1, 2, 4, 5, 4),
        "kernel_size: 2 kernel_size: 3 kernel_size: 2 pad: 1 stride: 2",
        (2, 2, 2),
        (1, 1, 1),
        (1, 1, 1),
        1,
    ),  # 3-D
]


def _conv_text(kind: str, num_output: int, params: str, bias: bool = True) -> str:
    return (
        f'type: "{kind}" convolution_param {{ num_output: {num_output} {params} '
        f"bias_term: {str(bias).lower()} "
        'weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" } }'
    )


@pytest.mark.parametrize("shape,params,stride,pad,dilation,group", CONV_CASES)
def test_convolution_forward(backend, shape, params, stride, pad, dilation, group):
    x = RNG.normal(size=shape)
    layer, bottom, top = build(_conv_text("Convolution", 4, params), [x], backend=backend)
    (y,) = forward(layer, bottom, top)
    w, b = (to_numpy(p.data) for p in layer.blobs)
    assert layer.blobs[0].shape == (4, shape[1] // group) + w.shape[2:]
    np.testing.assert_allclose(y, conv_reference(x, w, b, stride, pad, dilation, group), atol=1e-12)


@pytest.mark.parametrize("case", [0, 1, 2, 3, 5, 6, 7])
def test_convolution_gradient(backend, case):
    shape, params, *_ = CONV_CASES[case]
    text = _conv_text("Convolution", 4, params)
    assert check_gradient(text, [RNG.normal(size=shape)], backend=backend) > 0


def test_convolution_without_bias_and_two_bottoms(backend):
    x1, x2 = RNG.normal(size=(2, 2, 5, 5)), RNG.normal(size=(2, 2, 5, 5))
    text = _conv_text("Convolution", 3, "kernel_size: 2 stride: 2", bias=False)
    layer, bottom, top = build(text, [x1, x2], num_tops=2, backend=backend)
    y1, y2 = forward(layer, bottom, top)
    assert len(layer.blobs) == 1
    w = to_numpy(layer.blobs[0].data)
    for x, y in ((x1, y1), (x2, y2)):
        np.testing.assert_allclose(y, conv_reference(x, w, None, (2, 2), (0, 0), (1, 1), 1))
    check_gradient(text, [x1, x2], num_tops=2, backend=backend)


def test_convolution_axis_folds_leading_axes_into_the_batch():
    x = RNG.normal(size=(2, 3, 4, 6))  # channel axis 2, one spatial axis
    text = _conv_text("Convolution", 5, "kernel_size: 3 axis: 2")
    layer, bottom, top = build(text, [x])
    (y,) = forward(layer, bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    ref = conv_reference(x.reshape(6, 4, 6), w, b, (1,), (0,), (1,), 1)
    np.testing.assert_allclose(y, ref.reshape(2, 3, 5, 4))


@pytest.mark.parametrize(
    "params,stride,pad,group,bias",
    [
        ("kernel_size: 1", (1, 1), (0, 0), 1, True),  # the bottom is the column matrix
        ("kernel_size: 1 group: 2", (1, 1), (0, 0), 2, False),
        ("kernel_size: 1 stride: 2", (2, 2), (0, 0), 1, True),
        ("kernel_size: 3 pad: 1 stride: 2 group: 2", (2, 2), (1, 1), 2, True),
    ],
)
def test_convolution_of_one_image_splits_by_output_channels(params, stride, pad, group, bias):
    """Batch 1 takes ``_forward_one`` (its GEMM split by output channels on the pool, the
    top written in place); two bottoms, so that backward's cached columns must be the last
    bottom's, and the gradient check runs backward after it."""
    x1, x2 = RNG.normal(size=(1, 4, 7, 6)), RNG.normal(size=(1, 4, 7, 6))
    text = _conv_text("Convolution", 6, params, bias)
    layer, bottom, top = build(text, [x1, x2], num_tops=2)
    assert layer.num == 1
    ys = forward(layer, bottom, top)
    w = layer.blobs[0].data
    b = layer.blobs[1].data if layer.bias_term else None
    for x, y in zip((x1, x2), ys):
        np.testing.assert_allclose(y, conv_reference(x, w, b, stride, pad, (1, 1), group))
    check_gradient(text, [x1, x2], num_tops=2)


@pytest.mark.parametrize("kept", [1 << 25, 0])  # forward's columns kept, or recomputed
@pytest.mark.parametrize("case", [0, 1])  # stride 1 (full-correlation dx) and stride 2
def test_convolution_in_batch_chunks_matches(monkeypatch, case, kept):
    monkeypatch.setattr(convolution, "COLUMN_LIMIT", 100)  # one item per chunk
    monkeypatch.setattr(convolution, "KEPT_COLUMNS", kept)
    shape, params, stride, pad, dilation, group = CONV_CASES[case]
    x = RNG.normal(size=(3,) + shape[1:])
    layer, bottom, top = build(_conv_text("Convolution", 4, params), [x])
    assert len(layer.chunks) == 3
    (y,) = forward(layer, bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    np.testing.assert_allclose(y, conv_reference(x, w, b, stride, pad, dilation, group))
    check_gradient(_conv_text("Convolution", 4, params), [x])
    check_gradient(_conv_text("Deconvolution", 4, params), [x])


ROW_SHIFT_CASES = [
    # (bottom shape, conv_param text, pad, dilation, group): stride-1 2-D convolutions
    ((2, 3, 6, 5), "kernel_size: 3", (0, 0), (1, 1), 1),  # unpadded: pixel ratio 30/12
    ((2, 4, 7, 6), "kernel_size: 3 pad: 1 group: 2", (1, 1), (1, 1), 2),
    ((1, 2, 7, 8), "kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0", (1, 0), (1, 1), 1),
    ((2, 2, 8, 7), "kernel_size: 3 dilation: 2 pad: 2", (2, 2), (2, 2), 1),
    ((1, 3, 6, 7), "kernel_size: 2 kernel_size: 3 dilation: 2 dilation: 1", (0, 0), (2, 1), 1),
    ((2, 4, 5, 5), "kernel_size: 3 pad: 1 group: 4", (1, 1), (1, 1), 4),  # depthwise
    ((2, 2, 5, 6), "kernel_size: 2 pad: 3", (3, 3), (1, 1), 1),  # pad beyond the kernel
    ((2, 3, 9, 8), "kernel_size: 5 pad: 2", (2, 2), (1, 1), 1),  # 9 rows: a part tile
    ((1, 2, 8, 9), "kernel_h: 4 kernel_w: 3 pad_h: 1 pad_w: 2", (1, 2), (1, 1), 1),
    ((2, 2, 6, 6), "kernel_size: 3 pad: 1", (1, 1), (1, 1), 1),  # top: twice the channels
]


@pytest.mark.parametrize("winograd", [False, True])
@pytest.mark.parametrize("waste", [0.0, 100.0])  # bottom gradient by adjoint / full correlation
@pytest.mark.parametrize("shape,params,pad,dilation,group", ROW_SHIFT_CASES)
def test_row_shift_convolution(monkeypatch, shape, params, pad, dilation, group, waste, winograd):
    monkeypatch.setattr(convolution, "ROW_SHIFT_MIN_DEPTH", 0)
    monkeypatch.setattr(convolution, "ROW_SHIFT_MIN_REUSE", 0)
    monkeypatch.setattr(convolution, "ROW_SHIFT_MIN_IMAGES", 1)
    monkeypatch.setattr(convolution, "FULL_CORRELATION_WASTE", waste)
    monkeypatch.setattr(convolution, "WINOGRAD_MIN_ROWS", 1 if winograd else 1 << 30)
    x = RNG.normal(size=shape)
    text = _conv_text("Convolution", 4, params)
    layer, bottom, top = build(text, [x])
    kind = WinogradRowConv if winograd and WinogradRowConv.fits(layer.geom) else RowShiftConv
    assert type(layer._rowshift) is kind
    full_possible = all(p <= d * (k - 1) for p, d, k in zip(pad, dilation, layer.geom.kernel))
    if waste == 0.0 or not full_possible:
        assert layer._rowshift_dx is None
    (y,) = forward(layer, bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    ref = conv_reference(x, w, b, (1, 1), pad, dilation, group)
    np.testing.assert_allclose(y, ref, atol=1e-12)
    assert check_gradient(text, [x]) > 0


@pytest.mark.parametrize("kept", [1 << 25, 0])
def test_row_shift_convolution_in_batch_chunks(monkeypatch, kept):
    monkeypatch.setattr(convolution, "ROW_SHIFT_MIN_DEPTH", 0)
    monkeypatch.setattr(convolution, "ROW_SHIFT_MIN_REUSE", 0)
    monkeypatch.setattr(convolution, "ROW_SHIFT_MIN_IMAGES", 1)
    monkeypatch.setattr(convolution, "COLUMN_LIMIT", 100)  # one item per chunk
    monkeypatch.setattr(convolution, "KEPT_COLUMNS", kept)
    x = RNG.normal(size=(3, 4, 7, 6))
    text = _conv_text("Convolution", 4, "kernel_size: 3 pad: 1 group: 2")
    layer, bottom, top = build(text, [x])
    assert layer._rowshift is not None and len(layer.chunks) == 3
    (y,) = forward(layer, bottom, top)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    ref = conv_reference(x, w, b, (1, 1), (1, 1), (1, 1), 2)
    np.testing.assert_allclose(y, ref, atol=1e-12)
    check_gradient(text, [x])


@pytest.mark.parametrize(
    "channels,params,kind",
    [
        (32, "kernel_size: 5 pad: 2", WinogradRowConv),  # CIFAR-10 quick's conv2: depth 5·32
        (20, "kernel_size: 5", WinogradRowConv),  # LeNet's conv2: depth 5·20, 8 rows out
        (20, "kernel_size: 5 pad: 2 dilation: 2", RowShiftConv),  # dilated rows
        (3, "kernel_size: 5 pad: 2", type(None)),  # CIFAR-10 quick's conv1: depth 15, too thin
        (32, "kernel_size: 5 pad: 2 stride: 2", type(None)),
        (64, "kernel_size: 1", type(None)),  # 1×1: no window copies to save
    ],
)
def test_row_shift_is_chosen_for_deep_stride_one_convolutions(channels, params, kind):
    x = RNG.normal(size=(2, channels, 12, 12)).astype(np.float32)
    layer, bottom, top = build(_conv_text("Convolution", 8, params), [x], dtype=np.float32)
    assert type(layer._rowshift) is kind
    (y,) = forward(layer, bottom, top)
    w, b = (p.data.astype(np.float64) for p in layer.blobs)
    geom = layer.geom
    ref = conv_reference(x.astype(np.float64), w, b, geom.stride, geom.pad, geom.dilation, 1)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_one_image_takes_im2col_split_on_the_pool():
    """CIFAR-10 quick's conv2 in small takes Winograd's row shifts at batch 2 (above) and
    ``_forward_one`` at batch 1 (``ROW_SHIFT_MIN_IMAGES``)."""
    x = RNG.normal(size=(1, 32, 12, 12)).astype(np.float32)
    layer, bottom, top = build(_conv_text("Convolution", 8, "kernel_size: 5 pad: 2"), [x])
    assert layer._rowshift is None
    (y,) = forward(layer, bottom, top)
    w, b = (p.data.astype(np.float64) for p in layer.blobs)
    ref = conv_reference(x.astype(np.float64), w, b, (1, 1), (2, 2), (1, 1), 1)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "channels,filters,size,params,split",
    [
        (6, 4, 9, "kernel_size: 3 pad: 1", "rows"),  # 81 pixels, 4 filters
        (6, 4, 9, "kernel_size: 1", "rows"),  # 1×1 stride 1: the bottom's own pixels
        (6, 4, 11, "kernel_size: 3 stride: 2 pad: 1 group: 2", "rows"),
        (4, 6, 5, "kernel_size: 2 stride: 1 dilation: 2 pad: 1 group: 2", "rows"),
        (8, 64, 3, "kernel_size: 3 pad: 1", "channels"),  # 9 pixels, 64 filters
        (4, 8, 1, "kernel_size: 1", "channels"),  # one output row: nothing to split by rows
        (6, 4, 9, "kernel_size: 3 pad: 1", "none"),  # under SPLIT_MIN_MACS
    ],
)
def test_one_image_splits_by_rows_or_channels_or_not_at_all(
    monkeypatch, channels, filters, size, params, split
):
    """``_forward_one``'s three ways against the direct formula, on two workers; and the
    weight and bottom gradients after each, which recompute the columns the row split
    does not keep, against those of the same layer at batch 2 run on the same image twice."""
    monkeypatch.setattr(_threads, "WORKERS", 2)
    monkeypatch.setattr(convolution, "WORKERS", 2)
    monkeypatch.setattr(convolution, "SPLIT_MIN_MACS", 1 << 40 if split == "none" else 0)
    taken = []
    by_rows = convolution.ConvolutionLayer._forward_one_by_rows
    monkeypatch.setattr(
        convolution.ConvolutionLayer,
        "_forward_one_by_rows",
        lambda *args: taken.append("rows") or by_rows(*args),
    )
    rng = np.random.default_rng(SEED)  # its own draws: the module generator's feed others
    x = rng.normal(size=(1, channels, size, size)).astype(np.float32)
    text = _conv_text("Convolution", filters, params)
    layer, bottom, top = build(text, [x], dtype=np.float32)
    (y,) = forward(layer, bottom, top)
    assert taken == (["rows"] if split == "rows" else [])
    w, b = (p.data.astype(np.float64) for p in layer.blobs)
    geom = layer.geom
    ref = conv_reference(
        x.astype(np.float64), w, b, geom.stride, geom.pad, geom.dilation, layer.group
    )
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    dy = rng.normal(size=y.shape).astype(np.float32)
    pair, pair_bottom, pair_top = build(text, [np.concatenate([x, x])], dtype=np.float32)
    for mine, theirs in zip(pair.blobs, layer.blobs):
        mine.data[...] = theirs.data
    forward(pair, pair_bottom, pair_top)
    for conv, tops, bottoms, times in ((layer, top, bottom, 1), (pair, pair_top, pair_bottom, 2)):
        tops[0].diff = np.concatenate([dy] * times)
        for blob in conv.blobs:
            blob.diff.fill(0)
        conv.backward(tops, [True], bottoms)
    np.testing.assert_allclose(2 * layer.blobs[0].diff, pair.blobs[0].diff, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bottom[0].diff[0], pair_bottom[0].diff[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "channels,filters,size,group,pointwise",
    [
        (6, 4, 12, 1, True),  # 144 pixels an image
        (6, 4, 12, 2, True),
        (4, 6, 13, 2, True),
        (6, 4, 11, 1, False),  # 121 pixels: under POINTWISE_MIN_PIXELS, columns
    ],
)
def test_one_by_one_convolution_of_several_images_multiplies_each_in_place(
    channels, filters, size, group, pointwise
):
    """1×1, stride 1, unpadded, batch 3: one GEMM per image and group on the blobs as they
    are (``_pointwise``), against the direct formula and Caffe's gradient check."""
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(3, channels, size, size))
    text = _conv_text("Convolution", filters, f"kernel_size: 1 group: {group}")
    layer, bottom, top = build(text, [x])
    assert layer._pointwise is pointwise
    (y,) = forward(layer, bottom, top)
    w, b = (p.data for p in layer.blobs)
    ref = conv_reference(x, w, b, (1, 1), (0, 0), (1, 1), group)
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert check_gradient(text, [x]) > 0


def test_im2col_where_filters_outweigh_the_window_copies():
    """Two 3×3 images of 64 channels through 8 filters (ResNet-50's 7×7 layers, in small):
    the row shifts would save 2·9·2 copied elements per 8·3 filter elements they re-lay
    out, fewer than ``ROW_SHIFT_MIN_REUSE``, so the layer takes im2col."""
    x = RNG.normal(size=(2, 64, 3, 3)).astype(np.float32)
    layer, bottom, top = build(_conv_text("Convolution", 8, "kernel_size: 3 pad: 1"), [x])
    assert layer._rowshift is None
    (y,) = forward(layer, bottom, top)
    w, b = (p.data.astype(np.float64) for p in layer.blobs)
    ref = conv_reference(x.astype(np.float64), w, b, (1, 1), (1, 1), (1, 1), 1)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows", range(2, MAX_KERNEL_ROWS + 1))
def test_minimal_filtering_computes_the_correlation(rows):
    at, g, bt = minimal_filtering(TILE, rows)
    filt, tile = RNG.normal(size=rows), RNG.normal(size=TILE + rows - 1)
    expected = [filt @ tile[i : i + rows] for i in range(TILE)]
    np.testing.assert_allclose(at @ ((g @ filt) * (bt @ tile)), expected, rtol=1e-13, atol=1e-13)


def test_winograd_float32_gradients_match_float64():
    """F(4, 5) in float32 (CIFAR-10 quick's conv2, smaller): forward, bottom and filter
    gradients within 1e-4 of the largest float64 value, the row shifts' own tolerance. The
    float64 layer is the reference: the tests above pin it to the direct formula."""
    x = RNG.normal(size=(3, 32, 10, 10))
    dy = RNG.normal(size=(3, 8, 10, 10))
    text = _conv_text("Convolution", 8, "kernel_size: 5 pad: 2")
    results = {}
    for dtype in (np.float32, np.float64):
        layer, bottom, top = build(text, [x], dtype=dtype)
        assert type(layer._rowshift) is WinogradRowConv
        if dtype == np.float64:
            for mine, theirs in zip(layer.blobs, results[np.float32][0].blobs):
                mine.data = theirs.data.astype(np.float64)
        (y,) = forward(layer, bottom, top)
        top[0].diff = dy.astype(dtype)
        for blob in layer.blobs:
            blob.diff.fill(0)
        layer.backward(top, [True], bottom)
        results[dtype] = (layer, [y, bottom[0].diff.copy(), layer.blobs[0].diff.copy()])
    for low, high in zip(results[np.float32][1], results[np.float64][1]):
        assert low.dtype == np.float32
        np.testing.assert_allclose(low, high, rtol=0, atol=1e-4 * np.abs(high).max())


@pytest.mark.parametrize(
    ("num", "per_item", "limit", "multiple", "sizes"),
    [
        (100, 51200, 1 << 20, 2, [16, 17, 17, 16, 17, 17]),  # 5 runs of 20 -> 6 balanced
        (10, 1, 3, 1, [2, 3, 2, 3]),
        (3, 10, 100, 2, [1, 2]),
        (1, 10, 1, 2, [1]),
        (0, 10, 1, 2, []),
    ],
)
def test_batch_chunks_are_bounded_contiguous_and_balanced(num, per_item, limit, multiple, sizes):
    chunks = conv_ops.batch_chunks(num, per_item, limit, multiple)
    assert [stop - start for start, stop in chunks] == sizes
    assert [start for start, _ in chunks] == [0, *(stop for _, stop in chunks[:-1])][:num]


def test_run_chunks_covers_every_chunk_once_and_restores_blas_threads():
    calls = []
    chunks = [(i, i + 1) for i in range(7)]
    before = set_blas_threads(2)
    set_blas_threads(before)
    _threads.run_chunks(np, lambda start, stop, worker: calls.append((start, worker)), chunks)
    assert sorted(start for start, _ in calls) == list(range(7))
    # Static assignment: chunk i goes to worker i mod W.
    workers = min(_threads.WORKERS, len(chunks))
    assert all(worker == start % workers for start, worker in calls)
    assert set_blas_threads(before) == before


def test_netforge_spin_0_hands_off_through_locks(monkeypatch):
    monkeypatch.setenv("NETFORGE_SPIN", "0")
    assert _threads._spin_waits.__wrapped__() is None
    monkeypatch.setenv("NETFORGE_SPIN", "1")
    spins = _jit.enabled() and sys.platform.startswith("linux")
    assert (_threads._spin_waits.__wrapped__() is not None) == spins


def test_run_chunks_runs_worker_zero_here_and_lets_the_others_finish_when_it_fails(two_workers):
    threads, finished = {}, []

    def work(start, stop, worker):
        threads.setdefault(worker, threading.get_ident())
        if worker == 0:
            raise RuntimeError("worker 0 failed")
        time.sleep(0.02)  # still running when worker 0 fails
        finished.append(start)

    with pytest.raises(RuntimeError, match="worker 0 failed"):
        _threads.run_chunks(np, work, [(i, i + 1) for i in range(6)])
    assert threads[0] == threading.get_ident() != threads[1]
    assert finished == [1, 3, 5]


def test_run_chunks_raises_a_pooled_workers_error_and_the_pool_still_serves(two_workers):

    def work(start, stop, worker):
        if worker == 1:
            raise ValueError(f"chunk {start} failed")

    with pytest.raises(ValueError, match="chunk 1 failed"):
        _threads.run_chunks(np, work, [(0, 1), (1, 2)])
    calls = []
    _threads.run_chunks(np, lambda start, stop, worker: calls.append(worker), [(0, 1), (1, 2)])
    assert sorted(calls) == [0, 1]


def test_an_interrupted_wait_still_waits_for_the_pooled_worker(two_workers):
    """Ctrl-C while the caller waits for the pooled worker: the KeyboardInterrupt comes out
    only once the worker's share is over, and the next call waits for its own share."""
    caller, finished = threading.get_ident(), []

    def work(start, stop, worker):
        if worker == 1:
            time.sleep(0.05)  # the caller is waiting by now
            signal.pthread_kill(caller, signal.SIGINT)
            time.sleep(0.05)  # still running when the interrupt reaches the caller
            finished.append(start)

    with pytest.raises(KeyboardInterrupt):
        _threads.run_chunks(np, work, [(0, 1), (1, 2)])
    assert finished == [1]

    def slow(start, stop, worker):
        if worker == 1:
            time.sleep(0.05)
            finished.append(start)

    _threads.run_chunks(np, slow, [(0, 1), (1, 2)])
    assert finished == [1, 1]


def test_run_chunks_called_from_inside_a_call_runs_on_its_own_thread(two_workers):
    """One call runs on the pool at a time: an inner call (here from the pooled worker)
    runs its chunks where it is called instead of waiting for the busy pool."""
    inner = []

    def outer(start, stop, worker):
        if worker == 1:
            here = threading.get_ident()
            _threads.run_chunks(
                np,
                lambda a, b, w: inner.append((a, w, threading.get_ident() == here)),
                [(0, 1), (1, 2)],
            )

    _threads.run_chunks(np, outer, [(0, 1), (1, 2)])
    assert inner == [(0, 0, True), (1, 0, True)]


def test_calls_racing_the_pooled_threads_sleep_all_run_every_share(two_workers, monkeypatch):
    """A pooled thread that has watched ``SPIN_ROUNDS`` yields without a call sleeps, and the
    next call wakes it. Calls after pauses of every length around that point race its
    decision to sleep; each must still run both shares, and none may hang."""
    monkeypatch.setattr(_threads, "SPIN_ROUNDS", 30)
    pauses = np.random.default_rng(SEED).choice([0.0, 1e-5, 3e-5, 1e-4, 3e-3], size=300)
    runs, slept = [], []
    _threads.run_chunks(np, lambda start, stop, worker: None, [(0, 1), (1, 2)])  # pool up

    def calls():
        for pause in pauses:
            time.sleep(pause)
            if pause > 1e-3:  # far past 30 yields: the pooled thread goes to sleep
                pooled = _threads._pool.workers[0]
                deadline = time.monotonic() + 5
                while two_workers == "spinning" and not pooled.asleep:
                    assert time.monotonic() < deadline, "the pooled thread never slept"
                    time.sleep(1e-3)
                slept.append(pooled.asleep)
            seen = []
            _threads.run_chunks(
                np,
                lambda start, stop, worker, seen=seen: seen.append((start, worker)),
                [(0, 1), (1, 2)],
            )
            runs.append(sorted(seen))

    caller = threading.Thread(target=calls, daemon=True)
    caller.start()
    caller.join(timeout=60)
    assert not caller.is_alive(), f"a call hung after {len(runs)} calls"
    assert runs == [[(0, 0), (1, 1)]] * len(pauses)
    if two_workers == "spinning":
        assert slept and all(slept)


def test_run_chunks_works_in_a_forked_child(monkeypatch):
    """A forked child has no pooled threads: it starts its own instead of waiting for
    threads that only exist in the parent."""
    monkeypatch.setattr(_threads, "WORKERS", 2)
    _threads.run_chunks(np, lambda start, stop, worker: None, [(0, 1), (1, 2)])  # pool up
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as children:
        workers = children.apply_async(_pooled_workers_in_child).get(timeout=20)
    assert workers == [0, 1]


def _pooled_workers_in_child() -> list[int]:
    seen = []
    _threads.run_chunks(np, lambda start, stop, worker: seen.append(worker), [(0, 1), (1, 2)])
    return sorted(seen)


def test_workspace_serves_smaller_chunks_from_one_buffer():
    ws = conv_ops.Workspace()
    big = ws.get("a", (4, 3), np.float32, np)
    small = ws.get("a", (2, 5), np.float32, np)
    assert small.base is big.base and small.flags.c_contiguous
    padded = ws.get("p", (4, 2, 3), np.float32, np, fill=-1)
    padded[:, :, 1] = 7  # the "interior"
    part = ws.get("p", (3, 2, 3), np.float32, np, fill=-1)
    assert part.shape == (3, 2, 3)
    np.testing.assert_array_equal(part[:, :, 0], -1)  # the border written at allocation
    np.testing.assert_array_equal(part[:, :, 1], 7)
    other = ws.get("p", (3, 2, 4), np.float32, np, fill=-1)
    np.testing.assert_array_equal(other, -1)


def test_scratch_is_one_workspace_per_thread_shared_by_layers_and_holds_no_filled_buffers():
    first, second = conv_ops.Workspace(), conv_ops.Workspace()
    assert first.scratch is second.scratch  # every layer of this thread
    other = []
    thread = threading.Thread(target=lambda: other.append(first.scratch))
    thread.start()
    thread.join()
    assert other[0] is not first.scratch
    a32 = first.scratch.get("a", (4,), np.float32, np)
    a64 = second.scratch.get("a", (4,), np.float64, np)
    assert a64.base is not a32.base  # a float64 net beside a float32 one: no reallocation
    assert first.scratch.get("a", (2,), np.float32, np).base is a32.base
    with pytest.raises(ValueError, match="filled buffer"):
        first.scratch.get("pad", (2, 3), np.float32, np, fill=0)


def test_two_same_shaped_convolutions_sharing_scratch_keep_their_own_results():
    x = RNG.normal(size=(4, 6, 9, 9))
    texts = [_conv_text("Convolution", 5, f"kernel_size: 3 pad: {p}") for p in (1, 2)]
    layers = [build(text, [x], dtype=np.float64) for text in texts]
    for _ in range(2):  # the second pass reuses the first pass's buffers
        for (layer, bottom, top), pad in zip(layers, (1, 2)):
            (y,) = forward(layer, bottom, top)
            w, b = layer.blobs[0].data, layer.blobs[1].data
            ref = conv_reference(x, w, b, (1, 1), (pad, pad), (1, 1), 1)
            np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "cols, itemsize, stride",
    [(13312, 4, 13328), (18432, 4, 18448), (75, 4, 80), (80, 4, 80), (1, 4, 16), (100, 8, 104)],
)
def test_gemm_rows_are_an_odd_number_of_cache_lines_apart(cols, itemsize, stride):
    assert conv_ops.gemm_row_stride(cols, itemsize) == stride
    assert stride >= cols and (stride * itemsize) % 64 == 0 and (stride * itemsize // 64) % 2 == 1


def test_workspace_matrix_rows_are_padded_views_that_split_without_copying():
    ws = conv_ops.Workspace()
    matrix = ws.matrix("m", 6, 13312, np.float32, np)
    assert matrix.shape == (6, 13312) and matrix.strides == (13328 * 4, 4)
    split = matrix.reshape(2, 3, 13, 1024)
    split[...] = np.arange(split.size, dtype=np.float32).reshape(split.shape)
    np.testing.assert_array_equal(matrix.reshape(-1), np.arange(matrix.size, dtype=np.float32))
    assert ws.matrix("m", 3, 100, np.float32, np).base is matrix.base  # one buffer, reused


def test_convolution_chunks_are_cache_sized_and_results_reproducible():
    x = RNG.normal(size=(9, 8, 12, 12)).astype(np.float32)
    text = _conv_text("Convolution", 16, "kernel_size: 3 pad: 1")
    layer, bottom, top = build(text, [x], dtype=np.float32)
    per_item = 8 * 9 * 144
    assert len(layer.chunks) >= min(9, _threads.WORKERS)
    assert all(
        (stop - start) * per_item <= max(convolution.CACHE_COLUMNS, per_item)
        for start, stop in layer.chunks
    )
    first = forward(layer, bottom, top)[0].copy()
    second = forward(layer, bottom, top)[0]
    np.testing.assert_array_equal(first, second)
    w, b = layer.blobs[0].data, layer.blobs[1].data
    ref = conv_reference(x.astype(np.float64), w, b, (1, 1), (1, 1), (1, 1), 1)
    np.testing.assert_allclose(second, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "params,message",
    [
        ("num_output: 4 kernel_size: 3 kernel_h: 3", "not both"),
        ("num_output: 4 kernel_size: 3 kernel_size: 3 kernel_size: 3", "once per spatial"),
        ("num_output: 3 kernel_size: 3 group: 2", "group 2"),
        ("kernel_size: 3", "num_output"),
        ("num_output: 4", "'kernel_size' must be given"),
        ("num_output: 4 kernel_size: 3 stride: 0", "stride"),
    ],
)
def test_convolution_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        run(f'type: "Convolution" convolution_param {{ {params} }}', [np.zeros((1, 4, 5, 5))])


def test_convolution_shape_errors_and_default_fillers():
    with pytest.raises(ShapeError, match="smaller than the kernel"):
        run(
            'type: "Convolution" convolution_param { num_output: 1 kernel_size: 5 }',
            [np.zeros((1, 1, 3, 3))],
        )
    layer, _, top = build(
        'type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 dilation: 2 '
        "stride: 2 pad: 1 }",
        [np.ones((1, 1, 10, 9))],
    )
    assert top[0].shape == (1, 2, (10 + 2 - 5) // 2 + 1, (9 + 2 - 5) // 2 + 1)
    assert not np.any(layer.blobs[0].data) and not np.any(layer.blobs[1].data)


# -- Deconvolution -----------------------------------------------------------------------
DECONV_CASES = [
    ((2, 3, 4, 3), "kernel_size: 3 stride: 2 pad: 1", (2, 2), (1, 1), (1, 1), 1),
    (
        (1, 4, 3, 4),
        "kernel_h: 2 kernel_w: 3 stride_h: 1 stride_w: 2 group: 2",
        (1, 2),
        (0, 0),
        (1, 1),
        2,
    ),
    ((2, 2, 3, 3), "kernel_size: 3 dilation: 2 stride: 1", (1, 1), (0, 0), (2, 2), 1),
    ((2, 2, 5), "kernel_size: 4 stride: 2 pad: 1", (2,), (1,), (1,), 1),
]


@pytest.mark.parametrize("shape,params,stride,pad,dilation,group", DECONV_CASES)
def test_deconvolution_forward_and_gradient(backend, shape, params, stride, pad, dilation, group):
    x = RNG.normal(size=shape)
    text = _conv_text("Deconvolution", 4, params)
    layer, bottom, top = build(text, [x], backend=backend)
    (y,) = forward(layer, bottom, top)
    w, b = (to_numpy(p.data) for p in layer.blobs)
    assert w.shape[:2] == (shape[1], 4 // group)
    np.testing.assert_allclose(
        y, deconv_reference(x, w, b, stride, pad, dilation, group), atol=1e-12
    )
    check_gradient(text, [x], backend=backend)


# -- Im2col ------------------------------------------------------------------------------
def test_im2col_layout_and_gradient(backend):
    x = RNG.normal(size=(2, 3, 5, 6))
    text = (
        'type: "Im2col" convolution_param { kernel_h: 3 kernel_w: 2 stride: 2 pad: 1 dilation: 1 }'
    )
    (y,) = run(text, [x], backend=backend)
    xp = np.pad(x, [(0, 0), (0, 0), (1, 1), (1, 1)])
    ho, wo = (5 + 2 - 3) // 2 + 1, (6 + 2 - 2) // 2 + 1
    ref = np.zeros((2, 3 * 3 * 2, ho, wo))
    for c, i, j, oh, ow in itertools.product(range(3), range(3), range(2), range(ho), range(wo)):
        ref[:, (c * 3 + i) * 2 + j, oh, ow] = xp[:, c, oh * 2 + i, ow * 2 + j]
    np.testing.assert_array_equal(y, ref)
    check_gradient(text, [x], threshold=1e-2, backend=backend)


# -- Pooling -----------------------------------------------------------------------------
POOL_CASES = [
    # kernel, stride, pad, ceil
    ((3, 3), (2, 2), (0, 0), True),
    ((3, 3), (2, 2), (1, 1), True),  # the last window starts in the padding: dropped
    ((3, 3), (2, 2), (1, 1), False),
    ((2, 2), (2, 2), (0, 0), True),
    ((3, 2), (2, 1), (0, 1), True),
    ((4, 3), (3, 2), (2, 1), True),
    ((2, 3), (3, 2), (0, 0), False),
]


def _pool_text(method, kernel, stride, pad, ceil):
    return (
        f'type: "Pooling" pooling_param {{ pool: {method} kernel_h: {kernel[0]} '
        f"kernel_w: {kernel[1]} stride_h: {stride[0]} stride_w: {stride[1]} pad_h: {pad[0]} "
        f"pad_w: {pad[1]} round_mode: {'CEIL' if ceil else 'FLOOR'} }}"
    )


@pytest.mark.parametrize("kernel,stride,pad,ceil", POOL_CASES)
def test_max_pooling_forward_mask_and_gradient(backend, kernel, stride, pad, ceil):
    x = distinct(2, 3, 7, 8)
    text = _pool_text("MAX", kernel, stride, pad, ceil)
    y, mask = run(text, [x], num_tops=2, backend=backend)
    ref, ref_mask = pool_reference(x, kernel, stride, pad, "MAX", ceil)
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(mask, ref_mask)
    check_gradient(text, [x], stepsize=1e-4, threshold=1e-2, backend=backend)


def test_max_pooling_first_maximum_wins():
    x = np.zeros((1, 1, 3, 3))
    x[0, 0, 1, 2] = x[0, 0, 2, 0] = 5.0
    _, mask = run(_pool_text("MAX", (3, 3), (1, 1), (0, 0), True), [x], num_tops=2)
    assert mask.item() == 1 * 3 + 2


@pytest.mark.parametrize("kernel,stride,pad,ceil", POOL_CASES)
def test_max_pooling_ties_go_to_the_first_maximum_in_scan_order(kernel, stride, pad, ceil):
    # Three levels over a 9x10 plane, as after a ReLU: most windows hold several maxima.
    x = RNG.integers(0, 3, size=(3, 2, 9, 10)).astype(np.float32)
    text = _pool_text("MAX", kernel, stride, pad, ceil)
    layer, bottom, top = build(text, [x], num_tops=2, dtype=np.float32)
    y, mask = forward(layer, bottom, top)
    ref, ref_mask = pool_reference(x.astype(np.float64), kernel, stride, pad, "MAX", ceil)
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(mask, ref_mask)
    dy = RNG.normal(size=ref.shape).astype(np.float32)
    expected = np.zeros((3 * 2, 9 * 10))
    np.add.at(
        expected, (np.arange(6)[:, None], ref_mask.reshape(6, -1).astype(int)), dy.reshape(6, -1)
    )
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, expected.reshape(x.shape), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,pad,ceil", POOL_CASES)
def test_ave_pooling_forward_and_gradient(backend, kernel, stride, pad, ceil):
    x = RNG.normal(size=(2, 3, 7, 8))
    text = _pool_text("AVE", kernel, stride, pad, ceil)
    (y,) = run(text, [x], backend=backend)
    np.testing.assert_allclose(y, pool_reference(x, kernel, stride, pad, "AVE", ceil)[0])
    check_gradient(text, [x], stepsize=1e-2, threshold=1e-2, backend=backend)


def test_global_pooling(backend):
    x = RNG.normal(size=(2, 3, 4, 5))
    (y,) = run(
        'type: "Pooling" pooling_param { pool: AVE global_pooling: true }', [x], backend=backend
    )
    np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True))
    (y,) = run('type: "Pooling" pooling_param { global_pooling: true }', [x], backend=backend)
    np.testing.assert_allclose(y, x.max(axis=(2, 3), keepdims=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("params", ["global_pooling: true", "kernel_h: 6 kernel_w: 5 stride: 3"])
def test_ave_pooling_of_one_window_per_plane(params, dtype, backend):
    """A window covering the whole plane (global pooling, or a kernel the plane's size)
    takes the one-matrix-vector-product path on numpy: the mean, and its gradient."""
    x = RNG.normal(size=(3, 4, 6, 5))
    text = f'type: "Pooling" pooling_param {{ pool: AVE {params} }}'
    (y,) = run(text, [x], backend=backend, dtype=dtype)
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(y, x.mean(axis=(2, 3), keepdims=True), rtol=tol, atol=tol)
    check_gradient(text, [x], backend=backend)


def test_global_max_pooling_mask_over_a_large_window(backend):
    x = distinct(2, 2, 17, 16)  # 272 offsets: more than a byte can number
    y, mask = run(
        'type: "Pooling" pooling_param { global_pooling: true }', [x], num_tops=2, backend=backend
    )
    np.testing.assert_array_equal(y[..., 0, 0], x.max(axis=(2, 3)))
    np.testing.assert_array_equal(mask[..., 0, 0], x.reshape(2, 2, -1).argmax(-1))


def _stochastic_reference(x, kernel, stride, u):
    """Caffe's StoPoolForwardTrain: the first element whose running sum reaches u·Σ."""
    n, c, height, width = x.shape
    out = [math.ceil((size - k) / s) + 1 for size, k, s in zip((height, width), kernel, stride)]
    y = np.zeros((n, c, *out))
    for a, b, i, j in np.ndindex(n, c, *out):
        window = x[
            a,
            b,
            i * stride[0] : i * stride[0] + kernel[0],
            j * stride[1] : j * stride[1] + kernel[1],
        ].reshape(-1)
        running = np.cumsum(window)
        y[a, b, i, j] = window[np.argmax(running >= u[a, b, i, j] * window.sum())]
    return y


def test_stochastic_pooling_train_and_test(backend):
    # Its own generator: with the module's, the inputs depended on which tests ran first,
    # and some draws put a running sum within the finite-difference step of its threshold.
    x = np.random.default_rng(5).uniform(0.1, 1.0, size=(2, 3, 6, 5))
    text = 'type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }'
    layer, bottom, top = build(text, [x], backend=backend)
    (y,) = forward(layer, bottom, top)
    layer.rng = np.random.default_rng(SEED)  # replay the draws forward made
    u = to_numpy(layer.random_uniform(y.shape))
    np.testing.assert_allclose(y, _stochastic_reference(x, (3, 3), (2, 2), u))
    check_gradient(text, [x], stepsize=1e-4, threshold=1e-2, backend=backend)

    (y,) = run(text, [x], phase=pb.TEST, backend=backend)
    for i, j in np.ndindex(*y.shape[2:]):
        window = x[:, :, i * 2 : i * 2 + 3, j * 2 : j * 2 + 3]
        expected = (window**2).sum((2, 3)) / window.sum((2, 3))
        np.testing.assert_allclose(y[:, :, i, j], expected)
    check_gradient(text, [x], stepsize=1e-4, threshold=1e-2, phase=pb.TEST, backend=backend)


@pytest.mark.parametrize(
    "params,message",
    [
        ("kernel_size: 2 kernel_h: 2 kernel_w: 2", "kernel_size, or both"),
        ("kernel_h: 2", "kernel_size, or both"),
        ("global_pooling: true kernel_size: 2", "whole plane"),
        ("kernel_size: 2 pad: 2", "smaller than kernel"),
        ("pool: STOCHASTIC kernel_size: 3 pad: 1", "MAX and AVE"),
        ("kernel_size: 2 stride: 2 stride_h: 1 stride_w: 1", "stride"),
    ],
)
def test_pooling_config_errors(params, message):
    with pytest.raises(ConfigError, match=message):
        run(f'type: "Pooling" pooling_param {{ {params} }}', [np.zeros((1, 1, 5, 5))])


def test_pooling_mask_only_for_max_and_4d_only():
    with pytest.raises(ConfigError, match="second top"):
        run(
            'type: "Pooling" pooling_param { pool: AVE kernel_size: 2 }',
            [np.zeros((1, 1, 4, 4))],
            num_tops=2,
        )
    with pytest.raises(ShapeError, match="num, channels"):
        run('type: "Pooling" pooling_param { kernel_size: 2 }', [np.zeros((1, 4, 4))])


# -- SPP ---------------------------------------------------------------------------------
def _spp_reference(x, height, method):
    levels = []
    for level in range(height):
        bins = 2**level
        kernel = [math.ceil(s / bins) for s in x.shape[2:]]
        pad = [(k * bins - s + 1) // 2 for k, s in zip(kernel, x.shape[2:])]
        out, _ = pool_reference(x, kernel, kernel, pad, method)
        levels.append(out.reshape(x.shape[0], -1))
    return np.concatenate(levels, axis=1)


@pytest.mark.parametrize("method", ["MAX", "AVE"])
def test_spp_forward_and_gradient(backend, method):
    x = distinct(2, 3, 9, 7)
    text = f'type: "SPP" spp_param {{ pyramid_height: 3 pool: {method} }}'
    (y,) = run(text, [x], backend=backend)
    assert y.shape == (2, 3 * (1 + 4 + 16))
    # Averages of values around 0 can cancel to ~1e-17, where summation order decides the digits.
    np.testing.assert_allclose(y, _spp_reference(x, 3, method), rtol=1e-7, atol=1e-15)
    check_gradient(text, [x], stepsize=1e-4, threshold=1e-2, backend=backend)


def test_spp_single_level_keeps_pooling_shape():
    x = RNG.normal(size=(2, 3, 4, 5))
    (y,) = run('type: "SPP" spp_param { pyramid_height: 1 }', [x])
    np.testing.assert_array_equal(y, x.max(axis=(2, 3), keepdims=True))


# -- LRN ---------------------------------------------------------------------------------
def lrn_reference(x, size, alpha, beta, k, across):
    _, c, height, width = x.shape
    half = (size - 1) // 2
    total = np.zeros_like(x)
    if across:
        for ch in range(c):
            total[:, ch] = (x[:, max(0, ch - half) : ch + half + 1] ** 2).sum(1)
        return x * (k + alpha / size * total) ** -beta
    for i, j in np.ndindex(height, width):
        window = x[:, :, max(0, i - half) : i + half + 1, max(0, j - half) : j + half + 1]
        total[:, :, i, j] = (window**2).sum((2, 3))
    return x * (1 + alpha / size**2 * total) ** -beta


@pytest.mark.parametrize(
    "size,alpha,beta,k,region",
    [
        (5, 0.5, 0.75, 2.0, "ACROSS_CHANNELS"),
        (3, 1.5, 0.5, 1.0, "ACROSS_CHANNELS"),
        (3, 0.75, 0.625, 9.0, "WITHIN_CHANNEL"),
        (5, 2.0, 0.75, 1.0, "WITHIN_CHANNEL"),
    ],
)
def test_lrn_forward_and_gradient(backend, size, alpha, beta, k, region):
    x = RNG.normal(size=(2, 7, 4, 5))
    text = (
        f'type: "LRN" lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} '
        f"k: {k} norm_region: {region} }}"
    )
    (y,) = run(text, [x], backend=backend)
    expected = lrn_reference(x, size, alpha, beta, k, region == "ACROSS_CHANNELS")
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    check_gradient(text, [x], threshold=1e-2, backend=backend)


def test_lrn_in_place_matches_out_of_place():
    x = RNG.normal(size=(2, 5, 3, 3))
    text = 'type: "LRN" lrn_param { local_size: 3 alpha: 2 }'
    layer, bottom, top = build(text, [x])
    (y,) = forward(layer, bottom, top)
    dy = RNG.normal(size=y.shape)
    top[0].diff = dy.copy()
    layer.backward(top, [True], bottom)
    expected = bottom[0].diff.copy()

    layer, bottom, _ = build(text, [x])
    layer.forward(bottom, bottom)
    np.testing.assert_allclose(bottom[0].data, y)
    bottom[0].diff = dy.copy()
    layer.backward(bottom, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, expected)


def test_lrn_even_size_is_refused():
    with pytest.raises(ConfigError, match="odd"):
        run('type: "LRN" lrn_param { local_size: 4 }', [np.zeros((1, 4, 2, 2))])


# -- Crop --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "params,index",
    [
        ("", (slice(None), slice(None), slice(0, 3), slice(0, 4))),
        ("offset: 1", (slice(None), slice(None), slice(1, 4), slice(1, 5))),
        (
            "axis: 1 offset: 1 offset: 2 offset: 1",
            (slice(None), slice(1, 3), slice(2, 5), slice(1, 5)),
        ),
        ("axis: -1 offset: 1", (slice(None), slice(None), slice(None), slice(1, 5))),
    ],
)
def test_crop_forward_and_gradient(backend, params, index):
    x = RNG.normal(size=(2, 3, 6, 5))
    reference = np.zeros((1, 2, 3, 4)) if "axis: 1" in params else np.zeros((2, 3, 3, 4))
    if "axis: -1" in params:
        reference = np.zeros((2, 3, 6, 4))
    text = f'type: "Crop" crop_param {{ {params} }}'
    (y,) = run(text, [x, reference], backend=backend)
    np.testing.assert_array_equal(y, x[index])
    check_gradient(text, [x, reference], check_bottoms=[0], backend=backend)


def test_crop_errors():
    x, small = np.zeros((2, 3, 6, 5)), np.zeros((2, 3, 3, 4))
    with pytest.raises(ConfigError, match="one per cropped axis"):
        run('type: "Crop" crop_param { offset: 1 offset: 2 offset: 3 }', [x, small])
    with pytest.raises(ShapeError, match="cannot crop"):
        run('type: "Crop" crop_param { offset: 3 }', [x, small])


def test_pooling_reads_the_forks_ceil_mode_alias():
    x = np.arange(2 * 5 * 5, dtype=np.float64).reshape(1, 2, 5, 5)
    base = 'type: "Pooling" pooling_param { pool: MAX kernel_size: 2 stride: 2 %s }'
    (ceil,) = run(base % "ceil_mode: true", [x])
    (floor,) = run(base % "ceil_mode: false", [x])
    (caffe_floor,) = run(base % "round_mode: FLOOR", [x])
    assert ceil.shape == (1, 2, 3, 3) and floor.shape == (1, 2, 2, 2)
    np.testing.assert_array_equal(floor, caffe_floor)
    with pytest.raises(ConfigError, match="not both"):
        run(base % "ceil_mode: true round_mode: CEIL", [x])


@pytest.mark.parametrize("kernel,stride,pad,ceil", POOL_CASES)
def test_max_pooling_in_batch_chunks_routes_each_gradient_to_its_mask(
    monkeypatch, kernel, stride, pad, ceil
):
    monkeypatch.setattr(pooling, "POOL_CHUNK", 100)  # one item per chunk, on every worker
    x = distinct(5, 2, 9, 10)
    text = _pool_text("MAX", kernel, stride, pad, ceil)
    layer, bottom, top = build(text, [x], num_tops=2)
    assert len(layer.chunks) >= 4
    y, mask = forward(layer, bottom, top)
    ref, ref_mask = pool_reference(x, kernel, stride, pad, "MAX", ceil)
    np.testing.assert_array_equal(y, ref)
    np.testing.assert_array_equal(mask, ref_mask)
    dy = RNG.normal(size=ref.shape)
    expected = np.zeros((5 * 2, 9 * 10))
    np.add.at(
        expected, (np.arange(10)[:, None], ref_mask.reshape(10, -1).astype(int)), dy.reshape(10, -1)
    )
    top[0].diff[...] = dy
    layer.backward(top, [True], bottom)
    np.testing.assert_allclose(bottom[0].diff, expected.reshape(x.shape), rtol=1e-12)


@pytest.mark.parametrize("kernel,stride,pad,ceil", POOL_CASES)
def test_ave_pooling_in_batch_chunks(monkeypatch, kernel, stride, pad, ceil):
    monkeypatch.setattr(pooling, "POOL_CHUNK", 100)  # one item per chunk, on every worker
    x = RNG.normal(size=(5, 2, 9, 10))
    text = _pool_text("AVE", kernel, stride, pad, ceil)
    layer, bottom, top = build(text, [x])
    assert len(layer.chunks) >= 4
    (y,) = forward(layer, bottom, top)
    ref, _ = pool_reference(x, kernel, stride, pad, "AVE", ceil)
    np.testing.assert_allclose(y, ref, rtol=1e-12)
    check_gradient(text, [x])
