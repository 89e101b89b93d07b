"""The catalog: configured datasets, their connectors and schemas, in DataFusion."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import pyarrow as pa
from datafusion import SessionContext
from datafusion.catalog import Schema as DataFusionSchema

from federation.connectors import Connector, ConnectorError, ConnectorPool
from federation.masks import ColumnMasks
from federation.scan import ConnectorDataset
from federation.system import DATASETS_SCHEMA, SOURCE_STATS_SCHEMA, SYSTEM_SCHEMA, SnapshotConnector

CATALOG_NAME = "flightdeck"
DEFAULT_SCHEMA = "public"
log = logging.getLogger("flightdeck.catalog")


@dataclass
class DatasetSpec:
    name: str                      # "orders" or "app.orders"
    source: str                    # the `from:` value, e.g. "duckdb:main.orders"
    params: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    primary_key: list[str] = field(default_factory=list)
    accelerated: bool = False      # queries may be routed to a local copy (see Catalog.route)

    @property
    def kind(self) -> str:
        return self.source.split(":", 1)[0]

    @property
    def location(self) -> str:
        return self.source.split(":", 1)[1] if ":" in self.source else ""

    @property
    def schema_name(self) -> str:
        return self.name.split(".")[0] if "." in self.name else DEFAULT_SCHEMA

    @property
    def table_name(self) -> str:
        return self.name.split(".")[-1]

    @property
    def qualified_name(self) -> str:
        return f"{self.schema_name}.{self.table_name}"


@dataclass
class Dataset:
    spec: DatasetSpec
    connector: Connector | None = None          # what queries read now: the source or a local copy
    arrow_schema: pa.Schema | None = None
    primary_key: list[str] = field(default_factory=list)
    error: str | None = None
    skipped_columns: list[str] = field(default_factory=list)
    source_connector: Connector | None = None   # the backend the dataset comes from
    table: str = ""                             # the dataset's table within ``connector``
    registrations: list[ConnectorDataset] = field(default_factory=list)
    # Seen through a grant that hides some columns: a statement goes to its backend whole only
    # when it is written from the plan and names visible columns alone (``pushdown``); no
    # sub-plan or translated statement (either could name what the grant hides).
    columns_restricted: bool = False
    # Seen through a grant that masks some columns (``arrow_schema`` is then the masked one):
    # every read goes through the masking scan, never to a backend as a statement or a filter.
    masks: ColumnMasks | None = None

    @property
    def scanned_only(self) -> bool:
        """Read only through its connector's scan: no statement, sub-plan or native reader."""
        return self.columns_restricted or self.masks is not None

    @property
    def state(self) -> str:
        return "ready" if self.error is None else "unavailable"

    @property
    def qualified_name(self) -> str:
        return self.spec.qualified_name


