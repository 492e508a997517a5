"""``netforge time``: Caffe's ``caffe time`` lines, and DummyData standing in for missing data."""

from __future__ import annotations

import re

import pytest

from netforge.cli.main import main
from netforge.graph import replace_data_layers
from netforge.net import Net
from netforge.proto import pb
from netforge.prototxt import parse_text
from netforge.timing import time_net

TINY = """
name: "Tiny"
layer { name: "data" type: "DummyData" top: "data" top: "label"
  dummy_data_param { shape { dim: 4 dim: 3 } shape { dim: 4 }
    data_filler { type: "gaussian" } data_filler { type: "constant" value: 1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" } } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "test_only" type: "ReLU" bottom: "ip" top: "r" include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

MISSING_SOURCE = """
name: "NoData"
layer { name: "train_data" type: "HDF5Data" top: "data" top: "label" include { phase: TRAIN }
  hdf5_data_param { source: "no/such/list.txt" batch_size: 6 } }
layer { name: "test_data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { scale: 0.5 }
  data_param { source: "no/such/lmdb" batch_size: 2 backend: LMDB } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

NUMBER = r"[-+0-9.e]+"


def _write(tmp_path, text, name="net.prototxt"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _messages(stderr: str) -> list[str]:
    """The messages of glog lines (what follows ``file:line] ``)."""
    return [line.split("] ", 1)[1] for line in stderr.splitlines() if "] " in line]


def test_time_prints_caffes_lines(tmp_path, capsys):
    assert main(["time", "--model", _write(tmp_path, TINY), "--iterations", "3"]) == 0
    lines = _messages(capsys.readouterr().err)
    start = lines.index("*** Benchmark begins ***")
    # Caffe's net-setup lines come between "Use CPU." and the first pass.
    built = lines.index("Network initialization done.")
    assert lines[0] == "Use CPU." and lines[1].startswith("Creating Layer ")
    assert lines[built + 1 : start] == [
        "Performing Forward",
        lines[built + 2],
        "Performing Backward",
    ]
    assert re.fullmatch(rf"Initial loss: {NUMBER}", lines[built + 2])
    assert lines[start + 1] == "Testing for 3 iterations."
    for k in range(3):
        assert re.fullmatch(
            rf"Iteration: {k + 1} forward-backward time: {NUMBER} ms.", lines[start + 2 + k]
        )
    assert lines[start + 5] == "Average time per layer: "
    per_layer = lines[start + 6 : start + 14]
    # TRAIN is the default phase: the TEST-only layer is not built.
    names = ["data", "ip", "relu", "loss"]
    expected = [(n, d) for n in names for d in ("forward", "backward")]
    forward_sum = 0.0
    for line, (name, direction) in zip(per_layer, expected):
        match = re.fullmatch(rf"(.{{10}})\t{direction}: ({NUMBER}) ms.", line)
        assert match, line
        assert match.group(1) == name.rjust(10)
        if direction == "forward":
            forward_sum += float(match.group(2))
    tail = lines[start + 14 :]
    labels = ["Average Forward pass", "Average Backward pass", "Average Forward-Backward"]
    values = {}
    for line, label in zip(tail, [*labels, "Total Time"]):
        match = re.fullmatch(rf"{label}: ({NUMBER}) ms.", line)
        assert match, line
        values[label] = float(match.group(1))
    assert tail[4] == "*** Benchmark ends ***"
    # Per-layer times are parts of the forward pass; the passes are parts of the total.
    assert forward_sum <= values["Average Forward pass"] * 1.001
    both = values["Average Forward pass"] + values["Average Backward pass"]
    assert both <= values["Average Forward-Backward"] * 1.001
    assert values["Total Time"] == pytest.approx(3 * values["Average Forward-Backward"], 1e-3)


def test_time_phase_test_builds_test_layers(tmp_path, capsys):
    args = ["time", "--model", _write(tmp_path, TINY), "--iterations", "1", "--phase", "TEST"]
    assert main(args) == 0
    lines = _messages(capsys.readouterr().err)
    assert " test_only\tforward: " in "\n".join(lines)


def test_time_net_returns_consistent_timings():
    net = Net(parse_text(TINY, pb.NetParameter), pb.TRAIN)
    timings = time_net(net, iterations=4)
    assert timings.layer_names == ["data", "ip", "relu", "loss"]
    assert timings.iterations == 4
    assert len(timings.forward_ms) == len(timings.backward_ms) == 4
    assert all(t >= 0 for t in timings.forward_ms + timings.backward_ms)
    assert sum(timings.iteration_ms) <= timings.total_ms
    assert sum(timings.forward_ms) * 4 <= timings.forward_total_ms * 1.001


def test_missing_data_source_is_a_clear_error(tmp_path, capsys):
    assert main(["time", "--model", _write(tmp_path, MISSING_SOURCE)]) == 4
    err = capsys.readouterr().err
    assert "no/such/list.txt" in err
    assert "--data-shape C,H,W" in err


def test_data_shape_replaces_missing_data_layers(tmp_path, capsys):
    model = _write(tmp_path, MISSING_SOURCE)
    args = ["time", "--model", model, "--iterations", "2", "--data-shape", "2,3,4"]
    assert main(args) == 0
    lines = _messages(capsys.readouterr().err)
    notice = next(line for line in lines if "DummyData" in line)
    assert "data layers train_data, test_data," in notice and "(batch, 2, 3, 4)" in notice
    assert "Testing for 2 iterations." in lines


def test_dummy_data_stand_ins_keep_tops_and_phases():
    param = parse_text(MISSING_SOURCE, pb.NetParameter)
    replaced_param, replaced = replace_data_layers(param, (2, 3, 4), kind="DummyData")
    assert replaced == ["train_data", "test_data"]
    assert param.layer[0].type == "HDF5Data"  # the input message is left alone
    for phase, batch in ((pb.TRAIN, 6), (pb.TEST, 2)):
        net = Net(replaced_param, phase)
        assert net.blobs["data"].shape == (batch, 2, 3, 4)
        assert net.blobs["label"].shape == (batch,)
        net.forward()
        assert (net.blobs["data"].data == 0.5).all()
        assert (net.blobs["label"].data == 0).all()


@pytest.mark.gpu
def test_time_on_gpu(tmp_path, capsys):
    args = ["time", "--model", _write(tmp_path, TINY), "--iterations", "2", "--gpu", "0"]
    assert main(args) == 0
    lines = _messages(capsys.readouterr().err)
    assert lines[0] == "Use GPU with device ID 0"
    assert "Testing for 2 iterations." in lines
    assert re.fullmatch(rf"Average Forward-Backward: {NUMBER} ms.", lines[-3])
