"""One contract, every connector (the ibis pattern): the same tests run against each connector
kind, over one common table (ints, floats, text, booleans, dates, timestamps, NULLs in each)
loaded into each backend in its own native form. Results are compared with DuckDB over the
same rows. Known gaps are data (``KNOWN``): such a cell is an xfail(strict=True), so a gap that
closes fails the run until it is taken off the list; the matrix is printed at the end of the run
(tests/contract_matrix.py) and kept in the README.

Adding a connector kind is one function decorated with ``@backend("kind")`` that loads ``ROWS``
and yields a ``Backend``.
"""
from __future__ import annotations

import datetime as dt
import json
import sqlite3
import urllib.parse
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import adbc_driver_postgresql.dbapi as adbc_postgres
import duckdb
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pymongo
import pymysql
import pytest
from pyiceberg.catalog import load_catalog

from federation import expr as fx
from federation.catalog import Catalog, DatasetSpec
from federation.connectors import Connector, ConnectorError
from federation.engine import QueryEngine

from conftest import POSTGRES_URI, require_postgres, serving
from json_api import JsonHandler, serving_api
from buses import JetStream, KafkaBroker
from peers import fakesnow_admin, fakesnow_params, missing_peer, start_fakesnow, start_mongo_peer, start_search_peer

# ---- the common table ----

SCHEMA = pa.schema([("id", pa.int64()), ("n", pa.int64()), ("score", pa.float64()), ("name", pa.string()),
                    ("flag", pa.bool_()), ("day", pa.date32()), ("seen_at", pa.timestamp("us"))])
T0 = dt.datetime(2026, 1, 1, 10, 0)
ROWS = [
    {"id": 1, "n": 5, "score": 1.5, "name": "alpha", "flag": True},
    {"id": 2, "n": 3, "score": 2.5, "name": "beta", "flag": False},
    {"id": 3, "n": None, "score": 0.25, "name": "gamma", "flag": None},
    {"id": 4, "n": 8, "score": None, "name": None, "flag": True},
    {"id": 5, "n": 3, "score": 3.75, "name": "gamut", "flag": False},
    {"id": 6, "n": 1, "score": 2.5, "name": "Alpha", "flag": True},
    {"id": 7, "n": None, "score": 10.0, "name": "delta", "flag": None},
    {"id": 8, "n": 10, "score": None, "name": "beta", "flag": False},
]
for number, row in enumerate(ROWS):
    row["day"] = None if row["id"] == 7 else dt.date(2026, 1, 1) + dt.timedelta(days=number)
    row["seen_at"] = None if row["id"] == 5 else T0 + dt.timedelta(hours=3 * number)
TABLE = pa.Table.from_pylist(ROWS, schema=SCHEMA)
COLUMNS = ", ".join(SCHEMA.names)
FAMILIES = {"id": pa.types.is_integer, "n": pa.types.is_integer, "score": pa.types.is_floating,
            "name": pa.types.is_string, "flag": pa.types.is_boolean, "day": pa.types.is_date,
            "seen_at": pa.types.is_timestamp}
FILTERS = {  # capability -> WHERE clause; each over columns holding NULLs
    "=": "name = 'beta'",
    "<>": "n <> 3",
    "<": "score < 2.5",
    "<=": "day <= DATE '2026-01-04'",
    ">": "seen_at > TIMESTAMP '2026-01-01 15:00:00'",
    ">=": "n >= 3",
    "IN": "name IN ('alpha', 'gamma', 'Alpha')",
    "IS NULL": "score IS NULL",
    "IS NOT NULL": "name IS NOT NULL",
    "LIKE prefix": "name LIKE 'ga%'",
    "bool": "flag",
    "AND/OR": "(n < 4 OR score > 3) AND NOT flag",
}
CAPABILITIES = ["discovery", "types", "values", "projection", *FILTERS, "limit", "errors", "read-only",
                "unreachable"]

# ---- known gaps, as data: (kind, capability) -> "gap: why" (xfail strict) or "n/a: why" ----

