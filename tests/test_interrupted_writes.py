"""Files that must not lie after a kill -9 or a divergence (issue 19): an interrupted
``convert imageset`` is refused by its readers and resumes; snapshot leftovers are cleaned at
the next start; a divergence snapshot holds the state before the failing update."""

from __future__ import annotations

import logging
import re
import shutil

import lmdb
import numpy as np
import pytest
from test_data_lmdb import data_layer, make_images
from test_solver import make_solver, record_losses

from netforge.data import convert as conv
from netforge.data.db import INCOMPLETE, staging_path
from netforge.errors import DataError, DivergenceError, ShapeError
from netforge.proto import pb
from netforge.solvers import guard
from netforge.solvers.snapshot import clean_leftovers


def _records(path) -> list[tuple[bytes, bytes]]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        items = list(txn.cursor())
    env.close()
    return items


class _Killed(BaseException):
    """What a kill -9 looks like to the code that was running: nothing after it runs."""


def test_interrupted_conversion_is_refused_then_resumed(tmp_path, monkeypatch):
    make_images(tmp_path, count=11)
    listing, db = tmp_path / "list.txt", tmp_path / "db"
    conv.convert_imageset(tmp_path, listing, tmp_path / "whole", shuffle=True, seed=5)

    monkeypatch.setattr(conv, "COMMIT_EVERY", 3)
    monkeypatch.setattr(conv, "CHUNK", 2)
    real, calls = conv.datum_for, []

    def dies_at_the_eighth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "datum_for", dies_at_the_eighth)
    with pytest.raises(_Killed):
        conv.convert_imageset(tmp_path, listing, db, shuffle=True, seed=5)
    staged = staging_path(db)
    assert not db.exists() and (staged / INCOMPLETE).is_file()
    assert len(_records(staged)) == 6  # two commits of 3 made it to disk

    # compute-mean and the Data layer (training) refuse both names
    with pytest.raises(DataError, match="its conversion was interrupted.*same arguments"):
        conv.compute_mean(db)
    with pytest.raises(DataError, match="is an interrupted conversion"):
        conv.compute_mean(staged)
    with pytest.raises(DataError, match="is an interrupted conversion"):
        data_layer(staged, 2)
    # other settings do not resume it
    with pytest.raises(DataError, match="other settings \\(gray\\)"):
        conv.convert_imageset(tmp_path, listing, db, shuffle=True, seed=5, gray=True)

    monkeypatch.setattr(conv, "datum_for", real)
    done = []
    summary = conv.convert_imageset(
        tmp_path, listing, db, shuffle=True, seed=5, progress=done.append
    )
    assert summary.written == 5 and summary.resumed_at == 6 and sum(done) == 11
    assert not staged.exists() and not (db / INCOMPLETE).exists()
    assert _records(db) == _records(tmp_path / "whole")
    mean, count = conv.compute_mean(db)
    assert count == 11 and np.isfinite(mean).all()


def test_shuffled_conversion_without_seed_resumes_in_the_same_order(tmp_path, monkeypatch):
    make_images(tmp_path, count=9)
    listing, db = tmp_path / "list.txt", tmp_path / "db"
    monkeypatch.setattr(conv, "COMMIT_EVERY", 2)
    monkeypatch.setattr(conv, "CHUNK", 2)
    real, calls = conv.datum_for, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise _Killed
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "datum_for", dies)
    with pytest.raises(_Killed):
        conv.convert_imageset(tmp_path, listing, db, shuffle=True)
    first_part = _records(staging_path(db))
    monkeypatch.setattr(conv, "datum_for", real)
    conv.convert_imageset(tmp_path, listing, db, shuffle=True)
    records = _records(db)
    assert records[: len(first_part)] == first_part
    # every image once, in one permutation
    assert sorted(k.split(b"_", 1)[1] for k, _ in records) == sorted(
        f"img {i}.png".encode() for i in range(9)
    )
    assert [int(k[:8]) for k, _ in records] == list(range(9))


