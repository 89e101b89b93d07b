"""Bringing a backend's records and batches to the Arrow schema the connector declared."""
from __future__ import annotations

import json
import mmap
import re
import uuid
from datetime import date, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc


# Column types a configuration may declare for JSON records (http, message buses).
JSON_TYPES = {
    "string": pa.string(), "int": pa.int64(), "int64": pa.int64(), "float": pa.float64(),
    "double": pa.float64(), "bool": pa.bool_(), "boolean": pa.bool_(),
    "timestamp": pa.timestamp("s", tz="UTC"), "date": pa.date32(), "json": pa.string(),
}


def json_value(value: Any, arrow_type: pa.DataType) -> Any:
    """A JSON value as Arrow expects it for a declared column type."""
    if value is None:
        return None
    if pa.types.is_timestamp(arrow_type) and isinstance(value, str):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    if pa.types.is_date(arrow_type) and isinstance(value, str):
        return date.fromisoformat(value[:10])
    if pa.types.is_string(arrow_type) and not isinstance(value, str):
        return json.dumps(value)
    return value


# How deep a JSON document read from a source may nest. Arrow's JSON reader recurses once per
# level on a thread's stack (20,000 levels in a 40 KB message end the process), Python's json and
# flattening by the recursion limit: a deeper document is refused before either reads it.
MAX_JSON_DEPTH = 64
_JSON_NESTING = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_nests_too_deep(payload: bytes | mmap.mmap) -> bool:
    """Whether a JSON text nests deeper than MAX_JSON_DEPTH (brackets inside strings do not count).
    A file is best given mapped: it is read as it is scanned, not held whole."""
    if isinstance(payload, bytes) and payload.count(b"[") + payload.count(b"{") <= MAX_JSON_DEPTH:
        return False
    depth = 0
    for match in _JSON_NESTING.finditer(payload):
        mark = match.group()
        if mark in (b"[", b"{"):
            depth += 1
            if depth > MAX_JSON_DEPTH:
                return True
        elif mark in (b"]", b"}"):
            depth -= 1
    return False


def flatten_document(document: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """{("service", "name"): "checkout", ...}: nested objects become paths; lists stay values."""
    flat: dict[tuple, Any] = {}
    for key, value in document.items():
        path = prefix + (key,)
        if isinstance(value, dict):
            flat.update(flatten_document(value, path))
        else:
            flat[path] = value
    return flat


def conform_batch(batch: pa.RecordBatch, target: pa.Schema) -> pa.RecordBatch:
    """``batch`` with each column cast to ``target``'s type (names and order already match)."""
    if batch.schema.equals(target, check_metadata=False):
        return batch
    columns = [conform_array(column, field.type) for column, field in zip(batch.columns, target)]
    return pa.RecordBatch.from_arrays(columns, schema=target)


def conform_array(array: pa.Array, target: pa.DataType) -> pa.Array:
    if isinstance(array.type, pa.BaseExtensionType):
        if array.type.extension_name == "arrow.uuid" and pa.types.is_string(target):
            return pa.array([None if v is None else str(uuid.UUID(bytes=v)) for v in array.storage.to_pylist()],
                            type=pa.string())
        array = array.storage
    if array.type == target:
        return array
    return pc.cast(array, target)
