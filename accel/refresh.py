"""Keeping one dataset's local copy fresh: refresh modes, retries, retention, schedule, status.

One ``Refresher`` per accelerated dataset. Its thread loads the copy, then refreshes it every
``refresh_check_interval`` and deletes rows past ``retention_period``; on-demand refreshes
run in the caller's thread. A lock makes refreshes of one dataset take turns. A failed
refresh (after its retries) leaves the last good copy serving and records the error.
"""
from __future__ import annotations

import datetime as dt
import itertools
import logging
import random
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa

from accel.spec import AccelerationSpec
from accel.store import Stamp, Store, StoreError
from accel.working_set import WorkingSet
from federation import expr as fx
from federation.arrow_expr import to_arrow
from federation.connectors.base import Connector, ConnectorError, first_line
from federation.engine import clean_engine_message

log = logging.getLogger("flightdeck.accel")
PROGRESS_EVERY_SECONDS = 2.0

Route = Callable[[Connector, str], None]  # (connector, table): where the dataset's queries go now
Listener = Callable[["Refresher"], None]  # told when a new copy serves (e.g. to index it for search)


@dataclass
class RefreshStatus:
    state: str = "pending"               # pending, loading, ready, refreshing, error
    last_refresh_start: dt.datetime | None = None
    last_refresh_end: dt.datetime | None = None
    last_refresh_rows: int | None = None  # rows read from the source by the last refresh
    rows: int | None = None               # rows in the copy
    bytes: int | None = None              # Arrow bytes of the copy (estimated after deletions)
    last_error: str | None = None
    data_as_of: dt.datetime | None = None  # when the copy's data was read from the source
    refreshes: int = 0
    failures: int = 0
    rows_loaded: int = 0                  # progress of the refresh under way
    # refresh_mode changes: what the change stream has brought since start
    changes_applied: int = 0              # rows upserted or deleted by applied batches
    lag_p50_ms: float | None = None       # source commit -> applied here, over the last batches
    lag_p99_ms: float | None = None
    skipped: int = 0                      # records the source could not read (the stream went on)
    last_skip_reason: str | None = None
    position: str | None = None           # JSON: where the copy stands in the stream
    source_backlog_bytes: int | None = None  # what the source keeps unconfirmed for this copy