KNOWN: dict[tuple[str, str], str] = {
    ("csv", "read-only"): "n/a: files are opened for reading only; there is no server to refuse a write",
    ("parquet", "read-only"): "n/a: files are opened for reading only; there is no server to refuse a write",
    ("json", "read-only"): "n/a: files are opened for reading only; there is no server to refuse a write",
    ("json", "types"): "gap: JSON has no date type: `day` is read as a timestamp",
    ("mongodb", "types"): "gap: BSON has no date type: `day` is stored and read as a timestamp",
    ("mongodb", "read-only"): "gap: nx-27017 has no users or roles, so the server takes a write; the "
                              "connector itself sends only find/listCollections (test_mongodb_source)",
    ("elasticsearch", "types"): "gap: an index has no date-only type: `day` is a timestamp",
    ("elasticsearch", "read-only"): "n/a: REST; only GET and search requests are sent "
                                    "(test_elasticsearch_source checks every request)",
    ("http", "read-only"): "n/a: only GET requests are sent",
    ("kafka", "read-only"): "n/a: partitions are read at explicit offsets; nothing is committed or deleted "
                            "(test_buses checks the broker)",
    ("nats", "read-only"): "n/a: an ephemeral consumer that acknowledges nothing; streams whose retention "
                           "deletes on acknowledgement are refused (test_buses)",
    ("http", "unreachable"): "n/a: checked in test_http_source (unreachable API)",
    ("snowflake", "values"): "gap: fakesnow returns a NULL timestamp as 1970-01-01 (the peer, not the connector)",
    ("snowflake", ">"): "gap: fakesnow returns a NULL timestamp as 1970-01-01 (the peer, not the connector)",
}
NOT_IN_SUITE = {  # kinds whose tables cannot hold the common table
    "mqtt": "an MQTT broker keeps no messages to scan: a copy holds what arrives after it subscribes "
            "(tests/test_buses.py)",
    "git": "fixed schemas (files, commits) over a repository: tests/test_git_source.py",
    "github": "fixed schemas per resource over the GitHub API: tests/test_github_source.py",
}


@dataclass
class Backend:
    """One connector kind holding the common table, and how to break it."""
    kind: str
    base_dir: Path
    source: str                       # the dataset's `from:`
    params: dict[str, Any]
    table: str                        # the name ``tables()`` lists it under
    missing: tuple[str, dict[str, Any], str]      # (from, params, a word the error must name)
    unreachable: tuple[str, dict[str, Any], str] | None = None
    secret: str | None = None         # a credential in ``missing``/``unreachable`` params
    write: Callable[[Connector], None] | None = None  # tries to write; must raise
    extra: dict[str, Any] = field(default_factory=dict)


BACKENDS: dict[str, Callable[..., Any]] = {}
NEEDS: dict[str, str] = {}  # kind -> the session fixture its function also takes


def backend(kind: str, needs: str | None = None):
    """Register a context-manager function ``(tmp_dir) -> Backend`` for one connector kind;
    with ``needs``, ``(tmp_dir, that fixture's value)`` (a server the whole run shares)."""
    def register(function):
        BACKENDS[kind] = contextmanager(function)
        if needs:
            NEEDS[kind] = needs
        return function
    return register


def _literal(value: Any) -> str:
    return fx.standard_literal(value)


def _inserts(table: str, dialect_bool: Callable[[bool], str] | None = None) -> list[str]:
    statements = []
    for row in ROWS:
        values = [(dialect_bool(v) if dialect_bool and isinstance(v, bool) else _literal(v)) for v in row.values()]
        statements.append(f"INSERT INTO {table} ({COLUMNS}) VALUES ({', '.join(values)})")
    return statements


# ---- one fixture per connector kind ----


@backend("parquet")
def _parquet(tmp: Path) -> Iterator[Backend]:
    pq.write_table(TABLE, tmp / "things.parquet")
    yield Backend("parquet", tmp, "file:things.parquet", {}, "things.parquet",
                  ("file:missing.parquet", {}, "missing.parquet"), ("file:gone/things.parquet", {}, "gone"))


