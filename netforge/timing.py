"""Caffe's ``caffe time``: per-layer forward and backward timings of a built net.

One warm-up forward and backward, then ``iterations`` passes in which every layer's
``forward`` and ``backward`` is timed on its own; the averages are logged in Caffe's lines
through the ``netforge`` logger and returned. ``netforge time`` is the command around it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from netforge.errors import ConfigError
from netforge.train_log import fmt

if TYPE_CHECKING:
    from netforge.net import Net

LOG = logging.getLogger("netforge")


@dataclass
class Timings:
    """What ``time_net`` measured, in milliseconds: per layer averages over the iterations,
    each iteration's forward+backward time, and the totals Caffe prints."""

    layer_names: list[str]
    forward_ms: list[float]
    backward_ms: list[float]
    iteration_ms: list[float]
    forward_total_ms: float
    backward_total_ms: float
    total_ms: float

    @property
    def iterations(self) -> int:
        return len(self.iteration_ms)


def _synchronizer(net: Net) -> Callable[[], None]:
    """Waits for queued GPU work, so a layer's time is its kernels' time (Caffe's cudaEvent
    timer); a no-op on the CPU."""
    backend = net.backend
    if not backend.is_gpu:
        return lambda: None
    device = backend.xp.cuda.Device(backend.device_id)
    return device.synchronize


def time_net(net: Net, iterations: int = 50, log: logging.Logger = LOG) -> Timings:
    """Caffe's ``caffe time`` on a built net: a warm-up ``forward_backward`` (its loss is
    logged as the initial loss), then ``iterations`` passes timing each layer's forward (with
    its reshape, as Caffe's ``Layer::Forward`` does) and backward separately.

    Differs from Caffe in one respect: layers that the net skips in backward (they feed no
    loss) are skipped here too, so the backward figures are what training pays.
    """
    if iterations <= 0:
        raise ConfigError(f"--iterations must be positive, got {iterations}")
    sync = _synchronizer(net)
    count = len(net.layers)
    log.info("Performing Forward")
    initial_loss = net.forward_loss()
    log.info("Initial loss: %s", fmt(initial_loss))
    log.info("Performing Backward")
    net.backward_from_to()
    sync()
    log.info("*** Benchmark begins ***")
    log.info("Testing for %d iterations.", iterations)
    forward_ms = [0.0] * count
    backward_ms = [0.0] * count
    iteration_ms = []
    forward_total = backward_total = 0.0
    clock = time.perf_counter
    total_start = clock()
    for j in range(iterations):
        iteration_start = clock()
        for i in range(count):
            start = clock()
            net.forward_from_to(i, i)
            sync()
            forward_ms[i] += (clock() - start) * 1e3
        backward_start = clock()
        forward_total += (backward_start - iteration_start) * 1e3
        for i in reversed(range(count)):
            start = clock()
            net.backward_from_to(i, i)
            sync()
            backward_ms[i] += (clock() - start) * 1e3
        end = clock()
        backward_total += (end - backward_start) * 1e3
        iteration_ms.append((end - iteration_start) * 1e3)
        log.info("Iteration: %d forward-backward time: %s ms.", j + 1, fmt(iteration_ms[-1]))
    total = (clock() - total_start) * 1e3
    timings = Timings(
        layer_names=list(net.layer_names),
        forward_ms=[t / iterations for t in forward_ms],
        backward_ms=[t / iterations for t in backward_ms],
        iteration_ms=iteration_ms,
        forward_total_ms=forward_total,
        backward_total_ms=backward_total,
        total_ms=total,
    )
    log.info("Average time per layer: ")
    for name, fwd, bwd in zip(timings.layer_names, timings.forward_ms, timings.backward_ms):
        # Caffe right-aligns layer names in 10 columns (std::setw(10)).
        log.info("%10s\tforward: %s ms.", name, fmt(fwd))
        log.info("%10s\tbackward: %s ms.", name, fmt(bwd))
    log.info("Average Forward pass: %s ms.", fmt(forward_total / iterations))
    log.info("Average Backward pass: %s ms.", fmt(backward_total / iterations))
    log.info("Average Forward-Backward: %s ms.", fmt(total / iterations))
    log.info("Total Time: %s ms.", fmt(total))
    log.info("*** Benchmark ends ***")
    return timings
