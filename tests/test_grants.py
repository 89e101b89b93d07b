"""Grants: each key sees only its datasets and columns, through every door, and nothing else of
the others — not in SQL, listings, metadata, search, system tables, handles or error messages."""
from __future__ import annotations

import hashlib
import re
from typing import Any, Iterator

import adbc_driver_flightsql.dbapi as flightsql
import anyio
import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import yaml
from google.protobuf import any_pb2
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import serving
from flightdeck.grants import Grant
from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flight.flightsql.server import pack

SRE, METRICS, HASHED = "sre-key-0123456789", "metrics-key-0123456789", "hashed-key-0123456789"
AUDITOR = "auditor-key-0123456789"  # a plain key: full access, the whole audit log
READER = "reader-key-0123456789"     # reads one dataset, and the whole audit log
KEYS = [
    {"name": "sre-agent", "key": SRE, "datasets": ["orders", "crm.customers", "guides"],
     "columns": {"crm.customers": ["customer_id", "tier", "country"]}},
    {"name": "metrics-agent", "key": METRICS, "datasets": ["logs", "metrics"]},
    {"name": "hashed-agent", "key_sha256": hashlib.sha256(HASHED.encode()).hexdigest(), "datasets": ["metr*"]},
    {"name": "audit-reader", "key": READER, "datasets": ["logs"], "audit": True},
    AUDITOR,
]
SRE_SEES = {"public.orders", "crm.customers", "public.guides"}
METRICS_SEES = {"public.logs", "public.metrics"}
HIDDEN_FROM_METRICS = ["orders", "public.orders", "crm.customers", "guides"]
INCIDENT = "too many database connections after scaling out"


@pytest.fixture(scope="module")
def deck(demo_config, tmp_path_factory) -> Iterator[Any]:
    config = yaml.safe_load(demo_config.read_text())
    audit_log = tmp_path_factory.mktemp("audit") / "queries.jsonl"
    config["runtime"] = {"auth": {"api_keys": KEYS}, "audit": {"log": str(audit_log)}}
    with serving(config, demo_config.parent) as running:
        assert running.accelerator.refresher("guides").loaded.wait(300)
        running.audit_log = audit_log
        yield running


