"""The Stack: what one configuration builds (catalog, engine, accelerator, models, search
indexes), without any door; the Service answers requests over it."""
from __future__ import annotations

import logging

from accel.accelerator import AcceleratedSource, Accelerator
from federation.catalog import Catalog
from federation.engine import EngineSettings, QueryEngine
from flightdeck.config import LoadedConfig
from flightdeck.metrics import Metrics
from flightdeck.model_functions import ModelFunctions, model_registry
from flightdeck.search_functions import DatasetSearchSettings, SearchIndexes

log = logging.getLogger("flightdeck.stack")


class Stack:
    def __init__(self, loaded: LoadedConfig):
        config = loaded.config
        runtime = config.runtime
        self.loaded = loaded
        self.catalog = Catalog(config.dataset_specs(), loaded.base_dir)
        self.accelerator = self._accelerator(loaded)
        self.catalog.status_extension = self._acceleration_status
        self.engine = QueryEngine(self.catalog, EngineSettings(batch_rows=runtime.limits.batch_rows,
                                                                  plan_cache_entries=runtime.limits.plan_cache_entries))
        # `embeddings` / `models` from the config (plus the bundled minilm), each loaded on first use;
        # embed() and predict() in SQL.
        self.models = model_registry(loaded)
        self.model_functions = ModelFunctions(self.models).install(self.engine)
        self.search = self._search_indexes(loaded)
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
                               batch_rows=loaded.config.runtime.limits.batch_rows)
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
                lambda refresher, name=dataset: indexes.on_refreshed(name, refresher.store.read_all()))
        for function in indexes.table_functions():
            self.engine.ctx.register_udtf(function)
        return indexes

    def _metrics(self) -> Metrics:
        metrics = Metrics()
        metrics.watch(self.catalog.source_stats, self.catalog.dataset_rows)
        metrics.watch_plans(self.engine.plans.snapshot)
        for refresher in self.accelerator.refreshers.values():
            refresher.listeners.append(lambda r: metrics.refreshed(
                r.spec.dataset, (r.status.last_refresh_end - r.status.last_refresh_start).total_seconds()))
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
                                             "embedded_last_refresh", "embedded_total")}}

    def close(self) -> None:
        """Stop the refreshers and release every backend and local engine."""
        self.accelerator.close()
        self.catalog.close()
        # Break the reference cycles between the parts (callbacks, routed connectors), so that
        # they are freed here, on this thread, not by the cyclic collector on whatever thread
        # it runs next: freeing engine objects on one of DataFusion's threads crashes.
        self.catalog.status_extension = None
        self.accelerator.refreshers.clear()
        for dataset in self.catalog.datasets.values():
            dataset.registrations.clear()
