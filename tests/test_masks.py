"""Column masks: a key that sees a column redacted or hashed sees only that, through every door
(Flight SQL with ADBC, HTTP with httpx, MCP with the SDK's client), and nothing it can ask (a
filter, join, sort, function, search, EXPLAIN or error) tells an existing raw value from a
missing one; a federated source never receives the probed value; another key sees raw values."""
from __future__ import annotations

import fcntl
import json
import hashlib
import hmac
from typing import Any, Iterator

import adbc_driver_flightsql.dbapi as flightsql
import anyio
import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
import sqlite3
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import POSTGRES_URI, postgres, require_postgres, serving
from flightdeck.config import ConfigError, parse_config
from flightdeck.stack import Stack

MASKED, OPEN = "masked-key-0123456789", "open-key-0123456789"
MASKED_REFRESHER, COLUMNS_REFRESHER = "masked-refresher-0123456789", "columns-refresher-0123456789"
MASK_KEY = "mask-key-for-tests-0123456789"
EXISTING, MISSING = "alice@example.com", "alicx@example.com"  # alike but for one letter
EMAILS = [EXISTING, "bob@example.com", "carol@example.org", "dave@example.net"]
PG = {"pg_host": "127.0.0.1", "pg_port": 5432, "pg_db": "test", "pg_user": "postgres"}
SCHEMA = "fd_masks"
MASKS = {"customers": {"email": "hash", "customer_id": "hash", "name": "redact"},
         "orders": {"customer_id": "hash"}, "pg_customers": {"email": "hash"}, "accounts": {"pin": "redact"}}
UNFIT = "SECRET-PIN-9999"  # a text SQLite keeps in an INTEGER column: reading it fails on the value


def keyed(value: Any) -> str:
    return hmac.new(MASK_KEY.encode(), str(value).encode(), hashlib.sha256).hexdigest()