class Catalog:
    def __init__(self, specs: list[DatasetSpec], base_dir: Path):
        self.pool = ConnectorPool(base_dir)
        self.datasets: dict[str, Dataset] = {}
        for spec in specs:
            dataset = self._open(spec)
            self.datasets[dataset.qualified_name] = dataset
        self.status_extension: Callable[[str], dict] | None = None  # e.g. acceleration status
        # Moves on whenever what a plan depends on changes (where a dataset is read, whether it
        # is available, its schema): plans kept from before are then made again.
        self.generation = 0
        self._generations = itertools.count(1)
        self.system_tables = {
            "source_stats": SnapshotConnector("source_stats", SOURCE_STATS_SCHEMA, self.source_stats),
            "datasets": SnapshotConnector("datasets", DATASETS_SCHEMA, self.dataset_rows),
        }

    def _open(self, spec: DatasetSpec, afresh: bool = False) -> Dataset:
        """A dataset whose backend fails is kept, marked unavailable: startup goes on. ``afresh``:
        its table described again, not as its connector last described it."""
        dataset = Dataset(spec, table=spec.location)
        try:
            self._connect(dataset, afresh)
        except ConnectorError as error:
            dataset.error = str(error)
            log.warning("dataset %s is unavailable: %s", spec.name, error)
        except Exception as error:  # a driver's own error on an answer it could not read (not quoted: secrets)
            dataset.error = f"{spec.kind}: the source's answer could not be read ({type(error).__name__})"
            log.warning("dataset %s is unavailable: %s", spec.name, dataset.error)
        return dataset

    def _connect(self, dataset: Dataset, afresh: bool) -> None:
        """Opens the dataset's backend and reads what it says of the table."""
        spec = dataset.spec
        connector = self.pool.open(spec.kind, spec.location, spec.params)
        if afresh:
            connector.forget_schema(spec.location)
        dataset.connector = dataset.source_connector = connector
        dataset.arrow_schema = connector.cached_schema(spec.location)
        dataset.primary_key = spec.primary_key or connector.primary_key(spec.location)
        dataset.skipped_columns = connector.unsupported_columns(spec.location)
        if dataset.skipped_columns:
            log.warning("dataset %s: columns of unsupported types are left out: %s",
                        spec.name, ", ".join(dataset.skipped_columns))

    def unavailable(self) -> list[str]:
        return [name for name, dataset in self.datasets.items() if dataset.error is not None]

    def open_again(self, name: str) -> Dataset:
        """A dataset opened afresh from its spec (its error says why if it could not be), not
        in the catalog: ``admit`` puts it there."""
        return self._open(self.datasets[name].spec, afresh=True)

    def schema_checked(self) -> list[str]:
        """The datasets from databases whose tables may be altered under them."""
        return [name for name, dataset in self.datasets.items()
                if dataset.error is None and dataset.source_connector is not None
                and dataset.source_connector.schema_may_change]

    def source_changed(self, name: str) -> bool:
        """Whether a dataset's table now has other columns, or other types, than the dataset was
        opened with (its source described afresh; a source that cannot say is no change: its
        queries say why)."""
        dataset = self.datasets[name]
        connector, table = dataset.source_connector, dataset.spec.location
        connector.forget_schema(table, rules=False)  # asked again (on the query path) only after a change
        try:
            return not connector.cached_schema(table).equals(dataset.arrow_schema)
        except Exception:  # noqa: BLE001 - unreachable now: not a change of columns
            return False

    def admit(self, dataset: Dataset) -> None:
        """``dataset`` (from ``open_again``) in place of the one of its name."""
        # A new dict, not an assignment into it: other threads may be going through the datasets.
        self.datasets = {**self.datasets, dataset.qualified_name: dataset}

    def register_dataset(self, ctx: SessionContext, dataset: Dataset) -> None:
        """A dataset opened after the session was made (from ``open_again``, not admitted yet), in
        it; its error says why if the session cannot read it."""
        self._register(ctx, dataset)

    def schema_names(self) -> list[str]:
        return schema_names(self.datasets.values())

    def listing(self) -> list[tuple[str, str, str, pa.Schema]]:
        """(schema, table, table type, Arrow schema) of every queryable table, sorted."""
        return listing(self.datasets.values(), self.system_tables)

    def source_stats(self) -> list[dict]:
        """One row per backend connection configuration (and per local engine holding
        accelerated copies): what it was asked and sent back."""
        return source_rows(self.datasets.values())

    def dataset_rows(self) -> list[dict]:
        return [self.dataset_row(d) for d in self.datasets.values()]

    def dataset_row(self, d: Dataset) -> dict:
        return {"name": d.qualified_name, "kind": d.spec.kind,
                "source": d.source_connector.describe() if d.source_connector else d.spec.kind,
                "state": d.state, "error": d.error, "primary_key": d.primary_key,
                "columns": len(d.arrow_schema) if d.arrow_schema is not None else None,
                "skipped_columns": d.skipped_columns, "description": d.spec.description,
                **self._extension(d)}

    def _extension(self, dataset: Dataset) -> dict:
        if self.status_extension is None or not dataset.spec.accelerated:
            return {}
        return self.status_extension(dataset.qualified_name)

    def route(self, qualified_name: str, connector: Connector, table: str) -> None:
        """From now on, queries over the dataset read ``table`` of ``connector`` (e.g. its local
        copy). Scans already under way finish on what they started with."""
        dataset = self.datasets[qualified_name]
        dataset.connector, dataset.table = connector, table
        for registered in dataset.registrations:
            registered.connector, registered.table = connector, table
        self.changed()

    def changed(self) -> None:
        """Plans made before now may no longer hold: a dataset's routing, availability or schema
        changed."""
        self.generation = next(self._generations)

    def find(self, schema_name: str, table_name: str) -> Dataset | None:
        return self.datasets.get(f"{schema_name}.{table_name}")

    def scanned(self, fqn: tuple) -> Dataset | None:
        """The dataset a plan's table scan names (its qualified name; empty parts skipped)."""
        return self.find(*scanned_name(fqn))

    def register_into(self, ctx: SessionContext) -> None:
        register_tables(ctx, self)

    def _register(self, ctx: SessionContext, dataset: Dataset) -> None:
        spec = dataset.spec
        try:
            # An accelerated dataset is always scanned through a ConnectorDataset: routing
            # to its local copy swaps the connector inside it.
            if not spec.accelerated and dataset.connector.register_native(
                    ctx, dataset.qualified_name, spec.location):
                # What clients see is what the engine reads (e.g. partition column types).
                dataset.arrow_schema = ctx.table(f"{CATALOG_NAME}.{dataset.qualified_name}").schema()
            else:
                registered = ConnectorDataset(dataset.connector, dataset.table, dataset.arrow_schema)
                ctx.register_dataset(dataset.qualified_name, registered)
                dataset.registrations.append(registered)
        except ConnectorError as error:
            dataset.error = str(error)
            log.warning("dataset %s is unavailable: %s", spec.name, error)
            self.changed()

    def close(self) -> None:
        self.pool.close()


