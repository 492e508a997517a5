"""Key-value databases of Datum records: LMDB (Caffe's ``db_lmdb``) and, optionally, LevelDB.

Readers open the database read-only and iterate in key order (byte-lexicographic, which is
why converters write zero-padded keys). Writers commit in batches, so a conversion that is
interrupted leaves a valid database holding every committed batch, and the LMDB memory map
doubles when it is full instead of failing (Caffe's MDB_MAP_FULL handling).

LevelDB, Caffe's other backend (and DataParameter's default), needs the optional ``plyvel``
binding (``pip install 'netforge[leveldb]'``); without it such databases are refused with a
message saying how to get it or convert to LMDB. See ``netforge.data.leveldb``.
"""

from __future__ import annotations

import abc
import importlib.util
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb

from netforge.errors import DataError
from netforge.proto import pb

#: initial map size of a new database; it doubles whenever a commit finds it full.
INITIAL_MAP_SIZE = 1 << 26
#: The file a conversion keeps inside its database until the last record is written: the
#: database is then renamed from ``<name>.incomplete`` to ``<name>``. Neither LMDB nor LevelDB
#: (nor Caffe) reads other files in a database folder.
INCOMPLETE = "netforge-incomplete.json"


def staging_path(path: str | os.PathLike) -> Path:
    """Where a conversion into ``path`` writes until it is complete."""
    return Path(f"{os.fspath(path)}.incomplete")


def check_complete(source: str | os.PathLike) -> None:
    """Raise a DataError for a database whose conversion was interrupted (a kill -9 leaves
    a valid database holding only the records committed so far)."""
    path = Path(source)
    again = "rerun netforge convert imageset with the same arguments to finish it"
    # os.path, not pathlib: a name too long for the file system is False, not an OSError
    if os.path.exists(path / INCOMPLETE):
        raise DataError(f"{source} is an interrupted conversion, not a whole database; {again}")
    staged = staging_path(path)
    if not os.path.exists(path) and os.path.exists(staged / INCOMPLETE):
        raise DataError(
            f"{source} does not exist: its conversion was interrupted, and what it wrote is in "
            f"{staged}; {again}"
        )


def last_key(path: str | os.PathLike, backend: int | str = "lmdb") -> bytes | None:
    """The greatest key of the database at ``path`` (None when it is empty)."""
    if backend_name(backend, str(path)) == "leveldb":
        import plyvel

        db = plyvel.DB(str(path), create_if_missing=False)
        try:
            return next(db.iterator(reverse=True, include_value=False), None)
        finally:
            db.close()
    try:
        env = lmdb.open(str(path), readonly=True, lock=False)
    except lmdb.Error as exc:
        raise DataError(f"cannot open LMDB database {path}: {exc}") from None
    try:
        with env.begin() as txn:
            cursor = txn.cursor()
            return cursor.key() if cursor.last() else None
    finally:
        env.close()


def backend_name(backend: int | str, source: str) -> str:
    """ "lmdb" or "leveldb" for a DataParameter.DB value or a --backend string.

    LevelDB without plyvel installed, or an unknown name, is a DataError saying what to do.
    """
    name = (backend if isinstance(backend, str) else pb.DataParameter.DB.Name(backend)).lower()
    if name == "leveldb" and importlib.util.find_spec("plyvel") is None:
        raise DataError(
            f"{source}: LevelDB needs the plyvel package (pip install 'netforge[leveldb]'); "
            "or set 'backend: LMDB' in the data_param and convert the data to LMDB "
            "(netforge convert imageset, or Caffe's convert_imageset --backend lmdb)"
        )
    if name not in ("lmdb", "leveldb"):
        raise DataError(f"{source}: unknown database backend {name!r}; use lmdb or leveldb")
    return name


def open_reader(source: str | os.PathLike, backend: int | str = "lmdb") -> Any:
    """A Reader for ``source`` in the given backend (see ``Reader`` for the interface)."""
    if backend_name(backend, str(source)) == "leveldb":
        from netforge.data.leveldb import LevelDBReader

        return LevelDBReader(source)
    return Reader(source)


def open_writer(
    path: str | os.PathLike, backend: int | str = "lmdb", batch: int = 1000, resume: bool = False
) -> Any:
    """A Writer creating ``path`` in the given backend (see ``Writer`` for the interface);
    with ``resume``, adding to the database already there."""
    if backend_name(backend, str(path)) == "leveldb":
        from netforge.data.leveldb import LevelDBWriter

        return LevelDBWriter(path, batch, resume=resume)
    return Writer(path, batch, resume=resume)


