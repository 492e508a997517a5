"""netforge.Classifier (pycaffe's caffe.Classifier): predict against the net's forward done by
hand in float64 (resize, crops, mirrors, transformer steps, InnerProduct, softmax)."""

from __future__ import annotations

import numpy as np
import pytest

import netforge
from netforge.errors import ShapeError
from tests.test_pycaffe_io import reference_resize

MEAN = np.array([10.0, 20.0, 30.0])  # in the net's (BGR) channel order


def tiny_deploy(tmp_path, batch, size, seed=0):
    """An Input -> InnerProduct(5) -> Softmax deploy net with random weights saved beside
    it; returns (prototxt, caffemodel, weight, bias) with the parameters in float64."""
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(
        f"""
        name: "tiny"
        layer {{ name: "data" type: "Input" top: "data"
                input_param {{ shape {{ dim: {batch} dim: 3 dim: {size} dim: {size} }} }} }}
        layer {{ name: "fc" type: "InnerProduct" bottom: "data" top: "fc"
                inner_product_param {{ num_output: 5 }} }}
        layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}
        """
    )
    net = netforge.Net(str(deploy), netforge.TEST)
    rng = np.random.default_rng(seed)
    weight = (rng.standard_normal((5, 3 * size * size)) * 0.02).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    net.params["fc"][0].data = weight
    net.params["fc"][1].data = bias
    net.save(str(tmp_path / "tiny.caffemodel"))
    return str(deploy), str(tmp_path / "tiny.caffemodel"), weight.astype(float), bias.astype(float)


def reference_prob(crop, weight, bias, mean=MEAN, raw_scale=255.0, input_scale=0.5):
    """The net on one (H, W, 3) RGB crop: CHW, BGR, *raw_scale, -mean, *input_scale, fc,
    softmax."""
    chw = crop.transpose(2, 0, 1)[[2, 1, 0]] * raw_scale
    x = chw - np.broadcast_to(mean.reshape(3, -1, 1) if mean.ndim == 1 else mean, chw.shape)
    logits = weight @ (x * input_scale).ravel() + bias
    e = np.exp(logits - logits.max())
    return e / e.sum()


@pytest.fixture
def images():
    rng = np.random.default_rng(1)
    return [rng.random((9, 7, 3)), rng.random((6, 10, 3)), rng.random((8, 8, 3))]


def make(tmp_path, **kwargs):
    """A Classifier of a tiny deploy (batch 2, 3x4x4 input) with pycaffe's usual options."""
    deploy, weights, weight, bias = tiny_deploy(tmp_path, batch=2, size=4)
    options = dict(mean=MEAN, raw_scale=255.0, input_scale=0.5, channel_swap=(2, 1, 0))
    options.update(kwargs)
    return netforge.Classifier(deploy, weights, **options), weight, bias


def test_predict_centre_crop(tmp_path, images, backend):
    classifier, weight, bias = make(tmp_path, image_dims=(6, 7), backend=backend)
    got = classifier.predict(images, oversample=False)
    expected = []
    for im in images:
        resized = reference_resize(im, 6, 7)
        # centre offsets int(6/2 - 4/2), int(7/2 - 4/2) = 1, 1
        expected.append(reference_prob(resized[1:5, 1:5], weight, bias))
    assert got.shape == (3, 5)  # three images through a batch-2 net: the padding is dropped
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_predict_averages_ten_crops(tmp_path, images, backend):
    classifier, weight, bias = make(tmp_path, image_dims=(6, 7), backend=backend)
    got = classifier.predict(images)
    expected = []
    for im in images:
        resized = reference_resize(im, 6, 7)
        corners = [(0, 0), (0, 3), (2, 0), (2, 3), (1, 1)]
        crops = [resized[t : t + 4, x : x + 4] for t, x in corners]
        crops += [c[:, ::-1] for c in crops]
        expected.append(np.mean([reference_prob(c, weight, bias) for c in crops], axis=0))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_default_image_dims_and_an_elementwise_mean(tmp_path, images):
    mean = np.random.default_rng(2).random((3, 6, 6)) * 50 + 5
    classifier, weight, bias = make(tmp_path, mean=mean)
    np.testing.assert_array_equal(classifier.image_dims, [4, 4])  # the net's input
    low, high = mean.min(), mean.max()
    resized_mean = reference_resize(((mean - low) / (high - low)).transpose(1, 2, 0), 4, 4)
    net_mean = resized_mean.transpose(2, 0, 1) * (high - low) + low
    got = classifier.predict(images[:1], oversample=False)
    expected = reference_prob(reference_resize(images[0], 4, 4), weight, bias, mean=net_mean)
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-6)


def test_image_dims_smaller_than_the_input_is_an_error(tmp_path, images):
    classifier, _, _ = make(tmp_path, image_dims=(3, 8))
    with pytest.raises(ShapeError, match="image_dims"):
        classifier.predict(images)
