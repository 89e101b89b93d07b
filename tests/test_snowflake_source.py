"""snowflake: the real snowflake-connector-python against fakesnow's HTTP server on loopback.

No Snowflake account can be reached from here; fakesnow (a Snowflake emulation on DuckDB,
run from its own virtualenv) speaks the connector's HTTP protocol, so the connector code
path is the real one.
"""
from __future__ import annotations

import decimal

import pytest

from federation.catalog import Catalog, DatasetSpec
from federation.engine import EngineSettings, QueryEngine

from peers import fakesnow_admin, fakesnow_params, start_fakesnow


@pytest.fixture(scope="module")
def fakesnow():
    with start_fakesnow() as port:
        yield _shop(port)


def _shop(port: int) -> dict:
    """A shop database on the fakesnow server; the connector's params for it."""
    params = fakesnow_params(port, "shop", "pw-secret-5")
    admin = fakesnow_admin(port)
    cursor = admin.cursor()
    cursor.execute("CREATE DATABASE shop")
    cursor.execute("CREATE SCHEMA shop.sales")
    cursor.execute("CREATE TABLE shop.sales.orders (id INT, amount NUMBER(10,2), region VARCHAR, "
                   "placed TIMESTAMP_NTZ, paid BOOLEAN)")
    cursor.execute("INSERT INTO shop.sales.orders SELECT seq4() + 1, (seq4() % 50) + 0.25, "
                   "CASE WHEN seq4() % 3 = 0 THEN 'eu' ELSE 'us' END, "
                   "'2026-11-20 14:00:00'::TIMESTAMP_NTZ, seq4() % 2 = 0 FROM TABLE(GENERATOR(ROWCOUNT => 300))")
    admin.close()
    return params


def test_snowflake_discovery_pushdown_and_types(fakesnow, tmp_path):
    engine = QueryEngine(Catalog([DatasetSpec("orders", "snowflake:shop.sales.orders", fakesnow)], tmp_path))
    dataset = engine.catalog.datasets["public.orders"]
    assert dataset.state == "ready", dataset.error
    assert dataset.arrow_schema.names == ["id", "amount", "region", "placed", "paid"]
    assert "shop.sales.orders" in dataset.connector.tables()
    result = engine.query("SELECT id, amount, paid FROM orders WHERE region = 'eu' AND id <= 9 ORDER BY id").read_all()
    assert result.to_pylist() == [{"id": 1, "amount": decimal.Decimal("0.25"), "paid": True},
                                  {"id": 4, "amount": decimal.Decimal("3.25"), "paid": False},
                                  {"id": 7, "amount": decimal.Decimal("6.25"), "paid": True}]
    stats = dataset.connector.stats
    assert stats.rows == 3 and '"REGION" = ?' in stats.last_request and '"ID" <= 9' in stats.last_request
    totals = engine.query("SELECT region, count(*) AS n FROM orders GROUP BY region ORDER BY region").read_all()
    assert totals.to_pylist() == [{"region": "eu", "n": 100}, {"region": "us", "n": 200}]


def test_snowflake_aggregate_goes_down_whole(fakesnow, tmp_path):
    engine = QueryEngine(Catalog([DatasetSpec("orders", "snowflake:shop.sales.orders", fakesnow)], tmp_path))
    stats = engine.catalog.datasets["public.orders"].connector.stats
    sql = "SELECT paid, count(*) AS n, sum(amount) AS total, max(id) AS last FROM orders WHERE id > 10 GROUP BY paid"
    planned = engine.plan(sql)
    assert planned.remote is not None and '"SHOP"."SALES"."ORDERS"' in planned.remote.sql
    assert '"PAID"' in planned.remote.sql and '"AMOUNT"' in planned.remote.sql  # Snowflake's spelling
    result = engine.execute(planned).read_all()
    assert stats.errors == 0 and stats.rows == 2  # one row per group came back
    local = QueryEngine(engine.catalog, EngineSettings(whole_query_pushdown=False)).query(sql).read_all()
    assert sorted(result.to_pylist(), key=str) == sorted(local.to_pylist(), key=str)
    assert engine.plan("SELECT region, count(*) FROM orders GROUP BY region").remote is None  # text: loose


def test_snowflake_errors_never_show_the_password(fakesnow, tmp_path):
    catalog = Catalog([DatasetSpec("gone", "snowflake:shop.sales.missing", fakesnow),
                       DatasetSpec("bad_name", "snowflake:orders", fakesnow)], tmp_path)
    gone, bad = catalog.datasets["public.gone"], catalog.datasets["public.bad_name"]
    assert gone.state == "unavailable" and "no table shop.sales.missing" in gone.error
    assert "database.schema.table" in bad.error
    assert all("pw-secret-5" not in (d.error or "") for d in (gone, bad))
