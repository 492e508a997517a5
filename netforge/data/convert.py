"""Converters: image lists to LMDB (Caffe's convert_imageset) and to HDF5, and image means.

The list file format (one ``<path> <label>`` or ``<path> <target> <target>...`` per line)
is described in ``netforge.data.listfile``. Labels go to ``Datum.label``; several numbers,
or a non-integer one, go to ``Datum.targets`` (LMDB) or to a (N, T) ``label`` dataset
(HDF5), which the Data and HDF5Data layers hand to the net as a (batch, T) label top.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from netforge.atomic import atomic_write, target_lock
from netforge.data.datum import (
    FORMATS,
    datum_image,
    encode_image,
    make_datum,
    parse_datum,
    read_image,
)
from netforge.data.db import INCOMPLETE, last_key, open_reader, open_writer, staging_path
from netforge.data.hdf5 import write_hdf5
from netforge.data.listfile import Entry, read_list
from netforge.data.pipeline import decode_map
from netforge.errors import DataError

log = logging.getLogger("netforge")

#: how many images are decoded together (and the LMDB commit size, as Caffe's 1000).
CHUNK = 256
COMMIT_EVERY = 1000


@dataclass
class Summary:
    """What a conversion did: records written and the images skipped, with the reason;
    ``resumed_at`` is the list entry a resumed conversion started from (0: from the start)."""

    written: int = 0
    resumed_at: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    outputs: list[Path] = field(default_factory=list)


def _entries(root: str | os.PathLike, list_file: str | os.PathLike, shuffle: bool, seed):
    if not os.path.isdir(root):  # False, not an OSError, for a name too long
        raise DataError(f"image root folder {root} does not exist or is not a directory")
    entries = read_list(list_file)
    return _shuffled(entries, seed) if shuffle else entries


def _shuffled(entries: list[Entry], seed) -> list[Entry]:
    order = np.random.default_rng(seed).permutation(len(entries))
    return [entries[i] for i in order]


def _resize(height: int, width: int) -> tuple[int, int]:
    """Caffe resizes only when both sizes are > 0; (0, 0) means keep the image's size."""
    return (height, width) if height > 0 and width > 0 else (0, 0)


def _decoded(
    root: str | os.PathLike,
    entries: list[Entry],
    decode: Callable[[str, Entry], Any],
    summary: Summary,
    progress: Callable[[int], None] | None,
    first: int = 0,
) -> Iterator[tuple[int, Entry, Any]]:
    """``(index, entry, decode(path under root, entry))`` in list order, decoded ``CHUNK``
    entries at a time on the decoding pool. An entry whose decode raises a DataError (an
    unreadable or corrupt file) is logged, listed in ``summary.skipped`` and left out;
    ``progress(n)`` is called after each chunk. Entries before ``first`` are left out."""

    def attempt(item: tuple[int, Entry]) -> tuple[int, Entry, Any]:
        index, entry = item
        try:
            return index, entry, decode(os.path.join(root, entry.path), entry)
        except DataError as exc:
            return index, entry, exc

    for start in range(first, len(entries), CHUNK):
        chunk = entries[start : start + CHUNK]
        for index, entry, value in decode_map(attempt, enumerate(chunk, start)):
            if isinstance(value, DataError):
                log.warning("skipping %s: %s", entry.path, value)
                summary.skipped.append((entry.path, str(value)))
                continue
            yield index, entry, value
        if progress is not None:
            progress(len(chunk))


def _encoding_of(path: str, encoded: bool, encode_type: str) -> str:
    """Caffe: an explicit encode_type implies encoded; otherwise the file's extension."""
    if encode_type:
        return encode_type.lower().lstrip(".")
    if encoded:
        return Path(path).suffix.lower().lstrip(".")
    return ""


def datum_for(
    path: str,
    entry: Entry,
    *,
    color: bool,
    size: tuple[int, int],
    encoding: str,
) -> bytes:
    """The serialized Datum convert_imageset writes for one image (ReadImageToDatum).

    Encoded records keep the file's own bytes when no resize or colour change is needed
    and its extension matches the encoding (jpg = jpeg), else the image is re-encoded.
    """
    image = read_image(path, color, *size)
    if not encoding:
        return make_datum(image, entry.label, entry.targets).SerializeToString()
    if encoding not in FORMATS:
        raise DataError(f"unknown encode_type {encoding!r}; use one of {sorted(FORMATS)}")
    same_ext = FORMATS.get(Path(path).suffix.lower().lstrip(".")) == FORMATS[encoding]
    # Caffe compares the decoded channel count with the colour request.
    if (image.shape[0] == 3) == color and not any(size) and same_ext:
        data = Path(path).read_bytes()
    else:
        data = encode_image(image, encoding)
    return make_datum(data, entry.label, entry.targets).SerializeToString()


