"""The HTTP door through real clients (httpx, curl, the stock openai client) against real servers."""
from __future__ import annotations

import gc
import base64
import datetime as dt
import io
import json
import socket
import subprocess
import sys
import time

import adbc_driver_flightsql.dbapi as flightsql
import duckdb
import httpx
import numpy as np
import openai
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from conftest import ServerProcess, serving, write_config
from flight.http.bodies import MAX_BODY_BYTES, MAX_JSON_VALUES
from flight.http.server import HttpServer
from http_stream import ChunkFile
from test_backend_cancel_and_errors import SLOW, _config as slow_config, _running_statements, slow_table  # noqa: F401
from test_streaming import PeakMemory

ORDERS_BY_STATUS = "SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY status"
EXPECTED_BY_STATUS = [{"status": "completed", "n": 28858}, {"status": "failed", "n": 576},
                      {"status": "pending", "n": 566}]
TYPED = ("SELECT order_id, customer_id, created_at, status, amount, latency_ms, error_code FROM orders "
         "WHERE order_id <= 102000 ORDER BY order_id")
ARROW = "application/vnd.apache.arrow.stream"
HOSTILE = "x'); DROP TABLE orders; -- \\' \" \u2603 %s $1 ?"
KEY = "http-test-key-123"


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


def sql(http: httpx.Client, query: str, accept: str | None = None, parameters: list | None = None,
        **headers) -> httpx.Response:
    if accept:
        headers["Accept"] = accept
    if parameters is None:
        return http.post("/v1/sql", content=query, headers={"Content-Type": "text/plain", **headers})
    return http.post("/v1/sql", json={"sql": query, "parameters": parameters}, headers=headers)


