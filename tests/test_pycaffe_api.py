"""The README's pycaffe example, as a pycaffe user would write it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import netforge as caffe

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "models" / "digits" / "deploy.prototxt"


def test_pycaffe_script_ports_by_changing_the_import(tmp_path: Path) -> None:
    trained = caffe.Net(str(DEPLOY), caffe.TEST)
    trained.save(str(tmp_path / "w.caffemodel"))
    net = caffe.Net(str(DEPLOY), str(tmp_path / "w.caffemodel"), caffe.TEST)  # positional
    same = caffe.Net(str(DEPLOY), caffe.TEST, weights=str(tmp_path / "w.caffemodel"))
    images = np.random.default_rng(0).uniform(size=(5, 1, 8, 8)).astype(np.float32)
    out = net.forward(data=images)
    assert out["prob"].shape == (5, 10)
    np.testing.assert_allclose(out["prob"].sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_array_equal(same.forward(data=images)["prob"], out["prob"])
    assert net.blobs["conv1"].data.shape == (5, 20, 8, 8)
    np.testing.assert_array_equal(net.params["conv1"][0].data, trained.params["conv1"][0].data)
    assert net.inputs == ["data"] and net.outputs == ["prob"]
    assert list(net._layer_names)[:2] == ["data", "conv1"]
    net.blobs["data"].reshape(2, 1, 8, 8)
    net.reshape()
    assert net.forward()["prob"].shape == (2, 10)
    caffe.set_mode_cpu()
