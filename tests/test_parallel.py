"""Data-parallel training (netforge.parallel): Caffe's record split in the data layers, the
exactness of 2 ranks × batch b against one process with iter_size 2 for every solver type,
the ``mpiexec netforge train`` entry point, resuming on another number of ranks, and a rank
that raises, is killed or diverges.

The multi-rank tests run ``mpiexec`` from the ``mpi`` extra (mpi4py and MPICH's wheel, in
the ``test`` extra, so CI runs them) under a timeout: a hang fails the test.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from netforge.data import db as nfdb
from netforge.data.datum import make_datum
from netforge.parallel.world import set_world
from netforge.proto import pb
from netforge.prototxt import parse_text
from netforge.solvers import get_solver
from netforge.weights import read_weight_table
from tests import parallel_worker as worker
from tests.harness import build

REPO = Path(__file__).resolve().parent.parent
#: Seconds any multi-rank run may take before the test calls it a hang.
TIMEOUT = 120
WORKER = [sys.executable, str(REPO / "tests" / "parallel_worker.py")]


def mpiexec() -> str:
    found = shutil.which("mpiexec", path=str(Path(sys.executable).parent))
    assert found, "mpiexec is missing beside the interpreter: pip install -e '.[mpi]'"
    return found


def run_ranks(
    ranks: int, args: list[str], cwd: Path, path: str = str(REPO), folders: list[Path] = ()
) -> subprocess.CompletedProcess:
    """``mpiexec -n ranks args`` with one BLAS thread per rank; fails the test on a hang.
    With ``folders``, rank r runs in ``folders[r]`` (one rank per folder)."""
    env = dict(os.environ, PYTHONPATH=path, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    command = [mpiexec(), "-n", str(ranks), *args]
    if folders:
        command = [mpiexec()]
        for folder in folders:
            command += [":"] * (len(command) > 1) + ["-n", "1", "-wdir", str(folder), *args]
    return subprocess.run(
        command,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def reference(listing: Path, solver_type: str, iter_size: int, steps: int = worker.STEPS):
    """The learned parameters of one process with ``iter_size`` (no sharding)."""
    set_world(0, 1)
    param = parse_text(worker.solver_text(listing, solver_type, iter_size), pb.SolverParameter)
    solver = get_solver(param)
    solver.step(steps)
    return [np.asarray(p.data) for p in solver.net.learnable_params]


def assert_same(found: list[np.ndarray], expected: list[np.ndarray], scale: float = 1) -> None:
    """Equal up to float32 summation order: the sums over ranks and over iter_size passes
    add the same terms in another order, amplified a little by 20 iterations. ``scale``
    widens the tolerance for a GPU against the CPU (other GEMM blockings)."""
    for got, want in zip(found, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5 * scale, atol=2e-6 * scale)


# -- the record split -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def one_rank():
    """Every test starts and ends alone in its world (a process-wide default)."""
    set_world(0, 1)
    yield
    set_world(0, 1)


def stream_of(text: str, rank: int, count: int, batches: int, phase: int = pb.TRAIN):
    set_world(rank, count)
    layer, _, top = build(text, [], num_tops=2, phase=phase)
    try:
        labels = []
        for _ in range(batches):
            layer.forward([], top)
            labels.append(np.asarray(top[1].data).copy())
        return np.concatenate(labels)
    finally:
        layer.close()


def assert_interleaves(text: str, count: int = 3, batches: int = 4) -> None:
    """Rank r's records are the whole stream's records r, r + count, r + 2 count..."""
    whole = stream_of(text, 0, 1, batches * count)
    for rank in range(count):
        np.testing.assert_array_equal(stream_of(text, rank, count, batches), whole[rank::count])
    # TEST nets read everything, whatever the rank (Caffe: only rank 0 tests).
    test_stream = stream_of(text, 1, count, batches, pb.TEST)
    np.testing.assert_array_equal(test_stream, whole[: len(test_stream)])


def test_lmdb_records_split_by_caffes_skip_rule(tmp_path):
    # 13 records: the stream wraps inside a batch, and the split goes on across the wrap.
    with nfdb.open_writer(tmp_path / "db") as writer:
        for k in range(13):
            image = np.full((1, 2, 2), k, np.uint8)
            writer.put(f"{k:08d}", make_datum(image, label=k).SerializeToString())
    text = f'type: "Data" data_param {{ source: "{tmp_path / "db"}" backend: LMDB batch_size: 5 }}'
    assert_interleaves(text)


def test_hdf5_rows_split_by_caffes_skip_rule(tmp_path):
    # Two files of 7 and 4 rows: a batch of the stream spans both files and the wrap.
    files = []
    for name, rows in (("a", range(7)), ("b", range(7, 11))):
        import h5py

        with h5py.File(tmp_path / f"{name}.h5", "w") as f:
            f["data"] = np.array([[r, r] for r in rows], np.float32)
            f["label"] = np.array(list(rows), np.float32)
        files.append(str(tmp_path / f"{name}.h5"))
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n")
    text = (
        f'type: "HDF5Data" top: "data" top: "label" '
        f'hdf5_data_param {{ source: "{tmp_path / "list.txt"}" batch_size: 5 }}'
    )
    assert_interleaves(text)


def test_image_list_entries_split_by_caffes_skip_rule(tmp_path):
    lines = []
    for k in range(11):
        Image.fromarray(np.full((3, 3), k * 10, np.uint8)).save(tmp_path / f"{k}.png")
        lines.append(f"{k}.png {k}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    for shuffle in ("false", "true"):  # a shuffled order is drawn alike on every rank
        text = (
            f'type: "ImageData" image_data_param {{ source: "{tmp_path / "list.txt"}" '
            f'root_folder: "{tmp_path}/" batch_size: 4 is_color: false shuffle: {shuffle} }}'
        )
        assert_interleaves(text)


def rank_batches(text: str, rank: int, count: int, n: int, state: bytes | None = None):
    """The data tops of ``n`` TRAIN batches of rank ``rank`` of ``count`` (from ``state``),
    and the layer's state after them."""
    set_world(rank, count)
    layer, _, top = build(text, [], num_tops=2)
    try:
        if state is not None:
            layer.set_state(state)
        found = []
        for _ in range(n):
            layer.forward([], top)
            found.append(np.asarray(top[0].data).copy())
        return found, layer.get_state()
    finally:
        layer.close()


