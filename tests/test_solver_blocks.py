"""The solver's blocked, threaded element-wise passes (netforge/solvers/blocks.py): with
blocks far smaller than the parameters and several threads, every solver type still matches
the independent float64 reference and gives bit-for-bit the whole-array results; the
finiteness check sees a NaN in any block; restored or replaced arrays are picked up."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
from conftest import level1_or_skip
from test_solver import CASES, TYPE_SETTINGS, make_solver, record_losses, reference_run

from netforge.blob import Blob
from netforge.builtin_layers import _threads
from netforge.errors import DivergenceError
from netforge.proto import pb
from netforge.solvers import blocks


@pytest.fixture
def small_blocks(monkeypatch):
    """7-element blocks (the 300-weight parameter becomes 43 ragged blocks), threads from
    the first block on."""
    monkeypatch.setattr(blocks, "CPU_BLOCK", 7)
    monkeypatch.setattr(blocks, "BLOCKS_PER_THREAD", 1)
    monkeypatch.setattr(blocks, "MAX_THREADS", 3)


def expected_lanes() -> int:
    return min(3, blocks.WORKERS)


@pytest.mark.parametrize("case", ["l2_mults", "l1", "iter_size"])
@pytest.mark.parametrize("solver_type", sorted(TYPE_SETTINGS))
def test_small_blocks_match_reference_and_whole_arrays(tmp_path, solver_type, case, request):
    settings, net_options, reference_options = CASES[case]
    whole = make_solver(tmp_path, solver_type, settings, **net_options)
    whole.step(5)
    request.getfixturevalue("small_blocks")
    blocked = make_solver(tmp_path, solver_type, settings, **net_options)
    assert len(blocked._param_blocks()) == 43 + 1
    assert blocked._blocks._threads == expected_lanes()
    w0, b0 = (p.data.copy() for p in blocked.net.params["innerprod"])
    losses = record_losses(blocked)
    blocked.step(5)
    (w, b), expected_losses = reference_run(solver_type, w0, b0, 5, **reference_options)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-10)
    np.testing.assert_allclose(blocked.net.params["innerprod"][0].data, w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(blocked.net.params["innerprod"][1].data, b, rtol=1e-9, atol=1e-12)
    for mine, theirs in zip(blocked.net.learnable_params, whole.net.learnable_params):
        np.testing.assert_array_equal(mine.data, theirs.data)
        np.testing.assert_array_equal(mine.diff, theirs.diff)
    for mine, theirs in zip(blocked.history, whole.history):
        np.testing.assert_array_equal(mine, theirs)


def test_float32_blocks_equal_whole_arrays_bit_for_bit(tmp_path, small_blocks, monkeypatch):
    blocked = make_solver(tmp_path, "Nesterov", "weight_decay: 0.01", dtype=np.float32)
    blocked.step(4)
    monkeypatch.setattr(blocks, "CPU_BLOCK", 1 << 16)
    monkeypatch.setattr(blocks, "BLOCKS_PER_THREAD", 8)
    whole = make_solver(tmp_path, "Nesterov", "weight_decay: 0.01", dtype=np.float32)
    assert len(whole._param_blocks()) == 2 and whole._blocks._threads == 1
    whole.step(4)
    for mine, theirs in zip(blocked.net.learnable_params, whole.net.learnable_params):
        assert mine.data.dtype == np.float32
        np.testing.assert_array_equal(mine.data, theirs.data)


def test_non_contiguous_weights_are_updated_in_place(tmp_path, small_blocks):
    """Weights set to a strided view (no flat view exists) are one block, updated in place."""
    solver = make_solver(tmp_path, "SGD", "weight_decay: 0.1")
    weight, bias = solver.net.params["innerprod"]
    w0, b0 = weight.data.copy(), bias.data.copy()
    backing = np.zeros((1, 600))
    backing[:, ::2] = w0
    weight.data = backing[:, ::2]
    solver.step(3)
    (w, b), _ = reference_run("SGD", w0, b0, 3, weight_decay=0.1)
    np.testing.assert_allclose(backing[:, ::2], w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bias.data, b, rtol=1e-9, atol=1e-12)
    assert not backing[:, 1::2].any()


def test_nan_in_a_late_block_stops_before_the_update(tmp_path, small_blocks):
    solver = make_solver(tmp_path, "SGD", dtype=np.float32)
    weight = solver.net.params["innerprod"][0]
    states = [weight.data.copy()]
    for _ in range(2):
        solver.step(1)
        states.append(weight.data.copy())
    passes = solver.net.forward_backward

    def poisoned() -> float:
        """A backward that writes a NaN into the weight diff and bounds nothing."""
        loss = passes()
        weight.diff[0, 297] = np.nan
        solver.net.param_diff_bounds[solver.net.learnable_params.index(weight)] = math.inf
        return loss

    solver.net.forward_backward = poisoned
    with pytest.raises(DivergenceError, match="innerprod"):
        solver.step(1)
    # No NaN reached the weights: the solver is back at its last good state (issue 19),
    # an iteration whose forward and backward were finite.
    assert solver.iter < 2
    np.testing.assert_array_equal(weight.data, states[solver.iter])


def read_diffs(solver) -> list[str]:
    """Run one iteration; return the names of the learnable parameters whose diffs the
    finiteness check read."""
    read = set()
    total = solver._blocks.total

    def spy(array):
        for (layer, index), blob in zip(
            solver.net.learnable_param_ids, solver.net.learnable_params
        ):
            if np.shares_memory(array, blob.diff):
                read.add(f"{layer}/{index}")
        return total(array)

    solver._blocks.total = spy
    solver.step(1)
    return sorted(read)


def test_check_reads_only_diffs_without_a_bound(tmp_path, small_blocks):
    """InnerProduct bounds its gradients, so the check reads neither; a layer that reports
    nothing has both read, and a NaN there still stops training."""
    solver = make_solver(tmp_path, "SGD", dtype=np.float32)
    assert read_diffs(solver) == []
    layer = solver.net.layer_dict["innerprod"]
    backward = layer.backward

    def unbounded(*args):
        backward(*args)
        layer.diff_bounds = None

    layer.backward = unbounded
    assert read_diffs(solver) == ["innerprod/0", "innerprod/1"]

    def poisoned(*args):
        unbounded(*args)
        layer.blobs[1].diff[0] = np.inf

    layer.backward = poisoned
    with pytest.raises(DivergenceError, match=r"param 1.*innerprod"):
        solver.step(1)


def test_restore_uses_the_restored_history(tmp_path, small_blocks):
    """restore replaces the history arrays: the blocks must follow, or the resumed steps
    would read the old buffers."""
    solver = make_solver(tmp_path, "Adam", "weight_decay: 0.01")
    solver.step(3)
    state = solver.snapshot()
    solver.step(3)
    expected = [p.data.copy() for p in solver.net.learnable_params]
    solver.restore(state)
    solver.step(3)
    for blob, want in zip(solver.net.learnable_params, expected):
        np.testing.assert_array_equal(blob.data, want)


@pytest.mark.parametrize("calls", [[3], [1, 1, 1]])
def test_sgd_diff_holds_the_step_after_step(tmp_path, small_blocks, calls):
    """SGD's update leaves the gradients in the diffs inside ``step`` (its step lives in
    the history, and the next backward writes over them); what users see is still Caffe's:
    zero diffs at the start of each iteration and, after ``step``, each diff holding the
    last step."""
    solver = make_solver(tmp_path, "SGD", "weight_decay: 0.1")
    params = solver.net.learnable_params
    at_start: list[float] = []
    before_update: list[list[np.ndarray]] = []
    solver.add_callback(
        on_start=lambda: at_start.append(sum(abs(p.diff).sum() for p in params)),
        on_gradients_ready=lambda: before_update.append(
            [p.data.copy() for p in params] + [h.copy() for h in solver.history]
        ),
    )
    for n in calls:
        solver.step(n)
    assert at_start == [0.0] * 3
    before, previous_history = before_update[-1][:2], before_update[-1][2:]
    for blob, old, history, old_history in zip(params, before, solver.history, previous_history):
        np.testing.assert_array_equal(blob.diff, history)
        np.testing.assert_array_equal(old - blob.diff, blob.data)
        assert not np.array_equal(history, old_history)


@pytest.mark.parametrize("how", ["interval", "request", "stop"])
def test_sgd_diffs_seen_mid_step_hold_the_step(tmp_path, how):
    """Snapshots written inside ``step`` (by interval or on request) save the step as the
    diff, and ``step`` stopped early leaves it in the diffs."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    settings = "snapshot_diff: true weight_decay: 0.1" + (
        " snapshot: 2" if how == "interval" else ""
    )
    solver = make_solver(tmp_path / "a", "SGD", settings)
    if how != "interval":
        solver.set_action_function(
            lambda: ("snapshot" if how == "request" else how) if solver.iter == 2 else "none"
        )
    solver.step(4)
    reference = make_solver(tmp_path / "b", "SGD", "weight_decay: 0.1")
    reference.step(2)
    if how == "stop":
        assert solver.iter == 2
        diffs = [p.diff.ravel() for p in solver.net.learnable_params]
    else:
        saved = pb.NetParameter.FromString((tmp_path / "a" / "snap_iter_2.caffemodel").read_bytes())
        layer = next(layer for layer in saved.layer if layer.name == "innerprod")
        diffs = [np.array(blob.double_diff or blob.diff) for blob in layer.blobs]
    for diff, expected in zip(diffs, reference.net.learnable_params, strict=True):
        assert diff.any()
        np.testing.assert_array_equal(diff, expected.diff.ravel())


