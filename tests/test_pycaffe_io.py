"""netforge.io (pycaffe's caffe.io): the intent of BVLC python/caffe/test/test_io.py, plus the
Transformer, resize_image, oversample and load_image against float64 numpy references."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

import netforge
from netforge import io
from netforge.errors import ConfigError, ShapeError
from netforge.proto import caffe_pb2, pb


def reference_resize(image, out_h, out_w):
    """scikit-image's order-1 resize as pycaffe calls it (mode='constant'), pixel by pixel in
    float64: half-pixel centres, neighbours beyond the edge read the image's minimum."""
    h, w, c = image.shape
    low = image.min()

    def pixel(y, x):
        return image[y, x] if 0 <= y < h and 0 <= x < w else np.full(c, low)

    out = np.zeros((out_h, out_w, c))
    for i in range(out_h):
        y = (i + 0.5) * h / out_h - 0.5
        y0 = int(np.floor(y))
        for j in range(out_w):
            x = (j + 0.5) * w / out_w - 0.5
            x0 = int(np.floor(x))
            fy, fx = y - y0, x - x0
            out[i, j] = (
                pixel(y0, x0) * (1 - fy) * (1 - fx)
                + pixel(y0, x0 + 1) * (1 - fy) * fx
                + pixel(y0 + 1, x0) * fy * (1 - fx)
                + pixel(y0 + 1, x0 + 1) * fy * fx
            )
    return out


# -- BlobProto (test_io.py's TestBlobProtoToArray) ---------------------------------------------
def test_blobproto_legacy_and_new_shapes():
    data = np.arange(100.0).reshape(10, 10)
    old = caffe_pb2.BlobProto()
    old.data.extend(data.ravel())
    old.num, old.channels, old.height, old.width = 1, 1, 10, 10
    assert io.blobproto_to_array(old).shape == (1, 1, 10, 10)
    new = caffe_pb2.BlobProto()
    new.data.extend(data.ravel())
    new.shape.dim.extend(data.shape)
    got = io.blobproto_to_array(new)
    assert got.dtype == np.float64  # as pycaffe's np.array(blob.data)
    np.testing.assert_array_equal(got, data)


def test_blobproto_without_shape_is_a_scalar_or_a_value_error():
    scalar = caffe_pb2.BlobProto()
    scalar.data.append(123)
    assert io.blobproto_to_array(scalar) == 123
    no_shape = caffe_pb2.BlobProto()
    no_shape.data.extend(np.zeros(100))
    with pytest.raises(ValueError):
        io.blobproto_to_array(no_shape)
    with pytest.raises(ShapeError):  # the same error, as netforge's type
        io.blobproto_to_array(no_shape)


def test_array_to_blobproto_round_trip_with_diff_and_vectors():
    rng = np.random.default_rng(0)
    arr, diff = rng.random((2, 3, 4)), rng.random((2, 3, 4))
    blob = io.array_to_blobproto(arr, diff)
    assert list(blob.shape.dim) == [2, 3, 4] and len(blob.double_data) == 0
    np.testing.assert_array_equal(io.blobproto_to_array(blob), arr.astype(np.float32))
    np.testing.assert_array_equal(
        io.blobproto_to_array(blob, return_diff=True), diff.astype(np.float32)
    )
    arrays = [rng.random((3,)), rng.random((1, 2, 2, 2)), np.ones(())]
    text = io.arraylist_to_blobprotovector_str(arrays)
    vec = caffe_pb2.BlobProtoVector.FromString(text)
    assert len(vec.blobs) == 3
    back = io.blobprotovector_str_to_arraylist(text)
    for got, want in zip(back, arrays):
        np.testing.assert_array_equal(got, want.astype(np.float32))


def test_double_data_blobs_are_read():
    blob = pb.BlobProto()
    blob.double_data.extend([0.1, 0.2])
    blob.shape.dim.append(2)
    np.testing.assert_array_equal(io.blobproto_to_array(blob), [0.1, 0.2])