def assert_ranks_draw_apart(text: str) -> None:
    """Ranks 0 and 1 of 2 draw their random choices apart (Caffe seeds rank r with
    random_seed + r), reproducibly, and rank 0's state (what a snapshot holds) resumes
    rank 1 where it was."""
    rank0, state0 = rank_batches(text, 0, 2, 2)
    rank1, _ = rank_batches(text, 1, 2, 3)
    assert not np.array_equal(rank0[0], rank1[0]) and not np.array_equal(rank0[1], rank1[1])
    np.testing.assert_array_equal(rank_batches(text, 0, 2, 2)[0][1], rank0[1])
    np.testing.assert_array_equal(rank_batches(text, 1, 2, 1, state0)[0][0], rank1[2])


def test_window_data_ranks_sample_windows_of_their_own(tmp_path):
    # WindowData samples at random rather than reading records in order: with one shared
    # stream every rank would train on the same windows.
    image = np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    boxes = "".join(f"{k % 5 + 1} 0.9 {k} {k} {k + 6} {k + 6}\n" for k in range(12))
    boxes += "".join(f"0 0.1 {k} 0 {k + 4} 4\n" for k in range(12))
    (tmp_path / "windows.txt").write_text(f"# 0\na.png\n3\n24\n24\n24\n{boxes}")
    assert_ranks_draw_apart(
        f'type: "WindowData" window_data_param {{ source: "{tmp_path / "windows.txt"}" '
        f'root_folder: "{tmp_path}/" batch_size: 8 fg_fraction: 0.5 fg_threshold: 0.5 '
        f"bg_threshold: 0.5 }} transform_param {{ crop_size: 6 mirror: true }}"
    )


