"""The layer registry: built-in types, entry-point plugins, helpful unknown-type errors."""

from __future__ import annotations

from importlib import metadata

import numpy as np
import pytest

from netforge import layer as registry
from netforge.errors import ConfigError
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import parse_text

CAFFE_TYPES = """AbsVal Accuracy ArgMax BNLL BatchNorm BatchReindex Bias Clip Concat
ContrastiveLoss Convolution Crop Data Deconvolution Dropout DummyData ELU Eltwise Embed
EuclideanLoss Exp Filter Flatten HDF5Data HDF5Output HingeLoss Im2col ImageData InfogainLoss
InnerProduct Input LRN LSTM LSTMUnit Log MVN MemoryData MultinomialLogisticLoss PReLU
Parameter Pooling Power Python RNN ReLU Reduction Reshape SPP Scale Sigmoid
SigmoidCrossEntropyLoss Silence Slice Softmax SoftmaxWithLoss Split Swish TanH Threshold Tile
WindowData""".split()


def test_every_caffe_layer_type_is_registered() -> None:
    assert len(CAFFE_TYPES) == 61
    missing = sorted(set(CAFFE_TYPES) - set(registry.registered_types()))
    assert not missing


def test_entry_point_plugins_register_layers(monkeypatch) -> None:
    plugin = metadata.EntryPoint(name="demo", value="plugin_layers", group="netforge.layers")
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(
        registry.metadata,
        "entry_points",
        lambda group: [plugin] if group == registry.ENTRY_POINT_GROUP else [],
    )
    net = Net(
        parse_text(
            'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 2 } } }\n'
            'layer { name: "p" type: "PluginTimesTwo" bottom: "x" top: "y" }',
            pb.NetParameter,
        )
    )
    np.testing.assert_array_equal(net.forward(x=np.array([1.0, 3.0]))["y"], [2.0, 6.0])


def test_broken_plugin_is_reported(monkeypatch) -> None:
    plugin = metadata.EntryPoint(name="bad", value="no_such_module_x", group="netforge.layers")
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    monkeypatch.setattr(registry.metadata, "entry_points", lambda group: [plugin])
    with pytest.raises(ConfigError, match="layer plugin 'bad'"):
        registry.registered_types()


def test_unknown_type_suggests_by_case() -> None:
    with pytest.raises(ConfigError, match="did you mean 'ReLU'"):
        registry.layer_creator("relu", "r")
