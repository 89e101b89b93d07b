"""Sources that stream their changes: what a `refresh_mode: changes` copy consumes.

A change source (a database's replication log, a message bus) hands out a consistent snapshot
and then batches of changes in commit order. Each batch is already collapsed per key (the last
change of a key in the batch wins), so applying its deletes and upserts in one local
transaction gives the source's state as of `position`, whatever order they are applied in.
A source without a key (a message bus) only appends: its batches carry upserts and no deletes.
A source may confirm a batch's position at its server (so the server can free what it kept)
only when the consumer asks for the next batch: by then the batch is committed in the copy.
"""
from __future__ import annotations

import datetime as dt
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from federation.connectors.base import Connector, ConnectorError


class SourceReset(ConnectorError):
    """The stream cannot carry the copy on: the source table was truncated or its schema
    changed. The copy stays as it was; only a new snapshot brings it back in step."""


@dataclass(frozen=True)
class ChangeBatch:
    upserts: pa.Table | None          # whole rows whose last change in the batch inserted or updated them
    deletes: pa.Table | None          # key columns of rows whose last change deleted them
    position: dict[str, Any]          # JSON-serialisable: where the source stands after this batch
    committed_at: dt.datetime | None  # commit time at the source of the batch's last change (lag)
    skipped: tuple[str, ...] = ()     # one reason per record that could not be read (never stops the stream)


class ChangeSource(ABC):
    """Implemented by connectors whose datasets can be copied with `refresh_mode: changes`."""

    @abstractmethod
    def change_key(self, table: str) -> tuple[str, ...]:
        """The columns that identify a row; () for an append-only source."""

    @abstractmethod
    def snapshot(self, table: str) -> tuple[pa.RecordBatchReader, dict[str, Any]]:
        """Every row as of one consistent point, and the position the change stream resumes from."""

    @abstractmethod
    def changes(self, table: str, since: dict[str, Any], stop: threading.Event) -> Iterator[ChangeBatch]:
        """Batches after `since`, in commit order, until `stop` is set (blocks while nothing changes)."""

    def cleanup(self, table: str) -> None:
        """Drop what the source keeps for this copy (a replication slot, a consumer's state)."""

    def backlog(self, table: str) -> int | None:
        """Bytes the source keeps for this copy that it has not confirmed yet (a replication
        slot's lag), or None when the source cannot tell."""
        return None


def table_key(connector: Connector, table: str) -> tuple[str, ...]:
    """A database table's primary key as its change key: updates and deletes need one."""
    key = tuple(connector.primary_key(table))
    if not key:
        raise ConnectorError(f"{connector.describe()}: {table} has no primary key: refresh_mode 'changes' "
                             "needs one to apply updates and deletes")
    return key


# What Arrow raises for a value its column's type cannot hold.
UNFIT_VALUE_ERRORS = (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError)


def fitting_rows(rows: list[dict], schema: pa.Schema) -> tuple[pa.Table, list[tuple[int, str]]]:
    """The rows whose values ``schema``'s columns can hold, as a table, and for each other row its
    position and why (the first line of Arrow's message). All at once when every row fits."""
    try:
        return pa.Table.from_pylist(rows, schema=schema), []
    except UNFIT_VALUE_ERRORS:
        pass  # some row's values do not fit: find which, row by row
    fitting, unfit = [], []
    for position, row in enumerate(rows):
        try:
            fitting.append(pa.Table.from_pylist([row], schema=schema))
        except UNFIT_VALUE_ERRORS as error:
            unfit.append((position, str(error).splitlines()[0]))
    return (pa.concat_tables(fitting) if fitting else schema.empty_table()), unfit


class PendingChanges:
    """Rows changed by one or more transactions, collapsed per key (the last change of a key
    wins), made into a ChangeBatch. Without a key every row is kept, in order (append-only)."""

    def __init__(self, schema: pa.Schema, key: tuple[str, ...]):
        self.schema = schema
        self.key = key
        self.key_schema = pa.schema([schema.field(name) for name in key])
        self._rows: dict[tuple, dict | None] = {}   # key values -> the row (upsert) or None (delete)
        self._appended: list[dict] = []
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self._rows) + len(self._appended)

    def upsert(self, row: dict[str, Any]) -> None:
        if not self.key:
            self._appended.append(row)
            return
        values = tuple(row[name] for name in self.key)
        self._rows.pop(values, None)  # re-inserted last: a batch keeps the order of last changes
        self._rows[values] = row

    def delete(self, key: dict[str, Any]) -> None:
        values = tuple(key[name] for name in self.key)
        self._rows.pop(values, None)
        self._rows[values] = None

    def batch(self, position: dict[str, Any], committed_at: dt.datetime | None) -> ChangeBatch:
        upserts = self._appended + [row for row in self._rows.values() if row is not None]
        deletes = [dict(zip(self.key, values)) for values, row in self._rows.items() if row is None]
        return ChangeBatch(upserts=self._table(upserts, self.schema), deletes=self._table(deletes, self.key_schema),
                           position=position, committed_at=committed_at, skipped=tuple(self.skipped))

    def _table(self, rows: list[dict], schema: pa.Schema) -> pa.Table | None:
        """The rows as a table; a row whose values the columns cannot hold (a NaN for a decimal, a
        number past its precision) is skipped with its reason, not left to fail the stream again at
        every retry while the source keeps its log."""
        if not rows:
            return None
        table, unfit = fitting_rows(rows, schema)
        self.skipped += [f"a row does not fit the columns: {reason}" for _, reason in unfit]
        return table if table.num_rows else None