# -- snapshots -------------------------------------------------------------------------------
def test_killed_snapshot_leftovers_are_cleaned_at_the_next_start(tmp_path, caplog):
    solver = make_solver(tmp_path, "SGD", "max_iter: 2")
    solver.step(2)
    complete = solver.snapshot()  # snap_iter_2.caffemodel + .solverstate
    solver.net.save(tmp_path / "snap_iter_1.caffemodel")  # an older lone model: kept
    leftovers = [
        tmp_path / ".snap_iter_4.solverstate.k3j_x9aa.tmp",  # killed while writing
        tmp_path / ".snap_iter_4.caffemodel.h5.0abcdefg.tmp",
        tmp_path / "snap_iter_4.caffemodel",  # its solverstate never written
    ]
    for path in leftovers:
        path.write_bytes(b"partial")
    unrelated = tmp_path / ".other_iter_4.caffemodel.abcdefgh.tmp"
    unrelated.write_bytes(b"not ours")
    with caplog.at_level(logging.WARNING, logger="netforge"):
        make_solver(tmp_path, "SGD", "max_iter: 2").solve()
    assert not any(p.exists() for p in leftovers)
    assert unrelated.exists() and (tmp_path / "snap_iter_1.caffemodel").exists()
    assert f"use the latest complete snapshot: --snapshot {complete}" in caplog.text
    assert clean_leftovers(str(tmp_path / "snap")) == complete


def test_leftovers_of_a_folder_prefix_are_cleaned_in_that_folder(tmp_path):
    # A prefix ending in "/" (a SolverParameter built in Python is not rewritten to
    # folder/stem) names files "<folder>/_iter_<n>...": the folder's leftovers are its own,
    # and a lone model beside the folder, named like the folder, belongs to another run.
    folder = tmp_path / "snaps"
    folder.mkdir()
    for name in ("_iter_2.caffemodel", "_iter_2.solverstate"):
        (folder / name).write_bytes(b"whole")
    leftovers = [folder / "._iter_4.solverstate.abcd1234.tmp", folder / "_iter_4.caffemodel"]
    others = tmp_path / "snaps_iter_9.caffemodel"
    for path in [*leftovers, others]:
        path.write_bytes(b"partial")
    assert clean_leftovers(f"{folder}/") == folder / "_iter_2.solverstate"
    assert not any(p.exists() for p in leftovers) and others.exists()


def test_a_snapshot_too_big_to_serialize_is_one_error_suggesting_hdf5(tmp_path, monkeypatch):
    # A binary snapshot is built and serialized whole (three copies of the weights at its
    # peak): a net that trains can still run out of memory there, at the end of its run.
    solver = make_solver(tmp_path, "Adam", "max_iter: 1")
    solver.step(1)

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(solver.net, "to_proto", no_memory)
    with pytest.raises(ShapeError, match=r"snap_iter_1.caffemodel: out of memory .*HDF5"):
        solver.snapshot()
    assert not list(tmp_path.glob("*snap_iter_1*"))
    solver.param.snapshot_format = pb.SolverParameter.HDF5  # what the error suggests
    assert solver.snapshot().name == "snap_iter_1.solverstate.h5"


def test_divergence_saves_the_last_good_state_which_resumes_at_a_lower_rate(tmp_path):
    settings = "base_lr: 3 momentum: 0.9 lr_policy: 'fixed'"
    solver = make_solver(tmp_path, "SGD", settings, dtype=np.float32)
    losses = record_losses(solver)
    with pytest.raises(DivergenceError) as info:
        solver.step(100)
    message = str(info.value)
    good = solver.iter
    found = re.search(
        r"diverged at iteration (\d+).*last good state \(iteration (\d+), loss", message
    )
    assert found and int(found.group(2)) == good < int(found.group(1))
    # the latest iteration whose loss was within LOSS_FACTOR of the first
    assert losses[good] <= 4 * losses[0] < losses[good + 1]
    path = tmp_path / f"snap_iter_{good}.solverstate"
    assert f"saved as {path}: resume it with a lower base_lr" in message
    # the saved state is the uninterrupted run's state at that iteration
    reference = make_solver(tmp_path, "SGD", settings, dtype=np.float32)
    reference.step(good)
    saved = pb.NetParameter.FromString((tmp_path / f"snap_iter_{good}.caffemodel").read_bytes())
    np.testing.assert_array_equal(
        np.array(saved.layer[1].blobs[0].data).reshape(1, -1),
        reference.net.params["innerprod"][0].data,
    )
    # resumed at the same rate it diverges again; at a lower one it trains on
    again = make_solver(tmp_path, "SGD", settings, dtype=np.float32)
    again.restore(path)
    with pytest.raises(DivergenceError):
        again.step(100)
    lower = make_solver(tmp_path, "SGD", "base_lr: 0.01 momentum: 0.9", dtype=np.float32)
    lower.restore(path)
    resumed = record_losses(lower)
    lower.step(40)
    assert lower.iter == good + 40 and np.isfinite(resumed).all()
    assert np.mean(resumed[-8:]) < np.mean(resumed[:8])