def flight_table(server, query: str, parameters: tuple = ()) -> pa.Table:
    with flightsql.connect(server.url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(query, parameters or None)
        return cursor.fetch_arrow_table()


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in response.text and "File \"" not in response.text
    return body["error"]


# ---- POST /v1/sql: every format ----

def test_json_is_the_default_format(http):
    response = sql(http, ORDERS_BY_STATUS)
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/json")
    assert response.json() == EXPECTED_BY_STATUS


def test_spice_json_carries_schema_and_row_count(http):
    body = sql(http, ORDERS_BY_STATUS, "application/vnd.spiceai.sql.v1+json").json()
    assert body["row_count"] == 3 and body["data"] == EXPECTED_BY_STATUS
    assert [f["name"] for f in body["schema"]["fields"]] == ["status", "n"]


def test_arrow_stream_equals_the_flight_sql_result(http, server):
    response = sql(http, TYPED, ARROW)
    assert response.headers["content-type"] == ARROW
    table = ipc.open_stream(response.content).read_all()
    expected = flight_table(server, TYPED)
    assert table.num_rows == 2000 and table.equals(expected)


@pytest.mark.parametrize("coding", ["zstd", "gzip"])
def test_arrow_stream_is_compressed_when_the_client_allows(http, server, coding):
    with http.stream("POST", "/v1/sql", content=TYPED, headers={"Accept": ARROW, "Accept-Encoding": coding}) as response:
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == coding
    plain = pa.CompressedInputStream(pa.BufferReader(raw), coding).read()
    assert len(raw) < len(plain)
    assert ipc.open_stream(plain).read_all().equals(flight_table(server, TYPED))


def test_csv_reads_back_with_pandas(http):
    response = sql(http, TYPED, "text/csv")
    assert response.headers["content-type"].startswith("text/csv")
    frame = pd.read_csv(io.StringIO(response.text))
    assert len(frame) == 2000 and list(frame.columns)[:2] == ["order_id", "customer_id"]
    assert frame["order_id"].tolist() == list(range(100001, 102001))


def test_ndjson_reads_back_with_polars(http, server):
    response = sql(http, TYPED, "application/x-ndjson")
    frame = pl.read_ndjson(io.BytesIO(response.content))
    expected = pl.from_arrow(flight_table(server, TYPED))
    assert frame.height == 2000 and frame["order_id"].to_list() == expected["order_id"].to_list()
    assert frame["status"].to_list() == expected["status"].to_list()
    assert frame["amount"].to_list() == [float(a) for a in expected["amount"].to_list()]


def test_json_values_are_plain_json(http):
    rows = sql(http, "SELECT CAST('NaN' AS DOUBLE) AS nan, CAST(1.5 AS DECIMAL(5, 2)) AS d, "
                     "TIMESTAMP '2026-11-20 14:02:00' AS ts, [1, 2] AS list, NULL AS nothing").json()
    assert rows == [{"nan": None, "d": 1.5, "ts": "2026-11-20T14:02:00", "list": [1, 2], "nothing": None}]


def test_empty_results_in_every_format(http):
    query = "SELECT order_id FROM orders WHERE order_id < 0"
    assert sql(http, query).json() == []
    assert sql(http, query, "application/vnd.spiceai.sql.v1+json").json()["row_count"] == 0
    assert sql(http, query, "application/x-ndjson").content == b""
    assert sql(http, query, "text/csv").text.strip() == '"order_id"'
    assert ipc.open_stream(sql(http, query, ARROW).content).read_all().num_rows == 0


def test_accept_negotiation(http):
    assert sql(http, "SELECT 1 AS a", "text/csv;q=0.5, application/x-ndjson").text == '{"a":1}\n'
    assert sql(http, "SELECT 1 AS a", "*/*").json() == [{"a": 1}]
    refused = sql(http, "SELECT 1 AS a", "image/png")
    assert refused.status_code == 406 and ARROW in error_of(refused)["message"]
    nested = sql(http, "SELECT [1, 2] AS list", "text/csv")
    assert nested.status_code == 400 and "CSV" in error_of(nested)["message"]


# ---- parameters ----

def test_parameters_are_bound_not_spliced(http, server):
    response = sql(http, "SELECT * FROM crm.customers WHERE customer_id = ?", ARROW, parameters=[42])
    assert ipc.open_stream(response.content).read_all().equals(
        flight_table(server, "SELECT * FROM crm.customers WHERE customer_id = ?", (42,)))
    assert sql(http, "SELECT $1 AS s, $2 AS n, $3 AS b", parameters=[HOSTILE, 2.5, True]).json() == \
        [{"s": HOSTILE, "n": 2.5, "b": True}]
    assert sql(http, "SELECT count(*) AS n FROM orders WHERE status = ?", parameters=[HOSTILE]).json() == [{"n": 0}]
    assert sql(http, "SELECT count(*) AS n FROM orders").json() == [{"n": 30000}]  # nothing was dropped


@pytest.mark.parametrize("body, words", [
    ({"sql": "SELECT ?", "parameters": [{"a": 1}]}, "parameters[0]"),
    ({"sql": "SELECT ?", "parameters": "x"}, "list"),
    ({"sql": "SELECT ?", "parameters": [2 ** 70]}, "64-bit"),
    ({"parameters": []}, "'sql' is required"),
    ({"sql": "  "}, "no SQL"),
])
def test_bad_sql_bodies_are_400(http, body, words):
    response = http.post("/v1/sql", json=body)
    assert response.status_code == 400 and words in error_of(response)["message"]


@pytest.mark.parametrize("raw, words", [
    (b'{"sql": "SELECT \'\\ud800\' AS x"}', "lone surrogate"),  # half a pair: no character at all
    (b'{"sql": "SELECT ?", "parameters": ["\\udfff"]}', "lone surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, "nests too deep"),
])
def test_bodies_no_text_could_hold_are_400_and_leave_the_audit_readable(http, raw, words):
    response = http.post("/v1/sql", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400 and words in error_of(response)["message"]
    assert sql(http, "SELECT count(*) AS n FROM flightdeck.runtime.queries").status_code == 200


def test_a_body_past_the_size_limit_is_413_as_soon_as_known(http):
    declared = http.post("/v1/sql", content=b"x" * (MAX_BODY_BYTES + 1))
    assert declared.status_code == 413 and error_of(declared)["code"] == "limit_exceeded"

    def chunks():  # no Content-Length: refused while it arrives
        for _ in range(MAX_BODY_BYTES // 2**20 + 2):
            yield b"-- " + b"x" * (2**20 - 4) + b"\n"
    streamed = http.post("/v1/sql", content=chunks())
    assert streamed.status_code == 413
    assert sql(http, "SELECT 1 AS one").json() == [{"one": 1}]


@pytest.mark.parametrize("path", ["/v1/sql", "/v1/search", "/v1/embeddings"])
def test_a_body_of_too_many_json_values_is_413_before_it_is_parsed(http, path):
    """Parsing holds the GIL: 15 MB of empty lists held every door of the process for 1.5 s,
    and a restricted key could send one after another (refused bodies take no query's place).
    The values are counted from the raw bytes; the refusal says so."""
    many = b'{"sql": "SELECT 1", "parameters": [' + b",".join([b"[]"] * (5 * 2**20)) + b"]}"
    response = http.post(path, content=many, headers={"content-type": "application/json"})
    assert response.status_code == 413 and error_of(response)["code"] == "limit_exceeded"
    assert f"more than {MAX_JSON_VALUES:,} JSON values" in error_of(response)["message"]
    placeholders = ", ".join(f"(${n})" for n in range(1, 1001))
    answered = sql(http, f"SELECT count(*) AS n FROM (VALUES {placeholders}) AS t(v)", parameters=list(range(1000)))
    assert answered.json() == [{"n": 1000}]


def test_a_refused_giant_statement_is_audited_cut_short(http):
    giant = "SELECT 1 AS one -- " + "x" * 2_000_000
    assert sql(http, giant).status_code == 400
    audited = sql(http, "SELECT statement FROM flightdeck.runtime.queries WHERE outcome = 'limit_exceeded' "
                        "ORDER BY finished_at DESC LIMIT 1").json()
    assert audited and len(audited[0]["statement"]) < 5000
    assert "2,000,019 characters, sha256" in audited[0]["statement"]


def test_an_error_quoting_a_giant_value_is_cut_short_and_the_audit_keeps_no_value(http):
    """A cast error quotes the value it failed on: a 1 MB bound text made a 1 MB answer, and
    the audit kept it whole in memory even where it keeps no parameters."""
    value = "A" * 1_000_000
    response = http.post("/v1/sql", json={"sql": "SELECT CAST($1 AS INT) AS n", "parameters": [value]})
    assert response.status_code == 400 and len(response.text) < 3000
    assert "Cannot cast string 'AAAA" in error_of(response)["message"] and "1,000,0" in error_of(response)["message"]
    [audited] = sql(http, "SELECT parameters, error FROM flightdeck.runtime.queries WHERE statement = "
                          "'SELECT CAST($1 AS INT) AS n' ORDER BY finished_at DESC LIMIT 1").json()
    assert audited["parameters"] == "redacted: 1 value"
    assert len(audited["error"]) < 3000 and "A" * 32 not in audited["error"] and "'***" in audited["error"]


def test_parameters_are_counted_before_they_are_read(http):
    """A list of a million parameters (3 MB of JSON) for a statement that took none was read,
    answered 200, and each value kept in the plan cache's key: hundreds of MB per statement."""
    response = http.post("/v1/sql", json={"sql": "SELECT 1 AS one", "parameters": [0] * 5})
    assert response.status_code == 400
    assert "takes 0 parameter(s), 5 were bound" in error_of(response)["message"]
    response = http.post("/v1/sql", json={"sql": "SELECT $1 AS one", "parameters": [0] * 70_000})
    assert response.status_code == 429 or response.status_code == 400
    assert "70,000 parameters; a statement takes at most 65,535" in error_of(response)["message"]
    assert http.post("/v1/sql", json={"sql": "SELECT $1 AS one", "parameters": [7]}).json() == [{"one": 7}]


def test_the_audit_keeps_a_bounded_list_of_backend_statements(http):
    """A statement reading a table a hundred times sends a hundred statements: the audit kept
    every one, about 1 MB per entry for a 4 KB statement, ten thousand entries over."""
    branches = " UNION ALL ".join(f"SELECT order_id FROM orders WHERE order_id = {i}" for i in range(100))
    assert sql(http, f"SELECT count(*) AS n FROM ({branches}) AS u").status_code == 200
    [audited] = sql(http, "SELECT backends FROM flightdeck.runtime.queries WHERE statement LIKE "
                          "'SELECT count(*) AS n FROM (SELECT order_id FROM orders WHERE order_id = 0 UNION ALL%' "
                          "ORDER BY finished_at DESC LIMIT 1").json()
    assert len(audited["backends"]) == 33 and audited["backends"][-1] == "... and 68 more"


# ---- errors and statuses ----

@pytest.mark.parametrize("query, status, kind", [
    ("SELECT nope FROM orders", 400, "invalid"),
    ("SELECT FROM WHERE", 400, "invalid"),
    ("SELECT * FROM no_such_table", 400, "invalid"),
    ("SELECT * FROM orders WHERE order_id = 'abc'", 400, "invalid"),  # text for a number: the optimizer refuses
    ("SELECT count(*) AS n FROM orders WHERE order_id = 'abc' LIMIT 5", 400, "invalid"),
    ("DROP TABLE orders", 403, "refused"),
    ("INSERT INTO orders (order_id) VALUES (1)", 403, "refused"),
])
def test_sql_errors_map_to_statuses(http, query, status, kind):
    response = sql(http, query)
    assert response.status_code == status and error_of(response)["code"] == kind


@pytest.mark.parametrize("query", ["SELECT * FROM orders WHERE order_id = $1",
                                   "SELECT * FROM orders WHERE order_id = $1 LIMIT 5"])
def test_a_bound_value_of_the_wrong_type_is_the_clients_error(http, query):
    response = http.post("/v1/sql", json={"sql": query, "parameters": ["abc"]})
    assert response.status_code == 400 and error_of(response)["code"] == "invalid"
    assert "Cannot cast string 'abc'" in error_of(response)["message"]
    assert http.post("/v1/sql", json={"sql": query, "parameters": [100001]}).status_code == 200


def test_unavailable_source_is_503(tmp_path):
    config = {"datasets": [{"from": "sqlite:t", "name": "gone", "params": {"sqlite_file": "missing.sqlite"}}]}
    with serving(config, tmp_path) as runtime, httpx.Client(base_url=runtime.http_url) as client:
        response = client.post("/v1/sql", content="SELECT * FROM gone")
        assert response.status_code == 503 and error_of(response)["code"] == "unavailable"
        assert client.get("/v1/datasets/gone").status_code == 503


def test_unknown_routes_and_methods(http):
    assert http.get("/v1/nope").status_code == 404 and error_of(http.get("/v1/nope"))["code"] == "not_found"
    assert http.get("/v1/sql").status_code == 405


def test_a_path_with_a_trailing_slash_is_not_redirected_to_the_host_the_client_names(http):
    # Starlette's default answer is a redirect to the same path on the Host header's server.
    answer = http.get("/v1/datasets/", headers={"Host": "attacker.example"}, follow_redirects=False)
    assert answer.status_code == 404 and "location" not in answer.headers, answer.headers
    assert error_of(answer)["code"] == "not_found"


# ---- the other routes ----

def test_datasets_and_schema(http, server):
    listing = {d["name"]: d for d in http.get("/v1/datasets").json()}
    assert set(listing) == {"public.orders", "crm.customers", "public.logs", "public.metrics", "public.guides"}
    guides = listing["public.guides"]
    assert guides["state"] == "ready" and guides["searchable_columns"] == ["content"]
    assert guides["acceleration"]["acceleration"] == "duckdb (memory)" and guides["acceleration"]["rows"] == 6
    assert listing["public.orders"]["acceleration"] is None and listing["public.orders"]["kind"] == "duckdb"
    schema = http.get("/v1/datasets/orders").json()
    expected = flight_table(server, "SELECT * FROM orders LIMIT 0").schema
    assert schema["name"] == "public.orders"
    assert [(f["name"], f["data_type"]) for f in schema["schema"]["fields"]] == \
        [(f.name, str(f.type)) for f in expected]
    missing = http.get("/v1/datasets/nope")
    assert missing.status_code == 404 and "nope" in error_of(missing)["message"]


def test_health_ready_status(http):
    assert http.get("/health").json()["status"] == "ok"
    deadline = time.monotonic() + 120  # every copy loading at startup (under load, some are still loading)
    while http.get("/v1/ready").json() != {"ready": True} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert http.get("/v1/ready").json() == {"ready": True}
    status = http.get("/v1/status").json()
    assert status["ready"] is True and {d["name"] for d in status["datasets"]} >= {"public.orders"}
    assert any(source["kind"] == "duckdb" for source in status["sources"])


def test_search_finds_the_pooler_guide(http):
    for mode in ("vector", "text", "hybrid"):
        response = http.post("/v1/search", json={
            "text": "orders failing after scaling to three replicas: too many database connections",
            "limit": 3, "mode": mode, "additional_columns": ["path", "title"]})
        body = response.json()
        assert response.status_code == 200 and len(body["matches"]) == 3 and body["duration_ms"] > 0
        best = body["matches"][0]
        assert best["dataset"] == "public.guides" and "pooler" in best["metadata"]["path"]
        assert best["value"] and best["score"] >= body["matches"][1]["score"]
        assert "X-Flightdeck-Data-As-Of" in response.headers
    filtered = http.post("/v1/search", json={"text": "database connections", "datasets": ["guides"],
                                             "where": "path LIKE 'cache%'", "limit": 5}).json()
    assert {m["dataset"] for m in filtered["matches"]} == {"public.guides"}
    assert all(m["value"] for m in filtered["matches"]) and len(filtered["matches"]) == 1


@pytest.mark.parametrize("body, status", [
    ({"limit": 3}, 400),
    ({"text": "x", "mode": "fuzzy"}, 400),
    ({"text": "x", "limit": 0}, 400),
    ({"text": "x", "datasets": ["nope"]}, 404),
    ({"text": "x", "datasets": ["orders"]}, 400),
    ({"text": "x", "additional_columns": ["nope"]}, 400),
])
def test_search_errors(http, body, status):
    response = http.post("/v1/search", json=body)
    assert response.status_code == status, response.text
    error_of(response)


# ---- freshness ----

def _status_data_as_of(server) -> dt.datetime:
    table = flight_table(server, "SELECT data_as_of FROM flightdeck.runtime.datasets WHERE name = 'public.guides'")
    return table.column(0)[0].as_py()


def test_data_as_of_follows_the_accelerated_copy(http, server):
    response = sql(http, "SELECT count(*) AS n FROM guides")
    before = dt.datetime.fromisoformat(response.headers["X-Flightdeck-Data-As-Of"])
    assert before == _status_data_as_of(server)
    assert response.headers["X-Flightdeck-Data-As-Of-Datasets"] == f"public.guides={before.isoformat()}"
    assert "X-Flightdeck-Data-As-Of" not in sql(http, "SELECT count(*) AS n FROM orders").headers
    refreshed = http.post("/v1/datasets/guides/acceleration/refresh")
    assert refreshed.status_code == 200 and refreshed.json()["last_refresh_rows"] == 6
    response = sql(http, "SELECT g.path, o.n FROM guides g CROSS JOIN (SELECT count(*) AS n FROM orders) o")
    after = dt.datetime.fromisoformat(response.headers["X-Flightdeck-Data-As-Of"])
    assert after > before and after == _status_data_as_of(server)
    assert after == dt.datetime.fromisoformat(refreshed.json()["data_as_of"])


def test_refresh_errors(http):
    assert http.post("/v1/datasets/nope/acceleration/refresh").status_code == 404
    assert http.post("/v1/datasets/orders/acceleration/refresh").status_code == 400
    bad = http.post("/v1/datasets/guides/acceleration/refresh", json={"refresh_sql": "SELECT 1 AS x"})
    assert bad.status_code == 400 and error_of(bad)


# ---- metrics ----

def test_metrics_count_queries_by_door(http, server):
    sql(http, "SELECT 1 AS a")
    sql(http, "DROP TABLE orders")
    flight_table(server, "SELECT 1 AS a")
    text = http.get("/metrics").text
    assert 'flightdeck_queries_total{door="http",outcome="ok"}' in text
    assert 'flightdeck_queries_total{door="http",outcome="refused"}' in text
    assert 'flightdeck_queries_total{door="flightsql",outcome="ok"}' in text
    for name in ("flightdeck_query_duration_seconds_bucket", "flightdeck_result_rows_total",
                 "flightdeck_result_bytes_total", "flightdeck_source_requests_total",
                 "flightdeck_source_rows_total", "flightdeck_source_errors_total", "flightdeck_dataset_ready",
                 "flightdeck_refreshes_total", "flightdeck_refresh_failures_total",
                 "flightdeck_refresh_duration_seconds_bucket"):
        assert name in text, name
    assert "DROP" not in text and "SELECT" not in text


# ---- auth ----

@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secured")
    pacsv.write_csv(pa.table({"id": [1, 2, 3]}), folder / "t.csv")
    config = {"datasets": [{"from": "file:t.csv", "name": "t"}],
              "runtime": {"auth": {"api_keys": [KEY], "users": [{"username": "agent", "password": "pw"}]}}}
    with serving(config, folder) as runtime:
        yield runtime


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"X-API-Key": "wrong"}, 401),
    ({"Authorization": f"Bearer {KEY}"}, 200),
    ({"X-API-Key": KEY}, 200),
    ({"Authorization": "Basic " + base64.b64encode(b"agent:pw").decode()}, 401),  # logins are Flight's
])
def test_auth_on(secured, headers, status):
    with httpx.Client(base_url=secured.http_url) as client:
        response = client.post("/v1/sql", content="SELECT count(*) AS n FROM t", headers=headers)
        assert response.status_code == status
        if status == 401:
            assert error_of(response)["code"] == "unauthenticated" and "WWW-Authenticate" in response.headers
            assert KEY not in response.text
        for path in ("/v1/datasets", "/v1/status", "/metrics", "/v1/models"):
            assert client.get(path, headers=headers).status_code == status
        assert client.get("/health").status_code == 200 and client.get("/v1/ready").status_code == 200