def adbc(deck, key: str):
    return flightsql.connect(deck.flight_url, autocommit=True,
                             db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {key}"})


def query(deck, key: str, sql: str, parameters: list | None = None) -> list[dict]:
    with adbc(deck, key) as conn, conn.cursor() as cursor:
        cursor.execute(sql, parameters)
        return cursor.fetch_arrow_table().to_pylist()


def failure(deck, key: str, sql: str) -> str:
    with adbc(deck, key) as conn, conn.cursor() as cursor:
        with pytest.raises(Exception) as raised:
            cursor.execute(sql)
            cursor.fetch_arrow_table()
    return str(raised.value)


def _as_unknown(message: str, name: str, stand_in: str) -> str:
    return message.replace(stand_in, name)


# ---- Flight SQL ----

def test_sql_sees_only_granted_datasets_and_hidden_ones_fail_like_missing_ones(deck):
    assert query(deck, SRE, "SELECT count(*) AS n FROM orders") == [{"n": 30000}]
    for name in HIDDEN_FROM_METRICS:
        hidden = failure(deck, METRICS, f"SELECT * FROM {name}")
        stand_in = name.replace(name.split(".")[-1], "zz" + name.split(".")[-1][2:])
        missing = failure(deck, METRICS, f"SELECT * FROM {stand_in}")
        assert "not found" in hidden and _as_unknown(missing, name, stand_in) == hidden
    explained = failure(deck, METRICS, "EXPLAIN SELECT * FROM orders")
    assert "not found" in explained and "order_id" not in explained
    joined = failure(deck, METRICS, "SELECT * FROM metrics m JOIN orders o ON true")
    assert "orders" in joined and "not found" in joined


def test_catalog_listings_hold_only_granted_datasets(deck):
    tables = query(deck, METRICS, "SELECT table_schema, table_name FROM information_schema.tables "
                                  "WHERE table_schema NOT IN ('information_schema', 'runtime')")
    assert {f"{t['table_schema']}.{t['table_name']}" for t in tables} == METRICS_SEES
    shown = query(deck, METRICS, "SHOW TABLES")
    assert not {"orders", "customers", "guides"} & {row["table_name"] for row in shown}
    with adbc(deck, METRICS) as conn:
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        with pytest.raises(Exception):
            conn.adbc_get_table_schema("orders", db_schema_filter="public")
    listed = {f"{schema['db_schema_name']}.{table['table_name']}"
              for catalog in objects for schema in catalog["catalog_db_schemas"] for table in schema["db_schema_tables"]}
    assert {name for name in listed if not name.startswith("runtime.")} == METRICS_SEES
    assert "crm" not in {schema["db_schema_name"] for c in objects for schema in c["catalog_db_schemas"]}


def test_system_tables_show_only_granted_datasets_and_no_statements(deck):
    query(deck, SRE, "SELECT count(*) FROM orders WHERE status = 'secret-filter-value'")
    datasets = query(deck, METRICS, "SELECT name FROM flightdeck.runtime.datasets")
    assert {row["name"] for row in datasets} == METRICS_SEES
    sources = query(deck, METRICS, "SELECT datasets, last_request FROM flightdeck.runtime.source_stats")
    assert sources and all(row["last_request"] is None for row in sources)
    assert set(", ".join(row["datasets"] for row in sources).split(", ")) <= METRICS_SEES


def test_column_grants_show_only_the_granted_columns(deck):
    rows = query(deck, SRE, "SELECT * FROM crm.customers ORDER BY customer_id LIMIT 2")
    assert list(rows[0]) == ["customer_id", "tier", "country"]
    for sql in ("SELECT email FROM crm.customers", "SELECT count(*) FROM crm.customers WHERE email = 'x'",
                "SELECT c.customer_id FROM crm.customers c JOIN orders o ON c.name = o.status"):
        message = failure(deck, SRE, sql)
        assert "email" in message or "name" in message
        assert "@example.com" not in message and "John" not in message
    joined = query(deck, SRE, "SELECT c.tier, count(*) AS failed FROM orders o JOIN crm.customers c "
                              "ON c.customer_id = o.customer_id WHERE o.status = $1 GROUP BY c.tier ORDER BY c.tier",
                   ["failed"])
    assert joined and set(joined[0]) == {"tier", "failed"}
    columns = query(deck, SRE, "SELECT column_name FROM information_schema.columns WHERE table_name = 'customers'")
    assert {row["column_name"] for row in columns} == {"customer_id", "tier", "country"}


HIDDEN_CUSTOMER_COLUMNS = ("name", "email", "signup_date")
NAMES_A_HIDDEN_COLUMN = re.compile(r"\b(" + "|".join(HIDDEN_CUSTOMER_COLUMNS) + r")\b", re.IGNORECASE)


def backend_requests(deck, key: str, sql: str) -> dict[str, str]:
    """What EXPLAIN says each backend is sent for ``sql`` under ``key``: {what is sent: the
    statement} (DataFusion's own plan lines left out)."""
    rows = query(deck, key, f"EXPLAIN {sql}")
    return {row["plan_type"]: row["plan"] for row in rows
            if not row["plan_type"].endswith(("logical_plan", "physical_plan"))}


@pytest.mark.parametrize("sql", [
    "SELECT customer_id, tier FROM crm.customers WHERE country = 'DE' ORDER BY customer_id",
    "SELECT tier, count(*) AS n FROM crm.customers GROUP BY tier ORDER BY tier",
    "SELECT count(*) AS n FROM crm.customers",
    "SELECT * FROM crm.customers WHERE customer_id < 5 ORDER BY customer_id",
    "SELECT c.* FROM crm.customers c WHERE c.tier = 'enterprise' ORDER BY c.customer_id LIMIT 3",
    "SELECT customers FROM crm.customers",
])
def test_a_column_grant_sends_statements_naming_visible_columns_only(deck, sql):
    """A dataset with hidden columns may go to its backend whole, but only in a statement
    written from the plan that names visible columns alone: never a star, never a hidden name."""
    try:
        sent = backend_requests(deck, SRE, sql).values()
    except Exception as error:  # a whole row by the table's name is no column of the view
        assert "customers" in str(error) and not NAMES_A_HIDDEN_COLUMN.search(str(error))
        return
    for statement in sent:
        text = statement.split("--")[0].lower()
        assert not NAMES_A_HIDDEN_COLUMN.search(text), statement
        assert "*" not in text.replace("count(*)", ""), statement
    visible = query(deck, SRE, sql)
    everything = query(deck, AUDITOR, sql)
    assert visible == [{k: v for k, v in row.items() if k not in HIDDEN_CUSTOMER_COLUMNS} for row in everything]


def test_a_query_naming_granted_columns_goes_whole_to_its_backend(deck):
    sql = "SELECT tier, count(*) AS n FROM crm.customers WHERE customer_id < 100 GROUP BY tier"
    sent = backend_requests(deck, SRE, sql)
    assert list(sent) == ["flightdeck: whole query sent to sqlite (crm.sqlite)"], sent
    assert sent == backend_requests(deck, AUDITOR, sql)  # as for a key that sees every column


def test_a_query_handle_belongs_to_the_key_that_made_it(deck):
    def client(key: str) -> flight.FlightClient:
        return flight.FlightClient(deck.flight_url)

    command = any_pb2.Any()
    command.Pack(sql_pb.CommandStatementQuery(query="SELECT count(*) AS n FROM orders"), "type.googleapis.com")
    sre_options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {SRE}".encode())])
    metrics_options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {METRICS}".encode())])
    sre = client(SRE)
    info = sre.get_flight_info(flight.FlightDescriptor.for_command(command.SerializeToString()), sre_options)
    with pytest.raises(flight.FlightError) as stolen:
        sre.do_get(info.endpoints[0].ticket, metrics_options).read_all()
    assert "30000" not in str(stolen.value)
    assert sre.do_get(info.endpoints[0].ticket, sre_options).read_all().to_pylist() == [{"n": 30000}]


# ---- raw Flight SQL: metadata commands, tickets, prepared statements and cancels of another key ----

def _as(key: str) -> flight.FlightCallOptions:
    return flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {key}".encode())])


def _command(message) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(pack(message))


def _rows(client: flight.FlightClient, key: str, message) -> list[dict]:
    info = client.get_flight_info(_command(message), _as(key))
    return client.do_get(info.endpoints[0].ticket, _as(key)).read_all().to_pylist()


def _error(call) -> str:
    with pytest.raises(flight.FlightError) as raised:
        result = call()
        if hasattr(result, "read_all"):
            result.read_all()
    return str(raised.value)


def test_raw_flight_metadata_commands_hold_only_the_grant(deck):
    with flight.FlightClient(deck.flight_url) as client:
        tables = _rows(client, METRICS, sql_pb.CommandGetTables(include_schema=True))
        assert {f"{t['db_schema_name']}.{t['table_name']}" for t in tables
                if t["db_schema_name"] != "runtime"} == METRICS_SEES
        assert _rows(client, METRICS, sql_pb.CommandGetTables(table_name_filter_pattern="%ord%")) == []
        schemas = {row["db_schema_name"] for row in _rows(client, METRICS, sql_pb.CommandGetDbSchemas())}
        assert "crm" not in schemas and "public" in schemas
        for hidden, missing in (("orders", "zzders"), ("customers", "zzstomers")):
            keys = [_rows(client, METRICS, sql_pb.CommandGetPrimaryKeys(db_schema=schema, table=table))
                    for schema, table in (("public", hidden), ("crm", hidden), ("public", missing))]
            assert keys == [[], [], []]  # a hidden table has no key, exactly as a missing one
            for command in (sql_pb.CommandGetExportedKeys, sql_pb.CommandGetImportedKeys):
                assert _rows(client, METRICS, command(table=hidden)) == []
        assert _rows(client, SRE, sql_pb.CommandGetPrimaryKeys(table="orders"))[0]["column_name"] == "order_id"
        info = _rows(client, METRICS, sql_pb.CommandGetSqlInfo())
        assert info and not any(name in str(info) for name in ("orders", "customers", "guides"))


def test_another_keys_handles_are_unknown_to_a_key(deck):
    """Prepared statements, query tickets and cancels of one key do nothing for another:
    each fails exactly as an unknown handle does, and the owner's still work."""
    with flight.FlightClient(deck.flight_url) as client:
        [created] = list(client.do_action(flight.Action("CreatePreparedStatement", pack(
            sql_pb.ActionCreatePreparedStatementRequest(query="SELECT count(*) AS n FROM orders WHERE order_id > ?"))),
            _as(SRE)))
        handle = sql_pb.ActionCreatePreparedStatementResult.FromString(
            any_pb2.Any.FromString(created.body.to_pybytes()).value).prepared_statement_handle
        stolen, unknown = (sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=h) for h in (handle, b"x" * 16))
        for command in (stolen, unknown):
            message = _error(lambda c=command: client.get_flight_info(_command(c), _as(METRICS)))
            assert "unknown or closed prepared statement" in message and "orders" not in message
        parameters = pa.table({"p": pa.array([0], pa.int64())})
        writer, reader = client.do_put(_command(stolen), parameters.schema, _as(METRICS))
        message = _error(lambda: (writer.write_table(parameters), writer.done_writing(), reader.read(), writer.close()))
        assert "unknown or closed prepared statement" in message and "orders" not in message
        close = sql_pb.ActionClosePreparedStatementRequest(prepared_statement_handle=handle)
        assert list(client.do_action(flight.Action("ClosePreparedStatement", pack(close)), _as(METRICS))) == []
        writer, reader = client.do_put(_command(stolen), parameters.schema, _as(SRE))  # still the owner's
        writer.write_table(parameters)
        writer.done_writing()
        reader.read()
        writer.close()
        assert _rows(client, SRE, stolen) == [{"n": 30000}]

        info = client.get_flight_info(_command(sql_pb.CommandStatementQuery(query="SELECT count(*) AS n FROM orders")),
                                      _as(SRE))
        [cancel] = list(client.do_action(flight.Action("CancelFlightInfo", sql_pb.CancelFlightInfoRequest(
            info=info.serialize()).SerializeToString()), _as(METRICS)))
        assert sql_pb.CancelFlightInfoResult.FromString(cancel.body.to_pybytes()).status == 3  # NOT_CANCELLABLE
        ticket = info.endpoints[0].ticket
        forged = flight.Ticket(pack(sql_pb.TicketStatementQuery(statement_handle=b"y" * 16)))
        assert _error(lambda: client.do_get(ticket, _as(METRICS))) == _error(lambda: client.do_get(forged, _as(METRICS)))
        assert client.do_get(ticket, _as(SRE)).read_all().to_pylist() == [{"n": 30000}]  # not cancelled