def convert_imageset(
    root: str | os.PathLike,
    list_file: str | os.PathLike,
    db: str | os.PathLike,
    *,
    gray: bool = False,
    shuffle: bool = False,
    backend: str = "lmdb",
    resize_height: int = 0,
    resize_width: int = 0,
    check_size: bool = False,
    encoded: bool = False,
    encode_type: str = "",
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Caffe's convert_imageset: every listed image as a Datum in a new LMDB database.

    Keys are the 8-digit line index (after shuffling) + "_" + the listed path, values the
    Datum (raw uint8 C×H×W BGR, or the encoded file). Resizing happens only when both sizes
    are > 0. Unreadable or corrupt images are logged, skipped and listed in the summary.
    ``progress(n)`` is called as images are processed.

    The records go to ``<db>.incomplete``, which holds a marker file (``INCOMPLETE``: the
    options and the shuffle seed) until the last record is committed and is then renamed to
    ``db``: a killed conversion never leaves a database under the final name, readers refuse
    the incomplete one, and running the same conversion again resumes after its last
    committed record (a shuffled list is shuffled alike: the marker keeps the seed).
    """
    final = Path(db)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the folder of {final}: {exc.strerror}") from None
    # One conversion into a database at a time: two would write one <db>.incomplete.
    with target_lock(final):
        if os.path.exists(final):
            raise DataError(f"{final} already exists; remove it or choose another name")
        staging = staging_path(final)
        options = {
            "root": os.path.abspath(root),
            "list_file": os.path.abspath(list_file),
            "gray": gray,
            "shuffle": shuffle,
            "backend": backend,
            "resize": [resize_height, resize_width],
            "check_size": check_size,
            "encoded": encoded,
            "encode_type": encode_type,
            "seed": seed,
        }
        entries = _entries(root, list_file, False, None)
        first = _resume_point(staging, options, backend)
        if shuffle:
            entries = _shuffled(entries, options["seed"])
        size = _resize(resize_height, resize_width)
        summary = Summary(outputs=[final], resumed_at=first)
        data_size = None
        if first and progress is not None:
            progress(first)

        def one(path: str, entry: Entry) -> bytes:
            encoding = _encoding_of(entry.path, encoded, encode_type)
            return datum_for(path, entry, color=not gray, size=size, encoding=encoding)

        with open_writer(staging, backend, batch=COMMIT_EVERY, resume=True) as writer:
            for index, entry, value in _decoded(root, entries, one, summary, progress, first):
                if check_size:
                    length = len(parse_datum(value, entry.path).data)
                    if data_size is None:
                        data_size = length
                    elif length != data_size:
                        raise DataError(
                            f"{entry.path}: {length} bytes of pixel data, the first image had "
                            f"{data_size} (--check-size: all images must have the same size)"
                        )
                writer.put(f"{index:08d}_{entry.path}", value)
                summary.written += 1
        (staging / INCOMPLETE).unlink()
        os.replace(staging, final)
        return summary


def _resume_point(staging: Path, options: dict[str, Any], backend: str) -> int:
    """The index of the first entry a conversion into ``staging`` still has to write: 0 for
    a new one (whose marker is written here), or one past the last committed record of an
    interrupted one with the same options. Fills ``options["seed"]`` with the seed a
    shuffled conversion uses."""
    marker = staging / INCOMPLETE
    if not os.path.exists(marker):
        if os.path.exists(staging):
            raise DataError(f"{staging} is in the way of the conversion; remove it")
        if options["shuffle"] and options["seed"] is None:
            # Drawn and kept, so that a resumed run shuffles alike.
            options["seed"] = int(np.random.SeedSequence().entropy % 2**63)
        try:
            staging.mkdir(parents=True)
            marker.write_text(json.dumps(options))
        except OSError as exc:
            raise DataError(f"cannot create the database {staging}: {exc.strerror}") from None
        return 0
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{marker}: unreadable ({exc}); remove {staging} to start over") from None
    if options["seed"] is None and options["shuffle"]:
        options["seed"] = recorded.get("seed")
    if recorded != options:
        changed = sorted(k for k in options if recorded.get(k) != options[k])
        raise DataError(
            f"{staging} holds an interrupted conversion with other settings ({', '.join(changed)}"
            f"); run it again with the same arguments to resume it, or remove {staging}"
        )
    key = last_key(staging, backend)
    first = int(key[:8]) + 1 if key else 0
    log.info("resuming the interrupted conversion in %s at list entry %d", staging, first)
    return first


def convert_hdf5(
    root: str | os.PathLike,
    list_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    gray: bool = False,
    shuffle: bool = False,
    resize_height: int = 0,
    resize_width: int = 0,
    scale: float = 1.0,
    rows_per_file: int = 1000,
    data_name: str = "data",
    label_name: str = "label",
    seed: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Images (C×H×W BGR, as the Data layer gives them) or ``.npy`` arrays with their labels
    or targets into chunked, compressed HDF5 files of ``rows_per_file`` rows each, plus
    ``list.txt`` naming them (absolute paths), ready for an HDF5Data layer.

    Data is stored as float32 times ``scale`` (HDF5Data does not transform); labels as a
    (N,) float dataset, or (N, T) for targets. Unreadable inputs are skipped and listed.

    A listing left by an earlier conversion into ``out_dir`` is removed before the first
    part is written, and the new one written (atomically) after the last: an interrupted
    conversion leaves no ``list.txt`` naming a mix of its parts and the earlier ones.
    """
    entries = _entries(root, list_file, shuffle, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One conversion into a folder at a time: two would write the same part files.
    with target_lock(out):
        listing = out / "list.txt"
        with contextlib.suppress(FileNotFoundError):
            listing.unlink()
        size = _resize(resize_height, resize_width)
        summary = Summary()

        def one(path: str, entry: Entry) -> np.ndarray:
            if not path.endswith(".npy"):
                return read_image(path, not gray, *size)
            try:
                return np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"cannot read array {path}: {exc}") from None

        rows: list[np.ndarray] = []
        labels: list = []
        shape = None

        def flush() -> None:
            if not rows:
                return
            target = out / f"part-{len(summary.outputs):05d}.h5"
            data = np.stack(rows).astype(np.float32) * np.float32(scale)
            write_hdf5(target, {data_name: data, label_name: np.asarray(labels, np.float32)})
            summary.outputs.append(target)
            rows.clear()
            labels.clear()

        for _, entry, value in _decoded(root, entries, one, summary, progress):
            if shape is None:
                shape = value.shape
            elif value.shape != shape:
                raise DataError(
                    f"{entry.path}: shape {value.shape}, the first input had {shape}; resize "
                    "images (--resize-height/--resize-width) so that all rows match"
                )
            rows.append(value)
            labels.append(entry.targets if entry.targets else entry.label)
            summary.written += 1
            if len(rows) == rows_per_file:
                flush()
        flush()
        with atomic_write(listing, "w") as handle:
            handle.write("".join(f"{p.resolve()}\n" for p in summary.outputs))
        summary.outputs.append(listing)
        return summary


def compute_mean(db: str | os.PathLike, backend: str = "lmdb") -> tuple[np.ndarray, int]:
    """Caffe's compute_image_mean: the element-wise mean (C, H, W) of every record.

    Encoded records are decoded; raw records use ``data`` or ``float_data``. All records
    must have the same shape. Sums are kept in float64 (Caffe sums in float32).
    """
    reader = open_reader(db, backend)
    total = None
    shape = None
    count = 0
    batch: list[np.ndarray] = []

    def add() -> None:
        nonlocal total
        part = np.sum(np.stack(batch), axis=0, dtype=np.float64)
        total = part if total is None else total + part
        batch.clear()

    try:
        for key, value in reader:
            where = f"{db}, key {key.decode(errors='replace')!r}"
            image = datum_image(parse_datum(value, where), None, where)
            shape = shape or image.shape
            if image.shape != shape:
                raise DataError(f"{where}: shape {image.shape} differs from the first record's")
            batch.append(image)
            count += 1
            if len(batch) == CHUNK:
                add()
    finally:
        reader.close()
    if batch:
        add()
    return total / count, count
