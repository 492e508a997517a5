"""Real trained Caffe models (../shared/conformance) load unchanged and reproduce the
outputs an independent Caffe implementation gave, on every blob stored there, within
max|a - b| <= 1e-4 * max(1, max|b|) (the tolerance the folder's README gives)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, shared_path

from netforge.backend import to_numpy
from netforge.net import Net
from netforge.proto import pb

FOLDERS = sorted(p for p in (SHARED / "conformance").glob("*") if p.is_dir())


def test_every_conformance_model_is_checked() -> None:
    shared_path("conformance")
    assert [folder.name for folder in FOLDERS] == [
        "lenet_mnist",
        "mtcnn_det1",
        "mtcnn_det2",
        "mtcnn_det4",
        "ultraface_slim320",
    ]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.name)
def test_conformance_model_matches_expected_outputs(folder: Path, backend) -> None:
    net = Net(
        next(folder.glob("*.prototxt")),
        phase=pb.TEST,
        backend=backend,
        weights=next(folder.glob("*.caffemodel")),
    )
    image = np.load(folder / "input.npy")
    expected = np.load(folder / "expected.npz")
    net.forward(**{net.inputs[0]: image})
    checked = 0
    for name in expected.files:
        if name == "__meta__":
            continue
        want = expected[name]
        got = to_numpy(net.blobs[name].data)
        assert got.shape == want.shape, name
        bound = 1e-4 * max(1.0, float(np.abs(want).max()))
        assert float(np.abs(got - want).max()) <= bound, name
        checked += 1
    assert checked >= 2
