"""WindowData: fg/bg sampling, warping, context padding and mirroring (Caffe's geometry)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from netforge.data.datum import resize
from netforge.errors import DataError
from tests.harness import build


def setup_files(tmp_path):
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (tmp_path / "windows.txt").write_text(
        "# 0\na.png\n3\n10\n12\n3\n"
        "2 0.9 2 2 5 5\n"  # foreground, class 2, a 4x4 box in the middle
        "1 0.1 0 0 3 3\n"  # background (label 0), a 4x4 box in the corner
        "3 0.45 1 1 2 2\n"  # between the thresholds: unused
    )
    return rgb[:, :, ::-1].transpose(2, 0, 1)  # uint8: Caffe warps 8-bit images (rounded)


def warp(image, height, width):
    return resize(image, height, width).astype(np.float64)


def window_layer(tmp_path, extra="", transform="crop_size: 8", seed=1, batch=4):
    text = (
        f'type: "WindowData" window_data_param {{ source: "{tmp_path / "windows.txt"}" '
        f'root_folder: "{tmp_path}/" batch_size: {batch} fg_fraction: 0.5 '
        f"fg_threshold: 0.7 bg_threshold: 0.3 {extra} }} "
        f"transform_param {{ {transform} }}"
    )
    layer, _, top = build(text, [], num_tops=2, dtype=np.float32, seed=seed)
    return layer, top


def test_warp_mode_samples_background_then_foreground(tmp_path):
    bgr = setup_files(tmp_path)
    layer, top = window_layer(tmp_path, "scale: 0.5", "crop_size: 8 mean_value: 10")
    layer.forward([], top)
    data, labels = top[0].data, top[1].data
    np.testing.assert_array_equal(labels, [0, 0, 2, 2])
    bg = (warp(bgr[:, 0:4, 0:4], 8, 8) - 10) * 0.5
    fg = (warp(bgr[:, 2:6, 2:6], 8, 8) - 10) * 0.5
    np.testing.assert_allclose(data[0], bg, atol=1e-4)
    np.testing.assert_allclose(data[3], fg, atol=1e-4)


def test_context_pad_clips_and_pads_with_zeros(tmp_path):
    bgr = setup_files(tmp_path)
    layer, top = window_layer(tmp_path, "context_pad: 2", "crop_size: 8 mean_value: 1")
    layer.forward([], top)
    # foreground box 2..5 with 2 px of context at scale 2 -> 0..8, inside the image
    np.testing.assert_allclose(top[0].data[2], warp(bgr[:, 0:9, 0:9], 8, 8) - 1, atol=1e-4)
    # background box 0..3 -> -2..6: 2 px clipped, warped to 6x6 at offset (2, 2), zeros around
    expected = np.zeros((3, 8, 8))
    expected[:, 2:, 2:] = warp(bgr[:, 0:7, 0:7], 6, 6) - 1
    np.testing.assert_allclose(top[0].data[0], expected, atol=1e-4)


def test_mirror_flips_and_state_resumes(tmp_path):
    bgr = setup_files(tmp_path)
    layer, top = window_layer(tmp_path, transform="crop_size: 8 mirror: true", batch=16)
    layer.forward([], top)
    fg = warp(bgr[:, 2:6, 2:6], 8, 8)
    fgs = top[0].data[8:]
    flipped = [np.allclose(x, fg[:, :, ::-1], atol=1e-4) for x in fgs]
    plain = [np.allclose(x, fg, atol=1e-4) for x in fgs]
    assert all(a or b for a, b in zip(flipped, plain)) and any(flipped) and any(plain)
    state = layer.get_state()
    layer.forward([], top)
    expected = top[0].data.copy()
    other, other_top = window_layer(
        tmp_path, transform="crop_size: 8 mirror: true", batch=16, seed=77
    )
    other.set_state(state)
    other.forward([], other_top)
    np.testing.assert_array_equal(other_top[0].data, expected)


def test_window_errors(tmp_path):
    setup_files(tmp_path)
    with pytest.raises(DataError, match="crop_size"):
        window_layer(tmp_path, transform="mirror: false")
    (tmp_path / "windows.txt").write_text("# 0\na.png\n3\n10\n")
    with pytest.raises(DataError, match="malformed"):
        window_layer(tmp_path)