@backend("csv")
def _csv(tmp: Path) -> Iterator[Backend]:
    pcsv.write_csv(TABLE, tmp / "things.csv")
    yield Backend("csv", tmp, "file:things.csv", {}, "things.csv", ("file:missing.csv", {}, "missing.csv"),
                  ("file:gone/things.csv", {}, "gone"))


@backend("json")
def _json(tmp: Path) -> Iterator[Backend]:
    lines = [json.dumps({k: (v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v) for k, v in r.items()})
             for r in ROWS]
    (tmp / "things.json").write_text("\n".join(lines) + "\n")
    yield Backend("json", tmp, "file:things.json", {}, "things.json", ("file:missing.json", {}, "missing.json"),
                  ("file:gone/things.json", {}, "gone"))


@backend("duckdb")
def _duckdb(tmp: Path) -> Iterator[Backend]:
    with duckdb.connect(str(tmp / "things.duckdb")) as connection:
        connection.register("source", TABLE)
        connection.execute("CREATE TABLE things AS SELECT * FROM source")

    def write(connector):
        connector.execute_sql("CREATE TABLE written (a INT)").read_all()

    yield Backend("duckdb", tmp, "duckdb:things", {"duckdb_open": "things.duckdb"}, "things",
                  ("duckdb:nope", {"duckdb_open": "things.duckdb"}, "nope"),
                  ("duckdb:things", {"duckdb_open": "gone.duckdb"}, "gone.duckdb"), write=write)


@backend("sqlite")
def _sqlite(tmp: Path) -> Iterator[Backend]:
    with sqlite3.connect(tmp / "things.sqlite") as connection:
        connection.execute("CREATE TABLE things (id INTEGER PRIMARY KEY, n INTEGER, score REAL, name TEXT, "
                           "flag BOOLEAN, day DATE, seen_at TIMESTAMP)")
        connection.executemany("INSERT INTO things VALUES (?, ?, ?, ?, ?, ?, ?)",
                               [(r["id"], r["n"], r["score"], r["name"], r["flag"],
                                 r["day"] and r["day"].isoformat(), r["seen_at"] and r["seen_at"].isoformat(sep=" "))
                                for r in ROWS])

    def write(connector):
        connector.execute_sql("DELETE FROM things").read_all()

    yield Backend("sqlite", tmp, "sqlite:things", {"sqlite_file": "things.sqlite"}, "things",
                  ("sqlite:nope", {"sqlite_file": "things.sqlite"}, "nope"),
                  ("sqlite:things", {"sqlite_file": "gone.sqlite"}, "gone.sqlite"), write=write)


def _sql_write(connector):
    connector.execute_sql("CREATE TABLE fd_contract.fd_contract_written (a INT)").read_all()


@backend("postgres")
def _postgres(tmp: Path) -> Iterator[Backend]:
    require_postgres()
    with adbc_postgres.connect(POSTGRES_URI, autocommit=True) as admin, admin.cursor() as cursor:
        cursor.execute("DROP SCHEMA IF EXISTS fd_contract CASCADE")
        cursor.execute("CREATE SCHEMA fd_contract")
        cursor.execute("CREATE TABLE fd_contract.things (id bigint PRIMARY KEY, n bigint, score double precision, "
                       "name text, flag boolean, day date, seen_at timestamp)")
        for statement in _inserts("fd_contract.things"):
            cursor.execute(statement)
    params = {"pg_host": "127.0.0.1", "pg_port": 5432, "pg_db": "test", "pg_user": "postgres"}
    try:
        yield Backend("postgres", tmp, "postgres:fd_contract.things", params, "fd_contract.things",
                      ("postgres:fd_contract.nope", {**params, "pg_pass": "pg-contract-secret"}, "nope"),
                      ("postgres:fd_contract.things", {**params, "pg_port": 1, "pg_pass": "pg-contract-secret",
                                                       "connect_timeout": 2}, "127.0.0.1"),
                      secret="pg-contract-secret", write=_sql_write)
    finally:
        with adbc_postgres.connect(POSTGRES_URI, autocommit=True) as admin, admin.cursor() as cursor:
            cursor.execute("DROP SCHEMA IF EXISTS fd_contract CASCADE")


