"""Net: a static graph of layers and blobs built from a NetParameter, as Caffe's Net.

Construction follows Caffe's Net::Init: NetState filtering, Split insertion, layers set up in
order with bottoms resolved against the blobs produced so far, in-place tops, loss weights,
parameter sharing by ParamSpec name, then the backward-need analysis. Shapes are inferred for
the whole net before any array is allocated (blobs allocate on first access).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from typing import Any

import numpy as np

from netforge import fusion
from netforge.atomic import atomic_write
from netforge.backend import Backend, default_backend, mode_version, to_numpy
from netforge.blob import Blob
from netforge.errors import ConfigError, DataError, ShapeError
from netforge.graph import filter_net, insert_splits
from netforge.layer import Layer, create_layer
from netforge.memory import check_bytes
from netforge.net_pycaffe import PycaffeNetMethods
from netforge.process import default_rng
from netforge.proto import pb
from netforge.weights import WeightTable, array_to_proto, read_weight_table, write_hdf5_weights

log = logging.getLogger("netforge")


@dataclass
class CopyReport:
    """What ``Net.copy_from`` did, layer by layer."""

    copied: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # net layers with params, none in the file
    unused: list[str] = field(default_factory=list)  # file layers the net does not have

    def lines(self) -> list[str]:
        def show(names: list[str]) -> str:
            return ", ".join(names) if names else "-"

        return [
            f"Copied layers: {show(self.copied)}",
            f"Re-initialised layers: {show(self.reinitialised)}",
            f"Layers missing from the weights (kept their fillers): {show(self.missing)}",
            f"Weights not used by the net: {show(self.unused)}",
        ]


def _parse_pycaffe_args(args: tuple, phase: int | None, weights: Any) -> tuple[int, Any]:
    """pycaffe accepts Net(model, phase) and Net(model, weights, phase)."""
    if len(args) == 1:
        phase = args[0]
    elif len(args) == 2:
        weights, phase = args
    elif len(args) > 2:
        raise TypeError("Net(model, [weights,] phase): too many positional arguments")
    if phase is None:
        phase = pb.TEST
    if phase not in (pb.TRAIN, pb.TEST):
        raise ConfigError(f"phase must be netforge.TRAIN or netforge.TEST, got {phase!r}")
    return phase, weights


class Net(PycaffeNetMethods):
    """A network built from a prototxt (path) or a NetParameter; pycaffe's ``caffe.Net``.

    ``Net(model, phase=TEST, weights=None, stages=(), level=0, backend=None,
    dtype=float32, rng=None, allow_python_layers=True)``; pycaffe's positional forms
    ``Net(model, phase)`` and ``Net(model, weights, phase)`` work too.
    """

    def __init__(
        self,
        model: str | os.PathLike | pb.NetParameter,
        *args: Any,
        phase: int | None = None,
        weights: str | os.PathLike | None = None,
        stages: Sequence[str] = (),
        level: int = 0,
        backend: Backend | None = None,
        dtype: Any = np.float32,
        rng: np.random.Generator | None = None,
        allow_python_layers: bool = True,
        source: str | None = None,
    ) -> None:
        phase, weights = _parse_pycaffe_args(args, phase, weights)
        #: where the net came from, for errors: its prototxt, or what the caller says
        self.source = source or (None if isinstance(model, pb.NetParameter) else os.fspath(model))
        if isinstance(model, pb.NetParameter):
            from netforge.upgrade import upgrade_net

            param = pb.NetParameter()
            param.CopyFrom(model)
            upgrade_net(param, "<NetParameter>")
        else:
            from netforge.prototxt import read_net

            param = read_net(model)
        # Caffe: the net file's own state, then the caller's phase, level and stages.
        param.state.phase = phase
        if level:
            param.state.level = level
        param.state.stage.extend(s for s in stages if s not in param.state.stage)

        self.name = param.name
        self.phase = phase
        self.backend = backend if backend is not None else default_backend()
        # Built on the process mode: follow set_mode_cpu/gpu from now on (Caffe's global mode).
        self._follows_mode = backend is None
        self._mode_seen = mode_version()
        self.dtype = np.dtype(dtype)
        self.rng = rng if rng is not None else default_rng()
        self.force_backward = param.force_backward
        self.debug_info = param.debug_info
        self._allow_python = allow_python_layers
        #: pycaffe's per-layer callbacks (``before_forward``...), called with a layer index.
        self._hooks: dict[str, list[Callable[[int], Any]]] = {
            "before_forward": [],
            "after_forward": [],
            "before_backward": [],
            "after_backward": [],
        }
        built = insert_splits(filter_net(param, param.state))
        try:
            self._build(built)
        except DataError as exc:
            # A data layer's file is missing or unreadable: say which layer of which
            # prototxt asked for it (self.layers holds the layers built before it).
            if len(self.layers) >= len(built.layer):
                raise
            raise _in_layer(exc, built.layer[len(self.layers)], self.source) from None
        if weights is not None:
            from netforge.weights import resolve_weights

            self.copy_from(resolve_weights(weights))

    # -- construction --------------------------------------------------------------------
    def _build(self, param: pb.NetParameter) -> None:
        self.layers: list[Layer] = []
        self.layer_names: list[str] = []
        self.blobs: dict[str, Blob] = {}
        self.layer_bottoms: list[list[str]] = []
        self.layer_tops: list[list[str]] = []
        self.loss_weights: dict[str, float] = {}
        self.inputs: list[str] = []
        self._layer_loss: list[list[tuple[Blob, float]]] = []
        blob_needs_backward: dict[str, bool] = {}
        self.bottom_need_backward: list[list[bool]] = []
        self.layer_need_backward: list[bool] = []
        available: dict[str, None] = {}  # produced and not yet consumed: the outputs
        # parameter sharing: name -> (owner blob, layer name, lr_mult set?, decay_mult set?)
        self.learnable_params: list[Blob] = []
        self.params_lr: list[float] = []
        self.params_weight_decay: list[float] = []
        self.learnable_param_ids: list[tuple[str, int]] = []
        #: per layer: the index into ``learnable_params`` of each of its parameter blobs
        self._param_slots: list[list[int]] = []
        #: slots whose diffs hold nothing to keep (``mark_param_diffs_stale``)
        self._stale_slots: set[int] = set()
        #: whether the gradients' memory was checked (at the first backward pass)
        self._gradients_checked = False
        owners: dict[str, tuple[int, str]] = {}
        held, counted = 0, set()  # bytes of data the blobs and parameters will take
        lr_set: list[bool] = []
        decay_set: list[bool] = []
        memory_used = 0  # elements of every top, as Caffe's memory_used_ counts them

        for layer_param in param.layer:
            if not layer_param.HasField("phase"):
                layer_param.phase = self.phase
            log.info("Creating Layer %s", layer_param.name)
            layer = create_layer(
                layer_param,
                phase=self.phase,
                backend=self.backend,
                dtype=self.dtype,
                rng=self.rng,
                allow_python=self._allow_python,
            )
            if layer_param.blobs:
                self._load_layer_blobs(layer, layer_param)
            bottom, top = [], []
            needs_backward = False
            if layer_param.propagate_down and len(layer_param.propagate_down) != len(
                layer_param.bottom
            ):
                raise ConfigError(
                    f"layer {layer.name!r}: propagate_down has {len(layer_param.propagate_down)} "
                    f"entries for {len(layer_param.bottom)} bottoms; give one per bottom or none"
                )
            bottom_backward = []
            for j, name in enumerate(layer_param.bottom):
                if name not in self.blobs:
                    raise ConfigError(
                        f"layer {layer.name!r} ({layer.type}): unknown bottom blob {name!r}: "
                        "no earlier layer produces it (check the name and the layer order)"
                    )
                available.pop(name, None)
                bottom.append(self.blobs[name])
                flag = blob_needs_backward[name]
                if layer_param.propagate_down:
                    flag = layer_param.propagate_down[j]
                bottom_backward.append(flag)
                needs_backward |= blob_needs_backward[name]
            top_names = list(layer_param.top)
            if not top_names and layer.is_loss:
                top_names = ["(automatic)"]
            for j, name in enumerate(top_names):
                if j < len(layer_param.bottom) and layer_param.bottom[j] == name:
                    blob = self.blobs[name]  # in place
                elif name in self.blobs:
                    raise ConfigError(
                        f"layer {layer.name!r}: top blob {name!r} is produced by multiple sources"
                        " (an in-place top must be the bottom at the same position)"
                    )
                else:
                    blob = Blob((), self.dtype, self.backend, name=name)
                    self.blobs[name] = blob
                available[name] = None
                top.append(blob)
            _log_connections(layer.name, layer_param.bottom, top_names)
            if layer.type == "Input":
                self.inputs.extend(top_names)
            log.info("Setting up %s", layer.name)
            layer.check_blob_counts(bottom, top)
            self._set_up(layer, bottom, top)
            held += sum(t.count for t in top if t.name not in counted) * self.dtype.itemsize
            held += sum(b.count for b in layer.blobs) * self.dtype.itemsize
            counted.update(t.name for t in top)
            check_bytes(
                held,
                f"layer {layer.name!r}: the blobs and parameters up to it",
                self.backend.device_id,
            )

            weights = list(layer_param.loss_weight)
            if not weights and layer.is_loss:
                weights = [1.0] + [0.0] * (len(top) - 1)
            if weights and len(weights) != len(top):
                raise ConfigError(
                    f"layer {layer.name!r}: {len(weights)} loss_weight values for "
                    f"{len(top)} tops; give one per top or none"
                )
            layer_loss = [(t, w) for t, w in zip(top, weights) if w != 0]
            for t, w in layer_loss:
                self.loss_weights[t.name] = w
            for j, blob in enumerate(top):
                log.info("Top shape: %s", "".join(f"{d} " for d in blob.shape) + f"({blob.count})")
                if j < len(weights) and weights[j]:
                    log.info("    with loss weight %s", _fmt(weights[j]))
                memory_used += blob.count
            log.info("Memory required for data: %d", memory_used * self.dtype.itemsize)

            specs = layer.layer_param.param  # read after setup: layers may add specs
            if len(specs) > len(layer.blobs):
                raise ConfigError(
                    f"layer {layer.name!r}: {len(specs)} param specs but the layer has "
                    f"{len(layer.blobs)} parameter blob(s)"
                )
            layer.param_propagate_down = []
            slots = []
            for i in range(len(layer.blobs)):
                spec = specs[i] if i < len(specs) else pb.ParamSpec()
                param_needs_backward = spec.lr_mult != 0
                needs_backward |= param_needs_backward
                layer.param_propagate_down.append(param_needs_backward)
                slots.append(self._append_param(layer, i, spec, owners, lr_set, decay_set))
            self._param_slots.append(slots)

            self.layers.append(layer)
            self.layer_names.append(layer.name)
            self.layer_bottoms.append(list(layer_param.bottom))
            self.layer_tops.append(top_names)
            self._layer_loss.append(layer_loss)
            self.layer_need_backward.append(needs_backward)
            self.bottom_need_backward.append(bottom_backward)
            for name in top_names:
                blob_needs_backward[name] = needs_backward
        self.outputs = sorted(available)
        self._analyse_backward(blob_needs_backward)
        for i in reversed(range(len(self.layers))):
            needs = "needs" if self.layer_need_backward[i] else "does not need"
            log.info("%s %s backward computation.", self.layer_names[i], needs)
        for name in self.outputs:
            log.info("This network produces output %s", name)
        log.info("Network initialization done.")
        # Unknown until the solver first zeroes the diffs.
        self.reset_param_diff_bounds(math.inf)
        # Caffe allows repeated layer names (mnist_autoencoder has two "loss" layers); lookups
        # by name find the first, as Caffe's CopyTrainedLayersFrom does.
        self.layer_dict = {}
        for layer in self.layers:
            self.layer_dict.setdefault(layer.name, layer)
        self.params = {ly.name: list(ly.blobs) for ly in self.layers if ly.blobs}
        #: the runs forward fuses, planned at the first forward that may fuse
        self._fusion: dict[int, fusion.FusedRun | fusion.TrainingRun] | None = None
        #: the plan's training runs that run backward, by their last layer's index
        self._fused_backward: dict[int, fusion.TrainingRun] = {}
        #: training runs whose last forward was fused, by the index of each of their layers:
        #: the Scale's kept input is still to be written should a layer of the run run alone
        self._owed: dict[int, fusion.TrainingRun] = {}
        #: per layer, what its last reshape left (``reshape_layer``), None before any
        self._reshaped: list[tuple[Any, ...] | None] = [None] * len(self.layers)

    @staticmethod
    def _out_of_memory(layer: Layer, bottom: Sequence[Blob]) -> ShapeError:
        """What the size checks before allocations did not foresee (a layer's own buffers)."""
        return ShapeError(
            f"layer {layer.name!r} ({layer.type}): out of memory (bottom shapes "
            f"{[b.shape for b in bottom]}); reduce the batch size or the layer's dimensions"
        )

    @staticmethod
    def _set_up(layer: Layer, bottom: list[Blob], top: list[Blob]) -> None:
        """The layer's setup and first reshape; a shape error names the layer."""
        try:
            layer.setup(bottom, top)
            layer.reshape(bottom, top)
        except (ShapeError, ConfigError) as exc:
            if f"layer {layer.name!r}" in str(exc):
                raise
            raise type(exc)(f"layer {layer.name!r} ({layer.type}): {exc}") from None
        except MemoryError:
            raise Net._out_of_memory(layer, bottom) from None

    def _load_layer_blobs(self, layer: Layer, layer_param: pb.LayerParameter) -> None:
        """Blobs stored in the prototxt itself become the layer's initial parameters."""
        from netforge.weights import stored_blob

        for i, proto in enumerate(layer_param.blobs):
            stored = stored_blob(proto, f"layer {layer.name!r} blob {i}")
            blob = layer.make_blob(stored.shape if not stored.legacy else stored.data.shape)
            blob.data = self.backend.asarray(stored.data.astype(self.dtype))
            layer.blobs.append(blob)
        del layer_param.blobs[:]

    def _append_param(
        self,
        layer: Layer,
        index: int,
        spec: pb.ParamSpec,
        owners: dict[str, tuple[int, str]],
        lr_set: list[bool],
        decay_set: list[bool],
    ) -> int:
        """Caffe's AppendParam: owners become learnable; sharers join their owner's blob.
        Returns the blob's index into ``learnable_params``."""
        blob = layer.blobs[index]
        if not spec.name or spec.name not in owners:
            if spec.name:
                owners[spec.name] = (len(self.learnable_params), layer.name)
            self.learnable_params.append(blob)
            self.learnable_param_ids.append((layer.name, index))
            self.params_lr.append(spec.lr_mult)
            self.params_weight_decay.append(spec.decay_mult)
            lr_set.append(spec.HasField("lr_mult"))
            decay_set.append(spec.HasField("decay_mult"))
            return len(self.learnable_params) - 1
        owner_index, owner_layer = owners[spec.name]
        owner = self.learnable_params[owner_index]
        permissive = spec.share_mode == pb.ParamSpec.PERMISSIVE
        if permissive and owner.count != blob.count:
            raise ShapeError(
                f"layer {layer.name!r} shares param {spec.name!r} with layer {owner_layer!r} but "
                f"their counts differ: {blob.count} vs {owner.count} (shapes {blob.shape} and "
                f"{owner.shape})"
            )
        if not permissive and owner.shape != blob.shape:
            raise ShapeError(
                f"layer {layer.name!r} shares param {spec.name!r} with layer {owner_layer!r} but "
                f"their shapes differ: {blob.shape} vs {owner.shape} (use share_mode: PERMISSIVE "
                "to share by count)"
            )
        if owner.shape == blob.shape:
            layer.blobs[index] = owner
        else:
            blob.share(owner)
        for what, values, was_set, wanted in (
            ("lr_mult", self.params_lr, lr_set, spec.lr_mult),
            ("decay_mult", self.params_weight_decay, decay_set, spec.decay_mult),
        ):
            if not spec.HasField(what):
                continue
            if was_set[owner_index] and values[owner_index] != wanted:
                raise ConfigError(
                    f"layer {layer.name!r} shares param {spec.name!r} with {owner_layer!r} but "
                    f"sets {what} {wanted} where the owner sets {values[owner_index]}"
                )
            values[owner_index] = wanted
            was_set[owner_index] = True
        return owner_index

    def _analyse_backward(self, blob_needs_backward: dict[str, bool]) -> None:
        """Caffe's reverse pass: layers that do not feed a loss skip backward."""
        under_loss: set[str] = set()
        skip_backprop: set[str] = set()
        for i in reversed(range(len(self.layers))):
            layer_loss_tops = {t.name for t, _ in self._layer_loss[i]}
            contributes = any(
                name in layer_loss_tops or name in under_loss for name in self.layer_tops[i]
            )
            skip = all(name in skip_backprop for name in self.layer_tops[i])
            if self.layer_need_backward[i] and skip:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_need_backward[i])
            if not contributes:
                self.layer_need_backward[i] = False
            for j, name in enumerate(self.layer_bottoms[i]):
                if contributes:
                    under_loss.add(name)
                else:
                    self.bottom_need_backward[i][j] = False
                if not self.bottom_need_backward[i][j]:
                    skip_backprop.add(name)
        if self.force_backward:
            for i, layer in enumerate(self.layers):
                self.layer_need_backward[i] = True
                self.bottom_need_backward[i] = [
                    need or layer.allow_force_backward(j)
                    for j, need in enumerate(self.bottom_need_backward[i])
                ]
                layer.param_propagate_down = [True] * len(layer.blobs)

    # -- pycaffe-style accessors ---------------------------------------------------------
    @property
    def _layer_names(self) -> list[str]:
        return self.layer_names

    @property
    def _blob_names(self) -> list[str]:
        return list(self.blobs)

    def _blobs_of(self, names: Iterable[str]) -> list[Blob]:
        return [self.blobs[n] for n in names]

    def _index(self, name: str | None, default: int) -> int:
        if name is None:
            return default
        try:
            return self.layer_names.index(name)
        except ValueError:
            raise ConfigError(f"net {self.name!r} has no layer named {name!r}") from None

    # -- running -------------------------------------------------------------------------
    def reshape(self) -> None:
        """Propagate shapes through every layer (after an input changed size): every
        layer's reshape runs."""
        self._reshaped = [None] * len(self.layers)
        for i, (bottoms, tops) in enumerate(zip(self.layer_bottoms, self.layer_tops)):
            self.reshape_layer(i, self._blobs_of(bottoms), self._blobs_of(tops))

    def reshape_layer(self, i: int, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Layer ``i``'s reshape, as Caffe runs before every forward, skipped for a layer
        with ``reshape_follows_shapes`` while its blobs' shapes and its backend are those
        its last reshape left: then it would set what it set then. A deploy net's batch-1
        forward spends much of its Python in reshapes otherwise (MobileNet v1 0.9 ms,
        ResNet-50 1.6 ms)."""
        layer = self.layers[i]
        if not layer.reshape_follows_shapes:
            layer.reshape(bottom, top)
            return
        state = self._shape_state(layer, bottom, top)
        if state != self._reshaped[i]:
            self._reshaped[i] = None  # until this reshape has succeeded
            layer.reshape(bottom, top)
            self._reshaped[i] = self._shape_state(layer, bottom, top)

    @staticmethod
    def _shape_state(layer: Layer, bottom: Sequence[Blob], top: Sequence[Blob]) -> tuple[Any, ...]:
        """What a ``reshape_follows_shapes`` layer's reshape reads (see ``reshape_layer``)."""
        return (
            layer.backend,
            *(b.shape for b in bottom),
            *(t.shape for t in top),
            *(p.shape for p in layer.blobs),
        )

    def forward_from_to(self, start: int = 0, end: int | None = None) -> float:
        """Run layers ``start..end`` (inclusive); returns their weighted loss."""
        end = len(self.layers) - 1 if end is None else end
        if self._follows_mode:
            self.follow_mode()
        loss = 0.0  # a device scalar once a loss is added: one host sync, at the end
        before, after = self._hooks["before_forward"], self._hooks["after_forward"]
        runs = self._fused_runs(bool(before or after))
        i = start
        while i <= end:
            run = runs.get(i)
            if run is not None and run.last <= end and self._forward_fused(run):
                if isinstance(run, fusion.TrainingRun):
                    self._owed.update(dict.fromkeys(range(run.first, run.last + 1), run))
                i = run.last + 1
                continue
            if self._owed:
                self._settle(i)
            for hook in before:
                hook(i)
            layer = self.layers[i]
            bottom, top = self._blobs_of(self.layer_bottoms[i]), self._blobs_of(self.layer_tops[i])
            try:
                self.reshape_layer(i, bottom, top)
                layer.forward(bottom, top)
            except MemoryError:
                raise self._out_of_memory(layer, bottom) from None
            for blob, weight in self._layer_loss[i]:
                loss = loss + weight * blob.data.sum()
            if self.debug_info:
                self._log_forward(i)
            for hook in after:
                hook(i)
            i += 1
        return float(loss)

    def _forward_fused(self, run: fusion.FusedRun) -> bool:
        """``run.forward``, whose first pass may allocate the blob: out of memory names
        the run's first layer, as that layer's own forward would."""
        try:
            return run.forward(self)
        except MemoryError:
            bottom = self._blobs_of(self.layer_bottoms[run.first])
            raise self._out_of_memory(run.batch_norm, bottom) from None

    def _fused_runs(self, hooked: bool) -> dict[int, fusion.FusedRun | fusion.TrainingRun]:
        """The layer runs that forward applies in one pass (``netforge.fusion``), by first
        index: none while forward hooks are registered (``hooked``) or ``debug_info`` is on,
        which must see every layer, or when ``NETFORGE_FUSE`` is 0."""
        if hooked or self.debug_info or not fusion.enabled():
            return {}
        if self._fusion is None:
            self._fusion = fusion.plan(self)
            self._fused_backward = {
                run.last: run
                for run in self._fusion.values()
                if isinstance(run, fusion.TrainingRun) and self.layer_need_backward[run.first]
            }
        return self._fusion

    def backward_from_to(self, start: int | None = None, end: int = 0) -> None:
        """Backpropagate from layer ``start`` down to ``end`` (inclusive)."""
        start = len(self.layers) - 1 if start is None else start
        if self._follows_mode:
            self.follow_mode()
        if not self._gradients_checked:
            self._check_gradient_memory()
        before, after = self._hooks["before_backward"], self._hooks["after_backward"]
        runs = self._fused_backward if self._fused_runs(bool(before or after)) else {}
        i = start
        while i >= end:
            run = runs.get(i)
            if (
                run is not None
                and run.first >= end
                and self._owed.get(run.first) is run
                and self._backward_fused(run)
            ):
                i = run.first - 1
                continue
            self._backward_layer(i, before, after)
            i -= 1
        if end == 0:
            self.zero_stale_param_diffs()

    def _backward_fused(self, run: fusion.TrainingRun) -> bool:
        """``run.backward``, with the bookkeeping of each of its layers' own backward:
        stale parameter diffs zeroed, unknown bounds on what they added. False where the
        run's layers must run one by one."""
        layers = range(run.last, run.first - 1, -1)
        for j in layers:
            if self._stale_slots:
                self._prepare_stale_diffs(j)
        try:
            if not run.backward(self):
                return False
        except MemoryError:
            bottom = self._blobs_of(self.layer_bottoms[run.first])
            raise self._out_of_memory(run.batch_norm, bottom) from None
        for j in layers:
            del self._owed[j]
            for slot in self._param_slots[j]:
                self.param_diff_bounds[slot] += math.inf
        return True

    def _settle(self, i: int) -> None:
        """Before layer ``i`` runs alone, if it belongs to a training run whose last forward
        was fused: write what that run's Scale kept in that forward, as its own forward
        would have, and forget the run (its layers now keep their own state)."""
        run = self._owed.get(i)
        if run is None:
            return
        run.keep_scale_input(self)
        for j in range(run.first, run.last + 1):
            del self._owed[j]

    def _backward_layer(self, i: int, before: list, after: list) -> None:
        """Layer ``i``'s own backward, with its hooks and bookkeeping."""
        for hook in before:
            hook(i)
        for blob, weight in self._layer_loss[i]:
            blob.diff.fill(weight)
        if not self.layer_need_backward[i]:
            for hook in after:  # Caffe calls them for every layer of the pass
                hook(i)
            return
        layer = self.layers[i]
        if self._stale_slots:
            self._prepare_stale_diffs(i)
        if self._owed:
            self._settle(i)
        layer.diff_bounds = None
        try:
            layer.backward(
                self._blobs_of(self.layer_tops[i]),
                self.bottom_need_backward[i],
                self._blobs_of(self.layer_bottoms[i]),
            )
        except MemoryError:
            raise self._out_of_memory(layer, self._blobs_of(self.layer_bottoms[i])) from None
        finally:
            layer.stale_param_diffs = []
        added = layer.diff_bounds or [math.inf] * len(layer.blobs)
        for slot, bound in zip(self._param_slots[i], added):
            self.param_diff_bounds[slot] += bound
        if self.debug_info:
            self._log_backward(i)
        for hook in after:
            hook(i)

    def _check_gradient_memory(self) -> None:
        """Check, before backward allocates its first diff, that the arrays still to be
        allocated (a diff beside every blob and parameter backward writes, and any data not
        yet touched) fit in the memory left, layer by layer: the check at setup counts data
        only (a net that only runs forward allocates no diffs), so a net that fits for
        inference but not for training is one error naming the layer and the bytes, not a
        MemoryError part way through backward."""
        self._gradients_checked = True
        arrays: set[tuple[int, bool]] = set()
        total = 0
        for i, layer in enumerate(self.layers):
            tops = self._blobs_of(self.layer_tops[i])
            held = [(b, False) for b in (*tops, *layer.blobs)]
            if self.layer_need_backward[i]:
                bottoms = self._blobs_of(self.layer_bottoms[i])
                written = [b for b, flag in zip(bottoms, self.bottom_need_backward[i]) if flag]
                held += [(b, True) for b in (*tops, *written, *layer.blobs)]
            for blob, diff in held:
                if (id(blob), diff) not in arrays:
                    arrays.add((id(blob), diff))
                    total += blob.bytes_to_allocate(diff)
            check_bytes(
                total,
                f"layer {layer.name!r}: the gradients (and data not yet allocated) up to it",
                self.backend.device_id,
            )

    def before_forward(self, callback: Callable[[int], Any]) -> None:
        """Call ``callback(i)`` before layer ``i``'s forward (pycaffe's
        ``net.before_forward``; likewise ``after_forward``, ``before_backward`` and
        ``after_backward``). Each layer of a pass is reported in the pass's order, those
        that skip backward included, as in Caffe."""
        self._hooks["before_forward"].append(callback)

    def after_forward(self, callback: Callable[[int], Any]) -> None:
        """Call ``callback(i)`` after layer ``i``'s forward (see ``before_forward``)."""
        self._hooks["after_forward"].append(callback)

    def before_backward(self, callback: Callable[[int], Any]) -> None:
        """Call ``callback(i)`` before layer ``i``'s backward (see ``before_forward``)."""
        self._hooks["before_backward"].append(callback)

    def after_backward(self, callback: Callable[[int], Any]) -> None:
        """Call ``callback(i)`` after layer ``i``'s backward (see ``before_forward``): where
        data-parallel training starts the all-reduce of the gradients that are complete."""
        self._hooks["after_backward"].append(callback)

    def mark_param_diffs_stale(self) -> None:
        """Caffe's ClearParamDiffs without a pass over memory: declare that no learnable
        parameter's diff holds anything to keep, as if it were zero.

        The next backward writes each stale diff before anything adds to it: a layer with
        ``overwrites_param_diffs`` (InnerProduct) writes its gradient over the diff (its
        GEMM with beta = 0 instead of 1), any other layer finds the diff zeroed just before
        its backward, and diffs no layer reaches are zeroed when the pass reaches the first
        layer. Zeroing every diff up front streams all of them through memory once more
        per iteration (CaffeNet: 244 MB)."""
        self._stale_slots = set(range(len(self.learnable_params)))
        self.reset_param_diff_bounds(0.0)

    def zero_stale_param_diffs(self) -> None:
        """Zero the diffs still stale (see ``mark_param_diffs_stale``)."""
        for slot in sorted(self._stale_slots):
            self.learnable_params[slot].diff.fill(0)
        self._stale_slots.clear()

    def _prepare_stale_diffs(self, index: int) -> None:
        """Before layer ``index``'s backward: flag the stale diffs it will write over, zero
        the other stale diffs it may add to; none of its diffs is stale afterwards."""
        layer, slots = self.layers[index], self._param_slots[index]
        writes = layer.param_propagate_down if layer.overwrites_param_diffs else []
        flags = []
        for j, slot in enumerate(slots):
            stale = slot in self._stale_slots
            self._stale_slots.discard(slot)  # a blob shared within the layer: written once
            flags.append(stale and j < len(writes) and writes[j])
            if stale and not flags[-1]:
                self.learnable_params[slot].diff.fill(0)
        if any(flags):
            layer.stale_param_diffs = flags

    def forward_loss(self) -> float:
        """Caffe's ``Net::Forward(&loss)``: run every layer, return the total loss."""
        return self.forward_from_to()

    def forward_backward(self) -> float:
        """One forward and backward pass; parameter gradients accumulate. Returns the loss."""
        loss = self.forward_from_to()
        self.backward_from_to()
        return loss

    def forward(
        self,
        blobs: Sequence[str] | None = None,
        start: str | None = None,
        end: str | None = None,
        **inputs: Any,
    ) -> dict[str, Any]:
        """pycaffe's ``net.forward``: copy ``inputs`` into their blobs (reshaping the net
        when a shape differs), run, return the outputs (and ``blobs``). As pycaffe, the
        caller's arrays are copied, never kept: an in-place first layer does not write into
        them, and views of a blob's data taken before stay its data."""
        if self._follows_mode:
            self.follow_mode()
        resized = False
        for name, value in inputs.items():
            if name not in self.blobs:
                raise ConfigError(f"net {self.name!r} has no blob {name!r} to take an input")
            blob = self.blobs[name]
            value = self.backend.asarray(value, dtype=self.dtype)
            if value.shape != blob.shape:
                blob.reshape(value.shape)
                resized = True
            blob.data[...] = value
        if resized:
            self.reshape()
        start_index = self._index(start, 0)
        end_index = self._index(end, len(self.layers) - 1)
        self.forward_from_to(start_index, end_index)
        names = self.layer_tops[end_index] if end is not None else self.outputs
        return {n: self.blobs[n].data for n in [*names, *(blobs or ())]}

    def backward(
        self,
        diffs: Sequence[str] | None = None,
        start: str | None = None,
        end: str | None = None,
        **top_diffs: Any,
    ) -> dict[str, Any]:
        """pycaffe's ``net.backward``: copy ``top_diffs`` into their blobs' diffs,
        backpropagate, return the input diffs (and ``diffs``)."""
        if self._follows_mode:
            self.follow_mode()
        for name, value in top_diffs.items():
            if name not in self.blobs:
                raise ConfigError(f"net {self.name!r} has no blob {name!r} to take a diff")
            blob = self.blobs[name]
            value = self.backend.asarray(value, dtype=self.dtype)
            if value.shape != blob.shape:
                raise ShapeError(
                    f"net {self.name!r}: diff for blob {name!r} has shape {value.shape}, "
                    f"the blob {blob.shape}"
                )
            blob.diff[...] = value
        start_index = self._index(start, len(self.layers) - 1)
        end_index = self._index(end, 0)
        self.backward_from_to(start_index, end_index)
        names = self.layer_bottoms[end_index] if end is not None else self.inputs
        return {n: self.blobs[n].diff for n in [*names, *(diffs or ())]}

    def set_input_arrays(self, data: Any, labels: Any, layer: str | None = None) -> None:
        """pycaffe's ``net.set_input_arrays``: give a MemoryData layer (the first one, or
        ``layer``) the arrays it serves, batch by batch."""
        memory = [
            candidate
            for candidate in self.layers
            if candidate.type == "MemoryData" and layer in (None, candidate.name)
        ]
        if not memory:
            raise ConfigError(f"net {self.name!r} has no MemoryData layer to take input arrays")
        memory[0].set_input_arrays(data, labels)

    # -- weights -------------------------------------------------------------------------
    def copy_from(
        self, source: str | os.PathLike | pb.NetParameter, *, exclude: Iterable[str] = ()
    ) -> CopyReport:
        """Copy trained parameters by layer name (Caffe's CopyTrainedLayersFrom).

        Layers of the file the net lacks are ignored; a layer in ``exclude`` keeps its fresh
        initialisation; a blob count or shape mismatch is a ShapeError naming the layer and
        both shapes.
        """
        table: WeightTable = read_weight_table(source)
        excluded = set(exclude)
        unknown = [name for name in excluded if name not in self.layer_dict]
        if unknown:
            raise ConfigError(
                f"cannot re-initialise {', '.join(unknown)}: no such layer in the net"
            )
        where = source if not isinstance(source, pb.NetParameter) else "the weights"
        report = CopyReport()
        shared = self._non_owner_params()
        for name, stored in table.items():
            layer = self.layer_dict.get(name)
            if layer is None:
                report.unused.append(name)
                continue
            if name in excluded:
                report.reinitialised.append(name)
                continue
            if not stored and not layer.blobs:
                continue
            if max(stored, default=-1) >= len(layer.blobs):
                raise ShapeError(
                    f"{where}: layer {name!r} has {len(stored)} blob(s) but the net's layer has "
                    f"{len(layer.blobs)}; rename the layer in your prototxt to re-initialise it "
                    "(or use --reinit)"
                )
            for i, blob in enumerate(layer.blobs):
                if i not in stored:
                    if (name, i) in shared:
                        continue
                    raise DataError(f"{where}: layer {name!r} has no blob {i}")
                values = stored[i]
                if not values.fits(blob.shape):
                    raise ShapeError(
                        f"{where}: layer {name!r} blob {i} has shape {values.shape} but the net "
                        f"needs {blob.shape}; to re-initialise this layer instead, rename it in "
                        "your prototxt (Caffe's idiom) or pass --reinit " + name
                    )
                blob.data[...] = self.backend.asarray(values.data.reshape(blob.shape), self.dtype)
            report.copied.append(name)
        copied = set(report.copied) | excluded
        report.missing = [ly.name for ly in self.layers if ly.blobs and ly.name not in copied]
        report.reinitialised += [n for n in excluded if n not in report.reinitialised]
        return report

    def _non_owner_params(self) -> set[tuple[str, int]]:
        owners = {id(b) for b in self.learnable_params}
        owner_ids = set(self.learnable_param_ids)
        return {
            (layer.name, i)
            for layer in self.layers
            for i, blob in enumerate(layer.blobs)
            if (layer.name, i) not in owner_ids and id(blob) in owners
        }

    def share_weights_from(self, other: Net) -> None:
        """Use ``other``'s parameter arrays for layers of the same name (test nets)."""
        for layer in self.layers:
            source = other.layer_dict.get(layer.name)
            if source is None or not layer.blobs:
                continue
            for i, (mine, theirs) in enumerate(zip(layer.blobs, source.blobs)):
                if mine.shape != theirs.shape:
                    raise ShapeError(
                        f"layer {layer.name!r} blob {i}: shape {mine.shape} cannot share "
                        f"{theirs.shape} from net {other.name!r}"
                    )
                mine.share_data(theirs)

    def to_proto(self, write_diff: bool = False) -> pb.NetParameter:
        """The net as Caffe's Net::ToProto writes it: every layer with its parameters."""
        net = pb.NetParameter(name=self.name)
        for layer in self.layers:
            proto = net.layer.add()
            proto.CopyFrom(layer.layer_param)
            del proto.blobs[:]
            for blob in layer.blobs:
                diff = to_numpy(blob.diff) if write_diff else None
                proto.blobs.append(array_to_proto(to_numpy(blob.data), diff))
        return net

    def save(self, path: str | os.PathLike, write_diff: bool = False) -> None:
        """Write a binary ``.caffemodel`` (atomically)."""
        with atomic_write(path, "wb") as handle:
            handle.write(self.to_proto(write_diff).SerializeToString())

    def save_hdf5(self, path: str | os.PathLike, write_diff: bool = False) -> None:
        """Write Caffe's ``.caffemodel.h5``: owners' data (and every param's diff)."""
        shared = self._non_owner_params()
        layers = []
        for layer in self.layers:
            blobs = [
                (i, to_numpy(b.data), to_numpy(b.diff) if write_diff else None)
                for i, b in enumerate(layer.blobs)
                if (layer.name, i) not in shared
            ]
            if layer.blobs:
                layers.append((layer.name, blobs))
        write_hdf5_weights(path, layers)

    def to_onnx(
        self,
        path: str | os.PathLike,
        opset: int | None = None,
        dynamic_batch: bool = False,
        fold_batchnorm: bool = False,
    ) -> Any:
        """Write the net and its weights as an ONNX model (needs ``netforge[onnx]``) and
        return the ``onnx.ModelProto``; see ``netforge.export.net_to_onnx``."""
        from netforge.export import net_to_onnx, save_onnx
        from netforge.export.onnx_graph import DEFAULT_OPSET

        model = net_to_onnx(
            self,
            opset=DEFAULT_OPSET if opset is None else opset,
            dynamic_batch=dynamic_batch,
            fold_batchnorm=fold_batchnorm,
        )
        save_onnx(model, path)
        return model

    def freeze(self, pattern: str) -> list[str]:
        """Set lr_mult 0 on the parameters of layers whose name matches the glob ``pattern``
        (Caffe users did this by editing ParamSpecs); returns the frozen layers' names."""
        frozen = [layer for layer in self.layers if layer.blobs and fnmatch(layer.name, pattern)]
        frozen_ids = {id(blob) for layer in frozen for blob in layer.blobs}
        for k, blob in enumerate(self.learnable_params):
            if id(blob) in frozen_ids:
                self.params_lr[k] = 0.0
        for layer in frozen:
            layer.param_propagate_down = [False] * len(layer.blobs)
        return [layer.name for layer in frozen]

    # -- diagnostics and state -----------------------------------------------------------
    def reset_param_diff_bounds(self, bound: float) -> None:
        """Declare that every learnable parameter's diff is at most ``bound`` in magnitude:
        0 right after the diffs were zeroed, infinity once something else wrote them.

        ``param_diff_bounds`` (a list) holds, per learnable parameter, such a bound, to which each
        backward adds what its layers report in ``Layer.diff_bounds`` (infinity for a layer
        that reports nothing). A diff whose bound is finite and far from overflow holds no
        NaN or infinity, so the solver's finiteness check need not read it."""
        self.param_diff_bounds = [bound] * len(self.learnable_params)

    def first_nonfinite(self) -> tuple[str, str, str] | None:
        """The first (layer, blob, "data"|"diff") holding a NaN or infinity, in the order the
        values were computed: forward tops first, then backward diffs from the top down."""
        xp = self.backend.xp
        for name, tops in zip(self.layer_names, self.layer_tops):
            for top in tops:
                if not bool(xp.isfinite(self.blobs[top].data).all()):
                    return name, top, "data"
        for i in reversed(range(len(self.layers))):
            if not self.layer_need_backward[i]:
                continue
            layer = self.layers[i]
            for j, blob in enumerate(layer.blobs):
                if not bool(xp.isfinite(blob.diff).all()):
                    return layer.name, f"param {j}", "diff"
            for bottom, needed in zip(self.layer_bottoms[i], self.bottom_need_backward[i]):
                if needed and not bool(xp.isfinite(self.blobs[bottom].diff).all()):
                    return layer.name, bottom, "diff"
        return None

    def layer_states(self) -> list[tuple[str, bytes]]:
        """Each stateful layer's resumable state (data layers' cursors)."""
        states = [(layer.name, layer.get_state()) for layer in self.layers]
        return [(name, state) for name, state in states if state is not None]

    def set_layer_states(self, states: Iterable[tuple[str, bytes]]) -> None:
        for name, state in states:
            if name not in self.layer_dict:
                raise DataError(f"saved state for layer {name!r}, which this net does not have")
            self.layer_dict[name].set_state(state)

    def _log_forward(self, i: int) -> None:
        layer = self.layers[i]
        for name in self.layer_tops[i]:
            log.info(
                "    [Forward] Layer %s, top blob %s data: %.6g",
                layer.name,
                name,
                _mean_abs(self.blobs[name].data),
            )
        for j, blob in enumerate(layer.blobs):
            log.info(
                "    [Forward] Layer %s, param blob %d data: %.6g",
                layer.name,
                j,
                _mean_abs(blob.data),
            )

    def _log_backward(self, i: int) -> None:
        layer = self.layers[i]
        for name, needed in zip(self.layer_bottoms[i], self.bottom_need_backward[i]):
            if needed:
                log.info(
                    "    [Backward] Layer %s, bottom blob %s diff: %.6g",
                    layer.name,
                    name,
                    _mean_abs(self.blobs[name].diff),
                )
        for j, blob in enumerate(layer.blobs):
            if layer.param_propagate_down[j]:
                log.info(
                    "    [Backward] Layer %s, param blob %d diff: %.6g",
                    layer.name,
                    j,
                    _mean_abs(blob.diff),
                )


def _mean_abs(array: Any) -> float:
    return float(abs(array).mean()) if array.size else 0.0


def _log_connections(layer: str, bottoms: Sequence[str], tops: Sequence[str]) -> None:
    """Caffe's ``<layer> <- <bottom>`` and ``<layer> -> <top>`` lines of Net::Init."""
    for name in bottoms:
        log.info("%s <- %s", layer, name)
    for j, name in enumerate(tops):
        in_place = " (in-place)" if j < len(bottoms) and bottoms[j] == name else ""
        log.info("%s -> %s%s", layer, name, in_place)


def _fmt(value: float) -> str:
    return f"{float(value):.6g}"


def _path_fields(layer: pb.LayerParameter) -> list[str]:
    """The file and folder paths a layer's parameters name (sources, means, roots)."""
    paths = [layer.transform_param.mean_file]
    for name in ("data_param", "hdf5_data_param", "image_data_param", "window_data_param"):
        if layer.HasField(name):
            message = getattr(layer, name)
            paths += [message.source, getattr(message, "mean_file", "")]
            paths.append(getattr(message, "root_folder", ""))
    if layer.HasField("hdf5_output_param"):
        paths.append(layer.hdf5_output_param.file_name)
    return [path for path in paths if path]


def _in_layer(exc: DataError, layer: pb.LayerParameter, source: str | None) -> DataError:
    """``exc`` with the layer and prototxt that asked for the data; a relative path there
    was resolved against the working directory, which the message then names."""
    where = f"layer {layer.name!r} ({layer.type})" + (f" in {source}" if source else "")
    text = str(exc)
    if not text.startswith(f"layer {layer.name!r}"):
        text = f"{where}: {text}"
    elif source and source not in text:
        text = f"{source}: {text}"
    if any(not os.path.isabs(path) for path in _path_fields(layer)):
        text += (
            f" (relative paths in a prototxt are resolved against the working directory, "
            f"{os.getcwd()}: run from the folder they are relative to, or make them absolute)"
        )
    return type(exc)(text)
