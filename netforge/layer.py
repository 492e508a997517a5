"""The layer contract and the layer registry.

A layer keeps Caffe's vocabulary: ``setup`` (read parameters, create parameter blobs),
``reshape`` (pure shape inference: set every top's shape), ``forward`` and
``backward(top, propagate_down, bottom)``. Layers register with ``@register("Type")``
(Caffe's REGISTER_LAYER_CLASS); third-party layers arrive through ``type: "Python"``
(``python_param``) or through the ``netforge.layers`` entry-point group, whose entries are
modules (or classes) that register layers when imported.

Gradient conventions (Caffe's): ``backward`` *overwrites* bottom diffs and *accumulates*
into parameter diffs (``self.blobs[i].diff += ...``), because the solver zeroes parameter
diffs once per iteration and ``iter_size`` sums several passes. netforge's solver declares
them stale instead of zeroing them (``Net.mark_param_diffs_stale``): the net zeroes a stale
diff just before the backward of the layer that adds to it, unless the layer sets
``overwrites_param_diffs`` and writes its gradient over the diffs flagged in
``stale_param_diffs``.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, ClassVar

import numpy as np

from netforge.backend import CPU, Backend, move_array
from netforge.blob import Blob
from netforge.errors import ConfigError, ShapeError
from netforge.filler import fill
from netforge.proto import pb

ENTRY_POINT_GROUP = "netforge.layers"


class ParamBlobs(list):
    """A layer's parameter blobs; ``add_blob(*shape)`` is pycaffe's way to add one."""

    def __init__(self, layer: Layer) -> None:
        super().__init__()
        self._layer = layer

    def add_blob(self, *shape: int) -> Blob:
        blob = self._layer.make_blob(shape)
        self.append(blob)
        return blob


class Layer:
    """Base class of every layer.

    Subclasses set the class attributes that describe their bottoms and tops and override
    ``setup`` (optional), ``reshape``, ``forward`` and, when they can be differentiated,
    ``backward``.
    """

    type: ClassVar[str] = ""
    #: (min, max) counts of bottoms and tops; max None = unbounded.
    bottoms: ClassVar[tuple[int, int | None]] = (0, None)
    tops: ClassVar[tuple[int, int | None]] = (0, None)
    #: Loss layers: top 0 gets loss_weight 1 by default, and a top is created if none given.
    is_loss: ClassVar[bool] = False
    #: backward writes its parameter gradient over a diff flagged in ``stale_param_diffs``
    #: rather than adding to it, sparing the net a zeroing pass over that diff.
    overwrites_param_diffs: ClassVar[bool] = False
    #: ``reshape`` reads nothing but the shapes of the bottoms, tops and parameter blobs,
    #: the layer's own settings and its backend, so the net skips it while all of them are
    #: as they were after its last run (``Net.reshape_layer``). Off by default: a data
    #: layer's or a Python layer's reshape may follow its input.
    reshape_follows_shapes: ClassVar[bool] = False

    def __init__(
        self,
        param: pb.LayerParameter,
        phase: int = pb.TEST,
        backend: Backend = CPU,
        dtype: Any = np.float32,
        rng: np.random.Generator | None = None,
    ) -> None:
        self.layer_param = param
        self.name = param.name
        self.phase = param.phase if param.HasField("phase") else phase
        self.backend = backend
        self.dtype = np.dtype(dtype)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.blobs = ParamBlobs(self)
        #: per parameter blob: whether backward must compute its gradient (set by Net).
        self.param_propagate_down: list[bool] = []
        #: Set by a backward that can bound its parameter gradients cheaply: per parameter
        #: blob, an upper bound on the magnitude of what it added to the blob's diff (0 for
        #: nothing added). None, the default, means unknown. A finite bound spares the
        #: solver's finiteness check from reading that diff (``Net.param_diff_bounds``).
        self.diff_bounds: list[float] | None = None
        #: Set by Net around the backward of a layer with ``overwrites_param_diffs``: per
        #: parameter blob, whether its diff holds nothing to keep, so that backward must
        #: write the gradient rather than add it. Empty: add to every diff.
        self.stale_param_diffs: list[bool] = []
        self._device_rng: Any = None

    # -- contract ------------------------------------------------------------------------
    def setup(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Read parameters and create ``self.blobs``; runs once, before the first reshape."""

    def reshape(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Set the shape of every top from the bottoms' shapes (no computation)."""
        raise NotImplementedError(f"layer type {self.type} does not implement reshape")

    def forward(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Compute the tops' data from the bottoms' data."""
        raise NotImplementedError(f"layer type {self.type} does not implement forward")

    def backward(
        self, top: Sequence[Blob], propagate_down: Sequence[bool], bottom: Sequence[Blob]
    ) -> None:
        """Write bottom diffs where ``propagate_down``; add parameter gradients."""
        if any(propagate_down):
            raise ConfigError(f"layer {self.name!r} ({self.type}) cannot backpropagate")

    def allow_force_backward(self, bottom_index: int) -> bool:
        """Whether ``force_backward`` may ask for the gradient of this bottom (labels: no)."""
        return True

    # -- resumable state (data layers) ---------------------------------------------------
    def get_state(self) -> bytes | None:
        """Opaque state a snapshot keeps so that a resumed run continues exactly."""
        return None

    def set_state(self, state: bytes) -> None:
        """Restore what ``get_state`` returned."""

    # -- device ----------------------------------------------------------------------------
    def to(self, backend: Backend, moved: dict[int, tuple[Any, Any]]) -> None:
        """Move the layer to ``backend``: its parameter blobs and whatever it keeps in its
        attributes (arrays, blobs, inner layers or nets, in lists, tuples and dicts too),
        each buffer once through the ``moved`` memo (``backend.move_array``). A layer that
        keeps device state elsewhere overrides this and calls it."""
        if backend == self.backend:
            return
        self.backend = backend  # first: a layer reached again through its attributes is done
        for name, value in list(vars(self).items()):
            if name != "backend":
                setattr(self, name, move_state(value, backend, moved))
        self._device_rng = None  # a generator of the old array module

    # -- helpers for subclasses ----------------------------------------------------------
    @property
    def xp(self) -> Any:
        return self.backend.xp

    def random_uniform(self, shape: Sequence[int]) -> Any:
        """Uniform [0, 1) numbers of this layer's dtype, on its backend, reproducible from
        ``self.rng``: drawn from it on the CPU; on a GPU drawn on the device by a generator
        reseeded from it, so no random numbers cross the bus."""
        if not self.backend.is_gpu:
            return self.rng.random(tuple(shape), dtype=self.dtype)
        seed = int(self.rng.integers(2**63 - 1))
        if self._device_rng is None:
            self._device_rng = self.xp.random.RandomState(seed)
        else:
            self._device_rng.seed(seed)
        return self._device_rng.random_sample(tuple(shape), dtype=self.dtype)

    def make_blob(self, shape: Sequence[int], filler: pb.FillerParameter | None = None) -> Blob:
        """A parameter blob on this layer's backend, filled by ``filler`` (zeros if None)."""
        blob = Blob(shape, self.dtype, self.backend, name=f"{self.name}.{len(self.blobs)}")
        if filler is not None:
            blob.data = self.backend.asarray(fill(filler, shape, self.rng, self.dtype))
        return blob

    def check_blob_counts(self, bottom: Sequence[Blob], top: Sequence[Blob]) -> None:
        """Raise a ConfigError naming the layer when it has the wrong number of blobs."""
        for what, blobs, (low, high) in (
            ("bottom", bottom, self.bottoms),
            ("top", top, self.tops),
        ):
            n = len(blobs)
            if n < low or (high is not None and n > high):
                if high == low:
                    expected = f"exactly {low}"
                elif high is None:
                    expected = f"at least {low}"
                else:
                    expected = f"{low} to {high}"
                raise ConfigError(
                    f"layer {self.name!r} ({self.type}) takes {expected} {what} blob(s), got {n}"
                )

    def shape_error(self, message: str) -> ShapeError:
        """A ShapeError that names this layer."""
        return ShapeError(f"layer {self.name!r} ({self.type}): {message}")

    def config_error(self, message: str) -> ConfigError:
        """A ConfigError that names this layer."""
        return ConfigError(f"layer {self.name!r} ({self.type}): {message}")


# -- registry ------------------------------------------------------------------------------
LayerCreator = Callable[..., Layer]
_REGISTRY: dict[str, LayerCreator] = {}
_entry_points_loaded = False


def move_state(value: Any, backend: Backend, moved: dict[int, tuple[Any, Any]]) -> Any:
    """``value`` with every array, Blob, Layer or Net in it moved to ``backend`` (containers
    rebuilt, other values kept)."""
    kind = type(value)
    if isinstance(value, np.ndarray) or (
        kind.__name__ == "ndarray" and kind.__module__.startswith("cupy")
    ):
        return move_array(value, backend, moved)
    if isinstance(value, (Blob, Layer)) or hasattr(value, "layer_tops"):  # a Net
        value.to(backend, moved)
        return value
    if isinstance(value, list):
        value[:] = [move_state(item, backend, moved) for item in value]
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(move_state(item, backend, moved) for item in value)
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = move_state(item, backend, moved)
    return value


def register(type_name: str) -> Callable[[type[Layer]], type[Layer]]:
    """Class decorator: make ``type: "<type_name>"`` in a prototxt build this class."""

    def decorate(cls: type[Layer]) -> type[Layer]:
        cls.type = type_name
        register_creator(type_name, cls)
        return cls

    return decorate


def register_creator(type_name: str, creator: LayerCreator) -> None:
    """Register a callable ``creator(param, **context) -> Layer`` (REGISTER_LAYER_CREATOR)."""
    if type_name in _REGISTRY and _REGISTRY[type_name] is not creator:
        raise ConfigError(f"layer type {type_name!r} is registered twice")
    _REGISTRY[type_name] = creator


def _load_builtin_and_plugins() -> None:
    global _entry_points_loaded
    importlib.import_module("netforge.builtin_layers")
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
        except Exception as exc:  # a broken plugin must not hide the built-in layers
            raise ConfigError(f"layer plugin {entry.name!r} ({entry.value}) failed: {exc}") from exc


def registered_types() -> list[str]:
    """Every layer type string netforge can build, sorted."""
    _load_builtin_and_plugins()
    return sorted(_REGISTRY)


def layer_creator(type_name: str, layer_name: str = "") -> LayerCreator:
    """What builds ``type_name`` layers; a ConfigError suggests the closest type."""
    _load_builtin_and_plugins()
    try:
        return _REGISTRY[type_name]
    except KeyError:
        close = difflib.get_close_matches(type_name, _REGISTRY, n=1, cutoff=0.5)
        lowered = {t.lower(): t for t in _REGISTRY}
        guess = close[0] if close else lowered.get(type_name.lower())
        hint = f"; did you mean {guess!r}?" if guess else ""
        where = f"layer {layer_name!r}: " if layer_name else ""
        raise ConfigError(f"{where}unknown layer type {type_name!r}{hint}") from None


def create_layer(param: pb.LayerParameter, *, allow_python: bool = True, **context: Any) -> Layer:
    """Build the layer that ``param`` describes (``context``: phase, backend, dtype, rng).

    ``allow_python=False`` refuses ``type: "Python"`` layers: a prototxt that came from
    elsewhere (a download) is data, and must not run code unless the user says so.
    """
    if param.type == "Python" and not allow_python:
        raise ConfigError(
            f"layer {param.name!r} is a Python layer, which runs code named by the prototxt "
            f"({param.python_param.module}.{param.python_param.layer}); this net came from "
            "outside, so Python layers are off: allow them explicitly (--allow-python-layers) "
            "if you trust it"
        )
    return layer_creator(param.type, param.name)(param, **context)
