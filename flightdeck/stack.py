"""The Stack: what one configuration builds (catalog, engine, accelerator, models, search
indexes), without any door; the Service answers requests over it."""
from __future__ import annotations

import logging
import threading

from accel.accelerator import AcceleratedSource, AccelerationError, Accelerator
from accel.refresh import Refresher
from accel.spec import AccelerationSpec
from federation.catalog import Catalog, Dataset, deregister
from federation.catalog_view import CatalogView, unmasked_columns, visible_columns
from federation.masks import ColumnMasks
from federation.system import SnapshotConnector
from federation.engine import EngineSettings, QueryEngine
from flightdeck.audit import QUERIES_SCHEMA, QUERIES_TABLE, AuditLog
from flightdeck.config import ConfigError, LoadedConfig
from flightdeck.grants import Grant, qualified
from flightdeck.late_datasets import REFUSED, SERVED, UNAVAILABLE, LateDatasets, SchemaChecks
from flightdeck.metrics import Metrics
from flightdeck.model_functions import ModelFunctions, model_registry
from inference.native_threads import one_blas_thread
from flightdeck.search_functions import FUNCTION_NAMES as SEARCH_FUNCTIONS, DatasetSearchSettings, SearchIndexes

log = logging.getLogger("flightdeck.stack")

# A dataset's error when a key's mask names a column it turns out not to have: the details name
# the key and the dataset's columns, which other keys may not see.
MASK_MISMATCH = "a key's mask names a column this dataset does not have (the server's log says which)"
COLUMNS_CHANGED_UNDER_GRANTS = ("its source's columns changed under a key's masks or column grant: it is served "
                                "again after a restart")


