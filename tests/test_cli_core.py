"""The CLI shell: version, help, upgrade, device-query, and errors as one line + exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import GPU_AVAILABLE

import netforge
from netforge.cli.main import cli, main
from netforge.errors import DataError, DeviceError
from netforge.proto import pb
from netforge.prototxt import read_message

REPO = Path(__file__).resolve().parent.parent

V1_NET = """
name: "old"
input: "data" input_dim: 1 input_dim: 1 input_dim: 4 input_dim: 4
layers { name: "relu" type: RELU bottom: "data" top: "data" }
"""


def test_version_and_help() -> None:
    runner = CliRunner()
    assert netforge.__version__ in runner.invoke(cli, ["--version"]).output
    help_text = runner.invoke(cli, ["--help"]).output
    for command in ("train", "test", "time", "convert", "zoo", "upgrade", "device-query"):
        assert command in help_text


def test_upgrade_net_writes_current_format(tmp_path: Path) -> None:
    (tmp_path / "old.prototxt").write_text(V1_NET)
    assert (
        main(["upgrade", "net", str(tmp_path / "old.prototxt"), str(tmp_path / "new.prototxt")])
        == 0
    )
    net = read_message(tmp_path / "new.prototxt", pb.NetParameter)
    assert [layer.type for layer in net.layer] == ["Input", "ReLU"]
    assert 'type: "ReLU"' in (tmp_path / "new.prototxt").read_text()


def test_upgrade_binary_net_and_solver(tmp_path: Path) -> None:
    old = pb.NetParameter()
    layer = old.layers.add(name="ip", type=pb.V1LayerParameter.INNER_PRODUCT)
    layer.blobs_lr.extend([1, 2])
    (tmp_path / "old.caffemodel").write_bytes(old.SerializeToString())
    assert main(["upgrade", "net", str(tmp_path / "old.caffemodel"), str(tmp_path / "n.txt")]) == 0
    net = read_message(tmp_path / "n.txt", pb.NetParameter)
    assert net.layer[0].type == "InnerProduct" and net.layer[0].param[1].lr_mult == 2
    (tmp_path / "s.prototxt").write_text("solver_type: NESTEROV base_lr: 0.1")
    assert main(["upgrade", "solver", str(tmp_path / "s.prototxt"), str(tmp_path / "t.txt")]) == 0
    assert 'type: "Nesterov"' in (tmp_path / "t.txt").read_text()


def test_user_errors_are_one_line_and_nonzero(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "netforge", "upgrade", "net", str(tmp_path / "nope"), "out"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert result.returncode == DataError.exit_code
    assert result.stderr.strip().splitlines() == [
        f"netforge: error: {tmp_path / 'nope'}: no such file"
    ]
    assert "Traceback" not in result.stderr


def test_device_query_reports_blas_and_gemm_rate() -> None:
    result = CliRunner().invoke(cli, ["device-query", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["gemm_gflops_float32"] > 1
    assert report["blas"]["library"]
    assert isinstance(report["gpus"], list)


@pytest.mark.skipif(GPU_AVAILABLE, reason="a GPU is present, so it cannot be missing")
def test_device_query_for_a_missing_gpu_is_a_clear_error() -> None:
    assert main(["device-query", "--gpu", "0"]) == DeviceError.exit_code


def test_device_query_gpu_that_is_no_id_is_one_error_line(capsys) -> None:
    assert main(["device-query", "-gpu", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "netforge: error: --gpu 'x': give a GPU id, a comma list of ids, or 'all'"