def test_binding_beyond_loopback_needs_auth(tmp_path):
    config = write_config(tmp_path / "flightdeck.yaml", {"datasets": [], "runtime": {
        "flight": {"enabled": False, "port": 0}, "http": {"host": "0.0.0.0", "port": 0}}})
    refused = subprocess.run([sys.executable, "-m", "flight.cli", "run", "-c", str(config)],
                             capture_output=True, text=True)
    assert refused.returncode != 0 and "runtime.http.host binds beyond loopback" in refused.stderr


# ---- curl ----

def test_curl(server):
    base = server.http_url
    out = subprocess.run(["curl", "-sS", "-X", "POST", f"{base}/v1/sql", "-d", ORDERS_BY_STATUS],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == EXPECTED_BY_STATUS
    out = subprocess.run(["curl", "-sS", "-X", "POST", f"{base}/v1/sql", "-H", "Accept: text/csv", "-H",
                          "Content-Type: application/json", "-d",
                          json.dumps({"sql": "SELECT customer_id FROM crm.customers WHERE customer_id = ?",
                                      "parameters": [42]})], capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == ['"customer_id"', "42"]
    arrow = subprocess.run(["curl", "-sS", "--compressed", "-X", "POST", f"{base}/v1/sql", "-H", f"Accept: {ARROW}",
                            "-d", TYPED], capture_output=True, check=True).stdout
    assert ipc.open_stream(arrow).read_all().num_rows == 2000
    code = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", f"{base}/v1/sql",
                           "-d", "DELETE FROM orders"], capture_output=True, text=True).stdout
    assert code == "403"
    out = subprocess.run(["curl", "-sS", f"{base}/v1/models"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["data"][0]["id"] == "minilm"


# ---- OpenAI embeddings with the stock client ----

TEXTS = ["too many database connections", "PgBouncer transaction pooling", "a cache stampede after deploy"]


def _flight_embeddings(server) -> np.ndarray:
    with flightsql.connect(server.url, autocommit=True) as conn, conn.cursor() as cursor:
        vectors = []
        for text in TEXTS:
            cursor.execute("SELECT embed(?) AS v", (text,))
            vectors.append(cursor.fetch_arrow_table().column(0)[0].as_py())
    return np.array(vectors, dtype=np.float64)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_openai_client_embeddings_equal_embed_over_flight_sql(server):
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused-without-auth")
    expected = _flight_embeddings(server)
    default = client.embeddings.create(model="minilm", input=TEXTS)  # base64 on the wire
    assert [d.index for d in default.data] == [0, 1, 2] and default.model == "minilm"
    got = np.array([d.embedding for d in default.data])
    assert got.shape == (3, 384) and (_cosines(got, expected) >= 0.9999).all()
    floats = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    assert (_cosines(np.array([d.embedding for d in floats.data]), expected) >= 0.9999).all()
    assert default.usage.prompt_tokens == default.usage.total_tokens > len(TEXTS)
    single = client.embeddings.create(model="minilm", input=TEXTS[0])
    assert len(single.data) == 1 and _cosines(np.array([single.data[0].embedding]), expected[:1])[0] >= 0.9999
    assert [m.id for m in client.models.list()] == ["minilm"]
    assert client.models.retrieve("minilm").id == "minilm"


def test_openai_client_errors(server, secured):
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused")
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="nope", input=["x"])
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    with pytest.raises(openai.BadRequestError, match="token-id input is not supported"):
        client.embeddings.create(model="minilm", input=[[101, 2000]])
    with pytest.raises(openai.BadRequestError, match="at most 2048"):
        client.embeddings.create(model="minilm", input=["x"] * 2049)
    with pytest.raises(openai.BadRequestError, match="at most 8192"):
        client.embeddings.create(model="minilm", input=["word " * 9000])
    with pytest.raises(openai.BadRequestError, match="300000"):
        client.embeddings.create(model="minilm", input=["word " * 8000] * 40)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="minilm", input=["x"], dimensions=128)
    bad_key = openai.OpenAI(base_url=f"{secured.http_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.embeddings.create(model="minilm", input=["x"])
    good_key = openai.OpenAI(base_url=f"{secured.http_url}/v1", api_key=KEY)
    assert len(good_key.embeddings.create(model="minilm", input=["x"]).data[0].embedding) == 384
    assert 'flightdeck_embedding_tokens_total{model="minilm"}' in httpx.get(f"{server.http_url}/metrics").text


def test_an_embeddings_request_is_counted_and_admitted_before_its_tokens_are(tmp_path):
    """Counting a request's tokens is work (3 s of CPU for 2,048 long inputs): a key over its rate
    gets 429 for it, not the token count it had no right to have made."""
    config = {"datasets": [], "runtime": {"auth": {"api_keys": [
        {"name": "slow", "key": "slow-key-0123456789", "limits": {"requests_per_second": 1}}]}}}
    with serving(config, tmp_path) as runtime, httpx.Client(base_url=runtime.http_url, timeout=60, headers={
            "Authorization": "Bearer slow-key-0123456789"}) as client:
        too_long = {"model": "minilm", "input": ["word " * 9000]}
        statuses = [client.post("/v1/embeddings", json=too_long).status_code for _ in range(3)]
        assert statuses[0] == 400 and 429 in statuses[1:]


def test_embeddings_keep_to_the_keys_result_limit(tmp_path):
    """Vectors cannot be cut like rows: an answer over the key's max_result_bytes is refused."""
    config = {"datasets": [], "runtime": {"auth": {"api_keys": [
        {"name": "small", "key": "small-key-0123456789", "limits": {"max_result_bytes": 20_000}}]}}}
    with serving(config, tmp_path) as runtime, httpx.Client(base_url=runtime.http_url, timeout=60, headers={
            "Authorization": "Bearer small-key-0123456789"}) as client:
        refused = client.post("/v1/embeddings", json={"model": "minilm", "input": ["x"] * 100})
        assert error_of(refused)["code"] == "limit_exceeded" and "max_result_bytes" in error_of(refused)["message"]
        answered = client.post("/v1/embeddings", json={"model": "minilm", "input": ["x"] * 10})
        assert answered.status_code == 200 and len(answered.json()["data"]) == 10


# ---- cancellation and large results ----

@pytest.fixture(scope="module")
def events(tmp_path_factory):
    folder = tmp_path_factory.mktemp("events")
    with duckdb.connect(str(folder / "big.duckdb")) as con:
        con.execute("CREATE TABLE events AS SELECT range AS id, range % 7 AS kind FROM range(3000000)")
    return folder


def test_a_client_disconnect_mid_stream_stops_the_query(events):
    config = {"datasets": [{"from": "duckdb:events", "name": "events", "params": {"duckdb_open": "big.duckdb"}}],
              "runtime": {"limits": {"batch_rows": 4096}}}
    with serving(config, events) as runtime:
        stats = runtime.catalog.datasets["public.events"].connector.stats
        with httpx.Client(base_url=runtime.http_url, timeout=30) as client:
            with client.stream("POST", "/v1/sql", content="SELECT * FROM events", headers={"Accept": "text/csv"}) \
                    as response:
                assert response.status_code == 200
                next(response.iter_bytes())
            # leaving the block closes the connection mid-stream
            time.sleep(1.0)
            rows_after = stats.rows
            time.sleep(1.0)
            assert stats.rows == rows_after < 3_000_000  # the scan stopped
            assert sql(client, "SELECT count(*) AS n FROM events").json() == [{"n": 3_000_000}]
        cancelled = 'flightdeck_queries_total{door="http",outcome="cancelled"} 1.0'
        deadline = time.monotonic() + 5
        while cancelled not in httpx.get(f"{runtime.http_url}/metrics").text and time.monotonic() < deadline:
            # The outcome is recorded when the abandoned stream is freed; its frames form reference
            # cycles, so a loaded machine may not have collected them yet: collect now.
            gc.collect()
            time.sleep(0.1)
        outcomes = [line for line in httpx.get(f"{runtime.http_url}/metrics").text.splitlines()
                    if line.startswith("flightdeck_queries_total{")]
        assert cancelled in outcomes, outcomes


def test_a_disconnect_while_waiting_cancels_the_backend_statement(slow_table, tmp_path):  # noqa: F811
    with serving(slow_config(), tmp_path) as runtime:
        query = SLOW.replace("fd_cancel.big", "big")
        client = subprocess.Popen([sys.executable, "-c", "import httpx, sys; httpx.post(sys.argv[1], "
                                   "content=sys.argv[2], timeout=120)", f"{runtime.http_url}/v1/sql", query])
        deadline = time.monotonic() + 15
        while _running_statements() == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _running_statements() == 1, "the statement never started in PostgreSQL"
        client.kill()
        client.wait()
        gone_at = time.monotonic()
        while _running_statements() and time.monotonic() - gone_at < 5:
            time.sleep(0.05)
        assert _running_statements() == 0 and time.monotonic() - gone_at < 2
        assert httpx.post(f"{runtime.http_url}/v1/sql", content="SELECT count(*) AS n FROM big").json() == [{"n": 3000}]


TEN_MILLION = 10_000_000


@pytest.mark.slow
def test_ten_million_rows_stream_as_arrow_with_bounded_server_memory(tmp_path):
    with duckdb.connect(str(tmp_path / "big.duckdb")) as con:
        con.execute(f"CREATE TABLE big AS SELECT range AS id, random() AS value, "
                    f"['alpha', 'beta', 'gamma', 'delta'][range % 4 + 1] AS label FROM range({TEN_MILLION})")
    config = write_config(tmp_path / "flightdeck.yaml", {"datasets": [
        {"from": "duckdb:big", "name": "big", "params": {"duckdb_open": "big.duckdb"}}]})
    server = ServerProcess(["run", "-c", str(config), "--flight-port", "0"])
    try:
        with httpx.Client(base_url=server.http_url, timeout=300) as client:
            sql(client, "SELECT 1 AS warm")
            with PeakMemory(server.process.pid) as memory:
                with client.stream("POST", "/v1/sql", content="SELECT id, value, label FROM big",
                                   headers={"Accept": ARROW}) as response:
                    reader = ipc.open_stream(io.BufferedReader(ChunkFile(response.iter_bytes()), 1 << 20))
                    rows = result_bytes = 0
                    for batch in reader:
                        rows += batch.num_rows
                        result_bytes += batch.nbytes
        growth = memory.peak - memory.baseline
        print(f"\nHTTP Arrow result {result_bytes / 2**20:.0f} MiB; server RSS baseline "
              f"{memory.baseline / 2**20:.0f} MiB, peak {memory.peak / 2**20:.0f} MiB (growth {growth / 2**20:.0f} MiB)")
        assert rows == TEN_MILLION
        # What the result costs the server is its growth over the idle process (whose libraries
        # alone take ~350 MiB): under the result's size, so never the result held whole.
        assert growth < result_bytes  # batches are produced as the client reads them
    finally:
        code, err = server.stop()
        assert code == 0 and "flightdeck stopped" in err


# ---- one process, two doors, one shutdown ----

def test_responses_leave_at_once_on_a_kept_alive_connection():
    """Accepted connections have Nagle off: with it on, each response after a connection's first
    waits for the client's delayed ACK (about 40 ms on Linux) before its body leaves."""
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok"))])
    server = HttpServer(app, "127.0.0.1", 0)
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/").text == client.get("/").text == "ok"
            accepted = [c.transport.get_extra_info("socket") for c in server._server.server_state.connections]
            assert accepted and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)
    finally:
        server.shutdown()


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
def test_run_serves_both_doors_and_stops_cleanly(demo_config, signal_name):
    import signal as signals
    process = ServerProcess(["run", "-c", str(demo_config), "--flight-port", "0"])
    assert process.url.startswith("grpc://") and process.http_url.startswith("http://127.0.0.1:")
    assert httpx.get(f"{process.http_url}/health").status_code == 200
    process.process.send_signal(getattr(signals, signal_name))
    _, err = process.process.communicate(timeout=30)
    assert process.process.returncode == 0 and "flightdeck stopped" in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{process.http_url}/health")


