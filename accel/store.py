"""The accelerated-store contract and what every engine shares.

A store holds one dataset's local copy. Writes are atomic: ``replace`` builds the new copy
beside the live one and swaps it in one transaction, ``upsert`` adds a batch of rows in one
transaction, so a reader sees the old copy or the new one, never a mix; a failed write leaves
the last good copy serving. Each write also records the time the data was read from the
source ("as of"), in the same transaction, so a file copy knows its age after a restart.
A copy kept in step with a change stream also records the stream's position with each write,
in the same transaction, so a restart resumes exactly where the committed copy stands.
"""
from __future__ import annotations

import datetime as dt
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from federation.connectors.base import Connector
from federation.connectors.typing import conform_batch
from federation.expr import quote_double


class StoreError(Exception):
    """A local copy could not be written or read; the message is safe to show a client."""


@dataclass
class Stamp:
    """What a write records beside the rows: when they were read from the source, and
    their size in Arrow bytes (counted while they stream in, so read after the write)."""
    as_of: dt.datetime
    bytes: int = 0


class Store(ABC):
    engine: str

    def __init__(self, dataset: str, schema: pa.Schema, mode: str):
        self.dataset = dataset      # qualified name, e.g. "public.orders"
        self.schema = schema        # the dataset's Arrow schema: what readers get back
        self.mode = mode

    @property
    @abstractmethod
    def connector(self) -> Connector:
        """The connector that reads this copy (and its siblings in the same engine)."""

    @property
    @abstractmethod
    def table(self) -> str:
        """This copy's table name, as ``connector`` takes it."""

    @abstractmethod
    def has_copy(self) -> bool:
        """A copy with the dataset's columns is there (a file copy from before a restart)."""

    @abstractmethod
    def replace(self, reader: pa.RecordBatchReader, stamp: Stamp, indexes: tuple[str, ...] = (),
                position: dict | None = None) -> None:
        """Swap in a new copy made of ``reader``'s rows, atomically, with the change stream's
        ``position`` (None: the copy follows no stream, any position recorded is dropped)."""

    @abstractmethod
    def apply_changes(self, upserts: pa.Table | None, deletes: pa.Table | None, key: tuple[str, ...],
                      stamp: Stamp, position: dict) -> None:
        """In one transaction: delete the rows whose ``key`` is in ``deletes`` or ``upserts``,
        insert ``upserts`` and record ``position``. No key: ``upserts`` are appended."""

    @abstractmethod
    def position(self) -> dict | None:
        """The change stream position recorded with the copy (None when it follows none)."""

    @abstractmethod
    def upsert(self, reader: pa.RecordBatchReader, stamp: Stamp, key: tuple[str, ...],
               on_conflict: str) -> None:
        """Add ``reader``'s rows atomically; a row whose ``key`` is already present replaces it
        (``upsert``) or is dropped (``drop``). No key: rows are appended as they are."""

    def delete_older(self, column: str, cutoff: Any) -> int:
        """Delete rows whose ``column`` is before ``cutoff``; returns how many went. The recorded
        size shrinks in proportion, so it stays an estimate of the copy's Arrow bytes."""
        before = self.row_count()
        deleted = self._delete_older(column, cutoff)
        stamp = self.stamp()
        if deleted and before and stamp is not None:
            self._record_bytes(stamp.bytes * (before - deleted) // before)
        return deleted

    @abstractmethod
    def _delete_older(self, column: str, cutoff: Any) -> int:
        """Delete rows whose ``column`` is before ``cutoff``; returns how many went."""

    @abstractmethod
    def _record_bytes(self, size: int) -> None:
        """Record ``size`` as the copy's Arrow bytes, keeping the stamp's as-of time."""

    @abstractmethod
    def max_value(self, column: str) -> Any:
        """The greatest value of ``column`` in the copy (None when empty)."""

    @abstractmethod
    def row_count(self) -> int:
        ...

    @abstractmethod
    def stamp(self) -> Stamp | None:
        """What the last write recorded (None before the first one). After an upsert the
        bytes are the copy's before plus the rows added."""

    def read_all(self) -> pa.Table:
        """The whole copy, in the dataset's schema (e.g. to index it for search)."""
        reader = self.connector.scan(self.table, self.schema.names, [], None)
        batches = [conform_batch(batch, self.schema) for batch in reader]
        return pa.Table.from_batches(batches, schema=self.schema)

    def close(self) -> None:
        pass


def distinct_names_ignoring_case(dataset: str, schema: pa.Schema, engine: str) -> None:
    """Refuse columns whose names differ only in case: the engine's names ignore it, so it would
    rename one (DuckDB: note_1) or refuse the table, and a read of one would find the other."""
    seen: dict[str, str] = {}
    for name in schema.names:
        other = seen.setdefault(name.lower(), name)
        if other != name:
            raise StoreError(f"{dataset}: columns {other!r} and {name!r} differ only in case, which engine {engine} "
                             "does not tell apart: use engine arrow, or name them apart at the source")


def key_matches(incoming: str, table: str, key: tuple[str, ...]) -> str:
    """``incoming.k = table.k AND ...`` over the key's columns, every name quoted: a key's
    columns are named by the source, and a name is data like any value."""
    return " AND ".join(f"{incoming}.{quote_double(c)} = {quote_double(table)}.{quote_double(c)}" for c in key)


def local_table_name(dataset: str) -> str:
    """The table a copy lives in: the dataset's name with its schema folded in."""
    return dataset.replace(".", "__")