class Reader:
    """Read-only LMDB access in key order, with a resumable position (the next key)."""

    def __init__(self, source: str | os.PathLike) -> None:
        self.source = str(source)
        path = Path(source)
        check_complete(path)
        if not os.path.isfile(path / "data.mdb"):
            raise DataError(
                f"cannot open LMDB database {self.source}: "
                + ("no such directory" if not os.path.exists(path) else "no data.mdb inside")
            )
        self.env = _open_shared(path.resolve())
        self.size = self.env.stat()["entries"]
        if self.size == 0:
            raise DataError(f"LMDB database {self.source} is empty")

    def first_key(self) -> bytes:
        with self.env.begin() as txn:
            cursor = txn.cursor()
            cursor.first()
            return cursor.key()

    def read(self, start: bytes, count: int) -> tuple[list[tuple[bytes, bytes]], bytes, int]:
        """``count`` records from key ``start`` on, wrapping to the first key at the end.

        Returns the records, the key to start from next time and how many wraps happened.
        """
        records: list[tuple[bytes, bytes]] = []
        wraps = 0
        with self.env.begin() as txn:
            cursor = txn.cursor()
            found = cursor.set_range(start)
            while len(records) < count:
                if not found:
                    wraps += 1
                    found = cursor.first()
                records.append((cursor.key(), cursor.value()))
                found = cursor.next()
            if not found:
                wraps += 1
                cursor.first()
            return records, cursor.key(), wraps

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        """Every (key, value) once, in key order."""
        with self.env.begin() as txn:
            yield from txn.cursor()

    def close(self) -> None:
        _release(self.env)


# py-lmdb refuses to open one environment twice in a process, but a train and a test net
# may read the same database: readers share one read-only environment per path.
_shared: dict[Path, list] = {}
_shared_lock = threading.Lock()


def _open_shared(path: Path) -> lmdb.Environment:
    with _shared_lock:
        if path in _shared:
            _shared[path][1] += 1
            return _shared[path][0]
        try:
            env = lmdb.open(str(path), readonly=True, lock=True, readahead=False)
        except lmdb.Error:
            # A read-only copy (no write access to lock.mdb): Caffe falls back to no locking.
            try:
                env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
            except lmdb.Error as exc:
                raise DataError(f"cannot open LMDB database {path}: {exc}") from None
        _shared[path] = [env, 1]
        return env


def _release(env: lmdb.Environment) -> None:
    with _shared_lock:
        for path, entry in list(_shared.items()):
            if entry[0] is env:
                entry[1] -= 1
                if entry[1] == 0:
                    del _shared[path]
                    env.close()


class BatchedWriter(abc.ABC):
    """Records added to a new database ``batch`` puts at a time; each backend writes one
    batch (``_write``) and closes (``_close``).

    Use as a context manager: leaving the block commits what is pending and closes. An
    interrupted conversion keeps what was committed; pending records are dropped with the
    exception, so the database stays consistent.
    """

    def __init__(self, path: str | os.PathLike, batch: int) -> None:
        self.path = Path(path)
        self.batch = batch
        self.pending: list[tuple[bytes, bytes]] = []
        self.committed = 0

    def put(self, key: bytes | str, value: bytes) -> None:
        self.pending.append((key.encode() if isinstance(key, str) else key, value))
        if len(self.pending) >= self.batch:
            self.commit()

    def commit(self) -> None:
        """Write the pending records as one batch."""
        if self.pending:
            self._write(self.pending)
            self.committed += len(self.pending)
            self.pending = []

    def close(self) -> None:
        self.commit()
        self._close()

    def __enter__(self) -> BatchedWriter:
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.commit()
        self._close()

    @abc.abstractmethod
    def _write(self, records: list[tuple[bytes, bytes]]) -> None:
        """Store ``records`` (key, value) as one batch."""

    @abc.abstractmethod
    def _close(self) -> None:
        """Release the database."""


class Writer(BatchedWriter):
    """Create an LMDB database and add records, committing every ``batch`` puts.

    The directory must not exist yet or be empty (Caffe refuses to overwrite a database),
    unless ``resume`` adds to the database there.
    """

    def __init__(self, path: str | os.PathLike, batch: int = 1000, resume: bool = False) -> None:
        super().__init__(path, batch)
        exists = self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir()))
        if exists and not resume:
            raise DataError(f"{self.path} already exists; remove it or choose another name")
        try:
            self.env = lmdb.open(str(self.path), map_size=INITIAL_MAP_SIZE, subdir=True)
        except lmdb.Error as exc:
            raise DataError(f"cannot create LMDB database {self.path}: {exc}") from None

    def _write(self, records: list[tuple[bytes, bytes]]) -> None:
        """One transaction, the map grown until the records fit."""
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in records:
                        txn.put(key, value)
                return
            except lmdb.MapFullError:
                self.env.set_mapsize(self.env.info()["map_size"] * 2)

    def _close(self) -> None:
        self.env.close()
