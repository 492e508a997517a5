"""Batch sources for the prefetching data layers: LMDB Datum records and image lists.

Each source owns a random generator derived from the layer's ``rng`` at setup, so its
draws (shuffles, crops, mirrors) are a fixed sequence independent of the rest of the net,
and its whole position — cursor, epoch, shuffle order, generator state — is a small
JSON-serialisable dict (``get_state``/``set_state``). A shuffle order is stored as the
generator state it was drawn from, and drawn again on restore.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge.data.datum import Record, decode_record, read_image
from netforge.data.db import open_reader
from netforge.data.listfile import Entry, read_list
from netforge.data.pipeline import decode_map
from netforge.data.transform import Transformer
from netforge.errors import DataError

log = logging.getLogger("netforge")


def child_rng(rng: np.random.Generator) -> np.random.Generator:
    """A generator of its own for a data source, seeded from the net's generator."""
    return np.random.Generator(np.random.PCG64(int(rng.integers(0, 2**63))))


def rank_rng(rng: np.random.Generator, shard: tuple[int, int]) -> np.random.Generator:
    """The generator one batch draws its random choices from (crops, mirrors, WindowData's
    windows): ``rng`` itself when the source trains alone. In a data-parallel run, one
    seeded by a draw from ``rng`` and the rank: Caffe seeds rank r with random_seed + r, so
    the ranks augment (or sample) apart, while ``rng`` advances alike on every rank, so
    shuffled orders agree and rank 0's snapshot resumes every rank."""
    rank, count = shard
    if count == 1:
        return rng
    return np.random.Generator(np.random.PCG64([int(rng.integers(0, 2**63)), rank]))


def labels_of(records: Sequence[Record], num_targets: int, keys: Sequence[str], where: str):
    """The label top of a batch: (N,) int labels as floats, or (N, T) targets.

    ``num_targets`` is what the source's first record holds (0: a single label); every record
    must agree, in either direction, or its targets would be dropped or misread silently."""
    for key, record in zip(keys, records):
        if len(record.targets) != num_targets:
            raise DataError(
                f"{where}: record {key!r} has {len(record.targets)} targets, the first record "
                f"had {num_targets}; every record must have the same number"
            )
    if not num_targets:
        return np.array([r.label for r in records], dtype=np.float64)
    return np.array([r.targets for r in records], dtype=np.float64)


class BatchSource:
    """Common parts: batch size, transformer, output dtype and the owned generator."""

    def __init__(
        self,
        where: str,
        batch_size: int,
        transformer: Transformer,
        rng: np.random.Generator,
        dtype: Any,
    ) -> None:
        self.where = where
        self.batch_size = batch_size
        self.transformer = transformer
        self.rng = child_rng(rng)
        self.dtype = np.dtype(dtype)
        self.num_targets = 0
        #: (rank, count): keep record k of the stream when k % count == rank (Caffe's
        #: DataLayer::Skip for data-parallel training); every rank walks the whole stream.
        self.shard = (0, 1)

    def color(self) -> bool | None:
        """How encoded records decode: force_color, force_gray, or their own channels."""
        if self.transformer.force_color:
            return True
        return False if self.transformer.force_gray else None

    def shapes(self) -> list[tuple[int, ...]]:
        """The (data, label) top shapes, from the record the next batch starts with."""
        record, _ = self.peek()
        data = (self.batch_size, *self.transformer.output_shape(record.image.shape))
        self.num_targets = len(record.targets)
        label = (self.batch_size, self.num_targets) if self.num_targets else (self.batch_size,)
        return [data, label]

    def peek(self) -> tuple[Record, str]:
        raise NotImplementedError

    def assemble(self, records: Sequence[Record], keys: Sequence[str]) -> list[np.ndarray]:
        rng = rank_rng(self.rng, self.shard)
        data = self.transformer([r.image for r in records], rng, self.dtype, keys)
        labels = labels_of(records, self.num_targets, keys, self.where)
        return [data, labels.astype(self.dtype)]


