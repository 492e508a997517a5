"""``netforge train`` / ``netforge test``: end to end on Caffe's least-squares problem, the
log read back with the regexes of Caffe's tools/extra/parse_log.py, and the error paths
(exit status and a one-line message)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

from netforge.cli.main import main
from netforge.proto import pb

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "solver_data.h5"

NET = """
name: "least_squares"
layer {{ name: "data" type: "HDF5Data" top: "data" top: "targets"
        hdf5_data_param {{ source: "{source}" batch_size: 4 }} }}
layer {{ name: "innerprod" type: "InnerProduct" bottom: "data" top: "innerprod"
        inner_product_param {{ num_output: 1 weight_filler {{ type: "gaussian" std: 1.0 }}
                               bias_filler {{ type: "gaussian" std: 1.0 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "innerprod" bottom: "targets" top: "loss" }}
"""


@pytest.fixture
def files(tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{FIXTURE}\n")
    net = tmp_path / "net.prototxt"
    net.write_text(NET.format(source=listing))
    solver = tmp_path / "solver.prototxt"
    solver.write_text(
        f'net: "{net}"\ntest_iter: 2\ntest_interval: 4\nbase_lr: 0.01\nmomentum: 0.9\n'
        'lr_policy: "inv"\ngamma: 0.0001\npower: 0.75\ndisplay: 2\nmax_iter: 8\n'
        f'snapshot: 4\nsnapshot_prefix: "{tmp_path}/ls"\nrandom_seed: 3\n'
    )
    return tmp_path, net, solver


def parse_log(text: str) -> tuple[list[dict], list[dict]]:
    """A re-implementation of parse_log.py's row building (train and test rows)."""
    re_iteration = re.compile(r"Iteration (\d+)")
    re_train = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
    re_test = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
    re_lr = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
    iteration, lr = -1, float("nan")
    train, test = [], []
    for line in text.splitlines():
        if match := re_iteration.search(line):
            iteration = int(match.group(1))
        if iteration == -1:
            continue
        if match := re_lr.search(line):
            lr = float(match.group(1))
        for rows, regex in ((train, re_train), (test, re_test)):
            if match := regex.search(line):
                rows.append(
                    {
                        "NumIters": iteration,
                        "LearningRate": lr,
                        match.group(2): float(match.group(3)),
                    }
                )
    return train, test


GLOG = re.compile(r"^I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] ")


def test_train_end_to_end_log_parses_like_caffe(files, capsys):
    tmp_path, _, solver = files
    assert main(["train", "--solver", str(solver)]) == 0
    log = capsys.readouterr().err
    lines = log.splitlines()
    assert all(GLOG.match(line) for line in lines), [ln for ln in lines if not GLOG.match(ln)]
    assert "Solving least_squares" in log and "Optimization Done." in log
    train, test = parse_log(log)
    assert [row["NumIters"] for row in train] == [0, 2, 4, 6]
    assert [row["NumIters"] for row in test] == [0, 4, 8]
    # inv policy, printed with 6 significant digits. Caffe prints "Iteration it, lr" after the
    # train outputs, so (as in Caffe's logs) the row of iteration 6 carries iteration 4's rate.
    lr_at_4 = np.float32(0.01) * (1 + np.float32(0.0001) * 4) ** -0.75
    assert train[3]["LearningRate"] == pytest.approx(lr_at_4, rel=1e-5)
    assert train[0]["loss"] > train[3]["loss"]
    for name in ("ls_iter_4.caffemodel", "ls_iter_8.solverstate", "ls_metrics.jsonl"):
        assert (tmp_path / name).is_file()
    records = [json.loads(x) for x in (tmp_path / "ls_metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records if "lr" in r] == [0, 2, 4, 6]
    tested = [r for r in records if "test_net" in r]
    assert tested[-1]["outputs"]["loss"] == pytest.approx(test[-1]["loss"], rel=1e-5)


def test_resume_and_test_commands(files, capsys):
    tmp_path, net, solver = files
    assert main(["train", "--solver", str(solver), "--iterations", "4"]) == 0
    capsys.readouterr()
    state = tmp_path / "ls_iter_4.solverstate"
    assert main(["train", "--solver", str(solver), "--snapshot", str(state)]) == 0
    log = capsys.readouterr().err
    assert f"Resuming from {state}" in log
    assert "Iteration 0, Testing" not in log and "Iteration 4, Testing net (#0)" in log
    model = tmp_path / "ls_iter_8.caffemodel"
    assert main(["test", "--model", str(net), "--weights", str(model), "--iterations", "3"]) == 0
    log = capsys.readouterr().err
    batches = [float(v) for v in re.findall(r"Batch \d, loss = (\S+)", log)]
    assert len(batches) == 3
    mean = float(re.search(r"\] loss = (\S+) \(\* 1 = ", log).group(1))
    assert mean == pytest.approx(np.mean(batches), rel=1e-5)
    assert "Copied layers: data" not in log and "Copied layers: innerprod" in log


def test_finetune_flags(files, capsys):
    tmp_path, _, solver = files
    assert main(["train", "--solver", str(solver), "--iterations", "4"]) == 0
    model = tmp_path / "ls_iter_4.caffemodel"
    args = ["train", "--solver", str(solver), "--iterations", "2", "--weights", str(model)]
    assert main([*args, "--freeze", "inner*", "--metrics", str(tmp_path / "m.jsonl")]) == 0
    log = capsys.readouterr().err
    assert f"Finetuning from {model}" in log and "Freezing layers (lr_mult 0): innerprod" in log
    trained = pb.NetParameter.FromString(model.read_bytes()).layer[1].blobs[0].data
    frozen = pb.NetParameter.FromString((tmp_path / "ls_iter_2.caffemodel").read_bytes())
    np.testing.assert_array_equal(frozen.layer[1].blobs[0].data, trained)
    assert (tmp_path / "m.jsonl").is_file()
    assert main([*args, "--reinit", "innerprod"]) == 0
    assert "Re-initialised layers: innerprod" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, status, message",
    [
        (["--weights", "a.caffemodel", "--snapshot", "b.solverstate"], 2, "not both"),
        (["--snapshot", "{tmp}/ls_iter_4.caffemodel"], 2, "caffemodel"),
        (["--snapshot", "{tmp}/nothing.solverstate"], 4, "no such solver state"),
        (["--weights", "{tmp}/nothing.caffemodel"], 4, "no such weights file"),
        (["--gpu", "0,0"], 2, "a GPU is named twice; one rank per GPU"),
        (["--gpu", "x"], 2, "give a GPU id"),
        (["--iterations", "0"], 2, "--iterations must be positive"),
    ],
)
def test_train_error_paths(files, capsys, extra, status, message):
    tmp_path, _, solver = files
    args = ["train", "--solver", str(solver)] + [e.format(tmp=tmp_path) for e in extra]
    assert main(args) == status
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("netforge: error: ") and message in err[-1]


def test_divergence_exit_status(files, capsys):
    tmp_path, _, solver = files
    solver.write_text(solver.read_text().replace("base_lr: 0.01", "base_lr: 1e30"))
    assert main(["train", "--solver", str(solver)]) == 6
    err = capsys.readouterr().err.splitlines()[-1]
    assert "training diverged at iteration" in err and "layer '" in err
    assert main(["train", "--solver", str(solver), "--allow-nonfinite"]) == 0


def test_missing_solver_file(tmp_path, capsys):
    assert main(["train", "--solver", str(tmp_path / "none.prototxt")]) != 0
    assert "none.prototxt" in capsys.readouterr().err.splitlines()[-1]


def test_missing_relative_net_names_solver_and_working_directory(tmp_path, capsys, monkeypatch):
    # Caffe's own solvers name their nets from Caffe's root (net: "models/x/train_val...").
    solver = tmp_path / "solver.prototxt"
    solver.write_text(
        'net: "models/x/train_val.prototxt"\nbase_lr: 0.01\nlr_policy: "fixed"\nmax_iter: 1\n'
    )
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--solver", str(solver)]) == 4
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"netforge: error: {solver}: net file models/x/train_val.prototxt")
    assert f"resolved against the working directory {tmp_path}" in err


def test_gpu_all_without_cupy_is_a_device_error(files, capsys, monkeypatch):
    import netforge.backend as backends
    from netforge.errors import DeviceError

    def no_cupy():
        raise DeviceError("GPU mode needs cupy, which is not installed")

    monkeypatch.setattr(backends, "import_cupy", no_cupy)
    _, _, solver = files
    assert main(["train", "--solver", str(solver), "--gpu", "all"]) == 7
    assert "needs cupy" in capsys.readouterr().err.splitlines()[-1]


def test_progress_line_reports_rate_and_time_left():
    from netforge.train_log import ProgressLine

    stream = io.StringIO()
    progress = ProgressLine(stream, interval=0.0)
    progress.update(10, 100)
    progress._start -= 2.0  # 2 s since iteration 10
    progress.update(30, 100)
    text = stream.getvalue()
    assert text.startswith("\riteration 30/100  10.0 it/s  ETA 00:00:07")
    progress.clear()
    assert stream.getvalue().endswith("\r\x1b[K")


def test_metrics_path_that_is_a_folder_is_one_error_line(files, capsys):
    folder, _, solver = files
    assert main(["train", "--solver", str(solver), "--metrics", str(folder)]) == 4
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"netforge: error: {folder}: cannot write the metrics: Is a directory")


def test_missing_snapshot_folder_is_created(tmp_path):
    from netforge.prototxt import parse_text
    from netforge.solvers import get_solver

    net = tmp_path / "net.prototxt"
    net.write_text(
        'layer { name: "x" type: "DummyData" top: "x" top: "y" dummy_data_param { '
        "shape { dim: 2 dim: 3 } shape { dim: 2 dim: 1 } } }\n"
        'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "out" '
        "inner_product_param { num_output: 1 } }\n"
        'layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" }\n'
    )
    prefix = tmp_path / "runs" / "deep" / "model"
    param = parse_text(
        f'net: "{net}" base_lr: 0.1 lr_policy: "fixed" max_iter: 1 snapshot_prefix: "{prefix}"',
        pb.SolverParameter,
    )
    get_solver(param).solve()
    assert (tmp_path / "runs" / "deep" / "model_iter_1.caffemodel").is_file()