@pytest.mark.parametrize("kind", ["Data", "ImageData"])
def test_ranks_crop_and_mirror_apart(tmp_path, kind):
    # Every record holds the same image: only the crops and mirrors tell the ranks apart,
    # and with one stream for all ranks they were alike.
    image = np.random.default_rng(4).integers(0, 256, (12, 12), dtype=np.uint8)
    if kind == "Data":
        with nfdb.open_writer(tmp_path / "db") as writer:
            for k in range(10):
                writer.put(f"{k:08d}", make_datum(image[None], label=k).SerializeToString())
        source = f'data_param {{ source: "{tmp_path / "db"}" backend: LMDB batch_size: 4 }}'
    else:
        Image.fromarray(image).save(tmp_path / "a.png")
        (tmp_path / "list.txt").write_text("".join(f"a.png {k}\n" for k in range(10)))
        source = (
            f'image_data_param {{ source: "{tmp_path / "list.txt"}" root_folder: "{tmp_path}/" '
            "batch_size: 4 is_color: false shuffle: true }"
        )
    assert_ranks_draw_apart(
        f'type: "{kind}" {source} transform_param {{ crop_size: 7 mirror: true }}'
    )


# -- exactness: 2 ranks x batch b == 1 process x batch b x iter_size 2 -------------------


def test_two_ranks_match_one_process_with_iter_size_for_every_solver(tmp_path):
    listing = worker.write_data(tmp_path)
    types = list(worker.TYPE_SETTINGS)
    # 64-byte buckets: every parameter is its own all-reduce, started during backward.
    args = [str(tmp_path), str(listing), "1", "64", *types]
    result = run_ranks(2, [*WORKER, *args], tmp_path)
    assert result.returncode == 0, result.stderr
    for solver_type in types:
        found = np.load(tmp_path / f"{solver_type}.npz")
        found = [found[f"arr_{i}"] for i in range(4)]
        assert_same(found, reference(listing, solver_type, iter_size=2))
    # The comparison can fail: one process at iter_size 1 sees half the records.
    alone = reference(listing, "SGD", iter_size=1)
    sgd = np.load(tmp_path / "SGD.npz")
    assert np.abs(sgd["arr_0"] - alone[0]).max() > 1e-3


def test_two_ranks_with_iter_size_match_one_process_with_twice_the_iter_size(tmp_path):
    listing = worker.write_data(tmp_path)
    # One bucket for the whole net: the all-reduce starts after the last pass's backward.
    args = [str(tmp_path), str(listing), "2", str(1 << 20), "SGD", "Adam"]
    result = run_ranks(2, [*WORKER, *args], tmp_path)
    assert result.returncode == 0, result.stderr
    for solver_type in ("SGD", "Adam"):
        found = np.load(tmp_path / f"{solver_type}.npz")
        assert_same([found[f"arr_{i}"] for i in range(4)], reference(listing, solver_type, 4))


# -- the command line: mpiexec -n 2 netforge train, and resuming on one rank --------------


def write_solver(tmp_path: Path, listing: Path, **extra: object) -> Path:
    fields = {"snapshot": 10, "snapshot_prefix": f'"{tmp_path / "snap" / "run"}"', **extra}
    path = tmp_path / "solver.prototxt"
    path.write_text(worker.solver_text(listing, "SGD", 1, **fields))
    return path


def learned(path: Path) -> list[np.ndarray]:
    table = read_weight_table(str(path))
    return [
        table[name][i].data.reshape(table[name][i].shape) for name in ("ip1", "ip2") for i in (0, 1)
    ]


def test_mpiexec_train_and_resume_on_another_rank_count(tmp_path):
    listing = worker.write_data(tmp_path)
    solver = write_solver(tmp_path, listing, display=5, test_iter=2, test_interval=10)
    netforge = str(Path(sys.executable).parent / "netforge")
    result = run_ranks(2, [netforge, "train", "--solver", str(solver)], tmp_path)
    assert result.returncode == 0, result.stderr
    log = result.stderr
    # Rank 0 alone tests, logs and snapshots; the loss it reports is the mean over ranks.
    assert log.count("Test net output #0") == 3
    assert log.count("Snapshotting to binary proto file") == 2
    assert "Data-parallel training over MPI on 2 ranks" in log
    assert sorted(p.name for p in (tmp_path / "snap").iterdir()) == [
        "run_iter_10.caffemodel",
        "run_iter_10.solverstate",
        "run_iter_20.caffemodel",
        "run_iter_20.solverstate",
        "run_metrics.jsonl",
    ]
    final = learned(tmp_path / "snap" / "run_iter_20.caffemodel")
    # The solver's own file has iter_size 1: the reference is this run's one-process twin.
    assert_same(final, reference(listing, "SGD", iter_size=2))

    # Resume the 2-rank snapshot in one process with iter_size 2: the data cursor is the
    # stream position both ranks share, so the next records are exactly those 2 ranks
    # would have read, and the run ends where the 2-rank run did.
    set_world(0, 1)
    param = parse_text(worker.solver_text(listing, "SGD", 2), pb.SolverParameter)
    one = get_solver(param)
    one.restore(tmp_path / "snap" / "run_iter_10.solverstate")
    one.step(10)
    assert_same([np.asarray(p.data) for p in one.net.learnable_params], final)


