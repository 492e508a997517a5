"""Feature extraction: Caffe's ``tools/extract_features.cpp``.

A TEST-phase net runs forward ``num_batches`` times; after each pass, every sample of every
named blob becomes one record of that blob's output. Databases (LMDB, or LevelDB through the
optional extra) get Caffe's records exactly: a Datum whose ``channels``/``height``/``width``
are the blob's legacy 4-D dims (1 where the blob has fewer axes) and whose ``float_data``
holds the sample's values, under the key ``%010d`` of its running index, committed every
1000 records. An HDF5 output (netforge's addition) is one file per blob holding a float32
dataset named after the blob, of shape (records, blob dims after the first).

Each output is written as ``<name>.incomplete`` and renamed to its name when every batch is
in, so an interrupted or failed extraction leaves nothing under the names asked for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from netforge.backend import to_numpy
from netforge.data.db import staging_path
from netforge.errors import ConfigError, DataError, ShapeError

log = logging.getLogger("netforge")

#: the output kinds: Caffe's two database types, and HDF5
KINDS = ("lmdb", "leveldb", "hdf5")
#: Caffe commits (and logs) every this many records per blob
COMMIT_EVERY = 1000
# Datum field 6 (float_data, repeated float, not packed): tag (6 << 3) | 5 before each value.
_FLOAT_DATA_TAG = 0x35


def _varint_field(number: int, value: int) -> bytes:
    out = bytearray([number << 3])
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def legacy_dims(shape: Sequence[int]) -> tuple[int, int, int]:
    """Caffe's Blob::channels(), height(), width(): axes 1-3, 1 where the blob has fewer."""
    if len(shape) > 4:
        raise ShapeError(f"a Datum holds at most 4-D blobs (Caffe's legacy dims); got {shape}")
    padded = (*shape, 1, 1, 1)
    return padded[1], padded[2], padded[3]


def feature_datums(features: np.ndarray) -> list[bytes]:
    """One serialized Datum per row of ``features`` (n, ...), byte for byte as Caffe's
    ``Datum::SerializeToString`` writes them: channels, height, width, then each value as a
    separate float_data field. Built with numpy, not one protobuf append per value."""
    features = np.ascontiguousarray(features, dtype="<f4")
    n = features.shape[0]
    channels, height, width = legacy_dims(features.shape)
    header = _varint_field(1, channels) + _varint_field(2, height) + _varint_field(3, width)
    body = np.empty((n, features[0].size, 5), np.uint8)
    body[:, :, 0] = _FLOAT_DATA_TAG
    body[:, :, 1:] = features.reshape(n, -1, 1).view(np.uint8)
    return [header + row.tobytes() for row in body]


@dataclass
class Output:
    """Where one blob's features go, and how many records it has."""

    blob: str
    path: str
    kind: str
    records: int = 0


class _DatabaseSink:
    """Datum records into a new LMDB or LevelDB database at ``path``."""

    def __init__(self, output: Output, path: str | os.PathLike) -> None:
        from netforge.data.db import open_writer

        self.output = output
        self.writer = open_writer(path, output.kind, batch=COMMIT_EVERY)

    def write(self, features: np.ndarray) -> None:
        """Add one batch's samples as records under the next running indices."""
        start = self.output.records
        for i, value in enumerate(feature_datums(features), start):
            self.writer.put(f"{i:010d}", value)
            if (i + 1) % COMMIT_EVERY == 0:
                log.info(
                    "Extracted features of %d query images for feature blob %s",
                    i + 1,
                    self.output.blob,
                )
        self.output.records += len(features)

    def close(self) -> None:
        """Commit what is pending and release the database."""
        self.writer.close()