@backend("mysql")
def _mysql(tmp: Path) -> Iterator[Backend]:
    try:
        admin = pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True)
    except pymysql.MySQLError as error:
        missing_peer(f"MariaDB is not reachable ({error}); `make test` starts it")
    with admin.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS fd_contract")
        cursor.execute("CREATE DATABASE fd_contract")
        cursor.execute("CREATE TABLE fd_contract.things (id BIGINT PRIMARY KEY, n BIGINT, score DOUBLE, "
                       "name VARCHAR(20), flag TINYINT(1), day DATE, seen_at DATETIME(6))")
        for statement in _inserts("fd_contract.things"):
            cursor.execute(statement)
    params = {"mysql_host": "127.0.0.1", "mysql_tcp_port": 3306, "mysql_user": "root"}
    try:
        yield Backend("mysql", tmp, "mysql:fd_contract.things", params, "fd_contract.things",
                      ("mysql:fd_contract.nope", {**params, "mysql_pass": ""}, "nope"),
                      ("mysql:fd_contract.things", {**params, "mysql_tcp_port": 1, "mysql_pass": "my-contract-secret",
                                                    "connect_timeout": 2}, "127.0.0.1"),
                      secret="my-contract-secret", write=_sql_write)
    finally:
        with admin.cursor() as cursor:
            cursor.execute("DROP DATABASE IF EXISTS fd_contract")
        admin.close()


@backend("snowflake")
def _snowflake(tmp: Path) -> Iterator[Backend]:
    with start_fakesnow() as port:
        admin = fakesnow_admin(port)
        cursor = admin.cursor()
        cursor.execute("CREATE DATABASE contract")
        cursor.execute("CREATE SCHEMA contract.s")
        cursor.execute("CREATE TABLE contract.s.things (id INT, n INT, score FLOAT, name VARCHAR, flag BOOLEAN, "
                       "day DATE, seen_at TIMESTAMP_NTZ)")
        for statement in _inserts("contract.s.things"):
            cursor.execute(statement)
        admin.close()
        params = fakesnow_params(port, "contract", "sf-secret")
        yield Backend("snowflake", tmp, "snowflake:contract.s.things", params, "contract.s.things",
                      ("snowflake:contract.s.nope", params, "nope"),
                      ("snowflake:contract.s.things", {**params, "snowflake_port": 1, "connect_timeout": 2,
                                                       "query_timeout": 2}, "snowflake"),
                      secret="sf-secret",
                      write=lambda c: c.execute_sql("CREATE TABLE contract.s.written (a INT)").read_all())


@backend("iceberg")
def _iceberg(tmp: Path) -> Iterator[Backend]:
    catalog = load_catalog("lake", **{"type": "sql", "uri": f"sqlite:///{tmp / 'catalog.db'}",
                                      "warehouse": (tmp / "warehouse").as_uri()})
    catalog.create_namespace("ops")
    catalog.create_table("ops.things", schema=TABLE.schema).append(TABLE)
    params = {"catalog_uri": "sqlite:///catalog.db", "warehouse": "warehouse", "catalog_name": "lake"}

    def write(connector):
        connector.catalog().create_namespace("written")

    yield Backend("iceberg", tmp, "iceberg:ops.things", params, "ops.things",
                  ("iceberg:ops.nope", params, "nope"),
                  ("iceberg:ops.things", {**params, "catalog_uri": "http://127.0.0.1:1", "catalog_type": "rest",
                                          "token": "ice-contract-secret"}, "127.0.0.1"),
                  secret="ice-contract-secret", write=write)