def test_mpiexec_resume_reads_the_snapshot_on_rank_0_alone(tmp_path):
    # Rank 1 runs in a folder without the snapshot (another node's disk): rank 0 restores
    # it and sends the weights, history, iteration and data cursors to rank 1.
    listing = worker.write_data(tmp_path)
    solver = write_solver(tmp_path, listing)
    netforge = str(Path(sys.executable).parent / "netforge")
    result = run_ranks(2, [netforge, "train", "--solver", str(solver)], tmp_path)
    assert result.returncode == 0, result.stderr
    final = learned(tmp_path / "snap" / "run_iter_20.caffemodel")
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node1.mkdir()
    (tmp_path / "snap").rename(node0)
    (node0 / "run_iter_20.caffemodel").unlink()
    args = [netforge, "train", "--solver", str(solver), "--snapshot", "run_iter_10.solverstate"]
    result = run_ranks(2, args, tmp_path, folders=[node0, node1])
    assert result.returncode == 0, result.stderr
    assert "Resuming from run_iter_10.solverstate" in result.stderr
    assert_same(learned(tmp_path / "snap" / "run_iter_20.caffemodel"), final)


def test_only_rank_0_writes_snapshots_and_tests(tmp_path):
    listing = worker.write_data(tmp_path)
    prefix = f'"{tmp_path / "snap" / "run"}"'
    text = worker.solver_text(listing, "SGD", 1, snapshot_prefix=prefix)
    text += " test_iter: 1 test_interval: 1"
    solver = get_solver(parse_text(text, pb.SolverParameter))
    tested = []
    solver.test = tested.append
    solver.parallel = SimpleNamespace(rank=1, size=1, take_action=lambda: "none")
    assert not solver.is_root
    path = solver.snapshot()
    assert path.name == "run_iter_0.solverstate"
    assert not list((tmp_path / "snap").iterdir())  # the folder is the prefix check's
    solver.test_all = lambda: tested.append("all")
    solver.step(2)
    assert tested == []  # rank 1 never tests
    solver.parallel = None
    assert solver.is_root and solver.snapshot().is_file()


def test_mpiexec_fine_tunes_from_rank_0s_weights(tmp_path):
    listing = worker.write_data(tmp_path)
    start = tmp_path / "start.caffemodel"
    param = parse_text(worker.solver_text(listing, "SGD", 1), pb.SolverParameter)
    get_solver(param).net.save(start)
    # Rank 0 alone loads them and broadcasts them: rank 1's own fillers (seed 99) would
    # otherwise give it other weights, other gradients, and rank 0 another result.
    solver = write_solver(tmp_path, listing, random_seed=99, snapshot=0)
    netforge = str(Path(sys.executable).parent / "netforge")
    args = [netforge, "train", "--solver", str(solver), "--weights", str(start)]
    result = run_ranks(2, [*args, "--iterations", "6"], tmp_path)
    assert result.returncode == 0, result.stderr
    final = learned(tmp_path / "snap" / "run_iter_6.caffemodel")
    one = get_solver(
        parse_text(worker.solver_text(listing, "SGD", 2, random_seed=99), pb.SolverParameter),
        weights=[str(start)],
    )
    one.step(6)
    assert_same(final, [np.asarray(p.data) for p in one.net.learnable_params])


# -- faults ---------------------------------------------------------------------------------

