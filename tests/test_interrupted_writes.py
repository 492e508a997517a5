"""Files that must not lie after a kill -9 or a concurrent run (issue 19): an interrupted
``convert imageset`` is refused by its readers and resumes; snapshot leftovers are cleaned at
the next start."""

from __future__ import annotations

import lmdb
import numpy as np
import pytest
from test_data_lmdb import data_layer, make_images

from netforge.data import convert as conv
from netforge.data.db import INCOMPLETE, staging_path
from netforge.errors import DataError


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
    assert summary.written == 5 and sum(done) == 11
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
