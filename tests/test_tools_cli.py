"""Caffe's tool-side habits: gflags spellings on every command, the net-setup log lines,
``train --cpu``, and the upgrade tools' reports."""

from __future__ import annotations

import logging
from pathlib import Path

import click
import numpy as np
import pytest

from netforge.cli.flags import caffe_argv
from netforge.cli.main import cli, main
from netforge.errors import ConfigError, DataError, DeviceError
from netforge.net import Net
from netforge.proto import pb
from tests.nets import write_least_squares_net, write_least_squares_solver


def _argv(args: list[str]) -> list[str]:
    """``args`` as LazyGroup hands them to the subcommand (the first word is its name)."""
    ctx = click.Context(cli)
    name, command, rest = cli.resolve_command(ctx, args)
    return [name, *rest]


def test_caffe_single_dash_flags_become_click_options() -> None:
    assert _argv(["train", "-solver", "s.prototxt", "-gpu", "-1", "-weights=a,b"]) == [
        "train",
        "--solver",
        "s.prototxt",
        "--gpu",
        "-1",
        "--weights=a,b",
    ]
    # convert_imageset's README: underscores, -flag=value, bare booleans, -noflag
    assert _argv(
        ["convert", "imageset", "-resize_height=40", "-shuffle", "-backend=lmdb", "-nogray"]
        + ["-check_size=true", "-encoded=false", "root/", "list.txt", "db"]
    ) == [
        "convert",
        "imageset",
        "--resize-height=40",
        "--shuffle",
        "--backend=lmdb",
        "--check-size",
        "root/",
        "list.txt",
        "db",
    ]
    # a value that looks like a flag stays a value; an unknown flag reaches click whole
    assert _argv(["test", "-model", "-m.prototxt", "-bogus", "x", "-bo_gus=1"]) == [
        "test",
        "--model",
        "-m.prototxt",
        "--bogus",
        "x",
        "--bo-gus=1",
    ]
    # a command's own short options stay as typed, a value attached or not
    assert _argv(["classify", "-o", "p.npy", "-op.npy", "-h"]) == [
        "classify",
        "-o",
        "p.npy",
        "-op.npy",
        "-h",
    ]
    assert _argv(["upgrade", "net", "-h"]) == ["upgrade", "net", "-h"]
    # a script's own arguments are its own
    assert _argv(["pycaffe", "s.py", "-gpu", "0", "-help"]) == [
        "pycaffe",
        "s.py",
        "-gpu",
        "0",
        "-help",
    ]


