"""netforge.draw and ``netforge draw`` (pycaffe's caffe.draw and draw_net.py): the DOT text
against hand-written expectations, phases, labels, quoting, every bundled net (the intent of
BVLC python/caffe/test/test_draw.py), pydot graphs, and images through graphviz."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import netforge
from netforge import draw
from netforge.cli.main import main
from netforge.errors import ConfigError, DataError
from netforge.proto import caffe_pb2
from netforge.prototxt import parse_text, read_net
from tests.conftest import shared_path

REPO = Path(__file__).resolve().parents[1]

NET = """
name: "small"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 1 dim: 1 dim: 8 dim: 8 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        param { lr_mult: 2 } convolution_param { num_output: 4 kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 10 } include { phase: TEST } }
layer { name: "drop" type: "Dropout" bottom: "pool" top: "drop" include { phase: TRAIN } }
"""


def small() -> caffe_pb2.NetParameter:
    return parse_text(NET, caffe_pb2.NetParameter)


def test_dot_text_of_a_small_net():
    dot = draw.draw_net(small(), "LR", "dot").decode()
    conv = r'"conv\n(Convolution)\nkernel size: 3\nstride: 2\npad: 1"'
    pool = r'"pool\n(Pooling AVE)\nkernel size: 2\nstride: 2\npad: 0"'
    expected = [
        'digraph "small" {',
        "rankdir=LR;",
        r'"data\n(Input)" [shape="record", fillcolor="#6495ED", style="filled"];',
        '"data" [shape="octagon", fillcolor="#E0E0E0", style="filled"];',
        f'{conv} [shape="record", fillcolor="#FF5050", style="filled"];',
        '"conv" [shape="octagon", fillcolor="#E0E0E0", style="filled"];',
        r'"relu\n(ReLU)" [shape="record", fillcolor="#90EE90", style="filled"];',
        f'{pool} [shape="record", fillcolor="#FF9900", style="filled"];',
        '"pool" [shape="octagon", fillcolor="#E0E0E0", style="filled"];',
        r'"ip\n(InnerProduct)" [shape="record", fillcolor="#CC33FF", style="filled"];',
        '"ip";',  # an output blob: pycaffe styles blobs only where they are bottoms
        r'"drop\n(Dropout)" [shape="record", fillcolor="#6495ED", style="filled"];',
        '"drop";',
        r'"data\n(Input)" -> "data" [label=""];',
        f'"data" -> {conv} [label=""];',
        f'{conv} -> "conv" [label="4"];',
        r'"conv" -> "relu\n(ReLU)" [label=""];',
        r'"relu\n(ReLU)" -> "conv" [label=""];',
        f'"conv" -> {pool} [label=""];',
        f'{pool} -> "pool" [label=""];',
        r'"pool" -> "ip\n(InnerProduct)" [label=""];',
        r'"ip\n(InnerProduct)" -> "ip" [label="10"];',
        r'"pool" -> "drop\n(Dropout)" [label=""];',
        r'"drop\n(Dropout)" -> "drop" [label=""];',
        "}",
    ]
    assert dot.splitlines() == expected


def test_phase_rankdir_and_learning_rate_multipliers():
    train = draw.draw_net(small(), "TB", "dot", phase=netforge.TRAIN, display_lrm=True).decode()
    assert "drop (Dropout)" in train and "InnerProduct" not in train
    assert "conv (Convolution) kernel size: 3 stride: 2 pad: 1 lr mult: 2.0, 1.0" in train
    test = draw.draw_net(small(), "LR", "dot", phase=netforge.TEST).decode()
    assert "Dropout" not in test and "InnerProduct" in test
    net = small()
    net.layer[1].exclude.add(phase=netforge.TRAIN)
    net.layer[1].include.add(phase=netforge.TEST)
    with pytest.raises(ValueError, match="both include and exclude"):
        draw.draw_net(net, "LR", "dot", phase=netforge.TEST)
    assert draw.get_layer_lr_mult(small().layer[4]) == (1.0, 1.0)
    with pytest.raises(ValueError, match="ReLU layers do not have"):
        draw.get_layer_lr_mult(small().layer[2])


def test_names_that_need_quoting_draw_as_they_are():
    net = small()
    net.layer[1].name = 'conv "a":b{c}'
    net.layer[1].top[0] = "conv/1:x"
    net.layer[2].bottom[0] = net.layer[2].top[0] = net.layer[3].bottom[0] = "conv/1:x"
    dot = draw.draw_net(net, "LR", "dot").decode()
    assert r'"conv \"a\":b\{c\}\n(Convolution)' in dot
    assert '"conv/1:x" [shape="octagon"' in dot


def bundled_nets():
    return sorted(p for p in (REPO / "models").rglob("*.prototxt") if "solver" not in p.name)


@pytest.mark.parametrize("path", bundled_nets(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_bundled_net_draws(path):
    net = read_net(path)
    dot = draw.draw_net(net, "LR", "dot").decode()
    assert dot.count("(") >= len(net.layer)  # every layer's "(Type)" is in a label


def test_every_bvlc_net_draws():
    """test_draw.py's loop over Caffe's own models and examples, as pycaffe parses them
    (text_format, no upgrade)."""
    from google.protobuf import text_format

    root = shared_path("caffe-models")
    paths = [p for p in root.rglob("*.prototxt") if "solver" not in p.name]
    assert paths
    for path in paths:
        net = caffe_pb2.NetParameter()
        text_format.Merge(path.read_text(), net)
        draw.draw_net(net, "LR", "dot")


def test_pydot_graph_holds_the_same_nodes_and_edges():
    graph = draw.get_pydot_graph(small(), "LR")
    assert len(graph.get_nodes()) == 11 and len(graph.get_edges()) == 11
    assert graph.get_node('"conv"')[0].get("shape") == "octagon"


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot program is not installed")
@pytest.mark.parametrize("ext, magic", [("png", b"\x89PNG"), ("svg", b"<?xml"), ("pdf", b"%PDF")])
def test_cli_draws_images_with_graphviz(tmp_path, ext, magic):
    out = tmp_path / f"caffenet.{ext}"
    net = REPO / "models" / "bvlc_reference_caffenet" / "train_val.prototxt"
    assert main(["draw", str(net), str(out), "--phase", "TRAIN", "--rankdir", "TB"]) == 0
    assert out.read_bytes().startswith(magic)


@pytest.mark.skipif(shutil.which("dot") is None, reason="graphviz's dot program is not installed")
def test_format_graphviz_lacks_is_one_error_line_with_dots_complaint(tmp_path, capsys):
    """pydot prints dot's failure to stdout before raising: only the error line shows."""
    net = REPO / "models" / "digits" / "deploy.prototxt"
    assert main(["draw", str(net), str(tmp_path / "digits.xyz")]) == 2
    out, err = capsys.readouterr()
    assert out == f"Drawing net to {tmp_path / 'digits.xyz'}\n"
    assert err.startswith('netforge: error: graphviz could not draw the net as .xyz: Format: "xyz"')
    assert "png" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "digits.xyz").exists()


