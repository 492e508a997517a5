"""Run an exported ONNX model in ONNX Runtime beside netforge's own forward, and compare.

Used by the tests and by ``tools/onnx_table.py``; needs ``onnxruntime`` (the ``test``
extra). ``random_weights`` gives a net whose weights ship nowhere (a deploy prototxt alone)
values that keep activations in a useful range, so that a comparison means something.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from netforge.backend import to_numpy
from netforge.errors import ConfigError


def random_weights(net: Any, seed: int = 0) -> None:
    """Fill every parameter blob of ``net`` in place with random values of a sensible scale.

    Weights (2 or more axes): normal with variance 2/fan-in (He); biases: N(0, 0.1²);
    Scale: U(0.5, 1.5); PReLU slopes: U(0, 0.5). BatchNorm's statistics are calibrated as
    training leaves them: the mean and variance of its input on a standard normal batch
    (times U(0.8, 1.25) jitter), both multiplied by a scale-factor blob drawn from
    U(0.5, 2) so that the division by it is exercised. Without calibration a deep random
    net saturates its softmax, and a comparison of one-hot outputs would test nothing.
    """
    rng = np.random.default_rng(seed)
    for layer in net.layers:
        for i, blob in enumerate(layer.blobs):
            shape = tuple(blob.shape)
            if layer.type == "BatchNorm":
                continue
            if layer.type == "Scale" and i == 0:
                value = rng.uniform(0.5, 1.5, shape)
            elif layer.type == "PReLU":
                value = rng.uniform(0, 0.5, shape)
            elif len(shape) >= 2:
                value = rng.normal(0, math.sqrt(2.0 / _fan_in(layer.type, shape)), shape)
            else:
                value = rng.normal(0, 0.1, shape)
            blob.data[...] = layer.backend.asarray(value.astype(blob.data.dtype))
    if not any(layer.type == "BatchNorm" for layer in net.layers):
        return
    for name in net.inputs:
        value = rng.standard_normal(net.blobs[name].shape)
        net.blobs[name].data[...] = net.backend.asarray(value.astype(net.dtype))
    start = 0
    for index, layer in enumerate(net.layers):
        if layer.type != "BatchNorm":
            continue
        net.forward_from_to(start, index - 1)
        start = index
        x = to_numpy(net.blobs[layer.layer_param.bottom[0]].data).astype(np.float64)
        x = x.reshape(-1, 1) if x.ndim == 1 else x  # Caffe: a 1-axis blob is one channel
        axes = tuple(a for a in range(x.ndim) if a != 1)
        mean = x.mean(axis=axes) * rng.uniform(0.8, 1.25, x.shape[1])
        var = x.var(axis=axes) * rng.uniform(0.8, 1.25, x.shape[1])
        factor = rng.uniform(0.5, 2.0)
        for blob, value in zip(layer.blobs, (mean * factor, var * factor, [factor])):
            blob.data[...] = layer.backend.asarray(np.asarray(value, dtype=net.dtype))


def _fan_in(layer_type: str, shape: Sequence[int]) -> int:
    """Inputs per output of a weight blob (Deconvolution's stores input channels first)."""
    if layer_type == "Deconvolution":
        return shape[0] * math.prod(shape[2:])
    if layer_type == "Embed":
        return 1
    return math.prod(shape[1:])


@dataclass
class Comparison:
    """One batch size's outcome: the largest |ONNX − netforge| over all outputs, relative
    to the largest |netforge output| (floored at 1), and the seconds per image each took."""

    batch: int
    max_diff: float
    max_output: float
    onnx_seconds: float
    netforge_seconds: float

    @property
    def relative(self) -> float:
        """max_diff / max(1, max_output): the figure held to 1e-4."""
        return self.max_diff / max(1.0, self.max_output)


def session(model: Any, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for ``model`` (a ModelProto or a path)."""
    try:
        import onnxruntime
    except ImportError as exc:
        raise ConfigError("running ONNX models needs onnxruntime: pip install onnxruntime") from exc
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source = model if isinstance(model, str) else model.SerializeToString()
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def compare(
    net: Any,
    model: Any,
    batches: Sequence[int] = (1,),
    inputs: Callable[[str, tuple[int, ...]], np.ndarray] | None = None,
    repeats: int = 0,
    threads: int | None = None,
    seed: int = 0,
) -> list[Comparison]:
    """Run ``model`` in ONNX Runtime and ``net`` on the same inputs at each batch size.

    ``inputs(name, shape)`` makes an input (default: standard normal). ``repeats`` > 0 also
    times both (the best of that many runs after one warm-up) and reports seconds per image.
    The net's inputs are reshaped to each batch size.
    """
    sess = session(model, threads)
    rng = np.random.default_rng(seed)
    make = inputs or (lambda name, shape: rng.standard_normal(shape).astype(np.float32))
    outputs = [o.name for o in sess.get_outputs()]
    results = []
    for batch in batches:
        feed = {}
        for name in net.inputs:
            shape = (batch, *net.blobs[name].shape[1:])
            net.blobs[name].reshape(shape)
            feed[name] = make(name, shape)
        net.reshape()
        for name, value in feed.items():
            net.blobs[name].data[...] = net.backend.asarray(value)
        net.forward()
        expected = {name: to_numpy(net.blobs[name].data).copy() for name in outputs}
        got = dict(zip(outputs, sess.run(outputs, feed)))
        if any(got[n].shape != expected[n].shape for n in outputs):
            diff = math.inf
        else:
            diff = max(float(np.max(np.abs(got[n] - expected[n]), initial=0)) for n in outputs)
        peak = max(float(np.max(np.abs(expected[n]), initial=0)) for n in outputs)
        onnx_time = net_time = math.nan
        if repeats:
            onnx_time = _best(lambda feed=feed: sess.run(outputs, feed), repeats) / batch
            net_time = _best(net.forward, repeats) / batch
        results.append(Comparison(batch, diff, peak, onnx_time, net_time))
    return results


def _best(run: Callable[[], Any], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after one warm-up call, in seconds."""
    run()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
