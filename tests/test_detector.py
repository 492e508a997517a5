"""netforge.Detector (pycaffe's caffe.Detector): window crops, R-CNN context padding worked
out by hand, detect_windows against a hand-done forward, and selective search's error."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from PIL import Image

import netforge
from netforge.errors import ConfigError
from tests.test_classifier import MEAN, reference_prob, tiny_deploy
from tests.test_pycaffe_io import reference_resize


@pytest.fixture
def scene(tmp_path):
    """A 20x20 RGB image file (8-bit, so load_image returns it exactly /255)."""
    pixels = np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "scene.png")
    return tmp_path / "scene.png", pixels / 255.0


def detector(tmp_path, context_pad=None, batch=2, **net_options):
    deploy, weights, weight, bias = tiny_deploy(tmp_path, batch=batch, size=8)
    made = netforge.Detector(
        deploy,
        weights,
        mean=MEAN,
        raw_scale=255.0,
        input_scale=0.5,
        channel_swap=(2, 1, 0),
        context_pad=context_pad,
        **net_options,
    )
    return made, weight, bias


def test_detect_windows_classifies_each_warped_window(tmp_path, scene, backend):
    path, image = scene
    det, weight, bias = detector(tmp_path, backend=backend)
    windows = np.array([[0, 0, 10, 10], [5, 2, 17, 19], [3, 4, 7, 9]])
    got = det.detect_windows([(str(path), windows[:2]), (str(path), windows[2:])])
    assert [d["filename"] for d in got] == [str(path)] * 3
    np.testing.assert_array_equal(np.stack([d["window"] for d in got]), windows)
    for d, (y0, x0, y1, x1) in zip(got, windows):
        warped = reference_resize(image[y0:y1, x0:x1], 8, 8)
        np.testing.assert_allclose(
            d["prediction"], reference_prob(warped, weight, bias), rtol=1e-4, atol=1e-6
        )


def test_context_padding_inside_the_image(tmp_path, scene):
    # crop 8, pad 2: scale 8 / 4 = 2 about the centre (8, 8) of window (4, 4, 11, 11):
    # box round(8 -+ 2 * 4) = (0, 0, 16, 16), 17 wide, fully inside: all of it, warped to 8x8.
    _, image = scene
    det, _, _ = detector(tmp_path, context_pad=2)
    got = det.crop(image.astype(np.float32), np.array([4, 4, 11, 11]))
    np.testing.assert_allclose(got, reference_resize(image[0:16, 0:16], 8, 8), rtol=1e-5)


def test_context_padding_at_the_border_fills_with_the_mean(tmp_path, scene):
    # Window (0, 0, 7, 7): centre (4, 4), box (-4, -4, 12, 12), 17 wide -> 8/17 per pixel.
    # Outside: round(4 * 8 / 17) = 2 pixels of mean; inside: clip (0, 0, 12, 12), 13 wide ->
    # round(13 * 8 / 17) = 6 pixels, image[0:12, 0:12] warped to 6x6 at [2:8, 2:8].
    _, image = scene
    det, _, _ = detector(tmp_path, context_pad=2)
    got = det.crop(image.astype(np.float32), np.array([0, 0, 7, 7]))
    image_space_mean = MEAN[::-1] / 255.0  # BGR mean back to RGB, before raw_scale
    expected = np.broadcast_to(image_space_mean, (8, 8, 3)).copy()
    expected[2:8, 2:8] = reference_resize(image[0:12, 0:12], 6, 6)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_detect_windows_with_context(tmp_path, scene):
    path, image = scene
    det, weight, bias = detector(tmp_path, context_pad=2, batch=1)
    (found,) = det.detect_windows([(str(path), [[4, 4, 11, 11]])])
    expected = reference_prob(reference_resize(image[0:16, 0:16], 8, 8), weight, bias)
    np.testing.assert_allclose(found["prediction"], expected, rtol=1e-4, atol=1e-6)


def test_selective_search_names_its_external_tool(tmp_path, scene, monkeypatch):
    path, _ = scene
    det, _, _ = detector(tmp_path)
    monkeypatch.setitem(sys.modules, "selective_search_ijcv_with_python", None)
    with pytest.raises(ConfigError, match="MATLAB"):
        det.detect_selective_search([str(path)])
