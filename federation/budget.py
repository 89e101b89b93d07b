"""Per-source load budgets: how many requests one backend may have running at once, and how
many may start per second (``params.max_concurrent_requests``, ``params.max_requests_per_second``).

A budget belongs to a source (one server and database, one URL), shared by every dataset of it
and by queries and refreshes alike. A request holds its slot for the whole life of its stream:
until the backend's reader is exhausted, closed or fails.

Who waits for a slot matters. DataFusion scans a connector on its own few worker threads; a
worker blocked waiting for a slot would stop the very streams whose end frees one. So waiting
happens only on threads that may wait (``patience``): a query's caller waits up to the source's
``budget_timeout`` and then fails with ``BudgetExceeded``; a refresh waits as long as it takes.
Before handing a plan to DataFusion, that thread *reserves* a slot for each scan the plan makes
of a budgeted source; a scan on an engine thread then runs on a reserved slot, or on a free
one, and fails at once rather than wait.
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any, Callable, ContextManager, Iterable

import pyarrow as pa

from federation.thread_values import set_for_block

DEFAULT_TIMEOUT_SECONDS = 10.0
BUDGET_PARAMS = ("max_concurrent_requests", "max_requests_per_second", "budget_timeout")
QUERY, REFRESH = "query", "refresh"  # how long a thread may wait: the source's timeout, or forever


class BudgetExceeded(Exception):
    """A source had no free slot in time; the message names the source and its budget."""


_patience = threading.local()


def patience(how: str) -> ContextManager[str]:
    """Requests started on this thread inside the block may wait for a slot: up to each source's
    ``budget_timeout`` (QUERY) or until one is free (REFRESH). Elsewhere nothing waits."""
    return set_for_block(_patience, "how", how)


class LoadBudget:
    """One source's budget. Slots in use are ``direct + max(reserved, claimed)``: streams opened
    by threads that waited for their slot, plus slots reserved for DataFusion plans (or the
    streams running on engine threads, if ever more of those run than were reserved)."""

    def __init__(self, source: str):
        self.source = source  # for messages and metrics: no credentials
        self.max_concurrent: int | None = None
        self.max_per_second: float | None = None
        self.timeout = DEFAULT_TIMEOUT_SECONDS
        self._stated: dict[str, Any] = {}
        self._changed = threading.Condition()
        self._direct = self._reserved = self._claimed = 0
        self._next_start = 0.0  # monotonic time the next request may start (the rate)
        self.waits = 0     # requests that found no free slot at once and waited
        self.refusals = 0  # requests that got no slot in time

    @property
    def limited(self) -> bool:
        return self.max_concurrent is not None or self.max_per_second is not None

    def configure(self, params: dict[str, Any]) -> None:
        """Take the budget a dataset's params state; two datasets of a source may not disagree
        (ValueError)."""
        stated = {name: params[name] for name in BUDGET_PARAMS if params.get(name) is not None}
        for name, value in stated.items():
            if name in self._stated and self._stated[name] != value:
                raise ValueError(f"{self.source}: params.{name} is {self._stated[name]} for another dataset "
                                     f"of this source and {value} here; a source has one load budget")
        try:
            if "max_concurrent_requests" in stated:
                self.max_concurrent = _positive(stated["max_concurrent_requests"], int, "max_concurrent_requests")
            if "max_requests_per_second" in stated:
                self.max_per_second = _positive(stated["max_requests_per_second"], float, "max_requests_per_second")
            if "budget_timeout" in stated:
                self.timeout = _positive(stated["budget_timeout"], float, "budget_timeout")
        except ValueError as error:
            raise ValueError(f"{self.source}: {error}") from None
        self._stated.update(stated)

    # ---- the choke point ----

    def hold(self, open_stream: Callable[[], pa.RecordBatchReader]) -> pa.RecordBatchReader:
        """``open_stream()`` on a slot of this budget, held until its reader ends or is closed."""
        if not self.limited:
            return open_stream()
        how = getattr(_patience, "how", None)
        if how is None:  # an engine thread: on a reserved slot (its start already paced), or a free one
            with self._changed:
                covered = self._claimed < self._reserved
            self._take(lambda: self._fits(claim=1), self._claim, 0.0, paced=not covered)
            release = self._unclaim
        else:
            self._take(lambda: self._fits(direct=1), self._start_direct, self._wait_seconds(how))
            release = self._end_direct
        try:
            reader = open_stream()
        except BaseException:
            release()
            raise
        return released_at_end(reader, release)

    def reserve(self, count: int, how: str) -> Callable[[], None]:
        """Reserve ``count`` slots for a plan's scans (waiting as ``how`` allows); returns the
        function that gives them back."""
        if not self.limited or count <= 0:
            return lambda: None
        if self.max_concurrent is not None and count > self.max_concurrent:
            self.refusals += 1
            raise BudgetExceeded(f"source {self.source} is at its load budget: the query needs {count} "
                                 f"concurrent requests to it, over max_concurrent_requests {self.max_concurrent}")
        wait = self._wait_seconds(how)
        deadline = None if wait is None else time.monotonic() + wait
        # All at once: two plans taking their slots one by one could each hold part of what
        # they need and wait for the rest until both time out.
        self._take(lambda: self._fits(reserve=count), lambda: self._reserve(count), wait, deadline=deadline,
                   starts=count)
        released = threading.Event()

        def give_back() -> None:
            if not released.is_set():
                released.set()
                self._unreserve(count)
        return give_back

    # ---- bookkeeping, under the condition's lock ----

    def _fits(self, direct: int = 0, reserve: int = 0, claim: int = 0) -> bool:
        if self.max_concurrent is None:
            return True
        used = self._direct + direct + max(self._reserved + reserve, self._claimed + claim)
        return used <= self.max_concurrent

    def _wait_seconds(self, how: str) -> float | None:
        return None if how == REFRESH else self.timeout

    def _take(self, fits: Callable[[], bool], take: Callable[[], None], wait: float | None,
              paced: bool = True, deadline: float | None = None, starts: int = 1) -> None:
        """Wait (at most ``wait`` seconds, or until ``deadline``; None: forever) until a request
        fits and, when ``paced``, may start by the rate; then ``take`` its slots (``starts`` of
        them, each counted by the rate). Raises BudgetExceeded when the time is up."""
        if deadline is None and wait is not None:
            deadline = time.monotonic() + wait
        with self._changed:
            waited = False
            while True:
                now = time.monotonic()
                on_time = not paced or now >= self._next_start
                if fits() and on_time:
                    break
                remaining = None if deadline is None else deadline - now
                if remaining is not None and remaining <= 0:
                    self.refusals += 1
                    raise BudgetExceeded(self._refusal(wait))
                if not waited:
                    waited = True
                    self.waits += 1
                pause = self._next_start - now if fits() else remaining
                if remaining is not None and pause is not None:
                    pause = min(pause, remaining)
                self._changed.wait(pause)
            take()
            if paced and self.max_per_second is not None:
                self._next_start = max(now, self._next_start) + starts / self.max_per_second

    def _refusal(self, wait: float | None) -> str:
        limits = []
        if self.max_concurrent is not None:
            limits.append(f"max_concurrent_requests {self.max_concurrent}")
        if self.max_per_second is not None:
            limits.append(f"max_requests_per_second {self.max_per_second:g}")
        within = "at once" if not wait else f"within {wait:g}s"
        return f"source {self.source} is at its load budget ({', '.join(limits)}): no slot {within}; retry later"

    def _start_direct(self) -> None:
        self._direct += 1

    def _claim(self) -> None:
        self._claimed += 1

    def _reserve(self, count: int) -> None:
        self._reserved += count

    def _end_direct(self) -> None:
        with self._changed:
            self._direct -= 1
            self._changed.notify_all()

    def _unclaim(self) -> None:
        with self._changed:
            self._claimed -= 1
            self._changed.notify_all()

    def _unreserve(self, count: int) -> None:
        with self._changed:
            self._reserved -= count
            self._changed.notify_all()

    def snapshot(self) -> dict[str, Any]:
        with self._changed:
            return {"source": self.source, "in_use": self._direct + max(self._reserved, self._claimed),
                    "max_concurrent_requests": self.max_concurrent, "waits": self.waits,
                    "refusals": self.refusals}


UNLIMITED = LoadBudget("unlimited")  # connectors nobody gave a budget: nothing to hold


class LoadBudgets:
    """The budgets of every source, by source identity."""

    def __init__(self) -> None:
        self._by_source: dict[str, LoadBudget] = {}
        self._lock = threading.Lock()

    def of(self, identity: str, label: str, params: dict[str, Any]) -> LoadBudget:
        """The budget of the source ``identity``, with the limits ``params`` state."""
        with self._lock:
            budget = self._by_source.setdefault(identity, LoadBudget(label))
        budget.configure(params)
        return budget

    @property
    def limited(self) -> bool:
        """Some source has a budget."""
        with self._lock:
            return any(budget.limited for budget in self._by_source.values())

    def snapshot(self) -> list[dict[str, Any]]:
        """The limited budgets' counters, for metrics."""
        with self._lock:
            budgets = list(self._by_source.values())
        return [budget.snapshot() for budget in budgets if budget.limited]


