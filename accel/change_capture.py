"""Keeping a copy in step with its source's change stream (``refresh_mode: changes``).

One ``ChangeCapture`` per such dataset. Its thread takes the source's consistent snapshot into
the store together with the position the stream resumes from, then applies each batch of
changes in one local transaction that also records the batch's position. The committed copy
and its position always agree, so a restart of a file-mode copy resumes exactly there: nothing
lost, nothing applied twice. A source confirms a batch's position at its server only when the
consumer asks for the next batch, i.e. once the batch is committed here.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import threading
import time
from collections import deque
from typing import Iterator

import pyarrow as pa

from accel.refresh import Refresher, RefreshStatus, Route, _Progress
from accel.spec import AccelerationSpec
from accel.store import Stamp, Store, StoreError
from accel.working_set import WorkingSet, WorkingSetError
from federation.changes import ChangeBatch, ChangeSource, SourceReset
from federation.connectors.base import Connector, ConnectorError
from federation.connectors.typing import conform_batch

log = logging.getLogger("flightdeck.accel")
MONITOR_EVERY_SECONDS = 2.0   # how often the source's backlog is read (and retention checked)


class ChangeCapture(Refresher):
    """A Refresher whose copy follows a ChangeSource instead of being re-read."""

    def __init__(self, spec: AccelerationSpec, store: Store, working_set: WorkingSet,
                 source: Connector, source_table: str, route: Route):
        super().__init__(spec, store, working_set, source, source_table, route)
        if not isinstance(source, ChangeSource):
            raise TypeError(f"{source.kind} cannot stream changes")
        self.changes: ChangeSource = source
        self.key = tuple(source.change_key(source_table))
        self._lags: deque[float] = deque(maxlen=spec.lag_window)
        self._snapshot_wanted = False
        self._snapshots = 0                  # counted under _done, so refresh() can wait for the next
        self._done = threading.Condition()
        self._monitor: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        super().start()
        self._monitor = threading.Thread(target=self._watch, name=f"changes monitor {self.spec.dataset}",
                                         daemon=True)
        self._monitor.start()

    def stop(self, wait: bool = True) -> None:
        super().stop(wait)
        if wait and self._monitor is not None:
            self._monitor.join(timeout=10)

    @property
    def ended(self) -> bool:
        return super().ended and (self._monitor is None or not self._monitor.is_alive())

    def refresh(self, refresh_sql: str | None = None) -> RefreshStatus:
        """Take a new snapshot now (e.g. after the source was reset) and wait for it."""
        if refresh_sql:
            raise WorkingSetError(f"dataset {self.spec.dataset} follows its source's changes: "
                                  "it has no working set to refresh with refresh_sql")
        with self._done:
            target = self._snapshots + 1
            self._snapshot_wanted = True
            self._wake.set()
            self._done.wait_for(lambda: self._snapshots >= target or self._stop.is_set(),
                                timeout=self.spec.ready_timeout + 300)
        return self.status

    def _run(self) -> None:
        if self.loaded.is_set():  # a copy kept from before a restart: index it before following
            with self._turn:
                self._notify()
        attempt = 0
        while not self._stop.is_set():
            self._wake.clear()
            applied = self.status.changes_applied
            try:
                position = None if self._snapshot_wanted else self._resume_position()
                if position is None:
                    position = self._snapshot()
                self._follow(position)
            except SourceReset as error:
                self._failed(error)
                # A reset met by the snapshot itself (a column gone) would only repeat: stop there.
                if self.spec.on_source_reset == "resnapshot" and not self._snapshot_wanted:
                    log.warning("%s: %s; taking a new snapshot", self.spec.dataset, self.status.last_error)
                    self._snapshot_wanted = True
                    continue
                self.status.state = "error"
                log.error("%s: %s; the copy stays as it was: refresh the dataset (or set "
                          "refresh_on_source_reset: resnapshot) to take a new snapshot",
                          self.spec.dataset, self.status.last_error)
                self._wake.wait()  # until stopped, or a refresh asks for a new snapshot
            except Exception as error:
                self._failed(error)
                # Waits grow until the stream applies a change again: one failing the same way at
                # once must not be retried every second while the source keeps its log for it.
                attempt = 1 if self.status.changes_applied > applied else attempt + 1
                if not self.spec.refresh_retry_enabled:
                    self.status.state = "error"
                    self._wake.wait()
                    continue
                delay = self._backoff(min(attempt, 16))
                self.retry_delays.append(delay)
                log.warning("%s: change stream failed: %s; again in %.1fs", self.spec.dataset,
                            self.status.last_error, delay)
                self._wake.wait(delay)

    def _failed(self, error: Exception) -> None:
        self.status.failures += 1
        self.status.last_error = self._describe(error)
        if not self.loaded.is_set():
            self.status.state = "error"
        elif self.status.state == "refreshing":  # a new snapshot failed: the copy serves as it was
            self.status.state = "ready"
        with self._done:  # a refresh waiting for a snapshot learns it failed
            self._done.notify_all()

    def _resume_position(self) -> dict | None:
        """Where a copy kept from before a restart stands; None: no copy, or one that follows
        no stream (e.g. made by a full refresh), so a snapshot is needed."""
        if not self.loaded.is_set():
            return None
        return self.store.position()

    # ---- snapshot ----------------------------------------------------------

    def _snapshot(self) -> dict:
        status = self.status
        with self._turn:
            started = dt.datetime.now(dt.timezone.utc)
            status.state = "refreshing" if self.loaded.is_set() else "loading"
            status.last_refresh_start = started
            status.rows_loaded = 0
            stamp = Stamp(as_of=started)
            reader, position = self.changes.snapshot(self.source_table)
            counter = _Progress(self, stamp)
            counted = counter.wrap(pa.RecordBatchReader.from_batches(self.store.schema, self._conformed(reader)))
            try:
                self.store.replace(counted, stamp, self.spec.indexes, position=position)
            except StoreError:
                counter.raise_source_error()
                raise
            finally:
                counted.close()
                reader.close()
            self._snapshot_wanted = False
            self._lags.clear()
            status.refreshes += 1
            status.last_refresh_rows = counter.rows
            status.last_refresh_end = dt.datetime.now(dt.timezone.utc)
            status.data_as_of = started
            status.last_error = None
            status.position = json.dumps(position)
            self._measure()
            log.info("%s: snapshot of %s rows in %.2fs; following changes from %s", self.spec.dataset,
                     f"{counter.rows:,}", (status.last_refresh_end - started).total_seconds(), status.position)
            self._notify()
            if not self.loaded.is_set():
                self._serve_copy()
            status.state = "ready"
        with self._done:
            self._snapshots += 1
            self._done.notify_all()
        return position

    def _conformed(self, reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
        for batch in reader:
            yield conform_batch(self._columns(batch), self.store.schema)

    def _columns(self, data: pa.RecordBatch | pa.Table) -> pa.RecordBatch | pa.Table:
        """``data`` with the copy's columns in its order; a column gone from the source is a
        schema change the copy cannot take without a restart (its schema is registered)."""
        missing = [name for name in self.store.schema.names if name not in data.schema.names]
        if missing:
            raise SourceReset(f"{self.changes.describe()}: column {', '.join(missing)} of the copy is no "
                              f"longer in {self.source_table}: restart flightdeck to take the new schema")
        return data.select(self.store.schema.names)

    # ---- changes -----------------------------------------------------------

    def _follow(self, position: dict) -> None:
        stream = self.changes.changes(self.source_table, position, self._wake)
        with contextlib.closing(stream):
            for batch in stream:
                self._apply(batch)
                if self._wake.is_set():
                    return

    def _apply(self, batch: ChangeBatch) -> None:
        upserts = None
        if batch.upserts is not None and batch.upserts.num_rows:
            table = self._columns(batch.upserts)
            upserts = pa.Table.from_batches([conform_batch(b, self.store.schema) for b in table.to_batches()],
                                            schema=self.store.schema)
        deletes = None
        if self.key and batch.deletes is not None and batch.deletes.num_rows:
            key_schema = pa.schema([self.store.schema.field(c) for c in self.key])
            deletes = pa.Table.from_batches([conform_batch(b, key_schema)
                                             for b in batch.deletes.select(list(self.key)).to_batches()],
                                            schema=key_schema)
        applied = dt.datetime.now(dt.timezone.utc)
        stamp = Stamp(as_of=applied, bytes=upserts.nbytes if upserts is not None else 0)
        with self._turn:
            self.store.apply_changes(upserts, deletes, self.key, stamp, batch.position)
            self._measure()
        status = self.status
        status.changes_applied += (upserts.num_rows if upserts is not None else 0) + \
            (deletes.num_rows if deletes is not None else 0)
        status.data_as_of = applied
        status.position = json.dumps(batch.position)
        if status.last_error is not None and status.state != "error":
            status.last_error = None  # the stream is flowing again
        status.state = "ready"
        if batch.committed_at is not None:
            self._lags.append(max(0.0, (dt.datetime.now(dt.timezone.utc) - batch.committed_at).total_seconds()))
            status.lag_p50_ms, status.lag_p99_ms = (round(q * 1000, 1) for q in percentiles(self._lags, 0.5, 0.99))
        if batch.skipped:
            status.skipped += len(batch.skipped)
            status.last_skip_reason = batch.skipped[-1]
            log.warning("%s: skipped %d records: %s", self.spec.dataset, len(batch.skipped), batch.skipped[-1])

    # ---- monitor -----------------------------------------------------------

    def _watch(self) -> None:
        """Reads the source's backlog for status and metrics, and applies retention when due."""
        retention_every = self._retention_interval()
        next_retention = time.monotonic() + retention_every if retention_every else None
        while not self._stop.wait(MONITOR_EVERY_SECONDS):
            try:
                self.status.source_backlog_bytes = self.changes.backlog(self.source_table)
            except ConnectorError as error:
                log.debug("%s: backlog unknown: %s", self.spec.dataset, error)
            if next_retention is not None and time.monotonic() >= next_retention:
                self.apply_retention()
                next_retention = time.monotonic() + retention_every


def percentiles(values: deque[float] | list[float], *quantiles: float) -> list[float]:
    """Nearest-rank percentiles of ``values`` (not empty)."""
    ordered = sorted(values)
    return [ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in quantiles]