@pytest.fixture(scope="module")
def pg_table() -> Iterator[None]:
    require_postgres()
    with open("/tmp/fd-db.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        postgres(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        postgres(f"CREATE SCHEMA {SCHEMA}")
        postgres(f"CREATE TABLE {SCHEMA}.customers (customer_id int primary key, email text)")
        for i, email in enumerate(EMAILS, start=1):
            postgres(f"INSERT INTO {SCHEMA}.customers VALUES ({i}, '{email}')")
        try:
            yield
        finally:
            postgres(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


@pytest.fixture(scope="module")
def deck(pg_table, tmp_path_factory) -> Iterator[Any]:
    base = tmp_path_factory.mktemp("masks")
    pq.write_table(pa.table({
        "customer_id": pa.array(range(1, len(EMAILS) + 1), pa.int64()), "email": EMAILS,
        "name": ["Alice", "Bob", "Carol", "Dave"],
        "notes": ["prefers email about invoices", "asked about connection pools", "database outage report",
                  "invoice dispute about pools"]}), base / "customers.parquet")
    pq.write_table(pa.table({"order_id": pa.array(range(1, 11), pa.int64()),
                             "customer_id": pa.array([1, 1, 1, 2, 2, 3, 3, 3, 3, 4], pa.int64())}),
                   base / "orders.parquet")
    with sqlite3.connect(base / "bank.sqlite") as bank:
        bank.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, pin INTEGER)")
        bank.executemany("INSERT INTO accounts VALUES (?, ?)", [(1, 1234), (2, UNFIT)])
    config = {
        "datasets": [
            {"from": "sqlite:accounts", "name": "accounts", "params": {"sqlite_file": "bank.sqlite"}},
            {"from": "file:customers.parquet", "name": "customers", "acceleration": {"engine": "arrow"},
             "columns": [{"name": "notes", "full_text_search": {"enabled": True}},
                         {"name": "email", "full_text_search": {"enabled": True}}]},
            {"from": "file:orders.parquet", "name": "orders"},
            {"from": f"postgres:{SCHEMA}.customers", "name": "pg_customers", "params": PG}],
        "runtime": {"auth": {"mask_key": "${env:TEST_MASK_KEY}", "api_keys": [
            {"name": "masked-agent", "key": MASKED, "masks": MASKS}, {"name": "open-agent", "key": OPEN, "refresh": True},
            {"name": "masked-refresher", "key": MASKED_REFRESHER, "masks": MASKS, "refresh": True},
            {"name": "columns-refresher", "key": COLUMNS_REFRESHER, "datasets": ["customers"],
             "columns": {"customers": ["customer_id", "notes"]}, "refresh": True}]}}}
    with serving(config, base, {"TEST_MASK_KEY": MASK_KEY}) as running:
        assert running.accelerator.refresher("public.customers").loaded.wait(60)
        yield running


def adbc(deck, key: str):
    return flightsql.connect(deck.flight_url, autocommit=True,
                             db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {key}"})


def answer(deck, key: str, sql: str) -> Any:
    """Rows, or the error's text: what a client learns from the statement."""
    try:
        with adbc(deck, key) as conn, conn.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetch_arrow_table().to_pylist()
    except Exception as error:  # the error text is an answer too
        return f"error: {error}"


PROBES = [
    "SELECT count(*) AS n FROM {table} WHERE email = '{v}'",
    "SELECT count(*) AS n FROM {table} WHERE email LIKE '{p}%'",
    "SELECT count(*) AS n FROM {table} WHERE email IN ('{v}', 'nobody@x')",
    "SELECT count(*) AS n FROM {table} WHERE regexp_like(email, '^{p}')",
    "SELECT count(*) AS n FROM {table} WHERE starts_with(email, '{p}')",
    "SELECT count(*) AS n FROM {table} WHERE email < '{v}'",
    "SELECT count(*) AS n FROM {table} WHERE length(email) = length('{v}')",
    "SELECT min(email) AS lo, max(email) AS hi FROM {table}",
    "SELECT email = '{v}' AS hit, count(*) AS n FROM {table} GROUP BY 1 ORDER BY 1",
    "SELECT count(*) AS n FROM {table} c JOIN (VALUES ('{v}')) AS probe(e) ON c.email = probe.e",
    "SELECT CASE WHEN email = '{v}' THEN 1/0 ELSE 0 END AS boom FROM {table}",
    "SELECT CAST(email AS INT) AS n FROM {table} WHERE email = '{v}'",
    "SELECT email FROM {table} ORDER BY email = '{v}' DESC, email LIMIT 1",
    "SELECT count(*) AS n FROM text_search(customers, 'pools', 5) WHERE email = '{v}'",
]


def probe(sql: str, table: str, value: str) -> str:
    return sql.format(table=table, v=value, p=value[:5])


@pytest.mark.parametrize("table", ["customers", "pg_customers"])
@pytest.mark.parametrize("sql", PROBES)
def test_no_probe_tells_an_existing_raw_value_from_a_missing_one(deck, table, sql):
    if "text_search" in sql and table != "customers":
        pytest.skip("only customers is searchable")
    existing, missing = (answer(deck, MASKED, probe(sql, table, v)) for v in (EXISTING, MISSING))
    assert existing == missing
    assert EXISTING not in str(existing) and "Traceback" not in str(existing)


def test_the_probes_do_tell_them_apart_for_the_open_key(deck):
    """The same probes answer differently without masks: the comparison above can fail."""
    told = [sql for sql in PROBES[:6] + PROBES[9:10]
            if answer(deck, OPEN, probe(sql, "customers", EXISTING))
            != answer(deck, OPEN, probe(sql, "customers", MISSING))]
    assert len(told) == 7


def test_masked_columns_hold_masked_values_and_keep_their_place(deck):
    rows = answer(deck, MASKED, "SELECT * FROM customers ORDER BY notes")
    assert [sorted(r) for r in rows[:1]] == [["customer_id", "email", "name", "notes"]]
    assert {r["email"] for r in rows} == {keyed(e) for e in EMAILS}
    assert {r["customer_id"] for r in rows} == {keyed(i) for i in range(1, 5)}
    assert {r["name"] for r in rows} == {None}
    assert answer(deck, MASKED, f"SELECT count(*) AS n FROM customers WHERE email = '{keyed(EXISTING)}'") == [{"n": 1}]
    raw = answer(deck, OPEN, "SELECT email, name FROM customers ORDER BY email")
    assert [r["email"] for r in raw] == sorted(EMAILS) and raw[0]["name"] == "Alice"
    with adbc(deck, MASKED) as conn:
        schema = conn.adbc_get_table_schema("customers", db_schema_filter="public")
    assert schema.field("name").type == pa.string() and schema.field("email").type == pa.string()
    assert schema.field("customer_id").type == pa.string()  # hashed: its text


def test_joins_on_hashed_keys_match_as_the_raw_keys_do(deck):
    sql = ("SELECT c.customer_id, count(*) AS n FROM orders o JOIN customers c ON c.customer_id = o.customer_id "
           "GROUP BY c.customer_id")
    masked = {r["customer_id"]: r["n"] for r in answer(deck, MASKED, sql)}
    raw = {r["customer_id"]: r["n"] for r in answer(deck, OPEN, sql)}
    assert masked == {keyed(k): n for k, n in raw.items()} and sum(raw.values()) == 10
    across = answer(deck, MASKED, "SELECT count(*) AS n FROM customers c JOIN pg_customers p ON c.email = p.email")
    assert across == [{"n": 4}]  # the same key hashes both sources alike


def test_search_returns_masked_values_and_never_searches_a_masked_column(deck):
    rows = answer(deck, MASKED, "SELECT email, name, score FROM text_search(customers, 'pools', 5)")
    assert rows and all(r["email"] in {keyed(e) for e in EMAILS} and r["name"] is None for r in rows)
    refused = answer(deck, MASKED, "SELECT * FROM text_search(customers, 'alice', 5, email)")
    assert refused.startswith("error:") and "no searchable column" in refused and EXISTING not in refused
    opened = answer(deck, OPEN, "SELECT email FROM text_search(customers, 'alice', 5, email)")
    assert opened == [{"email": EXISTING}]


@pytest.mark.parametrize("email", ["bob@example.com", "dave@example.net"])  # both notes are about pools
def test_a_search_where_on_a_masked_column_picks_among_masked_values_before_ranking(deck, email):
    sql = "SELECT email, score FROM text_search(customers, 'pools', 1) WHERE email = '{}'"
    found = answer(deck, MASKED, sql.format(keyed(email)))
    assert [row["email"] for row in found] == [keyed(email)]  # the best match among the filtered, not none
    assert answer(deck, MASKED, sql.format(email)) == []  # the raw value matches nothing


def test_explain_and_the_backend_never_carry_the_probed_value(deck):
    """The masked key's scan of PostgreSQL has no condition on email (its values are compared
    here, hashed); the open key's statement does carry it (bound as a parameter)."""
    sql = f"SELECT customer_id FROM pg_customers WHERE email = '{EXISTING}'"
    explained = answer(deck, MASKED, "EXPLAIN " + sql)
    backend = [r["plan"] for r in explained if r["plan_type"].startswith("flightdeck")]
    assert backend and not any(EXISTING in text or "WHERE" in text for text in backend)
    assert answer(deck, MASKED, sql) == []
    assert "WHERE" not in last_request(deck) and "FROM" in last_request(deck)
    assert len(answer(deck, OPEN, sql)) == 1
    assert '"email" = $1' in last_request(deck)


def last_request(deck) -> str:
    """The last statement flightdeck sent to PostgreSQL (its system table, as the operator sees it)."""
    return next(r["last_request"] for r in deck.stack.catalog.source_stats() if r["kind"] == "postgres")


def test_pg_stat_activity_never_shows_a_condition_on_a_masked_column(deck):
    sql = f"SELECT count(*) AS n FROM pg_customers WHERE email = '{EXISTING}' AND customer_id > 0"
    seen = []
    with adbc_postgres_conn() as conn, conn.cursor() as cursor:
        for _ in range(3):
            assert answer(deck, MASKED, sql) == [{"n": 0}]
            cursor.execute("SELECT query FROM pg_stat_activity WHERE query LIKE '%fd_masks%' "
                           "AND pid <> pg_backend_pid()")
            seen += [row[0] for row in cursor.fetchall()]
    assert seen and not any("email" in text.split("WHERE")[-1] for text in seen if "WHERE" in text)


def adbc_postgres_conn():
    import adbc_driver_postgresql.dbapi as adbc_postgres
    return adbc_postgres.connect(POSTGRES_URI, autocommit=True)


def test_http_answers_are_masked_and_probes_identical(deck):
    headers = {"Authorization": f"Bearer {MASKED}"}

    def http(sql: str) -> tuple[int, str]:
        response = httpx.post(f"{deck.http_url}/v1/sql", json={"sql": sql}, headers=headers, timeout=30)
        return response.status_code, response.text
    for sql in PROBES[:4] + PROBES[10:12]:
        assert http(probe(sql, "customers", EXISTING)) == http(probe(sql, "customers", MISSING))
    status, text = http("SELECT email FROM customers")
    assert status == 200 and keyed(EXISTING) in text and EXISTING not in text
    searched = httpx.post(f"{deck.http_url}/v1/search", headers=headers, timeout=30, json={
        "text": "pools", "datasets": ["customers"], "mode": "text", "additional_columns": ["email", "name"]})
    assert searched.status_code == 200 and EXISTING not in searched.text and "example" not in searched.text
    schema = httpx.get(f"{deck.http_url}/v1/datasets/customers", headers=headers, timeout=30).json()
    assert {f["name"] for f in schema["schema"]["fields"]} == {"customer_id", "email", "name", "notes"}
    refresh = httpx.post(f"{deck.http_url}/v1/datasets/customers/acceleration/refresh", headers=headers, timeout=30,
                         json={"refresh_sql": f"SELECT * FROM customers WHERE email = '{EXISTING}'"})
    assert refresh.status_code == 403


def test_a_source_failing_on_a_masked_value_does_not_quote_it(deck):
    """Masks apply to rows once read, so a source failing on a raw value fails before any mask:
    its message, which quotes the value, reaches only keys that see the column."""
    assert UNFIT in answer(deck, OPEN, "SELECT id, pin FROM accounts")
    for sql in ("SELECT id, pin FROM accounts", "SELECT count(*) AS n FROM accounts WHERE pin IS NULL"):
        masked = answer(deck, MASKED, sql)
        assert masked.startswith("error:") and "reading accounts failed" in masked and UNFIT not in masked
    response = httpx.post(f"{deck.http_url}/v1/sql", json={"sql": sql}, timeout=30,
                          headers={"Authorization": f"Bearer {MASKED}"})
    assert response.status_code >= 400 and UNFIT not in response.text
    assert answer(deck, MASKED, "SELECT count(*) AS n FROM orders") == [{"n": 10}]  # and serves on


@pytest.mark.parametrize("key", [MASKED_REFRESHER, COLUMNS_REFRESHER])
def test_a_key_that_sees_columns_masked_or_hidden_may_refresh_but_not_with_sql_of_its_own(deck, key):
    """A working set filtered on a hidden column leaves the rows that tell its values apart."""
    def refresh(body: dict) -> httpx.Response:
        return httpx.post(f"{deck.http_url}/v1/datasets/customers/acceleration/refresh",
                          headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60)
    refused = refresh({"refresh_sql": f"SELECT * FROM customers WHERE email = '{EXISTING}'"})
    assert refused.status_code == 403 and "may not refresh it with SQL of its own" in refused.text
    client = flight.connect(deck.flight_url)
    options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {key}".encode())])
    action = flight.Action("Refresh", json.dumps({"dataset": "customers", "refresh_sql": "SELECT * FROM customers "
                                                  f"WHERE email = '{EXISTING}'"}).encode())
    with pytest.raises(flight.FlightUnauthorizedError, match="may not refresh it with SQL of its own"):
        list(client.do_action(action, options))
    client.close()
    assert refresh({}).status_code == 200
    assert answer(deck, OPEN, "SELECT count(*) AS n FROM customers") == [{"n": len(EMAILS)}]


def test_a_failed_refresh_tells_its_error_only_to_keys_that_see_every_column(deck):
    def refresh(key: str, body: dict) -> httpx.Response:
        return httpx.post(f"{deck.http_url}/v1/datasets/customers/acceleration/refresh",
                          headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60)
    failed = refresh(OPEN, {"refresh_sql": "SELECT * FROM customers WHERE CAST(email AS INT) = 1"})
    assert failed.status_code == 503 and "example.com" in failed.text  # its own SQL, its own answer
    for key in (COLUMNS_REFRESHER, MASKED):
        listed = httpx.get(f"{deck.http_url}/v1/datasets", headers={"Authorization": f"Bearer {key}"})
        assert listed.status_code == 200 and "example.com" not in listed.text and "failed (the message" in listed.text
        rows = answer(deck, key, "SELECT last_error FROM flightdeck.runtime.datasets WHERE name = 'public.customers'")
        assert rows and "example.com" not in str(rows)
    shown = httpx.get(f"{deck.http_url}/v1/datasets", headers={"Authorization": f"Bearer {OPEN}"})
    assert "example.com" in shown.text
    assert refresh(OPEN, {}).status_code == 200  # and the copy is whole again for the other tests


def test_a_copys_size_is_not_shown_to_keys_that_see_columns_masked_or_hidden(deck):
    """The copy's bytes grow with every column's values, the hidden and masked ones too: a value
    appended or changed would show in them."""
    sql = "SELECT bytes FROM flightdeck.runtime.datasets WHERE name = 'public.customers'"
    assert answer(deck, OPEN, sql)[0]["bytes"] > 0
    for key in (MASKED, COLUMNS_REFRESHER):
        assert answer(deck, key, sql) == [{"bytes": None}]
        headers = {"Authorization": f"Bearer {key}"}
        status = httpx.get(f"{deck.http_url}/v1/status", headers=headers, timeout=30).json()
        listed = httpx.get(f"{deck.http_url}/v1/datasets", headers=headers, timeout=30).json()
        for rows in (status["datasets"], listed):
            assert [row.get("bytes") for row in rows if row["name"] == "public.customers"] == [None]


def test_mcp_tools_show_masked_values(deck):
    async def main():
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {MASKED}"}) as client:
            async with Client(streamable_http_client(f"{deck.http_url}/v1/mcp", http_client=client)) as session:
                return [await session.call_tool("sql", {"query": probe(PROBES[0], "customers", v)})
                        for v in (EXISTING, MISSING)] + [
                    await session.call_tool("random_sample", {"dataset": "customers", "limit": 4}),
                    await session.call_tool("search", {"text": "pools", "datasets": ["customers"], "mode": "text"})]
    existing, missing, sample, search = anyio.run(main)
    assert existing.structured_content == missing.structured_content
    rows = sample.structured_content["rows"]
    assert {r["email"] for r in rows} == {keyed(e) for e in EMAILS} and {r["name"] for r in rows} == {None}
    for result in (existing, sample, search):
        assert not result.is_error and "example." not in str(result.structured_content)


def test_a_mask_on_a_missing_column_or_without_a_key_is_refused_at_load(tmp_path):
    pq.write_table(pa.table({"email": ["a@b"]}), tmp_path / "c.parquet")
    config = {"datasets": [{"from": "file:c.parquet", "name": "customers"}],
              "runtime": {"auth": {"mask_key": MASK_KEY, "api_keys": [
                  {"name": "k", "key": MASKED, "masks": {"customers": {"emial": "hash"}}}]}}}
    with pytest.raises(ConfigError, match="column emial of customers"):
        Stack(parse_config(config, tmp_path, {}))
    del config["runtime"]["auth"]["mask_key"]
    config["runtime"]["auth"]["api_keys"][0]["masks"] = {"customers": {"email": "hash"}}
    with pytest.raises(ConfigError, match="mask_key"):
        parse_config(config, tmp_path, {})
