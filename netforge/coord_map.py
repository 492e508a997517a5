"""pycaffe's ``caffe.coord_map``: how the coordinates of one NetSpec top map onto another's,
through the spatial layers between them, and the Crop layer that aligns them (as FCN's nets
crop their upsampled scores to the input; BVLC ``python/caffe/coord_map.py``).

A map is ``(axis, a, b)``: output coordinate ``a * x + b`` for input coordinate ``x`` along
the spatial axes from ``axis`` on (``a`` and ``b`` arrays, one entry per axis). Convolution,
Pooling and Im2col map ``(pad - (k - 1) / 2) / stride`` with scale ``1 / stride``
(``k`` the dilated kernel extent), Deconvolution the inverse, Crop shifts by its offset, and
the element-wise layers in :data:`PASS_THROUGH_LAYERS` keep coordinates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from netforge.errors import ConfigError
from netforge.net_spec import Function, Top
from netforge.net_spec import layers as L

PASS_THROUGH_LAYERS = [
    "AbsVal",
    "BatchNorm",
    "Bias",
    "BNLL",
    "Dropout",
    "Eltwise",
    "ELU",
    "Log",
    "LRN",
    "Exp",
    "MVN",
    "Power",
    "ReLU",
    "PReLU",
    "Scale",
    "Sigmoid",
    "Split",
    "TanH",
    "Threshold",
]

Map = tuple[Any, Any, Any]


class UndefinedMapException(Exception):
    """A layer with no coordinate mapping (InnerProduct...); the walk stops there."""


class AxisMismatchException(ConfigError):
    """Two mappings along different axes cannot be composed."""


class UnconnectedTopsError(ConfigError, RuntimeError):
    """The tops share no ancestor reachable through spatial layers (pycaffe: RuntimeError)."""


class CropError(ConfigError, AssertionError):
    """A crop pycaffe refuses with an assertion: scales differ, or the offset is negative or
    fractional."""


def conv_params(fn: Function) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """(axis, stride, dilated kernel extent, pad) of a Convolution, Deconvolution, Im2col
    or Pooling function, from its keywords or its nested ``convolution_param`` /
    ``pooling_param``, with Caffe's defaults."""
    params = fn.params.get("convolution_param", fn.params.get("pooling_param", fn.params))
    legacy = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"} & set(params)
    if legacy:
        raise ConfigError(
            f"{fn.type_name}: cropping does not support the legacy {sorted(legacy)} fields; "
            "give kernel_size, stride and pad (lists for each axis)"
        )
    if "kernel_size" not in params:
        raise ConfigError(f"{fn.type_name}: coord_map needs its kernel_size")
    axis = params.get("axis", 1)
    kernel = np.array(params["kernel_size"], ndmin=1)
    dilation = np.array(params.get("dilation", 1), ndmin=1)
    return (
        axis,
        np.array(params.get("stride", 1), ndmin=1),
        (kernel - 1) * dilation + 1,
        np.array(params.get("pad", 0), ndmin=1),
    )


def crop_params(fn: Function) -> tuple[int, np.ndarray]:
    """(axis, offset) of a Crop function, with Caffe's defaults (axis 2, offset 0)."""
    params = fn.params.get("crop_param", fn.params)
    return params.get("axis", 2), np.array(params.get("offset", 0), ndmin=1)


def coord_map(fn: Function) -> Map:
    """The coordinate map of one layer function: (axis, scale, shift); pass-through layers
    give (None, 1, 0), which composes with any axis."""
    if fn.type_name in ("Convolution", "Pooling", "Im2col"):
        axis, stride, ks, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (ks - 1) / 2) / stride
    if fn.type_name == "Deconvolution":
        axis, stride, ks, pad = conv_params(fn)
        return axis, stride, (ks - 1) / 2 - pad
    if fn.type_name in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if fn.type_name == "Crop":
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset  # axis - 1: the last axis that is not a coordinate
    raise UndefinedMapException(fn.type_name)


def compose(base_map: Map, next_map: Map) -> Map:
    """``base_map`` after ``next_map``: scales multiply, the next shift is scaled by the
    base scale."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is None:
        ax = ax2
    elif ax2 is None or ax1 == ax2:
        ax = ax1
    else:
        raise AxisMismatchException(f"cannot compose coordinate maps on axes {ax1} and {ax2}")
    return ax, a1 * a2, a1 * b2 + b1


def inverse(coord_map: Map) -> Map:
    """The inverse map (the backward mapping of coordinates)."""
    ax, a, b = coord_map
    return ax, 1 / a, -b / a


def _bottoms(top: Top) -> tuple[Top, ...]:
    """The bottoms a walk follows: all of a layer's, but only the first (cropped) one of a
    Crop, whose second bottom gives only a size."""
    bottoms = top.fn.inputs
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def coord_map_from_to(top_from: Top, top_to: Top) -> Map:
    """The map from ``top_from``'s coordinates to ``top_to``'s: walk back from each to a
    common ancestor, composing the maps on the way, then invert the ``from`` side."""
    from_maps = {top_from: (None, 1, 0)}
    frontier = {top_from}
    while frontier:
        top = frontier.pop()
        try:
            for bottom in _bottoms(top):
                from_maps[bottom] = compose(from_maps[top], coord_map(top.fn))
                frontier.add(bottom)
        except UndefinedMapException:
            pass
    to_maps = {top_to: (None, 1, 0)}
    frontier = {top_to}
    while frontier:
        top = frontier.pop()
        if top in from_maps:
            return compose(to_maps[top], inverse(from_maps[top]))
        try:
            for bottom in _bottoms(top):
                to_maps[bottom] = compose(to_maps[top], coord_map(top.fn))
                frontier.add(bottom)
        except UndefinedMapException:
            continue
    raise UnconnectedTopsError(
        "could not compute a map between the tops; are they connected by spatial layers?"
    )


def crop(top_from: Top, top_to: Top) -> Top:
    """A Crop layer (NetSpec top) that crops ``top_from`` to ``top_to``'s extent, with the
    axis and offsets the coordinate map between them gives."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    a, b = np.asarray(a), np.asarray(b)
    if not (a == 1).all():
        raise CropError(f"scale mismatch on crop (a = {a})")
    if not (b <= 0).all():
        raise CropError(f"cannot crop negative offset (b = {b})")
    if not (np.round(b) == b).all():
        raise CropError(f"cannot crop noninteger offset (b = {b})")
    offset = [int(v) for v in -np.round(b).astype(int)]
    return L.Crop(top_from, top_to, crop_param=dict(axis=ax + 1, offset=offset))
