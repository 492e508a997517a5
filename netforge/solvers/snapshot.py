"""Solver snapshots: ``.solverstate`` (binary SolverState) and ``.solverstate.h5``.

The layouts are Caffe's (SGDSolver::SnapshotSolverStateTo{BinaryProto,HDF5}): ``iter``,
``learned_net`` (the caffemodel's path as written), ``current_step`` and the history blobs
(for AdaDelta and Adam: first every param's first buffer, then every param's second).
netforge adds what Caffe forgets, so a resumed run repeats the uninterrupted one exactly:
the random generator's state and each data layer's cursor. In the binary file they are the
SolverState fields 1000–1002 (with the solver type); in the HDF5 file the datasets
``rng_state``, ``solver_type`` and ``layer_state/names`` + ``layer_state/<i>``. Caffe ignores
them when it reads these files.
Every file is written through a temporary file and a rename (``netforge.atomic``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from netforge.atomic import atomic_path
from netforge.errors import ConfigError, DataError
from netforge.proto import pb
from netforge.prototxt import read_binary, write_binary
from netforge.weights import (
    array_to_proto,
    hdf5_damage,
    read_dataset,
    refuse_links,
    stored_blob,
)

log = logging.getLogger("netforge")

MODEL_SUFFIXES = (".caffemodel", ".caffemodel.h5")


@dataclass
class SolverSnapshot:
    """What a solverstate file holds, format-independent."""

    iter: int
    current_step: int = 0
    learned_net: str | None = None
    history: list[np.ndarray] = field(default_factory=list)
    #: JSON of the numpy Generator's ``bit_generator.state``; None in Caffe's own files.
    rng_state: bytes | None = None
    #: (layer name, opaque state) per resumable layer; test nets' names carry a prefix.
    layer_states: list[tuple[str, bytes]] = field(default_factory=list)
    #: the solver type that wrote the history; None in Caffe's own files.
    solver_type: str | None = None


def snapshot_filename(prefix: str, iteration: int, extension: str) -> str:
    """Caffe's ``<prefix>_iter_<it><extension>`` (no zero padding)."""
    return f"{prefix}_iter_{iteration}{extension}"


def clean_leftovers(prefix: str) -> Path | None:
    """Remove what a run killed while snapshotting left under ``prefix``, and return the
    latest complete snapshot's solverstate (None when there is none).

    A kill -9 can leave the hidden temporary files of ``netforge.atomic``
    (``.<prefix>_iter_<n>.<suffix>.XXXXXXXX.tmp``) and a caffemodel whose solverstate was
    never written; both are removed, the latter only when it is newer than the latest
    complete pair (an older lone caffemodel was left so on purpose). Another run writing
    snapshots with the same prefix at the same moment would lose its temporary file: runs
    sharing a prefix overwrite each other's snapshots anyway.
    """
    # os.path.split, not Path: a prefix "snaps/" names "snaps/_iter_<n>...", and Path drops
    # the trailing separator (its name would be "snaps", in the folder above).
    head, stem = os.path.split(prefix)
    folder = Path(head or ".")
    if not os.path.isdir(folder):
        return None
    pattern = re.compile(re.escape(stem) + r"_iter_(\d+)(\.caffemodel|\.solverstate)(\.h5)?")
    temporary = re.compile(r"\." + pattern.pattern + r"\.\w+\.tmp")
    removed: list[Path] = []
    models: dict[tuple[int, str], Path] = {}
    states: dict[tuple[int, str], Path] = {}
    for path in folder.iterdir():
        if temporary.fullmatch(path.name):
            removed.append(path)
        elif found := pattern.fullmatch(path.name):
            key = (int(found.group(1)), found.group(3) or "")
            (models if found.group(2) == ".caffemodel" else states)[key] = path
    latest = max(states, default=None)
    removed += [
        path for key, path in models.items() if key not in states and key > (latest or (-1, ""))
    ]
    for path in removed:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    if removed:
        resume = f"--snapshot {states[latest]}" if latest else "no complete snapshot is left"
        log.warning(
            "removed what an interrupted run left while snapshotting: %s; to resume it, "
            "use the latest complete snapshot: %s",
            ", ".join(str(p) for p in sorted(removed)),
            resume,
        )
    return states[latest] if latest else None


def write_state(path: str | os.PathLike, state: SolverSnapshot) -> None:
    """Write ``state`` in the format its suffix names (``.h5``: HDF5, else binary proto)."""
    if os.fspath(path).endswith(".h5"):
        _write_hdf5(path, state)
    else:
        write_binary(_to_proto(state), path)


def read_state(path: str | os.PathLike) -> SolverSnapshot:
    """Read a solverstate written by Caffe or netforge, choosing the reader by suffix as
    Caffe's Solver::Restore does (``.h5`` → HDF5)."""
    text = os.fspath(path)
    if text.endswith(MODEL_SUFFIXES):
        raise ConfigError(
            f"{text}: this is a caffemodel (trained weights), not a solver state; resume from "
            "the .solverstate written beside it, or fine-tune from these weights with --weights"
        )
    # os.path, not pathlib: a name too long for the file system is False, not an OSError
    if not os.path.isfile(text):
        raise DataError(f"{text}: no such solver state file")
    if text.endswith(".h5"):
        state = _read_hdf5(text)
    else:
        state = _from_proto(read_binary(text, pb.SolverState), text)
    _check(state, text)
    return state


