"""The demo through real clients: ADBC dbapi, pandas and polars."""
from __future__ import annotations

import adbc_driver_flightsql.dbapi as flightsql
import pandas as pd
import polars as pl
import pyarrow as pa

IMPACTED = """
    SELECT c.customer_id, c.email, count(*) AS failed_orders
    FROM orders o JOIN crm.customers c ON c.customer_id = o.customer_id
    WHERE o.error_code = 'DB_CONN_EXHAUSTED'
    GROUP BY c.customer_id, c.email
    ORDER BY failed_orders DESC, c.customer_id
"""


def test_execute_without_parameters(connection):
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) AS n FROM orders")
        assert cursor.fetchall() == [(30_000,)]
        assert cursor.description[0][0] == "n"


def test_execute_with_parameters(connection):
    with connection.cursor() as cursor:
        cursor.execute("SELECT order_id, status FROM orders WHERE customer_id = ? AND status = ? "
                       "ORDER BY order_id", (42, "completed"))
        rows = cursor.fetchall()
        cursor.execute("SELECT count(*) FROM orders WHERE customer_id = 42 AND status = 'completed'")
        assert len(rows) == cursor.fetchone()[0] > 0
        assert all(status == "completed" for _, status in rows)
        # the same prepared text with other values
        cursor.execute("SELECT order_id, status FROM orders WHERE customer_id = ? AND status = ? "
                       "ORDER BY order_id", (43, "completed"))
        assert cursor.fetchall() != rows


def test_fetch_arrow_table_and_df(connection):
    with connection.cursor() as cursor:
        cursor.execute("SELECT order_id, amount, created_at FROM orders ORDER BY order_id LIMIT 5")
        table = cursor.fetch_arrow_table()
        assert table.num_rows == 5
        assert table.schema.field("amount").type == pa.decimal128(10, 2)
        assert pa.types.is_timestamp(table.schema.field("created_at").type)
        cursor.execute("SELECT order_id FROM orders ORDER BY order_id LIMIT 3")
        frame = cursor.fetch_df()
        assert list(frame["order_id"]) == [100_001, 100_002, 100_003]


def test_cross_source_join_answers_the_postmortem(connection):
    with connection.cursor() as cursor:
        cursor.execute(IMPACTED)
        impacted = cursor.fetch_arrow_table()
        cursor.execute("SELECT count(DISTINCT customer_id) FROM orders "
                       "WHERE error_code = 'DB_CONN_EXHAUSTED'")
        assert impacted.num_rows == cursor.fetchone()[0] > 100
        assert all("@example.com" in email for email in impacted.column("email").to_pylist())


def test_adbc_get_info(connection):
    info = connection.adbc_get_info()
    assert info["vendor_name"] == "flightdeck"
    assert info["vendor_version"] == "0.1.0"
    assert info["vendor_arrow_version"] == pa.__version__


def test_adbc_get_objects(connection):
    objects = connection.adbc_get_objects(depth="all").read_all().to_pylist()
    assert [c["catalog_name"] for c in objects] == ["flightdeck"]
    schemas = {s["db_schema_name"]: s for s in objects[0]["catalog_db_schemas"]}
    assert set(schemas) == {"crm", "public", "runtime"}
    system = {t["table_name"]: t["table_type"] for t in schemas["runtime"]["db_schema_tables"]}
    assert system == {"datasets": "SYSTEM TABLE", "queries": "SYSTEM TABLE", "source_stats": "SYSTEM TABLE"}
    tables = {t["table_name"]: t for t in schemas["public"]["db_schema_tables"]}
    assert set(tables) == {"guides", "logs", "metrics", "orders"}
    columns = [c["column_name"] for c in tables["orders"]["table_columns"]]
    assert columns[:4] == ["order_id", "customer_id", "created_at", "status"]
    filtered = connection.adbc_get_objects(depth="tables", table_name_filter="ord%").read_all()
    names = [t["table_name"] for c in filtered.to_pylist() for s in c["catalog_db_schemas"]
             for t in s["db_schema_tables"] or []]
    assert names == ["orders"]


def test_adbc_get_table_schema(connection):
    schema = connection.adbc_get_table_schema("customers", db_schema_filter="crm")
    assert schema.names == ["customer_id", "name", "email", "tier", "country", "signup_date"]
    assert schema.field("signup_date").type == pa.date32()
    assert connection.adbc_get_table_types() == ["SYSTEM TABLE", "TABLE", "VIEW"]


def test_pandas_through_the_adbc_connection(connection):
    frame = pd.read_sql("SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status",
                        connection)
    assert list(frame["status"]) == ["completed", "failed", "pending"]
    assert frame["n"].sum() == 30_000


def test_polars_reads_the_same_query(connection):
    query = "SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status"
    frame = pl.read_database(query, connection)
    assert frame["status"].to_list() == ["completed", "failed", "pending"]
    assert frame["n"].sum() == 30_000
    batches = list(pl.read_database("SELECT order_id FROM orders", connection,
                                    iter_batches=True, batch_size=10_000))
    assert sum(b.height for b in batches) == 30_000


def test_username_password_handshake_without_auth_configured(server):
    # Auth is off for the demo; a client that sends credentials still gets a bearer token.
    with flightsql.connect(server.url, db_kwargs={"username": "agent", "password": "x"},
                           autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)


def test_explain_shows_what_each_backend_is_sent(connection):
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN SELECT status, count(*) FROM orders WHERE region = 'eu-west' GROUP BY status")
        rows = dict(cursor.fetchall())
        [(label, sql)] = [(k, v) for k, v in rows.items() if k.startswith("flightdeck")]
        assert label == "flightdeck: whole query sent to duckdb (orders.duckdb)"
        assert "GROUP BY" in sql and "'eu-west'" in sql
        cursor.execute(IMPACTED.replace("SELECT", "EXPLAIN SELECT", 1))
        requests = {k: v for k, v in cursor.fetchall() if k.startswith("flightdeck")}
        assert requests == {
            "flightdeck: scan of public.orders on duckdb (orders.duckdb)":
                'SELECT "customer_id", "error_code" FROM "orders" WHERE ("error_code" = $1)'
                "  -- parameters: ['DB_CONN_EXHAUSTED']",
            "flightdeck: scan of crm.customers on sqlite (crm.sqlite)":
                'SELECT "customer_id", "email" FROM "customers"',
        }
