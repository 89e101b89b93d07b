"""postgres: and mysql: against the PostgreSQL and MariaDB running on this machine."""
from __future__ import annotations

import datetime as dt
import decimal
import os
import re
import time

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import adbc_driver_postgresql.dbapi as adbc_postgres
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pymysql
import pytest

from federation.catalog import Catalog, DatasetSpec
from federation.connectors import ConnectorError
from federation.connectors.base import Unreachable
from federation.engine import EngineSettings, QueryEngine

from conftest import serving

PG = {"pg_host": "127.0.0.1", "pg_port": 5432, "pg_db": "test", "pg_user": "postgres"}
MY = {"mysql_host": "127.0.0.1", "mysql_tcp_port": 3306, "mysql_user": "root"}
BIG_ROWS = 1_000_000


def _service_missing(name: str, error: Exception):
    message = f"{name} is not reachable on this machine ({error}); `make test` starts it"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def postgres():
    """Admin setup (writes) through its own connection; flightdeck itself only reads."""
    try:
        admin = adbc_postgres.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True)
    except Exception as error:
        _service_missing("PostgreSQL", error)
    with admin.cursor() as cursor:
        cursor.execute("DROP SCHEMA IF EXISTS fd_test CASCADE")
        cursor.execute("CREATE SCHEMA fd_test")
        cursor.execute(f"CREATE TABLE fd_test.orders AS SELECT g AS order_id, (g % 500) + 1 AS customer_id, "
                       f"(g % 97)::numeric(10,2) + 0.5 AS amount, CASE WHEN g % 50 = 0 THEN 'failed' "
                       f"ELSE 'completed' END AS status FROM generate_series(1, {BIG_ROWS}) g")
        cursor.execute("ALTER TABLE fd_test.orders ADD PRIMARY KEY (order_id)")
        cursor.execute("CREATE TABLE fd_test.typed (id int PRIMARY KEY, small smallint, big bigint, "
                       "ratio double precision, price numeric(12,3), free numeric, name text, code varchar(8), "
                       "flag boolean, day date, at timestamp, at_tz timestamptz, raw bytea, doc jsonb, "
                       "tags text[], uid uuid, spot point)")
        cursor.execute("INSERT INTO fd_test.typed VALUES (1, 7, 9000000000, 0.25, 1234.567, 3.14159, 'zürich', "
                       "'ab', true, '2026-11-20', '2026-11-20 14:02:03.5', '2026-11-20 14:02:03.5+00', "
                       "'\\x00ff', '{\"a\": 1}', ARRAY['x', 'y'], '4f426329-b8c0-4fd3-8e93-d2e7c384a76c', "
                       "point(1, 2))")
        cursor.execute("INSERT INTO fd_test.typed (id) VALUES (2)")
        cursor.execute("ANALYZE fd_test.orders")
    yield PG
    with admin.cursor() as cursor:
        cursor.execute("DROP SCHEMA IF EXISTS fd_test CASCADE")
    admin.close()


@pytest.fixture(scope="module")
def mariadb():
    try:
        admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    except pymysql.MySQLError as error:
        _service_missing("MariaDB", error)
    with admin.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS fd_test")
        cursor.execute("CREATE DATABASE fd_test")
        cursor.execute("CREATE TABLE fd_test.customers (customer_id INT PRIMARY KEY, name VARCHAR(50), "
                       "tier ENUM('free', 'pro', 'enterprise'), balance DECIMAL(10, 2), active TINYINT(1), "
                       "joined DATE, seen DATETIME(6), note TEXT, raw VARBINARY(8), visits INT UNSIGNED)")
        cursor.executemany(
            "INSERT INTO fd_test.customers VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            [(i, f"c{i}\\x" if i == 1 else f"c{i}", ("free", "pro", "enterprise")[i % 3], i * 1.5, i % 2,
              dt.date(2024, 1, 1) + dt.timedelta(days=i), dt.datetime(2026, 11, 20, 14, 0, 0, i),
              None if i == 2 else "n", b"\x00\x01", i) for i in range(1, 501)])
    yield MY
    with admin.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS fd_test")
    admin.close()


def _engine(specs, base_dir):
    catalog = Catalog(specs, base_dir)
    return QueryEngine(catalog), catalog


