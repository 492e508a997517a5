"""Options shared by several commands, defined once."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import click

if TYPE_CHECKING:
    from netforge.backend import Backend

log = logging.getLogger("netforge")

#: A prototxt is data; its Python layers are code it names. The CLI runs them only when asked
#: (this flag, or NETFORGE_ALLOW_PYTHON_LAYERS=1), because prototxts travel between people.
allow_python_layers = click.option(
    "--allow-python-layers",
    is_flag=True,
    envvar="NETFORGE_ALLOW_PYTHON_LAYERS",
    help='Run the prototxt\'s type: "Python" layers (code it names); off for safety '
    "(also NETFORGE_ALLOW_PYTHON_LAYERS=1).",
)

#: ``caffe test`` and ``caffe time``'s -gpu: one device scores or times the net.
one_gpu = click.option(
    "--gpu",
    default=None,
    help="GPU id (the first of a comma list or of 'all'); CPU if absent or -1.",
)


def one_gpu_backend(gpu: str | None) -> Backend:
    """The backend for a ``one_gpu`` value, logged as Caffe does: the first id of a comma
    list, or of 'all' (Caffe takes gpus[0]); absent or -1 (train's CPU spelling) is the CPU."""
    from netforge import backend as backends

    if gpu in (None, "", "-1"):
        log.info("Use CPU.")
        return backends.CPU
    device = 0 if gpu == "all" else backends.parse_gpu_ids(gpu)[0]  # 'all' asks no cupy here
    log.info("Use GPU with device ID %d", device)
    return backends.gpu(device)
