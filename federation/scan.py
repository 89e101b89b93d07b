"""Lets DataFusion scan any connector, with projection and filters pushed down.

DataFusion cannot take a table provider written in Python, but it scans a
``pyarrow.dataset.Dataset`` and hands it the projected columns and the filters
it could push. This subclass receives them and turns them into a
``Connector.scan`` call. The filter is re-applied exactly to every batch, so a
connector may push a looser filter than asked, never a stricter one.
"""
from __future__ import annotations

import logging
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from federation import expr as fx
from federation.arrow_expr import decode_fully, referenced_fields, to_arrow
from federation.budget import BudgetExceeded
from federation.cancel import Stopped
from federation.connectors.base import Connector, ConnectorError
from federation.masks import ColumnMasks
from federation.snapshots import Pin, current as current_snapshots, reading

log = logging.getLogger(__name__)


class LazyDataset(ds.InMemoryDataset):
    """A pyarrow dataset that DataFusion scans lazily: a subclass makes the batches for the
    columns and filter DataFusion pushes (``batches``). These are the calls DataFusion 55
    makes on a Python dataset (internals: datafusion is pinned to 55.x); this class is the one place that knows them."""

    def __init__(self, schema: pa.Schema):
        super().__init__(schema.empty_table())
        self.table_schema = schema

    def batches(self, columns: list[str], filter: pc.Expression | None,
                pin: Pin | None = None) -> Iterator[pa.RecordBatch]:
        """``pin``: the read this scan was given when its query's execution plan was made."""
        raise NotImplementedError

    def pin(self) -> Pin | None:
        """A pinned read for one scan of this dataset (``federation.snapshots``), or None."""
        return None

    def get_fragments(self, filter: pc.Expression | None = None) -> list["_Fragment"]:
        # Called once per scan, on the thread making the query's execution plan.
        return [_Fragment(self, self.pin())]

    def scanner(self, columns: list[str] | None = None, filter: pc.Expression | None = None,
                **_options) -> "_Scan":
        return _Scan(self, columns, filter)


class _Fragment:
    def __init__(self, dataset: LazyDataset, pin: Pin | None = None):
        self.dataset = dataset
        self.pin = pin

    def scanner(self, schema: pa.Schema | None = None, columns: list[str] | None = None,
                filter: pc.Expression | None = None, **_options) -> "_Scan":
        return _Scan(self.dataset, columns, filter, self.pin)


class _Scan:
    def __init__(self, dataset: LazyDataset, columns: list[str] | None, filter: pc.Expression | None,
                 pin: Pin | None = None):
        self.dataset = dataset
        self.columns = list(dataset.table_schema.names) if columns is None else list(columns)
        self.filter = _as_expression(filter)
        self.pin = pin

    @property
    def projected_schema(self) -> pa.Schema:
        return pa.schema([self.dataset.table_schema.field(c) for c in self.columns])

    def to_batches(self) -> Iterator[pa.RecordBatch]:
        return self.dataset.batches(self.columns, self.filter, self.pin)


def _as_expression(filter: pc.Expression | pa.Scalar | None) -> pc.Expression | None:
    """DataFusion hands a constant filter (``WHERE TRUE``, which a semi join's side gets) as a
    bare scalar rather than an expression: true filters nothing."""
    if not isinstance(filter, pa.Scalar):
        return filter
    return None if filter.as_py() is True else pc.scalar(False)


class ConnectorDataset(LazyDataset):
    """A connector's table. With ``masks``, its rows carry masked values from the start (``schema``
    is the masked one): a filter on a masked column is never sent to the source, only applied
    here to the masked values."""

    def __init__(self, connector: Connector, table: str, schema: pa.Schema, masks: ColumnMasks | None = None):
        super().__init__(masks.schema(schema) if masks else schema)
        self.connector = connector
        self.table = table
        self.masks = masks

    def pin(self) -> Pin | None:
        snapshots = current_snapshots()
        return None if snapshots is None else snapshots.pin(self.connector, self.table)

    def batches(self, columns: list[str], filter: pc.Expression | None,
                pin: Pin | None = None) -> Iterator[pa.RecordBatch]:
        if not self.masks:
            return self._batches(columns, filter, pin)
        return self._without_values_in_errors(self._batches(columns, filter, pin))

    def _without_values_in_errors(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """The batches, with the source's own error message kept from the client: the raw rows
        are read before they are masked, so a source failing on a value (one that does not fit
        its column's type, say) would quote the value it failed on."""
        try:
            yield from batches
        except (Stopped, BudgetExceeded):
            raise
        except Exception as error:
            log.warning("a scan of %s (masked columns) failed: %s", self.table, error)
            raise ConnectorError(f"{self.connector.describe()}: reading {self.table} failed (the source's message is "
                                 "not shown: it may quote values of a masked column)") from None

    def _batches(self, columns: list[str], filter: pc.Expression | None, pin: Pin | None) -> Iterator[pa.RecordBatch]:
        # A pushed filter may name columns outside the projection: fetch them too.
        filter_columns = sorted(referenced_fields(filter) - set(columns))
        fetched = columns + filter_columns
        decoded, complete = decode_fully(filter)
        conjuncts = fx.conjuncts(decoded)
        if self.masks:  # a condition on a masked column would probe the raw values at the source
            masked = self.masks.columns
            conjuncts = [c for c in conjuncts if not fx.referenced_columns(c) & masked]
        connector, table = self.connector, self.table
        # Filter again unless the source applied the whole filter exactly: pyarrow's own
        # comparison rules (e.g. NaN never greater) are not DataFusion's.
        refilter = filter is not None and not (complete and not self.masks and connector.filters_exact(table, conjuncts))
        if refilter and complete:  # as the planner means it (NaN), not as pyarrow would read its expression
            filter = to_arrow(decoded)
        with reading(pin):
            reader = connector.scan(table, fetched, conjuncts, None)
        target = pa.schema([self.table_schema.field(c) for c in columns])
        for batch in reader:
            if self.masks:
                batch = self.masks.apply(batch)
            if refilter:
                batch = batch.filter(filter)
            batch = batch.select(columns)
            if batch.schema != target:
                batch = batch.cast(target)
            yield batch
