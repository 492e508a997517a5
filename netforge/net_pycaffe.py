"""The parts of ``Net`` that only pycaffe has (its ``pycaffe.py`` and ``_caffe.cpp``):
batched forward and backward over whole arrays, the name dictionaries, weight sharing
between nets and HDF5 loading. ``Net`` inherits them; they use only its public state.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator
from itertools import zip_longest
from typing import TYPE_CHECKING, Any

import numpy as np

from netforge.backend import Backend, default_backend, mode_version, to_numpy
from netforge.errors import ConfigError, DataError, ShapeError

if TYPE_CHECKING:
    from netforge.net import Net


class PycaffeNetMethods:
    """pycaffe's additions to ``caffe.Net`` (mixed into ``netforge.Net``)."""

    @property
    def top_names(self: Net) -> OrderedDict[str, list[str]]:
        """Layer name -> the names of its top blobs, in layer order (pycaffe's
        ``net.top_names``; a repeated layer name keeps its last layer's tops, as there)."""
        return OrderedDict(zip(self.layer_names, (list(t) for t in self.layer_tops)))

    @property
    def bottom_names(self: Net) -> OrderedDict[str, list[str]]:
        """Layer name -> the names of its bottom blobs, in layer order."""
        return OrderedDict(zip(self.layer_names, (list(b) for b in self.layer_bottoms)))

    @property
    def blob_loss_weights(self: Net) -> OrderedDict[str, float]:
        """Blob name -> its weight in the loss (0 for blobs that are not loss tops)."""
        return OrderedDict((name, self.loss_weights.get(name, 0.0)) for name in self.blobs)

    # pycaffe's own code reads the net through these index-based names of ``_caffe.cpp``;
    # scripts that copied it do too. Blob indices are positions in ``net.blobs``.
    @property
    def _blobs(self: Net) -> list:
        """The blobs in index order (pycaffe's ``net._blobs``)."""
        return list(self.blobs.values())

    def _blob_indices(self: Net, names: list[str]) -> list[int]:
        index = {name: i for i, name in enumerate(self.blobs)}
        return [index[name] for name in names]

    @property
    def _inputs(self: Net) -> list[int]:
        """Indices of the input blobs (Caffe's ``input_blob_indices``)."""
        return self._blob_indices(self.inputs)

    @property
    def _outputs(self: Net) -> list[int]:
        """Indices of the output blobs (Caffe's ``output_blob_indices``)."""
        return self._blob_indices(self.outputs)

    def _top_ids(self: Net, i: int) -> list[int]:
        """Blob indices of layer ``i``'s tops (Caffe's ``top_ids``)."""
        return self._blob_indices(self.layer_tops[i])

    def _bottom_ids(self: Net, i: int) -> list[int]:
        """Blob indices of layer ``i``'s bottoms (Caffe's ``bottom_ids``)."""
        return self._blob_indices(self.layer_bottoms[i])

    @property
    def _blob_loss_weights(self: Net) -> list[float]:
        """Each blob's loss weight, in index order."""
        return list(self.blob_loss_weights.values())

    def _forward(self: Net, start: int, end: int) -> float:
        """Run layers ``start..end`` by index (Caffe's ``ForwardFromTo``); the loss."""
        return self.forward_from_to(start, end)

    def _backward(self: Net, start: int, end: int) -> None:
        """Backpropagate from layer ``start`` down to ``end`` by index (``BackwardFromTo``)."""
        self.backward_from_to(start, end)

    def follow_mode(self: Net) -> None:
        """Caffe's mode semantics for a net built without an explicit backend: after
        set_mode_gpu (or set_mode_cpu, set_device), its next pass first moves every array
        of the net to the new device, once, as Caffe's SyncedMemory moves on first use."""
        version = mode_version()
        if version == self._mode_seen:
            return
        target = default_backend()  # raises a DeviceError in GPU mode without a GPU
        self._mode_seen = version
        self.to(target)

    def to(self: Net, backend: Backend, moved: dict[int, tuple[Any, Any]] | None = None) -> None:
        """Move every blob, parameter and layer state of the net to ``backend``. Arrays
        that share memory inside the net (shared parameters, in-place tops) still share it
        afterwards; nets moved with the same ``moved`` memo share it with each other too."""
        if backend == self.backend:
            return
        self.backend = backend  # first: a net reached again from a layer's attributes is done
        moved = {} if moved is None else moved
        for blob in self.blobs.values():
            blob.to(backend, moved)
        for layer in self.layers:
            layer.to(backend, moved)
        for blob in self.learnable_params:
            blob.to(backend, moved)

    def clear_param_diffs(self: Net) -> None:
        """Zero every learnable parameter's diff (Caffe's ``Net::ClearParamDiffs``)."""
        for blob in self.learnable_params:
            blob.diff.fill(0)
        self.zero_stale_param_diffs()
        self.reset_param_diff_bounds(0.0)

    def share_with(self: Net, other: Net) -> None:
        """Make this net's layers use the parameter data of ``other``'s layers of the same
        name (Caffe's ``ShareTrainedLayersWith``): layers ``other`` has and this net lacks
        are ignored; a blob count or shape mismatch is a ShapeError."""
        for source in other.layers:
            target = self.layer_dict.get(source.name)
            if target is None:
                continue
            if len(target.blobs) != len(source.blobs):
                raise ShapeError(
                    f"layer {source.name!r}: {len(source.blobs)} parameter blob(s) in the "
                    f"source net, {len(target.blobs)} in this one; they cannot be shared"
                )
            for j, (mine, theirs) in enumerate(zip(target.blobs, source.blobs)):
                if mine.shape != theirs.shape:
                    raise ShapeError(
                        f"cannot share param {j} weights from layer {source.name!r}; shape "
                        f"mismatch: source param shape is {theirs.shape}, target param shape "
                        f"is {mine.shape}"
                    )
                mine.share_data(theirs)

    def load_hdf5(self: Net, path: str | os.PathLike) -> None:
        """Copy trained parameters from a ``.caffemodel.h5`` (Caffe's
        ``CopyTrainedLayersFromHDF5``)."""
        from netforge.weights import is_hdf5

        if not os.path.isfile(path):
            raise DataError(f"{path}: no such weights file")
        if not is_hdf5(path):
            raise DataError(f"{path}: not an HDF5 file; load binary weights with copy_from")
        self.copy_from(path)

    def _batch(self: Net, blobs: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Cut same-length arrays into batches of the net's batch size (the first axis of
        its first blob); the last batch is padded with zeros (pycaffe's ``Net._batch``)."""
        num = len(next(iter(blobs.values())))
        batch_size = next(iter(self.blobs.values())).shape[0]
        remainder = num % batch_size
        for start in range(0, num - remainder, batch_size):
            yield {name: value[start : start + batch_size] for name, value in blobs.items()}
        if remainder:
            padded = {}
            for name, value in blobs.items():
                value = np.asarray(value)
                padding = np.zeros((batch_size - remainder, *value.shape[1:]), value.dtype)
                padded[name] = np.concatenate([value[-remainder:], padding])
            yield padded

    def _inputs_of(self: Net, kwargs: dict[str, Any], names: list[str]) -> dict:
        unknown = sorted(set(kwargs) - set(self.inputs) - set(self.outputs))
        if unknown:
            raise ConfigError(
                f"net {self.name!r}: {', '.join(unknown)} are neither inputs ({self.inputs}) "
                f"nor outputs ({self.outputs}) of the net"
            )
        return {name: kwargs[name] for name in names if name in kwargs}

    def forward_all(self: Net, blobs: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        """Run the net over whole input arrays in batches (pycaffe's ``forward_all``):
        returns every output (and ``blobs``) as one numpy array, the padding of the last
        batch removed."""
        outputs = list(dict.fromkeys([*self.outputs, *(blobs or [])]))
        inputs = self._inputs_of(kwargs, self.inputs)
        if not inputs:
            out = self.forward(blobs=blobs)
            return {name: to_numpy(out[name]).copy() for name in outputs}
        collected: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        for batch in self._batch(inputs):
            out = self.forward(blobs=blobs, **batch)
            for name in outputs:
                collected[name].append(to_numpy(out[name]).copy())
        return _joined(collected, len(next(iter(inputs.values()))))

    def forward_backward_all(
        self: Net, blobs: list[str] | None = None, diffs: list[str] | None = None, **kwargs: Any
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Forward and backward in batches (pycaffe's ``forward_backward_all``): ``kwargs``
        hold input arrays and output diffs; returns (outputs and ``blobs``, input diffs and
        ``diffs``), each as whole numpy arrays."""
        outputs = list(dict.fromkeys([*self.outputs, *(blobs or [])]))
        gradients = list(dict.fromkeys([*self.inputs, *(diffs or [])]))
        forward_in = self._inputs_of(kwargs, self.inputs)
        backward_in = self._inputs_of(kwargs, self.outputs)
        all_outs: dict[str, list[np.ndarray]] = {name: [] for name in outputs}
        all_diffs: dict[str, list[np.ndarray]] = {name: [] for name in gradients}
        forward_batches = self._batch(forward_in) if forward_in else iter(())
        backward_batches = self._batch(backward_in) if backward_in else iter(())
        for fb, bb in zip_longest(forward_batches, backward_batches, fillvalue={}):
            out = self.forward(blobs=blobs, **fb)
            grads = self.backward(diffs=diffs, **bb)
            for name in outputs:
                all_outs[name].append(to_numpy(out[name]).copy())
            for name in gradients:
                all_diffs[name].append(to_numpy(grads[name]).copy())
        given = next(iter(kwargs.values()), None)
        total = len(given) if given is not None else None
        return _joined(all_outs, total), _joined(all_diffs, total)


def _joined(batches: dict[str, list[np.ndarray]], total: int | None) -> dict[str, np.ndarray]:
    """Concatenate each name's batches and cut the padding back to ``total`` items."""
    joined = {}
    for name, parts in batches.items():
        array = np.concatenate([np.atleast_1d(p) for p in parts]) if parts else np.empty(0)
        joined[name] = array[:total] if total is not None else array
    return joined
