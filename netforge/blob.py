"""Blob: an N-d array of data and its gradient (diff), as Caffe's Blob.

Shapes are set by ``reshape`` during shape inference; memory is allocated on first access
of ``data``/``diff``, so a whole net can infer its shapes before anything is allocated, and
a reshape to a size that still fits reuses the buffer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from netforge.backend import CPU, Backend, move_array
from netforge.errors import ShapeError
from netforge.memory import check_bytes

MAX_BLOB_AXES = 32


class Blob:
    """Data and diff arrays of one shape on one backend, allocated lazily."""

    def __init__(
        self,
        shape: Sequence[int] = (),
        dtype: Any = np.float32,
        backend: Backend = CPU,
        name: str = "",
    ) -> None:
        self.name = name
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self._shape: tuple[int, ...] = ()
        self._data: Any = None
        self._diff: Any = None
        self.reshape(shape)

    # -- shape ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def count(self) -> int:
        return math.prod(self._shape)

    @property
    def num_axes(self) -> int:
        return len(self._shape)

    @property
    def xp(self) -> Any:
        return self.backend.xp

    def reshape(self, *shape: Any) -> None:
        """Set the shape; ``reshape(2, 3)`` and ``reshape((2, 3))`` both work (pycaffe)."""
        if len(shape) == 1 and not isinstance(shape[0], (int, np.integer)):
            shape = tuple(shape[0])
        shape = tuple(int(d) for d in shape)
        if len(shape) > MAX_BLOB_AXES:
            raise ShapeError(f"blob {self.name!r}: {len(shape)} axes, at most {MAX_BLOB_AXES}")
        if any(d < 0 for d in shape):
            raise ShapeError(f"blob {self.name!r}: negative dimension in shape {shape}")
        if shape == self._shape:
            return
        # Checked here, before anything is allocated, so an absurd shape is one clear error.
        nbytes = math.prod(shape) * self.dtype.itemsize
        check_bytes(nbytes, f"blob {self.name!r} {shape}", self.backend.device_id)
        self._shape = shape
        self._data = self._fit(self._data)
        self._diff = self._fit(self._diff)

    def _fit(self, array: Any) -> Any:
        """Keep ``array``'s contents viewed at the new shape when the count is unchanged."""
        if array is None or array.size != self.count:
            return None
        return array.reshape(self._shape)

    def legacy_shape(self, index: int) -> int:
        """Caffe's LegacyShape: axis ``index`` of a blob of at most 4 axes, with the missing
        axes read as 1 (the one-padding of Caffe's old 4-D blobs)."""
        if self.num_axes > 4:
            raise ShapeError(
                f"blob {self.name!r}: cannot use legacy accessors (num, channels, height, "
                f"width) on a blob with {self.num_axes} > 4 axes; use shape instead"
            )
        if not -4 <= index < 4:
            raise ShapeError(f"blob {self.name!r}: legacy axis {index} is outside [-4, 3]")
        if index >= self.num_axes or index < -self.num_axes:
            return 1
        return self._shape[index]

    @property
    def num(self) -> int:
        """Caffe's ``num()``: ``legacy_shape(0)``."""
        return self.legacy_shape(0)

    @property
    def channels(self) -> int:
        """Caffe's ``channels()``: ``legacy_shape(1)``."""
        return self.legacy_shape(1)

    @property
    def height(self) -> int:
        """Caffe's ``height()``: ``legacy_shape(2)``."""
        return self.legacy_shape(2)

    @property
    def width(self) -> int:
        """Caffe's ``width()``: ``legacy_shape(3)``."""
        return self.legacy_shape(3)

    def shape_index(self, axis: int) -> int:
        """Caffe's CanonicalAxisIndex: a negative axis counts from the end."""
        n = self.num_axes
        if not -n <= axis < max(n, 1):
            raise ShapeError(
                f"blob {self.name!r}: axis {axis} out of range for shape {self._shape}"
            )
        return axis % n if n else 0

    # -- arrays --------------------------------------------------------------------------
    def bytes_to_allocate(self, diff: bool = False) -> int:
        """Bytes the data array (the diff with ``diff``) takes when first touched; 0 once it
        exists. Arrays are allocated lazily: a net that never runs backward has no diffs."""
        array = self._diff if diff else self._data
        return 0 if array is not None else self.count * self.dtype.itemsize

    @property
    def data(self) -> Any:
        if self._data is None:
            self._data = self.xp.zeros(self._shape, dtype=self.dtype)
        return self._data

    @data.setter
    def data(self, value: Any) -> None:
        self._data = self._checked(value, "data")

    @property
    def diff(self) -> Any:
        if self._diff is None:
            self._diff = self.xp.zeros(self._shape, dtype=self.dtype)
        return self._diff

    @diff.setter
    def diff(self, value: Any) -> None:
        self._diff = self._checked(value, "diff")

    def _checked(self, value: Any, what: str) -> Any:
        if tuple(value.shape) != self._shape:
            raise ShapeError(
                f"blob {self.name!r}: cannot set {what} of shape {tuple(value.shape)} "
                f"on a blob of shape {self._shape}"
            )
        return value

    def share_data(self, other: Blob) -> None:
        """Make this blob's data a view of ``other``'s (same count; Caffe's ShareData)."""
        self._data = other.data.reshape(self._shape)

    def share_diff(self, other: Blob) -> None:
        """Make this blob's diff a view of ``other``'s (same count; Caffe's ShareDiff)."""
        self._diff = other.diff.reshape(self._shape)

    def share(self, other: Blob) -> None:
        """Share both data and diff with ``other`` (shared parameters, in-place blobs)."""
        self.share_data(other)
        self.share_diff(other)

    def to(self, backend: Backend, moved: dict[int, tuple[Any, Any]] | None = None) -> None:
        """Move the arrays to ``backend``, keeping their contents; blobs moved with the same
        ``moved`` memo keep sharing their memory (see ``backend.move_array``)."""
        if backend == self.backend:
            return
        moved = {} if moved is None else moved
        self._data = move_array(self._data, backend, moved)
        self._diff = move_array(self._diff, backend, moved)
        self.backend = backend

    def __repr__(self) -> str:
        return f"Blob({self.name!r}, shape={self._shape}, dtype={self.dtype}, {self.backend})"
