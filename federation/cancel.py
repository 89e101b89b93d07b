"""Cancelling the backend statements of a query whose client went away.

A statement sent to a backend keeps the backend busy until it ends, whether or not anyone
still reads its result. While a query runs, the thread executing it holds a ``Cancellation``;
each connector that starts a backend statement on that thread registers how to stop it
(PostgreSQL and Flight SQL: the ADBC statement's cancel; DuckDB and SQLite: interrupt;
MySQL: ``KILL QUERY``; DataFusion's own work: ``stoppable_stream``). The door that serves the
query calls ``cancel()`` when its client disconnects or cancels, from any thread.
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pyarrow as pa

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


class Stopped(Exception):
    """The query's cancellation stopped the engine's work before its end."""


def stoppable_stream(frame: Any) -> pa.RecordBatchReader:
    """A DataFusion plan's result whose work stops when the query is cancelled (its deadline,
    its client gone): a plain stream blocks in the engine until its next batch, which a large
    aggregate or join may take hours to make. Each batch is awaited on the reading thread's
    event loop, which a cancellation interrupts; the stream is then dropped, which stops the
    engine's tasks."""
    # One partition after another, as a plain stream reads them: partitions read at once would
    # all run ahead of a slow client and buffer their batches.
    partitions = frame.execute_stream_partitioned()
    stream = partitions.pop(0) if partitions else None
    waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        for loop, pending in list(waiting):
            loop.call_soon_threadsafe(pending.cancel)
    on_cancel(stop)

    async def awaited() -> Any:
        # Inside a running loop (outside one, the engine makes the batch before returning); a
        # task, since the engine's own awaitable cannot be cancelled.
        pending = asyncio.ensure_future(stream.__anext__())
        waiting.append((asyncio.get_running_loop(), pending))
        if stopped.is_set():
            pending.cancel()
        return await pending

    def next_batch() -> Any:
        nonlocal stream
        while stream is not None:
            batch = next_of_partition()
            if batch is not None:
                return batch
            stream = partitions.pop(0) if partitions else None
        return None

    def next_of_partition() -> Any:
        loop = _loop()
        if loop is None:  # read from inside a running event loop: it cannot be waited on here
            return next(stream, None)
        try:
            return loop.run_until_complete(awaited())
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            pass  # raised below, outside this block: chained to it, the stream would live on
        finally:
            waiting.clear()
        raise Stopped("the query was stopped")

    schema = frame.schema()

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal stream
        try:
            while (batch := next_batch()) is not None:
                batch = batch.to_pyarrow()
                # The plan's schema, as a plain stream has it (batches may say "not null" where it does not).
                yield batch if batch.schema == schema else pa.RecordBatch.from_arrays(batch.columns, schema=schema)
        finally:
            stream = None  # dropped: DataFusion aborts the tasks still computing for it
            partitions.clear()
    return pa.RecordBatchReader.from_batches(schema, batches())


def _loop() -> asyncio.AbstractEventLoop | None:
    """This thread's event loop for awaiting batches, made once (a loop per query would cost
    more than a small query); None on a thread that runs an event loop already."""
    try:
        asyncio.get_running_loop()
        return None
    except RuntimeError:
        pass
    loop = getattr(_current, "loop", None)
    if loop is None:
        loop = _current.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)  # where the engine's awaitables find their loop
        _threads_loops.add(loop)
    return loop


# Weakly: a thread that ends takes its loop with it (threads of the doors' pools come and go).
_threads_loops: "weakref.WeakSet[asyncio.AbstractEventLoop]" = weakref.WeakSet()


@atexit.register
def _close_threads_loops() -> None:
    """Closed while the interpreter still runs: left to the garbage collector at its end, a
    loop may be collected after its own sockets and print an error from its destructor."""
    for loop in list(_threads_loops):
        if not loop.is_running():
            loop.close()
