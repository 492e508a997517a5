"""List files: one image per line, followed by its label or its targets.

The format extends Caffe's (``<path> <int label>``, split at the last space, so paths may
contain spaces) to several targets per image::

    cats/001.jpg 3                 one int label  -> Datum.label, a (N,) label top
    scenes/17.png 0 1 1 0          several numbers -> Datum.targets (multi-label)
    faces/a b.jpg 0.25 -1.5        floats          -> Datum.targets (regression)
    faces/c.jpg 0.5                one float       -> Datum.targets (one regression target)

The numbers are the longest run of whitespace-separated numeric tokens at the end of the
line that leaves a non-empty path; a single integer is Caffe's label, anything else goes
to ``targets`` as floats. Every line of a file must give the same kind and number of
values. Empty lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from netforge.errors import DataError
from netforge.reading import read_text


@dataclass(frozen=True)
class Entry:
    """One list line: the image path, Caffe's int label and netforge's float targets."""

    path: str
    label: int
    targets: tuple[float, ...]


def _number(token: str) -> float | None:
    try:
        return float(token)
    except ValueError:
        return None


def parse_line(line: str, where: str) -> Entry:
    """Split one list line into path and values (see the module docstring)."""
    tokens = line.split()
    values: list[str] = []
    while len(tokens) > 1 and _number(tokens[-1]) is not None:
        values.insert(0, tokens.pop())
    if not values:
        raise DataError(f"{where}: expected '<path> <label or targets...>', got {line!r}")
    # The path is the text before the numbers, keeping any spaces inside it.
    path = line.strip().rsplit(maxsplit=len(values))[0]
    if len(values) == 1 and _is_int(values[0]):
        return Entry(path, int(values[0]), ())
    return Entry(path, 0, tuple(float(v) for v in values))


def _is_int(token: str) -> bool:
    try:
        int(token)
    except ValueError:
        return False
    return True


def read_list(path: str | os.PathLike) -> list[Entry]:
    """Every entry of a list file; a missing file or mixed label kinds is a DataError."""
    try:
        lines = read_text(path).splitlines()
    except OSError as exc:
        raise DataError(f"cannot read list file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(
            f"list file {path} is not UTF-8 text (byte {exc.start}); is it the right file?"
        ) from None
    entries = [
        parse_line(line, f"{path}:{number}")
        for number, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if not entries:
        raise DataError(f"list file {path} has no entries")
    kinds = {len(e.targets) for e in entries}
    if len(kinds) > 1:
        raise DataError(
            f"list file {path} mixes lines with different numbers of targets {sorted(kinds)}; "
            "every line must give one int label or the same number of targets"
        )
    return entries
