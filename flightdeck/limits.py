"""Limits on what one query may take: time, result size, and a place among those running.

Every door's queries pass through the Service, which applies these, so one agent looping hard
cannot starve the others or the process.
"""
from __future__ import annotations

import heapq
import itertools
import math
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import pyarrow as pa

from flightdeck.errors import LIMIT_EXCEEDED, ServiceError


# The bound values of one statement a door takes at most (a text, bytes...): what an HTTP body may
# hold too.
MAX_PARAMETER_BYTES = 16 * 2**20
MAX_PARAMETERS = 65_535  # bound values of one statement, as PostgreSQL's protocol has it


@dataclass(frozen=True)
class QueryLimits:
    """One principal's limits (the global ones with its own overrides applied)."""
    timeout_seconds: float | None = 300.0    # the whole query, streaming included
    max_rows: int | None = None              # per result
    max_bytes: int | None = None             # per result, in Arrow bytes
    max_concurrent: int = 8                  # this principal's queries running at once
    requests_per_second: float | None = None  # this principal's requests, sustained (None: no limit)

    @property
    def bounds_results(self) -> bool:
        return self.max_rows is not None or self.max_bytes is not None

    def check_result(self, rows: int, nbytes: int) -> None:
        """Raises LIMIT_EXCEEDED once a result has grown past a limit."""
        if self.max_rows is not None and rows > self.max_rows:
            raise ServiceError(LIMIT_EXCEEDED, f"the result has more than {self.max_rows} rows (the limit "
                                               "max_result_rows): aggregate, filter or add a LIMIT")
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise ServiceError(LIMIT_EXCEEDED, f"the result is larger than {self.max_bytes} bytes (the limit "
                                               "max_result_bytes): select fewer columns or rows")

    def within(self, batch: pa.RecordBatch, rows: int, nbytes: int) -> tuple[pa.RecordBatch, str | None]:
        """The head of ``batch`` that keeps a result (``rows`` and ``nbytes`` before it) within the
        limits, and a notice saying why when that is less than the whole batch."""
        keep = batch.num_rows
        notice = None
        if self.max_rows is not None and rows + keep > self.max_rows:
            keep = self.max_rows - rows
            notice = (f"truncated: the result has more than {self.max_rows} rows (the limit max_result_rows); "
                      f"only the first {self.max_rows} are returned: aggregate, filter or add a LIMIT")
        if self.max_bytes is not None and nbytes + batch.slice(0, keep).nbytes > self.max_bytes:
            keep = _rows_fitting(batch, keep, self.max_bytes - nbytes)
            notice = (f"truncated: the result is larger than {self.max_bytes} bytes (the limit max_result_bytes); "
                      f"only the first {rows + keep} rows are returned: select fewer columns or rows")
        return (batch if keep == batch.num_rows else batch.slice(0, keep)), notice


def _rows_fitting(batch: pa.RecordBatch, at_most: int, room: int) -> int:
    """How many leading rows of ``batch`` (up to ``at_most``) take at most ``room`` bytes."""
    low, high = 0, at_most  # low always fits, high + 1 never does
    while low < high:
        middle = (low + high + 1) // 2
        if batch.slice(0, middle).nbytes <= room:
            low = middle
        else:
            high = middle - 1
    return low


class Admission:
    """Places for running queries: so many in all, so many per principal. A query waits a short
    while for a place, then is refused; its place is held until its stream ends."""

    def __init__(self, max_concurrent: int, wait_seconds: float, what: str = "queries"):
        self.max_concurrent = max_concurrent
        self.wait_seconds = wait_seconds
        self.what = what  # what the places are for, in messages
        self._running: dict[str, int] = {}
        self._waiting: dict[str, int] = {}
        self._total = 0
        self._changed = threading.Condition()

    def enter(self, who: str, own_limit: int) -> Callable[[], None]:
        """Wait for a place; returns the function that gives it back (idempotent). A principal
        waits with at most ``own_limit`` requests at once, the others are refused at once: each
        waiting request holds a thread of its door's pool, which every principal shares."""
        with self._changed:
            def free() -> bool:
                return self._total < self.max_concurrent and self._running.get(who, 0) < own_limit
            crowded = not free() and self._waiting.get(who, 0) >= max(1, own_limit)
            self._waiting[who] = self._waiting.get(who, 0) + 1
            try:
                admitted = not crowded and self._changed.wait_for(free, self.wait_seconds)
            finally:
                self._waiting[who] -= 1
                if not self._waiting[who]:
                    del self._waiting[who]
            if not admitted:
                mine = self._running.get(who, 0)
                which = (f"{who} already runs {mine} {self.what} (its limit)" if mine >= own_limit
                         else f"{self._total} {self.what} are running (the server's limit)")
                raise ServiceError(LIMIT_EXCEEDED, f"too many concurrent {self.what}: {which}; retry shortly",
                                   retry_after=1.0)
            self._running[who] = self._running.get(who, 0) + 1
            self._total += 1
        released = []

        def release() -> None:
            with self._changed:
                if released:
                    return
                released.append(True)
                self._running[who] -= 1
                if not self._running[who]:  # without auth, names are free: keep none that run nothing
                    del self._running[who]
                self._total -= 1
                self._changed.notify_all()
        return release

    def running(self) -> int:
        with self._changed:
            return self._total