@backend("mongodb")
def _mongodb(tmp: Path) -> Iterator[Backend]:
    with start_mongo_peer() as server:
        client = pymongo.MongoClient(server.uri, tz_aware=True)
        documents = []
        for row in ROWS:  # BSON has no date: a day is its midnight; a missing n is no field at all
            document = {k: v for k, v in row.items() if not (k == "n" and v is None)}
            if document["day"] is not None:
                document["day"] = dt.datetime.combine(document["day"], dt.time(), dt.timezone.utc)
            if document["seen_at"] is not None:
                document["seen_at"] = document["seen_at"].replace(tzinfo=dt.timezone.utc)
            documents.append(document)
        client["contract"]["things"].insert_many(documents)
        declared = {"id": "int", "n": "int", "score": "float", "name": "string", "flag": "bool",
                    "day": "timestamp", "seen_at": "timestamp"}
        params = {"mongo_uri": server.uri, "columns": declared}

        def write(connector):
            connector.client()["contract"]["written"].insert_one({"id": 99})

        down = "mongodb://agent:mongo-contract-secret@127.0.0.1:1"
        yield Backend("mongodb", tmp, "mongodb:contract.things", params, "contract.things",
                      ("mongodb:contract", {**params, "mongo_uri": server.uri}, "database.collection"),
                      ("mongodb:contract.things", {"mongo_uri": down, "connect_timeout": 1}, "127.0.0.1:1"),
                      secret="mongo-contract-secret", write=write)
        client.close()


@backend("elasticsearch")
def _elasticsearch(tmp: Path) -> Iterator[Backend]:
    mapping = {"properties": {"id": {"type": "long"}, "n": {"type": "long"}, "score": {"type": "double"},
                              "name": {"type": "keyword"}, "flag": {"type": "boolean"},
                              "day": {"type": "date", "format": "yyyy-MM-dd"}, "seen_at": {"type": "date"}}}
    documents = []
    for row in ROWS:  # a missing n is no field at all, other NULLs are explicit
        document = {k: (v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v) for k, v in row.items()
                    if not (k == "n" and v is None)}
        documents.append({**document, "_id": str(row["id"])})
    with start_search_peer() as peer:
        peer.load("things", mapping, documents)
        params = {"elasticsearch_endpoint": peer.url}
        yield Backend("elasticsearch", tmp, "elasticsearch:things", params, "things",
                      ("elasticsearch:nope", {**params, "elasticsearch_api_key": "es-contract-secret"}, "nope"),
                      ("elasticsearch:things", {"elasticsearch_endpoint": "http://127.0.0.1:1", "connect_timeout": 2,
                                                "elasticsearch_api_key": "es-contract-secret"}, "127.0.0.1:1"),
                      secret="es-contract-secret")


def _messages() -> list[bytes]:
    return [json.dumps({k: (v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v)
                        for k, v in row.items()}).encode() for row in ROWS]


BUS_COLUMNS = {"id": "int", "n": "int", "score": "float", "name": "string", "flag": "bool", "day": "date",
               "seen_at": "timestamp"}


@backend("kafka")
def _kafka(tmp: Path) -> Iterator[Backend]:
    broker = KafkaBroker()
    try:
        broker.create_topic("things")
        broker.publish("things", _messages())
        params = {"bootstrap_servers": broker.servers, "columns": BUS_COLUMNS}
        yield Backend("kafka", tmp, "kafka:things", params, "things", ("kafka:nope", params, "nope"),
                      ("kafka:things", {"bootstrap_servers": "127.0.0.1:1", "connect_timeout": 2,
                                        "columns": BUS_COLUMNS}, "127.0.0.1:1"))
    finally:
        broker.stop()


@backend("nats")
def _nats(tmp: Path) -> Iterator[Backend]:
    streams = JetStream()
    with streams.fresh_stream() as stream:
        streams.publish(f"{stream}.things", _messages())
        params = {"columns": BUS_COLUMNS}
        yield Backend("nats", tmp, f"nats:{stream}", params, stream, ("nats:nope", params, "nope"),
                      (f"nats:{stream}", {"servers": "nats://127.0.0.1:1", "connect_timeout": 2,
                                          "columns": BUS_COLUMNS}, "127.0.0.1:1"))