class Stack:
    def __init__(self, loaded: LoadedConfig):
        config = loaded.config
        runtime = config.runtime
        self.loaded = loaded
        self.catalog = Catalog(config.dataset_specs(), loaded.base_dir)
        self.mask_key = (runtime.auth.mask_key or "").encode()
        try:
            self._check_masks()
        except ConfigError:
            self.catalog.close()
            raise
        self._accelerations = {spec.dataset: spec for spec in config.acceleration_specs()}
        self.accelerator = self._accelerator(loaded)
        self.catalog.status_extension = self._acceleration_status
        self.audit = self._audit_log(loaded)
        self.catalog.system_tables[QUERIES_TABLE] = SnapshotConnector(QUERIES_TABLE, QUERIES_SCHEMA, self.audit.rows)
        self.engine_settings = EngineSettings(batch_rows=runtime.limits.batch_rows,
                                              plan_cache_entries=runtime.limits.plan_cache_entries,
                                              memory_limit=runtime.limits.memory_limit)
        self.engine = QueryEngine(self.catalog, self.engine_settings)
        # `embeddings` / `models` from the config (plus the bundled minilm), each loaded on first use;
        # embed() and predict() in SQL.
        self.models = model_registry(loaded)
        self.model_functions = ModelFunctions(self.models).install(self.engine)
        one_blas_thread()  # before the first search: a server's vector math runs on its caller's thread
        self.search = self._search_indexes(loaded)
        self._granted_engines: dict[Grant, QueryEngine] = {}
        self._engines_lock = threading.Lock()
        self.metrics = self._metrics()
        for refresher in self.accelerator.refreshers.values():
            self._record_each_refresh(refresher)
        self.accelerator.start()
        self._closed = False
        self.late = LateDatasets(self.catalog.unavailable(), self.bring_in, runtime.retry_unavailable_seconds)
        self.late.start()
        self._refused_by_masks: set[str] = set()  # checked again: a mask may match the columns again
        self._reopenings: dict[str, threading.RLock] = {}
        self._reopenings_lock = threading.Lock()
        self.schema_checks = SchemaChecks(self._schema_checked, self.check_schema, runtime.schema_check_seconds)
        self.schema_checks.start()

    def _accelerator(self, loaded: LoadedConfig) -> Accelerator:
        sources, expected = [], []
        for spec in loaded.config.acceleration_specs():
            if self.catalog.datasets[spec.dataset].state != "ready":
                log.warning("dataset %s: not accelerated until its source can be opened", spec.dataset)
                expected.append(spec)
                continue
            sources.append(self._accelerated_source(spec, self.catalog.datasets[spec.dataset]))
        try:
            return Accelerator(sources, loaded.data_dir, loaded.base_dir,
                               batch_rows=loaded.config.runtime.limits.batch_rows,
                               memory_limit=loaded.config.runtime.limits.memory_limit, expected=expected)
        except Exception:
            self.catalog.close()
            raise

    def _accelerated_source(self, spec: AccelerationSpec, dataset: Dataset) -> AcceleratedSource:
        return AcceleratedSource(
            spec, dataset.arrow_schema, dataset.source_connector, dataset.spec.location,
            route=lambda connector, table, name=spec.dataset: self.catalog.route(name, connector, table))

    def _search_indexes(self, loaded: LoadedConfig) -> SearchIndexes:
        """Search indexes over accelerated columns, rebuilt by each refresh; SQL table functions."""
        accelerations = {spec.dataset: spec for spec in loaded.config.acceleration_specs()}

        def settings(dataset: str) -> DatasetSearchSettings:
            acceleration = accelerations[dataset]
            return DatasetSearchSettings(
                self.catalog.datasets[dataset].arrow_schema,
                loaded.data_dir / "embeddings" if acceleration.mode == "file" else None,
                acceleration.ready_timeout)

        specs = [spec for spec in loaded.config.search_specs() if spec.dataset in self.accelerator.refreshers]
        indexes = SearchIndexes(specs, self.models.embedder, settings)
        for dataset in indexes.datasets():  # each is accelerated: the specs were filtered above
            self._index_each_refresh(indexes, dataset)
        self._install_search(self.engine, indexes.table_functions())
        return indexes

    def _index_each_refresh(self, indexes: SearchIndexes, dataset: str) -> None:
        self.accelerator.refreshers[dataset].listeners.append(
            lambda refresher: indexes.on_refreshed(dataset, refresher.status.data_as_of, refresher.store.read_all()))

    def bring_in(self, name: str) -> str:
        """Tries again to open a dataset whose source could not be opened. Once it can be, the
        dataset is served as if it had been there from the start: registered in every session,
        accelerated and indexed as configured (kept plans are made again). UNAVAILABLE while it
        still cannot be opened or set up; REFUSED when what it turns out to be breaks the
        configuration (a mask naming a column it lacks): its error says so."""
        with self._reopening(name):
            opened = self.catalog.open_again(name)  # talks to the source: not under the engines lock
            if opened.error is not None:
                self.catalog.datasets[name].error = opened.error
                return UNAVAILABLE
            with self._engines_lock:  # no grant's engine is made meanwhile without the dataset
                if self._closed:
                    return REFUSED
                outcome = self._serve(opened)
            if outcome == REFUSED:  # not refreshed for nothing; waited for outside the lock
                self.accelerator.stop_copying(name)
            if outcome == SERVED:
                self._refused_by_masks.discard(name)
                log.info("dataset %s is available now", name)
            return outcome

    def _reopening(self, name: str) -> threading.RLock:
        """Held while a dataset is opened again (its late retry, its schema check): the second
        waits for the first to end, stop of its copy included; a stop looks its refresher up by
        name, and would otherwise stop the one the second had just taken up."""
        with self._reopenings_lock:
            return self._reopenings.setdefault(name, threading.RLock())

    def _schema_checked(self) -> list[str]:
        """The datasets whose sources' columns are checked now: those read where they are in
        databases whose tables may be altered, the copies of such tables whose last refresh
        failed, and the datasets refused for their masks (which may match the columns again)."""
        return [name for name in self.catalog.schema_checked() if self._columns_checked(name)] + \
            sorted(self._refused_by_masks)

    def _columns_checked(self, name: str) -> bool:
        """Whether a dataset's source is asked for its columns now. A copy's source is asked
        nothing but its refreshes while they succeed (a column added there is copied after a
        restart); a copy that follows a change stream learns of changes from the stream."""
        acceleration = self._accelerations.get(name)
        if acceleration is None:
            return True
        refresher = self.accelerator.refreshers.get(name)
        if refresher is None:  # read where it is: its copy could not hold its columns
            return True
        return acceleration.refresh_mode != "changes" and refresher.last_refresh_failed

    def check_schema(self, name: str) -> None:
        """When a dataset's table has changed its columns at its source (a column retyped,
        added, dropped), the dataset is read as it is now in every session: plans made for the
        old columns would send the source casts that no longer hold (an integer cast of what is
        now a decimal sums rounded values), and an accelerated one's copy is made again with the
        new columns (reading the source meanwhile). A dataset refused for its masks is tried again."""
        with self._reopening(name):
            if name in self._refused_by_masks:
                self.bring_in(name)
                return
            if not self.catalog.source_changed(name):
                return
            opened = self.catalog.open_again(name)
            if opened.error is not None:  # served as it was until a check can open it
                return
            log.warning("dataset %s: its source's columns changed: reading them again", name)
            with self._engines_lock:
                if self._closed:
                    return
                previous = self.catalog.datasets[name]
                added = sorted(set(opened.arrow_schema.names) - set(previous.arrow_schema.names))
                # A column renamed and one of the old name added: a mask would follow the name, and
                # the values it hid would show under the new one. A column a grant lists renamed
                # away, a hidden one renamed to its name: the grant would show the hidden values.
                if (added and self._masks_name(name)) or \
                        (_renamed(previous.arrow_schema.names, opened.arrow_schema.names) and self._lists_columns(name)):
                    log.error("dataset %s is not served: its columns changed under a key's masks or column grant "
                              "(new: %s); restart to serve it with the grants as configured", name,
                              ", ".join(added) or "none, some moved")
                    self._take_out(name, COLUMNS_CHANGED_UNDER_GRANTS)
                    outcome = REFUSED
                else:
                    outcome = self._serve(opened)
            if outcome == REFUSED:  # not refreshed for nothing; waited for outside the lock
                self.accelerator.stop_copying(name)
            elif outcome == UNAVAILABLE:
                self.late.add(name)

    def _masks(self) -> list[tuple[str, dict]]:
        """Each principal's masks, with who it is (for the log): {dataset: {column: kind}}."""
        auth = self.loaded.config.runtime.auth
        return [(f"api key {k.name}", k.masks) for k in auth.keys()] + \
            [(f"user {u.username}", u.masks) for u in auth.users]

    def _masks_name(self, name: str) -> bool:
        return any(qualified(dataset) == name for _, masks in self._masks() for dataset in masks)

    def _lists_columns(self, name: str) -> bool:
        """Whether some principal's grant shows only some columns of the dataset."""
        auth = self.loaded.config.runtime.auth
        return any(qualified(dataset) == name for granted in [*auth.keys(), *auth.users] for dataset in granted.columns)

    def _take_out(self, name: str, error: str) -> None:
        """The dataset out of every session, unavailable with ``error``; called with the lock held."""
        for engine in self._engines():
            deregister(engine.ctx, name)
        self.search.remove(name)
        self.catalog.datasets[name].error = error
        self.catalog.changed()

    def _serve(self, opened: Dataset) -> str:
        """Serves a dataset opened afresh, in place of the one of its name in every session, with
        its copy and indexes when accelerated, then admits it into the catalog; called with the
        lock held. What can fail is done first, and a failure undoes the rest: a dataset is
        served whole or not at all."""
        name = opened.qualified_name
        problems = self._mask_problems({name: opened})
        if problems:  # the details name other keys and the columns: for the server's log only
            log.error("dataset %s is not served: %s", name, "; ".join(problems))
            self._take_out(name, MASK_MISMATCH)
            self._refused_by_masks.add(name)
            return REFUSED
        acceleration = self._accelerations.get(name)
        copied = self.accelerator.refreshers.get(name)  # a copy of the dataset as it was
        refresher = None
        if acceleration is not None and copied is None:
            try:
                refresher = self.accelerator.add(self._accelerated_source(acceleration, opened), late=True)
            except AccelerationError as error:
                self._take_out(name, str(error))
                log.error("dataset %s is not served: %s", name, error)
                return REFUSED
        previous = self.catalog.datasets[name]
        try:
            for engine in self._engines():
                deregister(engine.ctx, name)
                engine.catalog.register_dataset(engine.ctx, opened)
            problem = opened.error  # set when the session could not read it (a file half written)
            if problem is None:
                self.catalog.admit(opened)
                if refresher is not None or copied is not None:  # indexes of its columns, from the catalog
                    self.search.remove(name)
                    self.search.add([spec for spec in self.loaded.config.search_specs() if spec.dataset == name])
        except Exception as error:
            log.debug("dataset %s: setting it up failed", name, exc_info=True)
            problem = f"it could not be set up once its source answered ({type(error).__name__})"
        if problem is not None:
            if refresher is not None:
                self.accelerator.remove(name)
            self.catalog.admit(previous)
            self._take_out(name, problem)
            log.warning("dataset %s is unavailable: %s", name, problem)
            return UNAVAILABLE
        if refresher is not None:
            if name in self.search.datasets():
                self._index_each_refresh(self.search, name)
            self._record_each_refresh(refresher)
            refresher.start()  # an on_load dataset routes to its pending copy at once
        # Read at its source until copied again with its columns as they are now.
        if copied is not None and not self.accelerator.take_new_columns(self._accelerated_source(acceleration, opened)):
            self.search.remove(name)  # read where it is from now on, not copied: nothing to search
        self.catalog.changed()
        return SERVED

    def _engines(self) -> list[QueryEngine]:
        """Every session's engine: the full one, and each grant's made so far."""
        return [self.engine, *self._granted_engines.values()]

    def engine_for(self, grant: Grant) -> QueryEngine:
        """The engine whose session holds only what ``grant`` shows (made on first use; one per
        distinct grant, so principals granted alike share it)."""
        if grant.is_full:
            return self.engine
        engine = self._granted_engines.get(grant)  # the common case needs no lock
        if engine is not None:
            return engine
        with self._engines_lock:
            engine = self._granted_engines.get(grant)
            if engine is None:
                engine = self._granted_engines[grant] = self._granted_engine(grant)
            return engine

    def _masks_of(self, grant: Grant):
        """A grant's masks of a dataset's columns (None: none), hashed with the configured key."""
        return lambda dataset: ColumnMasks.of(grant.masks_of(dataset), self.mask_key)

    def _check_masks(self) -> None:
        """Every mask names a configured dataset and a column it has (a typo would leave a
        column unmasked); raises ConfigError naming each that does not."""
        problems = self._mask_problems(self.catalog.datasets, unknown_datasets=True)
        if problems:
            raise ConfigError("\n".join(problems))

    def _mask_problems(self, datasets: dict[str, Dataset], unknown_datasets: bool = False) -> list[str]:
        """What the masks say wrong of these datasets (of their columns known so far), and,
        with ``unknown_datasets``, each mask naming a dataset that is not configured."""
        problems = []
        for who, masks in self._masks():
            for name, kinds in masks.items():
                dataset = datasets.get(qualified(name))
                if dataset is None:
                    if unknown_datasets:
                        problems.append(f"runtime.auth {who}: masks name dataset {name}, which is not configured")
                elif dataset.arrow_schema is not None:
                    problems += [f"runtime.auth {who}: masks name column {column} of {name}, which it does not "
                                 f"have (columns: {', '.join(dataset.arrow_schema.names)})"
                                 for column in kinds if column not in dataset.arrow_schema.names]
        return problems

    def _audit_log(self, loaded: LoadedConfig) -> AuditLog:
        audit = loaded.config.runtime.audit
        path = loaded.base_dir / audit.log if audit.log else None
        return AuditLog(audit.capacity, path, audit.max_bytes, audit.backups, audit.parameters)

    def _granted_engine(self, grant: Grant) -> QueryEngine:
        # The queries of principals granted alike (usually one key): a grant's own audit rows,
        # or everyone's for a grant that includes the audit.
        own_queries = SnapshotConnector(QUERIES_TABLE, QUERIES_SCHEMA,
                                        lambda: self.audit.rows(lambda entry: grant.audit or entry.grant == grant))
        view = CatalogView(self.catalog, grant.sees, grant.columns_of, [own_queries], self._masks_of(grant))
        engine = QueryEngine(view, self.engine_settings)
        self.model_functions.install(engine)
        self._install_search(engine, self.search.table_functions(visible_columns(view), self._masks_of(grant),
                                                                 unmasked_columns(view)))
        return engine

    @staticmethod
    def _install_search(engine: QueryEngine, functions: list) -> None:
        for function in functions:
            engine.ctx.register_udtf(function)
        engine.bounded_table_functions |= SEARCH_FUNCTIONS

    def _metrics(self) -> Metrics:
        metrics = Metrics()
        metrics.watch(self.catalog.source_stats, self.catalog.dataset_rows, self.catalog.pool.budgets.snapshot)
        metrics.watch_plans(self.engine.plans.snapshot)
        return metrics

    def _record_each_refresh(self, refresher: Refresher) -> None:
        refresher.listeners.append(lambda r: _record_refresh(self.metrics, r))

    def refresh(self, dataset: str, refresh_sql: str | None = None) -> dict:
        """Refresh an accelerated dataset now; returns its status after the refresh."""
        self.accelerator.refresh(dataset, refresh_sql)
        return self.accelerator.refresher(dataset).status_row()

    def _acceleration_status(self, dataset: str) -> dict:
        refresher = self.accelerator.refreshers.get(dataset)
        if refresher is None:
            return {}
        row = refresher.status_row()
        row["embedded_last_refresh"], row["embedded_total"] = self.search.embedded(dataset)
        return {"acceleration": f"{row['engine']} ({row['mode']})", "refresh_state": row["state"],
                **{key: row[key] for key in ("refresh_mode", "last_refresh_start", "last_refresh_end",
                                             "last_refresh_rows", "rows_loaded", "rows", "bytes",
                                             "last_error", "data_as_of", "refreshes", "failures",
                                             "embedded_last_refresh", "embedded_total", "changes_applied",
                                             "lag_p50_ms", "lag_p99_ms", "skipped", "last_skip_reason",
                                             "position", "source_backlog_bytes")}}

    def close(self) -> None:
        """Stop the refreshers and release every backend and local engine."""
        self.late.stop()
        self.schema_checks.stop()
        with self._engines_lock:  # a dataset being brought in is either in, or will not be
            self._closed = True
        self.accelerator.close()
        self.catalog.close()
        self.audit.close()
        # Break the reference cycles between the parts (callbacks, routed connectors), so that
        # they are freed here, on this thread, not by the cyclic collector on whatever thread
        # it runs next: freeing engine objects on one of DataFusion's threads crashes.
        self.catalog.status_extension = None
        self._granted_engines.clear()
        for dataset in self.catalog.datasets.values():
            dataset.registrations.clear()


def _record_refresh(metrics: Metrics, refresher) -> None:
    """A refresh's duration (a kept file copy served at start, before any refresh, has none)."""
    start, end = refresher.status.last_refresh_start, refresher.status.last_refresh_end
    if start is not None and end is not None:
        metrics.refreshed(refresher.spec.dataset, (end - start).total_seconds())


def _renamed(before: list[str], after: list[str]) -> bool:
    """Whether a table's columns, by name, may have been renamed: a name gone and one new (a
    column renamed), or the names both have in another order (two swapped through a third).
    A column dropped and another renamed to its name in one change looks like the drop alone."""
    gone, new = set(before) - set(after), set(after) - set(before)
    return bool(gone and new) or [n for n in before if n in after] != [n for n in after if n in before]
