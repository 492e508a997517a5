"""Training logs: Caffe's glog-style lines, a JSON-lines metrics file, a progress line.

The solver logs through ``logging.getLogger("netforge")`` with Caffe's message texts
(inventory §5.8); ``GlogFormatter`` adds glog's prefix
(``I0517 09:41:07.123456 31337 solver.py:243] ...``) so that Caffe's
``tools/extra/parse_log.py`` and ``extract_seconds.py`` read netforge logs unchanged.
Numbers are printed as C++ streams print a float: 6 significant digits (``fmt``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from datetime import datetime
from typing import IO, Any

from netforge.errors import DataError

LOGGER_NAME = "netforge"
_SEVERITY = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E"}


def fmt(value: float) -> str:
    """A number as C++'s default ``ostream << float`` writes it (``%g``, 6 digits)."""
    return f"{float(value):.6g}"


def output_lines(kind: str, entries: list[tuple[str, float, float]]) -> list[str]:
    """Caffe's per-element output lines: ``    <kind> net output #k: <blob> = <v>`` plus
    `` (* w = w·v loss)`` for blobs with a loss weight. ``entries``: (blob, value, weight)."""
    lines = []
    for k, (name, value, weight) in enumerate(entries):
        suffix = f" (* {fmt(weight)} = {fmt(weight * value)} loss)" if weight else ""
        lines.append(f"    {kind} net output #{k}: {name} = {fmt(value)}{suffix}")
    return lines


class GlogFormatter(logging.Formatter):
    """glog's line layout: severity letter, MMDD, time with microseconds, thread id,
    ``file:line]``, then the message."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created)
        letter = _SEVERITY.get(record.levelno, "F" if record.levelno > logging.ERROR else "I")
        message = record.getMessage()
        if record.exc_info:
            message = f"{message}\n{self.formatException(record.exc_info)}"
        return (
            f"{letter}{stamp:%m%d %H:%M:%S.%f} {record.thread_native_id:5d} "
            f"{record.filename}:{record.lineno}] {message}"
        )


class _NativeThreadId(logging.Filter):
    """glog prints the OS thread id; LogRecord only has Python's, so add the native one."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.thread_native_id = threading.get_native_id()
        return True


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted, so a handler installed
    by one command keeps working after the caller swaps stderr (test captures, notebooks)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        """The stream is always the current sys.stderr."""


def setup_logging(stream: IO[str] | None = None, log_file: str | None = None) -> logging.Logger:
    """Send the ``netforge`` logger's INFO lines to ``stream`` (stderr, as Caffe forces) and
    optionally to ``log_file``, in glog format. Returns the logger. Calling it again
    replaces the handlers it installed before."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in [h for h in logger.handlers if getattr(h, "_netforge_glog", False)]:
        logger.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [
        logging.StreamHandler(stream) if stream is not None else _CurrentStderrHandler()
    ]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(GlogFormatter())
        handler.addFilter(_NativeThreadId())
        handler._netforge_glog = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class WaitShare:
    """The share of wall time the data layers spent waiting for input since the previous
    call, from their running total of waiting seconds (clamped to [0, 1])."""

    def __init__(self) -> None:
        self._last_time, self._last_wait = time.perf_counter(), 0.0

    def __call__(self, wait: float) -> float:
        now = time.perf_counter()
        span = now - self._last_time
        share = (wait - self._last_wait) / span if span > 0 else 0.0
        self._last_time, self._last_wait = now, wait
        return min(max(share, 0.0), 1.0)


class MetricsWriter:
    """One JSON object per line, appended and flushed as training goes.

    Train records (at display iterations): ``{"iteration", "loss", "lr", "elapsed",
    "data_wait", "outputs"}``; test records (after each test pass): ``{"iteration",
    "test_net", "elapsed", "outputs", "loss"?}``. ``elapsed`` is seconds since the writer was
    made; ``data_wait`` is the share of the time since the previous train record that the
    data layers spent waiting for input.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            self._handle = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open)
        except OSError as exc:
            raise DataError(
                f"{self.path}: cannot write the metrics: {exc.strerror}; give --metrics a file "
                "in a folder that exists"
            ) from None
        self._start = time.perf_counter()
        self._wait_share = WaitShare()

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def train(
        self, iteration: int, loss: float, lr: float, outputs: dict[str, Any], wait: float
    ) -> None:
        """Record a display iteration; ``wait`` is the data layers' total waiting seconds."""
        share = self._wait_share(wait)
        self._write(
            {
                "iteration": iteration,
                "loss": float(loss),
                "lr": float(lr),
                "elapsed": round(self.elapsed(), 6),
                "data_wait": round(share, 6),
                "outputs": outputs,
            }
        )

    def test(self, iteration: int, net_id: int, outputs: dict[str, Any], loss: float | None):
        """Record the mean outputs of one test pass (and its loss with test_compute_loss)."""
        record = {
            "iteration": iteration,
            "test_net": net_id,
            "elapsed": round(self.elapsed(), 6),
            "outputs": outputs,
        }
        if loss is not None:
            record["loss"] = float(loss)
        self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, allow_nan=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class ProgressLine:
    """A single self-overwriting status line for interactive terminals:
    ``iteration i/N  x.x it/s  ETA h:mm:ss``, redrawn at most every ``interval`` seconds."""

    def __init__(self, stream: IO[str], interval: float = 0.5) -> None:
        self.stream = stream
        self.interval = interval
        self._start: float | None = None
        self._start_iter = 0
        self._drawn = 0.0

    def update(self, iteration: int, total: int) -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start, self._start_iter = now, iteration
            return
        if now - self._drawn < self.interval:
            return
        self._drawn = now
        done = iteration - self._start_iter
        rate = done / (now - self._start) if now > self._start else 0.0
        left = (total - iteration) / rate if rate > 0 else float("inf")
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if left != float("inf") else "--"
        self.stream.write(f"\riteration {iteration}/{total}  {rate:.1f} it/s  ETA {eta}\x1b[K")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the line (before a log line is printed, and at the end)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = 0.0

    def attach(self, logger: logging.Logger) -> None:
        """Erase the line before each record ``logger``'s handlers print, so log lines and
        the progress line never share a terminal row."""

        def clear_first(record: logging.LogRecord) -> bool:
            self.clear()
            return True

        for handler in logger.handlers:
            handler.addFilter(clear_first)
