"""The layer test harness: build one layer from prototxt text, run it, check its gradients.

``check_gradient`` follows Caffe's GradientChecker (test_gradient_check_util.hpp): the
objective is ½·Σ top² over all tops, the analytic gradient comes from one forward and
backward, the numeric one from central differences, both in float64, the generator is
reseeded before every forward so stochastic layers repeat, and inputs inside the kink
window ``kink - kink_range <= |x| <= kink + kink_range`` are skipped. An element passes when
``|analytic - numeric| <= threshold * max(|analytic|, |numeric|, 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from google.protobuf import text_format

from netforge.backend import CPU, Backend, to_numpy
from netforge.blob import Blob
from netforge.layer import Layer, create_layer
from netforge.proto import pb

SEED = 1701


def layer_param(text: str, name: str = "layer") -> pb.LayerParameter:
    param = text_format.Parse(text, pb.LayerParameter())
    if not param.name:
        param.name = name
    return param


def build(
    text: str,
    bottoms: Sequence[np.ndarray],
    *,
    num_tops: int = 1,
    phase: int = pb.TRAIN,
    backend: Backend = CPU,
    dtype=np.float64,
    seed: int = SEED,
) -> tuple[Layer, list[Blob], list[Blob]]:
    """A set-up, reshaped layer with ``bottoms`` loaded into its bottom blobs."""
    layer = create_layer(
        layer_param(text),
        phase=phase,
        backend=backend,
        dtype=dtype,
        rng=np.random.default_rng(seed),
    )
    bottom = []
    for i, array in enumerate(bottoms):
        blob = Blob(array.shape, dtype, backend, name=f"bottom{i}")
        blob.data = backend.asarray(np.asarray(array, dtype=dtype))
        bottom.append(blob)
    top = [Blob((), dtype, backend, name=f"top{i}") for i in range(num_tops)]
    layer.check_blob_counts(bottom, top)
    layer.setup(bottom, top)
    layer.param_propagate_down = [True] * len(layer.blobs)
    layer.reshape(bottom, top)
    return layer, bottom, top


def forward(
    layer: Layer, bottom: list[Blob], top: list[Blob], seed: int = SEED
) -> list[np.ndarray]:
    layer.rng = np.random.default_rng(seed)
    layer.reshape(bottom, top)
    layer.forward(bottom, top)
    return [to_numpy(t.data).copy() for t in top]


def run(text: str, bottoms: Sequence[np.ndarray], **kwargs) -> list[np.ndarray]:
    """The tops' data after one forward pass, as numpy arrays."""
    layer, bottom, top = build(text, bottoms, **kwargs)
    return forward(layer, bottom, top)


def check_gradient(
    text: str,
    bottoms: Sequence[np.ndarray],
    *,
    num_tops: int = 1,
    stepsize: float = 1e-2,
    threshold: float = 1e-3,
    kink: float = 0.0,
    kink_range: float = -1.0,
    check_bottoms: Sequence[int] | None = None,
    check_params: bool = True,
    top_weights: Sequence[np.ndarray] | None = None,
    phase: int = pb.TRAIN,
    backend: Backend = CPU,
    seed: int = SEED,
) -> int:
    """Assert that analytic and numeric gradients agree; returns the count of checked values.

    ``check_bottoms`` lists the bottoms to differentiate (default: all); ``top_weights``
    replaces ½·Σ top² by Σ w·top (for losses whose top is a scalar, or to weight elements).
    """
    layer, bottom, top = build(
        text, bottoms, num_tops=num_tops, phase=phase, backend=backend, seed=seed
    )
    checked = list(range(len(bottom))) if check_bottoms is None else list(check_bottoms)

    def objective() -> float:
        outs = forward(layer, bottom, top, seed)
        if top_weights is None:
            return sum(0.5 * float(np.sum(o.astype(np.float64) ** 2)) for o in outs)
        return sum(float(np.sum(w * o)) for w, o in zip(top_weights, outs))

    objective()
    for i, t in enumerate(top):
        weight = t.data if top_weights is None else backend.asarray(top_weights[i])
        t.diff = backend.xp.array(weight, dtype=t.dtype) if top_weights else t.data.copy()
    for p in layer.blobs:
        p.diff = backend.xp.zeros_like(p.data)
    for b in bottom:
        b.diff = backend.xp.zeros_like(b.data)
    propagate = [i in checked for i in range(len(bottom))]
    layer.backward(top, propagate, bottom)
    targets = [bottom[i] for i in checked] + (list(layer.blobs) if check_params else [])
    analytic = [to_numpy(b.diff).copy() for b in targets]

    count = 0
    for blob, grad in zip(targets, analytic):
        values = to_numpy(blob.data).copy()
        flat = values.reshape(-1)
        for j in range(flat.size):
            x = flat[j]
            if kink - kink_range <= abs(x) <= kink + kink_range:
                continue
            flat[j] = x + stepsize
            blob.data = backend.asarray(values.copy())
            plus = objective()
            flat[j] = x - stepsize
            blob.data = backend.asarray(values.copy())
            minus = objective()
            flat[j] = x
            blob.data = backend.asarray(values.copy())
            numeric = (plus - minus) / (2 * stepsize)
            got = grad.reshape(-1)[j]
            scale = max(abs(got), abs(numeric), 1.0)
            assert abs(got - numeric) <= threshold * scale, (
                f"{layer.type} gradient of {blob.name}[{np.unravel_index(j, values.shape)}]: "
                f"analytic {got:.6g} vs numeric {numeric:.6g}"
            )
            count += 1
    return count


def assert_state_repeats_batch(layer: Layer, top: list[Blob]) -> None:
    """A data layer's ``get_state()`` taken before a forward, restored after it, makes the
    next forward give that batch (top 0) again: a resumed run reads what it would have."""
    state = layer.get_state()
    layer.forward([], top)
    after = to_numpy(top[0].data).copy()
    layer.set_state(state)
    layer.forward([], top)
    np.testing.assert_array_equal(to_numpy(top[0].data), after)


#: The CPU paths a compiled-kernel test runs on (``kernel_path``).
KERNEL_PATHS = ["kernels", "kernels-split", "numpy"]


def kernel_path(request, monkeypatch, module, calls: Sequence[str]) -> tuple[str, list[str]]:
    """Set up the path ``request.param`` (one of ``KERNEL_PATHS``) for a test of the numba
    kernels in ``module``: the kernels on one worker, the kernels with the work split
    between the workers however small (``module.SPLIT_MIN`` 1), or the numpy path the
    kernels override (``_jit.enabled`` false). Skips the kernel paths without numba. The
    entry points named in ``calls`` are spied on; returns the path and the list of those
    called, so that each test can show which path ran (``expect_path``)."""
    import pytest

    from netforge.builtin_layers import _jit

    called: list[str] = []
    if request.param == "numpy":
        monkeypatch.setattr(_jit, "enabled", lambda: False)
    elif not _jit.enabled():
        pytest.skip("numba (the jit extra) is not installed or NETFORGE_JIT=0")
    if request.param == "kernels-split":
        monkeypatch.setattr(module, "SPLIT_MIN", 1)
    for name in calls:
        function = getattr(module, name)

        def spy(*args, _name=name, _function=function, **kwargs):
            called.append(_name)
            return _function(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    return request.param, called


def expect_path(path: tuple[str, list[str]], *names: str) -> None:
    """That the path from ``kernel_path`` ran: no kernel on numpy, else exactly ``names``."""
    kind, called = path
    if kind == "numpy":
        assert called == []
    else:
        assert sorted(set(called)) == sorted(names)
