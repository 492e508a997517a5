"""Images, resizing, list files and the HDF5 converter."""

from __future__ import annotations

import io

import h5py
import numpy as np
import pytest
from PIL import Image

from netforge.data import convert as conv
from netforge.data.datum import decode_image, encode_image, resize
from netforge.data.listfile import Entry, parse_line, read_list
from netforge.errors import DataError
from tests.harness import build


def png(array):
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def test_resize_is_opencv_inter_linear():
    up = resize(np.array([[[0, 100]]], np.uint8), 1, 4)
    np.testing.assert_array_equal(up, [[[0, 25, 75, 100]]])
    down = resize(np.array([[[0, 10, 20, 30]]], np.float32), 1, 2)
    np.testing.assert_allclose(down, [[[5, 25]]])
    rows = resize(np.array([[[0], [80]]], np.uint8), 3, 1)  # pos -1/6, 1/2, 7/6 -> clamped
    np.testing.assert_array_equal(rows[0, :, 0], [0, 40, 80])


def test_decode_channels_and_colour_requests():
    rgba = np.random.default_rng(0).integers(0, 256, (2, 3, 4), dtype=np.uint8)
    out = decode_image(png(rgba))
    np.testing.assert_array_equal(out, rgba[:, :, [2, 1, 0, 3]].transpose(2, 0, 1))
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert decode_image(png(gray)).shape == (1, 2, 3)
    colour = decode_image(png(gray), color=True)
    np.testing.assert_array_equal(colour, np.stack([gray] * 3))
    assert decode_image(png(rgba[:, :, :3]), color=False).shape == (1, 2, 3)
    with pytest.raises(DataError, match="cannot decode"):
        decode_image(b"garbage")
    bgr = np.random.default_rng(1).integers(0, 256, (3, 4, 5), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(encode_image(bgr, "png")), bgr)


def test_list_lines():
    assert parse_line("dir/a b.jpg 7", "x") == Entry("dir/a b.jpg", 7, ())
    assert parse_line("a.jpg 1 0 1", "x") == Entry("a.jpg", 0, (1.0, 0.0, 1.0))
    assert parse_line("a.jpg -0.5", "x") == Entry("a.jpg", 0, (-0.5,))
    with pytest.raises(DataError, match="list.txt:3"):
        parse_line("just-a-path.jpg", "list.txt:3")


def test_mixed_label_kinds_are_refused(tmp_path):
    (tmp_path / "l.txt").write_text("a.jpg 1\nb.jpg 1 2\n")
    with pytest.raises(DataError, match="mixes"):
        read_list(tmp_path / "l.txt")


@pytest.mark.parametrize("kind", ["images", "npy"])
def test_convert_hdf5_feeds_hdf5data(tmp_path, kind):
    rng = np.random.default_rng(5)
    lines, arrays = [], []
    for i in range(5):
        if kind == "images":
            rgb = rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(tmp_path / f"{i}.png")
            arrays.append(rgb[:, :, ::-1].transpose(2, 0, 1).astype(np.float64))
            lines.append(f"{i}.png {i} {i / 2}")
        else:
            array = rng.normal(size=(2, 3)).astype(np.float32)
            np.save(tmp_path / f"{i}.npy", array)
            arrays.append(array.astype(np.float64))
            lines.append(f"{i}.npy {i} {i / 2}")
    lines.append("missing.png 1 2")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    summary = conv.convert_hdf5(
        tmp_path, tmp_path / "list.txt", tmp_path / "out", rows_per_file=2, scale=0.5
    )
    assert summary.written == 5 and len(summary.skipped) == 1
    assert len(summary.outputs) == 4  # three files of <= 2 rows and the list
    with h5py.File(summary.outputs[0]) as f:
        assert f["data"].chunks is not None and f["data"].compression == "gzip"
    layer, _, top = build(
        f'type: "HDF5Data" top: "data" top: "label" hdf5_data_param {{ '
        f'source: "{tmp_path / "out" / "list.txt"}" batch_size: 5 }}',
        [],
        num_tops=2,
        dtype=np.float64,
    )
    layer.forward([], top)
    np.testing.assert_allclose(top[0].data, np.stack(arrays) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(top[1].data, [[i, i / 2] for i in range(5)])
