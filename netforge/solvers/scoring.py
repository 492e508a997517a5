"""Scoring a net: Caffe's test pass (Solver::Test, ``caffe test``) over several batches.

Every element of every output blob is summed over the batches and divided by their number,
so "accuracy" is the mean of per-batch accuracies, as in Caffe. Sums stay on the device and
reach the host once, at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from netforge.backend import to_numpy


@dataclass
class Score:
    """Mean outputs of a pass: ``entries`` has (blob, mean value, loss weight) per element,
    in Caffe's order (output blobs in net order, elements in memory order)."""

    loss: float
    entries: list[tuple[str, float, float]]

    def as_dict(self) -> dict[str, float | list[float]]:
        """Blob name -> mean value (a list for blobs with more than one element)."""
        return group_entries(self.entries)


def group_entries(entries: list[tuple[str, float, float]]) -> dict[str, float | list[float]]:
    """Per-element (blob, value, weight) entries as blob name -> value or list of values."""
    grouped: dict[str, list[float]] = {}
    for name, value, _ in entries:
        grouped.setdefault(name, []).append(value)
    return {name: v[0] if len(v) == 1 else v for name, v in grouped.items()}


def score(
    net: Any,
    iterations: int,
    *,
    on_batch: Callable[[int, dict[str, Any]], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> Score | None:
    """Run ``iterations`` forward passes and average the outputs and the loss.

    ``on_batch(i, outputs)`` sees each batch's output arrays (``caffe test`` logs them);
    ``should_stop()`` is asked before each batch and ends the pass early, returning None.
    """
    sums: dict[str, Any] = {}
    loss = 0.0
    for i in range(iterations):
        if should_stop is not None and should_stop():
            return None
        loss += net.forward_loss()
        outputs = {name: net.blobs[name].data for name in net.outputs}
        if on_batch is not None:
            on_batch(i, outputs)
        for name, value in outputs.items():
            if name in sums:
                sums[name] += value
            else:
                sums[name] = value.astype(np.float64, copy=True)
    weights = net.loss_weights
    entries = []
    for name, total in sums.items():
        means = to_numpy(total).ravel() / iterations
        entries.extend((name, float(v), weights.get(name, 0.0)) for v in means)
    return Score(float(loss) / max(iterations, 1), entries)
