"""iceberg: against a real Iceberg table that pyiceberg writes into a local warehouse."""
from __future__ import annotations

import datetime as dt
import decimal

import pyarrow as pa
import pytest
from pyiceberg.catalog import load_catalog

from federation import expr as fx
from federation.catalog import Catalog, DatasetSpec
from federation.connectors import ConnectorError
from federation.connectors.iceberg import IcebergConnector, row_filter
from federation.engine import QueryEngine

ROWS = 10_000


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    root = tmp_path_factory.mktemp("iceberg")
    catalog = load_catalog("lake", **{"type": "sql", "uri": f"sqlite:///{root / 'catalog.db'}",
                                      "warehouse": (root / "warehouse").as_uri()})
    catalog.create_namespace("ops")
    data = pa.table({
        "id": pa.array(range(ROWS), pa.int64()),
        "service": pa.array(["checkout", "payments"] * (ROWS // 2)),
        "at": pa.array([dt.datetime(2026, 11, 20) + dt.timedelta(seconds=i) for i in range(ROWS)],
                       pa.timestamp("us")),
        "amount": pa.array([decimal.Decimal(i % 100) / 4 for i in range(ROWS)], pa.decimal128(10, 2)),
        "tags": pa.array([["a"] if i % 2 else [] for i in range(ROWS)], pa.list_(pa.string())),
    })
    table = catalog.create_table("ops.events", schema=data.schema)
    for start in range(0, ROWS, ROWS // 4):  # four data files, ordered by id
        table.append(data.slice(start, ROWS // 4))
    return root


def _params(root):
    return {"catalog_uri": "sqlite:///catalog.db", "warehouse": "warehouse", "catalog_name": "lake"}


def test_discovery_schema_and_types(warehouse):
    connector = IcebergConnector(_params(warehouse), warehouse)
    assert connector.tables() == ["ops.events"]
    schema = connector.schema("ops.events")
    assert schema.types == [pa.int64(), pa.string(), pa.timestamp("us"), pa.decimal128(10, 2),
                            pa.list_(pa.string())]
    assert connector.row_count("ops.events") == ROWS


def test_scan_pushes_projection_filter_and_limit(warehouse):
    connector = IcebergConnector(_params(warehouse), warehouse)
    filters = [fx.Compare(">=", fx.Column("id"), fx.Literal(9_990)),
               fx.Compare("=", fx.Column("service"), fx.Literal("payments"))]
    table = connector.scan("ops.events", ["id"], filters, limit=3).read_all()
    assert table.column_names == ["id"] and table.column("id").to_pylist() == [9_991, 9_993, 9_995]
    assert connector.stats.rows == 3
    files = connector._table("ops.events").scan(row_filter=row_filter(filters[0])).plan_files()
    assert len(list(files)) == 1  # three of four data files pruned from the manifests


def test_queries_through_the_engine(warehouse):
    engine = QueryEngine(Catalog([DatasetSpec("events", "iceberg:ops.events", _params(warehouse))], warehouse))
    result = engine.query("SELECT service, count(*) AS n, sum(amount) AS total FROM events "
                          "WHERE id < 100 AND at >= TIMESTAMP '2026-11-20 00:00:50' "
                          "GROUP BY service ORDER BY service").read_all()
    assert result.column("n").to_pylist() == [25, 25]
    stats = engine.catalog.datasets["public.events"].connector.stats
    assert stats.rows == 50  # both filters went to the Iceberg scan
    tags = engine.query("SELECT tags FROM events WHERE id IN (1, 2)").read_all()
    assert sorted(map(tuple, tags.column("tags").to_pylist())) == [(), ("a",)]


def test_catalog_is_opened_read_only(warehouse):
    connector = IcebergConnector(_params(warehouse), warehouse)
    with pytest.raises(Exception, match="(?i)readonly|read-only|read only"):
        connector.catalog().create_namespace("should_not_exist")
    with pytest.raises(ConnectorError, match="no table ops.missing"):
        connector.schema("ops.missing")
