"""``netforge time``: Caffe's ``caffe time``, per-layer forward and backward timings.

The measurement is ``time_net`` (usable from Python); the click command builds the net, maps
flags as Caffe's ``tools/caffe.cpp`` does and prints Caffe's lines through the ``netforge``
logger. Like Caffe, it runs one warm-up forward and backward, then ``--iterations`` passes in
which every layer's ``forward`` and ``backward`` is timed on its own, and reports the averages.

Where Caffe would abort because a data layer's source is missing, ``--data-shape C,H,W`` times
the net with each data layer replaced by a DummyData layer giving the same tops: ``data`` of
shape (batch_size, C, H, W) and, when the layer has a second top, labels of shape
(batch_size,). The output says which layers were replaced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import click

from netforge.cli.options import allow_python_layers
from netforge.errors import ConfigError, DataError
from netforge.graph import replace_data_layers
from netforge.proto import pb
from netforge.train_log import fmt

if TYPE_CHECKING:
    from netforge.net import Net

LOG = logging.getLogger("netforge")

#: Caffe's data layers and the parameter message that holds their batch size.


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


def _parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d <= 0 for d in dims):
        raise ConfigError(f"--data-shape takes positive integers like 3,227,227, got {text!r}")
    return dims


@click.command("time")
@click.option("--model", required=True, help="Net prototxt to time.")
@click.option("--iterations", default=50, show_default=True, help="Timed iterations.")
@click.option("--gpu", default=None, help="GPU id (the first of a comma list); CPU if absent.")
@click.option(
    "--phase",
    type=click.Choice(["TRAIN", "TEST"]),
    default="TRAIN",
    show_default=True,
    help="Net phase.",
)
@click.option("--stage", default=None, help="Comma-separated NetState stages.")
@click.option("--level", default=0, show_default=True, help="NetState level.")
@click.option(
    "--data-shape",
    default=None,
    metavar="C,H,W",
    help="If a data layer's source cannot be opened, time on constant data of this "
    "per-item shape instead (DummyData with the layer's batch size).",
)
@allow_python_layers
def time_command(
    model: str,
    iterations: int,
    gpu: str | None,
    phase: str,
    stage: str | None,
    level: int,
    data_shape: str | None,
    allow_python_layers: bool,
) -> None:
    """Benchmark a net's layers: Caffe's ``caffe time``."""
    from netforge import backend as backends
    from netforge.net import Net
    from netforge.prototxt import read_net
    from netforge.train_log import setup_logging

    setup_logging()
    shape = _parse_shape(data_shape)
    if gpu is not None:
        device = int(gpu.split(",")[0])
        backend = backends.gpu(device)
        LOG.info("Use GPU with device ID %d", device)
    else:
        backend = backends.CPU
        LOG.info("Use CPU.")
    options = dict(
        phase=pb.TRAIN if phase == "TRAIN" else pb.TEST,
        # Caffe's quirk of one empty stage for an empty --stage flag changes nothing here:
        # no include rule names the empty stage.
        stages=tuple(stage.split(",")) if stage else (),
        level=level,
        backend=backend,
        allow_python_layers=allow_python_layers,
    )
    param = read_net(model)
    try:
        net = Net(param, **options)
    except DataError as exc:
        if shape is None:
            raise DataError(
                f"{model}: {exc}; create the data first, or pass --data-shape C,H,W to time "
                "the net on constant data of that shape"
            ) from exc
        param, replaced = replace_data_layers(param, shape, kind="DummyData")
        LOG.warning(
            "%s: a data source cannot be opened (%s); timing on DummyData in place of the "
            "data layers %s, data shape (batch, %s)",
            model,
            exc,
            ", ".join(replaced),
            ", ".join(map(str, shape)),
        )
        net = Net(param, **options)
    time_net(net, iterations)