class DatumSource(BatchSource):
    """Datum records from a database in key order, wrapping at the end (Data layer)."""

    def __init__(self, source: str, backend: int | str, *args: Any, **kwargs: Any) -> None:
        self.reader = open_reader(source, backend)
        kind = "LevelDB" if type(self.reader).__name__.startswith("LevelDB") else "LMDB"
        super().__init__(f"{kind} {source}", *args, **kwargs)
        self.key = self.reader.first_key()
        self.epoch = 0

    def _decode(self, item: tuple[bytes, bytes]) -> Record:
        key, value = item
        return decode_record(
            value, self.color(), f"{self.where}, key {key.decode(errors='replace')!r}"
        )

    def peek(self) -> tuple[Record, str]:
        records, _, _ = self.reader.read(self.key, 1)
        return self._decode(records[0]), records[0][0].decode(errors="replace")

    def next_batch(self) -> list[np.ndarray]:
        rank, count = self.shard
        items, self.key, wraps = self.reader.read(self.key, self.batch_size * count)
        if wraps:
            log.info("%s: restarting data prefetching from start", self.where)
            self.epoch += wraps
        items = items[rank::count]
        records = decode_map(self._decode, items)
        return self.assemble(records, [k.decode(errors="replace") for k, _ in items])

    def get_state(self) -> dict:
        return {"key": self.key.hex(), "epoch": self.epoch, "rng": self.rng.bit_generator.state}

    def set_state(self, state: dict) -> None:
        self.key = bytes.fromhex(state["key"])
        self.epoch = int(state["epoch"])
        self.rng.bit_generator.state = state["rng"]


class ImageListSource(BatchSource):
    """Images named by a list file, read from ``root_folder`` (the ImageData layer).

    With ``shuffle`` the list is permuted at the start and at every epoch, as Caffe's
    ImageData; ``rand_skip`` skips a random number (< rand_skip) of entries at the start.
    """

    def __init__(
        self,
        list_file: str,
        root_folder: str,
        *args: Any,
        shuffle: bool,
        rand_skip: int,
        color: bool,
        size: tuple[int, int],
        **kwargs: Any,
    ) -> None:
        super().__init__(f"image list {list_file}", *args, **kwargs)
        self.entries: list[Entry] = read_list(list_file)
        self.root = root_folder
        self.shuffle = shuffle
        self.is_color = color
        self.size = size
        self.epoch = 0
        self.cursor = 0
        self.order_state: dict | None = None
        self.order = np.arange(len(self.entries))
        # The list order draws from a generator of its own: the crops and mirrors draw a
        # different number of times per batch alone and in a data-parallel run
        # (``rank_rng``), and the order must not depend on that for the record split to hold.
        self.order_rng = child_rng(self.rng) if shuffle else None
        if shuffle:
            self._shuffle()
        if rand_skip:
            self.cursor = int(self.rng.integers(0, rand_skip)) % len(self.entries)

    def _shuffle(self) -> None:
        self.order_state = self.order_rng.bit_generator.state
        self.order = self.order_rng.permutation(len(self.entries))

    def _read(self, entry: Entry) -> Record:
        path = os.path.join(self.root, entry.path) if self.root else entry.path
        image = read_image(path, self.is_color, *self.size)
        return Record(image, entry.label, entry.targets)

    def peek(self) -> tuple[Record, str]:
        entry = self.entries[self.order[self.cursor]]
        return self._read(entry), entry.path

    def next_batch(self) -> list[np.ndarray]:
        picked = []
        rank, count = self.shard
        for _ in range(self.batch_size * count):
            picked.append(self.entries[self.order[self.cursor]])
            self.cursor += 1
            if self.cursor == len(self.entries):
                log.info("%s: restarting data prefetching from start", self.where)
                self.cursor = 0
                self.epoch += 1
                if self.shuffle:
                    self._shuffle()
        picked = picked[rank::count]
        records = decode_map(self._read, picked)
        return self.assemble(records, [e.path for e in picked])

    def get_state(self) -> dict:
        return {
            "cursor": self.cursor,
            "epoch": self.epoch,
            "order_rng": self.order_state,
            "rng": self.rng.bit_generator.state,
        }

    def set_state(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
        self.epoch = int(state["epoch"])
        if state["order_rng"] is not None and self.order_rng is not None:
            self.order_rng.bit_generator.state = state["order_rng"]
            self._shuffle()
        self.rng.bit_generator.state = state["rng"]