def test_postgres_discovery_types_and_read_only(postgres, tmp_path):
    engine, catalog = _engine([DatasetSpec("typed", "postgres:fd_test.typed", postgres)], tmp_path)
    dataset = catalog.datasets["public.typed"]
    assert dataset.state == "ready" and dataset.primary_key == ["id"]
    assert dataset.skipped_columns == ["spot (point)"]  # reported, not fatal
    rows = engine.query("SELECT * FROM typed ORDER BY id").read_all()
    assert rows.schema.field("price").type == pa.decimal128(12, 3)
    assert rows.schema.field("at_tz").type == pa.timestamp("us", tz="UTC")
    first, second = rows.to_pylist()
    assert first["price"] == decimal.Decimal("1234.567") and first["free"] == decimal.Decimal("3.1415900000")
    assert first["tags"] == ["x", "y"] and first["doc"] == '{"a": 1}'
    assert first["uid"] == "4f426329-b8c0-4fd3-8e93-d2e7c384a76c" and first["raw"] == b"\x00\xff"
    assert first["at_tz"] == dt.datetime(2026, 11, 20, 14, 2, 3, 500000, tzinfo=dt.timezone.utc)
    assert all(value is None for key, value in second.items() if key != "id")
    with pytest.raises(ConnectorError, match="only one SELECT is sent"):
        dataset.connector.execute_sql("DELETE FROM fd_test.orders").read_all()
    with pytest.raises(ConnectorError, match="read-only transaction"):  # the session itself, beneath
        dataset.connector.open_stream("DELETE FROM fd_test.orders", None, None).read_all()
    catalog.close()


def test_pooled_connections_the_server_dropped_are_replaced_not_failed(postgres, tmp_path):
    """After a PostgreSQL restart (or its connections terminated), the next queries failed on
    the stale pooled connections, two per query (the statement sent whole, then the scan)."""
    engine, catalog = _engine([DatasetSpec("typed", "postgres:fd_test.typed", postgres)], tmp_path)
    connector = catalog.datasets["public.typed"].connector
    marker = "SELECT id FROM fd_test.typed WHERE id = 1"
    readers = [connector.execute_sql(marker) for _ in range(3)]  # three connections at once ...
    for reader in readers:
        assert reader.read_all().to_pylist() == [{"id": 1}]  # ... then all three in the pool
    with adbc_postgres.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as admin, \
            admin.cursor() as cursor:
        cursor.execute("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE "
                       "application_name = 'flightdeck' AND query LIKE '%fd_test%typed%' AND pid <> pg_backend_pid()")
        assert cursor.fetchone()[0] >= 1
    time.sleep(0.2)
    for _ in range(3):
        assert connector.execute_sql(marker).read_all().to_pylist() == [{"id": 1}]
    assert engine.query("SELECT count(*) AS n FROM typed").read_all().to_pylist() == [{"n": 2}]
    catalog.close()


def test_a_source_that_cannot_be_reached_is_not_asked_again_another_way(postgres, tmp_path, monkeypatch):
    """A statement sent whole that failed to connect was run again in DataFusion, whose scan
    connected again: twice connect_timeout against a source that does not answer."""
    engine, catalog = _engine([DatasetSpec("orders", "postgres:fd_test.orders", postgres)], tmp_path)
    connector = catalog.datasets["public.orders"].connector
    attempts = []

    def unreachable():
        attempts.append(time.monotonic())
        raise Unreachable("postgres (127.0.0.1:5432/test): cannot connect: timeout expired")
    planned = engine.plan("SELECT count(*) AS n, sum(amount) AS total FROM orders WHERE order_id < 100")
    assert planned.remote is not None  # sent whole
    monkeypatch.setattr(connector, "_connect", unreachable)  # the source stops answering
    connector._drain_pool()
    with pytest.raises(Unreachable, match="cannot connect"):
        engine.execute(planned).read_all()
    assert len(attempts) == 1
    catalog.close()