def test_connections_that_never_finish_a_request_are_closed(tmp_path, monkeypatch):
    """Silent connections, a head sent a byte at a time, a body that never ends: each would hold
    a file descriptor for good, and enough of them leave none for any door."""
    import flight.http.server as http_server
    monkeypatch.setattr(http_server, "HEAD_SECONDS", 2)
    monkeypatch.setattr(http_server, "BODY_SECONDS", 4)
    config = {"datasets": [{"from": "sqlite:t", "name": "gone", "params": {"sqlite_file": "missing.sqlite"}}]}
    with serving(config, tmp_path) as runtime:
        host, port = runtime.http_url.split("//")[1].rsplit(":", 1)
        silent = [socket.create_connection((host, int(port))) for _ in range(20)]
        head = socket.create_connection((host, int(port)))
        head.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: x\r\n")
        body = socket.create_connection((host, int(port)))
        body.sendall(b"POST /v1/sql HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nSELECT")
        time.sleep(4)
        assert not any(_open(s) for s in silent + [head]) and _open(body)
        assert httpx.get(f"{runtime.http_url}/health").status_code == 200
        time.sleep(2.5)
        assert not _open(body)


def _open(connection: socket.socket) -> bool:
    """Whether the server still holds the connection (closed: recv answers at once, empty)."""
    connection.settimeout(0.05)
    try:
        return connection.recv(1) != b""
    except socket.timeout:
        return True
    except OSError:
        return False