def test_unknown_single_dash_flag_is_one_click_error(capsys: pytest.CaptureFixture) -> None:
    """A mistyped gflag is named whole, with the nearest option (not as the short option
    ``-r`` that click would read first in ``-resize_heigth``)."""
    assert main(["train", "-solverr", "x.prototxt"]) == 2
    assert "No such option '--solverr'" in capsys.readouterr().err
    argv = ["convert", "imageset", "-resize_heigth=40", "root/", "list.txt", "db"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "No such option '--resize-heigth'" in err and "--resize-height" in err


def test_caffe_argv_negative_flag_with_secondary_spelling() -> None:
    @click.command()
    @click.option("--shuffle/--no-shuffle", default=True)
    def command(shuffle: bool) -> None:
        """A command with a negative spelling."""

    ctx = click.Context(command)
    assert caffe_argv(command, ["-noshuffle"], ctx) == ["--no-shuffle"]
    assert caffe_argv(command, ["-shuffle=false"], ctx) == ["--no-shuffle"]
    assert caffe_argv(command, ["--no-shuffle=false"], ctx) == ["--shuffle"]


SOLVER = """base_lr: 0.01
lr_policy: "fixed"
max_iter: 2
display: 1
solver_mode: GPU
random_seed: 1
"""

# The net of the CLI tests: a ReLU, and a loss weight, for the setup lines to show.
NET = {"std": 1.0, "relu": True, "loss_weight": 0.5}


@pytest.fixture
def gpu_solver(tmp_path: Path) -> Path:
    return write_least_squares_solver(tmp_path, SOLVER, **NET)


def _no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(device_id: int = 0):
        raise DeviceError("cupy is installed but no CUDA GPU is present")

    monkeypatch.setattr("netforge.backend.gpu", refuse)


def test_solver_mode_gpu_without_gpu_offers_cpu(
    gpu_solver: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _no_gpu(monkeypatch)
    assert main(["train", "--solver", str(gpu_solver)]) == DeviceError.exit_code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "no CUDA GPU" in err and "--cpu" in err and "solver_mode: CPU" in err
    for flags in (["--cpu"], ["-gpu", "-1"], ["-cpu"]):
        assert main(["train", "-solver", str(gpu_solver), *flags]) == 0
        assert (gpu_solver.parent / "ls_iter_2.caffemodel").is_file()
        (gpu_solver.parent / "ls_iter_2.caffemodel").unlink()
    assert main(["train", "--solver", str(gpu_solver), "--cpu", "--gpu", "0"]) == 2


def test_explicit_gpu_error_is_not_rewritten(
    gpu_solver: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    _no_gpu(monkeypatch)
    assert main(["train", "--solver", str(gpu_solver), "--gpu", "0"]) == DeviceError.exit_code
    assert "--cpu" not in capsys.readouterr().err


def test_test_and_time_take_train_gpu_spellings(
    gpu_solver: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """-gpu -1 is the CPU in test and time as in train; 'all' asks for GPU 0 (Caffe's
    gpus[0]); a value that is no id is one error line, not a ValueError traceback."""
    _no_gpu(monkeypatch)
    assert main(["train", "-solver", str(gpu_solver), "-cpu"]) == 0
    net = str(gpu_solver.parent / "net.prototxt")
    scoring = ["test", "-model", net, "-weights", str(gpu_solver.parent / "ls_iter_2.caffemodel")]
    timing = ["time", "-model", net, "-iterations", "1"]
    for command in (scoring, timing):
        assert main([*command, "-gpu", "-1"]) == 0
        assert main([*command, "-gpu", "all"]) == DeviceError.exit_code
        assert main([*command, "-gpu", "first"]) == ConfigError.exit_code
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == "netforge: error: --gpu 'first': give a GPU id, a comma list of ids, or 'all'"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_net_setup_lines_in_caffe_format(tmp_path: Path) -> None:
    write_least_squares_net(tmp_path, **NET)
    handler = _Lines()
    logger = logging.getLogger("netforge")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        net = Net(str(tmp_path / "net.prototxt"), phase=pb.TRAIN)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    lines = handler.lines
    # solver_data.h5: data (8, 3, 10, 10), targets (8, 1); batch 4. Tops in order: data,
    # targets, ip, ip again (in-place ReLU), the scalar loss; 4 bytes per float32 element.
    counts = [4 * 300, 4, 4, 4, 1]
    assert lines[: lines.index("Creating Layer ip")] == [
        "Creating Layer data",
        "data -> data",
        "data -> targets",
        "Setting up data",
        "Top shape: 4 3 10 10 (1200)",
        "Top shape: 4 1 (4)",
        f"Memory required for data: {4 * (counts[0] + counts[1])}",
    ]
    assert "relu -> ip (in-place)" in lines
    loss_at = lines.index("Setting up loss")
    assert lines[loss_at - 4 : loss_at + 4] == [
        "Creating Layer loss",
        "loss <- ip",
        "loss <- targets",
        "loss -> loss",
        "Setting up loss",
        "Top shape: (1)",
        "    with loss weight 0.5",
        f"Memory required for data: {4 * sum(counts)}",
    ]
    assert lines[-6:] == [
        "loss needs backward computation.",
        "relu needs backward computation.",
        "ip needs backward computation.",
        "data does not need backward computation.",
        "This network produces output loss",
        "Network initialization done.",
    ]
    assert net.outputs == ["loss"]


V1_SOLVER = """base_lr: 0.1
net_param {
  name: "old"
  layers { name: "ip" type: INNER_PRODUCT bottom: "x" top: "y"
           inner_product_param { num_output: 1 } }
}
"""


def test_upgrade_solver_reports_embedded_net_upgrade(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "s.prototxt").write_text(V1_SOLVER)
    assert main(["upgrade", "solver", str(tmp_path / "s.prototxt"), str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    assert "already in the latest format" not in out
    assert "net_param: V1 layers → current" in out
    assert 'type: "InnerProduct"' in (tmp_path / "t").read_text()


def test_upgrade_binary_net_stays_binary_with_its_weights(tmp_path: Path) -> None:
    """Caffe's upgrade_net_proto_binary: a V1 .caffemodel upgrades to a binary net whose
    weights load (written as text, the .caffemodel could not be read back)."""
    old = pb.NetParameter(name="v1", input=["data"], input_dim=[1, 1, 2, 2])
    layer = old.layers.add(name="ip", type=pb.V1LayerParameter.INNER_PRODUCT)
    layer.bottom.append("data")
    layer.top.append("ip")
    layer.inner_product_param.num_output = 2
    weight = np.arange(8, dtype=np.float32) / 4
    layer.blobs.add(num=1, channels=1, height=2, width=4).data.extend(weight)
    layer.blobs.add(num=1, channels=1, height=1, width=2).data.extend([0.5, -1.5])
    (tmp_path / "old.caffemodel").write_bytes(old.SerializeToString())
    argv = ["upgrade", "net", str(tmp_path / "old.caffemodel"), str(tmp_path / "new.caffemodel")]
    assert main(argv) == 0
    new = pb.NetParameter()
    new.ParseFromString((tmp_path / "new.caffemodel").read_bytes())
    assert [(x.name, x.type) for x in new.layer] == [("input", "Input"), ("ip", "InnerProduct")]
    deploy = tmp_path / "deploy.prototxt"
    deploy.write_text(
        'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 '
        'dim: 2 dim: 2 } } }\nlayer { name: "ip" type: "InnerProduct" bottom: "data" '
        'top: "ip" inner_product_param { num_output: 2 } }\n'
    )
    net = Net(str(deploy), weights=str(tmp_path / "new.caffemodel"))
    np.testing.assert_array_equal(net.params["ip"][0].data, weight.reshape(2, 4))
    np.testing.assert_array_equal(net.params["ip"][1].data, [0.5, -1.5])


def test_upgrade_net_unknown_type_names_layer_and_nearest(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "n.prototxt").write_text(
        'layer { name: "act" type: "ReLu" bottom: "x" top: "x" }\n'
    )
    status = main(["upgrade", "net", str(tmp_path / "n.prototxt"), str(tmp_path / "out")])
    assert status == ConfigError.exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'act'" in err and "'ReLu'" in err and "did you mean 'ReLU'" in err
    assert str(tmp_path / "out") in err and (tmp_path / "out").is_file()


def _missing_data_net(tmp_path: Path, layer: str) -> Path:
    path = tmp_path / "nets" / "missing.prototxt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f'name: "m"\n{layer}\n')
    return path


def _lmdb(path: Path) -> None:
    from netforge.data.datum import make_datum
    from netforge.data.db import Writer

    with Writer(path) as writer:
        writer.put("0", make_datum(np.zeros((1, 2, 2), np.uint8)).SerializeToString())


@pytest.mark.parametrize(
    "layer, missing",
    [
        (
            'layer { name: "mnist" type: "Data" top: "data" top: "label"\n'
            '  data_param { source: "db/no_such_lmdb" batch_size: 2 backend: LMDB } }',
            "db/no_such_lmdb",
        ),
        (
            'layer { name: "mnist" type: "Data" top: "data" top: "label"\n'
            '  transform_param { mean_file: "no_mean.binaryproto" }\n'
            '  data_param { source: "real_lmdb" batch_size: 2 backend: LMDB } }',
            "no_mean.binaryproto",
        ),
        (
            'layer { name: "mnist" type: "HDF5Data" top: "data" top: "label"\n'
            '  hdf5_data_param { source: "no_list.txt" batch_size: 2 } }',
            "no_list.txt",
        ),
    ],
)
def test_missing_data_names_layer_prototxt_and_working_directory(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    layer: str,
    missing: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    _lmdb(tmp_path / "real_lmdb")
    net = _missing_data_net(tmp_path, layer)
    assert main(["time", "--model", str(net), "--iterations", "1"]) == DataError.exit_code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("netforge: error:")]
    assert "layer 'mnist'" in line and str(net) in line and missing in line
    assert f"resolved against the working directory, {tmp_path}" in line


def test_missing_absolute_data_path_has_no_working_directory_note(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    source = tmp_path / "no_list.txt"
    layer = (
        'layer { name: "h5" type: "HDF5Data" top: "data" top: "label"\n'
        f'  hdf5_data_param {{ source: "{source}" batch_size: 2 }} }}'
    )
    net = _missing_data_net(tmp_path, layer)
    assert main(["time", "--model", str(net)]) == DataError.exit_code
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("netforge: err")]
    assert "layer 'h5' (HDF5Data)" in line and str(net) in line and str(source) in line
    assert "working directory" not in line


def test_readme_documents_every_exit_code() -> None:
    import netforge.errors as errors

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = readme[readme.index("Exit status:") :].split("\n\n")[0]
    codes = {
        cls.exit_code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.NetforgeError)
    }
    for code in sorted(codes | {130}):
        assert f" {code} " in documented.replace("\n", " "), code
