"""Training logs read back: Caffe's ``tools/extra/parse_log.py`` and ``extract_seconds.py``.

``read_training_log(path)`` gives the train and test tables of a run, each a list of rows
(dicts with the columns ``NumIters``, ``Seconds``, ``LearningRate``, then one column per net
output), from either log kind:

- a Caffe-format (glog) log, netforge's or Caffe's: parsed with parse_log.py's regexes and
  row rules (a row is closed when it has as many columns as the first row; the first row's
  missing learning rate is copied from the second), seconds counted from the ``Solving``
  line with extract_seconds.py's date arithmetic (the year from the file's ctime, rolled
  forward when the month goes back);
- netforge's JSON-lines metrics file (``train --metrics``): one train row per display
  record, with its own learning rate (where the log's row has the rate printed before it),
  and one test row per pass of test net 0 (the rows a log with one test net gives); seconds
  from the records' ``elapsed``.

``write_csv`` writes a table as parse_log.py does (``csv.excel`` with the given delimiter).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from netforge.atomic import atomic_write
from netforge.errors import ConfigError, DataError

Row = dict[str, Any]

_ITERATION = re.compile(r"Iteration (\d+)")
_TRAIN_OUTPUT = re.compile(r"Train net output #(\d+): (\S+) = ([\.\deE+-]+)")
_TEST_OUTPUT = re.compile(r"Test net output #(\d+): (\S+) = ([\.\deE+-]+)")
_LEARNING_RATE = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")
_GLOG_STAMP = re.compile(r"[IWEF](\d\d)(\d\d) (\d+):(\d+):(\d+)\.(\d+)")


class _Clock:
    """extract_seconds.py: glog stamps carry no year, so it comes from the file's ctime and
    moves forward whenever the month goes back (a run across New Year)."""

    def __init__(self, year: int) -> None:
        self.year = year
        self.month = 0

    def stamp(self, line: str) -> datetime | None:
        """The time of a glog line (None for a line without a glog stamp)."""
        match = _GLOG_STAMP.match(line.strip())
        if match is None:
            return None
        month, day, hour, minute, second, micro = (int(g) for g in match.groups())
        if month < self.month:
            self.year += 1
        self.month = month
        return datetime(self.year, month, day, hour, minute, second, micro)


def _net_output(pattern: re.Pattern, row: Row | None, rows: list[Row], line: str, now: Row):
    """parse_log.py's parse_line_for_net_output: returns the row being filled (or None)."""
    match = pattern.search(line)
    if match:
        if row is None or row["NumIters"] != now["NumIters"]:
            if row is not None:
                rows.append(row)
            row = dict(now)
        row[match.group(2)] = float(match.group(3))
    if row is not None and rows and len(row) == len(rows[0]):
        rows.append(row)
        row = None
    return row


def _fix_initial_learning_rate(rows: list[Row]) -> None:
    if len(rows) > 1:
        rows[0]["LearningRate"] = rows[1]["LearningRate"]


def parse_caffe_log(path: str | os.PathLike) -> tuple[list[Row], list[Row]]:
    """The (train, test) tables of a Caffe-format log, as parse_log.py builds them."""
    path = Path(path)
    clock = _Clock(datetime.fromtimestamp(os.path.getctime(path)).year)
    with _open(path) as lines:
        start = None
        for line in lines:
            if "Solving" in line:
                start = clock.stamp(line)
                break
        if start is None:
            raise DataError(
                f"{path}: no 'Solving' line with a glog time stamp: not a Caffe or netforge "
                "training log (the seconds are counted from that line)"
            )
        iteration, learning_rate, seconds = -1.0, math.nan, 0.0
        train: list[Row] = []
        test: list[Row] = []
        train_row = test_row = None
        for line in lines:
            if match := _ITERATION.search(line):
                iteration = float(match.group(1))
            if iteration == -1:
                continue
            if (when := clock.stamp(line)) is not None:
                seconds = (when - start).total_seconds()
            if match := _LEARNING_RATE.search(line):
                learning_rate = float(match.group(1))
            now = {"NumIters": iteration, "Seconds": seconds, "LearningRate": learning_rate}
            train_row = _net_output(_TRAIN_OUTPUT, train_row, train, line, now)
            test_row = _net_output(_TEST_OUTPUT, test_row, test, line, now)
    _fix_initial_learning_rate(train)
    _fix_initial_learning_rate(test)
    return train, test