# -- Datum (test_io.py's TestArrayToDatum) -----------------------------------------------------
def test_array_to_datum_label_and_types():
    with_label = io.array_to_datum(np.ones((10, 10, 3)), label=1)
    without = io.array_to_datum(np.ones((10, 10, 3)))
    assert len(with_label.SerializeToString()) > len(without.SerializeToString())
    assert not without.HasField("label") and not without.HasField("encoded")
    pixels = np.random.default_rng(1).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    datum = io.array_to_datum(pixels, 7)
    assert datum.data == pixels.tobytes() and datum.label == 7 and not datum.float_data
    back = io.datum_to_array(datum)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, pixels)
    floats = pixels / 7.0
    back = io.datum_to_array(io.array_to_datum(floats))
    assert back.dtype == np.float64
    np.testing.assert_allclose(back, floats, rtol=1e-7)
    with pytest.raises(ValueError):
        io.array_to_datum(np.ones((4, 4)))


# -- Transformer -------------------------------------------------------------------------------
def transformer(shape=(2, 3, 5, 4)):
    t = io.Transformer({"data": shape})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", np.array([10.0, 20.0, 30.0]))
    t.set_input_scale("data", 0.5)
    return t


def test_preprocess_and_deprocess_match_the_formula():
    rng = np.random.default_rng(2)
    image = rng.random((5, 4, 3))
    t = transformer()
    before = image.copy()
    got = t.preprocess("data", image)
    expected = (image.transpose(2, 0, 1)[[2, 1, 0]] * 255.0 - [[[10.0]], [[20.0]], [[30.0]]]) * 0.5
    assert got.dtype == np.float32 and got.shape == (3, 5, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(image, before)  # the caller's array is left alone
    np.testing.assert_allclose(t.deprocess("data", got[None]), image, rtol=1e-5, atol=1e-6)


def test_preprocess_resizes_to_the_blob_first():
    image = np.random.default_rng(3).random((7, 9, 3))
    got = io.Transformer({"data": (1, 3, 5, 4)}).preprocess("data", image)
    np.testing.assert_allclose(got, reference_resize(image, 5, 4), rtol=1e-5, atol=1e-6)


def test_set_mean_resizes_an_elementwise_mean():
    mean = np.random.default_rng(4).random((3, 8, 6)) * 100
    t = transformer()
    t.set_mean("data", mean)
    low, high = mean.min(), mean.max()
    expected = reference_resize(((mean - low) / (high - low)).transpose(1, 2, 0), 5, 4)
    np.testing.assert_allclose(
        t.mean["data"], expected.transpose(2, 0, 1) * (high - low) + low, rtol=1e-5
    )


def test_transformer_checks_as_pycaffe():
    t = io.Transformer({"data": (1, 3, 5, 4)})
    with pytest.raises(ConfigError, match="not one of the net inputs"):
        t.set_raw_scale("label", 2.0)
    with pytest.raises(ConfigError, match="3 axes"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(ConfigError, match="one entry per channel"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="channels"):
        t.set_mean("data", np.zeros(4))
    with pytest.raises(ValueError):
        t.set_mean("data", np.zeros((1, 3, 5, 4)))


# -- resize_image ------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(3, 5), (7, 4), (5, 6), (11, 13)])
def test_resize_is_skimage_order_1_with_constant_border(size):
    image = np.random.default_rng(5).random((5, 6, 3)) * 50 + 3
    got = io.resize_image(image.astype(np.float32), size)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, reference_resize(image, *size), rtol=1e-5, atol=1e-4)


def test_resize_other_channel_counts_map_corners_as_ndimage_zoom():
    image = np.random.default_rng(6).random((4, 5, 2))
    got = io.resize_image(image, (7, 3))
    expected = np.zeros((7, 3, 2))
    for i in range(7):
        y = i * 3 / 6
        y0, fy = int(y), y - int(y)
        for j in range(3):
            x = j * 4 / 2
            x0, fx = int(x), x - int(x)
            y1, x1 = min(y0 + 1, 3), min(x0 + 1, 4)
            expected[i, j] = (
                image[y0, x0] * (1 - fy) * (1 - fx)
                + image[y0, x1] * (1 - fy) * fx
                + image[y1, x0] * fy * (1 - fx)
                + image[y1, x1] * fy * fx
            )
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_resize_nearest_and_constant_images():
    image = np.arange(12.0).reshape(2, 6, 1)
    got = io.resize_image(image, (4, 3), interp_order=0)
    # centres (i + 0.5) * in / out - 0.5, rounded: rows 0, 0, 1, 1; columns 1, 3, 5
    np.testing.assert_array_equal(got[..., 0], image[[0, 0, 1, 1]][:, [1, 3, 5], 0])
    flat = io.resize_image(np.full((3, 3, 3), 0.25), (5, 2))
    assert flat.shape == (5, 2, 3) and np.all(flat == 0.25)


def test_spline_orders_say_they_need_scipy(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(ConfigError, match="pip install scipy"):
        io.resize_image(np.random.default_rng(7).random((4, 4, 3)), (6, 6), interp_order=3)


# -- oversample --------------------------------------------------------------------------------
def test_oversample_is_corners_centre_and_mirrors():
    rng = np.random.default_rng(8)
    images = rng.random((2, 7, 9, 3)).astype(np.float32)
    got = io.oversample(list(images), (4, 5))
    assert got.shape == (20, 4, 5, 3)
    for n, im in enumerate(images):
        # corners, then the centre at (int(7/2 - 4/2), int(9/2 - 5/2)) = (1, 2)
        crops = [im[0:4, 0:5], im[0:4, 4:9], im[3:7, 0:5], im[3:7, 4:9], im[1:5, 2:7]]
        crops += [c[:, ::-1] for c in crops]
        np.testing.assert_array_equal(got[10 * n : 10 * n + 10], np.stack(crops))
    with pytest.raises(ValueError, match="one size"):
        io.oversample([images[0], images[1][:6]], (4, 5))


# -- load_image --------------------------------------------------------------------------------
def test_load_image_colour_grey_alpha_and_16_bit(tmp_path):
    rng = np.random.default_rng(9)
    rgba = rng.integers(0, 256, (5, 4, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = io.load_image(tmp_path / "rgba.png")
    assert got.dtype == np.float32 and got.shape == (5, 4, 3)
    np.testing.assert_allclose(got, rgba[:, :, :3] / 255.0, rtol=1e-6)
    grey = io.load_image(tmp_path / "rgba.png", color=False)
    weights = np.array([0.2125, 0.7154, 0.0721])
    np.testing.assert_allclose(grey[:, :, 0], rgba[:, :, :3] / 255.0 @ weights, rtol=1e-5)
    assert grey.shape == (5, 4, 1)

    luminance = rng.integers(0, 256, (3, 6), dtype=np.uint8)
    Image.fromarray(luminance, "L").save(tmp_path / "l.png")
    tiled = io.load_image(tmp_path / "l.png")
    assert tiled.shape == (3, 6, 3)
    np.testing.assert_allclose(tiled, np.repeat(luminance[:, :, None] / 255.0, 3, 2), rtol=1e-6)
    assert io.load_image(tmp_path / "l.png", color=False).shape == (3, 6, 1)

    deep = rng.integers(0, 65536, (4, 4), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    np.testing.assert_allclose(
        io.load_image(tmp_path / "deep.png", color=False)[:, :, 0], deep / 65535.0, rtol=1e-6
    )


def test_caffe_pb2_is_the_generated_schema():
    from netforge.proto import caffe_pb2 as imported

    assert imported is caffe_pb2 and caffe_pb2.NetParameter is pb.NetParameter
    assert caffe_pb2.Phase.Value("TEST") == netforge.TEST
    assert netforge.io is io
