"""The one mechanical rewrite that ports a pycaffe script to netforge: every module name
``caffe`` becomes ``netforge``.

    import caffe                          ->  import netforge as caffe
    import caffe as c                     ->  import netforge as c
    import caffe.io                       ->  import netforge.io, netforge as caffe
    from caffe import layers as L         ->  from netforge import layers as L
    from caffe.proto import caffe_pb2     ->  from netforge.proto import caffe_pb2

Only import statements change; the rest of the script keeps saying ``caffe.``. A Jupyter
notebook (``.ipynb``) has its code cells rewritten. As a command:
``python tools/pycaffe_rewrite.py IN.py|IN.ipynb [OUT]`` (standard output without OUT; OUT
is replaced whole or not at all).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from netforge.atomic import atomic_write

_FROM = re.compile(r"^(\s*from\s+)caffe(\.[\w.]+)?(\s+import\b)")
_IMPORT = re.compile(r"^(\s*import\s+)(.*?)(\s*#.*)?$")
_NAME = re.compile(r"^caffe(\.[\w.]+)?(\s+as\s+\w+)?$")


def _rewrite_import_item(item: str) -> str:
    """One ``import`` list item: ``caffe[.sub] [as name]``; anything else is kept."""
    match = _NAME.match(item.strip())
    if match is None:
        return item
    sub, alias = match.group(1) or "", match.group(2)
    if alias:
        return f"netforge{sub}{alias}"
    if sub:
        # ``import caffe.io`` binds ``caffe`` too: bind it to netforge, with the submodule loaded.
        return f"netforge{sub}, netforge as caffe"
    return "netforge as caffe"


def _rewrite_statement(statement: str) -> str:
    match = _FROM.match(statement)
    if match:
        return _FROM.sub(r"\1netforge\2\3", statement, count=1)
    match = _IMPORT.match(statement)
    if match is None:
        return statement
    head, names, comment = match.group(1), match.group(2), match.group(3) or ""
    if names.startswith("("):
        return statement
    items = [_rewrite_import_item(item) for item in names.split(",")]
    return head + ", ".join(item.strip() for item in items) + comment


def rewrite_line(line: str) -> str:
    """Rewrite the import statements of one line (``;``-separated ones too, when the line
    holds no string or comment that a ``;`` could belong to)."""
    body = line.rstrip("\n")
    newline = line[len(body) :]
    if ";" in body and not any(c in body for c in "'\"#"):
        parts = body.split(";")
        lead = [parts[0]] + [" " + p.lstrip() if p.strip() else p for p in parts[1:]]
        rewritten = [_rewrite_statement(p) for p in lead]
        return ";".join(rewritten) + newline
    return _rewrite_statement(body) + newline


def rewrite_source(source: str) -> str:
    """The source with every ``caffe`` import turned into the ``netforge`` one."""
    return "".join(rewrite_line(line) for line in source.splitlines(keepends=True))


def rewrite_notebook(text: str) -> str:
    """A notebook's JSON with the imports of every code cell rewritten (cells, outputs and
    metadata otherwise as they were; written with nbformat's one-space indent)."""
    notebook = json.loads(text)
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        rewritten = rewrite_source("".join(source))
        cell["source"] = (
            rewritten.splitlines(keepends=True) if isinstance(source, list) else rewritten
        )
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """The command: rewrite IN to OUT or standard output; 1 with a message on a bad file."""
    if not 1 <= len(argv) <= 2:
        print("usage: python tools/pycaffe_rewrite.py IN.py|IN.ipynb [OUT]", file=sys.stderr)
        return 2
    source = Path(argv[0])
    try:
        text = source.read_text(encoding="utf-8")
        text = rewrite_notebook(text) if source.suffix == ".ipynb" else rewrite_source(text)
        if len(argv) == 2:
            with atomic_write(argv[1], "w") as out:
                out.write(text)
        else:
            sys.stdout.write(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(
            f"pycaffe_rewrite: {getattr(exc, 'filename', None) or source}: {reason}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
