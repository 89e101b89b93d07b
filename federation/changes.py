"""Sources that stream their changes: what a `refresh_mode: changes` copy consumes.

A change source (a database's replication log, a message bus) hands out a consistent snapshot
and then batches of changes in commit order. Each batch is already collapsed per key (the last
change of a key in the batch wins), so applying its deletes and upserts in one local
transaction gives the source's state as of `position`, whatever order they are applied in.
A source without a key (a message bus) only appends: its batches carry upserts and no deletes.
"""
from __future__ import annotations

import datetime as dt
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa

from federation.connectors.base import ConnectorError


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