def deregister(ctx: SessionContext, name: str) -> None:
    """A dataset's table out of a session (nothing when it is not there)."""
    schema_name, table_name = name.split(".", 1)
    schema = ctx.catalog(CATALOG_NAME).schema(schema_name)
    if table_name in schema.names():
        schema.deregister_table(table_name)


def register_tables(ctx: SessionContext, catalog: Any) -> None:
    """A catalog's (or a view's) schemas, ready datasets (each by its ``_register``) and system
    tables, in a DataFusion session."""
    registered = ctx.catalog(CATALOG_NAME)
    for schema_name in catalog.schema_names():
        if schema_name not in registered.schema_names():
            registered.register_schema(schema_name, DataFusionSchema.memory_schema())
    for dataset in catalog.datasets.values():
        if dataset.state == "ready":
            catalog._register(ctx, dataset)
    for name, table in catalog.system_tables.items():
        ctx.register_dataset(f"{SYSTEM_SCHEMA}.{name}", ConnectorDataset(table, name, table.table_schema))


def schema_names(datasets: Iterable[Dataset]) -> list[str]:
    return sorted({d.spec.schema_name for d in datasets} | {DEFAULT_SCHEMA, SYSTEM_SCHEMA})


def listing(datasets: Iterable[Dataset], system_tables: dict[str, SnapshotConnector]
            ) -> list[tuple[str, str, str, pa.Schema]]:
    rows = [(d.spec.schema_name, d.spec.table_name, "TABLE", d.arrow_schema)
            for d in datasets if d.arrow_schema is not None]
    rows += [(SYSTEM_SCHEMA, name, "SYSTEM TABLE", table.table_schema) for name, table in system_tables.items()]
    return sorted(rows, key=lambda row: row[:2])


def scanned_name(fqn: tuple) -> tuple[str, str]:
    """(schema, table) of the table a plan's scan names (empty parts skipped, defaults filled in)."""
    *_, schema_name, table_name = (CATALOG_NAME, DEFAULT_SCHEMA, *[p for p in fqn if p])
    return schema_name, table_name


def source_rows(datasets: Iterable[Dataset], private: Callable[[Connector], tuple[str, ...]] = lambda c: ()
                ) -> list[dict]:
    """The ``source_stats`` rows of the connectors these datasets are read through, with the
    fields ``private`` names for a connector left empty."""
    by_connector: dict[int, tuple[Connector, list[str]]] = {}
    for dataset in datasets:
        for connector in connectors_of(dataset):
            entry = by_connector.setdefault(id(connector), (connector, []))
            entry[1].append(dataset.qualified_name)
    return [{"datasets": ", ".join(sorted(names)), "kind": connector.kind, "source": connector.describe(),
             **connector.stats.snapshot(), **{name: None for name in private(connector)}}
            for connector, names in by_connector.values()]


def connectors_of(dataset: Dataset) -> list[Connector]:
    """The connectors a dataset is read through: its source's, and its copy's when accelerated."""
    return list({id(c): c for c in (dataset.source_connector, dataset.connector) if c}.values())
