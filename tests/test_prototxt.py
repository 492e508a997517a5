"""Prototxt parsing, located errors, round trips and Caffe's legacy upgrades."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import SHARED, shared_path

from netforge.errors import ConfigError, DataError
from netforge.proto import pb
from netforge.prototxt import (
    parse_binary,
    parse_text,
    read_message,
    read_net,
    read_solver,
    to_text,
    write_binary,
    write_text,
)
from netforge.upgrade import upgrade_net, upgrade_solver

CAFFE_PROTOTXTS = sorted((SHARED / "caffe-models").rglob("*.prototxt"))


@pytest.mark.parametrize("path", CAFFE_PROTOTXTS, ids=lambda p: p.name)
def test_every_caffe_prototxt_round_trips(path: Path) -> None:
    cls = pb.SolverParameter if "solver" in path.name else pb.NetParameter
    reader = read_solver if cls is pb.SolverParameter else read_net
    message = reader(path)
    again = parse_text(to_text(message), cls)
    assert again == message
    assert parse_binary(message.SerializeToString(), cls) == message


def test_shared_models_are_present() -> None:
    shared_path("caffe-models")
    assert len(CAFFE_PROTOTXTS) > 40


def test_malformed_text_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.prototxt"
    path.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bottom "b"\n}\n')
    with pytest.raises(ConfigError, match=r"bad\.prototxt:5:\d+ \(in layer 'a'\)"):
        read_net(path)


def test_unknown_field_names_layer_and_suggests(tmp_path: Path) -> None:
    path = tmp_path / "typo.prototxt"
    path.write_text(
        'layer { name: "conv" type: "Convolution"\n'
        "  convolution_param { num_outptu: 3 kernel_size: 3 } }\n"
    )
    with pytest.raises(ConfigError) as info:
        read_net(path)
    message = str(info.value)
    assert "typo.prototxt:2:" in message
    assert "'conv'" in message
    assert "num_outptu" in message and "did you mean 'num_output'" in message


def test_unknown_enum_value_suggests(tmp_path: Path) -> None:
    path = tmp_path / "enum.prototxt"
    path.write_text('layer { name: "p" type: "Pooling" pooling_param { pool: MAXX } }\n')
    with pytest.raises(ConfigError, match="did you mean MAX"):
        read_net(path)


def test_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read_net(tmp_path / "absent.prototxt")


def test_corrupt_binary_is_an_error_not_zeros() -> None:
    blob = pb.BlobProto()
    blob.shape.dim.extend([4])
    blob.data.extend([1.0, 2.0, 3.0, 4.0])
    data = blob.SerializeToString()
    with pytest.raises(DataError, match="truncated or corrupt"):
        parse_binary(data[:-3], pb.BlobProto, "w.caffemodel")


def test_text_and_binary_files_round_trip(tmp_path: Path) -> None:
    net = parse_text('name: "n" layer { name: "d" type: "Input" top: "x" }', pb.NetParameter)
    write_text(net, tmp_path / "n.prototxt")
    write_binary(net, tmp_path / "n.binaryproto")
    assert read_message(tmp_path / "n.prototxt", pb.NetParameter) == net
    assert read_message(tmp_path / "n.binaryproto", pb.NetParameter) == net


V1_NET = """
name: "old"
input: "data"
input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5
layers {
  name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
  blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
  param: "w" param: "b"
  convolution_param { num_output: 3 kernel_size: 3 }
}
layers { name: "loss" type: SOFTMAX_LOSS bottom: "conv" bottom: "label" top: "loss"
  include { phase: TRAIN } }
layers { name: "data" type: DATA top: "data2"
  data_param { source: "db" batch_size: 4 scale: 0.5 mean_file: "m.binaryproto"
               crop_size: 3 mirror: true } }
