"""The stack's Prometheus metrics, the same for every door.

Names follow Prometheus conventions: the ``flightdeck_`` prefix, base units (seconds, bytes),
counters ending in ``_total``. Labels are low-cardinality words (door, outcome, dataset,
source kind and description, model): never SQL text, parameters or keys. Queries and
embeddings are counted as they happen; per-source traffic, dataset state and refresh
counters are read from the stack's own counters when scraped. Each Stack has its own
registry, so several stacks in one process (tests) do not collide.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

OK = "ok"
TRUNCATED = "truncated"  # ended early at a result limit, and said so
INTERNAL_ERROR = "internal_error"
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
REFRESH_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters and histograms of one Stack, and the collectors that read its live state."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.queries = Counter("flightdeck_queries", "SQL queries by door and outcome (ok or an error kind)",
                               ["door", "outcome"], registry=self.registry)
        self.query_duration = Histogram("flightdeck_query_duration_seconds",
                                        "Time from planning a query to the end of its result stream",
                                        ["door"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.result_rows = Counter("flightdeck_result_rows", "Rows returned to clients", ["door"],
                                   registry=self.registry)
        self.result_bytes = Counter("flightdeck_result_bytes", "Arrow bytes of the rows returned to clients",
                                    ["door"], registry=self.registry)
        self.refresh_duration = Histogram("flightdeck_refresh_duration_seconds",
                                          "Duration of successful refreshes of accelerated copies",
                                          ["dataset"], buckets=REFRESH_BUCKETS, registry=self.registry)
        self.embedding_requests = Counter("flightdeck_embedding_requests", "Embedding requests by model",
                                          ["model"], registry=self.registry)
        self.embedding_inputs = Counter("flightdeck_embedding_inputs", "Texts embedded by model",
                                        ["model"], registry=self.registry)
        self.embedding_tokens = Counter("flightdeck_embedding_tokens", "Tokens of the texts embedded, by model",
                                        ["model"], registry=self.registry)

    def query_finished(self, door: str, outcome: str, seconds: float, rows: int, nbytes: int) -> None:
        self.queries.labels(door, outcome).inc()
        self.query_duration.labels(door).observe(seconds)
        if rows:
            self.result_rows.labels(door).inc(rows)
        if nbytes:
            self.result_bytes.labels(door).inc(nbytes)

    def refreshed(self, dataset: str, seconds: float) -> None:
        self.refresh_duration.labels(dataset).observe(seconds)

    def embedded(self, model: str, inputs: int, tokens: int) -> None:
        self.embedding_requests.labels(model).inc()
        self.embedding_inputs.labels(model).inc(inputs)
        self.embedding_tokens.labels(model).inc(tokens)

    def watch(self, sources: Callable[[], list[dict]], datasets: Callable[[], list[dict]],
              budgets: Callable[[], list[dict]]) -> None:
        """Read per-source traffic, dataset state and load budgets from these callables at each scrape."""
        self.registry.register(_StackCollector(sources, datasets, budgets))

    def watch_plans(self, stats: Callable[[], dict[str, int]]) -> None:
        """Read the plan cache's counters (``PlanCacheStats`` fields, ``entries``) at each scrape."""
        self.registry.register(_PlanCollector(stats))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _StackCollector(Collector):
    def __init__(self, sources: Callable[[], list[dict]], datasets: Callable[[], list[dict]],
                 budgets: Callable[[], list[dict]]):
        self.sources = sources
        self.datasets = datasets
        self.budgets = budgets

    def collect(self) -> Iterable:
        yield from self._sources(self.sources())
        yield from self._datasets(self.datasets())
        yield from self._budgets(self.budgets())

    @staticmethod
    def _budgets(rows: list[dict]) -> Iterable:
        in_use = GaugeMetricFamily("flightdeck_source_budget_in_use",
                                   "Slots of each source's load budget held now", labels=["source"])
        waits = CounterMetricFamily("flightdeck_source_budget_waits",
                                    "Requests that waited for a slot of their source's load budget", labels=["source"])
        refusals = CounterMetricFamily("flightdeck_source_budget_refusals",
                                       "Queries refused: their source's load budget had no slot in time",
                                       labels=["source"])
        for row in rows:
            in_use.add_metric([row["source"]], row["in_use"])
            waits.add_metric([row["source"]], row["waits"])
            refusals.add_metric([row["source"]], row["refusals"])
        yield from (in_use, waits, refusals)

    @staticmethod
    def _sources(rows: list[dict]) -> Iterable:
        labels = ["kind", "source"]
        families = {
            "queries": CounterMetricFamily("flightdeck_source_requests", "Requests sent to each backend", labels=labels),
            "rows": CounterMetricFamily("flightdeck_source_rows", "Rows received from each backend", labels=labels),
            "bytes": CounterMetricFamily("flightdeck_source_bytes", "Arrow bytes received from each backend",
                                         labels=labels),
            "errors": CounterMetricFamily("flightdeck_source_errors", "Failed requests to each backend",
                                          labels=labels),
        }
        for row in rows:
            for key, family in families.items():
                family.add_metric([row["kind"], row["source"]], row.get(key) or 0)
        yield from families.values()

    @staticmethod
    def _datasets(rows: list[dict]) -> Iterable:
        state = GaugeMetricFamily("flightdeck_dataset_ready", "1 when a dataset can be queried, else 0",
                                  labels=["dataset", "kind"])
        refreshes = CounterMetricFamily("flightdeck_refreshes", "Successful refreshes of each accelerated copy",
                                        labels=["dataset"])
        failures = CounterMetricFamily("flightdeck_refresh_failures", "Failed refreshes of each accelerated copy",
                                       labels=["dataset"])
        copy_rows = GaugeMetricFamily("flightdeck_accelerated_rows", "Rows in each accelerated copy",
                                      labels=["dataset"])
        applied = CounterMetricFamily("flightdeck_changes_applied", "Rows changed in a copy by its change stream",
                                      labels=["dataset"])
        skipped = CounterMetricFamily("flightdeck_change_records_skipped",
                                      "Records of a change stream that could not be read", labels=["dataset"])
        lag = GaugeMetricFamily("flightdeck_change_lag_seconds", "Source commit to applied in the copy, "
                                "over the last batches", labels=["dataset", "quantile"])
        backlog = GaugeMetricFamily("flightdeck_change_backlog_bytes", "What the source keeps unconfirmed for "
                                    "a copy (a replication slot's lag)", labels=["dataset"])
        for row in rows:
            state.add_metric([row["name"], row["kind"]], 1 if row["state"] == "ready" else 0)
            if "refreshes" in row:
                refreshes.add_metric([row["name"]], row["refreshes"] or 0)
                failures.add_metric([row["name"]], row["failures"] or 0)
                copy_rows.add_metric([row["name"]], row.get("rows") or 0)
            if row.get("refresh_mode") == "changes":
                applied.add_metric([row["name"]], row.get("changes_applied") or 0)
                skipped.add_metric([row["name"]], row.get("skipped") or 0)
                for quantile, key in (("0.5", "lag_p50_ms"), ("0.99", "lag_p99_ms")):
                    if row.get(key) is not None:
                        lag.add_metric([row["name"], quantile], row[key] / 1000)
                if row.get("source_backlog_bytes") is not None:
                    backlog.add_metric([row["name"]], row["source_backlog_bytes"])
        yield from (state, refreshes, failures, copy_rows, applied, skipped, lag, backlog)


class _PlanCollector(Collector):
    COUNTERS = {
        "statements_planned": ("flightdeck_statements_planned", "Statements checked and planned from their text"),
        "bindings_planned": ("flightdeck_plan_bindings",
                             "Planned statements bound to parameters of new types for the first time"),
        "hits": ("flightdeck_plan_cache_hits", "Plans answered from the plan cache"),
        "evictions": ("flightdeck_plan_cache_evictions", "Plans dropped to keep the cache within its size"),
        "invalidations": ("flightdeck_plan_cache_invalidations",
                          "Times every cached plan was dropped because datasets changed"),
    }

    def __init__(self, stats: Callable[[], dict[str, int]]):
        self.stats = stats

    def collect(self) -> Iterable:
        stats = self.stats()
        for key, (name, documentation) in self.COUNTERS.items():
            yield CounterMetricFamily(name, documentation, value=stats[key])
        yield GaugeMetricFamily("flightdeck_plan_cache_entries", "Plans kept in the plan cache", value=stats["entries"])