def reserve(scanned: Iterable[LoadBudget], how: str) -> Callable[[], None] | None:
    """Reserve a slot for each scan of a plan (``scanned``: each scan's budget), waiting as ``how``
    allows, in a fixed order so two plans cannot each hold what the other waits for; returns the
    function that gives them all back (None when no scan has a budget)."""
    releases: list[Callable[[], None]] = []

    def give_back() -> None:
        for release in releases:
            release()
    counts = Counter(budget for budget in scanned if budget.limited)
    if not counts:
        return None
    try:
        for budget, count in sorted(counts.items(), key=lambda item: item[0].source):
            releases.append(budget.reserve(count, how))
    except BaseException:
        give_back()
        raise
    return give_back


def run_reserved(give_back: Callable[[], None] | None,
                 run: Callable[[], pa.RecordBatchReader]) -> pa.RecordBatchReader:
    """``run()``'s stream on slots ``reserve`` gave: they go back when it ends, or at once if
    it fails to start."""
    if give_back is None:
        return run()
    try:
        reader = run()
    except BaseException:
        give_back()
        raise
    return released_at_end(reader, give_back)


def released_at_end(reader: pa.RecordBatchReader, release: Callable[[], None]) -> pa.RecordBatchReader:
    """``reader``, calling ``release`` once when it is exhausted, fails, is closed or is dropped
    (even unread: a generator's ``finally`` would not run then)."""
    return pa.RecordBatchReader.from_batches(reader.schema, _Releasing(reader, release))


class _Releasing:
    def __init__(self, reader: pa.RecordBatchReader, release: Callable[[], None]):
        self.reader = reader
        self.release: Callable[[], None] | None = release

    def __iter__(self) -> "_Releasing":
        return self

    def __next__(self) -> pa.RecordBatch:
        try:
            return self.reader.read_next_batch()
        except BaseException:  # StopIteration included: the stream is over either way
            self.close()
            raise

    def close(self) -> None:
        release, self.release = self.release, None
        if release is not None:
            try:
                self.reader.close()
            finally:
                release()

    def __del__(self) -> None:
        self.close()


def _positive(value: Any, kind: type, name: str) -> Any:
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or not number > 0:
        raise ValueError(f"params.{name} must be a positive number, got {value!r}")
    return number