def test_cli_writes_dot_text_and_says_what_to_install_for_png(tmp_path, monkeypatch, capsys):
    net = REPO / "models" / "digits" / "train_val.prototxt"
    assert main(["draw", str(net), str(tmp_path / "digits.gv"), "-display_lrm"]) == 0
    assert (tmp_path / "digits.gv").read_text().startswith("digraph")
    monkeypatch.setitem(sys.modules, "pydot", None)
    assert main(["draw", str(net), str(tmp_path / "digits.png")]) == 2
    assert "pip install 'netforge[draw]'" in capsys.readouterr().err
    assert not (tmp_path / "digits.png").exists()


def test_unwritable_output_is_one_error_line_and_keeps_the_old_file(tmp_path, capsys, monkeypatch):
    net = REPO / "models" / "digits" / "train_val.prototxt"
    assert main(["draw", str(net), str(tmp_path / "no_such_dir" / "digits.dot")]) == 4
    err = capsys.readouterr().err
    assert "netforge: error:" in err and "no_such_dir" in err and "Traceback" not in err
    old = tmp_path / "digits.dot"
    old.write_text("kept")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(DataError, match="No space left"):
        draw.draw_net_to_file(small(), old)
    assert old.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["digits.dot"]


def test_cli_refuses_an_unknown_rankdir(tmp_path, capsys):
    net = REPO / "models" / "digits" / "train_val.prototxt"
    assert main(["draw", str(net), str(tmp_path / "d.dot"), "--rankdir", "XY"]) == 2
    assert "XY" in capsys.readouterr().err
    assert main(["draw", str(net), str(tmp_path / "d.dot"), "--rankdir", "tb"]) == 0
    assert "rankdir=TB;" in (tmp_path / "d.dot").read_text()


def test_missing_dot_program_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="graphviz's dot program"):
        draw.draw_net(small(), "LR", "png")
