"""System tables: the runtime's own state, readable through SQL (schema `runtime`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pyarrow as pa

from federation.connectors.base import Connector

SYSTEM_SCHEMA = "runtime"

SOURCE_STATS_SCHEMA = pa.schema([
    ("datasets", pa.string()), ("kind", pa.string()), ("source", pa.string()),
    ("queries", pa.int64()), ("rows", pa.int64()), ("bytes", pa.int64()), ("errors", pa.int64()),
    ("seconds", pa.float64()), ("last_request", pa.string()),
])
DATASETS_SCHEMA = pa.schema([
    ("name", pa.string()), ("kind", pa.string()), ("source", pa.string()), ("state", pa.string()),
    ("error", pa.string()), ("primary_key", pa.list_(pa.string())), ("columns", pa.int32()),
    ("skipped_columns", pa.list_(pa.string())), ("description", pa.string()),
    # Acceleration (NULL for datasets read from their source on every query).
    ("acceleration", pa.string()), ("refresh_mode", pa.string()), ("refresh_state", pa.string()),
    ("last_refresh_start", pa.timestamp("us", tz="UTC")), ("last_refresh_end", pa.timestamp("us", tz="UTC")),
    ("last_refresh_rows", pa.int64()), ("rows_loaded", pa.int64()), ("rows", pa.int64()),
    ("bytes", pa.int64()), ("last_error", pa.string()), ("data_as_of", pa.timestamp("us", tz="UTC")),
    ("refreshes", pa.int64()), ("failures", pa.int64()),
    # refresh_mode changes: rows changed by the stream, source commit -> applied lag, records
    # skipped, the stream position (JSON) and what the source keeps unconfirmed (bytes).
    ("changes_applied", pa.int64()), ("lag_p50_ms", pa.float64()), ("lag_p99_ms", pa.float64()),
    ("skipped", pa.int64()), ("last_skip_reason", pa.string()), ("position", pa.string()),
    ("source_backlog_bytes", pa.int64()),
    # Search over accelerated columns: chunks embedded by the last refresh and in total.
    ("embedded_last_refresh", pa.int64()), ("embedded_total", pa.int64()),
])


class SnapshotConnector(Connector):
    """A table computed afresh by ``build`` on every scan."""

    kind = "system"

    def __init__(self, name: str, schema: pa.Schema, build: Callable[[], list[dict]]):
        super().__init__({}, Path("."))
        self.name = name
        self.table_schema = schema
        self.build = build

    def tables(self) -> list[str]:
        return [self.name]

    def schema(self, table: str) -> pa.Schema:
        return self.table_schema

    def open_scan(self, table, columns, filters, limit) -> pa.RecordBatchReader:
        return self.rows_reader(self.build(), self.table_schema, columns, filters, limit)
