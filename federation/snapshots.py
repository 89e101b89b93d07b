"""One moment of a local store for every scan of it in one query.

Each scan DataFusion makes of a connector opens its own read: two scans of one accelerated copy
(a self-join, a UNION of it with itself, two copies kept in one DuckDB) could read it on either
side of a refresh, and answer with rows of two versions. A store that can offer more says so
with ``Connector.commit_lock`` (held by its writers around each commit) and ``Connector.pin``
(a read of a table as it stands now). For a query that reads such a connector more than once,
the engine holds each one's lock while DataFusion turns the plan into an execution plan: on the
thread executing it, DataFusion asks each dataset for its fragments then, and each scan's read
is pinned there, all at one moment. The scans use their pins later, on the engine's threads.
Pins a scan never took are closed when the query ends.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator

from federation.thread_values import set_for_block

if TYPE_CHECKING:
    from federation.connectors.base import Connector


class Pin:
    """One scan's read of one table, taken at the query's moment: used once."""

    def __init__(self, connector: "Connector", read: Any, close: Callable[[], None] | None = None):
        self.connector = connector
        self._read: Any = read
        self._close = close
        self._lock = threading.Lock()

    def take(self) -> Any:
        """The pinned read, the first time; None after (a scan run again reads afresh)."""
        with self._lock:
            read, self._read = self._read, None
            self._close = None  # whoever took it closes it
            return read

    def close(self) -> None:
        with self._lock:
            close, self._close, self._read = self._close, None, None
        if close is not None:
            close()


class QuerySnapshots:
    """The pins of one query, on the ``connectors`` it reads more than once."""

    def __init__(self, connectors: set["Connector"]):
        self.connectors = connectors
        self._locked: list[threading.Lock] = []
        self._pins: list[Pin] = []

    def pin(self, connector: "Connector", table: str) -> Pin | None:
        store = connector.store
        if store not in self.connectors:
            return None
        lock = store.commit_lock
        if not any(held is lock for held in self._locked):
            lock.acquire()  # no commit until every scan of the query has its pin
            self._locked.append(lock)
        pin = store.pin(table)
        self._pins.append(pin)
        return pin

    def settle(self) -> None:
        """Every scan has its pin: writers may commit again."""
        while self._locked:
            self._locked.pop().release()

    def close(self) -> None:
        """The query ended: close the pins no scan took."""
        self.settle()
        pins, self._pins = self._pins, []
        for pin in pins:
            pin.close()


_planning = threading.local()  # the query whose execution plan this thread is making
_reading = threading.local()   # the pin of the scan this thread is opening


@contextmanager
def pinning(snapshots: QuerySnapshots) -> Iterator[QuerySnapshots]:
    """Scans whose execution plan is made on this thread inside the block take their pins."""
    try:
        with set_for_block(_planning, "snapshots", snapshots):
            yield snapshots
    finally:
        snapshots.settle()


def current() -> QuerySnapshots | None:
    return getattr(_planning, "snapshots", None)


def reading(pin: Pin | None) -> ContextManager[Pin | None]:
    """A scan opening its read on this thread inside the block reads through ``pin``."""
    return set_for_block(_reading, "pin", pin)


def pinned_read(connector: "Connector") -> Any:
    """The pinned read a connector should open its scan on, or None (read as it is now)."""
    pin = getattr(_reading, "pin", None)
    if pin is None or pin.connector is not connector:
        return None
    return pin.take()
