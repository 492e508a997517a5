"""``netforge time``: Caffe's ``caffe time``, per-layer forward and backward timings.

The measurement is ``netforge.timing.time_net``; this command builds the net and maps flags as
Caffe's ``tools/caffe.cpp`` does.

Where Caffe would abort because a data layer's source is missing, ``--data-shape C,H,W`` times
the net with each data layer replaced by a DummyData layer giving the same tops: ``data`` of
shape (batch_size, C, H, W) and, when the layer has a second top, labels of shape
(batch_size,). The output says which layers were replaced.
"""

from __future__ import annotations

import logging

import click

from netforge.cli.options import allow_python_layers, one_gpu, one_gpu_backend
from netforge.errors import ConfigError, DataError
from netforge.graph import replace_data_layers
from netforge.proto import pb
from netforge.timing import time_net

LOG = logging.getLogger("netforge")


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
@one_gpu
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
    from netforge.net import Net
    from netforge.prototxt import read_net
    from netforge.train_log import setup_logging

    setup_logging()
    shape = _parse_shape(data_shape)
    backend = one_gpu_backend(gpu)
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
