"""``netforge parse-log`` and ``netforge plot``: parse_log.py's tables from a Caffe log
(rows worked out by hand from its rules), from netforge's metrics file, from a real run of
both, and plot_training_log.py's chart types."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from netforge.cli.main import main
from netforge.errors import ConfigError, DataError
from netforge.logs import parse_caffe_log, parse_metrics, read_training_log
from netforge.plot import CHART_TYPES, chart_data, describe
from tests.nets import write_least_squares_solver

# A Caffe log across New Year: the seconds must keep counting up (the year rolls forward).
CAFFE_LOG = """\
I1231 23:59:58.000000   100 caffe.cpp:218] Starting Optimization
I1231 23:59:58.250000   100 solver.cpp:337] Iteration 0 comes before the start: ignored
I1231 23:59:58.500000   100 solver.cpp:280] Solving LeNet
I1231 23:59:58.600000   100 solver.cpp:281] Learning Rate Policy: inv
I1231 23:59:59.000000   100 solver.cpp:337] Iteration 0, Testing net (#0)
I1231 23:59:59.250000   100 solver.cpp:404]     Test net output #0: accuracy = 0.0961
I1231 23:59:59.250000   100 solver.cpp:404]     Test net output #1: loss = 2.33 (* 1 = 2.33 loss)
I1231 23:59:59.500000   100 solver.cpp:228] Iteration 0, loss = 2.31
I1231 23:59:59.500000   100 solver.cpp:244]     Train net output #0: loss = 2.31 (* 1 = 2.31 loss)
I1231 23:59:59.500000   100 sgd_solver.cpp:106] Iteration 0, lr = 0.01
I0101 00:00:01.500000   100 solver.cpp:228] Iteration 100, loss = 0.25
I0101 00:00:01.500000   100 solver.cpp:244]     Train net output #0: loss = 0.25 (* 1 = 0.25 loss)
I0101 00:00:01.500000   100 sgd_solver.cpp:106] Iteration 100, lr = 0.00992565
I0101 00:00:02.000000   100 solver.cpp:337] Iteration 200, Testing net (#0)
I0101 00:00:02.500000   100 solver.cpp:404]     Test net output #0: accuracy = 0.97
I0101 00:00:02.500000   100 solver.cpp:404]     Test net output #1: loss = 9e-02 (* 1 = 0.09 loss)
"""

# parse_log.py's rows, by its rules: a row opens on an output line of a new iteration and
# closes when it has the first row's columns; the first row's NaN rate comes from the second.
TRAIN_CSV = "NumIters,Seconds,LearningRate,loss\r\n0.0,1.0,0.01,2.31\r\n100.0,3.0,0.01,0.25\r\n"
TEST_CSV = (
    "NumIters,Seconds,LearningRate,accuracy,loss\r\n"
    "0.0,0.75,0.00992565,0.0961,2.33\r\n"
    "200.0,4.0,0.00992565,0.97,0.09\r\n"
)


def test_parse_log_writes_parse_log_py_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    log = tmp_path / "lenet.log"
    log.write_text(CAFFE_LOG)
    assert main(["parse-log", str(log), str(tmp_path)]) == 0
    assert (tmp_path / "lenet.log.train").read_bytes().decode() == TRAIN_CSV
    assert (tmp_path / "lenet.log.test").read_bytes().decode() == TEST_CSV
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {tmp_path / 'lenet.log.train'} (2 rows)",
        f"wrote {tmp_path / 'lenet.log.test'} (2 rows)",
    ]
    assert main(["parse-log", str(log), str(tmp_path), "-delimiter", ";"]) == 0
    assert (tmp_path / "lenet.log.train").read_text().splitlines()[1] == "0.0;1.0;0.01;2.31"


def test_parse_log_table_that_cannot_be_written_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    log = tmp_path / "lenet.log"
    log.write_text(CAFFE_LOG)
    (tmp_path / "lenet.log.train").mkdir()  # in the way of the table
    assert main(["parse-log", str(log), str(tmp_path)]) == DataError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"netforge: error: {tmp_path / 'lenet.log.train'}: cannot write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenet.log", "lenet.log.train"]


def test_metrics_file_tables(tmp_path: Path) -> None:
    records = [
        {"iteration": 0, "test_net": 0, "elapsed": 0.5, "outputs": {"accuracy": 0.1}},
        {"iteration": 0, "test_net": 1, "elapsed": 0.6, "outputs": {"accuracy": 0.2}},
        {"iteration": 0, "loss": 2.3, "lr": 0.01, "elapsed": 0.7, "data_wait": 0.0,
         "outputs": {"loss": 2.31, "top": [0.25, 0.75]}},
        {"iteration": 100, "loss": 0.3, "lr": 0.009, "elapsed": 1.5, "data_wait": 0.1,
         "outputs": {"loss": 0.29, "top": [0.5, 0.5]}},
        {"iteration": 100, "test_net": 0, "elapsed": 2.0, "outputs": {"accuracy": 0.9},
         "loss": 0.4},
    ]  # fmt: skip
    path = tmp_path / "run_metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train, test = read_training_log(path)
    assert train == [
        {"NumIters": 0.0, "Seconds": 0.7, "LearningRate": 0.01, "loss": 2.31}
        | {"top[0]": 0.25, "top[1]": 0.75},
        {"NumIters": 100.0, "Seconds": 1.5, "LearningRate": 0.009, "loss": 0.29}
        | {"top[0]": 0.5, "top[1]": 0.5},
    ]
    # test net 0 only; the first row's rate (none yet) is the second row's, as parse_log.py
    assert test == [
        {"NumIters": 0.0, "Seconds": 0.5, "LearningRate": 0.009, "accuracy": 0.1},
        {"NumIters": 100.0, "Seconds": 2.0, "LearningRate": 0.009, "accuracy": 0.9},
    ]
    # a run killed while writing a record leaves its last line cut short: the rest is read
    whole = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(whole + json.dumps(records[2])[:30])
    assert read_training_log(path) == (train, test)
    path.write_text('{"iteration": 1}\n')
    with pytest.raises(DataError, match=r"run_metrics.jsonl:1: not a netforge metrics record"):
        parse_metrics(path)


def test_log_without_solving_line_is_an_error(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("hello\n")
    with pytest.raises(DataError, match="no 'Solving' line"):
        parse_caffe_log(log)
    assert main(["parse-log", str(tmp_path / "missing.log"), str(tmp_path)]) == 4


SOLVER = """test_iter: 2
test_interval: 4
base_lr: 0.01
lr_policy: "inv"
gamma: 0.0001
power: 0.75
display: 2
max_iter: 8
random_seed: 3
"""


def test_netforge_log_and_metrics_give_the_same_tables(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    solver = write_least_squares_solver(tmp_path, SOLVER)
    assert main(["train", "--solver", str(solver)]) == 0
    (tmp_path / "train.log").write_text(capsys.readouterr().err)
    from_log = parse_caffe_log(tmp_path / "train.log")
    from_metrics = parse_metrics(tmp_path / "ls_metrics.jsonl")
    train_log, test_log = from_log
    train_metrics, test_metrics = from_metrics
    assert [r["NumIters"] for r in test_log] == [0.0, 4.0, 8.0]
    # as in Caffe, max_iter's display line has no train outputs: no row for iteration 8
    assert [r["NumIters"] for r in train_log] == [0.0, 2.0, 4.0, 6.0]
    for log_rows, metric_rows in ((train_log, train_metrics), (test_log, test_metrics)):
        assert [r["NumIters"] for r in log_rows] == [r["NumIters"] for r in metric_rows]
        for a, b in zip(log_rows, metric_rows):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["Seconds"] >= 0 and math.isfinite(a["LearningRate"])


def test_chart_types_follow_caffes_numbering(tmp_path: Path) -> None:
    assert [describe(i) for i in range(8)] == [
        "Test accuracy  vs. Iters",
        "Test accuracy  vs. Seconds",
        "Test loss  vs. Iters",
        "Test loss  vs. Seconds",
        "Train learning rate  vs. Iters",
        "Train learning rate  vs. Seconds",
        "Train loss  vs. Iters",
        "Train loss  vs. Seconds",
    ]
    assert len(CHART_TYPES) == 8
    log = tmp_path / "lenet.log"
    log.write_text(CAFFE_LOG)
    assert chart_data(0, log) == ([0.0, 200.0], [0.0961, 0.97])
    assert chart_data(3, log) == ([0.75, 4.0], [2.33, 0.09])
    assert chart_data(4, log) == ([0.0, 100.0], [0.01, 0.01])
    assert chart_data(7, log) == ([1.0, 3.0], [2.31, 0.25])
    with pytest.raises(ConfigError, match="chart type 8 is not one of 0-7"):
        chart_data(8, log)


def test_plot_writes_png_and_svg(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = tmp_path / "lenet.log"
    log.write_text(CAFFE_LOG)
    assert main(["plot", "0", str(tmp_path / "a.png"), str(log)]) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", "6", str(tmp_path / "b.svg"), str(log), str(log)]) == 0
    assert b"<svg" in (tmp_path / "b.svg").read_bytes()[:1000]
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"wrote {tmp_path / 'b.svg'}: Train loss  vs. Iters of 2 log(s)"
    assert main(["plot", "0", str(tmp_path / "c.xyz"), str(log)]) == ConfigError.exit_code
    assert "cannot write a .xyz image" in capsys.readouterr().err


def test_plot_that_fails_while_writing_keeps_the_old_chart(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    log = tmp_path / "lenet.log"
    log.write_text(CAFFE_LOG)
    assert main(["plot", "0", str(tmp_path / "a.png"), str(log)]) == 0
    old = (tmp_path / "a.png").read_bytes()

    def disk_full(self, target, **kwargs):
        target.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_full)
    assert main(["plot", "6", str(tmp_path / "a.png"), str(log)]) == DataError.exit_code
    assert "a.png: cannot write the chart: No space left on device" in capsys.readouterr().err
    assert (tmp_path / "a.png").read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "lenet.log"]


def test_plot_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    log = tmp_path / "lenet.log"
    log.write_text(CAFFE_LOG)
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)
    assert main(["plot", "0", str(tmp_path / "a.png"), str(log)]) == ConfigError.exit_code
    assert "pip install 'netforge[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
