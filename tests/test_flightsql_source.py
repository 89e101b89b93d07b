"""flightsql: a second flightdeck process as the backend, through ADBC."""
from __future__ import annotations

import pytest

from federation.catalog import Catalog, DatasetSpec
from federation.connectors import ConnectorError
from federation.engine import EngineSettings, QueryEngine



def test_a_remote_flightdeck_as_a_source(server, tmp_path):
    params = {"flightsql_endpoint": server.url}
    engine = QueryEngine(Catalog([
        DatasetSpec("remote_orders", "flightsql:public.orders", params),
        DatasetSpec("remote_customers", "flightsql:crm.customers", params),
    ], tmp_path))
    connector = engine.catalog.datasets["public.remote_orders"].connector
    assert "crm.customers" in connector.tables() and "public.orders" in connector.tables()
    failed = engine.query("SELECT order_id FROM remote_orders WHERE error_code = 'DB_CONN_EXHAUSTED'").read_all()
    assert failed.num_rows == 470
    assert connector.stats.rows == 470  # the filter ran on the remote server
    assert "\"error_code\" = ?" in connector.stats.last_request  # the value is bound through ADBC
    result = engine.query(
        "SELECT c.tier, count(*) AS n FROM remote_orders o JOIN remote_customers c "
        "ON c.customer_id = o.customer_id WHERE o.error_code = 'DB_CONN_EXHAUSTED' "
        "GROUP BY c.tier ORDER BY c.tier").read_all()
    assert sum(result.column("n").to_pylist()) == 470


def test_aggregates_over_a_remote_flightdeck_go_down_whole(server, tmp_path):
    params = {"flightsql_endpoint": server.url}
    engine = QueryEngine(Catalog([DatasetSpec("remote_orders", "flightsql:public.orders", params)], tmp_path))
    connector = engine.catalog.datasets["public.remote_orders"].connector
    sql = "SELECT count(*) AS n, sum(latency_ms) AS total, max(order_id) AS last FROM remote_orders WHERE order_id > 100010"
    planned = engine.plan(sql)
    assert planned.remote is not None and planned.remote.connector is connector
    result = engine.execute(planned).read_all()
    assert connector.stats.rows == 1  # the aggregate ran on the remote server
    local = QueryEngine(engine.catalog, EngineSettings(whole_query_pushdown=False)).query(sql).read_all()
    assert result.to_pylist() == local.to_pylist()


def test_remote_errors_and_unreachable_servers(server, tmp_path):
    connector_engine = QueryEngine(Catalog([
        DatasetSpec("gone", "flightsql:public.orders",
                    {"flightsql_endpoint": "grpc://127.0.0.1:1", "flightsql_api_key": "remote-secret-99"})], tmp_path))
    dataset = connector_engine.catalog.datasets["public.gone"]
    assert dataset.state == "unavailable"
    assert "127.0.0.1:1" in dataset.error and "remote-secret-99" not in dataset.error
    from federation.connectors.flightsql import FlightSQLConnector
    remote = FlightSQLConnector({"flightsql_endpoint": server.url}, tmp_path)
    with pytest.raises(ConnectorError, match="only one SELECT is sent"):
        remote.execute_sql("DROP TABLE orders").read_all()
    with pytest.raises(ConnectorError, match="not allowed"):  # and the peer refuses it itself
        remote.open_stream("DROP TABLE orders", None, None).read_all()
