"""Fillers against Caffe's definitions (filler.hpp), drawn from one seeded generator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from netforge.errors import ConfigError
from netforge.filler import fill, filler_or
from netforge.proto import pb
from netforge.prototxt import parse_text


def draw(text: str, shape, seed: int = 0) -> np.ndarray:
    return fill(parse_text(text, pb.FillerParameter), shape, np.random.default_rng(seed))


def test_constant_and_default_type() -> None:
    np.testing.assert_array_equal(draw("value: 2.5", (2, 3)), np.full((2, 3), 2.5))
    np.testing.assert_array_equal(draw("", (4,)), np.zeros(4))


def test_uniform_range_and_mean() -> None:
    x = draw('type: "uniform" min: -2 max: 3', (200, 100))
    assert x.min() >= -2 and x.max() <= 3
    assert x.mean() == pytest.approx(0.5, abs=0.05)


def test_gaussian_moments_and_sparse_mask() -> None:
    x = draw('type: "gaussian" mean: 1 std: 2', (400, 100))
    assert x.mean() == pytest.approx(1, abs=0.05) and x.std() == pytest.approx(2, abs=0.05)
    sparse = draw('type: "gaussian" std: 1 sparse: 5', (20, 5000))
    assert (sparse != 0).mean() == pytest.approx(5 / 20, abs=0.01)


def test_positive_unitball_rows_sum_to_one() -> None:
    x = draw('type: "positive_unitball"', (6, 3, 2, 2))
    assert (x >= 0).all()
    np.testing.assert_allclose(x.reshape(6, -1).sum(axis=1), 1, rtol=1e-6)


@pytest.mark.parametrize(
    ("norm", "n"), [("FAN_IN", 3 * 5 * 5), ("FAN_OUT", 64 * 5 * 5), ("AVERAGE", (75 + 1600) / 2)]
)
def test_xavier_and_msra_scale_with_fan(norm: str, n: float) -> None:
    shape = (64, 3, 5, 5)
    x = draw(f'type: "xavier" variance_norm: {norm}', shape)
    bound = math.sqrt(3 / n)
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.95 * bound
    m = draw(f'type: "msra" variance_norm: {norm}', shape)
    assert m.std() == pytest.approx(math.sqrt(2 / n), rel=0.05)


def test_bilinear_kernel_is_caffes() -> None:
    x = draw('type: "bilinear"', (2, 1, 4, 4))
    # Caffe: f = ceil(k/2) = 2, c = (2f - 1 - f % 2) / (2f) = 0.75, w = 1 - |i/f - c|
    ramp = np.array([0.25, 0.75, 0.75, 0.25])
    np.testing.assert_allclose(x[1, 0], np.outer(ramp, ramp))
    with pytest.raises(ConfigError, match="square"):
        draw('type: "bilinear"', (1, 1, 3, 4))


def test_unknown_filler_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown filler type 'gausian'"):
        draw('type: "gausian"', (2,))


def test_same_seed_same_values_and_presence_rules() -> None:
    np.testing.assert_array_equal(
        draw('type: "gaussian"', (5,), seed=3), draw('type: "gaussian"', (5,), seed=3)
    )
    param = parse_text("num_output: 1", pb.InnerProductParameter)
    assert filler_or(param, "weight_filler", type="constant", value=1).value == 1
    param.weight_filler.SetInParent()
    assert filler_or(param, "weight_filler", type="constant", value=1).value == 0