FAULT_LAYER = '''
import os
import signal

import netforge
from netforge.errors import DataError
from netforge.parallel.world import world


class Fault(netforge.Layer):
    """Passes its bottom through; on rank 1, at the third forward, does param_str."""

    def setup(self, bottom, top):
        self.calls = 0

    def reshape(self, bottom, top):
        top[0].reshape(bottom[0].shape)

    def forward(self, bottom, top):
        self.calls += 1
        top[0].data[...] = bottom[0].data
        if world().rank != 1 or self.calls != 3:
            return
        if self.param_str == "raise":
            raise DataError("injected failure in layer fault")
        if self.param_str == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.param_str == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
            return
        top[0].data[0, 0] = float("nan")

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
'''


def fault_run(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    listing = worker.write_data(tmp_path)
    (tmp_path / "fault_layer.py").write_text(FAULT_LAYER)
    text = worker.solver_text(listing, "SGD", 1, snapshot_prefix=f'"{tmp_path / "snap" / "run"}"')
    fault = (
        'layer { name: "fault" type: "Python" bottom: "data" top: "faulty" '
        f'python_param {{ module: "fault_layer" layer: "Fault" param_str: "{mode}" }} }} '
    )
    text = text.replace('layer { name: "ip1"', fault + 'layer { name: "ip1"').replace(
        'bottom: "data" top: "ip1"', 'bottom: "faulty" top: "ip1"'
    )
    (tmp_path / "solver.prototxt").write_text(text)
    netforge = str(Path(sys.executable).parent / "netforge")
    args = [netforge, "train", "--solver", "solver.prototxt", "--allow-python-layers"]
    return run_ranks(2, args, tmp_path, path=f"{tmp_path}{os.pathsep}{REPO}")


def test_a_rank_that_raises_stops_every_rank_with_its_error(tmp_path):
    result = fault_run(tmp_path, "raise")
    assert result.returncode != 0
    assert "netforge: error: rank 1 of 2: injected failure in layer fault" in result.stderr
    assert not (tmp_path / "snap").exists() or not list((tmp_path / "snap").glob("*.caffemodel"))


def test_a_killed_rank_stops_every_rank(tmp_path):
    result = fault_run(tmp_path, "kill")
    assert result.returncode != 0
    # mpiexec ends the others at once and names the killed process; the log names its rank.
    banner = result.stdout + result.stderr
    assert "signal 9" in banner or "Killed" in banner, banner
    pid = re.search(r"PID (\d+)", banner).group(1)
    assert re.search(rf"Rank 1 is process {pid} on ", result.stderr), banner


def test_sigint_to_one_rank_stops_every_rank_after_the_same_iteration(tmp_path):
    result = fault_run(tmp_path, "sigint")
    assert result.returncode == 0, result.stderr
    assert "Optimization stopped early." in result.stderr
    # Rank 1 got it during iteration 2's forward: both ranks finish that iteration and stop;
    # rank 0 writes the final snapshot.
    assert [p.name for p in (tmp_path / "snap").glob("*.solverstate")] == ["run_iter_3.solverstate"]


def test_a_divergence_on_one_rank_stops_all_and_names_it(tmp_path):
    result = fault_run(tmp_path, "nan")
    assert result.returncode == 6, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("netforge: error")]
    assert len(lines) == 1, result.stderr  # rank 0 reports it for both
    assert "diverged at iteration 2" in lines[0]
    assert "blob 'faulty' (layer 'fault') on rank 1" in lines[0]
    # Rank 0 alone saved the last good state (one solverstate, not one per rank).
    assert len(list((tmp_path / "snap").glob("*.solverstate"))) == 1


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("netforge: error")]