class Refresher:
    def __init__(self, spec: AccelerationSpec, store: Store, working_set: WorkingSet,
                 source: Connector, source_table: str, route: Route):
        self.spec = spec
        self.store = store
        self.working_set = working_set
        self.source = source
        self.source_table = source_table
        self.route = route
        self.status = RefreshStatus()
        self.loaded = threading.Event()      # set once a copy serves
        self.retry_delays: list[float] = []  # seconds waited before each retry (the backoff, visible)
        self.listeners: list[Listener] = []  # run in the refresh's turn, before it reports ready
        self._turn = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # stopped, or work asked for now: the thread's wait ends
        self._thread: threading.Thread | None = None
        # The source's columns changed: what copies them (store, working set, source), until the
        # next refresh takes it up; then ``_outdated`` until a copy with them serves.
        self._new_columns: tuple[Store, WorkingSet, Connector] | None = None
        self._outdated = False
        self.last_refresh_failed = False  # not the listeners' failures: what the source or store said
        self.serves_kept_copy = True  # False: a copy in the store was left there by a refresher since stopped

    # ---- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Serve a copy kept from before a restart at once; load or refresh in the background."""
        if self.serves_kept_copy and self.store.has_copy():
            stamp = self.store.stamp()
            self.status.data_as_of = stamp.as_of if stamp else None
            self._serve_copy()
            log.info("%s: serving the copy kept in %s (data as of %s), refreshing",
                     self.spec.dataset, self.spec.mode, self.status.data_as_of)
        elif self.spec.ready_state == "on_load":
            self.route(PendingCopy(self), self.store.table)
        self._thread = threading.Thread(target=self._run, name=f"refresh {self.spec.dataset}", daemon=True)
        self._thread.start()

    def stop(self, wait: bool = True) -> None:
        """No refresh starts from now on; with ``wait``, one under way (on any thread: its own, or
        one asked for on demand) is given 10 s to end: it ends at its next batch."""
        self._stop.set()
        self._wake.set()
        if not wait:
            return
        if not self._turn.acquire(timeout=10):
            return  # a refresh stuck on its source (it never sends its next batch): not waited for
        self._turn.release()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        if self.loaded.is_set():  # a copy kept from before a restart: index it before refreshing
            with self._turn:
                self._notify()
        self.refresh()
        refresh_every = self.spec.refresh_check_interval
        retention_every = self._retention_interval()
        now = time.monotonic()
        next_refresh = now + refresh_every if refresh_every else None
        next_retention = now + retention_every if retention_every else None
        while True:
            due = [t for t in (next_refresh, next_retention) if t is not None]
            timeout = max(0.0, min(due) - time.monotonic()) if due else None
            self._wake.wait(timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            now = time.monotonic()
            if next_retention is not None and now >= next_retention:
                self.apply_retention()
                next_retention = now + retention_every
            if self._new_columns is not None or (next_refresh is not None and now >= next_refresh):
                self.refresh()
                next_refresh = time.monotonic() + refresh_every if refresh_every else None

    def _retention_interval(self) -> float | None:
        if self.spec.retention_period is None:
            return None
        return self.spec.retention_check_interval or self.spec.refresh_check_interval or 60.0

    # ---- refresh -----------------------------------------------------------

    def refresh(self, refresh_sql: str | None = None) -> RefreshStatus:
        """Refresh now (with retries); returns the status after it. A one-off ``refresh_sql``
        that cannot define this dataset's working set raises WorkingSetError at once, before
        anything is read or recorded; the refresh itself never raises."""
        if refresh_sql:
            self.working_set.check(refresh_sql)
        with self._turn:
            if self._stop.is_set():  # asked for before the stop, its turn come after: not run
                return self.status
            attempts = self.spec.refresh_retry_max_attempts if self.spec.refresh_retry_enabled else 1
            for attempt in range(1, attempts + 1):
                self._take_up_new_columns()
                if self._attempt(refresh_sql):
                    break
                if attempt < attempts:
                    delay = self._backoff(attempt)
                    self.retry_delays.append(delay)
                    if self._stop.wait(delay):
                        break
            return self.status

    def take_new_columns(self, store: Store, working_set: WorkingSet, source: Connector) -> None:
        """The source's columns changed: the copy is made again in ``store`` with the new ones, on
        this refresher's thread, at once (a refresh under way ends first); it serves once it has
        them, each scheduled refresh trying again until one does. Meanwhile queries read what the
        catalog routes them to: the source. Of two changes, the last one told wins."""
        self._new_columns = (store, working_set, source)
        self._wake.set()

    def _take_up_new_columns(self) -> None:
        """From now on, refreshes copy the new columns (called in the refresh's turn)."""
        new_columns, self._new_columns = self._new_columns, None
        if new_columns is not None:
            self.store, self.working_set, self.source = new_columns
            self._outdated = True

    @property
    def stopping(self) -> bool:
        """Stopped: no refresh starts, one under way ends at its next batch and serves nothing."""
        return self._stop.is_set()

    @property
    def ended(self) -> bool:
        """Stopped, and no refresh of its own still under way (on its thread or another)."""
        if not self._stop.is_set() or (self._thread is not None and self._thread.is_alive()):
            return False
        if not self._turn.acquire(blocking=False):
            return False
        self._turn.release()
        return True

    @property
    def copy_serves(self) -> bool:
        """Whether queries read the copy (not a pending one, nor the source while it is made again)."""
        return self.loaded.is_set() and not self._outdated and self._new_columns is None

    def _backoff(self, attempt: int) -> float:
        """Exponential, with jitter so that many datasets failing together do not retry in step."""
        ceiling = min(self.spec.retry_max_delay, self.spec.retry_base_delay * 2 ** (attempt - 1))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _attempt(self, refresh_sql: str | None) -> bool:
        status = self.status
        started = dt.datetime.now(dt.timezone.utc)
        status.state = "refreshing" if self.loaded.is_set() else "loading"
        status.last_refresh_start = started
        status.rows_loaded = 0
        stamp = Stamp(as_of=started)
        try:
            if refresh_sql:
                self.working_set.check(refresh_sql)
            rows = self._load(stamp, refresh_sql, started)
        except Exception as error:
            status.failures += 1
            status.last_error = self._describe(error)
            status.state = "ready" if self.loaded.is_set() else "error"
            self.last_refresh_failed = True
            log.warning("%s: refresh failed: %s", self.spec.dataset, status.last_error)
            return False
        if self.stopping:  # stopped meanwhile: no longer copied, or the server stops; it routes nothing
            return False
        self.last_refresh_failed = False
        status.refreshes += 1
        status.last_refresh_rows = rows
        status.last_refresh_end = dt.datetime.now(dt.timezone.utc)
        status.data_as_of = started
        status.last_error = None
        if self.spec.retention_period is not None:
            self._delete_expired()
        self._measure()
        log.info("%s: %s refresh read %s rows in %.2fs; the copy has %s rows",
                 self.spec.dataset, self.spec.refresh_mode, f"{rows:,}",
                 (status.last_refresh_end - started).total_seconds(), f"{status.rows:,}")
        self._notify()
        if not self.loaded.is_set() or self._outdated:
            self._serve_copy()
            self._outdated = False
        status.state = "ready"
        return True

    def _load(self, stamp: Stamp, refresh_sql: str | None, started: dt.datetime) -> int:
        """Read the working set (or what is new in it) into the store; returns rows read."""
        counter = _Progress(self, stamp)
        appending = self.spec.refresh_mode == "append" and self.loaded.is_set() and not self._outdated
        if appending:
            since, after = self._append_start()
            reader = self.working_set.read(since, strictly_after=after, refresh_sql=refresh_sql)
        else:
            since = started - dt.timedelta(seconds=self.spec.refresh_data_window) \
                if self.spec.refresh_data_window else None
            reader = self.working_set.read(since, refresh_sql=refresh_sql)
        counted = counter.wrap(reader)
        try:
            if appending:
                self.store.upsert(counted, stamp, self.spec.primary_key, self.spec.on_conflict)
            else:
                self.store.replace(counted, stamp, self.spec.indexes)
                # Its reader may have described the copy it replaced, whose columns may have been
                # other (a copy kept from before a restart, or made again with the source's new ones).
                self.store.connector.forget_schema(self.store.table)
        except StoreError:
            counter.raise_source_error()  # the source's own error says more than the store's
            raise
        finally:
            # Release the source's stream (and its connection) here, now: left to the garbage
            # collector, it could be freed on another thread after its connection.
            counted.close()
            reader.close()
        return counter.rows

    def _notify(self) -> None:
        for listener in self.listeners:
            try:
                listener(self)
            except Exception as error:  # the copy is good; only what is built from it failed
                self.status.last_error = f"after refresh: {self.source.clean_error(error)}"
                log.warning("%s: %s", self.spec.dataset, self.status.last_error, exc_info=True)

    def _append_start(self) -> tuple[Any, bool]:
        """Where an append starts: after the newest time copied, or ``overlap`` before it."""
        last = self.store.max_value(self.spec.time_column)
        if last is None:
            return None, False
        if self.spec.refresh_append_overlap:
            return _minus_seconds(last, self.spec.refresh_append_overlap), False
        return last, True

    def _describe(self, error: Exception) -> str:
        """The error for status and logs: precise, one line, no secret."""
        if isinstance(error, (ConnectorError, StoreError)):
            return self.source.clean_error(error)
        return self.source.mask_secrets(clean_engine_message(str(error)))

    def serving(self) -> Connector:
        """What reads the copy: the store, or with ``use_source`` the store then the source."""
        if self.spec.on_zero_results == "use_source":
            return SourceWhenEmpty(self.store.connector, self.source, self.source_table)
        return self.store.connector

    def _serve_copy(self) -> None:
        self.route(self.serving(), self.store.table)
        self.loaded.set()
        self._measure()
        if self.status.state in ("pending", "error"):
            self.status.state = "ready"

    def _measure(self) -> None:
        self.status.rows = self.store.row_count()
        stamp = self.store.stamp()
        self.status.bytes = stamp.bytes if stamp else None

    # ---- retention ---------------------------------------------------------

    def apply_retention(self) -> int:
        with self._turn:
            if not self.loaded.is_set():
                return 0
            deleted = self._delete_expired()
            self._measure()
            return deleted

    def _delete_expired(self) -> int:
        cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=self.spec.retention_period)
        deleted = self.store.delete_older(self.spec.time_column, self.working_set.time_value(cutoff).as_py())
        if deleted:
            log.info("%s: retention deleted %s rows older than %s", self.spec.dataset, f"{deleted:,}", cutoff)
        return deleted

    def status_row(self) -> dict:
        row = asdict(self.status)
        row.update(engine=self.spec.engine, mode=self.spec.mode, refresh_mode=self.spec.refresh_mode)
        return row


