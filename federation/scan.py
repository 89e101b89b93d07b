"""Lets DataFusion scan any connector, with projection and filters pushed down.

DataFusion cannot take a table provider written in Python, but it scans a
``pyarrow.dataset.Dataset`` and hands it the projected columns and the filters
it could push (NOTES.md). This subclass receives them and turns them into a
``Connector.scan`` call. The filter is re-applied exactly to every batch, so a
connector may push a looser filter than asked, never a stricter one.
"""
from __future__ import annotations

from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from federation import expr as fx
from federation.arrow_expr import decode_fully, referenced_fields
from federation.connectors.base import Connector


class ConnectorDataset(ds.InMemoryDataset):
    def __init__(self, connector: Connector, table: str, schema: pa.Schema):
        super().__init__(schema.empty_table())
        self.connector = connector
        self.table = table
        self.table_schema = schema

    def get_fragments(self, filter: pc.Expression | None = None) -> list["ConnectorFragment"]:
        return [ConnectorFragment(self)]

    def scanner(self, columns: list[str] | None = None, filter: pc.Expression | None = None,
                **_options) -> "ConnectorScan":
        return ConnectorScan(self, columns, filter)


class ConnectorFragment:
    def __init__(self, dataset: ConnectorDataset):
        self.dataset = dataset

    def scanner(self, schema: pa.Schema | None = None, columns: list[str] | None = None,
                filter: pc.Expression | None = None, **_options) -> "ConnectorScan":
        return ConnectorScan(self.dataset, columns, filter)


class ConnectorScan:
    def __init__(self, dataset: ConnectorDataset, columns: list[str] | None,
                 filter: pc.Expression | None):
        self.dataset = dataset
        self.columns = list(dataset.table_schema.names) if columns is None else list(columns)
        self.filter = filter

    @property
    def projected_schema(self) -> pa.Schema:
        return pa.schema([self.dataset.table_schema.field(c) for c in self.columns])

    def to_batches(self) -> Iterator[pa.RecordBatch]:
        # A pushed filter may name columns outside the projection: fetch them too.
        filter_columns = sorted(referenced_fields(self.filter) - set(self.columns))
        fetched = self.columns + filter_columns
        decoded, complete = decode_fully(self.filter)
        conjuncts = fx.conjuncts(decoded)
        connector, table = self.dataset.connector, self.dataset.table
        # Filter again unless the source applied the whole filter exactly: pyarrow's own
        # comparison rules (e.g. NaN never greater) are not DataFusion's.
        refilter = self.filter is not None and not (complete and connector.filters_exact(table, conjuncts))
        reader = connector.scan(table, fetched, conjuncts, None)
        target = self.projected_schema
        for batch in reader:
            if refilter:
                batch = batch.filter(self.filter)
            batch = batch.select(self.columns)
            if batch.schema != target:
                batch = batch.cast(target)
            yield batch