def test_refusals_name_no_ungranted_dataset(deck):
    with flight.FlightClient(deck.flight_url) as client:
        for sql in ("SELECT * FROM orders", "SELECT * FROM crm.customers", "SELECT * FROM guides"):
            hidden = _error(lambda q=sql: list(client.do_action(flight.Action("CreatePreparedStatement", pack(
                sql_pb.ActionCreatePreparedStatementRequest(query=q))), _as(METRICS))))
            table = sql.split()[-1].split(".")[-1]
            stand_in = sql.replace(table, "zz" + table[2:])
            missing = _error(lambda q=stand_in: list(client.do_action(flight.Action("CreatePreparedStatement", pack(
                sql_pb.ActionCreatePreparedStatementRequest(query=q))), _as(METRICS))))
            assert hidden == missing.replace("zz" + table[2:], table)
        refresh = _error(lambda: list(client.do_action(flight.Action("Refresh", b'{"dataset": "guides"}'),
                                                       _as(METRICS))))
        unknown = _error(lambda: list(client.do_action(flight.Action("Refresh", b'{"dataset": "zzides"}'),
                                                       _as(METRICS))))
        assert refresh == unknown.replace("zzides", "guides")


def test_hashed_keys_and_globs(deck):
    assert query(deck, HASHED, "SELECT count(*) > 0 AS some FROM metrics") == [{"some": True}]
    assert "not found" in failure(deck, HASHED, "SELECT * FROM logs")
    with pytest.raises(Exception) as raised:  # the stored hash is not a key
        query(deck, hashlib.sha256(HASHED.encode()).hexdigest(), "SELECT 1")
    assert "nauthenticated" in str(raised.value)