"""


def test_v1_net_upgrades_as_caffe_does() -> None:
    net = parse_text(V1_NET, pb.NetParameter)
    steps = upgrade_net(net)
    assert len(steps) == 3
    assert not net.layers and not net.input and not net.input_dim
    assert [layer.type for layer in net.layer] == [
        "Input",
        "Convolution",
        "SoftmaxWithLoss",
        "Data",
    ]
    assert list(net.layer[0].top) == ["data"]
    assert list(net.layer[0].input_param.shape[0].dim) == [1, 2, 5, 5]
    conv = net.layer[1]
    assert [(p.name, p.lr_mult, p.decay_mult) for p in conv.param] == [("w", 1, 1), ("b", 2, 0)]
    assert conv.convolution_param.num_output == 3
    assert net.layer[2].include[0].phase == pb.TRAIN
    data = net.layer[3]
    assert data.transform_param.scale == 0.5
    assert data.transform_param.mean_file == "m.binaryproto"
    assert data.transform_param.crop_size == 3 and data.transform_param.mirror
    assert not data.data_param.HasField("scale") and data.data_param.batch_size == 4


V0_NET = """
name: "v0"
layers { layer { name: "data" type: "data" source: "db" batchsize: 8 meanfile: "m"
                 cropsize: 5 mirror: true } top: "data" top: "label" }
layers { layer { name: "pad1" type: "padding" pad: 2 } bottom: "data" top: "pad1" }
layers { layer { name: "conv1" type: "conv" num_output: 4 kernelsize: 3 stride: 2 group: 2
                 biasterm: false blobs_lr: 1 weight_decay: 1 } bottom: "pad1" top: "conv1" }
layers { layer { name: "pool1" type: "pool" pool: AVE kernelsize: 2 stride: 2 }
         bottom: "conv1" top: "pool1" }
layers { layer { name: "fc" type: "innerproduct" num_output: 10 } bottom: "pool1" top: "fc" }
layers { layer { name: "loss" type: "softmax_loss" } bottom: "fc" bottom: "label" }
"""


def test_v0_net_upgrades_and_folds_padding() -> None:
    net = parse_text(V0_NET, pb.NetParameter)
    upgrade_net(net)
    assert [layer.name for layer in net.layer] == ["data", "conv1", "pool1", "fc", "loss"]
    data, conv, pool, fc, loss = net.layer
    assert data.data_param.source == "db" and data.data_param.batch_size == 8
    assert data.transform_param.crop_size == 5 and data.transform_param.mean_file == "m"
    assert list(conv.bottom) == ["data"]
    p = conv.convolution_param
    assert (list(p.pad), list(p.kernel_size), list(p.stride)) == ([2], [3], [2])
    assert p.group == 2 and not p.bias_term and p.num_output == 4
    assert pool.pooling_param.pool == pb.PoolingParameter.AVE
    assert fc.inner_product_param.num_output == 10
    assert loss.type == "SoftmaxWithLoss"


def test_conformance_v1_lenet_upgrades() -> None:
    net = read_net(shared_path("conformance", "lenet_mnist", "lenet.prototxt"))
    assert net.layer[0].type == "Input"
    assert "Convolution" in [layer.type for layer in net.layer]


def test_batchnorm_param_specs_are_frozen() -> None:
    net = parse_text(
        'layer { name: "bn" type: "BatchNorm" param { lr_mult: 1 } param { lr_mult: 1 } '
        "param { lr_mult: 1 decay_mult: 1 } }",
        pb.NetParameter,
    )
    upgrade_net(net)
    assert [(p.lr_mult, p.decay_mult) for p in net.layer[0].param] == [(0, 0)] * 3


def test_solver_type_enum_upgrades(tmp_path: Path) -> None:
    solver = parse_text("solver_type: ADAM base_lr: 0.1", pb.SolverParameter)
    upgrade_solver(solver)
    assert solver.type == "Adam" and not solver.HasField("solver_type")
    both = parse_text('solver_type: ADAM type: "SGD"', pb.SolverParameter)
    with pytest.raises(ConfigError, match="both"):
        upgrade_solver(both)


def test_snapshot_prefix_defaults_like_caffe(tmp_path: Path) -> None:
    (tmp_path / "s.prototxt").write_text('net: "n.prototxt" base_lr: 0.1')
    assert read_solver(tmp_path / "s.prototxt").snapshot_prefix == str(tmp_path / "s")
    (tmp_path / "snaps").mkdir()
    (tmp_path / "t.prototxt").write_text(f'snapshot_prefix: "{tmp_path / "snaps"}/"')
    assert read_solver(tmp_path / "t.prototxt").snapshot_prefix == str(tmp_path / "snaps" / "t")
