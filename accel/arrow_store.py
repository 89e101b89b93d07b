"""Copies as in-memory Arrow tables: no engine between the data and DataFusion.

A copy is an immutable ``pa.Table``; a write builds the next table and swaps one reference,
so readers keep the table they started with. Scans hand DataFusion zero-copy slices and let
it filter (pyarrow's comparison rules are not DataFusion's, e.g. for NaN).
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from accel.store import Stamp, Store
from federation import expr as fx
from federation.connectors.base import DEFAULT_BATCH_ROWS, Connector, ConnectorError
from federation.snapshots import Pin, pinned_read


class ArrowCopies(Connector):
    """Reads every Arrow copy of the runtime, by dataset name."""

    kind = "arrow"

    def __init__(self, base_dir: Path):
        super().__init__({}, base_dir)
        self.copies: dict[str, pa.Table] = {}
        self.commit_lock = threading.Lock()

    def describe(self) -> str:
        return "arrow (accelerated copies)"

    def tables(self) -> list[str]:
        return sorted(self.copies)

    def schema(self, table: str) -> pa.Schema:
        return self._copy(table).schema

    def _copy(self, table: str) -> pa.Table:
        try:
            return self.copies[table]
        except KeyError:
            raise ConnectorError(f"no accelerated copy of {table} yet") from None

    def row_count(self, table: str) -> int | None:
        return self._copy(table).num_rows

    def pin(self, table: str) -> Pin:
        return Pin(self, self._copy(table))

    def swap(self, table: str, copy: pa.Table) -> None:
        """Make ``copy`` the table's (one reference: readers keep the table they started with)."""
        with self.commit_lock:
            self.copies[table] = copy

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
             limit: int | None) -> pa.RecordBatchReader:
        data = pinned_read(self)
        if data is None:
            data = self._copy(table)
        if columns is not None:
            data = data.select(columns)
        if limit is not None and not filters:
            data = data.slice(0, limit)
        return pa.RecordBatchReader.from_batches(data.schema, data.to_batches(DEFAULT_BATCH_ROWS))


class ArrowStore(Store):
    engine = "arrow"

    def __init__(self, dataset: str, schema: pa.Schema, mode: str, copies: ArrowCopies):
        super().__init__(dataset, schema, mode)
        self.copies = copies
        self._stamp: Stamp | None = None
        self._position: dict | None = None
        self._write_lock = threading.Lock()  # two writers must not both build from the same base

    @property
    def connector(self) -> ArrowCopies:
        return self.copies

    @property
    def table(self) -> str:
        return self.dataset

    def has_copy(self) -> bool:
        return self.dataset in self.copies.copies

    def _live(self) -> pa.Table:
        return self.copies.copies.get(self.dataset, self.schema.empty_table())

    def replace(self, reader: pa.RecordBatchReader, stamp: Stamp, indexes: tuple[str, ...] = (),
                position: dict | None = None) -> None:
        table = pa.Table.from_batches(list(reader), schema=reader.schema).combine_chunks()
        with self._write_lock:
            self.copies.swap(self.dataset, table.cast(self.schema))
            self._stamp = Stamp(stamp.as_of, stamp.bytes)
            self._position = position

    def apply_changes(self, upserts: pa.Table | None, deletes: pa.Table | None, key: tuple[str, ...],
                      stamp: Stamp, position: dict) -> None:
        incoming = (upserts if upserts is not None else self.schema.empty_table()).select(self.schema.names)
        with self._write_lock:
            live = self._live()
            if key:
                for gone in (deletes, incoming):
                    if gone is not None and gone.num_rows:
                        live = live.join(gone.select(list(key)).cast(live.select(list(key)).schema),
                                         keys=list(key), join_type="left anti")
            merged = pa.concat_tables([live.select(self.schema.names), incoming.cast(self.schema)])
            self.copies.swap(self.dataset, merged.combine_chunks())
            previous = self._stamp.bytes if self._stamp else 0
            self._stamp = Stamp(stamp.as_of, previous + stamp.bytes)
            self._position = position

    def position(self) -> dict | None:
        return self._position

    def upsert(self, reader: pa.RecordBatchReader, stamp: Stamp, key: tuple[str, ...],
               on_conflict: str) -> None:
        incoming = pa.Table.from_batches(list(reader), schema=reader.schema).cast(self.schema)
        with self._write_lock:
            live = self._live()
            if key and on_conflict == "upsert":
                live = live.join(incoming.select(list(key)), keys=list(key), join_type="left anti")
            elif key:
                incoming = incoming.join(live.select(list(key)), keys=list(key), join_type="left anti")
            merged = pa.concat_tables([live.select(self.schema.names), incoming.select(self.schema.names)])
            self.copies.swap(self.dataset, merged.combine_chunks())
            previous = self._stamp.bytes if self._stamp else 0
            self._stamp = Stamp(stamp.as_of, previous + stamp.bytes)

    def _record_bytes(self, size: int) -> None:
        self._stamp = Stamp(self._stamp.as_of, size)

    def _delete_older(self, column: str, cutoff: Any) -> int:
        with self._write_lock:
            live = self._live()
            keep = pc.invert(pc.fill_null(pc.less(live[column], pa.scalar(cutoff, live.schema.field(column).type)),
                                          False))
            kept = live.filter(keep)
            self.copies.swap(self.dataset, kept)
            return live.num_rows - kept.num_rows

    def max_value(self, column: str) -> Any:
        return pc.max(self._live()[column]).as_py()

    def row_count(self) -> int:
        return self._live().num_rows

    def stamp(self) -> Stamp | None:
        return self._stamp