def _open(path: Path):
    try:
        return path.open(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise DataError(f"{path}: cannot read the log: {exc.strerror}") from None


def _columns(outputs: dict[str, Any]) -> dict[str, float]:
    """A record's outputs as columns; a blob of several elements gives one per element
    (``name[k]``), where Caffe's log gives repeated names that parse_log.py folds into one."""
    columns = {}
    for name, value in outputs.items():
        if isinstance(value, list):
            columns.update({f"{name}[{k}]": float(v) for k, v in enumerate(value)})
        else:
            columns[name] = float(value)
    return columns


def parse_metrics(path: str | os.PathLike) -> tuple[list[Row], list[Row]]:
    """The (train, test) tables of a netforge JSON-lines metrics file."""
    path = Path(path)
    train: list[Row] = []
    test: list[Row] = []
    learning_rate = math.nan
    with _open(path) as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                iteration = float(record["iteration"])
                seconds = float(record["elapsed"])
                outputs = _columns(record.get("outputs", {}))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                if not line.endswith("\n"):
                    break  # the last line, cut short by a run killed while writing it
                raise DataError(
                    f"{path}:{number}: not a netforge metrics record ({exc}); expected a JSON "
                    "object with iteration, elapsed and outputs"
                ) from None
            if "test_net" in record:
                if record["test_net"] == 0:
                    row = {"NumIters": iteration, "Seconds": seconds}
                    test.append({**row, "LearningRate": learning_rate, **outputs})
            else:
                learning_rate = float(record.get("lr", math.nan))
                row = {"NumIters": iteration, "Seconds": seconds, "LearningRate": learning_rate}
                train.append({**row, **outputs})
    # Train records carry their own rate; a test pass before the first display has none.
    if test and math.isnan(test[0]["LearningRate"]):
        _fix_initial_learning_rate(test)
    return train, test


def is_metrics_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a JSON-lines metrics file (its first non-blank line is a JSON
    object) rather than a glog-format log."""
    with _open(Path(path)) as lines:
        for line in lines:
            if line.strip():
                return line.lstrip().startswith("{")
    return False


def read_training_log(path: str | os.PathLike) -> tuple[list[Row], list[Row]]:
    """The (train, test) tables of a Caffe-format log or a netforge metrics file."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such log file")
    return parse_metrics(path) if is_metrics_file(path) else parse_caffe_log(path)


def write_csv(rows: list[Row], path: str | os.PathLike, delimiter: str = ",") -> bool:
    """Write ``rows`` as parse_log.py's ``write_csv`` does (a header from the first row's
    columns, ``csv.excel``), replacing the file whole or not at all; returns False and writes
    nothing when there are no rows."""
    if not rows:
        return False
    if len(delimiter) != 1:
        raise ConfigError(f"the CSV delimiter must be one character, got {delimiter!r}")
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), dialect=csv.excel, delimiter=delimiter)
    writer.writeheader()
    writer.writerows(rows)
    try:
        with atomic_write(path, "wb") as handle:
            handle.write(text.getvalue().encode("utf-8"))
    except OSError as exc:
        raise DataError(f"{path}: cannot write the table: {exc.strerror or exc}") from None
    return True


def save_csv_files(
    log_path: str | os.PathLike, output_dir: str | os.PathLike, delimiter: str = ","
) -> list[tuple[Path, int]]:
    """parse_log.py's command: ``<log name>.train`` and ``<log name>.test`` in
    ``output_dir``. Returns each file written with its number of rows (an empty table
    writes no file)."""
    train, test = read_training_log(log_path)
    written = []
    for suffix, rows in (("train", train), ("test", test)):
        target = Path(output_dir) / f"{Path(log_path).name}.{suffix}"
        if write_csv(rows, target, delimiter):
            written.append((target, len(rows)))
    return written
