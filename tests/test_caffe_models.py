"""BVLC Caffe's own nets build with the shapes Caffe gives them, and the conformance models'
weights load with every blob's shape right (../shared; skipped when it is absent)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import SHARED, shared_path

from netforge.graph import replace_data_layers
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import read_net

MODELS = SHARED / "caffe-models"

# deploy net -> {blob: shape Caffe infers}
DEPLOY_SHAPES = {
    "models/bvlc_reference_caffenet/deploy.prototxt": {
        "prob": (10, 1000),
        "pool5": (10, 256, 6, 6),
    },
    "models/bvlc_alexnet/deploy.prototxt": {"prob": (10, 1000), "conv1": (10, 96, 55, 55)},
    "models/bvlc_googlenet/deploy.prototxt": {
        "prob": (10, 1000),
        "inception_5b/output": (10, 1024, 7, 7),
        "pool1/3x3_s2": (10, 64, 56, 56),
    },
    "models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt": {"fc-rcnn": (10, 200)},
    "models/finetune_flickr_style/deploy.prototxt": {"prob": (10, 20)},
    "examples/mnist/lenet.prototxt": {"prob": (64, 10), "pool2": (64, 50, 4, 4)},
    "examples/cifar10/cifar10_quick.prototxt": {"prob": (1, 10), "pool3": (1, 64, 4, 4)},
    "examples/cifar10/cifar10_full.prototxt": {"prob": (1, 10), "pool3": (1, 64, 4, 4)},
    "examples/net_surgery/bvlc_caffenet_full_conv.prototxt": {"prob": (1, 1000, 8, 8)},
    "examples/net_surgery/conv.prototxt": {"conv": (1, 3, 96, 96)},
    "examples/siamese/mnist_siamese.prototxt": {"feat": (10000, 2)},
}

# train/test net -> (C, H, W) of its image data (crop applied), for Input stand-ins
TRAIN_DATA_SHAPES = {
    "models/bvlc_reference_caffenet/train_val.prototxt": (3, 227, 227),
    "models/bvlc_alexnet/train_val.prototxt": (3, 227, 227),
    "models/bvlc_googlenet/train_val.prototxt": (3, 224, 224),
    "models/finetune_flickr_style/train_val.prototxt": (3, 227, 227),
    "examples/mnist/lenet_train_test.prototxt": (1, 28, 28),
    "examples/mnist/mnist_autoencoder.prototxt": (1, 28, 28),
    "examples/siamese/mnist_siamese_train_test.prototxt": (2, 28, 28),
    "examples/cifar10/cifar10_quick_train_test.prototxt": (3, 32, 32),
    "examples/cifar10/cifar10_full_train_test.prototxt": (3, 32, 32),
    "examples/cifar10/cifar10_full_sigmoid_train_test.prototxt": (3, 32, 32),
    "examples/cifar10/cifar10_full_sigmoid_train_test_bn.prototxt": (3, 32, 32),
    "examples/feature_extraction/imagenet_val.prototxt": (3, 227, 227),
    "examples/finetune_pascal_detection/pascal_finetune_trainval_test.prototxt": (3, 227, 227),
    "examples/hdf5_classification/train_val.prototxt": (4,),
    "examples/hdf5_classification/nonlinear_train_val.prototxt": (4,),
    "examples/hdf5_classification/nonlinear_auto_train.prototxt": (4,),
    "examples/hdf5_classification/nonlinear_auto_test.prototxt": (4,),
}

# nets whose test data layers are chosen by a stage (the solver's test_state)
TEST_STAGES = {"examples/mnist/mnist_autoencoder.prototxt": ("test-on-test",)}


@pytest.mark.parametrize("relative", sorted(DEPLOY_SHAPES))
def test_deploy_nets_build_with_caffes_shapes(relative: str) -> None:
    net = Net(shared_path("caffe-models", relative), phase=pb.TEST)
    for blob, shape in DEPLOY_SHAPES[relative].items():
        assert net.blobs[blob].shape == shape, blob


@pytest.mark.parametrize("relative", sorted(TRAIN_DATA_SHAPES))
@pytest.mark.parametrize("phase", [pb.TRAIN, pb.TEST])
def test_train_val_nets_build_with_input_stand_ins(relative: str, phase: int) -> None:
    param = read_net(shared_path("caffe-models", relative))
    stages = TEST_STAGES.get(relative, ()) if phase == pb.TEST else ()
    stand_in, replaced = replace_data_layers(param, TRAIN_DATA_SHAPES[relative])
    assert replaced
    net = Net(stand_in, phase=phase, stages=stages)
    losses = [name for name in net.outputs if "loss" in name]
    for name in losses:
        assert net.blobs[name].shape == ()
    assert net.layers, relative


CONFORMANCE = sorted(p for p in (SHARED / "conformance").glob("*") if p.is_dir())


@pytest.mark.parametrize("folder", CONFORMANCE, ids=lambda p: p.name)
def test_conformance_weights_load_with_every_shape_right(folder: Path) -> None:
    from netforge.weights import read_weight_table

    model = next(folder.glob("*.prototxt"))
    weights = next(folder.glob("*.caffemodel"))
    net = Net(model, phase=pb.TEST)
    report = net.copy_from(weights)
    assert not report.missing, report.missing
    table = read_weight_table(weights)
    for layer_name, blobs in net.params.items():
        stored = table[layer_name]
        assert len(stored) == len(blobs)
        for i, blob in enumerate(blobs):
            assert stored[i].fits(blob.shape)
            np.testing.assert_array_equal(blob.data.ravel(), stored[i].data.ravel())
