"""Snapshots and resume: a run resumed at iteration k repeats the uninterrupted run exactly
(every solver type, both formats, with shuffled data and Dropout drawing on the generator);
the files Caffe reads; fine-tuning copies; test nets; divergence; the error paths."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_solver import TYPE_SETTINGS, make_solver, record_losses, solver_param

from netforge.errors import ConfigError, DataError, DivergenceError
from netforge.proto import pb
from netforge.solvers import get_solver
from netforge.solvers.snapshot import read_state
from netforge.train_log import MetricsWriter, setup_logging


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
@pytest.mark.parametrize("solver_type", sorted(TYPE_SETTINGS))
def test_resume_repeats_the_uninterrupted_run(tmp_path, solver_type, fmt):
    options = dict(dropout=True, shuffle=True, batch=3)
    settings = f"snapshot_format: {fmt} weight_decay: 0.01"
    whole = make_solver(tmp_path, solver_type, settings, **options)
    whole_losses = record_losses(whole)
    whole.step(7)

    first = make_solver(tmp_path, solver_type, settings + " snapshot: 4", **options)
    first.step(4)
    suffix = ".h5" if fmt == "HDF5" else ""
    state_file = tmp_path / f"snap_iter_4.solverstate{suffix}"
    assert state_file.is_file() and (tmp_path / f"snap_iter_4.caffemodel{suffix}").is_file()

    resumed = make_solver(tmp_path, solver_type, settings, **options)
    resumed.restore(state_file)
    assert resumed.iter == 4
    resumed_losses = record_losses(resumed)
    resumed.step(3)
    assert resumed_losses == whole_losses[4:]
    for a, b in zip(resumed.net.learnable_params, whole.net.learnable_params, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
    for a, b in zip(resumed.history, whole.history, strict=True):
        np.testing.assert_array_equal(a, b)


def test_binary_solverstate_is_caffes_layout(tmp_path):
    solver = make_solver(tmp_path, "Adam", 'lr_policy: "multistep" stepvalue: 1 stepvalue: 2')
    solver.step(3)
    path = solver.snapshot()
    message = pb.SolverState.FromString(path.read_bytes())
    assert message.iter == 3 and message.current_step == 2
    assert message.learned_net == f"{tmp_path}/snap_iter_3.caffemodel"
    assert len(message.history) == 4  # m for (w, b), then v for (w, b)
    np.testing.assert_allclose(
        np.array(message.history[2].double_data).reshape(1, 300), solver.history[2], rtol=0
    )
    assert list(message.history[0].shape.dim) == [1, 300]
    assert message.HasField("rng_state") and message.layer_state[0].layer == "data"
    # The caffemodel is a NetParameter with every layer and its blobs (no diff by default).
    model = pb.NetParameter.FromString((tmp_path / "snap_iter_3.caffemodel").read_bytes())
    assert [layer.name for layer in model.layer] == ["data", "innerprod", "loss"]
    assert len(model.layer[1].blobs) == 2 and not model.layer[1].blobs[0].double_diff


def test_hdf5_solverstate_is_caffes_layout(tmp_path):
    solver = make_solver(tmp_path, "AdaDelta", "snapshot_format: HDF5 snapshot_diff: true")
    solver.step(3)
    solver.snapshot()
    with h5py.File(tmp_path / "snap_iter_3.solverstate.h5", "r") as f:
        assert f["iter"][()].tolist() == [3] and f["current_step"][()].tolist() == [1]
        assert f["learned_net"][()].decode() == f"{tmp_path}/snap_iter_3.caffemodel.h5"
        assert sorted(f["history"]) == ["0", "1", "2", "3"]
        np.testing.assert_array_equal(f["history/3"][()], solver.history[3])
    with h5py.File(tmp_path / "snap_iter_3.caffemodel.h5", "r") as f:
        np.testing.assert_array_equal(
            f["data/innerprod/0"][()], solver.net.params["innerprod"][0].data
        )
        assert "diff" in f


def test_solve_snapshots_after_train_and_tests(tmp_path):
    param = solver_param(tmp_path, "SGD", "max_iter: 6 snapshot: 4 display: 3")
    param.snapshot_after_train = True
    param.test_iter.append(2)
    param.test_interval = 3
    param.test_compute_loss = True
    stream = io.StringIO()
    setup_logging(stream)
    solver = get_solver(param, dtype=np.float64)
    solver.metrics = MetricsWriter(tmp_path / "metrics.jsonl")
    solver.solve()
    log = stream.getvalue()
    assert sorted(p.name for p in tmp_path.glob("snap_iter_*")) == [
        "snap_iter_4.caffemodel",
        "snap_iter_4.solverstate",
        "snap_iter_6.caffemodel",
        "snap_iter_6.solverstate",
    ]
    assert [int(i) for i in re.findall(r"Iteration (\d+), Testing net \(#0\)", log)] == [0, 3, 6]
    assert "Optimization Done." in log and "Test loss: " in log
    # The test net shares the trained weights: its loss at the end equals a fresh forward.
    test_net = solver.test_nets[0]
    np.testing.assert_array_equal(
        test_net.params["innerprod"][0].data, solver.net.params["innerprod"][0].data
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "lr" in r]
    tests = [r for r in records if "test_net" in r]
    assert [r["iteration"] for r in train] == [0, 3]
    assert [r["iteration"] for r in tests] == [0, 3, 6]
    assert train[1]["lr"] == pytest.approx(np.float32(0.01) * 0.5)
    assert set(tests[0]["outputs"]) == {"loss"} and "loss" in tests[0]
    assert 0.0 <= train[1]["data_wait"] <= 1.0 and train[1]["elapsed"] > 0


def test_finetuning_copies_into_train_and_test_nets(tmp_path):
    source = make_solver(tmp_path, "SGD")
    source.step(2)
    source.snapshot()
    model = str(tmp_path / "snap_iter_2.caffemodel")
    param = solver_param(tmp_path, "SGD")
    param.test_iter.append(1)
    param.test_interval = 10
    tuned = get_solver(param, dtype=np.float64, weights=[model])
    expected = source.net.params["innerprod"][0].data
    np.testing.assert_array_equal(tuned.net.params["innerprod"][0].data, expected)
    np.testing.assert_array_equal(tuned.test_nets[0].params["innerprod"][0].data, expected)
    ((path, report),) = tuned.copy_reports
    assert path == model and report.copied == ["innerprod"]

    fresh = get_solver(param, dtype=np.float64, weights=[model], reinit=["innerprod"])
    assert not np.array_equal(fresh.net.params["innerprod"][0].data, expected)


def test_freeze_keeps_layer_weights(tmp_path):
    solver = get_solver(solver_param(tmp_path, "SGD"), dtype=np.float64, freeze=["inner*"])
    before = solver.net.params["innerprod"][0].data.copy()
    solver.step(2)
    np.testing.assert_array_equal(solver.net.params["innerprod"][0].data, before)
    with pytest.raises(ConfigError, match="no layer with parameters matches"):
        get_solver(solver_param(tmp_path, "SGD"), freeze=["conv*"])


def test_divergence_stops_with_last_good_snapshot(tmp_path):
    solver = make_solver(tmp_path, "SGD", "base_lr: 1e30", dtype=np.float32)
    with pytest.raises(DivergenceError, match=r"layer '\w+'") as info:
        solver.step(20)
    iteration = solver.iter
    assert f"snap_iter_{iteration}.solverstate" in str(info.value)
    saved = pb.NetParameter.FromString(
        (tmp_path / f"snap_iter_{iteration}.caffemodel").read_bytes()
    )
    assert np.isfinite(np.array(saved.layer[1].blobs[0].data)).all()

    carried = make_solver(tmp_path, "SGD", "base_lr: 1e30", dtype=np.float32)
    carried.allow_nonfinite = True
    carried.step(20)
    assert carried.iter == 20


def test_restore_errors(tmp_path):
    sgd = make_solver(tmp_path, "SGD")
    sgd.step(1)
    state = sgd.snapshot()
    # netforge's snapshots name their solver type: same-sized histories are refused too
    for other in ("Nesterov", "Adam"):
        with pytest.raises(
            ConfigError, match=f"written by a SGD solver, but this solver is {other}"
        ):
            make_solver(tmp_path, other).restore(state)
    # a Caffe solverstate has no type: the history count still tells SGD from Adam
    caffe_state = pb.SolverState.FromString(Path(state).read_bytes())
    caffe_state.ClearField("solver_type")
    Path(tmp_path / "caffe.solverstate").write_bytes(caffe_state.SerializeToString())
    with pytest.raises(ConfigError, match="solver type differs"):
        make_solver(tmp_path, "Adam").restore(tmp_path / "caffe.solverstate")
    with pytest.raises(ConfigError, match="caffemodel"):
        make_solver(tmp_path, "SGD").restore(tmp_path / "snap_iter_1.caffemodel")
    with pytest.raises(DataError, match="no such solver state"):
        make_solver(tmp_path, "SGD").restore(tmp_path / "missing.solverstate")
    (tmp_path / "snap_iter_1.caffemodel").unlink()
    with pytest.raises(DataError, match="learned_net"):
        make_solver(tmp_path, "SGD").restore(state)


def test_moved_snapshot_pair_still_resumes(tmp_path):
    solver = make_solver(tmp_path, "SGD")
    solver.step(2)
    state = read_state(solver.snapshot())
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("snap_iter_2.caffemodel", "snap_iter_2.solverstate"):
        (tmp_path / name).rename(moved / name)
    resumed = make_solver(tmp_path, "SGD")
    resumed.restore(moved / "snap_iter_2.solverstate")
    assert resumed.iter == state.iter == 2
    np.testing.assert_array_equal(
        resumed.net.params["innerprod"][0].data, solver.net.params["innerprod"][0].data
    )