MAX_BUCKETS = 10_000  # principals' rate buckets kept before the full ones are dropped


class RequestRates:
    """A token bucket per principal: ``rate`` requests a second sustained, in bursts of up to one
    second's worth (at least one request). A request over it is refused at once, with the time
    after which one more would be taken."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}  # principal -> (tokens, when counted)
        self._rates: dict[str, float] = {}  # principal -> its rate when last counted
        self._lock = threading.Lock()

    def take(self, who: str, rate: float | None) -> None:
        """Count one request of ``who``; raises LIMIT_EXCEEDED (with retry_after) over its rate."""
        if rate is None:
            return
        burst = max(1.0, rate)
        now = time.monotonic()
        with self._lock:
            if len(self._buckets) > MAX_BUCKETS:
                self._forget_full(now)
            tokens, counted = self._buckets.get(who, (burst, now))
            tokens = min(burst, tokens + (now - counted) * rate)
            self._rates[who] = rate
            if tokens < 1.0:
                self._buckets[who] = (tokens, now)
                wait = (1.0 - tokens) / rate
                raise ServiceError(LIMIT_EXCEEDED, f"{who} sends more than {rate:g} requests a second (its limit "
                                                   f"requests_per_second); retry in {wait:.2f} s",
                                   retry_after=float(math.ceil(wait)))
            self._buckets[who] = (tokens - 1.0, now)

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have filled up again (they are as a new one would be), then,
        past half of MAX_BUCKETS, the least recently counted: without auth each name a client
        gives has a bucket, and names are free."""
        buckets = {who: (tokens, counted) for who, (tokens, counted) in self._buckets.items()
                   if tokens + (now - counted) * self._rates[who] < max(1.0, self._rates[who])}
        if len(buckets) > MAX_BUCKETS // 2:
            buckets = dict(sorted(buckets.items(), key=lambda item: item[1][1])[-(MAX_BUCKETS // 2):])
        self._buckets = buckets
        self._rates = {who: self._rates[who] for who in buckets}


class Deadlines:
    """One thread that fires the deadlines of every running query (a timer thread per query
    would cost more than a small query itself)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._cancelled: set[int] = set()
        self._counter = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def schedule(self, seconds: float, action: Callable[[], None]) -> int:
        """Run ``action`` in ``seconds`` unless cancelled; returns the handle to cancel it with."""
        handle = next(self._counter)
        entry = (time.monotonic() + seconds, handle, action)
        with self._changed:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flightdeck-deadlines", daemon=True)
                self._thread.start()
            if self._heap[0] is entry:  # woken only for a deadline sooner than the one it waits for
                self._changed.notify()
        return handle

    def cancel(self, handle: int) -> None:
        with self._changed:
            self._cancelled.add(handle)
            if len(self._cancelled) > 1024 and len(self._cancelled) * 2 > len(self._heap):
                # Most entries are cancelled (queries end long before their deadlines): drop them.
                self._heap = [entry for entry in self._heap if entry[1] not in self._cancelled]
                heapq.heapify(self._heap)
                self._cancelled.clear()

    def _run(self) -> None:
        while True:
            with self._changed:
                while self._heap and self._heap[0][1] in self._cancelled:
                    self._cancelled.discard(heapq.heappop(self._heap)[1])
                if not self._heap:
                    self._changed.wait()
                    continue
                when, handle, action = self._heap[0]
                if when > time.monotonic():
                    self._changed.wait(when - time.monotonic())
                    continue
                heapq.heappop(self._heap)
            action()


DEADLINES = Deadlines()


class Slot:
    """A running query's place and deadline. ``release`` (also when the slot is dropped unused,
    e.g. a stream never read) gives the place back and stops the clock."""

    def __init__(self, release: Callable[[], None], timeout_seconds: float | None, on_expiry: Callable[[], None]):
        self._release = release
        self.expired = False
        self._deadline: int | None = None
        if timeout_seconds is not None:
            # The clock holds the slot weakly: a slot dropped unused must still be collected.
            alive = weakref.ref(self)
            self._deadline = DEADLINES.schedule(timeout_seconds, lambda: _expire(alive, on_expiry))

    def release(self) -> None:
        if self._deadline is not None and not self.expired:
            DEADLINES.cancel(self._deadline)
            self._deadline = None
        self._release()

    def __del__(self) -> None:
        self.release()


def _expire(slot: Callable[[], Slot | None], on_expiry: Callable[[], None]) -> None:
    alive = slot()
    if alive is not None:
        alive.expired = True
        on_expiry()
        alive.release()  # the query is over: its place is free even if nobody reads or closes its stream