def test_postgres_pushdown_receives_only_the_selected_rows(postgres, tmp_path):
    engine, catalog = _engine([DatasetSpec("orders", "postgres:fd_test.orders", postgres)], tmp_path)
    stats = catalog.datasets["public.orders"].connector.stats
    result = engine.query("SELECT order_id, amount FROM orders WHERE order_id BETWEEN 5000 AND 5009").read_all()
    assert sorted(result.column("order_id").to_pylist()) == list(range(5000, 5010))
    assert stats.rows == 10  # of 1,000,000
    assert '"order_id" >= 5000' in stats.last_request and '"status"' not in stats.last_request
    count = engine.query("SELECT count(*) AS n FROM orders WHERE status = 'failed' AND customer_id = 1").read_all()
    assert count.to_pylist() == [{"n": BIG_ROWS // 500}]
    assert stats.rows == 10 + 1  # the whole aggregate ran in PostgreSQL: one row came back
    catalog.close()


def test_single_source_aggregate_receives_one_row_per_group(postgres, tmp_path):
    engine, catalog = _engine([DatasetSpec("orders", "postgres:fd_test.orders", postgres),
                               DatasetSpec("orders_again", "postgres:fd_test.orders", postgres)], tmp_path)
    stats = catalog.datasets["public.orders"].connector.stats
    planned = engine.plan("SELECT status, count(*) AS n, sum(amount) AS total, min(order_id) AS first "
                          "FROM orders GROUP BY status ORDER BY status")
    assert planned.remote is not None and "GROUP BY" in planned.remote.sql and '"fd_test"."orders"' in planned.remote.sql
    result = engine.execute(planned).read_all()
    assert result.column("n").to_pylist() == [BIG_ROWS - BIG_ROWS // 50, BIG_ROWS // 50]
    assert stats.rows == 2  # one per group, of 1,000,000
    local = QueryEngine(catalog, EngineSettings(whole_query_pushdown=False)).query(
        "SELECT status, count(*) AS n, sum(amount) AS total, min(order_id) AS first "
        "FROM orders GROUP BY status ORDER BY status").read_all()
    assert result.to_pylist() == local.to_pylist()
    # a self-join on one backend goes down whole too
    joined = engine.plan("SELECT count(*) AS n FROM orders a JOIN orders_again b ON a.order_id = b.order_id + 1 "
                         "WHERE a.order_id < 100")
    assert joined.remote is not None
    assert engine.execute(joined).read_all().to_pylist() == [{"n": 98}]
    catalog.close()


@pytest.mark.parametrize("sql,reason", [
    ("SELECT sum(amount) / count(*) FROM orders", "division"),
    ("SELECT avg(amount) FROM orders", "avg over a decimal"),
    ("SELECT o.order_id FROM orders o LEFT JOIN orders_again a ON a.order_id = o.order_id + 1 LIMIT 1",
     "outer join"),
    ("SELECT order_id FROM orders WHERE order_id IN (SELECT order_id FROM orders_again WHERE order_id < 3)",
     "semi join"),
    ("SELECT length(status) FROM orders LIMIT 1", "a function outside the allow-list"),
])
def test_queries_that_could_differ_stay_in_datafusion(postgres, tmp_path, sql, reason):
    engine, catalog = _engine([DatasetSpec("orders", "postgres:fd_test.orders", postgres),
                               DatasetSpec("orders_again", "postgres:fd_test.orders", postgres)], tmp_path)
    planned = engine.plan(sql)
    assert planned.remote is None, reason
    assert engine.execute(planned).read_all().num_rows >= 1
    catalog.close()


def test_text_ordering_stays_local_unless_the_collation_is_c(postgres, tmp_path):
    from federation import expr as fx
    engine, catalog = _engine([DatasetSpec("orders", "postgres:fd_test.orders", postgres)], tmp_path)
    connector = catalog.datasets["public.orders"].connector
    planned = engine.plan("SELECT status FROM orders GROUP BY status ORDER BY status")
    byte_order = connector.comparison_rules("fd_test.orders")["status"] == fx.EXACT
    assert (planned.remote is not None) == byte_order
    assert engine.plan("SELECT count(*) FROM orders WHERE status = 'failed'").remote is not None
    catalog.close()


def test_mysql_discovery_types_and_read_only(mariadb, tmp_path):
    engine, catalog = _engine([DatasetSpec("customers", "mysql:fd_test.customers", mariadb)], tmp_path)
    dataset = catalog.datasets["public.customers"]
    assert dataset.primary_key == ["customer_id"]
    rows = engine.query("SELECT * FROM customers WHERE customer_id <= 2 ORDER BY customer_id").read_all()
    assert rows.schema.types == [pa.int32(), pa.string(), pa.string(), pa.decimal128(10, 2), pa.bool_(),
                                 pa.date32(), pa.timestamp("us"), pa.string(), pa.binary(), pa.uint32()]
    first, second = rows.to_pylist()
    assert first == {"customer_id": 1, "name": "c1\\x", "tier": "pro", "balance": decimal.Decimal("1.50"),
                     "active": True, "joined": dt.date(2024, 1, 2), "seen": dt.datetime(2026, 11, 20, 14, 0, 0, 1),
                     "note": "n", "raw": b"\x00\x01", "visits": 1}
    assert second["note"] is None and second["active"] is False
    # a backslash in a pushed literal means a backslash, not an escape
    assert engine.query("SELECT customer_id FROM customers WHERE name = 'c1\\x'").read_all().num_rows == 1
    with pytest.raises(ConnectorError, match="(?i)read.only"):
        dataset.connector.execute_sql("DELETE FROM fd_test.customers").read_all()
    with pytest.raises(ConnectorError, match="READ ONLY transaction"):  # the session itself, beneath
        dataset.connector.open_stream("DELETE FROM fd_test.customers", None, None).read_all()


def test_mysql_filters_are_pushed(mariadb, tmp_path):
    engine, catalog = _engine([DatasetSpec("customers", "mysql:fd_test.customers", mariadb)], tmp_path)
    result = engine.query("SELECT name FROM customers WHERE tier = 'enterprise' AND customer_id < 10").read_all()
    assert sorted(result.column("name").to_pylist()) == ["c2", "c5", "c8"]
    stats = catalog.datasets["public.customers"].connector.stats
    assert stats.rows == 3
    assert "`tier` = %s" in stats.last_request and "`customer_id` < 10" in stats.last_request
    assert "enterprise" not in stats.last_request  # bound by PyMySQL, not written by flightdeck


def test_a_limit_over_an_exact_filter_reaches_mariadb(mariadb, tmp_path):
    engine, catalog = _engine([DatasetSpec("customers", "mysql:fd_test.customers", mariadb)], tmp_path)
    stats = catalog.datasets["public.customers"].connector.stats
    result = engine.query("SELECT name, tier FROM customers WHERE customer_id > 100 LIMIT 4").read_all()
    assert result.num_rows == 4
    assert "`customer_id` > 100" in stats.last_request and "LIMIT 4" in stats.last_request
    assert stats.rows == 4  # text columns keep it from going whole, the limit still goes down


def test_mysql_aggregate_goes_down_whole_where_mariadb_agrees(mariadb, tmp_path):
    engine, catalog = _engine([DatasetSpec("customers", "mysql:fd_test.customers", mariadb)], tmp_path)
    stats = catalog.datasets["public.customers"].connector.stats
    sql = ("SELECT active, count(*) AS n, sum(balance) AS total, max(joined) AS last "
           "FROM customers WHERE customer_id > 10 GROUP BY active")
    planned = engine.plan(sql)
    assert planned.remote is not None and "GROUP BY" in planned.remote.sql and "`fd_test`.`customers`" in planned.remote.sql
    result = engine.execute(planned).read_all()
    assert stats.rows == 2  # one per group, of 490
    local = QueryEngine(catalog, EngineSettings(whole_query_pushdown=False)).query(sql).read_all()
    assert sorted(result.to_pylist(), key=str) == sorted(local.to_pylist(), key=str)
    # What MariaDB computes differently stays in DataFusion: text (collations), ORDER BY (NULLs
    # first), avg (a rounded decimal).
    for different in ("SELECT tier, count(*) FROM customers GROUP BY tier",
                      "SELECT active, count(*) FROM customers GROUP BY active ORDER BY active",
                      "SELECT avg(customer_id) FROM customers"):
        assert engine.plan(different).remote is None, different


def test_three_backend_join(postgres, mariadb, tmp_path):
    """PostgreSQL orders x MariaDB customers x Parquet logs, checked against DuckDB on copies."""
    logs = pa.table({"order_id": [50, 100, 150, 7], "message": ["timeout", "timeout", "declined", "ok"]})
    pq.write_table(logs, tmp_path / "logs.parquet")
    config = {"datasets": [
        {"from": "postgres:fd_test.orders", "name": "orders", "params": postgres},
        {"from": "mysql:fd_test.customers", "name": "crm.customers", "params": mariadb},
        {"from": "file:logs.parquet", "name": "logs"},
    ]}
    sql = ("SELECT c.tier, l.message, count(*) AS n, sum(o.amount) AS total "
           "FROM orders o JOIN crm.customers c ON c.customer_id = o.customer_id "
           "JOIN logs l ON l.order_id = o.order_id WHERE o.status = 'failed' "
           "GROUP BY c.tier, l.message ORDER BY c.tier, l.message")
    with serving(config, tmp_path) as runtime, \
            flightsql.connect(runtime.flight_url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        federated = cursor.fetch_arrow_table()
        cursor.execute("SELECT datasets, queries, rows FROM flightdeck.runtime.source_stats ORDER BY datasets")
        stats = {row[0]: row[1:] for row in cursor.fetchall()}
        assert stats["public.orders"] == (1, BIG_ROWS // 50)  # only failed orders crossed the wire
        assert stats["crm.customers"] == (1, 500)
    reference = duckdb.connect()
    with adbc_postgres.connect("postgresql://postgres@127.0.0.1:5432/test") as pg, pg.cursor() as cursor:
        cursor.execute("SELECT order_id, customer_id, status, amount::text AS amount FROM fd_test.orders")
        reference.register("raw_orders", cursor.fetch_arrow_table())
    reference.execute("CREATE VIEW orders AS SELECT order_id, customer_id, status, "
                      "CAST(amount AS DECIMAL(38, 10)) AS amount FROM raw_orders")
    admin = pymysql.connect(host="127.0.0.1", user="root")
    with admin.cursor() as cursor:
        cursor.execute("SELECT customer_id, CAST(tier AS CHAR) FROM fd_test.customers")
        rows = cursor.fetchall()
    admin.close()
    reference.register("customers", pa.table({"customer_id": [r[0] for r in rows], "tier": [r[1] for r in rows]}))
    reference.register("logs", logs)
    expected = reference.sql(sql.replace("crm.customers", "customers")).to_arrow_table()
    assert federated.num_rows == expected.num_rows > 0
    assert federated.to_pylist() == expected.to_pylist()


def test_unreachable_server_is_a_clear_error_without_secrets(tmp_path):
    config = {"datasets": [
        {"from": "postgres:public.orders", "name": "pg_down",
         "params": {"pg_host": "127.0.0.1", "pg_port": 1, "pg_user": "agent", "pg_pass": "pg-secret-77",
                    "connect_timeout": 2}},
        {"from": "mysql:shop.orders", "name": "my_down",
         "params": {"mysql_host": "127.0.0.1", "mysql_tcp_port": 1, "mysql_pass": "my-secret-88",
                    "connect_timeout": 2}},
    ]}
    with serving(config, tmp_path) as runtime, \
            flightsql.connect(runtime.flight_url, autocommit=True) as conn, conn.cursor() as cursor:
        for name, secret in (("pg_down", "pg-secret-77"), ("my_down", "my-secret-88")):
            dataset = runtime.catalog.datasets[f"public.{name}"]
            assert dataset.state == "unavailable"
            assert "127.0.0.1" in dataset.error and secret not in dataset.error
            with pytest.raises(adbc_driver_manager.Error) as raised:
                cursor.execute(f"SELECT * FROM {name}")
            assert f"dataset {name} is unavailable" in str(raised.value)
            assert secret not in str(raised.value)
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


def test_slow_statements_stop_at_the_query_timeout(postgres, mariadb, tmp_path):
    from federation.connectors.mysql import MySQLConnector
    from federation.connectors.postgres import PostgresConnector

    for connector, sleep in ((PostgresConnector({**postgres, "query_timeout": 1}, tmp_path), "SELECT pg_sleep(10)"),
                             (MySQLConnector({**mariadb, "query_timeout": 1}, tmp_path), "SELECT SLEEP(10)")):
        started = time.monotonic()
        with pytest.raises(ConnectorError) as raised:
            connector.execute_sql(sleep).read_all()
        assert time.monotonic() - started < 5
        assert re.search(r"timeout|timed out|interrupted", str(raised.value), re.IGNORECASE)
        connector.close()
