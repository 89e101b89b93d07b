"""The MCP door through the SDK's own client: in process, over stdio (`flightdeck mcp` as a
subprocess) and over streamable HTTP (uvicorn on a free port), on the bundled demo."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

import anyio
import httpx2
import pytest
import uvicorn
import yaml
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from conftest import REPO, serving, write_config
from flight.mcp import http_app, http_server, stdio_server
from flight.mcp.server import SESSIONS_PER_CALLER
from flightdeck.auth import Principal
from flightdeck.runtime_config import Mcp, RuntimeConfig

INCIDENT = "orders failing after scaling to three replicas: too many database connections"
POOLER = "connection-pooler-transaction-mode.md"
HOSTILE = "zz' OR 1=1) --"
TOOLS = {"list_datasets", "table_schema", "sql", "search", "sample_distinct_columns", "random_sample",
         "top_n_sample", "explain", "refresh_dataset"}
API_KEY = "mcp-test-key"
OTHER_KEY = "mcp-other-test-key"


@pytest.fixture(scope="module")
def runtime(deck) -> RuntimeConfig:
    return deck.stack.loaded.config.runtime


def _with_caps(runtime: RuntimeConfig, **caps) -> RuntimeConfig:
    return runtime.model_copy(update={"mcp": Mcp(**caps)})


def session(server_or_transport: Any, calls) -> Any:
    """Run ``calls(client)`` against a server (in process, a URL or stdio parameters)."""
    async def main():
        async with Client(server_or_transport) as client:
            return await calls(client)
    return anyio.run(main)


def call(server: Any, tool: str, arguments: dict | None = None):
    return session(server, lambda client: client.call_tool(tool, arguments or {}))


def ok(result) -> dict:
    assert not result.is_error, result.content[0].text
    return result.structured_content


def error_text(result) -> str:
    assert result.is_error, result.structured_content
    return result.content[0].text


@pytest.fixture(scope="module")
def server(deck, runtime):
    return stdio_server(deck.service, runtime)


# ---- in process ----

def test_every_tool_is_listed_with_its_schemas_and_hints(server):
    tools = {t.name: t for t in session(server, lambda client: client.list_tools()).tools}
    assert set(tools) == TOOLS
    for name, tool in tools.items():
        assert tool.description and tool.input_schema["type"] == "object", name
        assert tool.output_schema and tool.output_schema["type"] == "object", name
        assert tool.annotations.read_only_hint is (name != "refresh_dataset"), name
        assert tool.annotations.destructive_hint is False, name
    assert tools["sql"].input_schema["required"] == ["query"]
    assert set(tools["search"].input_schema["properties"]) == {"text", "datasets", "mode", "where", "limit"}
    assert {"truncated", "notice", "data_as_of", "rows"} <= set(tools["sql"].output_schema["properties"])


def test_sql_answers_with_rows_columns_and_no_truncation(server):
    result = ok(call(server, "sql", {"query": "SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status"}))
    assert result["rows"] == [{"status": "completed", "n": 28858}, {"status": "failed", "n": 576},
                              {"status": "pending", "n": 566}]
    assert [c["name"] for c in result["columns"]] == ["status", "n"]
    assert result["row_count"] == 3 and result["truncated"] is False and result["notice"] is None
    assert result["data_as_of"] is None  # orders is federated: no copy to date


def test_parameters_are_bound_never_spliced(server):
    query = "SELECT count(*) AS n FROM crm.customers WHERE name = $1 OR name = ?"  # both are $1
    assert ok(call(server, "sql", {"query": query, "parameters": [HOSTILE]}))["rows"] == [{"n": 0}]
    refused = call(server, "sql", {"query": query, "parameters": [HOSTILE, "another"]})
    assert "takes 1 parameter(s), 2 were bound" in error_text(refused)
    rows = ok(call(server, "sql", {"query": "SELECT $1 AS echoed, $2 + 1 AS n", "parameters": [HOSTILE, 41]}))["rows"]
    assert rows == [{"echoed": HOSTILE, "n": 42}]
    named = ok(call(server, "sql", {"query": "SELECT customer_id FROM crm.customers WHERE customer_id = $1",
                                    "parameters": [42]}))
    assert named["rows"] == [{"customer_id": 42}]


@pytest.mark.parametrize("caps, query, rows, words", [
    ({"max_rows": 5}, "SELECT * FROM orders", 5, "more than 5 rows"),
    ({"max_rows": 5}, "SELECT * FROM orders ORDER BY order_id LIMIT 6", 5, "Aggregate"),
    ({"max_chars": 1000}, "SELECT * FROM orders ORDER BY order_id", None, "1,000-character"),
])
def test_a_result_over_a_cap_comes_back_truncated_with_a_notice(deck, runtime, caps, query, rows, words):
    capped = stdio_server(deck.service, _with_caps(runtime, **caps))
    result = ok(call(capped, "sql", {"query": query}))
    assert result["truncated"] is True and words in result["notice"]
    assert "filter" in result["notice"]
    if rows is not None:
        assert result["row_count"] == len(result["rows"]) == rows
    else:
        assert 0 < len(result["rows"]) and len(json.dumps(result["rows"])) <= 1000
    assert [r["order_id"] for r in result["rows"]][:2] == [100001, 100002]


def test_a_result_exactly_at_the_cap_is_whole(deck, runtime):
    capped = stdio_server(deck.service, _with_caps(runtime, max_rows=5))
    result = ok(call(capped, "sql", {"query": "SELECT order_id FROM orders ORDER BY order_id LIMIT 5"}))
    assert result["row_count"] == 5 and result["truncated"] is False and result["notice"] is None
    sample = ok(call(capped, "random_sample", {"dataset": "orders", "limit": 50}))
    assert sample["row_count"] == 5 and sample["truncated"] is True


@pytest.mark.parametrize("tool, arguments, words", [
    ("sql", {"query": "DELETE FROM orders"}, "refused (flightdeck is read-only): DELETE statements are not allowed"),
    ("sql", {"query": "DROP TABLE orders"}, "refused"),
    ("sql", {"query": "SELECT nope FROM orders"}, "invalid request: "),
    ("sql", {"query": "SELECT 1 +"}, "invalid request: "),
    ("sql", {"query": "SELECT * FROM nowhere"}, "nowhere"),
    ("table_schema", {"dataset": "nope"}, "not found: unknown dataset 'nope'"),
    ("top_n_sample", {"dataset": "orders", "order_by": 'amount" DESC; --'}, "unknown column"),
    ("sample_distinct_columns", {"dataset": "orders", "columns": ["nope"]}, "unknown column 'nope'"),
    ("search", {"text": "pool", "datasets": ["orders"]}, "searchable column"),
    ("refresh_dataset", {"dataset": "orders"}, "invalid request"),
    ("sql", {"query": "SELECT ? AS v", "parameters": [2 ** 70]}, "outside the 64-bit integer range"),
])
def test_failures_reach_the_agent_as_tool_errors_with_their_message(server, tool, arguments, words):
    text = error_text(call(server, tool, arguments))
    assert words in text and "Traceback" not in text
    if "nope FROM" in arguments.get("query", ""):
        assert "nope" in text


def test_search_finds_the_pooler_guide_first(server, deck):
    result = ok(call(server, "search", {"text": INCIDENT, "limit": 3}))
    matches = result["matches"]
    assert matches[0]["row"]["path"] == POOLER and len(matches) == 3
    assert matches[0]["dataset"] == "public.guides" and matches[0]["chunk"]
    assert [m["score"] for m in matches] == sorted((m["score"] for m in matches), reverse=True)
    stamp = deck.accelerator.refresher("guides").status.data_as_of.isoformat()
    assert result["data_as_of"] == {"oldest": stamp, "datasets": {"public.guides": stamp}}
    for mode in ("vector", "text"):
        found = ok(call(server, "search", {"text": INCIDENT, "datasets": ["guides"], "mode": mode, "limit": 1}))
        assert found["matches"][0]["row"]["path"] == POOLER
    filtered = ok(call(server, "search", {"text": INCIDENT, "where": f"path <> '{POOLER}'", "limit": 2}))
    assert POOLER not in [m["row"]["path"] for m in filtered["matches"]]


def test_catalog_tools_and_resources(server):
    datasets = {d["name"]: d for d in ok(call(server, "list_datasets"))["datasets"]}
    assert {"public.orders", "crm.customers", "public.logs", "public.metrics", "public.guides"} <= set(datasets)
    assert datasets["public.guides"]["accelerated"] and datasets["public.guides"]["searchable_columns"] == ["content"]
    assert datasets["public.guides"]["data_as_of"] and not datasets["public.orders"]["accelerated"]
    schema = ok(call(server, "table_schema", {"dataset": "orders"}))
    assert schema["dataset"] == "public.orders" and schema["primary_key"] == ["order_id"]
    assert {"name": "order_id", "type": "int64", "nullable": True} in schema["columns"]

    async def resources(client):
        listed = await client.list_resources()
        read = await client.read_resource("flightdeck://datasets/crm.customers/schema")
        return listed, read
    listed, read = session(server, resources)
    assert {str(r.uri) for r in listed.resources} >= {"flightdeck://datasets/public.orders/schema",
                                                      "flightdeck://datasets/crm.customers/schema"}
    content = json.loads(read.contents[0].text)
    assert content["dataset"] == "crm.customers" and "customer_id" in [c["name"] for c in content["columns"]]


def test_samples_and_explain(server):
    distinct = ok(call(server, "sample_distinct_columns", {"dataset": "orders", "columns": ["status", "region"]}))
    assert distinct["columns"]["status"] == ["completed", "failed", "pending"] and "region" in distinct["columns"]
    every = ok(call(server, "sample_distinct_columns", {"dataset": "metrics", "limit": 2}))
    assert len(every["columns"]) >= 3 and all(len(v) <= 2 for v in every["columns"].values())
    sample = ok(call(server, "random_sample", {"dataset": "crm.customers", "limit": 4}))
    assert sample["row_count"] == 4 and sample["truncated"] is False
    top = ok(call(server, "top_n_sample", {"dataset": "orders", "order_by": "latency_ms", "limit": 3}))
    latencies = [r["latency_ms"] for r in top["rows"]]
    assert latencies == sorted(latencies, reverse=True)
    low = ok(call(server, "top_n_sample", {"dataset": "orders", "order_by": "latency_ms", "limit": 3,
                                           "descending": False}))
    assert [r["latency_ms"] for r in low["rows"]] == sorted(r["latency_ms"] for r in low["rows"])
    assert low["rows"][0]["latency_ms"] <= latencies[-1]
    explained = ok(call(server, "explain", {"query": "SELECT count(*) FROM orders WHERE status = $1",
                                            "parameters": ["failed"]}))
    assert "plan" in explained["rows"][0] and any("orders" in r["plan"] for r in explained["rows"])


def test_freshness_follows_the_copy_and_moves_forward_after_a_refresh(server, deck):
    query = {"query": "SELECT count(*) AS n FROM guides"}
    before = ok(call(server, "sql", query))["data_as_of"]
    status = deck.service.datasets(Principal("anonymous"))
    stamp = next(d for d in status if d["name"] == "public.guides")["data_as_of"].isoformat()
    assert before == {"oldest": stamp, "datasets": {"public.guides": stamp}}
    time.sleep(0.01)
    refreshed = ok(call(server, "refresh_dataset", {"dataset": "guides"}))
    assert refreshed["dataset"] == "public.guides" and refreshed["rows"] == refreshed["last_refresh_rows"] > 0
    after = ok(call(server, "sql", query))["data_as_of"]
    assert after["oldest"] == refreshed["data_as_of"] > before["oldest"]
    joined = ok(call(server, "sql", {"query": "SELECT count(*) AS n FROM guides g CROSS JOIN orders o "
                                              "WHERE o.order_id = 100001"}))
    assert joined["data_as_of"]["datasets"] == {"public.guides": after["oldest"]}


# ---- over stdio ----

def test_stdio_subprocess(demo_config):
    parameters = StdioServerParameters(command=sys.executable, args=["-m", "flight.cli", "mcp", "-c",
                                                                     str(demo_config)], cwd=str(REPO))

    async def calls(client):
        tools = await client.list_tools()
        answer = await client.call_tool("sql", {"query": "SELECT count(*) AS n FROM orders WHERE status = $1",
                                                "parameters": ["failed"]})
        refused = await client.call_tool("sql", {"query": "INSERT INTO orders VALUES (1)"})
        found = await client.call_tool("search", {"text": INCIDENT, "limit": 1})
        return tools, answer, refused, found
    tools, answer, refused, found = session(parameters, calls)
    assert {t.name for t in tools.tools} == TOOLS
    assert ok(answer)["rows"] == [{"n": 576}]
    assert "refused" in error_text(refused)
    assert ok(found)["matches"][0]["row"]["path"] == POOLER


def test_stdio_refuses_to_start_without_a_key_when_auth_is_on(demo_config):
    config = yaml.safe_load(demo_config.read_text())
    config["runtime"] = {"auth": {"api_keys": [API_KEY]}}
    path = write_config(demo_config.parent / "auth.yaml", config)
    done = subprocess.run([sys.executable, "-m", "flight.cli", "mcp", "-c", str(path)], cwd=REPO, input="",
                          capture_output=True, text=True, timeout=120, env=_without_key())
    assert done.returncode != 0 and "authentication required" in done.stderr
    keyed = StdioServerParameters(command=sys.executable, args=["-m", "flight.cli", "mcp", "-c", str(path)],
                                  cwd=str(REPO), env={**_without_key(), "FLIGHTDECK_API_KEY": API_KEY})
    answer = call(keyed, "sql", {"query": "SELECT count(*) AS n FROM crm.customers"})
    assert ok(answer)["rows"] == [{"n": 2000}]


def _without_key() -> dict:
    return {k: v for k, v in os.environ.items() if k != "FLIGHTDECK_API_KEY"}


# ---- over streamable HTTP ----

@contextmanager
def uvicorn_serving(app) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def test_streamable_http(deck, runtime):
    app = http_app(http_server(deck.service, _with_caps(runtime, max_rows=3)), runtime)
    with uvicorn_serving(app) as base:
        async def calls(client):
            tools = await client.list_tools()
            answer = await client.call_tool("sql", {"query": "SELECT order_id FROM orders ORDER BY order_id"})
            bad = await client.call_tool("sql", {"query": "SELECT nope FROM orders"})
            found = await client.call_tool("search", {"text": INCIDENT, "limit": 1})
            return tools, answer, bad, found
        tools, answer, bad, found = session(f"{base}/mcp", calls)
        foreign = httpx2.post(f"{base}/mcp", headers={"Host": "evil.example:80"}, json={})
    assert {t.name for t in tools.tools} == TOOLS
    result = ok(answer)
    assert result["rows"] == [{"order_id": 100001}, {"order_id": 100002}, {"order_id": 100003}]
    assert result["truncated"] is True and "more than 3 rows" in result["notice"]
    assert "invalid request" in error_text(bad) and "nope" in error_text(bad)
    assert ok(found)["matches"][0]["row"]["path"] == POOLER
    assert foreign.status_code == 421  # DNS rebinding protection on a loopback server


def test_served_at_v1_mcp_on_the_http_port_with_the_same_api_keys(demo_config):
    config = yaml.safe_load(demo_config.read_text())
    # A second stack beside the module's: without the DuckDB file, which one process opens once.
    config["datasets"] = [d for d in config["datasets"] if d["name"] == "crm.customers"]
    config["runtime"] = {"auth": {"api_keys": [API_KEY, {"name": "other-agent", "key": OTHER_KEY}]}}
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    accept = {"Accept": "application/json, text/event-stream"}
    with serving(config, demo_config.parent) as running:
        endpoint = f"{running.http_url}/v1/mcp"
        anonymous = httpx2.post(endpoint, json=listing, headers=accept)
        wrong = httpx2.post(endpoint, json=listing, headers={"Authorization": "Bearer nope", **accept})
        wrong_header = httpx2.post(endpoint, json=listing, headers={"X-API-Key": "nope", **accept})
        unknown_route = httpx2.get(f"{running.http_url}/v1/mcp-nope", headers={"Authorization": f"Bearer {API_KEY}"})

        async def with_key(headers: dict):
            async with httpx2.AsyncClient(headers=headers) as http:
                async with Client(streamable_http_client(endpoint, http_client=http)) as client:
                    return await client.call_tool("sql", {"query": "SELECT count(*) AS n FROM crm.customers"})
        answers = [anyio.run(with_key, headers) for headers in ({"Authorization": f"Bearer {API_KEY}"},
                                                                 {"X-API-Key": API_KEY})]
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "loop", "version": "1"}}}
        opened = [httpx2.post(endpoint, json=initialize, headers={"Authorization": f"Bearer {API_KEY}", **accept})
                  for _ in range(SESSIONS_PER_CALLER + 1)]
        other_key = httpx2.post(endpoint, json=initialize, headers={"Authorization": f"Bearer {OTHER_KEY}", **accept})
    assert anonymous.status_code == wrong.status_code == wrong_header.status_code == 401
    assert unknown_route.status_code == 404 and unknown_route.json()["error"]["code"] == "not_found"
    # A key opening sessions in a loop is held to its own share: every other key can still open one.
    assert [r.status_code for r in opened] == [200] * SESSIONS_PER_CALLER + [503]
    assert other_key.status_code == 200
    for answer in answers:
        assert ok(answer)["rows"] == [{"n": 2000}]
