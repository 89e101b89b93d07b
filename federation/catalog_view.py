"""What one grant set sees of the catalog: some datasets, some of their columns, some masked.

An engine planning over a view has only these tables in its DataFusion session (and in its
information_schema and system tables), so a dataset outside the view does not exist for it, in
SQL, listings or error messages alike.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Sequence

import pyarrow as pa
from datafusion import SessionContext

from federation.catalog import (Catalog, Dataset, connectors_of, listing, register_tables,
                                scanned_name, schema_names, source_rows)
from federation.connectors import ConnectorError
from federation.masks import ColumnMasks
from federation.scan import ConnectorDataset
from federation.system import DATASETS_SCHEMA, SOURCE_STATS_SCHEMA, SnapshotConnector

log = logging.getLogger("flightdeck.catalog")
# A backend's last statement may carry another caller's filter values: a view does not show it.
PRIVATE_SOURCE_FIELDS = ("last_request",)
SOURCE_COUNTERS = ("queries", "rows", "bytes", "errors", "seconds")
HIDDEN_ERROR = "failed (the message is shown to keys that see every column unmasked)"
# A dataset's status fields that may quote its values, and those that measure them.
VALUE_QUOTING_FIELDS = ("error", "last_error", "last_skip_reason")
VALUE_SIZED_FIELDS = ("bytes", "source_backlog_bytes")


class CatalogView:
    """The catalog as a grant sees it. ``sees(qualified name)`` picks the datasets;
    ``columns_of(qualified name)`` names the only columns one shows (None: all);
    ``masks_of(qualified name)`` the masks of its columns (None: none)."""

    def __init__(self, catalog: Catalog, sees: Callable[[str], bool],
                 columns_of: Callable[[str], Sequence[str] | None],
                 own_tables: Sequence[SnapshotConnector] = (),
                 masks_of: Callable[[str], ColumnMasks | None] = lambda name: None):
        """``own_tables``: system tables of the view's own (e.g. the queries its principals ran)."""
        self.base = catalog
        self.pool = catalog.pool  # the connectors (and their load budgets) are the catalog's
        self.sees = sees
        self.columns_of = columns_of
        self.masks_of = masks_of
        self.system_tables = {
            "source_stats": SnapshotConnector("source_stats", SOURCE_STATS_SCHEMA, self.source_stats),
            "datasets": SnapshotConnector("datasets", DATASETS_SCHEMA, self.dataset_rows),
            **{table.name: table for table in own_tables},
        }

    @property
    def generation(self) -> int:
        """The catalog's: what a view's plans depend on changes with it."""
        return self.base.generation

    @property
    def datasets(self) -> dict[str, Dataset]:
        return {name: self._seen(dataset) for name, dataset in self.base.datasets.items() if self.sees(name)}

    def _seen(self, dataset: Dataset) -> Dataset:
        """The dataset with only the columns the grant shows (the same object when it shows all).
        The copy shares the original's registrations, which routing to a local copy updates."""
        columns = self.columns_of(dataset.qualified_name)
        masks = self.masks_of(dataset.qualified_name)
        if (columns is None and masks is None) or dataset.arrow_schema is None:
            return dataset
        shown = dataset.arrow_schema
        if columns is not None:
            shown = pa.schema([f for f in shown if f.name in columns])
            dataset = dataclasses.replace(
                dataset, columns_restricted=True,
                primary_key=dataset.primary_key if set(dataset.primary_key) <= set(shown.names) else [],
                skipped_columns=[c for c in dataset.skipped_columns if c in columns])
        if masks is not None:  # the schema shows each masked column as its masked values are
            shown = masks.schema(shown)
        return dataclasses.replace(dataset, arrow_schema=shown, masks=masks)

    def find(self, schema_name: str, table_name: str) -> Dataset | None:
        name = f"{schema_name}.{table_name}"
        dataset = self.base.datasets.get(name)
        return self._seen(dataset) if dataset is not None and self.sees(name) else None

    def scanned(self, fqn: tuple) -> Dataset | None:
        return self.find(*scanned_name(fqn))

    def schema_names(self) -> list[str]:
        return schema_names(self.datasets.values())

    def listing(self) -> list[tuple[str, str, str, pa.Schema]]:
        return listing(self.datasets.values(), self.system_tables)

    def dataset_rows(self) -> list[dict]:
        return [self._without_values(self.base.dataset_row(d)) for d in self.datasets.values()]

    def _without_values(self, row: dict) -> dict:
        """A dataset's row with what may tell hidden or masked values left out where the view
        hides or masks columns: an error or a skipped message's reason may quote a value
        (``Cannot cast string 'alice@...'``) of any column, and the copy's size (or the backlog's)
        grows with the hidden columns' values."""
        name = row["name"]
        if self.columns_of(name) is None and self.masks_of(name) is None:
            return row
        return {**row, **{key: HIDDEN_ERROR for key in VALUE_QUOTING_FIELDS if row.get(key)},
                **{key: None for key in VALUE_SIZED_FIELDS if key in row}}

    def source_stats(self) -> list[dict]:
        """The sources of the datasets this view shows. Their counters are left empty where a
        source also serves datasets the view hides: they would count other principals' reads
        of those."""
        shared = {id(connector) for name, dataset in self.base.datasets.items() if not self.sees(name)
                  for connector in connectors_of(dataset)}
        return source_rows(self.datasets.values(), lambda connector: PRIVATE_SOURCE_FIELDS + (
            SOURCE_COUNTERS if id(connector) in shared else ()))

    def register_into(self, ctx: SessionContext) -> None:
        register_tables(ctx, self)

    def register_dataset(self, ctx: SessionContext, dataset: Dataset) -> None:
        """A dataset opened after the session was made (not in the catalog yet), in it as the
        view shows it, if it does."""
        if self.sees(dataset.qualified_name):
            self._register(ctx, self._seen(dataset), base=dataset)

    @staticmethod
    def _source_schema(dataset: Dataset, base: Dataset) -> pa.Schema:
        """The visible columns with their types at the source (before any mask)."""
        return pa.schema([base.arrow_schema.field(name) for name in dataset.arrow_schema.names])

    def _register(self, ctx: SessionContext, dataset: Dataset, base: Dataset | None = None) -> None:
        """As the catalog registers it (``base``: the catalog's own dataset, by default the
        one of its name), except that a dataset whose columns are restricted is always scanned
        through its connector (a native reader would show every column)."""
        base = base or self.base.datasets[dataset.qualified_name]
        spec = dataset.spec
        try:
            if (not spec.accelerated and not dataset.scanned_only
                    and dataset.connector.register_native(ctx, dataset.qualified_name, spec.location)):
                return
        except ConnectorError as error:
            log.warning("dataset %s is not readable through a grant: %s", spec.name, error)
            return
        registered = ConnectorDataset(dataset.connector, dataset.table, self._source_schema(dataset, base),
                                      dataset.masks)
        ctx.register_dataset(dataset.qualified_name, registered)
        if spec.accelerated:  # routing to the local copy swaps the connector inside
            base.registrations.append(registered)


def visible_columns(catalog: Catalog | CatalogView) -> Callable[[str], list[str] | None]:
    """A dataset's columns as a catalog (or a grant's view of it) shows them; None: hidden."""
    def visible(dataset: str) -> list[str] | None:
        seen = catalog.datasets.get(dataset)
        return None if seen is None or seen.arrow_schema is None else seen.arrow_schema.names
    return visible


def unmasked_columns(catalog: Catalog | CatalogView) -> Callable[[str], list[str] | None]:
    """A dataset's visible columns that are not masked (what may be searched: a column's
    search index holds its raw text); None: hidden."""
    visible = visible_columns(catalog)

    def unmasked(dataset: str) -> list[str] | None:
        shown = visible(dataset)
        masks = catalog.datasets[dataset].masks if shown is not None else None
        return shown if masks is None else [c for c in shown if c not in masks.columns]
    return unmasked
