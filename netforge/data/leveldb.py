"""LevelDB databases through the optional ``plyvel`` binding (Caffe's ``db_leveldb``).

Same interface as the LMDB ``Reader``/``Writer`` in ``netforge.data.db``. Writers use
Caffe's settings (64 KiB blocks, 256 MiB write buffer) and commit in batches; LevelDB
allows one open handle per database, so readers in one process share it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import plyvel

from netforge.data.db import BatchedWriter, check_complete
from netforge.errors import DataError

_shared: dict[Path, list] = {}
_lock = threading.Lock()


class LevelDBReader:
    """Key-ordered reads with a resumable position, as ``netforge.data.db.Reader``."""

    def __init__(self, source: str | os.PathLike) -> None:
        self.source = str(source)
        check_complete(source)
        self.path = Path(source).resolve()
        with _lock:
            if self.path in _shared:
                _shared[self.path][1] += 1
            else:
                try:
                    db = plyvel.DB(str(self.path), create_if_missing=False)
                except plyvel.Error as exc:
                    raise DataError(f"cannot open LevelDB database {self.source}: {exc}") from None
                _shared[self.path] = [db, 1]
            self.db = _shared[self.path][0]
        self.size = sum(1 for _ in self.db.iterator(include_value=False))
        if self.size == 0:
            raise DataError(f"LevelDB database {self.source} is empty")

    def first_key(self) -> bytes:
        return next(self.db.iterator(include_value=False))

    def read(self, start: bytes, count: int) -> tuple[list[tuple[bytes, bytes]], bytes, int]:
        """``count`` records from ``start`` on, wrapping; the next key and the wrap count."""
        records: list[tuple[bytes, bytes]] = []
        wraps = 0
        items = self.db.iterator(start=start)
        while True:
            item = next(items, None)
            if item is None:
                wraps += 1
                items = self.db.iterator()
                item = next(items)
            if len(records) == count:
                return records, item[0], wraps
            records.append(item)

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        yield from self.db.iterator()

    def close(self) -> None:
        with _lock:
            entry = _shared.get(self.path)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del _shared[self.path]
                    entry[0].close()


class LevelDBWriter(BatchedWriter):
    """Create a LevelDB database and add records, writing every ``batch`` puts at once."""

    def __init__(self, path: str | os.PathLike, batch: int = 1000, resume: bool = False) -> None:
        super().__init__(path, batch)
        try:
            self.db = plyvel.DB(
                str(self.path),
                create_if_missing=True,
                error_if_exists=not resume,
                block_size=1 << 16,
                write_buffer_size=1 << 28,
                max_open_files=100,
            )
        except plyvel.Error as exc:
            raise DataError(f"cannot create LevelDB database {self.path}: {exc}") from None

    def _write(self, records: list[tuple[bytes, bytes]]) -> None:
        with self.db.write_batch(sync=True) as batch:
            for key, value in records:
                batch.put(key, value)

    def _close(self) -> None:
        self.db.close()
