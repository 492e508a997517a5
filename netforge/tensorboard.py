"""``netforge train --tensorboard DIR``: the metrics file's scalars as TensorBoard events.

The events are written by tensorboardX (the optional extra ``netforge[tensorboard]``), not
by hand. ``TensorBoardWriter`` has the interface of ``netforge.train_log.MetricsWriter``
(``train``, ``test``, ``close``) and logs the same values under these tags, at the record's
iteration:

- ``train/loss`` (the smoothed loss Caffe displays), ``train/lr``, ``train/data_wait`` and
  ``train/output/<output>`` for each train net output (its own folder: an output is often
  named ``loss`` too);
- ``test<i>/<output>`` for each output of test net ``i`` and, with ``test_compute_loss``,
  ``test<i>/total_loss``.

A blob of several elements gives one tag per element, ``<output>/<k>``. ``Tee`` hands each
record to several writers (the metrics file and TensorBoard).
"""

from __future__ import annotations

import os
from typing import Any

from netforge.errors import ConfigError, DataError
from netforge.train_log import WaitShare

INSTALL_HINT = "pip install 'netforge[tensorboard]' (tensorboardX)"


def _scalars(prefix: str, outputs: dict[str, Any]) -> list[tuple[str, float]]:
    tags = []
    for name, value in outputs.items():
        if isinstance(value, list):
            tags.extend((f"{prefix}/{name}/{k}", float(v)) for k, v in enumerate(value))
        else:
            tags.append((f"{prefix}/{name}", float(value)))
    return tags


class TensorBoardWriter:
    """TensorBoard event files in ``logdir`` with the metrics' scalars."""

    def __init__(self, logdir: str | os.PathLike) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise ConfigError(f"--tensorboard needs tensorboardX: {INSTALL_HINT}") from None
        self.logdir = os.fspath(logdir)
        try:
            self._writer = SummaryWriter(logdir=self.logdir)
        except OSError as exc:  # the folder is a file, or cannot be created
            raise DataError(
                f"{self.logdir}: cannot write TensorBoard events there: {exc.strerror or exc}; "
                "give --tensorboard a folder netforge can create or write to"
            ) from None
        self._wait_share = WaitShare()

    def train(
        self, iteration: int, loss: float, lr: float, outputs: dict[str, Any], wait: float
    ) -> None:
        """A display iteration's scalars (``wait``: the data layers' total waiting seconds,
        shown as the share of wall time since the previous record, as the metrics file)."""
        scalars = [("train/loss", float(loss)), ("train/lr", float(lr))]
        scalars.append(("train/data_wait", self._wait_share(wait)))
        for tag, value in scalars + _scalars("train/output", outputs):
            self._writer.add_scalar(tag, value, iteration)
        self._writer.flush()

    def test(
        self, iteration: int, net_id: int, outputs: dict[str, Any], loss: float | None
    ) -> None:
        """The mean outputs of one pass of test net ``net_id``."""
        scalars = _scalars(f"test{net_id}", outputs)
        if loss is not None:
            scalars.append((f"test{net_id}/total_loss", float(loss)))
        for tag, value in scalars:
            self._writer.add_scalar(tag, value, iteration)
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self._writer.close()


class Tee:
    """Hands every metrics record to each of ``writers``."""

    def __init__(self, *writers: Any) -> None:
        self.writers = writers

    def train(self, *args: Any) -> None:
        """Record a display iteration in every writer."""
        for writer in self.writers:
            writer.train(*args)

    def test(self, *args: Any) -> None:
        """Record a test pass in every writer."""
        for writer in self.writers:
            writer.test(*args)

    def close(self) -> None:
        """Close every writer."""
        for writer in self.writers:
            writer.close()