class _HDF5Sink:
    """A float32 dataset named after the blob, grown by each batch, in the file ``path``."""

    def __init__(self, output: Output, path: str | os.PathLike) -> None:
        import h5py

        self.output = output
        try:
            self.file = h5py.File(path, "x")
        except OSError as exc:
            raise DataError(f"cannot create {path}: {exc}") from None
        self.dataset = None

    def write(self, features: np.ndarray) -> None:
        """Append one batch's samples to the dataset (created at the first batch)."""
        if self.dataset is None:
            self.dataset = self.file.create_dataset(
                self.output.blob,
                shape=(0, *features.shape[1:]),
                maxshape=(None, *features.shape[1:]),
                dtype=np.float32,
                chunks=True,
            )
        start = self.output.records
        self.dataset.resize(start + len(features), axis=0)
        self.dataset[start:] = features
        self.output.records += len(features)

    def close(self) -> None:
        """Close the HDF5 file."""
        self.file.close()


def extract_features(
    net,
    blobs: Sequence[str],
    paths: Sequence[str | os.PathLike],
    num_batches: int,
    kind: str = "lmdb",
    progress: Callable[[int], None] | None = None,
) -> list[Output]:
    """Run ``net`` forward ``num_batches`` times and write each of ``blobs`` to the output at
    the same position of ``paths`` (``kind``: lmdb, leveldb or hdf5). ``progress`` is called
    with 1 after each batch. Returns what each output received."""
    outputs = plan_outputs(net, blobs, paths, num_batches, kind)
    staged = [staging_path(output.path) for output in outputs]
    for path in staged:
        try:
            # as netforge convert imageset: the output's folder is made when missing
            os.makedirs(path.parent, exist_ok=True)
        except OSError as exc:
            raise DataError(f"cannot create the folder {path.parent}: {exc.strerror}") from None
        _remove(path)  # what a killed extraction into the same name left
    sinks: list[_DatabaseSink | _HDF5Sink] = []
    done = False
    try:
        for output, path in zip(outputs, staged):
            sink_type = _HDF5Sink if output.kind == "hdf5" else _DatabaseSink
            sinks.append(sink_type(output, path))
        for _ in range(num_batches):
            net.forward()
            for sink in sinks:
                features = to_numpy(net.blobs[sink.output.blob].data)
                # A scalar blob (a loss, an accuracy) is one sample, as Caffe's num() says.
                sink.write(features.reshape(1) if features.ndim == 0 else features)
            if progress is not None:
                progress(1)
        done = True
    finally:
        for sink in sinks:
            sink.close()
        if not done:
            for path in staged:
                _remove(path)
    for output, path in zip(outputs, staged):
        os.replace(path, output.path)
    for output in outputs:
        log.info(
            "Extracted features of %d query images for feature blob %s",
            output.records,
            output.blob,
        )
    log.info("Successfully extracted the features!")
    return outputs


def plan_outputs(
    net,
    blobs: Sequence[str],
    paths: Sequence[str | os.PathLike],
    num_batches: int,
    kind: str = "lmdb",
) -> list[Output]:
    """Check an extraction request against ``net`` (one output per blob, blobs the net has,
    a positive batch count, a known output kind, no output already there) and return its
    empty outputs."""
    if len(blobs) != len(paths):
        raise ConfigError(
            f"{len(blobs)} feature blob(s) ({','.join(blobs)}) but {len(paths)} output(s) "
            f"({','.join(map(str, paths))}); give one output per blob"
        )
    if num_batches <= 0:
        raise ConfigError(f"the number of mini-batches must be positive, got {num_batches}")
    kind = kind.lower()
    if kind not in KINDS:
        raise ConfigError(f"unknown output type {kind!r}; use one of {', '.join(KINDS)}")
    for name in blobs:
        if name not in net.blobs:
            raise ConfigError(
                f"unknown feature blob name {name!r} in the network {net.name!r}; its blobs: "
                f"{', '.join(net.blobs)}"
            )
    if len({os.path.abspath(path) for path in paths}) != len(paths):
        raise ConfigError(f"an output is named twice in {','.join(map(str, paths))}")
    for path in paths:
        # os.path, not pathlib: a name too long for the file system is False, not an OSError
        if os.path.lexists(path):
            raise DataError(f"{path} already exists; remove it or choose another name")
    return [Output(blob, os.fspath(path), kind) for blob, path in zip(blobs, paths)]


def _remove(path: str | os.PathLike) -> None:
    """Delete a staged output (a database folder or an HDF5 file) if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
