"""`iceberg:namespace.table` — Apache Iceberg tables through pyiceberg (SQL or REST catalog).

Filters become pyiceberg row filters, so whole data files are pruned from the table's
manifests before any is opened; projection and LIMIT go into the same scan. A SQL catalog
kept in a SQLite file is opened read-only (``mode=ro``).
"""
from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import pyarrow as pa
from pyiceberg import expressions as ice
from pyiceberg.catalog import Catalog as IcebergCatalog
from pyiceberg.catalog import load_catalog
from pyiceberg.exceptions import NoSuchTableError

from federation import expr as fx
from federation.connectors.base import Connector, ConnectorError, shown_url
from federation.connectors.typing import conform_batch

_COMPARISONS = {
    "=": ice.EqualTo, "!=": ice.NotEqualTo, "<": ice.LessThan, "<=": ice.LessThanOrEqual,
    ">": ice.GreaterThan, ">=": ice.GreaterThanOrEqual,
}
_PUSHABLE_LITERALS = (bool, int, float, str, decimal.Decimal, dt.date)


def row_filter(expression: fx.Expr) -> ice.BooleanExpression | None:
    """A planner filter as a pyiceberg row filter, or None where it has no exact equivalent."""
    if isinstance(expression, fx.Compare):
        comparison = fx.column_comparison(expression)
        if comparison is None or not _pushable(comparison[2]):
            return None
        column, op, value = comparison
        return _COMPARISONS[op](column, value)
    if isinstance(expression, (fx.And, fx.Or)):
        parts = [row_filter(arg) for arg in expression.args]
        if any(part is None for part in parts):
            return None
        combine = ice.And if isinstance(expression, fx.And) else ice.Or
        result = parts[0]
        for part in parts[1:]:
            result = combine(result, part)
        return result
    if isinstance(expression, fx.Not):
        inner = row_filter(expression.arg)
        return None if inner is None else ice.Not(inner)
    if isinstance(expression, fx.IsNull) and isinstance(expression.arg, fx.Column):
        return ice.IsNull(expression.arg.name)
    if isinstance(expression, fx.InList) and isinstance(expression.arg, fx.Column):
        if all(_pushable(v) for v in expression.values):
            return ice.In(expression.arg.name, set(expression.values))
    return None


def _pushable(value: object) -> bool:
    if isinstance(value, dt.datetime):
        return value.tzinfo is None
    return value is not None and isinstance(value, _PUSHABLE_LITERALS)


def plain_types(schema: pa.Schema) -> pa.Schema:
    """pyiceberg reads large string/binary/list types; clients and DataFusion want plain ones."""
    def plain(data_type: pa.DataType) -> pa.DataType:
        if pa.types.is_large_string(data_type):
            return pa.string()
        if pa.types.is_large_binary(data_type):
            return pa.binary()
        if pa.types.is_large_list(data_type) or pa.types.is_list(data_type):
            return pa.list_(plain(data_type.value_type))
        if pa.types.is_struct(data_type):
            return pa.struct([pa.field(f.name, plain(f.type)) for f in data_type])
        return data_type
    return pa.schema([pa.field(f.name, plain(f.type)) for f in schema])


class IcebergConnector(Connector):
    kind = "iceberg"

    def __init__(self, params: dict[str, Any], base_dir):
        super().__init__(params, base_dir)
        self.catalog_type = str(params.get("catalog_type", "sql"))
        if self.catalog_type not in ("sql", "rest"):
            raise ConnectorError("iceberg: params.catalog_type must be 'sql' or 'rest'")
        if "catalog_uri" not in params:
            raise ConnectorError("iceberg: params.catalog_uri is required")
        self.catalog_name = str(params.get("catalog_name", "default"))
        self._catalog: IcebergCatalog | None = None

    def describe(self) -> str:
        if self.catalog_type == "rest":
            return f"iceberg (REST {shown_url(str(self.params['catalog_uri']))})"
        return f"iceberg (SQL catalog {self.catalog_name})"

    def _properties(self) -> dict[str, str]:
        properties = {"type": self.catalog_type, "uri": self._catalog_uri()}
        if "warehouse" in self.params:
            warehouse = str(self.params["warehouse"])
            if "://" not in warehouse:
                warehouse = self.resolve_path(warehouse).as_uri()
            properties["warehouse"] = warehouse
        if "token" in self.params:
            properties["token"] = str(self.params["token"])
        return properties

    def _catalog_uri(self) -> str:
        uri = str(self.params["catalog_uri"])
        if uri.startswith("sqlite:///") and "mode=ro" not in uri:
            path = self.resolve_path(uri[len("sqlite:///"):])
            if not path.exists():
                raise ConnectorError(f"iceberg: catalog database {path} does not exist")
            return f"sqlite:///file:{path}?mode=ro&uri=true"
        return uri

    def catalog(self) -> IcebergCatalog:
        if self._catalog is None:
            try:
                self._catalog = load_catalog(self.catalog_name, **self._properties())
            except Exception as error:
                raise ConnectorError(f"{self.describe()}: cannot open the catalog: {error}") from None
        return self._catalog

    def _table(self, table: str):
        try:
            return self.catalog().load_table(table)
        except NoSuchTableError:
            raise ConnectorError(f"{self.describe()}: no table {table}") from None
        except Exception as error:
            raise ConnectorError(f"{self.describe()}: {error}") from None

    def tables(self) -> list[str]:
        catalog = self.catalog()
        return sorted(".".join(identifier) for namespace in catalog.list_namespaces()
                      for identifier in catalog.list_tables(namespace))

    def schema(self, table: str) -> pa.Schema:
        return plain_types(self._table(table).schema().as_arrow())

    def row_count(self, table: str) -> int | None:
        snapshot = self._table(table).current_snapshot()
        if snapshot is None or snapshot.summary is None:
            return 0
        total = snapshot.summary.get("total-records")
        return None if total is None else int(total)

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
             limit: int | None) -> pa.RecordBatchReader:
        iceberg_table = self._table(table)
        schema = plain_types(iceberg_table.schema().as_arrow())
        columns = schema.names if columns is None else (columns or schema.names[:1])
        pushed = [f for f in (row_filter(part) for part in filters) if f is not None]
        condition: ice.BooleanExpression = ice.AlwaysTrue()
        for part in pushed:
            condition = ice.And(condition, part)
        exact = len(pushed) == len(filters)  # a limit before every filter would lose rows
        scan = iceberg_table.scan(row_filter=condition, selected_fields=tuple(columns),
                                  limit=limit if exact else None)
        target = pa.schema([schema.field(c) for c in columns])
        self.stats.record_request(f"scan {table} where {condition} limit {limit}")
        reader = scan.to_arrow_batch_reader()

        def batches():
            for batch in reader:
                batch = conform_batch(batch.select(columns), target)
                self.stats.record_batch(batch, 0.0)
                yield batch

        return pa.RecordBatchReader.from_batches(target, batches())
