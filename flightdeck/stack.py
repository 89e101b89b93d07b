"""The Stack: what one configuration builds (catalog, engine, accelerator, models, search
indexes), without any door; the Service answers requests over it."""
from __future__ import annotations

import logging
import threading

from accel.accelerator import AcceleratedSource, Accelerator
from federation.catalog import Catalog
from federation.catalog_view import CatalogView, unmasked_columns, visible_columns
from federation.masks import ColumnMasks
from federation.system import SnapshotConnector
from federation.engine import EngineSettings, QueryEngine
from flightdeck.audit import QUERIES_SCHEMA, QUERIES_TABLE, AuditLog
from flightdeck.config import ConfigError, LoadedConfig
from flightdeck.grants import Grant, qualified
from flightdeck.metrics import Metrics
from flightdeck.model_functions import ModelFunctions, model_registry
from inference.native_threads import one_blas_thread
from flightdeck.search_functions import FUNCTION_NAMES as SEARCH_FUNCTIONS, DatasetSearchSettings, SearchIndexes

log = logging.getLogger("flightdeck.stack")


class Stack:
    def __init__(self, loaded: LoadedConfig):
        config = loaded.config
        runtime = config.runtime
        self.loaded = loaded
        self.catalog = Catalog(config.dataset_specs(), loaded.base_dir)
        self.mask_key = (runtime.auth.mask_key or "").encode()
        try:
            self._check_masks(loaded)
        except ConfigError:
            self.catalog.close()
            raise
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
        self.accelerator.start()

    def _accelerator(self, loaded: LoadedConfig) -> Accelerator:
        sources = []
        for spec in loaded.config.acceleration_specs():
            dataset = self.catalog.datasets[spec.dataset]
            if dataset.state != "ready":
                log.warning("dataset %s: not accelerated, its source is unavailable", spec.dataset)
                continue
            sources.append(AcceleratedSource(
                spec, dataset.arrow_schema, dataset.source_connector, dataset.spec.location,
                route=lambda connector, table, name=spec.dataset: self.catalog.route(name, connector, table)))
        try:
            return Accelerator(sources, loaded.data_dir, loaded.base_dir,
                               batch_rows=loaded.config.runtime.limits.batch_rows,
                               memory_limit=loaded.config.runtime.limits.memory_limit)
        except Exception:
            self.catalog.close()
            raise

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
            self.accelerator.refreshers[dataset].listeners.append(
                lambda refresher, name=dataset: indexes.on_refreshed(name, refresher.status.data_as_of,
                                                                     refresher.store.read_all()))
        self._install_search(self.engine, indexes.table_functions())
        return indexes

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

    def _check_masks(self, loaded: LoadedConfig) -> None:
        """Every mask names a configured dataset and a column it has (a typo would leave a
        column unmasked); raises ConfigError naming each that does not."""
        auth = loaded.config.runtime.auth
        problems = []
        for who, masks in [(f"api key {k.name}", k.masks) for k in auth.keys()] + \
                          [(f"user {u.username}", u.masks) for u in auth.users]:
            for name, kinds in masks.items():
                dataset = self.catalog.datasets.get(qualified(name))
                if dataset is None:
                    problems.append(f"runtime.auth {who}: masks name dataset {name}, which is not configured")
                elif dataset.arrow_schema is not None:
                    problems += [f"runtime.auth {who}: masks name column {column} of {name}, which it does not "
                                 f"have (columns: {', '.join(dataset.arrow_schema.names)})"
                                 for column in kinds if column not in dataset.arrow_schema.names]
        if problems:
            raise ConfigError("\n".join(problems))

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
        for refresher in self.accelerator.refreshers.values():
            refresher.listeners.append(lambda r: _record_refresh(metrics, r))
        return metrics

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
        self.accelerator.close()
        self.catalog.close()
        self.audit.close()
        # Break the reference cycles between the parts (callbacks, routed connectors), so that
        # they are freed here, on this thread, not by the cyclic collector on whatever thread
        # it runs next: freeing engine objects on one of DataFusion's threads crashes.
        self.catalog.status_extension = None
        self.accelerator.refreshers.clear()
        self._granted_engines.clear()
        for dataset in self.catalog.datasets.values():
            dataset.registrations.clear()


def _record_refresh(metrics: Metrics, refresher) -> None:
    """A refresh's duration (a kept file copy served at start, before any refresh, has none)."""
    start, end = refresher.status.last_refresh_start, refresher.status.last_refresh_end
    if start is not None and end is not None:
        metrics.refreshed(refresher.spec.dataset, (end - start).total_seconds())