def test_a_glob_does_not_reach_across_the_schema_dot():
    """A bare glob is a glob over public's tables, and a schema's glob over that schema's names:
    fnmatch's ``*`` also matches a dot, which made ``metr*`` grant ``metrics_internal.tokens``."""
    assert Grant.of(["metr*"]).sees("public.metrics")
    assert not Grant.of(["metr*"]).sees("metrics_internal.api_tokens")
    assert not Grant.of(["*s"]).sees("crm.customers")
    assert not Grant.of(["*_public"]).sees("hr.salaries_public")
    assert Grant.of(["crm.*"]).sees("crm.customers")
    assert not Grant.of(["crm.*"]).sees("crm_archive.customers")
    assert not Grant.of(["crm*"]).sees("crm.customers")
    assert Grant.of(["c?m.cust*"]).sees("crm.customers")
    assert not Grant.of(["*.orders"]).sees("public.orders_archive")
    for everything in (["*"], ["*.*"]):
        assert all(Grant.of(everything).sees(name) for name in ("public.orders", "crm.customers", "hr.x"))


# ---- HTTP ----

def http(deck, key: str) -> httpx.Client:
    return httpx.Client(base_url=deck.http_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def test_http_lists_searches_and_answers_only_within_the_grant(deck):
    with http(deck, METRICS) as client:
        assert {d["name"] for d in client.get("/v1/datasets").json()} == METRICS_SEES
        status = client.get("/v1/status").json()
        assert {d["name"] for d in status["datasets"]} == METRICS_SEES
        hidden, missing = client.get("/v1/datasets/orders"), client.get("/v1/datasets/zzders")
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["error"]["message"].replace("orders", "zzders") == missing.json()["error"]["message"]
        assert "crm" not in hidden.text and "guides" not in hidden.text
        assert client.post("/v1/sql", content="SELECT * FROM orders").status_code == 400
        searched = client.post("/v1/search", json={"text": INCIDENT, "datasets": ["guides"]})
        assert searched.status_code == 404 and "guides" not in searched.json()["error"]["message"].split("(")[-1]
        assert client.post("/v1/search", json={"text": INCIDENT}).json()["matches"] == []
        assert client.post("/v1/datasets/guides/acceleration/refresh").status_code in (403, 404)
        scraped = client.get("/metrics")  # its labels name every dataset and source
        assert scraped.status_code == 403 and "guides" not in scraped.text and "orders" not in scraped.text
    with http(deck, AUDITOR) as client:
        assert 'dataset="public.guides"' in client.get("/metrics").text
    with http(deck, SRE) as client:
        found = client.post("/v1/search", json={"text": INCIDENT, "limit": 1, "additional_columns": ["path"]})
        assert found.status_code == 200 and found.json()["matches"][0]["dataset"] == "public.guides"
        schema = client.get("/v1/datasets/crm.customers").json()
        assert [f["name"] for f in schema["schema"]["fields"]] == ["customer_id", "tier", "country"]


# ---- MCP ----

def mcp(deck, key: str, calls) -> Any:
    async def main() -> Any:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"}) as client:
            async with Client(streamable_http_client(f"{deck.http_url}/v1/mcp", http_client=client)) as session:
                return await calls(session)
    return anyio.run(main)


def test_mcp_tools_and_resources_hold_only_the_grant(deck):
    async def calls(session):
        return (await session.call_tool("list_datasets", {}), await session.list_resources(),
                await session.call_tool("sql", {"query": "SELECT * FROM orders"}),
                await session.call_tool("search", {"text": INCIDENT, "datasets": ["guides"]}),
                await session.call_tool("table_schema", {"dataset": "crm.customers"}))
    listed, resources, sql, search, schema = mcp(deck, METRICS, calls)
    assert {d["name"] for d in listed.structured_content["datasets"]} == METRICS_SEES
    assert {str(r.uri).split("/")[3] for r in resources.resources} == METRICS_SEES
    for refused in (sql, search, schema):
        assert refused.is_error and "Traceback" not in refused.content[0].text
        assert "crm.customers" not in refused.content[0].text.split("(")[-1]

    async def sre_calls(session):
        return await session.call_tool("random_sample", {"dataset": "crm.customers", "limit": 3})
    sample = mcp(deck, SRE, sre_calls)
    assert not sample.is_error and set(sample.structured_content["rows"][0]) == {"customer_id", "tier", "country"}


# ---- the audit log ----

def test_the_audit_names_what_each_backend_was_asked_without_the_values(deck):
    query(deck, SRE, "SELECT order_id FROM orders WHERE status = $1 AND customer_id > 7", ["failed"])
    rows = query(deck, SRE, "SELECT statement, backends FROM flightdeck.runtime.queries")
    entry = next(r for r in rows if r["statement"].startswith("SELECT order_id FROM orders WHERE status"))
    assert entry["backends"] and all(b.startswith("flightdeck: ") for b in entry["backends"])
    assert any("orders" in b for b in entry["backends"])
    assert not any("failed" in b for b in entry["backends"])  # the bound value is not written down
    assert entry["backends"] == next(r["backends"] for r in query(deck, AUDITOR, "SELECT statement, backends FROM "
                                     "flightdeck.runtime.queries") if r["statement"] == entry["statement"])


def test_each_key_reads_its_own_audit_rows_and_the_file_holds_every_query(deck):
    query(deck, SRE, "SELECT count(*) AS n FROM orders WHERE status = $1", ["failed"])
    query(deck, METRICS, "SELECT count(*) AS n FROM metrics")
    failure(deck, METRICS, "SELECT * FROM orders")
    own = query(deck, METRICS, "SELECT principal, door, statement, parameters, datasets, rows, outcome, error "
                               "FROM flightdeck.runtime.queries")
    assert own and {row["principal"] for row in own} == {"metrics-agent"}
    counted = next(r for r in own if r["statement"] == "SELECT count(*) AS n FROM metrics")
    assert (counted["datasets"], counted["rows"], counted["outcome"]) == (["public.metrics"], 1, "ok")
    refused = next(r for r in own if r["statement"] == "SELECT * FROM orders")
    assert refused["outcome"] == "invalid" and "not found" in refused["error"] and refused["door"] == "flightsql"
    every = query(deck, AUDITOR, "SELECT principal, statement, parameters FROM flightdeck.runtime.queries")
    assert {"sre-agent", "metrics-agent"} <= {row["principal"] for row in every}
    sre = next(r for r in every if r["principal"] == "sre-agent" and "status = $1" in r["statement"])
    assert sre["parameters"] == "redacted: 1 value"  # values are left out by default
    reader = query(deck, READER, "SELECT principal, statement FROM flightdeck.runtime.queries")
    assert {"sre-agent", "metrics-agent"} <= {row["principal"] for row in reader}  # granted the audit
    assert failure(deck, READER, "SELECT count(*) FROM metrics")  # and still only its datasets
    lines = deck.audit_log.read_text().splitlines()
    assert len(lines) >= 3 and all(SRE not in line and METRICS not in line for line in lines)
    assert any('"principal": "metrics-agent"' in line and '"outcome": "ok"' in line for line in lines)


def test_a_search_call_naming_a_hidden_dataset_carries_no_freshness_of_it(deck):
    """A statement can name a hidden searchable dataset in a search call that plans (as a CTE's
    name): neither the HTTP headers nor the Flight schema metadata of its result name it or tell
    when its copy was taken, so it answers exactly as a name that does not exist."""
    sql = "WITH text_search({}) AS (SELECT 1) SELECT * FROM text_search"
    with http(deck, METRICS) as client:
        replies = [client.post("/v1/sql", content=sql.format(name)) for name in ("guides", "zzides")]
    assert [reply.status_code for reply in replies] == [200, 200]
    assert [{k: v for k, v in reply.headers.items() if "data-as-of" in k} for reply in replies] == [{}, {}]
    with flight.FlightClient(deck.flight_url) as client:
        info = client.get_flight_info(_command(sql_pb.CommandStatementQuery(query=sql.format("guides"))), _as(METRICS))
        streamed = client.do_get(info.endpoints[0].ticket, _as(METRICS)).read_all()
    for metadata in (info.schema.metadata or {}, streamed.schema.metadata or {}):
        assert "guides" not in str(metadata) and not any(b"data_as_of" in key for key in metadata), metadata
    with http(deck, SRE) as client:  # a granted key is told of the copy a search read, only of one that ran
        searched = client.post("/v1/sql", content="SELECT path FROM text_search(guides, 'pool', 1)")
        named = client.post("/v1/sql", content=sql.format("guides"))
    assert "public.guides=" in searched.headers["x-flightdeck-data-as-of-datasets"]
    assert "x-flightdeck-data-as-of-datasets" not in named.headers


def test_a_sources_counters_are_hidden_from_a_key_that_does_not_see_all_it_serves(tmp_path):
    import sqlite3
    with sqlite3.connect(tmp_path / "two.sqlite") as db:
        db.execute("CREATE TABLE shown (id INTEGER)")
        db.execute("CREATE TABLE hidden (id INTEGER, secret TEXT)")
        db.executemany("INSERT INTO hidden VALUES (?, ?)", [(i, f"s{i}") for i in range(5)])
    one, both = "one-table-key-0123456789", "both-tables-key-0123456789"
    config = {"datasets": [{"from": f"sqlite:{table}", "name": table, "params": {"sqlite_file": "two.sqlite"}}
                           for table in ("shown", "hidden")],
              "runtime": {"auth": {"api_keys": [{"name": "one", "key": one, "datasets": ["shown"]},
                                                {"name": "both", "key": both, "datasets": ["shown", "hidden"]}]}}}
    sql = "SELECT datasets, queries, rows, last_request FROM flightdeck.runtime.source_stats"
    with serving(config, tmp_path) as running:
        assert query(running, both, "SELECT count(*) AS n FROM hidden WHERE secret = 's3'") == [{"n": 1}]
        seen_by_one = query(running, one, sql)
        assert seen_by_one == [{"datasets": "public.shown", "queries": None, "rows": None, "last_request": None}]
        seen_by_both = query(running, both, sql)
        assert seen_by_both[0]["queries"] >= 1 and seen_by_both[0]["last_request"] is None
