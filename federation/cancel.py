"""Cancelling the backend statements of a query whose client went away.

A statement sent to a backend keeps the backend busy until it ends, whether or not anyone
still reads its result. While a query runs, the thread executing it holds a ``Cancellation``;
each connector that starts a backend statement on that thread registers how to stop it
(PostgreSQL and Flight SQL: the ADBC statement's cancel; DuckDB and SQLite: interrupt;
MySQL: ``KILL QUERY``). The door that serves the query calls ``cancel()`` when its client
disconnects or cancels, from any thread.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Callable, Iterator

log = logging.getLogger("flightdeck.cancel")


class Cancellation:
    """The stop actions of one query's running backend statements."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.cancelled = False

    def add(self, action: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled:
                self._actions.append(action)
                return
        _run(action)  # the query was cancelled before this statement started

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            actions, self._actions = self._actions, []
        for action in actions:
            _run(action)


def _run(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as error:  # the statement may already have ended
        log.debug("cancelling a backend statement: %s", error)


_current = threading.local()


@contextmanager
def cancellation_scope(cancellation: Cancellation) -> Iterator[Cancellation]:
    """Backend statements started on this thread inside the block register with it."""
    previous = getattr(_current, "cancellation", None)
    _current.cancellation = cancellation
    try:
        yield cancellation
    finally:
        _current.cancellation = previous


def on_cancel(action: Callable[[], None]) -> None:
    """Register how to stop the backend statement this thread is starting."""
    cancellation = getattr(_current, "cancellation", None)
    if cancellation is not None:
        cancellation.add(action)
