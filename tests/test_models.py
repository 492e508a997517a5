"""The ready-to-run models in models/ and the bundled digits dataset.

Every net and solver file parses; every net builds (data layers replaced by Input layers of
the shapes their data would give) with the top shapes the architecture implies; the dataset
files have the documented shapes, values and class counts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from netforge import TEST, TRAIN
from netforge.graph import DATA_LAYER_PARAMS, replace_data_layers
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import read_net, read_solver

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
DIGITS = MODELS / "digits" / "data"
OURS = ["digits", "mnist", "cifar10", "bvlc_reference_caffenet", "bvlc_alexnet", "bvlc_googlenet"]

NETS = sorted(p for d in OURS for p in (MODELS / d).glob("*.prototxt") if "solver" not in p.name)
SOLVERS = sorted(p for d in OURS for p in (MODELS / d).glob("*solver*.prototxt"))

CAFFENET_TAIL = {  # AlexNet and CaffeNet share their blob shapes (per image)
    "conv1": (96, 55, 55),
    "pool1": (96, 27, 27),
    "conv2": (256, 27, 27),
    "pool2": (256, 13, 13),
    "conv3": (384, 13, 13),
    "conv5": (256, 13, 13),
    "pool5": (256, 6, 6),
    "fc6": (4096,),
    "fc7": (4096,),
    "fc8": (1000,),
}
# net file -> (per-item input shape, {blob: per-item shape})
EXPECTED = {
    "digits/deploy.prototxt": (
        (1, 8, 8),
        {
            "conv1": (20, 8, 8),
            "pool1": (20, 4, 4),
            "conv2": (50, 4, 4),
            "pool2": (50, 2, 2),
            "ip1": (128,),
            "prob": (10,),
        },
    ),
    "mnist/lenet.prototxt": (
        (1, 28, 28),
        {
            "conv1": (20, 24, 24),
            "pool1": (20, 12, 12),
            "conv2": (50, 8, 8),
            "pool2": (50, 4, 4),
            "ip1": (500,),
            "prob": (10,),
        },
    ),
    "cifar10/cifar10_quick.prototxt": (
        (3, 32, 32),
        {
            "conv1": (32, 32, 32),
            "pool1": (32, 16, 16),
            "pool2": (32, 8, 8),
            "pool3": (64, 4, 4),
            "ip1": (64,),
            "prob": (10,),
        },
    ),
    "cifar10/cifar10_full.prototxt": (
        (3, 32, 32),
        {
            "pool1": (32, 16, 16),
            "norm1": (32, 16, 16),
            "pool2": (32, 8, 8),
            "pool3": (64, 4, 4),
            "prob": (10,),
        },
    ),
    "bvlc_reference_caffenet/deploy.prototxt": ((3, 227, 227), {**CAFFENET_TAIL}),
    "bvlc_alexnet/deploy.prototxt": ((3, 227, 227), {**CAFFENET_TAIL}),
    "bvlc_googlenet/deploy.prototxt": (
        (3, 224, 224),
        {
            "conv1/7x7_s2": (64, 112, 112),
            "pool1/3x3_s2": (64, 56, 56),
            "pool2/3x3_s2": (192, 28, 28),
            "inception_3a/output": (256, 28, 28),
            "inception_4e/output": (832, 14, 14),
            "inception_5b/output": (1024, 7, 7),
            "pool5/7x7_s1": (1024, 1, 1),
            "prob": (1000,),
        },
    ),
}
# train_val files: the deploy file whose expectations they share, their per-item data shape
# and their (TRAIN, TEST) batch sizes.
TRAIN_VAL = {
    "digits/train_val.prototxt": ("digits/deploy.prototxt", (64, 90)),
    "mnist/lenet_train_test.prototxt": ("mnist/lenet.prototxt", (64, 100)),
    "cifar10/cifar10_quick_train_test.prototxt": ("cifar10/cifar10_quick.prototxt", (100, 100)),
    "cifar10/cifar10_full_train_test.prototxt": ("cifar10/cifar10_full.prototxt", (100, 100)),
    "bvlc_reference_caffenet/train_val.prototxt": (
        "bvlc_reference_caffenet/deploy.prototxt",
        (256, 50),
    ),
    "bvlc_alexnet/train_val.prototxt": ("bvlc_alexnet/deploy.prototxt", (256, 50)),
    "bvlc_googlenet/train_val.prototxt": ("bvlc_googlenet/deploy.prototxt", (32, 50)),
}


def _rel(path: Path) -> str:
    return path.relative_to(MODELS).as_posix()


def _shape_free(param: pb.NetParameter) -> pb.NetParameter:
    """The net without its fillers, so that building big nets costs no random numbers."""
    for layer in param.layer:
        for field in ("convolution_param", "inner_product_param"):
            if layer.HasField(field):
                getattr(layer, field).ClearField("weight_filler")
    return param


@pytest.mark.parametrize("path", NETS, ids=_rel)
def test_every_net_parses(path):
    param = read_net(path)
    assert param.layer, path
    assert param.name


@pytest.mark.parametrize("path", SOLVERS, ids=_rel)
def test_every_solver_parses_and_names_its_net(path):
    solver = read_solver(path)
    net = ROOT / solver.net
    assert net.is_file(), f"{path} names {solver.net}, which is not in the repository"
    assert solver.snapshot_prefix.startswith(f"models/{path.parent.name}/")
    read_net(net)


def test_every_file_is_covered():
    assert sorted(map(_rel, NETS)) == sorted([*EXPECTED, *TRAIN_VAL])


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_deploy_net_shapes(name):
    item, shapes = EXPECTED[name]
    param = _shape_free(read_net(MODELS / name))
    batch = int(param.layer[0].input_param.shape[0].dim[0])
    net = Net(param, TEST)
    assert net.blobs["data"].shape == (batch, *item)
    for blob, shape in shapes.items():
        assert net.blobs[blob].shape == (batch, *shape), blob
    assert net.outputs == ["prob"]


@pytest.mark.parametrize("name", sorted(TRAIN_VAL))
@pytest.mark.parametrize("phase", [TRAIN, TEST], ids=["TRAIN", "TEST"])
def test_train_val_net_shapes(name, phase):
    deploy, batches = TRAIN_VAL[name]
    item, shapes = EXPECTED[deploy]
    source = _shape_free(read_net(MODELS / name))
    param, replaced = replace_data_layers(source, item)
    sizes = [
        getattr(layer, DATA_LAYER_PARAMS[layer.type]).batch_size
        for layer in source.layer
        if layer.name in replaced
    ]
    assert sizes == list(batches)
    batch = batches[0 if phase == TRAIN else 1]
    net = Net(param, phase)
    for blob, shape in shapes.items():
        if blob != "prob":
            assert net.blobs[blob].shape == (batch, *shape), blob
    losses = [name for name in net.outputs if "loss" in name]
    assert losses and all(net.blobs[n].shape == () for n in losses)
    if phase == TEST:
        assert any(name.startswith("accuracy") or "top-1" in name for name in net.outputs)


# -- the bundled dataset -----------------------------------------------------------------
# Images of each digit in scikit-learn's digits.csv.gz (1797 rows).
SOURCE_COUNTS = np.array([178, 182, 177, 183, 181, 182, 181, 179, 174, 180])


@pytest.mark.parametrize("name, count", [("train", 1437), ("test", 360)])
def test_digits_files(name, count):
    assert (DIGITS / f"{name}.txt").read_text() == f"models/digits/data/{name}.h5\n"
    with h5py.File(DIGITS / f"{name}.h5", "r") as f:
        assert sorted(f) == ["data", "label"]
        data, label = f["data"][:], f["label"][:]
    assert data.dtype == label.dtype == np.float32
    assert data.shape == (count, 1, 8, 8)
    assert label.shape == (count,)
    # pixels are the 0..16 counts divided by 16
    counts = data * 16
    assert np.array_equal(counts, np.round(counts))
    assert counts.min() == 0 and counts.max() == 16
    assert np.array_equal(label, np.round(label))
    per_class = np.bincount(label.astype(np.int64), minlength=10)
    expected = np.full(10, 36) if name == "test" else SOURCE_COUNTS - 36
    assert np.array_equal(per_class, expected)


# sha256 of the source's 1797 rows (64 pixels / 16, then the label, as float32 bytes), sorted:
# the split must keep every image exactly once, whatever the order.
SOURCE_ROWS_SHA256 = "2a2202546dbad053d02522fe447b633e227a402df16193d71bc466d3561e4a89"


def test_digits_split_keeps_every_image_once_and_shuffles_training():
    rows = []
    for name in ("train", "test"):
        with h5py.File(DIGITS / f"{name}.h5", "r") as f:
            table = np.concatenate([f["data"][:].reshape(-1, 64), f["label"][:][:, None]], axis=1)
        rows.extend(r.tobytes() for r in table)
        if name == "train":
            # Stored shuffled: the labels do not come in runs of one class.
            assert np.count_nonzero(np.diff(table[:, 64])) > 1000
    assert len(rows) == len(set(rows)) == 1797
    assert hashlib.sha256(b"".join(sorted(rows))).hexdigest() == SOURCE_ROWS_SHA256


def test_digits_net_reads_the_bundled_data(monkeypatch):
    monkeypatch.chdir(ROOT)  # the list files name paths from the repository root, as Caffe
    net = Net(MODELS / "digits" / "train_val.prototxt", TEST)
    net.forward()
    with h5py.File(DIGITS / "test.h5", "r") as f:
        first = f["data"][:90]
        labels = f["label"][:90]
    np.testing.assert_array_equal(np.asarray(net.blobs["data"].data), first)
    np.testing.assert_array_equal(np.asarray(net.blobs["label"].data), labels)


@pytest.mark.slow
def test_digits_solver_reaches_the_stated_accuracy(monkeypatch, tmp_path):
    """The README's first command (``netforge train --solver models/digits/solver.prototxt``)
    through the library it runs, with snapshots sent to a temporary folder."""
    import netforge

    monkeypatch.chdir(ROOT)
    param = read_solver(MODELS / "digits" / "solver.prototxt")
    param.snapshot_prefix = str(tmp_path / "digits")
    solver = netforge.get_solver(param)
    solver.solve()
    assert solver.iter == 1000
    snapshot = tmp_path / "digits_iter_1000.caffemodel"
    assert snapshot.is_file()
    # Score the trained weights on the whole test set: 4 batches of 90.
    test_net = solver.test_nets[0]
    accuracy = np.mean([float(test_net.forward()["accuracy"]) for _ in range(4)])
    assert accuracy >= 0.98
    # The deploy net with the snapshot classifies the whole test set the same way.
    deploy = Net(MODELS / "digits" / "deploy.prototxt", TEST, weights=snapshot)
    with h5py.File(DIGITS / "test.h5", "r") as f:
        images, labels = f["data"][:], f["label"][:]
    prob = np.asarray(deploy.forward(data=images)["prob"])
    assert prob.shape == (360, 10)
    np.testing.assert_allclose(prob.sum(axis=1), 1, rtol=1e-5)
    assert np.mean(prob.argmax(axis=1) == labels) == pytest.approx(accuracy, abs=1e-6)
