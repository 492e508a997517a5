"""NetState filtering and automatic Split insertion, as Caffe's Net::Init does them."""

from __future__ import annotations

import pytest

from netforge.errors import ConfigError
from netforge.graph import filter_net, insert_splits, state_meets_rule
from netforge.proto import pb
from netforge.prototxt import parse_text


def state(text: str) -> pb.NetState:
    return parse_text(text, pb.NetState)


def rule(text: str) -> pb.NetStateRule:
    return parse_text(text, pb.NetStateRule)


@pytest.mark.parametrize(
    ("state_text", "rule_text", "expected"),
    [
        ("phase: TRAIN", "phase: TRAIN", True),
        ("phase: TEST", "phase: TRAIN", False),
        ("phase: TEST", "", True),
        ("level: 2", "min_level: 2", True),
        ("level: 1", "min_level: 2", False),
        ("level: 3", "max_level: 2", False),
        ('stage: "a" stage: "b"', 'stage: "a"', True),
        ('stage: "b"', 'stage: "a" stage: "b"', False),
        ('stage: "a"', 'not_stage: "a"', False),
        ('stage: "b"', 'not_stage: "a"', True),
    ],
)
def test_state_meets_rule(state_text: str, rule_text: str, expected: bool) -> None:
    assert state_meets_rule(state(state_text), rule(rule_text)) is expected


NET = """
layer { name: "train_only" type: "Input" top: "a" include { phase: TRAIN } }
layer { name: "test_only" type: "Input" top: "a" include { phase: TEST } }
layer { name: "not_deploy" type: "Input" top: "b" exclude { stage: "deploy" } }
layer { name: "either" type: "Input" top: "c"
        include { phase: TRAIN } include { stage: "x" } }
"""


def names(net: pb.NetParameter) -> list[str]:
    return [layer.name for layer in net.layer]


def test_filter_net_keeps_layers_by_rules() -> None:
    net = parse_text(NET, pb.NetParameter)
    assert names(filter_net(net, state("phase: TRAIN"))) == ["train_only", "not_deploy", "either"]
    assert names(filter_net(net, state('phase: TEST stage: "deploy"'))) == ["test_only"]
    assert names(filter_net(net, state('phase: TEST stage: "x"'))) == [
        "test_only",
        "not_deploy",
        "either",
    ]


def test_include_and_exclude_together_is_an_error() -> None:
    net = parse_text(
        'layer { name: "l" type: "Input" include { phase: TRAIN } exclude { phase: TEST } }',
        pb.NetParameter,
    )
    with pytest.raises(ConfigError, match="'l'"):
        filter_net(net, state("phase: TRAIN"))


def test_splits_are_named_as_caffe_names_them() -> None:
    net = parse_text(
        """
        layer { name: "data" type: "Input" top: "data" top: "label" }
        layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" }
        layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" }
        """,
        pb.NetParameter,
    )
    split = insert_splits(net)
    assert names(split) == [
        "data",
        "label_data_1_split",
        "ip",
        "ip_ip_0_split",
        "acc",
        "loss",
    ]
    assert list(split.layer[1].top) == ["label_data_1_split_0", "label_data_1_split_1"]
    assert list(split.layer[4].bottom) == ["ip_ip_0_split_0", "label_data_1_split_0"]
    assert list(split.layer[5].bottom) == ["ip_ip_0_split_1", "label_data_1_split_1"]


def test_a_loss_top_read_elsewhere_moves_its_weight_to_the_split() -> None:
    net = parse_text(
        """
        layer { name: "data" type: "Input" top: "x" }
        layer { name: "sq" type: "Power" bottom: "x" top: "y" loss_weight: 2 }
        layer { name: "other" type: "ReLU" bottom: "y" top: "z" }
        """,
        pb.NetParameter,
    )
    split = insert_splits(net)
    assert names(split) == ["data", "sq", "y_sq_0_split", "other"]
    assert not split.layer[1].loss_weight
    assert list(split.layer[2].loss_weight) == [2.0, 0.0]
    # split output 0 carries the loss; the reader gets output 1
    assert list(split.layer[3].bottom) == ["y_sq_0_split_1"]


def test_in_place_chain_is_not_split() -> None:
    net = parse_text(
        """
        layer { name: "data" type: "Input" top: "x" }
        layer { name: "relu" type: "ReLU" bottom: "x" top: "x" }
        layer { name: "out" type: "ReLU" bottom: "x" top: "y" }
        """,
        pb.NetParameter,
    )
    assert names(insert_splits(net)) == ["data", "relu", "out"]


def test_unknown_bottom_names_layer_and_blob() -> None:
    net = parse_text('layer { name: "r" type: "ReLU" bottom: "nowhere" top: "y" }', pb.NetParameter)
    with pytest.raises(ConfigError, match="layer 'r'.*'nowhere'"):
        insert_splits(net)


def test_replace_data_layers_keeps_names_rules_and_tops() -> None:
    from netforge.graph import replace_data_layers

    net = parse_text(
        """
        layer { name: "train" type: "Data" top: "data" top: "label" include { phase: TRAIN }
                data_param { source: "db" batch_size: 8 } transform_param { crop_size: 3 } }
        layer { name: "test" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }
                hdf5_data_param { source: "list.txt" batch_size: 2 } }
        layer { name: "relu" type: "ReLU" bottom: "data" top: "out" }
        """,
        pb.NetParameter,
    )
    stand_in, replaced = replace_data_layers(net, (3, 4, 4))
    assert replaced == ["train", "test"]
    train, test, relu = stand_in.layer
    assert (train.type, list(train.top), train.include[0].phase) == (
        "Input",
        ["data", "label"],
        pb.TRAIN,
    )
    assert [list(s.dim) for s in train.input_param.shape] == [[8, 3, 4, 4], [8]]
    assert [list(s.dim) for s in test.input_param.shape] == [[2, 3, 4, 4], [2]]
    assert not train.HasField("data_param") and not train.HasField("transform_param")
    assert net.layer[0].type == "Data"  # the original is untouched
    fixed, _ = replace_data_layers(net, (5,), batch=16)
    assert list(fixed.layer[1].input_param.shape[0].dim) == [16, 5]