def test_the_last_good_state_is_kept_in_a_temporary_file_not_in_memory(tmp_path):
    solver = make_solver(tmp_path, "SGD", "base_lr: 0.01 momentum: 0.9", dtype=np.float32)
    solver.step(2)
    weights = solver.net.params["innerprod"][0].data.copy()
    solver.step(1)  # keeps the state it started from, then updates
    kept = solver._last_good
    assert kept._arrays is None and kept._file is not None
    assert kept._file.seek(0, 2) == kept.size  # weights and history, nothing else
    assert kept.restore() and solver.iter == 2
    np.testing.assert_array_equal(solver.net.params["innerprod"][0].data, weights)


def test_no_room_for_the_last_good_state_warns_and_trains_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(guard.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(9, 9, 0))
    solver = make_solver(tmp_path, "SGD", "base_lr: 0.01 momentum: 0.9", dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="netforge"):
        solver.step(3)
    assert solver.iter == 3 and not solver._last_good.enabled
    assert "keeping the last good state needs" in caplog.text and "TMPDIR" in caplog.text


def test_interrupted_hdf5_conversion_leaves_no_listing_of_mixed_parts(tmp_path, monkeypatch):
    make_images(tmp_path, count=6)
    listing, out = tmp_path / "list.txt", tmp_path / "out"
    conv.convert_hdf5(tmp_path, listing, out, rows_per_file=2)
    assert len((out / "list.txt").read_text().split()) == 3

    real, calls = conv.write_hdf5, []

    def dies_at_the_second_part(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise _Killed
        return real(*args, **kwargs)

    def second_run_meanwhile(*args, **kwargs):
        with pytest.raises(DataError, match="out: another netforge process is writing it"):
            conv.convert_hdf5(tmp_path, listing, out)
        return dies_at_the_second_part(*args, **kwargs)

    monkeypatch.setattr(conv, "write_hdf5", second_run_meanwhile)
    with pytest.raises(_Killed):
        conv.convert_hdf5(tmp_path, listing, out, rows_per_file=2, gray=True)
    # part-00000.h5 now holds the gray run's rows, the others the first run's: a listing
    # naming them together would feed HDF5Data a mix of two conversions
    assert not (out / "list.txt").exists()
    monkeypatch.setattr(conv, "write_hdf5", real)
    summary = conv.convert_hdf5(tmp_path, listing, out, rows_per_file=2, gray=True)
    assert (out / "list.txt").read_text() == "".join(
        f"{p.resolve()}\n" for p in summary.outputs[:-1]
    )


def test_a_second_conversion_into_the_same_database_is_refused_while_one_runs(
    tmp_path, monkeypatch
):
    # Two runs into one database at once wrote into the same <db>.incomplete, and one died
    # with an LMDB traceback (MDB_MAP_RESIZED) as the other grew the map.
    make_images(tmp_path, count=4)
    listing, db = tmp_path / "list.txt", tmp_path / "db"
    real, seen = conv.datum_for, []

    def second_run_meanwhile(*args, **kwargs):
        if not seen:
            seen.append(1)
            with pytest.raises(DataError, match="db: another netforge process is writing it"):
                conv.convert_imageset(tmp_path, listing, db)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv, "datum_for", second_run_meanwhile)
    conv.convert_imageset(tmp_path, listing, db)
    assert seen and len(_records(db)) == 4
    assert not (tmp_path / "db.lock").exists()
    # the lock sits beside the database, in a folder the conversion creates
    nested = tmp_path / "new" / "folder" / "db"
    conv.convert_imageset(tmp_path, listing, nested)
    assert len(_records(nested)) == 4 and sorted(p.name for p in nested.parent.iterdir()) == ["db"]
