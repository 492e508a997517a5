"""Array backends: numpy on the CPU, cupy on a GPU.

Every layer computes with the array module of its blobs (``xp``), so one code path serves
both (Chainer's ``get_array_module``). cupy is imported only when a GPU is asked for.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from netforge.errors import ConfigError, DeviceError


@dataclass(frozen=True)
class Backend:
    """Where a net's arrays live: ``xp`` is numpy or cupy; ``device_id`` is -1 on the CPU."""

    xp: ModuleType
    device_id: int = -1

    @property
    def is_gpu(self) -> bool:
        return self.device_id >= 0

    def asarray(self, array: Any, dtype: Any = None) -> Any:
        """Move ``array`` onto this backend (a no-op when it is already there)."""
        if self.is_gpu:
            with self.xp.cuda.Device(self.device_id):
                return self.xp.asarray(array, dtype=dtype)
        return np.asarray(to_numpy(array), dtype=dtype)

    def __str__(self) -> str:
        return f"GPU {self.device_id}" if self.is_gpu else "CPU"


CPU = Backend(np)


def import_cupy() -> ModuleType:
    """Import cupy, or raise a DeviceError saying how to get a working one."""
    try:
        cupy = importlib.import_module("cupy")
    except ImportError as exc:
        raise DeviceError(
            "GPU mode needs cupy, which is not installed: "
            "pip install 'netforge[cuda12]' (or [cuda13] for CUDA 13)"
        ) from exc
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # cupy raises its own CUDA runtime error types
        raise DeviceError(f"cupy is installed but no usable CUDA GPU was found: {exc}") from exc
    if count == 0:
        raise DeviceError("cupy is installed but no CUDA GPU is present")
    return cupy


def gpu(device_id: int = 0) -> Backend:
    """The backend for CUDA device ``device_id``."""
    cupy = import_cupy()
    count = cupy.cuda.runtime.getDeviceCount()
    if not 0 <= device_id < count:
        raise DeviceError(f"GPU {device_id} does not exist: this machine has {count} GPU(s)")
    return Backend(cupy, device_id)


def parse_gpu_ids(gpu: str) -> list[int]:
    """The ids a ``--gpu`` value names (Caffe's -gpu): one id, a comma list, or "all" (every
    GPU this machine has, which asks cupy)."""
    if gpu == "all":
        return list(range(import_cupy().cuda.runtime.getDeviceCount()))
    try:
        return [int(part) for part in gpu.split(",")]
    except ValueError:
        raise ConfigError(f"--gpu {gpu!r}: give a GPU id, a comma list of ids, or 'all'") from None


def get_array_module(*arrays: Any) -> ModuleType:
    """numpy, or cupy if any of ``arrays`` is a cupy array."""
    for array in arrays:
        module = type(array).__module__
        if module.startswith("cupy"):
            return importlib.import_module("cupy")
    return np


def to_numpy(array: Any) -> np.ndarray:
    """A numpy view or copy of ``array`` (copies from the GPU when needed)."""
    if type(array).__module__.startswith("cupy"):
        return array.get()
    return np.asarray(array)


def move_array(array: Any, backend: Backend, moved: dict[int, tuple[Any, Any]]) -> Any:
    """``array`` on ``backend``, each memory buffer copied once: arrays that view the same
    buffer whole (shared parameters, ``Blob.share_data``) stay views of one moved copy.
    ``moved`` maps id(buffer) -> (buffer, its copy) across one move of a net."""
    if array is None:
        return None
    root = array
    while isinstance(getattr(root, "base", None), type(array)):
        root = root.base
    if id(root) not in moved:
        moved[id(root)] = (root, backend.asarray(root))
    copy = moved[id(root)][1]
    if root is array:
        return copy
    if root.size == array.size and array.flags.c_contiguous and root.flags.c_contiguous:
        return copy.reshape(array.shape)
    return backend.asarray(array)  # a partial view: it moves as an array of its own


# pycaffe-style process defaults (set_mode_cpu / set_mode_gpu / set_device). They choose the
# backend of nets and solvers created without an explicit one, and, as Caffe's global mode
# does, where such a net runs next: it moves its arrays on its next forward or backward
# after the mode changed ("version" counts the changes, so that check costs one compare).
_default_mode = {"gpu": False, "device_id": 0, "version": 0}


def set_mode_cpu() -> None:
    """Run nets and solvers that follow the process mode on the CPU (pycaffe's
    ``caffe.set_mode_cpu``): new ones, and existing ones from their next pass."""
    _default_mode["gpu"] = False
    _default_mode["version"] += 1


def set_mode_gpu() -> None:
    """Run nets and solvers that follow the process mode on the GPU chosen by
    ``set_device``: new ones, and existing ones from their next pass (their arrays move
    then, once). Without a usable GPU, that pass raises a DeviceError."""
    _default_mode["gpu"] = True
    _default_mode["version"] += 1
    _make_device_current()


def set_device(device_id: int) -> None:
    """Choose the GPU used in GPU mode (pycaffe's ``caffe.set_device``); in GPU mode it
    becomes the process's current CUDA device, as Caffe's ``cudaSetDevice``."""
    _default_mode["device_id"] = int(device_id)
    _default_mode["version"] += 1
    _make_device_current()


def _make_device_current() -> None:
    """In GPU mode, make the chosen device current: nets allocate their arrays on the
    current device, so a process training on GPU 1 (a rank of BVLC's python/train.py)
    must not leave them on GPU 0. Without a usable GPU nothing happens here: the next GPU
    pass raises the DeviceError that says why."""
    if not _default_mode["gpu"]:
        return
    with contextlib.suppress(DeviceError):
        cupy = import_cupy()
        if 0 <= _default_mode["device_id"] < cupy.cuda.runtime.getDeviceCount():
            cupy.cuda.Device(_default_mode["device_id"]).use()


def mode_version() -> int:
    """A number that changes whenever set_mode_cpu, set_mode_gpu or set_device is called."""
    return _default_mode["version"]


def default_backend() -> Backend:
    """The backend chosen by the pycaffe-style setters (CPU unless set_mode_gpu was called)."""
    return gpu(_default_mode["device_id"]) if _default_mode["gpu"] else CPU