@backend("spark", needs="spark_cluster")
def _spark(tmp: Path, spark_cluster) -> Iterator[Backend]:
    from pyspark.sql import SparkSession

    cluster, _ = spark_cluster
    pq.write_table(TABLE, tmp / "things.parquet")
    admin = SparkSession.builder.remote(cluster.remote).create()
    try:
        admin.sql("CREATE DATABASE IF NOT EXISTS contract")
        admin.sql(f"CREATE TABLE contract.things USING parquet LOCATION '{tmp / 'things.parquet'}'")
    finally:
        admin.stop()
    params = {"spark_remote": cluster.remote}
    yield Backend("spark", tmp, "spark:contract.things", params, "contract.things",
                  ("spark:contract.nope", params, "nope"),
                  ("spark:contract.things", {"spark_remote": "sc://127.0.0.1:1", "connect_timeout": 3},
                   "127.0.0.1:1"), write=_sql_write)


class _Things(JsonHandler):
    def do_GET(self):
        path = urllib.parse.urlsplit(self.path).path
        if self.headers.get("Authorization") != "Bearer http-contract-secret":
            return self.send_json(401, {"message": "Requires authentication"})
        if path != "/things":
            return self.send_json(404, {"message": "Not Found"})
        self.send_json(200, {"items": [{k: (v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v)
                                        for k, v in r.items()} for r in ROWS]})


@backend("http")
def _http(tmp: Path) -> Iterator[Backend]:
    with serving_api(_Things) as url:
        declared = {"id": "int", "n": "int", "score": "float", "name": "string", "flag": "bool", "day": "date",
                    "seen_at": "timestamp"}
        params = {"json_path": "items", "columns": declared, "auth_header": "Bearer http-contract-secret"}
        yield Backend("http", tmp, f"{url}/things", params, f"{url}/things",
                      (f"{url}/nope", params, "404"), secret="http-contract-secret")


@backend("flightsql")
def _flightsql(tmp: Path) -> Iterator[Backend]:
    pq.write_table(TABLE, tmp / "things.parquet")
    config = {"datasets": [{"from": "file:things.parquet", "name": "things"}],
              "runtime": {"auth": {"api_keys": ["fs-contract-key"]}}}
    with serving(config, tmp) as remote:
        params = {"flightsql_endpoint": remote.flight_url, "flightsql_api_key": "fs-contract-key"}
        yield Backend("flightsql", tmp, "flightsql:public.things", params, "public.things",
                      ("flightsql:public.things", {**params, "flightsql_api_key": "fs-wrong-secret"}, "flightsql"),
                      ("flightsql:public.things", {"flightsql_endpoint": "grpc://127.0.0.1:1",
                                                   "flightsql_api_key": "fs-wrong-secret", "query_timeout": 2},
                       "127.0.0.1:1"), secret="fs-wrong-secret",
                      write=lambda c: c.execute_sql("CREATE TABLE written (a INT)").read_all())


# ---- the fixture every contract test takes ----


@dataclass
class Running:
    backend: Backend
    engine: QueryEngine
    catalog: Catalog

    @property
    def connector(self) -> Connector:
        return self.catalog.datasets["public.things"].connector

    def rows(self, sql: str) -> list[dict]:
        return [normal(row) for row in self.engine.query(sql).read_all().to_pylist()]


@pytest.fixture(scope="module", params=list(BACKENDS))
def running(request, tmp_path_factory) -> Iterator[Running]:
    with ExitStack() as stack:
        shared = [request.getfixturevalue(NEEDS[request.param])] if request.param in NEEDS else []
        found = stack.enter_context(BACKENDS[request.param](tmp_path_factory.mktemp(request.param), *shared))
        catalog = Catalog([DatasetSpec("things", found.source, found.params)], found.base_dir)
        stack.callback(catalog.close)
        yield Running(found, QueryEngine(catalog), catalog)


@pytest.fixture
def cell(request, running) -> Callable[[str], None]:
    """Marks the test as one (connector, capability) cell: known gaps xfail strictly, n/a skips."""
    def mark(capability: str) -> None:
        kind = running.backend.kind
        request.node.user_properties.append(("contract", (kind, capability)))
        known = KNOWN.get((kind, capability))
        if known and known.startswith("n/a"):
            pytest.skip(known)
        if known:
            request.node.add_marker(pytest.mark.xfail(strict=True, reason=known))
        dataset = running.catalog.datasets["public.things"]
        assert dataset.error is None, dataset.error
    return mark


