"""The runtime's accelerations: one store and refresher per accelerated dataset.

The Stack hands each accelerated dataset over with its source connector and a ``route``
callback that points the dataset's queries at a connector; this module never imports the
planner. Engines are shared: every DuckDB copy lives in one DuckDB instance (so queries over
several copies run whole inside it), every SQLite copy of a mode in one database file, and
Arrow copies in one in-memory connector.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from accel.arrow_store import ArrowCopies, ArrowStore
from accel.change_capture import ChangeCapture
from accel.duckdb_store import DuckDBEngine, DuckDBStore
from accel.refresh import Refresher, RefreshStatus, Route
from accel.spec import AccelerationSpec, changes_unsupported
from accel.sqlite_store import SQLiteEngine, SQLiteStore
from accel.store import Store, StoreError
from accel.working_set import WorkingSet
from federation.changes import ChangeSource
from federation.connectors.base import Connector

log = logging.getLogger("flightdeck.accel")


class AccelerationError(ValueError):
    """An acceleration cannot be set up or asked for; the message says which and why."""


@dataclass
class AcceleratedSource:
    spec: AccelerationSpec
    schema: pa.Schema
    connector: Connector   # the source
    table: str             # the dataset's table in the source connector
    route: Route


class Accelerator:
    def __init__(self, sources: list[AcceleratedSource], data_dir: Path, base_dir: Path,
                 batch_rows: int = 65_536, memory_limit: int | None = None,
                 expected: list[AccelerationSpec] = ()):
        """``memory_limit``: bytes DuckDB may use for the copies and queries over them (None: its
        default). ``expected``: accelerations whose sources may be added later (``add``), once
        they can be reached: the DuckDB instance is set up for them too, as it cannot attach a
        database file once its configuration is locked."""
        self.data_dir = data_dir
        self.base_dir = base_dir
        self.batch_rows = batch_rows
        self._duckdb: DuckDBEngine | None = None
        self._sqlite: dict[str, SQLiteEngine] = {}
        self._arrow: ArrowCopies | None = None
        specs = [s.spec for s in sources] + list(expected)
        uses_file = any(spec.engine == "duckdb" and spec.mode == "file" for spec in specs)
        if any(spec.engine == "duckdb" for spec in specs):
            self._duckdb = DuckDBEngine(data_dir if uses_file else None, base_dir, memory_limit)
        self.refreshers: dict[str, Refresher] = {}
        # Each change to the refreshers (a new dict, not an insertion: other threads may be going
        # through them) or to the stopped ones is made under this lock: two datasets added,
        # taken out or stopped at once must not lose each other's change.
        self._changing = threading.Lock()
        self._added_late: set[str] = set()
        self._stopped: list[Refresher] = []  # no longer copying, a refresh of theirs still ending: close waits
        self._left_copies: set[str] = set()  # datasets whose copy in the store a stopped refresher left
        for source in sources:
            self.add(source)

    def add(self, source: AcceleratedSource, late: bool = False) -> Refresher | None:
        """The dataset's store and refresher, not started (None: its copy cannot hold the
        source's columns, so its data is read where it is). ``late``: added after startup, when
        its source could first be opened; it does not hold back readiness (``gates_readiness``)."""
        problems = source.spec.problems()
        if problems:
            raise AccelerationError(f"dataset {source.spec.dataset}: acceleration: {problems[0]}")
        try:
            store = self._store(source)
        except StoreError as error:
            log.warning("dataset %s: not accelerated: %s", source.spec.dataset, error)
            return None
        working_set = self._working_set(source)
        kind = Refresher
        if source.spec.refresh_mode == "changes":
            if not isinstance(source.connector, ChangeSource):
                raise AccelerationError(f"dataset {source.spec.dataset}: acceleration: "
                                        f"{changes_unsupported(source.connector.kind)}")
            kind = ChangeCapture
        refresher = kind(source.spec, store, working_set, source.connector, source.table, source.route)
        # The copy a stopped refresher left is as old as its last refresh: loaded afresh, not served.
        refresher.serves_kept_copy = source.spec.dataset not in self._left_copies
        with self._changing:
            self.refreshers = {**self.refreshers, source.spec.dataset: refresher}
            if late:
                self._added_late.add(source.spec.dataset)
        return refresher

    def take_new_columns(self, source: AcceleratedSource) -> bool:
        """The dataset's source has other columns now: its copy is made again with them, at once,
        by its refresher (False: its copy cannot hold them, and the dataset is read where it is
        from now on). Does not wait."""
        dataset = source.spec.dataset
        try:
            store = self._store(source)
        except StoreError as error:
            log.warning("dataset %s: not accelerated any more: %s", dataset, error)
            self.stop_copying(dataset, wait=False)
            return False
        self.refreshers[dataset].take_new_columns(store, self._working_set(source), source.connector)
        return True

    def stop_copying(self, dataset: str, wait: bool = True) -> None:
        """The dataset's copy is not kept fresh any more (its refresher stops; with ``wait``, a
        refresh under way is given 10 s to end), nor served."""
        refresher = self.refreshers.get(dataset)
        if refresher is not None:
            refresher.stop(wait)
            self.remove(dataset)
            with self._changing:
                self._left_copies.add(dataset)
                # Only those still ending are kept: a dataset that flips between refused and
                # served would otherwise keep every refresher it ever had.
                self._stopped = [r for r in [*self._stopped, refresher] if not r.ended]

    def remove(self, dataset: str) -> None:
        """Takes back an ``add`` (its refresher not started, or stopped)."""
        with self._changing:
            self.refreshers = {name: r for name, r in self.refreshers.items() if name != dataset}
            self._added_late.discard(dataset)

    def gates_readiness(self, dataset: str) -> bool:
        """Whether the server is ready only once this dataset's first copy is loaded (its
        ``ready_state: on_load``): not for one added late, which a ready server was serving without."""
        refresher = self.refreshers.get(dataset)
        return refresher is not None and refresher.spec.ready_state == "on_load" and dataset not in self._added_late

    def _working_set(self, source: AcceleratedSource) -> WorkingSet:
        return WorkingSet(source.spec.dataset, source.schema, source.connector, source.table,
                          source.spec.refresh_sql, source.spec.time_column, self.batch_rows)

    def _store(self, source: AcceleratedSource) -> Store:
        spec = source.spec
        if spec.engine == "duckdb":
            return DuckDBStore(spec.dataset, source.schema, spec.mode, self._duckdb)
        if spec.engine == "sqlite":
            if spec.mode not in self._sqlite:
                self._sqlite[spec.mode] = SQLiteEngine(spec.mode, self.data_dir, self.base_dir)
            return SQLiteStore(spec.dataset, source.schema, spec.mode, self._sqlite[spec.mode])
        if self._arrow is None:
            self._arrow = ArrowCopies(self.base_dir)
        return ArrowStore(spec.dataset, source.schema, spec.mode, self._arrow)

    def start(self) -> None:
        for refresher in self.refreshers.values():
            refresher.start()

    def refresher(self, dataset: str) -> Refresher:
        found = self.refreshers.get(dataset) or self.refreshers.get(f"public.{dataset}")
        if found is None:
            known = ", ".join(sorted(self.refreshers)) or "none"
            raise AccelerationError(f"dataset {dataset} is not accelerated (accelerated: {known})")
        return found

    def refresh(self, dataset: str, refresh_sql: str | None = None) -> RefreshStatus:
        """Refresh one dataset now and wait for it; a one-off ``refresh_sql`` replaces the
        working set for this refresh only."""
        return self.refresher(dataset).refresh(refresh_sql)

    def status_rows(self) -> dict[str, dict]:
        return {name: refresher.status_row() for name, refresher in self.refreshers.items()}

    def connectors(self) -> list[Connector]:
        """The local engines' readers (their counters show what queries read locally)."""
        readers = [self._duckdb.reader] if self._duckdb else []
        readers += [engine.reader for engine in self._sqlite.values()]
        return readers + ([self._arrow] if self._arrow else [])

    def close(self) -> None:
        with self._changing:  # emptied here, so that a stop under way cannot put one back
            refreshers = [*self.refreshers.values(), *self._stopped]
            self.refreshers, self._stopped = {}, []
        for refresher in refreshers:
            refresher.stop()
        if self._duckdb is not None:
            self._duckdb.close()
        for engine in self._sqlite.values():
            engine.close()
