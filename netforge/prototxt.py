"""Reading and writing Caffe's text and binary protobuf files.

Text errors name the file, line and column; an unknown field or enum value also names the
enclosing layer and suggests the closest valid name. Nets and solvers are upgraded from
Caffe's legacy formats as they are read (``netforge.upgrade``), as Caffe does.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import TypeVar

from google.protobuf import message as protobuf_message
from google.protobuf import text_format

from netforge.atomic import atomic_write
from netforge.errors import ConfigError, DataError
from netforge.proto import pb
from netforge.reading import read_bytes

M = TypeVar("M", bound=protobuf_message.Message)

_UNKNOWN_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')
_UNKNOWN_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named (\w+)')


def _read_bytes(path: str | os.PathLike) -> bytes:
    try:
        return read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a file") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None


def _enclosing_layer(text: str, line: int) -> str | None:
    """The name of the top-level ``layer``/``layers`` block that contains ``line`` (1-based)."""
    depth = 0
    name = None
    in_layer = False
    name_pattern = re.compile(r"(?:^|[\s{])name\s*:\s*[\"'](.*?)[\"']")
    for number, raw in enumerate(text.splitlines(), start=1):
        code = raw.split("#", 1)[0]
        opening = re.match(r"\s*layers?\s*:?\s*\{", code) if depth == 0 else None
        if opening:
            in_layer, name = True, None
            own_level = code[opening.end() :].split("{", 1)[0]
        else:
            own_level = code.split("{", 1)[0] if depth == 1 else ""
        if in_layer and name is None:
            found = name_pattern.search(own_level)
            if found:
                name = found.group(1)
        if number == line:
            return name if in_layer else None
        depth += code.count("{") - code.count("}")
        if depth == 0:
            in_layer = False
    return None


def _suggestion(message: str) -> str:
    """A "did you mean" hint for an unknown field or enum value, if one is close."""
    found = _UNKNOWN_FIELD.search(message)
    if found:
        type_name, field = found.groups()
        descriptor = pb.DESCRIPTOR.message_types_by_name.get(type_name.split(".")[-1])
        names = [f.name for f in descriptor.fields] if descriptor else []
        close = difflib.get_close_matches(field, names, n=1)
        return f"; did you mean {close[0]!r}?" if close else ""
    found = _UNKNOWN_ENUM.search(message)
    if found:
        enum_name, value = found.groups()
        values = _enum_values(enum_name)
        close = difflib.get_close_matches(value, values, n=1) or [
            v for v in values if v.lower() == value.lower()
        ]
        if close:
            return f"; did you mean {close[0]}?"
        return f"; expected one of {', '.join(values)}" if values else ""
    return ""


def _enum_values(full_name: str) -> list[str]:
    parts = full_name.split(".")[1:]  # drop the package
    scope = pb.DESCRIPTOR
    if len(parts) == 1:
        enum = scope.enum_types_by_name.get(parts[0])
    else:
        message = scope.message_types_by_name.get(parts[0])
        enum = message.enum_types_by_name.get(parts[-1]) if message else None
    return [v.name for v in enum.values] if enum else []


def parse_text(text: str, message_cls: type[M], filename: str = "<string>") -> M:
    """Parse protobuf text format into a new ``message_cls``, with located errors."""
    message = message_cls()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        detail = str(exc)
        detail = re.sub(r"^\d+:\d+ ?: ?", "", detail).replace("netforge.", "")
        where = f"{filename}:{line}:{column}" if line else filename
        layer = _enclosing_layer(text, line) if line else None
        in_layer = f" (in layer {layer!r})" if layer else ""
        raise ConfigError(f"{where}{in_layer}: {detail}{_suggestion(str(exc))}") from None
    return message


def parse_binary(data: bytes, message_cls: type[M], filename: str = "<bytes>") -> M:
    """Parse protobuf wire format; a truncated or corrupt file is a DataError, never zeros."""
    message = message_cls()
    try:
        message.ParseFromString(data)
    except protobuf_message.DecodeError as exc:
        raise DataError(
            f"{filename}: not a valid binary {message_cls.__name__} (truncated or corrupt: {exc})"
        ) from None
    _check_text_fields(message, filename)
    return message


def _check_text_fields(message: protobuf_message.Message, filename: str) -> None:
    """Raise a DataError for a string field that is not UTF-8. protobuf's Python runtime
    hands such a proto2 field over as bytes, which would fail later as a TypeError far from
    the file; the walk visits set fields only, never the repeated numbers of a blob."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            for text in value if field.is_repeated else (value,):
                if not isinstance(text, str):
                    raise DataError(
                        f"{filename}: field {field.name!r} is not UTF-8 text "
                        f"({bytes(text)[:40]!r}); the file is corrupt"
                    )
        elif field.type == field.TYPE_MESSAGE:
            for child in value if field.is_repeated else (value,):
                _check_text_fields(child, filename)


def read_binary(path: str | os.PathLike, message_cls: type[M]) -> M:
    """Parse a wire-format file (a caffemodel, a binaryproto, a solverstate)."""
    return parse_binary(_read_bytes(path), message_cls, str(path))


def read_text(path: str | os.PathLike, message_cls: type[M]) -> M:
    """Parse a text-format file."""
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"{path}: not a text prototxt (binary data); binary nets are read with "
            "netforge.weights.load_weights"
        ) from None
    return parse_text(text, message_cls, str(path))


def read_message(path: str | os.PathLike, message_cls: type[M]) -> M:
    """Parse a file in text or binary format (text when it decodes as UTF-8 and parses)."""
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return parse_binary(data, message_cls, str(path))
    try:
        return parse_text(text, message_cls, str(path))
    except ConfigError:
        try:
            return parse_binary(data, message_cls, str(path))
        except DataError:
            pass
        raise


def read_net(path: str | os.PathLike) -> pb.NetParameter:
    """A net prototxt (text or binary), upgraded from legacy formats."""
    from netforge.upgrade import upgrade_net

    net = read_message(path, pb.NetParameter)
    upgrade_net(net, str(path))
    return net


def read_solver(path: str | os.PathLike) -> pb.SolverParameter:
    """A solver prototxt, upgraded, with Caffe's default snapshot_prefix."""
    from netforge.upgrade import upgrade_solver

    solver = read_text(path, pb.SolverParameter)
    upgrade_solver(solver, str(path))
    default_snapshot_prefix(solver, path)
    return solver


def default_snapshot_prefix(solver: pb.SolverParameter, path: str | os.PathLike) -> None:
    """Caffe's rule: no prefix → the solver file without extension; a folder → folder/stem."""
    stem = Path(path).with_suffix("")
    if not solver.HasField("snapshot_prefix"):
        solver.snapshot_prefix = str(stem)
    elif solver.snapshot_prefix.endswith(("/", os.sep)) or Path(solver.snapshot_prefix).is_dir():
        solver.snapshot_prefix = str(Path(solver.snapshot_prefix) / stem.name)


def to_text(message: protobuf_message.Message) -> str:
    """Protobuf text format, as Caffe writes it."""
    return text_format.MessageToString(message)


def write_text(message: protobuf_message.Message, path: str | os.PathLike) -> None:
    """Write ``message`` as text, atomically."""
    with atomic_write(path, "w") as handle:
        handle.write(to_text(message))


def write_binary(message: protobuf_message.Message, path: str | os.PathLike) -> None:
    """Write ``message`` in wire format, atomically."""
    with atomic_write(path, "wb") as handle:
        handle.write(message.SerializeToString())
