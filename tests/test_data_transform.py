"""The DataTransformer: Caffe's per-pixel formula, checked item by item in float64."""

from __future__ import annotations

import numpy as np
import pytest

from netforge.data.transform import Transformer
from netforge.errors import ConfigError, DataError
from netforge.proto import pb
from netforge.weights import write_mean


def param(**fields):
    p = pb.TransformationParameter()
    for name, value in fields.items():
        if name == "mean_value":
            p.mean_value.extend(value)
        else:
            setattr(p, name, value)
    return p


def reference(image, h_off, w_off, mirror, crop, mean, scale):
    """Caffe's loop: out[c, h, w'] = (x[c, h_off+h, w_off+w] - mean[...]) * scale."""
    c, height, width = image.shape
    ch, cw = (crop, crop) if crop else (height, width)
    out = np.empty((c, ch, cw))
    for h in range(ch):
        for w in range(cw):
            src = image[:, h_off + h, w_off + w].astype(np.float64)
            m = mean[:, h_off + h, w_off + w] if mean is not None and mean.ndim == 3 else mean
            value = (src - (0 if m is None else m)) * scale
            out[:, h, cw - 1 - w if mirror else w] = value
    return out


def draws_of(transformer, seed, sizes):
    return transformer.draw(np.random.default_rng(seed), np.asarray(sizes))


@pytest.mark.parametrize("phase", [pb.TRAIN, pb.TEST])
@pytest.mark.parametrize("mean_kind", ["none", "file", "value1", "values"])
def test_crop_mirror_mean_scale_match_caffe(tmp_path, phase, mean_kind):
    rng = np.random.default_rng(0)
    items = [rng.integers(0, 256, (3, 7, 9), dtype=np.uint8) for _ in range(6)]
    fields = {"crop_size": 5, "mirror": True, "scale": 0.5}
    mean = None
    if mean_kind == "file":
        mean = rng.uniform(0, 255, (3, 7, 9)).astype(np.float32)
        write_mean(tmp_path / "mean.binaryproto", mean)
        fields["mean_file"] = str(tmp_path / "mean.binaryproto")
    elif mean_kind == "value1":
        fields["mean_value"] = [100.0]
        mean = np.array([100.0])
    elif mean_kind == "values":
        fields["mean_value"] = [10.0, 20.0, 30.0]
        mean = np.array([10.0, 20.0, 30.0])
    t = Transformer(param(**fields), phase, "test")
    out = t(items, np.random.default_rng(42))
    draw = draws_of(t, 42, [(7, 9)] * 6)
    if phase == pb.TEST:
        assert (draw.h_off == 1).all() and (draw.w_off == 2).all()
    assert draw.mirror.any() and not draw.mirror.all()
    for i, item in enumerate(items):
        expected = reference(item, draw.h_off[i], draw.w_off[i], draw.mirror[i], 5, mean, 0.5)
        np.testing.assert_allclose(out[i], expected, rtol=1e-6, atol=1e-4)
    assert out.dtype == np.float32 and out.shape == (6, 3, 5, 5)


def test_random_crops_cover_every_offset_in_train():
    t = Transformer(param(crop_size=2), pb.TRAIN, "test")
    draw = draws_of(t, 1, [(4, 5)] * 400)
    assert set(draw.h_off) == {0, 1, 2} and set(draw.w_off) == {0, 1, 2, 3}
    assert not draw.mirror.any()


def test_items_of_different_sizes_crop_from_their_own_centre():
    a = np.arange(2 * 6 * 6, dtype=np.uint8).reshape(2, 6, 6)
    b = np.arange(2 * 4 * 8, dtype=np.uint8).reshape(2, 4, 8) + 100
    t = Transformer(param(crop_size=4, mirror=True), pb.TEST, "test")
    out = t([a, b], np.random.default_rng(3))
    draw = draws_of(t, 3, [(6, 6), (4, 8)])
    for i, item in enumerate((a, b)):
        np.testing.assert_array_equal(
            out[i], reference(item, draw.h_off[i], draw.w_off[i], draw.mirror[i], 4, None, 1)
        )


def test_no_crop_no_mirror_is_cast_and_scale_only():
    items = [np.full((1, 2, 3), v, np.uint8) for v in (1, 2)]
    out = Transformer(param(scale=0.25), pb.TRAIN, "t")(items, np.random.default_rng(0))
    np.testing.assert_array_equal(out[:, 0, 0, 0], [0.25, 0.5])


def test_errors():
    with pytest.raises(ConfigError, match="not both"):
        Transformer(param(mean_file="m", mean_value=[1.0]), pb.TRAIN, "layer x")
    with pytest.raises(ConfigError, match="force_color and force_gray"):
        Transformer(param(force_color=True, force_gray=True), pb.TRAIN, "layer x")
    t = Transformer(param(), pb.TRAIN, "layer x")
    items = [np.zeros((3, 4, 4), np.uint8), np.zeros((3, 5, 4), np.uint8)]
    with pytest.raises(DataError, match="layer x: record 'b'"):
        t(items, np.random.default_rng(0), keys=["a", "b"])
    small = Transformer(param(crop_size=5), pb.TRAIN, "layer x")
    with pytest.raises(DataError, match="smaller than crop_size"):
        small([np.zeros((3, 4, 4), np.uint8)], np.random.default_rng(0))
    two = Transformer(param(mean_value=[1.0, 2.0]), pb.TRAIN, "layer x")
    with pytest.raises(ConfigError, match="one per channel"):
        two([np.zeros((3, 4, 4), np.uint8)], np.random.default_rng(0))