def _check(state: SolverSnapshot, path: str) -> None:
    """Every field's range: what a damaged or hand-edited file holds is refused here, by
    name, rather than met later as a complex learning rate or an unopenable path."""
    if state.iter < 0 or state.current_step < 0:
        raise DataError(
            f"{path}: iter {state.iter} and current_step {state.current_step} must be >= 0 "
            "(the file is corrupt)"
        )
    net = state.learned_net
    if net is not None and ("\0" in net or len(net.encode()) > _MAX_PATH):
        raise DataError(f"{path}: its learned_net is not a usable path (the file is corrupt)")
    if state.rng_state is not None:
        try:
            np.random.default_rng().bit_generator.state = json.loads(state.rng_state)
        except Exception as exc:  # any malformed JSON or generator state: numpy raises many types
            raise DataError(
                f"{path}: its random generator state is corrupt ({type(exc).__name__}: {exc})"
            ) from None
    for index, values in enumerate(state.history):
        if values.dtype.kind not in "fiu":
            raise DataError(f"{path}: history blob {index} holds {values.dtype}, not numbers")
    for name, _ in state.layer_states:
        if name.startswith(TEST_PREFIX) and not TEST_NAME.fullmatch(name):
            raise DataError(f"{path}: layer state name {name!r} is corrupt")


#: The longest path Linux opens (PATH_MAX).
_MAX_PATH = 4096
#: Test nets' layer states are named ``#test<i>:<layer>``.
TEST_PREFIX = "#test"
TEST_NAME = re.compile(r"#test(\d{1,6}):(.*)", re.DOTALL)


def _to_proto(state: SolverSnapshot) -> pb.SolverState:
    message = pb.SolverState(iter=state.iter, current_step=state.current_step)
    if state.learned_net is not None:
        message.learned_net = state.learned_net
    message.history.extend(array_to_proto(h) for h in state.history)
    if state.rng_state is not None:
        message.rng_state = state.rng_state
    message.layer_state.extend(pb.LayerState(layer=n, state=s) for n, s in state.layer_states)
    if state.solver_type is not None:
        message.solver_type = state.solver_type
    return message


def _from_proto(message: pb.SolverState, path: str) -> SolverSnapshot:
    # read_binary has refused string fields that are not UTF-8 (prototxt.parse_binary).
    return SolverSnapshot(
        iter=message.iter,
        current_step=message.current_step,
        learned_net=message.learned_net if message.HasField("learned_net") else None,
        history=[
            stored_blob(blob, f"{path}: history blob {i}").data
            for i, blob in enumerate(message.history)
        ],
        rng_state=message.rng_state if message.HasField("rng_state") else None,
        layer_states=[(entry.layer, entry.state) for entry in message.layer_state],
        solver_type=message.solver_type if message.HasField("solver_type") else None,
    )


def _write_hdf5(path: str | os.PathLike, state: SolverSnapshot) -> None:
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        # Caffe's hdf5_save_int writes a one-element int32 dataset; its string helper a
        # fixed-length string, which an np.bytes_ scalar gives.
        handle.create_dataset("iter", data=np.array([state.iter], dtype=np.int32))
        if state.learned_net is not None:
            handle.create_dataset("learned_net", data=np.bytes_(state.learned_net.encode()))
        handle.create_dataset("current_step", data=np.array([state.current_step], np.int32))
        history = handle.create_group("history")
        for index, values in enumerate(state.history):
            history.create_dataset(str(index), data=values)
        if state.rng_state is not None:
            handle.create_dataset("rng_state", data=np.bytes_(state.rng_state))
        if state.solver_type is not None:
            handle.create_dataset("solver_type", data=np.bytes_(state.solver_type.encode()))
        if state.layer_states:
            group = handle.create_group("layer_state")
            names = [name.encode() for name, _ in state.layer_states]
            group.create_dataset(
                "names", data=np.array(names, dtype=object), dtype=h5py.string_dtype("utf-8")
            )
            for index, (_, blob) in enumerate(state.layer_states):
                group.create_dataset(str(index), data=np.frombuffer(blob, dtype=np.uint8))


def _read_hdf5(path: str) -> SolverSnapshot:
    import h5py

    damage = hdf5_damage(
        f"{path}: cannot read the HDF5 solver state", "; the file is damaged or not a solver state"
    )
    with damage, h5py.File(path, "r") as handle:
        return _hdf5_state(handle, path)


def _hdf5_state(handle: Any, path: str) -> SolverSnapshot:
    refuse_links(handle, path)
    if "iter" not in handle or "history" not in handle:
        raise DataError(f"{path}: not a solver state (no 'iter' or 'history' in it)")
    history_group = handle["history"]
    # Caffe names the history datasets 0..n-1; read them in numeric order.
    keys = sorted(history_group, key=int)
    state = SolverSnapshot(
        iter=int(np.asarray(handle["iter"][()]).ravel()[0]),
        current_step=int(np.asarray(handle["current_step"][()]).ravel()[0])
        if "current_step" in handle
        else 0,
        learned_net=_string(handle["learned_net"][()]) if "learned_net" in handle else None,
        history=[read_dataset(history_group[key], f"{path}: history {key}") for key in keys],
        rng_state=bytes(handle["rng_state"][()]) if "rng_state" in handle else None,
        solver_type=(
            bytes(handle["solver_type"][()]).decode() if "solver_type" in handle else None
        ),
    )
    if "layer_state" in handle:
        group = handle["layer_state"]
        names = [_string(name) for name in group["names"][()]]
        state.layer_states = [(name, group[str(i)][()].tobytes()) for i, name in enumerate(names)]
    return state


def _string(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