def watch_fused_update(solver, allow: bool) -> list:
    """The solver's ``fused_update`` results, one per update, recorded; with ``allow`` False
    it offers none, so that the update runs the numpy chain."""
    offered = solver.fused_update
    taken: list = []

    def watched(*args):
        taken.append(offered(*args) if allow else None)
        return taken[-1]

    solver.fused_update = watched
    return taken


@pytest.mark.parametrize("case", ["plain", "l2_mults", "iter_size"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_blas_update_computes_the_chains_formula(tmp_path, small_blocks, case, dtype):
    """SGD's update in BLAS calls (``SGDSolver.fused_update``) gives the numpy chain's
    weights, history and diffs up to rounding, deferred inside ``step`` and not."""
    level1_or_skip(dtype)
    settings, net_options, _ = CASES[case]
    runs = []
    for fused in (True, False):
        solver = make_solver(tmp_path, "SGD", settings, dtype=dtype, **net_options)
        taken = watch_fused_update(solver, allow=fused)
        solver.step(4)
        solver.step(1)
        assert [f is not None for f in taken] == [fused] * 5
        params = solver.net.learnable_params
        runs.append([a for p in params for a in (p.data, p.diff)] + solver.history)
    tolerance = 1e-5 if dtype == np.float32 else 1e-13
    for fused, chain in zip(*runs, strict=True):
        assert chain.any()
        np.testing.assert_allclose(fused, chain, rtol=tolerance, atol=tolerance)


def test_the_caller_runs_a_lane_and_an_error_waits_for_every_lane(small_blocks, monkeypatch):
    monkeypatch.setattr(blocks, "WORKERS", 3)
    monkeypatch.setattr(_threads, "WORKERS", 3)
    monkeypatch.setattr(_threads, "_pool", None)  # a fresh pool of two threads
    weights = Blob((300,), np.float64)
    params = blocks.ParamBlocks(np, np.float64)
    cut = params.blocks([weights], [np.zeros(300)])
    assert len(cut) == 43 and params._threads == 3
    caller, lanes, done = threading.get_ident(), set(), []

    def work(block, scratch):
        lanes.add(threading.get_ident())
        if threading.get_ident() == caller:
            raise RuntimeError("caller's lane failed")
        time.sleep(0.002)
        done.append(block)

    with pytest.raises(RuntimeError, match="caller's lane failed"):
        params.run(cut, work)
    assert caller in lanes and len(lanes) == 3
    # The pool's lanes ran every other block before the error came out.
    assert len(done) == 42
