"""Training charts: Caffe's ``tools/extra/plot_training_log.py.example``, with matplotlib.

Chart types are numbered as that script numbers them (its fields sorted, each quantity
against each x axis)::

    0: Test accuracy  vs. Iters        4: Train learning rate  vs. Iters
    1: Test accuracy  vs. Seconds      5: Train learning rate  vs. Seconds
    2: Test loss  vs. Iters            6: Train loss  vs. Iters
    3: Test loss  vs. Seconds          7: Train loss  vs. Seconds

Each log (a Caffe-format log or a netforge metrics file, ``netforge.logs``) is one line,
labelled with its file name less a ``.log`` suffix; the legend sits lower right for accuracy
and upper right for loss and learning rate, as in Caffe's script. Where that script draws
random colours and markers, lines here take matplotlib's colour cycle and a fixed marker
sequence, so the same logs give the same picture. The accuracy and loss columns are the
outputs named ``accuracy`` and ``loss``, else the first whose name contains the word, else
output #0 and #1 as Caffe's ``parse_log.sh`` assumes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from netforge.atomic import atomic_write
from netforge.errors import ConfigError, DataError
from netforge.logs import Row, read_training_log

#: (quantity, x axis) of each chart type, in Caffe's numbering
CHART_TYPES = [
    (quantity, x_axis)
    for quantity in ("Test accuracy", "Test loss", "Train learning rate", "Train loss")
    for x_axis in ("Iters", "Seconds")
]
INSTALL_HINT = "pip install 'netforge[plot]' (matplotlib)"
_X_COLUMNS = {"Iters": "NumIters", "Seconds": "Seconds"}
_MARKERS = "os^vD<>ph*"
_FIXED = ("NumIters", "Seconds", "LearningRate")


def describe(chart_type: int) -> str:
    """The chart's title as Caffe's script writes it (``Test accuracy  vs. Iters``)."""
    quantity, x_axis = CHART_TYPES[chart_type]
    return f"{quantity}  vs. {x_axis}"


def _output_column(rows: list[Row], word: str, position: int, where: str) -> str:
    outputs = [name for name in rows[0] if name not in _FIXED]
    if word in outputs:
        return word
    for name in outputs:
        if word in name:
            return name
    if position < len(outputs):
        return outputs[position]
    raise DataError(f"{where}: no {word} output to plot (outputs: {', '.join(outputs)})")


def chart_data(chart_type: int, log_path: str | os.PathLike) -> tuple[list[float], list[float]]:
    """The (x, y) points of chart ``chart_type`` for one log."""
    if not 0 <= chart_type < len(CHART_TYPES):
        raise ConfigError(
            f"chart type {chart_type} is not one of 0-{len(CHART_TYPES) - 1}: "
            + "; ".join(f"{i}: {describe(i)}" for i in range(len(CHART_TYPES)))
        )
    quantity, x_axis = CHART_TYPES[chart_type]
    train, test = read_training_log(log_path)
    rows = test if quantity.startswith("Test") else train
    if not rows:
        kind = "test" if rows is test else "train"
        raise DataError(f"{log_path}: no {kind} outputs in this log to plot {describe(chart_type)}")
    if quantity == "Train learning rate":
        column = "LearningRate"
    elif quantity == "Test accuracy":
        column = _output_column(rows, "accuracy", 0, str(log_path))
    else:
        column = _output_column(rows, "loss", 1 if rows is test else 0, str(log_path))
    points = [(row[_X_COLUMNS[x_axis]], row[column]) for row in rows if column in row]
    return [x for x, _ in points], [y for _, y in points]


def plot_chart(
    chart_type: int, output: str | os.PathLike, log_paths: Sequence[str | os.PathLike]
) -> None:
    """Draw chart ``chart_type`` of every log in ``log_paths`` into ``output``; the image
    format follows the file's extension (PNG, SVG, or any other matplotlib writes)."""
    data = [chart_data(chart_type, path) for path in log_paths]
    try:
        # A bare Figure, not pyplot: it writes files only, never opens a window (Caffe's
        # script did) and leaves the caller's matplotlib backend alone.
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(f"netforge plot needs matplotlib: {INSTALL_HINT}") from None
    suffix = Path(output).suffix.lstrip(".").lower()
    figure = Figure()
    if suffix not in figure.canvas.get_supported_filetypes():
        raise ConfigError(
            f"{output}: cannot write a .{suffix} image; use .png or .svg (or another of "
            f"{', '.join(sorted(figure.canvas.get_supported_filetypes()))})"
        )
    axes = figure.add_subplot()
    for k, (path, (x, y)) in enumerate(zip(log_paths, data)):
        name = Path(path).name
        label = name[: -len(".log")] if name.endswith(".log") else name
        axes.plot(x, y, label=label, marker=_MARKERS[k % len(_MARKERS)], linewidth=0.75)
    quantity, x_axis = CHART_TYPES[chart_type]
    right = "lower right" if "accuracy" in quantity else "upper right"
    axes.legend(loc=right, ncol=1)
    axes.set_title(describe(chart_type))
    axes.set_xlabel(x_axis)
    axes.set_ylabel(quantity)
    try:
        with atomic_write(output, "wb") as handle:  # an old chart stays whole on failure
            figure.savefig(handle, format=suffix)
    except OSError as exc:
        raise DataError(f"{output}: cannot write the chart: {exc.strerror or exc}") from None