def test_an_error_every_rank_finds_before_connecting_is_reported_once(tmp_path):
    netforge = str(Path(sys.executable).parent / "netforge")
    missing = run_ranks(2, [netforge, "train", "--solver", "nope.prototxt"], tmp_path)
    assert missing.returncode == 4, missing.stderr  # DataError's status, from both ranks
    assert error_lines(missing) == [
        "netforge: error: nope.prototxt: no such file (on 2 of 2 ranks)"
    ], missing.stderr
    (tmp_path / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\n')
    # No cupy, or no GPUs 98 and 99: a DeviceError on each rank, reported once.
    args = [netforge, "train", "--solver", "solver.prototxt", "--gpu", "98,99"]
    no_gpu = run_ranks(2, args, tmp_path)
    assert no_gpu.returncode == 7, no_gpu.stderr
    [line] = error_lines(no_gpu)
    assert line.endswith(" (on 2 of 2 ranks)"), no_gpu.stderr


def test_an_error_one_rank_finds_before_connecting_names_it_and_stops_all(tmp_path):
    folders = [tmp_path / "r0", tmp_path / "r1"]
    for folder in folders:
        folder.mkdir()
    (folders[0] / "solver.prototxt").write_text('net: "net.prototxt"\nbase_lr: 0.1\n')
    netforge = str(Path(sys.executable).parent / "netforge")
    result = run_ranks(
        2, [netforge, "train", "--solver", "solver.prototxt"], tmp_path, folders=folders
    )
    assert result.returncode == 4, result.stderr
    assert error_lines(result) == [
        "netforge: error: solver.prototxt: no such file (on 1 of 2 ranks: rank 1)"
    ], result.stderr


LATE_RANK = """
import time
import numpy as np
from netforge.errors import ParallelError
from netforge.parallel import MPICommunicator

comm = MPICommunicator(timeout=1.0)
if comm.rank == 1:
    time.sleep(4)  # alive, but not in the collective: rank 0 must give up, not hang
try:
    comm.allreduce(np.ones(4, np.float32))
except ParallelError as exc:
    print(exc, flush=True)
    comm.abort(9)
"""


def test_a_rank_that_stops_answering_times_out_the_collective(tmp_path):
    start = time.monotonic()
    result = run_ranks(2, [sys.executable, "-c", LATE_RANK], tmp_path)
    assert result.returncode != 0
    assert "rank 0 of 2: no answer from the other ranks for 1 s" in result.stdout
    assert time.monotonic() - start < 4 + TIMEOUT / 4


def test_collective_timeout_setting(monkeypatch):
    from netforge.errors import ConfigError
    from netforge.parallel.comm import DEFAULT_TIMEOUT, collective_timeout

    monkeypatch.delenv("NETFORGE_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == DEFAULT_TIMEOUT
    monkeypatch.setenv("NETFORGE_COLLECTIVE_TIMEOUT", "0")
    assert collective_timeout() is None
    monkeypatch.setenv("NETFORGE_COLLECTIVE_TIMEOUT", "12.5")
    assert collective_timeout() == 12.5
    monkeypatch.setenv("NETFORGE_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="NETFORGE_COLLECTIVE_TIMEOUT='soon'"):
        collective_timeout()


LAUNCHER = """
import multiprocessing
import sys
from pathlib import Path

from netforge.parallel.launch import watch
from tests.parallel_worker import await_signal

folder = Path(sys.argv[1])
context = multiprocessing.get_context("spawn")
ranks = [context.Process(target=await_signal, args=(folder / f"{r}.txt",)) for r in (0, 1)]
for rank in ranks:
    rank.start()
watch(ranks, ["rank 0", "rank 1"])
print("all ranks finished", flush=True)
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGHUP"])
def test_the_gpu_launcher_passes_signals_on_to_its_ranks(tmp_path, signame):
    # train --gpu 0,1's parent watches one process per GPU: a SIGINT or SIGHUP sent to it
    # (a scheduler, or kill) must reach the ranks, whose solvers stop or snapshot, instead
    # of ending the parent, which would kill them before their final snapshot.
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = [sys.executable, "-c", LAUNCHER, str(tmp_path)]
    parent = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(list(tmp_path.glob("*.ready"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        parent.send_signal(getattr(signal, signame))
        out, _ = parent.communicate(timeout=TIMEOUT)
    finally:
        parent.kill()
    assert parent.returncode == 0 and "all ranks finished" in out
    expected = "stop" if signame == "SIGINT" else "snapshot"
    assert [(tmp_path / f"{r}.txt").read_text() for r in (0, 1)] == [expected, expected]


# -- GPUs: NCCL, and MPI ranks sharing one GPU ------------------------------------------------


def test_pycaffe_set_device_makes_the_gpu_current(monkeypatch):
    # python/train.py's rank r calls set_mode_gpu() then set_device(gpus[r]): the nets it
    # builds next allocate on the current device, which must be GPU r, as cudaSetDevice.
    from netforge import backend as nb

    current = []

    class Device:
        def __init__(self, device_id):
            self.id = device_id

        def use(self):
            current.append(self.id)

    runtime = SimpleNamespace(getDeviceCount=lambda: 2)
    cupy = SimpleNamespace(cuda=SimpleNamespace(Device=Device, runtime=runtime))
    monkeypatch.setattr(nb, "import_cupy", lambda: cupy)
    monkeypatch.setattr(nb, "_default_mode", {"gpu": False, "device_id": 0, "version": 0})
    nb.set_device(1)
    assert current == []  # CPU mode: no GPU is touched
    nb.set_mode_gpu()
    nb.set_device(1)
    nb.set_device(5)  # no such GPU: the next GPU pass says so, as before
    assert current == [1, 1]

    def no_cupy():
        raise nb.DeviceError("no cupy")

    monkeypatch.setattr(nb, "import_cupy", no_cupy)
    nb.set_device(0)  # without a GPU, choosing one is not yet an error


def gpu_count() -> int:
    import cupy

    return cupy.cuda.runtime.getDeviceCount()


@pytest.mark.gpu
def test_nccl_one_rank_matches_a_lone_solver(tmp_path):
    from netforge.backend import gpu
    from netforge.parallel import DataParallel, NCCLCommunicator
    from netforge.parallel.comm import new_nccl_uid

    listing = worker.write_data(tmp_path)
    finals = []
    for parallel in (False, True):
        param = parse_text(worker.solver_text(listing, "Adam", 2), pb.SolverParameter)
        solver = get_solver(param, backend=gpu(0))
        if parallel:
            comm = NCCLCommunicator(new_nccl_uid(), 0, 1, 0)
            DataParallel(solver, comm, bucket_bytes=64).attach().broadcast()
        solver.step(worker.STEPS)
        finals.append([p.data.get() for p in solver.net.learnable_params])
    assert_same(finals[1], finals[0])


@pytest.mark.gpu
def test_mpi_ranks_sharing_one_gpu_match_one_process(tmp_path):
    listing = worker.write_data(tmp_path)
    args = [str(tmp_path), str(listing), "1", "64", "SGD", "Adam"]
    os.environ["PARALLEL_WORKER_GPU"] = "1"
    try:
        result = run_ranks(2, [*WORKER, *args], tmp_path)
    finally:
        del os.environ["PARALLEL_WORKER_GPU"]
    assert result.returncode == 0, result.stderr
    for solver_type in ("SGD", "Adam"):
        found = np.load(tmp_path / f"{solver_type}.npz")
        found = [found[f"arr_{i}"] for i in range(4)]
        assert_same(found, reference(listing, solver_type, 2), scale=10)


@pytest.mark.gpu
def test_train_on_two_gpus_with_nccl_matches_one_process(tmp_path):
    if gpu_count() < 2:
        pytest.skip("one rank per GPU: needs two GPUs")
    listing = worker.write_data(tmp_path)
    solver = write_solver(tmp_path, listing)
    netforge = str(Path(sys.executable).parent / "netforge")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [netforge, "train", "--solver", str(solver), "--gpu", "0,1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert "Data-parallel training over NCCL on 2 ranks" in result.stderr
    final = learned(tmp_path / "snap" / "run_iter_20.caffemodel")
    assert_same(final, reference(listing, "SGD", iter_size=2), scale=10)


@pytest.mark.gpu
def test_pycaffe_train_py_sequence_on_one_gpu(tmp_path):
    """BVLC python/train.py's calls, one rank: the NCCL path through pycaffe's API."""
    import netforge as caffe

    listing = worker.write_data(tmp_path)
    (tmp_path / "solver.prototxt").write_text(worker.solver_text(listing, "SGD", 2))
    caffe.set_mode_gpu()
    try:
        caffe.set_device(0)
        caffe.set_solver_count(1)
        caffe.set_solver_rank(0)
        caffe.set_multiprocess(True)
        solver = caffe.SGDSolver(str(tmp_path / "solver.prototxt"))
        nccl = caffe.NCCL(solver, caffe.NCCL.new_uid())
        nccl.bcast()
        solver.add_callback(nccl)
        if solver.param.layer_wise_reduce:
            solver.net.after_backward(nccl)
        solver.step(solver.param.max_iter)
        found = [p.data.get() for p in solver.net.learnable_params]
    finally:
        caffe.set_mode_cpu()
        caffe.set_multiprocess(False)
    assert_same(found, reference(listing, "SGD", 2), scale=10)