class _Progress:
    """Counts the rows and bytes of a refresh as they stream; logs progress lines; keeps the
    source's own error (an engine reading the stream would only report its own wrapper)."""

    def __init__(self, refresher: Refresher, stamp: Stamp):
        self.refresher = refresher
        self.stamp = stamp
        self.rows = 0
        self.source_error: str | None = None  # the message only: the exception would keep frames alive

    def wrap(self, reader: pa.RecordBatchReader) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(reader.schema, self._batches(reader))

    def _batches(self, reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
        started = last_report = time.monotonic()
        name = self.refresher.spec.dataset
        try:
            for batch in reader:
                if self.refresher.stopping:  # a stop waits for the refresh under way: end it here
                    raise ConnectorError(f"{name}: the refresh was stopped")
                self.rows += batch.num_rows
                self.stamp.bytes += batch.nbytes
                self.refresher.status.rows_loaded = self.rows
                now = time.monotonic()
                if now - last_report >= PROGRESS_EVERY_SECONDS:
                    last_report = now
                    log.info("%s: refresh in progress: %s rows (%s rows/s)", name, f"{self.rows:,}",
                             f"{self.rows / (now - started):,.0f}")
                yield batch
        except Exception as error:
            self.source_error = first_line(error) if isinstance(error, ConnectorError) \
                else clean_engine_message(str(error))
            raise

    def raise_source_error(self) -> None:
        if self.source_error is not None:
            raise ConnectorError(self.source_error)


class PendingCopy(Connector):
    """Where an ``on_load`` dataset's queries go before its first copy: they wait for it
    (up to ``ready_timeout``), then read it, or fail saying why."""

    kind = "accelerated"

    def __init__(self, refresher: Refresher):
        super().__init__({}, refresher.source.base_dir)
        self.refresher = refresher

    def describe(self) -> str:
        return f"acceleration of {self.refresher.spec.dataset} (loading)"

    def tables(self) -> list[str]:
        return [self.refresher.store.table]

    def schema(self, table: str) -> pa.Schema:
        return self.refresher.store.schema

    def open_scan(self, table, columns, filters, limit) -> pa.RecordBatchReader:
        refresher = self.refresher
        if not refresher.loaded.wait(refresher.spec.ready_timeout):
            why = f"; the last attempt failed: {refresher.status.last_error}" if refresher.status.last_error else ""
            raise ConnectorError(
                f"dataset {refresher.spec.dataset} is not loaded yet (acceleration ready_state: on_load, "
                f"waited {refresher.spec.ready_timeout:g}s){why}")
        return refresher.serving().scan(refresher.store.table, columns, filters, limit)


class SourceWhenEmpty(Connector):
    """``on_zero_results: use_source``: a scan that finds nothing in the copy asks the source."""

    kind = "accelerated"

    def __init__(self, copy: Connector, source: Connector, source_table: str):
        super().__init__({}, source.base_dir)
        self.copy = copy
        self.source = source
        self.source_table = source_table
        self.stats = copy.stats

    def describe(self) -> str:
        return f"{self.copy.describe()}, else {self.source.describe()}"

    def tables(self) -> list[str]:
        return self.copy.tables()

    def schema(self, table: str) -> pa.Schema:
        return self.copy.schema(table)

    def open_scan(self, table, columns, filters, limit) -> pa.RecordBatchReader:
        # Filter columns may lie outside the projection: read them to judge emptiness.
        needed = None if columns is None else \
            columns + sorted(set().union(*map(fx.referenced_columns, filters)) - set(columns))
        local = self.copy.scan(table, needed, filters, limit)
        matching = to_arrow(fx.And(tuple(filters))) if filters else None
        seen: list[pa.RecordBatch] = []
        for batch in local:  # a copy may pre-filter loosely (or not at all): judge by the filter
            seen.append(batch)
            if batch.num_rows and (matching is None or batch.filter(matching).num_rows):
                schema = local.schema if columns is None else pa.schema([local.schema.field(c) for c in columns])
                return pa.RecordBatchReader.from_batches(schema, _projected(itertools.chain(seen, local), columns))
        return self.source.scan(self.source_table, columns, filters, limit)


def _projected(batches: Iterator[pa.RecordBatch], columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    for batch in batches:
        yield batch if columns is None else batch.select(columns)


def _minus_seconds(value: Any, seconds: float) -> Any:
    if isinstance(value, (dt.datetime, dt.date)):
        return value - dt.timedelta(seconds=seconds)
    return value - seconds  # a numeric time column counts seconds
