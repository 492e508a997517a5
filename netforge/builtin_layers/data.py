"""Data layers: Data (LMDB), ImageData, HDF5Data, MemoryData, WindowData, HDF5Output.

The file-reading layers build their batches ahead of the net in a background thread
(``netforge.data.pipeline``), ``prefetch`` batches deep as Caffe's prefetching layers, and
keep Caffe's batch order: key order for LMDB, list order for ImageData (shuffled per epoch
with ``shuffle``), rows in order across the listed files for HDF5Data. Every batch depends
only on the layer's random generator (derived from the net's ``rng`` at setup) and its
position, and ``get_state()``/``set_state()`` save and restore both as JSON bytes, so a
resumed run reads exactly the batches an uninterrupted one would.

``wait_seconds`` on each data layer is the time its ``forward`` spent waiting for data.

Labels: a (N,) top of float labels, as Caffe; records with netforge's ``targets``
(multi-label or regression) give a (N, T) top instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from netforge.blob import Blob
from netforge.data.hdf5 import HDF5Source
from netforge.data.pipeline import Prefetcher
from netforge.data.sources import DatumSource, ImageListSource
from netforge.data.transform import Transformer
from netforge.data.window import WindowSource
from netforge.errors import DataError
from netforge.layer import Layer, register
from netforge.parallel.world import world
from netforge.proto import pb


class BatchLoader:
    """Copies host batches into a data layer's tops, in place (other blobs may view them).

    On the CPU this is one ``copyto``. On a GPU the batch is the only transfer of an
    iteration (issue 7), so it is made cheap and asynchronous: host → a pinned buffer → a
    device staging buffer on a non-blocking copy stream, then, once the compute stream has
    waited on an event recorded after that copy, staging → top on the compute stream. The
    host never waits for the bus, and the transfer overlaps whatever compute is still queued
    (which may be reading the top, hence the staging buffer rather than the top itself).
    """

    def __init__(self) -> None:
        self._stream: Any = None
        #: per top index: [pinned host buffer, device staging buffer, event after the last
        #: staging → top copy (None before the first)].
        self._slots: dict[int, list[Any]] = {}

    def load(self, index: int, blob: Blob, array: np.ndarray) -> None:
        """Copy ``array`` (cast to the blob's dtype) into top ``index``'s ``blob``."""
        if not blob.backend.is_gpu:
            np.copyto(blob.data, array, casting="unsafe")
            return
        import cupyx  # only reached on a GPU backend: nothing touches cupy at import time

        cp = blob.xp
        with cp.cuda.Device(blob.backend.device_id):
            slot = self._slots.get(index)
            if slot is not None and slot[2] is not None:
                # Both buffers are free again once the previous batch reached the top (that
                # copy itself waited for the transfer out of the pinned buffer).
                slot[2].synchronize()
            if slot is None or slot[0].shape != blob.shape or slot[0].dtype != blob.dtype:
                slot = [
                    cupyx.empty_pinned(blob.shape, blob.dtype),
                    cp.empty(blob.shape, blob.dtype),
                    None,
                ]
                self._slots[index] = slot
            pinned, staging, _ = slot
            np.copyto(pinned, array, casting="unsafe")
            if self._stream is None:
                self._stream = cp.cuda.Stream(non_blocking=True)
            staging.set(pinned, stream=self._stream)
            compute = cp.cuda.get_current_stream()
            compute.wait_event(self._stream.record())
            blob.data[...] = staging
            slot[2] = compute.record()


class PrefetchingDataLayer(Layer):
    """A data layer fed by a Source through a Prefetcher (Caffe's BasePrefetchingDataLayer)."""

    bottoms = (0, 0)
    tops = (1, 2)
    #: how many batches the producer may run ahead.
    prefetch = 4
    #: In TRAIN, the source keeps only this rank's share of the records when several solvers
    #: train together (Caffe's Data and HDF5Data skip rule; netforge applies it to image
    #: lists too), or, sampling at random (WindowData), samples its own. TEST nets run on
    #: rank 0 alone and read everything, as in Caffe.
    sharded = False

    def make_source(self, top: Sequence[Blob]) -> Any:
        raise NotImplementedError

    def transformer(self) -> Transformer:
        return Transformer(
            self.layer_param.transform_param, self.phase, f"layer {self.name!r} ({self.type})"
        )

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        self.source = self.make_source(top)
        if self.sharded and self.phase == pb.TRAIN:
            self.source.shard = tuple(world())
        self.top_shapes = self.source.shapes()[: len(top)]
        self.prefetcher = Prefetcher(self.source, self.prefetch, self.name)
        self.loader = BatchLoader()
        for blob, shape in zip(top, self.top_shapes):
            blob.reshape(shape)

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Top shapes are fixed at setup, from the first record."""
        for blob, shape in zip(top, self.top_shapes):
            blob.reshape(shape)

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        batch = self.prefetcher.next()
        for index, (blob, array) in enumerate(zip(top, batch)):
            if tuple(array.shape) != blob.shape:
                raise DataError(
                    f"layer {self.name!r} ({self.type}), {self.source.where}: a batch has shape "
                    f"{tuple(array.shape)} but the first record gave {blob.shape}; every "
                    "record must have the same shape (or use crop_size)"
                )
            self.loader.load(index, blob, array)

    @property
    def wait_seconds(self) -> float:
        """Seconds ``forward`` has spent blocked waiting for the producer."""
        return self.prefetcher.wait_seconds

    def get_state(self) -> bytes:
        return json.dumps(self.prefetcher.state()).encode()

    def set_state(self, state: bytes) -> None:
        self.prefetcher.restore(json.loads(state))

    def close(self) -> None:
        """Stop the background producer."""
        self.prefetcher.close()


@register("Data")
class DataLayer(PrefetchingDataLayer):
    """Datum records from a database, in key order, wrapping at the end (Caffe's Data).

    ``backend`` LMDB, or LEVELDB (Caffe's default) when the optional plyvel is installed;
    ``batch_size``, ``prefetch`` and ``transform_param`` apply;
    the legacy scale/mean/crop/mirror fields of DataParameter are ignored, as by Caffe.
    """

    sharded = True

    def make_source(self, top: Sequence[Blob]) -> DatumSource:
        p = self.layer_param.data_param
        if not p.batch_size:
            raise self.config_error("data_param.batch_size must be > 0")
        self.prefetch = p.prefetch
        return DatumSource(
            p.source, p.backend, p.batch_size, self.transformer(), self.rng, self.dtype
        )


@register("ImageData")
class ImageDataLayer(PrefetchingDataLayer):
    """Images named in a list file (see ``netforge.data.listfile``), as Caffe's ImageData.

    ``root_folder`` is prefixed to each path; ``new_height``/``new_width`` resize (both or
    neither); ``is_color`` false reads gray; ``shuffle`` permutes the list at the start and
    each epoch; ``rand_skip`` skips a random number of entries at the start.
    """

    sharded = True

    def make_source(self, top: Sequence[Blob]) -> ImageListSource:
        p = self.layer_param.image_data_param
        if (p.new_height > 0) != (p.new_width > 0):
            raise self.config_error("new_height and new_width must be set together")
        prefetch = self.layer_param.data_param.prefetch
        self.prefetch = prefetch
        return ImageListSource(
            p.source,
            p.root_folder,
            p.batch_size,
            self.transformer(),
            self.rng,
            self.dtype,
            shuffle=p.shuffle,
            rand_skip=p.rand_skip,
            color=p.is_color,
            size=(p.new_height, p.new_width),
        )


@register("HDF5Data")
class HDF5DataLayer(PrefetchingDataLayer):
    """Rows of the datasets named after the tops, from a list of HDF5 files (Caffe's HDF5Data).

    Top shapes are (batch_size, dataset dims 1...). No transform_param (Caffe refuses it
    too). Files larger than ``netforge.data.hdf5.MEMORY_LIMIT`` are read in slices.
    """

    tops = (1, None)
    prefetch = 2

    sharded = True

    def make_source(self, top: Sequence[Blob]) -> HDF5Source:
        if self.layer_param.HasField("transform_param"):
            raise self.config_error("HDF5Data does not transform data; remove transform_param")
        p = self.layer_param.hdf5_data_param
        if not p.batch_size:
            raise self.config_error("hdf5_data_param.batch_size must be > 0")
        names = list(self.layer_param.top) or [blob.name for blob in top]
        return HDF5Source(p.source, names, p.batch_size, p.shuffle, self.rng, self.dtype)


@register("WindowData")
class WindowDataLayer(PrefetchingDataLayer):
    """R-CNN fine-tuning windows (Caffe's WindowData; see ``netforge.data.window``).

    crop_size, mirror and the mean come from transform_param, scale from window_data_param.
    """

    sharded = True

    def make_source(self, top: Sequence[Blob]) -> WindowSource:
        return WindowSource(
            self.layer_param, self.phase, self.rng, self.dtype, f"layer {self.name!r} (WindowData)"
        )


@register("MemoryData")
class MemoryDataLayer(Layer):
    """Arrays handed over from Python (pycaffe's ``net.set_input_arrays``), served in slices.

    ``reset(data, labels)`` takes (n, channels, height, width) data and n labels, n a
    multiple of ``batch_size``; each forward serves the next ``batch_size`` rows, cycling.
    As Caffe, these arrays are not transformed.
    """

    bottoms = (0, 0)
    tops = (2, 2)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        p = self.layer_param.memory_data_param
        self.batch_size = p.batch_size
        self.shape = (p.channels, p.height, p.width)
        if not self.batch_size or not all(self.shape):
            raise self.config_error("batch_size, channels, height and width must all be > 0")
        self.data: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.pos = 0
        self.wait_seconds = 0.0
        self.loader = BatchLoader()

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        top[0].reshape((self.batch_size, *self.shape))
        top[1].reshape((self.batch_size,))

    def reset(self, data: Any, labels: Any) -> None:
        """Serve ``data`` and ``labels`` from their first row on (Caffe's Reset)."""
        data = np.asarray(data)
        labels = np.asarray(labels).reshape(-1)
        if data.ndim != 4 or data.shape[1:] != self.shape:
            raise self.shape_error(
                f"data must be (n, {', '.join(map(str, self.shape))}), got {data.shape}"
            )
        if len(labels) != len(data):
            raise self.shape_error(f"{len(data)} data rows but {len(labels)} labels")
        if len(data) == 0 or len(data) % self.batch_size:
            raise self.shape_error(
                f"the number of rows ({len(data)}) must be a multiple of batch_size "
                f"({self.batch_size})"
            )
        self.data, self.labels, self.pos = data, labels, 0

    set_input_arrays = reset

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if self.data is None:
            raise DataError(
                f"layer {self.name!r} (MemoryData) has no data: call set_input_arrays first"
            )
        rows = slice(self.pos, self.pos + self.batch_size)
        self.loader.load(0, top[0], self.data[rows])
        self.loader.load(1, top[1], self.labels[rows])
        self.pos = (self.pos + self.batch_size) % len(self.data)

    def get_state(self) -> bytes:
        return json.dumps({"pos": self.pos}).encode()

    def set_state(self, state: bytes) -> None:
        self.pos = int(json.loads(state)["pos"])


@register("HDF5Output")
class HDF5OutputLayer(Layer):
    """Writes its bottoms to ``file_name`` as datasets ``data`` and ``label``.

    The file is truncated at setup, as Caffe. Caffe recreates the datasets at each
    forward, so a second batch fails (BVLC/caffe#1726); here every forward appends its
    rows, so the file holds all batches seen.
    """

    bottoms = (2, 2)
    tops = (0, 0)

    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        path = self.layer_param.hdf5_output_param.file_name
        if not path:
            raise self.config_error("hdf5_output_param.file_name is required")
        try:
            self.file = h5py.File(path, "w")
        except OSError as exc:
            raise DataError(
                f"layer {self.name!r} (HDF5Output): cannot create {path}: {exc}"
            ) from None

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        if bottom[0].shape[:1] != bottom[1].shape[:1]:
            raise self.shape_error("data and label must have the same number of rows")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        from netforge.backend import to_numpy

        for name, blob in zip(("data", "label"), bottom):
            array = to_numpy(blob.data)
            if name not in self.file:
                self.file.create_dataset(
                    name, data=array, maxshape=(None, *array.shape[1:]), chunks=True
                )
                continue
            dataset = self.file[name]
            if dataset.shape[1:] != array.shape[1:]:
                raise self.shape_error(f"{name} changed shape to {array.shape}")
            start = dataset.shape[0]
            dataset.resize(start + len(array), axis=0)
            dataset[start:] = array
        self.file.flush()

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        """Nothing flows back through an output layer (as Caffe)."""
