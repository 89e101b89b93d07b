"""Tool results sized for a model's context, as JSON-ready structures.

A result is read from its stream one row past the row cap and cut at the character cap
(counted on each row's JSON text); a cut result says so (``truncated``) with a notice telling
the agent how to ask for less. Nothing is ever cut silently. The stream is closed as soon as
enough is read, which stops the query.
"""
from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from typing_extensions import TypedDict

import pyarrow as pa

from flightdeck.runtime_config import Mcp as Caps
from flightdeck.service import Freshness, Truncation


class Column(TypedDict):
    name: str
    type: str
    nullable: bool


class DataAsOf(TypedDict):
    """When the accelerated copies a result read were taken from their sources (UTC, ISO 8601)."""
    oldest: str | None
    datasets: dict[str, str | None]


class Rows(TypedDict):
    """A result set: its columns, its rows as objects, and whether it was cut."""
    columns: list[Column]
    rows: list[dict[str, Any]]
    row_count: int
    truncated: bool
    notice: str | None
    data_as_of: DataAsOf | None


@dataclass
class Sized:
    rows: list[dict[str, Any]]
    truncated: bool
    notice: str | None


def columns(schema: pa.Schema) -> list[Column]:
    return [Column(name=f.name, type=str(f.type), nullable=f.nullable) for f in schema]


def data_as_of(freshness: Freshness | None) -> DataAsOf | None:
    if freshness is None:
        return None
    return DataAsOf(oldest=_iso(freshness.oldest),
                    datasets={name: _iso(stamp) for name, stamp in freshness.datasets.items()})


def sized(items: Iterable[dict[str, Any]], caps: Caps, what: str = "rows") -> Sized:
    """At most ``caps.max_rows`` items whose JSON fits in ``caps.max_chars``; reads one item past
    the row cap to know whether there are more, and no further."""
    rows: list[dict[str, Any]] = []
    chars = 0
    for item in items:
        if len(rows) == caps.max_rows:
            return Sized(rows, True, _over_rows(caps.max_rows, what))
        row = {key: json_value(value) for key, value in item.items()}
        chars += len(json.dumps(row, ensure_ascii=False)) + 2
        if chars > caps.max_chars:
            return Sized(rows, True, _over_chars(len(rows), caps.max_chars, what))
        rows.append(row)
    return Sized(rows, False, None)


def reader_rows(reader: pa.RecordBatchReader, at_most: int) -> Iterator[dict[str, Any]]:
    """Up to ``at_most`` rows of a result, read batch by batch as they are asked for."""
    for batch in reader:
        if at_most <= 0:
            return
        rows = batch.slice(0, at_most).to_pylist()
        at_most -= len(rows)
        yield from rows


def read_sized(reader: pa.RecordBatchReader, truncation: Truncation, caps: Caps, what: str = "rows") -> Sized:
    """A result read into ``sized``; ``truncation`` is what the Service said when it cut the
    stream at the caller's result limits (the tighter cut is the one reported)."""
    try:
        result = sized(reader_rows(reader, caps.max_rows + 1), caps, what)
    finally:
        reader.close()  # stops the query when the result was cut
    return cut_at_limit(result, truncation.notice)


def cut_at_limit(result: Sized, notice: str | None) -> Sized:
    """``result``, marked cut with ``notice`` (the Service's, at the caller's result limits)
    unless the context caps cut it already."""
    if not result.truncated and notice:
        return Sized(result.rows, True, notice)
    return result


def rows_result(reader: pa.RecordBatchReader, truncation: Truncation, caps: Caps,
                freshness: Freshness | None) -> Rows:
    """A whole result set as a tool returns it."""
    schema = reader.schema
    result = read_sized(reader, truncation, caps)
    return Rows(columns=columns(schema), rows=result.rows, row_count=len(result.rows),
                truncated=result.truncated, notice=result.notice, data_as_of=data_as_of(freshness))


def json_value(value: Any) -> Any:
    """A value as JSON can carry it: times in ISO 8601, decimals as numbers, bytes in base64,
    non-finite floats as text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, decimal.Decimal):
        return float(value) if value.is_finite() else str(value)
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return str(value)


def _iso(stamp: dt.datetime | None) -> str | None:
    return None if stamp is None else stamp.isoformat()


def _over_rows(cap: int, what: str) -> str:
    return (f"truncated: there are more than {cap:,} {what}; only the first {cap:,} are shown. "
            "Aggregate (GROUP BY with count/sum/avg), filter (WHERE) or add a LIMIT to get what you need "
            "in fewer rows.")


def _over_chars(kept: int, cap: int, what: str) -> str:
    return (f"truncated: only the first {kept:,} {what} are shown, the next would pass the "
            f"{cap:,}-character result cap. Select fewer or shorter columns, aggregate or filter "
            "to get what you need in less text.")
