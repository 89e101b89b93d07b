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
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Generator, Iterator

import pyarrow as pa

from federation.thread_values import set_for_block

log = logging.getLogger("flightdeck.cancel")


class Cancellation:
    """The stop actions of one query's running backend statements. Each runs on a thread of its
    own: stopping a statement may block (libpq's cancel request has no timeout, MySQL's KILL
    opens a connection), and whoever cancels (the HTTP door's event loop, the one thread that
    fires every query's deadline) must not wait on a backend that does not answer, nor may one
    stuck stop hold back the others (DataFusion's own work among them)."""

    def __init__(self) -> None:
        self._actions: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self.cancelled = False

    def add(self, action: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled:
                self._actions.append(action)
                return
        _run_apart(action)  # the query was cancelled before this statement started

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            actions, self._actions = self._actions, []
        for action in actions:
            _run_apart(action)


def _run_apart(action: Callable[[], None]) -> None:
    threading.Thread(target=_run, args=(action,), name="flightdeck-cancel", daemon=True).start()


def _run(action: Callable[[], None]) -> None:
    try:
        action()
    except Exception as error:  # the statement may already have ended
        log.debug("cancelling a backend statement: %s", error)


_current = threading.local()


def cancellation_scope(cancellation: Cancellation) -> ContextManager[Cancellation]:
    """Backend statements started on this thread inside the block register with it."""
    return set_for_block(_current, "cancellation", cancellation)


def on_cancel(action: Callable[[], None]) -> None:
    """Register how to stop the backend statement this thread is starting."""
    cancellation = getattr(_current, "cancellation", None)
    if cancellation is not None:
        cancellation.add(action)


class Stopped(Exception):
    """The query's cancellation stopped the engine's work before its end."""


def stoppable_stream(frame: Any, schema: pa.Schema, bounded: bool = False) -> pa.RecordBatchReader:
    """A DataFusion plan's result whose work stops when the query is cancelled (its deadline,
    its client gone): a plain stream blocks in the engine until its next batch, which a large
    aggregate or join may take hours to make. Each batch is awaited on an event loop, which a
    cancellation interrupts; the stream is then dropped, which stops the engine's tasks.

    A ``bounded`` plan (each of its batches takes bounded work: see ``bounded_plan`` in the
    engine) is read batch by batch on this thread instead, and stopped between batches: the
    event loop's round trips to the engine's threads cost more than a small query itself.
    ``schema``: of the rows the plan yields, its types coerced (``pushdown.result_schema``)."""
    if bounded:
        return _plain_batches(schema, _stopped_between_batches(frame.execute_stream()))
    # One partition after another, as a plain stream reads them: partitions read at once would
    # all run ahead of a slow client and buffer their batches.
    partitions = frame.execute_stream_partitioned()
    waiting: list[tuple[asyncio.AbstractEventLoop, asyncio.Task]] = []
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        for loop, pending in list(waiting):
            loop.call_soon_threadsafe(pending.cancel)
    on_cancel(stop)

    def awaited_batches() -> Generator[Any, None, None]:
        while partitions:
            while (batch := next_of_partition(partitions[0])) is not None:
                yield batch
            partitions.pop(0)

    def next_of_partition(stream: Any) -> Any:
        if _in_running_loop():  # it cannot be waited on here
            return next(stream, None)
        with _borrowed_loop() as loop:
            # A task, since the engine's own awaitable cannot be cancelled.
            pending = loop.create_task(stream.__anext__())
            waiting.append((loop, pending))
            if stopped.is_set():
                pending.cancel()
            try:
                return loop.run_until_complete(pending)
            except StopAsyncIteration:
                return None
            except asyncio.CancelledError:
                pass  # raised below, outside this block: chained to it, the stream would live on
            finally:
                waiting.clear()
        # The exception's traceback keeps this frame, whose references would keep the engine's
        # tasks computing until the garbage collector found the cycle it ends up in: drop them.
        stream = pending = None
        partitions.clear()
        raise Stopped("the query was stopped")

    def dropped() -> None:
        partitions.clear()  # dropped: DataFusion aborts the tasks still computing for them
    return _plain_batches(schema, awaited_batches(), dropped)


def _stopped_between_batches(stream: Any) -> Generator[Any, None, None]:
    stopped = threading.Event()
    on_cancel(stopped.set)  # now: the reading happens later, outside the query's cancellation scope

    def batches() -> Generator[Any, None, None]:
        while not stopped.is_set():
            batch = next(stream, None)
            if batch is None:
                return
            yield batch
        raise Stopped("the query was stopped")
    return batches()


def _plain_batches(schema: pa.Schema, engine_batches: Generator[Any, None, None],
                   dropped: Callable[[], None] = lambda: None) -> pa.RecordBatchReader:
    """The engine's batches as a pyarrow reader with the plan's ``schema`` (batches may say
    "not null" where the plan does not); ``dropped()`` when the reader ends or is closed."""

    def batches() -> Iterator[pa.RecordBatch]:
        try:
            for batch in engine_batches:
                batch = batch.to_pyarrow()
                yield batch if batch.schema == schema else pa.RecordBatch.from_arrays(batch.columns, schema=schema)
        finally:
            engine_batches.close()
            dropped()
    return pa.RecordBatchReader.from_batches(schema, batches())


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


# Idle loops for awaiting batches, shared by all threads: a loop per query would cost more than
# a small query, and a thread's own would not last (Flight's handler threads lose their Python
# thread state, hence their thread-locals, at the end of every call).
_idle_loops: list[asyncio.AbstractEventLoop] = []
_idle_lock = threading.Lock()
MAX_IDLE_LOOPS = 16  # kept after a burst of concurrent queries (each holds three descriptors)


@contextmanager
def _borrowed_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop this thread alone runs until the block ends."""
    with _idle_lock:
        loop = _idle_loops.pop() if _idle_loops else None
    if loop is None:
        loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        with _idle_lock:
            kept = len(_idle_loops) < MAX_IDLE_LOOPS
            if kept:
                _idle_loops.append(loop)
        if not kept:
            loop.close()


@atexit.register
def _close_idle_loops() -> None:
    """Closed while the interpreter still runs: left to the garbage collector at its end, a
    loop may be collected after its own sockets and print an error from its destructor."""
    with _idle_lock:
        loops, _idle_loops[:] = list(_idle_loops), []
    for loop in loops:
        loop.close()
