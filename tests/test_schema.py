"""The schema: the committed generated module matches protos/netforge.proto, and every
message, field number, type, label, default and packing matches Caffe's caffe.proto as the
inventory in ../shared/reference tabulates it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO, shared_path
from google.protobuf.descriptor import FieldDescriptor

from netforge.proto import pb


def test_generated_module_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


_TYPES = {
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_DOUBLE: "double",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
}


def _inventory_tables() -> dict[str, list[tuple[int, str, str, str, str, str]]]:
    text = shared_path("reference", "caffe-inventory.md").read_text()
    section = text[text.index("### 3.2 Storage messages") : text.index("### 3.8 V1 enum")]
    tables: dict[str, list] = {}
    current = None
    for line in section.splitlines():
        header = re.match(r"\*\*(\w+)\*\*", line)
        if header:
            current = tables.setdefault(header.group(1), [])
            continue
        row = re.match(r"\| (\d+) \| (\w+) \| (\w+) \| (\w+) \| ([^|]*)\|([^|]*)\|", line)
        if row and current is not None:
            number, name, label, kind, default, note = (x.strip() for x in row.groups())
            current.append((int(number), name, label, kind, default, note))
    return tables


def _default_text(field: FieldDescriptor) -> str:
    value = field.default_value
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name
    if field.type == FieldDescriptor.TYPE_BOOL:
        return "true" if value else "false"
    if field.type == FieldDescriptor.TYPE_STRING:
        return f'"{value}"'
    return repr(value)


def _same_default(expected: str, field: FieldDescriptor) -> bool:
    if expected in ("—", ""):
        return not field.has_default_value
    got = _default_text(field)
    if field.type in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return float(expected) == pytest.approx(float(got))
    if field.type == FieldDescriptor.TYPE_STRING and not expected.startswith('"'):
        expected = f'"{expected}"'
    return expected == got


def test_every_caffe_field_matches_the_inventory() -> None:
    tables = _inventory_tables()
    assert len(tables) > 60
    for message_name, rows in tables.items():
        if message_name == "Phase":
            continue
        descriptor = pb.DESCRIPTOR.message_types_by_name[message_name]
        for number, name, label, kind, default, note in rows:
            field = descriptor.fields_by_number[number]
            where = f"{message_name}.{name} = {number}"
            assert field.name == name, where
            got_label = (
                "repeated" if field.is_repeated else "required" if field.is_required else "optional"
            )
            assert got_label == label, where
            if field.message_type is not None:
                assert field.message_type.name == kind, where
            elif field.enum_type is not None:
                assert field.enum_type.name == kind, where
            else:
                assert _TYPES[field.type] == kind, where
            assert _same_default(default, field), (where, default, _default_text(field))
            packed = "packed" in note and "unpacked" not in note
            assert field.GetOptions().packed is packed or (
                not packed and not field.GetOptions().packed
            ), where


def test_netforge_additions_use_numbers_caffe_never_used() -> None:
    layer = pb.LayerParameter.DESCRIPTOR
    caffe_max = 148
    extras = {f.name for f in layer.fields if f.number > caffe_max}
    assert extras == {"permute_param", "upsample_param", "interp_param"}
    assert pb.Datum.DESCRIPTOR.fields_by_name["targets"].number == 1000
    assert pb.SolverState.DESCRIPTOR.fields_by_name["rng_state"].number == 1000
