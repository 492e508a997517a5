"""HDF5 data files: the batch source of the HDF5Data layer and the writer of converters.

As Caffe's HDF5DataLayer: ``source`` is a text file listing .h5 paths (whitespace
separated); each file holds one dataset per top, named as the top, all with the same
number of rows (axis 0); a batch is ``batch_size`` consecutive rows, continuing into the
next file and wrapping after the last. With ``shuffle`` the file order is permuted at the
start and at each pass over the files, and the rows of each file each time it is loaded;
a batch never mixes rows of two files except where one ends (as Caffe).

Unlike Caffe, a file is not always loaded whole: files up to ``MEMORY_LIMIT`` bytes are,
larger ones are read per batch by h5py slicing (sorted row indices when shuffled).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from netforge.data.sources import child_rng
from netforge.errors import DataError
from netforge.memory import available_bytes
from netforge.reading import read_text
from netforge.weights import hdf5_damage, refuse_links

log = logging.getLogger("netforge")

#: files whose datasets together exceed this many bytes are read in slices, not loaded.
MEMORY_LIMIT = 1 << 30


def read_file_list(source: str | os.PathLike) -> list[str]:
    """The .h5 paths a source list names (relative paths are relative to the CWD, as Caffe)."""
    try:
        names = read_text(source).split()
    except OSError as exc:
        raise DataError(f"cannot read HDF5 list file {source}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"HDF5 list file {source} is not text (byte {exc.start})") from None
    if not names:
        raise DataError(f"HDF5 list file {source} names no files")
    return names


def _damage_is_data_error(path: str) -> contextlib.AbstractContextManager[None]:
    """What h5py raises for a damaged file, as a DataError naming it."""
    return hdf5_damage(f"HDF5 file {path} is damaged", "; regenerate it")


class _Rows:
    """The datasets of one file, in memory or left on disk, read by row indices."""

    def __init__(self, path: str, names: Sequence[str], memory_limit: int) -> None:
        self.path = path
        try:
            self.file = h5py.File(path, "r")
        except OSError as exc:
            raise DataError(f"cannot open HDF5 file {path}: {exc}") from None
        with _damage_is_data_error(path):
            self._open(names, memory_limit)

    def _open(self, names: Sequence[str], memory_limit: int) -> None:
        path = self.path
        refuse_links(self.file, path)
        self.sets: list[Any] = []
        for name in names:
            if name not in self.file:
                raise DataError(
                    f"HDF5 file {path} has no dataset {name!r} (datasets are named after the "
                    f"layer's tops; it has {sorted(self.file)})"
                )
            dataset = self.file[name]
            if not isinstance(dataset, h5py.Dataset) or dataset.ndim < 1:
                raise DataError(f"HDF5 file {path}: {name!r} must be a dataset of >= 1 axes")
            if dataset.dtype.kind not in "fiub":
                raise DataError(f"HDF5 file {path}: dataset {name!r} is not numeric")
            self.sets.append(dataset)
        rows = {d.shape[0] for d in self.sets}
        if len(rows) != 1:
            raise DataError(f"HDF5 file {path}: datasets {list(names)} differ in row count")
        self.rows = rows.pop()
        if self.rows == 0:
            raise DataError(f"HDF5 file {path} has no rows")
        # A file may declare datasets far larger than its bytes (unwritten chunks read as the
        # fill value): load only what also fits in half the memory available.
        size = sum(d.size * d.dtype.itemsize for d in self.sets)
        if size <= min(memory_limit, available_bytes() // 2):
            self.sets = [d[()] for d in self.sets]
            self.file.close()

    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(d.shape[1:]) for d in self.sets]

    def take(self, index: np.ndarray) -> list[np.ndarray]:
        if isinstance(self.sets[0], np.ndarray):
            return [d[index] for d in self.sets]
        with _damage_is_data_error(self.path):
            return self._read(index)

    def _read(self, index: np.ndarray) -> list[np.ndarray]:
        if (np.diff(index) == 1).all():
            rows = slice(int(index[0]), int(index[-1]) + 1)
            return [d[rows] for d in self.sets]
        # h5py reads increasing indices only: read sorted, then put back in order.
        order = np.argsort(index)
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return [d[index[order]][back] for d in self.sets]


class HDF5Source:
    """Rows of the listed HDF5 files in Caffe's order (see the module docstring)."""

    def __init__(
        self,
        source: str,
        names: Sequence[str],
        batch_size: int,
        shuffle: bool,
        rng: np.random.Generator,
        dtype: Any,
        memory_limit: int | None = None,
    ) -> None:
        self.where = f"HDF5 source {source}"
        self.files = read_file_list(source)
        self.names = list(names)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.rng = child_rng(rng)
        self.dtype = np.dtype(dtype)
        self.memory_limit = MEMORY_LIMIT if memory_limit is None else memory_limit
        self.file_order = list(range(len(self.files)))
        self.file_index = 0
        self.row = 0
        self.rows_state: dict | None = None
        #: (rank, count): keep row k of the stream when k % count == rank (Caffe's
        #: HDF5DataLayer::Skip for data-parallel training); every rank walks every row.
        self.shard = (0, 1)
        if shuffle:
            self.file_order = self.rng.permutation(len(self.files)).tolist()
        self._load()
        self.row_shapes = self.current.shapes()

    def _load(self) -> None:
        """Open the current file and, with shuffle, draw its row order."""
        self.current = _Rows(
            self.files[self.file_order[self.file_index]], self.names, self.memory_limit
        )
        self.rows_state = self.rng.bit_generator.state if self.shuffle else None
        self._draw_rows()

    def _draw_rows(self) -> None:
        n = self.current.rows
        self.row_order = self.rng.permutation(n) if self.shuffle else np.arange(n)

    def shapes(self) -> list[tuple[int, ...]]:
        return [(self.batch_size, *shape) for shape in self.row_shapes]

    def next_batch(self) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = []
        rank, count = self.shard
        need = self.batch_size * count
        while need:
            take = min(need, self.current.rows - self.row)
            rows = self.row_order[self.row : self.row + take]
            if count > 1:
                # A batch starts at a stream offset that is a multiple of count.
                done = self.batch_size * count - need
                rows = rows[(np.arange(done, done + take) % count) == rank]
            if len(rows):
                parts.append(self.current.take(rows))
            if self.current.shapes() != self.row_shapes:
                raise DataError(
                    f"{self.where}: file {self.current.path} has row shapes "
                    f"{self.current.shapes()}, the first file had {self.row_shapes}"
                )
            need -= take
            self.row += take
            if self.row == self.current.rows:
                self._advance()
        return [
            np.concatenate([p[i] for p in parts]).astype(self.dtype, copy=False)
            for i in range(len(self.names))
        ]

    def _advance(self) -> None:
        """Caffe's HDF5DataLayer::Next at the end of a file."""
        self.row = 0
        if len(self.files) == 1:
            if self.shuffle:
                self.rows_state = self.rng.bit_generator.state
                self._draw_rows()
            return
        self.file_index += 1
        if self.file_index == len(self.files):
            self.file_index = 0
            if self.shuffle:
                self.file_order = self.rng.permutation(len(self.files)).tolist()
            log.info("%s: looping around to the first file", self.where)
        self._load()

    def get_state(self) -> dict:
        return {
            "file_order": self.file_order,
            "file_index": self.file_index,
            "row": self.row,
            "rows_rng": self.rows_state,
            "rng": self.rng.bit_generator.state,
        }

    def set_state(self, state: dict) -> None:
        reload = state["file_order"][state["file_index"]] != self.file_order[self.file_index]
        self.file_order = list(state["file_order"])
        self.file_index = int(state["file_index"])
        if reload:
            self.current = _Rows(
                self.files[self.file_order[self.file_index]], self.names, self.memory_limit
            )
        self.rows_state = state["rows_rng"]
        if self.rows_state is not None:
            self.rng.bit_generator.state = self.rows_state
        self._draw_rows()
        self.row = int(state["row"])
        self.rng.bit_generator.state = state["rng"]


def write_hdf5(
    path: str | os.PathLike, arrays: dict[str, np.ndarray], chunk_rows: int = 64
) -> None:
    """Write named arrays as chunked, gzip-compressed datasets (the HDF5Data layout)."""
    from netforge.atomic import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as out:
        for name, array in arrays.items():
            chunks = (min(chunk_rows, max(1, len(array))), *array.shape[1:])
            out.create_dataset(name, data=array, chunks=chunks, compression="gzip")
