"""NetSpec (pycaffe's ``caffe.NetSpec``, ``layers`` as L, ``params`` as P, ``to_proto``):
the intent of BVLC's python/caffe/test/test_net_spec.py, checked against hand-written
prototxts of what pycaffe generates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

import netforge as caffe
from netforge import layers as L
from netforge import params as P
from netforge.errors import ConfigError
from netforge.proto import pb


def lenet(batch_size: int) -> pb.NetParameter:
    n = caffe.NetSpec()
    n.data, n.label = L.DummyData(
        shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])],
        transform_param=dict(scale=1.0 / 255),
        ntop=2,
    )
    n.conv1 = L.Convolution(n.data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    n.pool1 = L.Pooling(n.conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.conv2 = L.Convolution(
        n.pool1, kernel_size=5, num_output=50, weight_filler=dict(type="xavier")
    )
    n.pool2 = L.Pooling(n.conv2, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    n.ip1 = L.InnerProduct(n.pool2, num_output=500, weight_filler=dict(type="xavier"))
    n.relu1 = L.ReLU(n.ip1, in_place=True)
    n.ip2 = L.InnerProduct(n.relu1, num_output=10, weight_filler=dict(type="xavier"))
    n.loss = L.SoftmaxWithLoss(n.ip2, n.label)
    return n.to_proto()


def anon_lenet(batch_size: int) -> pb.NetParameter:
    data, label = L.DummyData(
        shape=[dict(dim=[batch_size, 1, 28, 28]), dict(dim=[batch_size, 1, 1, 1])],
        transform_param=dict(scale=1.0 / 255),
        ntop=2,
    )
    conv1 = L.Convolution(data, kernel_size=5, num_output=20, weight_filler=dict(type="xavier"))
    pool1 = L.Pooling(conv1, kernel_size=2, stride=2, pool=P.Pooling.MAX)
    ip1 = L.InnerProduct(pool1, num_output=10, weight_filler=dict(type="xavier"))
    relu1 = L.ReLU(ip1, in_place=True)
    loss = L.SoftmaxWithLoss(relu1, label)
    return loss.to_proto()


LENET_HEAD = """
layer { name: "data" type: "DummyData" top: "data" top: "label"
  transform_param { scale: 0.00392156862745098 }
  dummy_data_param { shape { dim: 4 dim: 1 dim: 28 dim: 28 }
                     shape { dim: 4 dim: 1 dim: 1 dim: 1 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
"""


def _parsed(text: str) -> pb.NetParameter:
    return text_format.Parse(text, pb.NetParameter())


def _load(net_proto: pb.NetParameter, tmp_path: Path, phase: int = caffe.TEST) -> caffe.Net:
    path = tmp_path / "net.prototxt"
    path.write_text(str(net_proto))
    return caffe.Net(str(path), phase)


def test_lenet_is_the_prototxt_pycaffe_writes(tmp_path: Path) -> None:
    proto = lenet(4)
    head = pb.NetParameter()
    head.layer.extend(proto.layer[:3])
    assert head == _parsed(LENET_HEAD)
    assert [layer.name for layer in proto.layer] == [
        "data", "conv1", "pool1", "conv2", "pool2", "ip1", "relu1", "ip2", "loss",
    ]  # fmt: skip
    relu = proto.layer[6]
    assert list(relu.bottom) == list(relu.top) == ["ip1"]  # in place, named after its top
    assert list(proto.layer[8].bottom) == ["ip2", "label"]
    net = _load(proto, tmp_path)
    assert len(net.layers) == 9
    assert net.blobs["ip2"].data.shape == (4, 10)
    loss = float(net.forward()["loss"])
    assert np.isfinite(loss) and loss > 0


def test_anonymous_tops_are_named_by_type_and_count(tmp_path: Path) -> None:
    proto = anon_lenet(2)
    assert [(layer.name, list(layer.top)) for layer in proto.layer] == [
        ("DummyData1", ["DummyData1", "DummyData2"]),
        ("Convolution1", ["Convolution1"]),
        ("Pooling1", ["Pooling1"]),
        ("InnerProduct1", ["InnerProduct1"]),
        ("ReLU1", ["InnerProduct1"]),
        ("SoftmaxWithLoss1", ["SoftmaxWithLoss1"]),
    ]
    assert len(_load(proto, tmp_path).layers) == 6


def test_zero_top_layers_are_returned_as_functions(tmp_path: Path) -> None:
    n = caffe.NetSpec()
    n.data, n.data2 = L.DummyData(shape=dict(dim=3), ntop=2)
    n.silence_data = L.Silence(n.data, ntop=0)
    n["silence_data2"] = L.Silence(n.data2, ntop=0)
    proto = n.to_proto()
    assert [(layer.name, list(layer.top)) for layer in proto.layer] == [
        ("data", ["data", "data2"]),
        ("silence_data", []),
        ("silence_data2", []),
    ]
    assert list(proto.layer[0].dummy_data_param.shape[0].dim) == [3]  # one value, repeated
    assert len(_load(proto, tmp_path).forward()) == 0
    anonymous = L.Silence(L.DummyData(shape=dict(dim=[2])), ntop=0)
    assert isinstance(anonymous, caffe.net_spec.Function)
    assert [layer.name for layer in caffe.to_proto(*anonymous.inputs).layer] == ["DummyData1"]


def test_a_tuple_of_tops_is_not_a_top() -> None:
    data = L.DummyData(ntop=2)
    with pytest.raises(
        TypeError, match=r"^Silence input 0 is not a Top \(type is <class 'tuple'>\)$"
    ):
        L.Silence(data, ntop=0)
    L.Silence(*data, ntop=0)


def test_layer_parameter_fields_lists_and_nested_messages() -> None:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[2, 3, 8, 8]))
    n.conv = L.Convolution(
        n.data,
        kernel_size=[3, 5],
        num_output=4,
        param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)],
        bias_filler=dict(type="constant", value=0.5),
        include=dict(phase=caffe.TRAIN),
        loss_weight=0.25,
        engine=P.Convolution.CAFFE,
    )
    n.py = L.Python(n.conv, module="mod", layer="Cls", param_str="{'a': 1}", propagate_down=[True])
    n.deconv = L.Deconvolution(n.conv, convolution_param=dict(num_output=2, kernel_size=2))
    proto = n.to_proto()
    expected = _parsed("""
      layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } }
      layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        include { phase: TRAIN } loss_weight: 0.25
        convolution_param { num_output: 4 kernel_size: 3 kernel_size: 5
          bias_filler { type: "constant" value: 0.5 } engine: CAFFE } }
      layer { name: "py" type: "Python" bottom: "conv" top: "py" propagate_down: true
        python_param { module: "mod" layer: "Cls" param_str: "{'a': 1}" } }
      layer { name: "deconv" type: "Deconvolution" bottom: "conv" top: "deconv"
        convolution_param { num_output: 2 kernel_size: 2 } }
    """)  # fmt: skip
    assert proto == expected


def test_several_tops_to_proto_and_top_to_proto() -> None:
    a = L.DummyData(shape=dict(dim=[1]))
    b = L.AbsVal(a)
    c = L.Power(a, power=2)
    both = caffe.to_proto(b, c)
    assert [layer.name for layer in both.layer] == ["DummyData1", "AbsVal1", "Power1"]
    assert both.layer[2].power_param.power == 2
    assert [layer.name for layer in c.to_proto().layer] == ["DummyData1", "Power1"]


def test_params_are_the_enum_values() -> None:
    assert P.Pooling.MAX == pb.PoolingParameter.MAX == 0
    assert P.Pooling.AVE == 1
    assert P.Eltwise.PROD == pb.EltwiseParameter.PROD
    assert P.Loss.VALID == pb.LossParameter.VALID
    with pytest.raises(AttributeError, match="PoolingParameter has no value 'MEDIAN'"):
        P.Pooling.MEDIAN  # noqa: B018
    with pytest.raises(AttributeError, match="no message NoSuchParameter"):
        P.NoSuch  # noqa: B018


def test_unknown_parameters_name_the_layer() -> None:
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2]))
    n.ip = L.InnerProduct(n.data, num_outptu=3)
    with pytest.raises(
        ConfigError, match=r"layer 'ip' \(InnerProduct\): no parameter 'num_outptu'"
    ):
        n.to_proto()
    n.ip = L.InnerProduct(n.data, weight_filler="xavier")
    with pytest.raises(ConfigError, match=r"'ip' .*weight_filler: cannot take 'xavier'"):
        n.to_proto()
    n.ip = L.InnerProduct(n.data, weight_filler=dict(typ="xavier"), param=[dict(lr_mult=1)])
    with pytest.raises(
        ConfigError, match=r"layer 'ip' \(InnerProduct\): FillerParameter has no field 'typ'"
    ):
        n.to_proto()
    n.ip = L.InnerProduct(n.data, num_output=3, param=[dict(lr_mul=1)])
    with pytest.raises(ConfigError, match=r"layer 'ip' .*ParamSpec has no field 'lr_mul'"):
        n.to_proto()
    with pytest.raises(AttributeError, match="no top named 'missing'"):
        n.missing  # noqa: B018
