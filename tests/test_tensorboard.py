"""``netforge train --tensorboard DIR``: the event files hold the metrics file's scalars,
read back with a TFRecord reader written from the format (length, CRCs, Event protos)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest

from netforge.cli.main import main
from netforge.errors import ConfigError, DataError
from tests.nets import write_least_squares_solver

SOLVER = """test_iter: 2
test_interval: 4
base_lr: 0.01
lr_policy: "step"
gamma: 0.5
stepsize: 4
display: 2
max_iter: 8
random_seed: 3
"""


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value), ...] from the TFRecord event files in ``folder``."""
    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        at = 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            record = data[at + 12 : at + 12 + length]  # after length and its CRC
            at += 12 + length + 4  # and the data's CRC
            event = event_pb2.Event()
            event.ParseFromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


@pytest.fixture
def solver(tmp_path: Path) -> Path:
    return write_least_squares_solver(tmp_path, SOLVER)


def test_tensorboard_events_hold_the_metrics(solver: Path, tmp_path: Path) -> None:
    assert main(["train", "-solver", str(solver), "-tensorboard", str(tmp_path / "tb")]) == 0
    records = [
        json.loads(line) for line in (tmp_path / "ls_metrics.jsonl").read_text().splitlines()
    ]
    train = [r for r in records if "test_net" not in r]
    test = [r for r in records if "test_net" in r]
    events = _events(tmp_path / "tb")
    # one value per tag and step: no two scalars share a tag (an output named "loss" must not
    # land on the smoothed loss's tag)
    assert all(len({step for step, _ in e}) == len(e) for e in events.values())
    scalars = {tag: dict(e) for tag, e in events.items()}
    assert scalars["train/loss"] == pytest.approx({r["iteration"]: r["loss"] for r in train})
    # step policy: 0.01 until iteration 4, then halved
    assert scalars["train/lr"] == pytest.approx({0: 0.01, 2: 0.01, 4: 0.005, 6: 0.005})
    assert scalars["train/lr"] == pytest.approx({r["iteration"]: r["lr"] for r in train})
    assert scalars["train/loss"].keys() == scalars["train/data_wait"].keys()
    assert scalars["train/output/loss"] == pytest.approx(
        {r["iteration"]: r["outputs"]["loss"] for r in train}
    )
    assert scalars["test0/loss"] == pytest.approx(
        {r["iteration"]: r["outputs"]["loss"] for r in test}
    )
    assert set(scalars["test0/loss"]) == {0, 4, 8}


def test_tensorboard_without_tensorboardx_says_what_to_install(
    solver: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    argv = ["train", "--solver", str(solver), "--tensorboard", str(tmp_path / "tb")]
    assert main(argv) == ConfigError.exit_code
    assert "pip install 'netforge[tensorboard]'" in capsys.readouterr().err.splitlines()[-1]


def test_tensorboard_folder_that_is_a_file_is_one_error_line(
    solver: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "tb").write_text("a file")
    argv = ["train", "--solver", str(solver), "--tensorboard", str(tmp_path / "tb")]
    assert main(argv) == DataError.exit_code
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"netforge: error: {tmp_path / 'tb'}: cannot write TensorBoard events")
    assert (tmp_path / "tb").read_text() == "a file"
