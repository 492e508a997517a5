"""A prototxt is data: the CLI runs its Python layers only when the user allows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from netforge.cli.main import main
from netforge.errors import ConfigError

NET = """
layer { name: "data" type: "DummyData" top: "x" top: "y"
        dummy_data_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 3 } } }
layer { name: "py" type: "Python" bottom: "x" top: "z"
        python_param { module: "pylayers" layer: "ScaleByParamStr" param_str: "2" } }
layer { name: "loss" type: "EuclideanLoss" bottom: "z" bottom: "y" top: "loss" }
"""


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "net.prototxt").write_text(NET)
    (tmp_path / "solver.prototxt").write_text(
        f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.1 lr_policy: "fixed" max_iter: 1 '
        f'snapshot_after_train: false snapshot_prefix: "{tmp_path / "s"}"'
    )
    (tmp_path / "empty.caffemodel").write_bytes(b"")
    return {"net": str(tmp_path / "net.prototxt"), "solver": str(tmp_path / "solver.prototxt")}


COMMANDS = {
    "train": lambda f: ["train", "--solver", f["solver"]],
    "time": lambda f: ["time", "--model", f["net"], "--iterations", "1"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_refuses_python_layers_by_default(command, files, capsys, monkeypatch) -> None:
    monkeypatch.delenv("NETFORGE_ALLOW_PYTHON_LAYERS", raising=False)
    assert main(COMMANDS[command](files)) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert "Python layer" in err and "--allow-python-layers" in err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_runs_python_layers_when_allowed(command, files, monkeypatch) -> None:
    monkeypatch.delenv("NETFORGE_ALLOW_PYTHON_LAYERS", raising=False)
    assert main([*COMMANDS[command](files), "--allow-python-layers"]) == 0
    monkeypatch.setenv("NETFORGE_ALLOW_PYTHON_LAYERS", "1")
    assert main(COMMANDS[command](files)) == 0


def test_test_command_honours_the_policy(files, tmp_path, monkeypatch) -> None:
    from netforge.net import Net

    monkeypatch.delenv("NETFORGE_ALLOW_PYTHON_LAYERS", raising=False)
    Net(files["net"]).save(tmp_path / "w.caffemodel")
    args = ["test", "--model", files["net"], "--weights", str(tmp_path / "w.caffemodel"),
            "--iterations", "1"]  # fmt: skip
    assert main(args) == ConfigError.exit_code
    assert main([*args, "--allow-python-layers"]) == 0
