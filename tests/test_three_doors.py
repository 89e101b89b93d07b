"""One investigation through all three doors of one running flightdeck (Flight SQL with ADBC,
HTTP with httpx, MCP with the SDK's client at /v1/mcp): the same questions get the same answers,
and each door says how fresh the accelerated copy it read is."""
from __future__ import annotations

import datetime as dt
import json
import time
from typing import Any

import adbc_driver_flightsql.dbapi as flightsql
import anyio
import httpx
import pytest
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

INCIDENT = "orders failing after scaling to three replicas: too many database connections"
POOLER = "connection-pooler-transaction-mode.md"
QUESTIONS = {
    "orders per status": ("SELECT status, count(*) AS orders FROM orders GROUP BY status ORDER BY status", None),
    "failed orders": ("SELECT count(*) AS failed FROM orders WHERE status = $1", ["failed"]),
    "impacted customers": ("SELECT c.customer_id, count(*) AS failed FROM orders o "
                           "JOIN crm.customers c ON c.customer_id = o.customer_id WHERE o.status = $1 "
                           "GROUP BY c.customer_id ORDER BY failed DESC, c.customer_id LIMIT 5", ["failed"]),
    "guides": ("SELECT count(*) AS guides FROM guides", None),
}
DATA_AS_OF = b"flightdeck.data_as_of"
DATA_AS_OF_DATASETS = b"flightdeck.data_as_of.datasets"


def flight_sql(server, query: str, parameters: list | None) -> tuple[list[dict], dict]:
    """Rows and result schema metadata through ADBC."""
    with flightsql.connect(server.url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(query, parameters)
        table = cursor.fetch_arrow_table()
    return table.to_pylist(), table.schema.metadata or {}


def http_sql(server, query: str, parameters: list | None) -> tuple[list[dict], httpx.Headers]:
    response = httpx.post(f"{server.http_url}/v1/sql", json={"sql": query, "parameters": parameters or []},
                          timeout=60)
    assert response.status_code == 200, response.text
    return response.json(), response.headers


def mcp_call(server, tool: str, arguments: dict) -> dict:
    async def main() -> Any:
        async with Client(streamable_http_client(f"{server.http_url}/v1/mcp")) as client:
            return await client.call_tool(tool, arguments)
    result = anyio.run(main)
    assert not result.is_error, result.content[0].text
    return result.structured_content


def mcp_sql(server, query: str, parameters: list | None) -> dict:
    return mcp_call(server, "sql", {"query": query, **({"parameters": parameters} if parameters else {})})


@pytest.mark.parametrize("question", list(QUESTIONS))
def test_the_same_question_gets_the_same_answer_through_every_door(server, question):
    query, parameters = QUESTIONS[question]
    through_flight, _ = flight_sql(server, query, parameters)
    through_http, _ = http_sql(server, query, parameters)
    through_mcp = mcp_sql(server, query, parameters)
    assert through_flight, question
    assert through_http == through_flight
    assert through_mcp["rows"] == through_flight and through_mcp["truncated"] is False
    if question == "orders per status":
        assert [row["status"] for row in through_flight] == ["completed", "failed", "pending"]
    if question == "failed orders":
        per_status = {row["status"]: row["orders"] for row in flight_sql(server, QUESTIONS["orders per status"][0],
                                                                          None)[0]}
        assert through_flight == [{"failed": per_status["failed"]}] and per_status["failed"] > 0


def test_the_pooler_guide_is_found_first_through_every_door(server):
    through_flight, _ = flight_sql(server, "SELECT path FROM hybrid_search('public.guides', $1, 1)", [INCIDENT])
    response = httpx.post(f"{server.http_url}/v1/search", timeout=60,
                          json={"text": INCIDENT, "datasets": ["guides"], "limit": 1, "additional_columns": ["path"]})
    assert response.status_code == 200, response.text
    through_mcp = mcp_call(server, "search", {"text": INCIDENT, "datasets": ["guides"], "limit": 1})
    assert through_flight == [{"path": POOLER}]
    assert response.json()["matches"][0]["metadata"] == {"path": POOLER}
    assert through_mcp["matches"][0]["row"]["path"] == POOLER


def _status_table(server) -> dt.datetime:
    rows, _ = flight_sql(server, "SELECT data_as_of FROM flightdeck.runtime.datasets WHERE name = $1",
                         ["public.guides"])
    return rows[0]["data_as_of"]


def _freshness_through_every_door(server) -> list[dt.datetime]:
    query, _ = QUESTIONS["guides"]
    _, metadata = flight_sql(server, query, None)
    assert json.loads(metadata[DATA_AS_OF_DATASETS]) == {"public.guides": metadata[DATA_AS_OF].decode()}
    _, headers = http_sql(server, query, None)
    through_mcp = mcp_sql(server, query, None)["data_as_of"]
    assert through_mcp["datasets"] == {"public.guides": through_mcp["oldest"]}
    return [dt.datetime.fromisoformat(stamp) for stamp in
            (metadata[DATA_AS_OF].decode(), headers["X-Flightdeck-Data-As-Of"], through_mcp["oldest"])]


def test_every_door_says_how_fresh_the_copy_is_and_it_moves_after_a_refresh(server):
    before = _freshness_through_every_door(server)
    assert before == [_status_table(server)] * 3
    time.sleep(0.01)
    refreshed = httpx.post(f"{server.http_url}/v1/datasets/guides/acceleration/refresh", timeout=120)
    assert refreshed.status_code == 200, refreshed.text
    after = _freshness_through_every_door(server)
    assert after == [_status_table(server)] * 3 and after[0] > before[0]
    _, federated = flight_sql(server, QUESTIONS["failed orders"][0], ["failed"])
    assert DATA_AS_OF not in federated  # read from its source, not from a copy