REFERENCE = duckdb.connect()
REFERENCE.register("things", TABLE)


def reference(sql: str) -> list[dict]:
    return [normal(row) for row in REFERENCE.sql(sql).to_arrow_table().to_pylist()]


def normal(row: dict) -> dict:
    """A row as plain comparable values: instants as naive UTC, a day's midnight as the day."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dt.datetime) and value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        if key == "day" and isinstance(value, dt.datetime) and value.time() == dt.time():
            value = value.date()
        out[key] = value
    return out


# ---- the contract ----


def test_discovery(running, cell):
    cell("discovery")
    assert running.backend.table in running.connector.tables()


def test_types(running, cell):
    cell("types")
    schema = running.catalog.datasets["public.things"].arrow_schema
    wrong = {name: str(schema.field(name).type) for name, family in FAMILIES.items()
             if not family(schema.field(name).type)}
    assert not wrong, wrong


def test_values(running, cell):
    cell("values")
    sql = f"SELECT {COLUMNS} FROM things ORDER BY id"
    assert running.rows(sql) == reference(sql)


def test_projection(running, cell):
    cell("projection")
    scanned = running.connector.scan(running.catalog.datasets["public.things"].table, ["name", "id"], [], None)
    assert scanned.schema.names == ["name", "id"]  # the connector itself returned only those
    assert sorted(scanned.read_all().to_pylist(), key=lambda r: r["id"]) == [
        {"name": r["name"], "id": r["id"]} for r in ROWS]
    sql = "SELECT score, id FROM things ORDER BY id"
    assert running.rows(sql) == reference(sql)


@pytest.mark.parametrize("capability", list(FILTERS))
def test_filter(running, cell, capability):
    cell(capability)
    sql = f"SELECT id FROM things WHERE {FILTERS[capability]} ORDER BY id"
    expected = reference(sql)
    assert expected and len(expected) < len(ROWS)  # the filter keeps some rows, not all
    assert running.rows(sql) == expected


def test_limit(running, cell):
    cell("limit")
    assert running.engine.query("SELECT id, name FROM things LIMIT 3").read_all().num_rows == 3
    table = running.catalog.datasets["public.things"].table
    assert running.connector.scan(table, ["id"], [], 2).read_all().num_rows == 2  # honoured by the connector


def _failing(running: Running, source: str, params: dict) -> str:
    catalog = Catalog([DatasetSpec("broken", source, params)], running.backend.base_dir)
    try:
        dataset = catalog.datasets["public.broken"]
        if dataset.error is None:  # discovered fine: the failure comes with the first read
            with pytest.raises(Exception) as raised:
                QueryEngine(catalog).query("SELECT * FROM broken").read_all()
            return str(raised.value)
        return dataset.error
    finally:
        catalog.close()


def test_errors_without_secrets(running, cell):
    cell("errors")
    source, params, named = running.backend.missing
    message = _failing(running, source, params)
    assert named in message, message
    assert "Traceback" not in message
    if running.backend.secret:
        assert running.backend.secret not in message


def test_read_only(running, cell):
    cell("read-only")
    write = running.backend.write
    assert write is not None, "no write attempt defined for this backend"
    with pytest.raises(Exception, match="(?i)read.?only|not authori[sz]ed|permission|denied|not allowed|refused"):
        write(running.connector)


def test_unreachable(running, cell):
    cell("unreachable")
    assert running.backend.unreachable is not None, "no unreachable configuration for this backend"
    source, params, named = running.backend.unreachable
    message = _failing(running, source, params)
    assert named in message, message
    if running.backend.secret:
        assert running.backend.secret not in message


def test_every_connector_kind_is_in_the_suite():
    """A new connector kind must get a fixture here (or say why its tables cannot hold ROWS)."""
    from federation.connectors import AVAILABLE_KINDS
    covered = {"file", "https"} | set(BACKENDS) | set(NOT_IN_SUITE)
    assert set(AVAILABLE_KINDS) <= covered, set(AVAILABLE_KINDS) - covered
    assert all(kind in BACKENDS or kind in NOT_IN_SUITE for kind, _ in KNOWN)
