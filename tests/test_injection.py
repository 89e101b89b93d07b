"""SQL injection acceptance tests, written as an attacker would.

Every backend kind holds the same table ``t(id, name)`` filled with hostile strings (a
deterministic corpus: quotes, backslashes, dollar quotes, comment markers, control characters,
Unicode), a second table ``t2(id, k)`` on the same backend, and a Parquet file ``other`` (another
backend) to join with, so a join group of ``t`` and ``t2`` goes down as a sub-plan.

1. Property tests (hypothesis): ``SELECT ? AS s ...`` returns exactly the value and
   ``SELECT id ... WHERE name = ?`` exactly the rows holding it, through whole-query, sub-plan
   and scan pushdown, with the value bound and inlined as a DataFusion literal. Each example
   also asserts which path ran (never vacuous) and that the statement text a backend receives
   does not depend on the value.
2. A break-out suite: strings made to end a literal in each dialect, against the same query in
   DataFusion with pushdown off; the backend tables are unchanged and no table appears.
   Statements handed straight to the validator are refused.
3. The accelerated copies' query connections refuse writes handed to them directly.
4. Identifiers with quotes, backticks, backslashes, ``%`` and Unicode.
5. Values that must never be read as SQL: a float NaN or infinity (the unparser writes a bare
   word, a column name to the backend) and table function arguments, which are written into
   DataFusion's own SQL.

Examples per path: FD_INJECTION_EXAMPLES, else 1000 when CI=true and 150 locally, drawn over
every backend but Snowflake; the Snowflake peer (fakesnow, ~0.3 s a statement) has its own
budget, FD_INJECTION_SNOW_EXAMPLES (20 in CI, 10 locally).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import adbc_driver_postgresql.dbapi as adbc_postgres
import duckdb
import pyarrow as pa
import pyarrow.dataset as pa_dataset
import pyarrow.parquet as pq
import pymysql
import pytest
import sqlglot
from datafusion import SessionContext, Table, udtf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accel.duckdb_store import DuckDBEngine, DuckDBStore
from accel.sqlite_store import SQLiteEngine, SQLiteStore
from accel.store import Stamp
from federation.backend_statement import StatementRefused, bound_statement, check_shape, faithful_text
from federation.catalog import Catalog, DatasetSpec
from federation.subplan import SQL_DIALECT
from federation.connectors.base import ConnectorError
from federation.engine import EngineSettings, QueryEngine, QueryError

from conftest import ServerProcess, duckdb_fingerprint, serving, sqlite_fingerprint, write_config
from conftest import digest as _digest
from conftest import mariadb as _my
from conftest import service_missing as _service_missing
from peers import fakesnow_admin, fakesnow_params, start_fakesnow

CI = os.environ.get("CI") == "true"
EXAMPLES = int(os.environ.get("FD_INJECTION_EXAMPLES") or (1000 if CI else 150))
SNOW_EXAMPLES = int(os.environ.get("FD_INJECTION_SNOW_EXAMPLES") or (20 if CI else 10))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=CI, database=None,
                    suppress_health_check=list(HealthCheck))

PG_URI = "postgresql://postgres@127.0.0.1:5432/test"
PG = {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"}
MY = {"mysql_host": "127.0.0.1", "mysql_user": "root"}
SCHEMA = "fd_inj"  # PostgreSQL schema and MariaDB database of this file
PWNED = "fd_inj_pwned"  # every table an attack tries to create is named like this

# ---- the hostile corpus -----------------------------------------------------------------

PIECES = ["'", "''", "\\", "\\'", "\\\\", "'\\", "$$", "$tag$", "$fd$", "$1", "--", "/*", "*/", "#", ";",
          '"', '""', "`", "%", "%s", "%%", "?", ":1", "@x", "\n", "\r", "\t", "\x0b", "\x0c", "\x1b",
          "\x7f", "\x01", "\x1f", "\u2028", "\u00a0", "\u202e", "\ufeff", "\u200b", "é", "e\u0301", "ß",
          "İ", "ﬀ", "✓", "😀", "中文", "ǅ", " OR 1=1", ") --", " UNION SELECT 1", "' OR '1'='1", "E'",
          "N'", "x", "0", " ", "  ", "__fdbind_1__", "\\N", "\\0", "\\x27", "&#39;", "%27", "Ω", "a"]

CLASSICS = [
    "zz\\' OR 1=1) --",  # the reported one
    "zz' OR 1=1) --", "zz'' OR 1=1) --", "zz\\'' OR 1=1 --", "\\' OR '1'='1", "' OR '1'='1",
    "$$ OR 1=1 --$$", "$tag$ OR 1=1 --$tag$", "\\", "\\\\", "'", "''", "'''", "\\'", "\\\\'", "",
    " ", "a ", "A", "a", "--", "/*", "#", "%", "_", "x%", "%s", "?", "$1", "NULL", "null",
]


def _corpus() -> list[str]:
    chance = random.Random(20261129)
    found = dict.fromkeys(CLASSICS)
    while len(found) < 320:
        found["".join(chance.choice(PIECES) for _ in range(chance.randint(1, 6)))] = None
    return list(found)


CORPUS = _corpus()
ANCHOR = "anchor \\' -- row one"  # the name of id 1


def _rows() -> list[tuple[int, str]]:
    rows, next_id = [(1, ANCHOR)], 2
    for index, value in enumerate(CORPUS):
        for _ in range(1 + index % 3):  # most values on several rows: equality really matches
            rows.append((next_id, value))
            next_id += 1
    return rows


ROWS = _rows()
IDS = [row[0] for row in ROWS]

_characters = st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))
FRESH = st.lists(st.one_of(st.sampled_from(PIECES), st.text(_characters, max_size=3)),
                 max_size=8).map("".join)
VALUES = st.one_of(st.sampled_from(CORPUS), FRESH)


def df_literal(value: str) -> str:
    """A text value as a literal of flightdeck's own SQL (DataFusion): an E-string with the
    backslash and the quote escaped."""
    return "E'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# ---- the backends -----------------------------------------------------------------------

def _pg(sql: str, params=None) -> list:
    with adbc_postgres.connect(PG_URI, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def _load_postgres() -> None:
    _pg(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    _pg(f"CREATE SCHEMA {SCHEMA}")
    _pg(f'CREATE TABLE {SCHEMA}.t (id int PRIMARY KEY, name text COLLATE "C")')  # byte order: may go down
    _pg(f"CREATE TABLE {SCHEMA}.t2 (id int PRIMARY KEY, k int)")
    with adbc_postgres.connect(PG_URI, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.adbc_ingest("t", _table(), mode="append", db_schema_name=SCHEMA)
        cursor.adbc_ingest("t2", _table2(), mode="append", db_schema_name=SCHEMA)


def _load_mariadb() -> None:
    _my(f"DROP DATABASE IF EXISTS {SCHEMA}")
    _my(f"CREATE DATABASE {SCHEMA} CHARACTER SET utf8mb4")
    connection = pymysql.connect(host="127.0.0.1", user="root", autocommit=True, charset="utf8mb4",
                                 database=SCHEMA)
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE t (id INT PRIMARY KEY, name TEXT)")
        cursor.execute("CREATE TABLE t2 (id INT PRIMARY KEY, k INT)")
        cursor.executemany("INSERT INTO t VALUES (%s, %s)", ROWS)
        cursor.executemany("INSERT INTO t2 VALUES (%s, %s)", [(i, i) for i in IDS])
    connection.close()


def _table() -> pa.Table:
    return pa.table({"id": pa.array(IDS, pa.int32()), "name": [r[1] for r in ROWS]})


def _table2() -> pa.Table:
    return pa.table({"id": pa.array(IDS, pa.int32()), "k": pa.array(IDS, pa.int32())})


def _load_files(folder: Path) -> None:
    for path in ("lite.sqlite", "source.sqlite"):
        with sqlite3.connect(folder / path) as con:
            con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
            con.execute("CREATE TABLE t2 (id INTEGER PRIMARY KEY, k INTEGER)")
            con.executemany("INSERT INTO t VALUES (?, ?)", ROWS)
            con.executemany("INSERT INTO t2 VALUES (?, ?)", [(i, i) for i in IDS])
    for path in ("duck.duckdb", "peer.duckdb"):
        with duckdb.connect(str(folder / path)) as con:
            con.register("incoming", _table())
            con.execute("CREATE TABLE t AS SELECT * FROM incoming")
            con.register("incoming2", _table2())
            con.execute("CREATE TABLE t2 AS SELECT * FROM incoming2")
    pq.write_table(pa.table({"id": pa.array(IDS, pa.int32())}), folder / "other.parquet")


@dataclass
class Backend:
    key: str                # dataset prefix: <key>_t, <key>_t2
    engine: QueryEngine     # pushdown on
    local: QueryEngine      # pushdown off: DataFusion over the same scans (the reference)
    text_whole: bool        # a query naming the text column may go down whole
    placeholder: str        # how the driver's placeholder for the bound name looks in scans

    @property
    def t(self) -> str:
        return f"{self.key}_t"

    def dataset(self, table: str = "t"):
        return self.engine.catalog.datasets[f"public.{self.key}_{table}"]

    def stats(self, table: str = "t"):
        return self.dataset(table).connector.stats


@dataclass
class World:
    folder: Path
    backends: dict[str, Backend]
    stored: dict[str, dict[int, str]]  # per backend: id -> name as the backend holds it
    runtime: object                     # the Runtime serving the accelerated copies


def _fakesnow(port: int) -> dict:
    """The injection tables on a fakesnow server; the connector's params for them."""
    admin = fakesnow_admin(port, paramstyle="qmark")
    cursor = admin.cursor()
    cursor.execute("CREATE DATABASE inj")
    cursor.execute("CREATE SCHEMA inj.s")
    cursor.execute("CREATE TABLE inj.s.t (id INT, name VARCHAR)")
    cursor.execute("CREATE TABLE inj.s.t2 (id INT, k INT)")
    # Server-side binding: the connector's client-side escaping (pyformat) meets fakesnow's
    # session-variable substitution, which rewrites "$tag" even inside a string literal.
    cursor.executemany("INSERT INTO inj.s.t (id, name) VALUES (?, ?)", ROWS)
    cursor.executemany("INSERT INTO inj.s.t2 (id, k) VALUES (?, ?)", [(i, i) for i in IDS])
    admin.close()
    return fakesnow_params(port, "inj", "pw")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    folder = tmp_path_factory.mktemp("injection")
    _load_files(folder)
    try:
        _load_postgres()
    except Exception as error:  # noqa: BLE001
        _service_missing("PostgreSQL", error)
    try:
        _load_mariadb()
    except Exception as error:  # noqa: BLE001
        _service_missing("MariaDB", error)
    snow_server = start_fakesnow()
    snow = _fakesnow(snow_server.__enter__())
    peer_config = write_config(folder / "peer.yaml", {"datasets": [
        {"from": "duckdb:t", "name": "t", "params": {"duckdb_open": str(folder / "peer.duckdb")}},
        {"from": "duckdb:t2", "name": "t2", "params": {"duckdb_open": str(folder / "peer.duckdb")}}]})
    peer = ServerProcess(["run", "-c", str(peer_config), "--flight-port", "0"])
    flight = {"flightsql_endpoint": peer.url}
    sources = {
        "pg": ("postgres", f"{SCHEMA}.", PG), "my": ("mysql", f"{SCHEMA}.", MY),
        "lite": ("sqlite", "", {"sqlite_file": "lite.sqlite"}), "duck": ("duckdb", "", {"duckdb_open": "duck.duckdb"}),
        "snow": ("snowflake", "inj.s.", snow), "flight": ("flightsql", "public.", flight)}
    specs = [DatasetSpec("other", "file:other.parquet", {})]
    for key, (kind, prefix, params) in sources.items():
        specs += [DatasetSpec(f"{key}_t", f"{kind}:{prefix}t", params),
                  DatasetSpec(f"{key}_t2", f"{kind}:{prefix}t2", params)]
    catalog = Catalog(specs, folder)
    for spec in specs:
        dataset = catalog.datasets[f"public.{spec.name}"]
        assert dataset.state == "ready", (spec.name, dataset.error)
    source = {"sqlite_file": str(folder / "source.sqlite")}
    accelerated = {"runtime": {"data_dir": str(folder / "data")}, "datasets": [
        {"from": "sqlite:t", "name": "ad_t", "params": source, "acceleration": {"engine": "duckdb", "mode": "file"}},
        {"from": "sqlite:t2", "name": "ad_t2", "params": source, "acceleration": {"engine": "duckdb"}},
        {"from": "sqlite:t", "name": "as_t", "params": source, "acceleration": {"engine": "sqlite", "mode": "file"}},
        {"from": "sqlite:t2", "name": "as_t2", "params": source, "acceleration": {"engine": "sqlite", "mode": "file"}},
        {"from": "file:other.parquet", "name": "other"}]}
    with serving(accelerated, folder) as runtime:
        for refresher in runtime.accelerator.refreshers.values():
            assert refresher.loaded.wait(60), refresher.status
        engine, local = QueryEngine(catalog), QueryEngine(catalog, EngineSettings(whole_query_pushdown=False))
        accel_local = QueryEngine(runtime.catalog, EngineSettings(whole_query_pushdown=False))
        backends = {
            "pg": Backend("pg", engine, local, True, "$1"),
            "my": Backend("my", engine, local, False, "%s"),  # collations: text never goes down whole
            "lite": Backend("lite", engine, local, True, "?"),
            "duck": Backend("duck", engine, local, True, "$1"),
            "snow": Backend("snow", engine, local, False, "?"),  # text compares loosely on Snowflake
            "flight": Backend("flight", engine, local, False, "?"),  # the peer's collation is unknown
            "ad": Backend("ad", runtime.engine, accel_local, True, "$1"),
            "as": Backend("as", runtime.engine, accel_local, True, "?"),
        }
        stored = {}
        for key, backend in backends.items():
            held = backend.local.query(f"SELECT id, name FROM {backend.t}").read_all().to_pylist()
            stored[key] = {row["id"]: row["name"] for row in held}
        try:
            yield World(folder, backends, stored, runtime)
        finally:
            catalog.close()
            peer.stop()
            snow_server.__exit__(None, None, None)
            _pg(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            _my(f"DROP DATABASE IF EXISTS {SCHEMA}")


def test_every_backend_holds_the_corpus_exactly(world):
    expected = dict(ROWS)
    for key, held in world.stored.items():
        wrong = {i: (held.get(i), expected[i]) for i in expected if held.get(i) != expected[i]}
        assert not wrong and len(held) == len(expected), (key, list(wrong.items())[:5])


# ---- 1. property tests ------------------------------------------------------------------

KEYS = ["pg", "my", "lite", "duck", "snow", "flight", "ad", "as"]
MODES = ["bound", "inline"]
_statement_texts: dict[tuple, str] = {}


def _same_text_for_every_value(key: tuple, text: str) -> None:
    """The statement a backend receives for a query shape never depends on the value."""
    seen = _statement_texts.setdefault(key, text)
    assert seen == text, f"statement text changed with the value:\n{seen}\n{text}"


def _shape(sql: str, mode: str, value: str) -> tuple[str, list | None]:
    if mode == "bound":
        return sql, [value]
    return sql.replace("?", df_literal(value)), None


def _expected_ids(world: World, key: str, value: str) -> list[int]:
    return sorted(i for i, name in world.stored[key].items() if name == value)


def _ids(table: pa.Table) -> list[int]:
    return sorted(table.column("id").to_pylist())


def _pushable_literal(mode: str, value: str, path: str = "whole") -> bool:
    """Bound values are always eligible; an inline literal the unparser cannot write
    faithfully (a backslash, two quotes in a row) is refused by design. Sub-plans also need
    the query to survive sqlglot's rewriting unchanged (federation.subplan._round_trips):
    sqlglot writes control characters as E-string escapes (\\v, \\x1b) that DataFusion reads
    otherwise, so such a literal keeps its join group local."""
    if mode == "bound":
        return True
    return faithful_text(value) and (path != "subplan" or _survives_sqlglot(value))


_DATAFUSION = SessionContext()


def _survives_sqlglot(value: str) -> bool:
    text = sqlglot.parse_one(f"SELECT {df_literal(value)} AS s", read=SQL_DIALECT).sql(dialect=SQL_DIALECT)
    try:
        return _DATAFUSION.sql(text).to_pylist() == [{"s": value}]
    except Exception:  # noqa: BLE001 - DataFusion refuses the rewritten text
        return False


QUERIES = {
    "whole": ("SELECT ? AS s FROM {t} WHERE id = 1",
              "SELECT id FROM {t} WHERE name = ?"),
    "subplan": ("SELECT x.s FROM (SELECT ? AS s, a.id FROM {t} a JOIN {t2} b ON a.id = b.id WHERE a.id = 1) x "
                "JOIN other o ON o.id = x.id",
                "SELECT a.id FROM {t} a JOIN {t2} b ON a.id = b.id JOIN other o ON o.id = a.id WHERE a.name = ?"),
    # length() is not on the pushdown allow-list: the query cannot go whole, its scan carries the filter
    "scan": ("SELECT ? AS s FROM {t} WHERE id = 1 AND length(name) >= 0",
             "SELECT id FROM {t} WHERE name = ? AND length(name) >= 0"),
}


def _check(world: World, path: str, key: str, mode: str, value: str) -> None:
    backend = world.backends[key]
    engine = backend.engine
    value_sql, rows_sql = (q.format(t=backend.t, t2=f"{backend.key}_t2") for q in QUERIES[path])
    pushable = _pushable_literal(mode, value, path)

    # SELECT ? AS s: exactly the value
    sql, params = _shape(value_sql, mode, value)
    planned = engine.plan(sql, params)
    if path == "whole":
        assert (planned.remote is not None) == pushable, (planned.remote, sql)
        if planned.remote is not None:
            assert planned.remote.params == [value]  # the value goes to the driver, not the text
            _same_text_for_every_value((path, key, mode, "value"), planned.remote.sql)
    elif path == "subplan":
        assert planned.remote is None
        pushed_with_value = [s for s in planned.subplans if value in s.params]
        assert bool(pushed_with_value) == pushable, ([(s.sql, s.params) for s in planned.subplans], sql)
        if not pushable:
            assert planned.subplans == [] or all(value not in s.params for s in planned.subplans)
        for subplan in pushed_with_value:
            _same_text_for_every_value((path, key, mode, "value"), subplan.sql)
    else:
        assert planned.remote is None and planned.subplans == []
    before = backend.stats().snapshot()
    result = engine.execute(planned).read_all()
    assert result.column("s").to_pylist() == [value]
    assert backend.stats().queries > before["queries"]  # the backend was asked (never an empty plan)

    # SELECT id WHERE name = ?: exactly the rows holding it
    sql, params = _shape(rows_sql, mode, value)
    planned = engine.plan(sql, params)
    expected = _expected_ids(world, key, value)
    before = backend.stats().snapshot()
    if path == "whole":
        goes_whole = pushable and backend.text_whole
        assert (planned.remote is not None) == goes_whole, (planned.remote, sql)
        if goes_whole:
            assert planned.remote.params == [value]
            _same_text_for_every_value((path, key, mode, "rows"), planned.remote.sql)
    elif path == "subplan":
        assert planned.remote is None
        pushed_with_value = [s for s in planned.subplans if value in s.params]
        assert bool(pushed_with_value) == (pushable and backend.text_whole), \
            ([(s.sql, s.params) for s in planned.subplans], sql)
        for subplan in pushed_with_value:
            _same_text_for_every_value((path, key, mode, "rows"), subplan.sql)
    else:
        assert planned.remote is None and planned.subplans == []
    result = engine.execute(planned).read_all()
    assert _ids(result) == expected, (key, path, mode, value)
    after = backend.stats().snapshot()
    assert after["queries"] > before["queries"]
    if path == "scan" or (path == "whole" and planned.remote is None):
        # ran in DataFusion: the scan took the filter, its value bound by the driver
        request = after["last_request"]
        assert backend.placeholder in request, request
        _same_text_for_every_value((path, key, mode, "rows-scan"), request)


def _property(path: str, keys: list[str], examples: int):
    @settings(PROPERTY, max_examples=examples)
    @given(value=VALUES, key=st.sampled_from(keys), mode=st.sampled_from(MODES))
    def check(world, value, key, mode):
        _check(world, path, key, mode, value)
    return check


FAST_KEYS = [k for k in KEYS if k != "snow"]


@pytest.mark.parametrize("path", ["whole", "subplan", "scan"])
def test_hostile_values_round_trip_exactly(world, path):
    """EXAMPLES examples per path, each on one backend (all but Snowflake) in one mode."""
    _property(path, FAST_KEYS, EXAMPLES)(world)


@pytest.mark.parametrize("path", ["whole", "subplan", "scan"])
def test_hostile_values_round_trip_exactly_on_the_snowflake_peer(world, path):
    """fakesnow answers in about 0.3 s (HTTP, a login and a sqlglot transpile per statement):
    Snowflake has its own, smaller budget."""
    _property(path, ["snow"], SNOW_EXAMPLES)(world)


# ---- 2. break-out suite -----------------------------------------------------------------

BREAKOUTS = [
    "zz\\' OR 1=1) --", "zz' OR 1=1) --", "zz'' OR 1=1) --", "\\'' OR 1=1 --", "\\\\' OR 1=1 --",
    "' OR '1'='1' --", "\\' OR '1'='1' #", "x' /*", "x\\' /* ", "x\\' #", "x\\' -- ", "x' -- ",
    "$$ OR 1=1 --$$", "$tag$ OR 1=1 $tag$", "$$'$$ OR 1=1 --", "$fd$' OR 1=1 --$fd$",
    "x\\' UNION SELECT rolpassword FROM pg_authid --", "x' UNION SELECT rolname FROM pg_authid --",
    "x\\' UNION SELECT setting FROM pg_settings WHERE name = \\'data_directory\\' --",
    "x\\' UNION SELECT sql FROM sqlite_master --", "x' UNION SELECT name FROM sqlite_master --",
    "x\\' UNION SELECT table_name FROM information_schema.tables --",
    "x\\' UNION SELECT table_name FROM duckdb_tables() --",
    "x\\' UNION SELECT dataset FROM flightdeck_copies --", "x' UNION SELECT dataset FROM flightdeck_copies --",
    f"x\\') UNION SELECT 1 INTO {PWNED}_a --", f"x\\'; SELECT 1 INTO {PWNED}_b; --",
    f"x\\'; CREATE TABLE {PWNED}_c AS SELECT 1; --", f"x'; CREATE TABLE {PWNED}_d (i int); --",
    "x\\' AND pg_sleep(5) IS NULL --", "x\\' OR (SELECT count(*) FROM t2) > 0 --",
    "x\\'||(SELECT name FROM t LIMIT 1)||\\'", "\\", "\\\\", "'", "''", "\\'", "N'x'", "E'\\''",
]


def _arrow_rows(reader: pa.RecordBatchReader) -> list[tuple]:
    return [tuple(r.values()) for r in reader.read_all().to_pylist()]


def _fingerprint(world: World, key: str) -> dict:
    """Checksums of the backend's tables and the tables it lists (and any attack-made table)."""
    backend = world.backends[key]
    if key == "pg":
        return {"t": _pg(f"SELECT md5(string_agg(t::text, ',' ORDER BY id)) FROM {SCHEMA}.t t"),
                "t2": _pg(f"SELECT md5(string_agg(t2::text, ',' ORDER BY id)) FROM {SCHEMA}.t2 t2"),
                "tables": _pg(f"SELECT schemaname, tablename FROM pg_tables WHERE schemaname = '{SCHEMA}' "
                              f"OR tablename LIKE '{PWNED}%' ORDER BY 1, 2")}
    if key == "my":
        return {"t": _digest(_my(f"SELECT id, hex(name) FROM {SCHEMA}.t ORDER BY id")),
                "t2": _digest(_my(f"SELECT id, k FROM {SCHEMA}.t2 ORDER BY id")),
                "tables": _my(f"SELECT table_schema, table_name FROM information_schema.tables WHERE "
                              f"table_schema = '{SCHEMA}' OR table_name LIKE '{PWNED}%' ORDER BY 1, 2")}
    if key in ("lite", "as"):
        path = world.folder / "lite.sqlite" if key == "lite" else world.runtime.accelerator._sqlite["file"].path
        return sqlite_fingerprint(path)
    if key in ("duck", "ad"):
        if key == "duck":
            return duckdb_fingerprint(backend.dataset().connector.execute_sql)
        cursor = world.runtime.accelerator._duckdb.cursor()
        return duckdb_fingerprint(lambda sql: cursor.sql(sql).to_arrow_reader(65_536))
    connector = backend.dataset().connector
    if key == "snow":
        return {"t": _digest(_arrow_rows(connector.execute_sql("SELECT id, name FROM inj.s.t ORDER BY id"))),
                "t2": _digest(_arrow_rows(connector.execute_sql("SELECT id, k FROM inj.s.t2 ORDER BY id"))),
                "tables": connector.tables()}
    # the Flight SQL peer: what it serves, as an ordinary client sees it
    return {"t": _digest(_arrow_rows(connector.execute_sql("SELECT id, name FROM public.t ORDER BY id"))),
            "t2": _digest(_arrow_rows(connector.execute_sql("SELECT id, k FROM public.t2 ORDER BY id"))),
            "tables": connector.tables(), "peer file": hashlib.sha256(
                (world.folder / "peer.duckdb").read_bytes()).hexdigest()}


def _sorted(table: pa.Table) -> list:
    return sorted((tuple(r.values()) for r in table.to_pylist()), key=repr)


@pytest.mark.parametrize("key", KEYS)
def test_break_out_strings_return_what_datafusion_returns_and_change_nothing(world, key):
    backend = world.backends[key]
    t, t2, held = backend.t, f"{backend.key}_t2", world.stored[key]
    templates = {  # query -> its answer over the rows the backend holds (what DataFusion computes)
        f"SELECT count(*) AS n FROM {t} WHERE name = ?": lambda v, ids: [(len(ids),)],  # the reported shape
        f"SELECT a.id FROM {t} a JOIN {t2} b ON a.id = b.id JOIN other o ON o.id = a.id WHERE a.name = ?":
            lambda v, ids: [(i,) for i in ids],
        f"SELECT id FROM {t} WHERE name = ?": lambda v, ids: [(i,) for i in ids],
        f"SELECT id, name FROM {t} WHERE id <= 3 AND name <> ?":
            lambda v, ids: [(i, held[i]) for i in sorted(held) if i <= 3 and held[i] != v],
        f"SELECT ? AS s, count(*) AS n FROM {t} WHERE id < 10": lambda v, ids: [(v, 9)],
        f"SELECT count(*) AS n FROM {t} a JOIN {t2} b ON a.id = b.id WHERE a.name = ? OR b.k < 0":
            lambda v, ids: [(len(ids),)],
    }
    if key == "snow":  # ~0.3 s a statement: the reported shape
        templates = dict(list(templates.items())[:1])
    elif key in ("my", "flight"):  # ~40 ms a statement: the shapes that bind the value in a filter
        templates = dict(list(templates.items())[:4])
    before = _fingerprint(world, key)
    for payload in BREAKOUTS:
        matching = _expected_ids(world, key, payload)
        for mode in MODES:
            for template, expected in templates.items():
                sql, params = _shape(template, mode, payload)
                result = backend.engine.query(sql, params).read_all()
                assert _sorted(result) == sorted(expected(payload, matching), key=repr), (key, mode, sql)
    assert _fingerprint(world, key) == before
    if key != "snow":  # and DataFusion with pushdown off agrees on the reported shape
        sql = f"SELECT count(*) AS n FROM {t} WHERE name = ?"
        for payload in BREAKOUTS:
            assert backend.local.query(sql, [payload]).read_all().column("n").to_pylist() == \
                [len(_expected_ids(world, key, payload))]


CATALOG_PROBES = [
    "SELECT count(*) AS n FROM {t} WHERE name IN (SELECT rolname FROM pg_authid)",
    "SELECT count(*) AS n FROM {t} WHERE name IN (SELECT setting FROM pg_settings)",
    "SELECT count(*) AS n FROM {t} WHERE name IN (SELECT sql FROM sqlite_master)",
    "SELECT count(*) AS n FROM {t} WHERE name IN (SELECT table_name FROM information_schema.tables)",
    "SELECT count(*) AS n FROM {t} WHERE name IN (SELECT table_name FROM duckdb_tables())",
    "SELECT count(*) AS n FROM {t} WHERE name IN (SELECT dataset FROM flightdeck_copies)",
    "SELECT count(*) AS n FROM {t} WHERE name IN (SELECT dataset FROM main.flightdeck_copies)",
    "SELECT count(*) AS n FROM {t} t JOIN pg_catalog.pg_authid a ON a.rolname = t.name",
    "SELECT id INTO " + PWNED + "_e FROM {t}",
    "SELECT id FROM {t} WHERE id = 1 UNION SELECT 1 FROM pg_authid",
]


@pytest.mark.parametrize("key", KEYS)
def test_catalog_probes_never_reach_a_backend_catalog(world, key):
    """Tables the plan does not name are not flightdeck's to read: each probe either fails to
    plan (as in DataFusion with pushdown off) or answers as DataFusion does."""
    backend = world.backends[key]
    before = _fingerprint(world, key)
    for probe in CATALOG_PROBES:
        sql = probe.format(t=backend.t)
        try:
            expected = _sorted(backend.local.query(sql).read_all())
        except QueryError:
            with pytest.raises(QueryError):
                backend.engine.query(sql).read_all()
            continue
        assert _sorted(backend.engine.query(sql).read_all()) == expected, sql
    assert _fingerprint(world, key) == before


STATEMENT_ATTACKS = {
    "into": f"SELECT id INTO {PWNED} FROM t",
    "into (mysql form)": f"SELECT id FROM t INTO OUTFILE '/tmp/{PWNED}'",
    "for update": "SELECT id FROM t FOR UPDATE",
    "for share": "SELECT id FROM t FOR SHARE",
    "lock in share mode": "SELECT id FROM t LOCK IN SHARE MODE",
    "union": "SELECT id FROM t UNION SELECT id FROM t",
    "union all with a catalog": "SELECT name FROM t UNION ALL SELECT rolpassword FROM pg_authid",
    "intersect": "SELECT id FROM t INTERSECT SELECT id FROM t",
    "create table as": f"CREATE TABLE {PWNED} AS SELECT 1",
    "create table": f"CREATE TABLE {PWNED} (i INT)",
    "insert": "INSERT INTO t VALUES (1, 'x')",
    "update": "UPDATE t SET name = 'x'",
    "delete": "DELETE FROM t",
    "drop": "DROP TABLE t",
    "attach": f"ATTACH '/tmp/{PWNED}.db' AS x",
    "copy": f"COPY t TO '/tmp/{PWNED}.csv'",
    "pragma": "PRAGMA writable_schema = 1",
    "set": "SET search_path = pg_catalog",
    "a table not the plan's": "SELECT rolpassword FROM pg_authid",
    "a schema-qualified catalog": "SELECT setting FROM pg_catalog.pg_settings",
    "sqlite_master": "SELECT sql FROM sqlite_master",
    "information_schema": "SELECT table_name FROM information_schema.tables",
    "the store's bookkeeping": "SELECT dataset FROM flightdeck_copies",
    "joined catalog": "SELECT t.id FROM t JOIN pg_settings s ON s.name = t.name",
    "table function": "SELECT * FROM duckdb_tables()",
    "file reader": "SELECT * FROM read_csv('/etc/passwd')",
    "function call": "SELECT pg_sleep(10) FROM t",
    "function in where": "SELECT id FROM t WHERE pg_read_file('/etc/passwd') = ''",
    "nested function": "SELECT count(*) FROM t WHERE id = abs(pg_backend_pid())",
    "version()": "SELECT version() FROM t",
    "current_setting": "SELECT id FROM t WHERE current_setting('data_directory') = ''",
    "subquery in where": "SELECT id FROM t WHERE id IN (SELECT id FROM t)",
    "exists": "SELECT id FROM t WHERE EXISTS (SELECT 1 FROM pg_authid)",
    "scalar subquery on a catalog": "SELECT id FROM t WHERE id = (SELECT count(*) FROM pg_authid)",
    "subquery in a projection": "SELECT (SELECT 1) FROM t",
    "cte": "WITH x AS (SELECT 1 AS a) SELECT id FROM t",
    "window": "SELECT row_number() OVER () FROM t",
    "derived table on a catalog": "SELECT x.a FROM (SELECT rolname AS a FROM pg_authid) x",
    "a marker-named column": "SELECT __fdbind_1__ FROM t",
}


@pytest.mark.parametrize("dialect", ["postgres", "mysql", "sqlite", "duckdb"])
@pytest.mark.parametrize("label", sorted(STATEMENT_ATTACKS))
def test_the_validator_refuses_statements_an_attacker_would_send(world, dialect, label):
    statement = STATEMENT_ATTACKS[label]
    try:
        trees = sqlglot.parse(statement, read=dialect)
    except sqlglot.errors.SqlglotError:
        return  # it does not even parse in this dialect: never sent
    assert len(trees) == 1
    with pytest.raises(StatementRefused):
        check_shape(trees[0], {("t",)})
    planned = world.backends["lite"].engine.plan("SELECT id FROM lite_t WHERE name = 'x' AND id > 1")
    plan = planned.frame.optimized_logical_plan()
    with pytest.raises(StatementRefused):
        bound_statement(trees[0], dialect, "qmark", plan, None, {("t",)})


# What a whole statement for local copies may hold that a plan's unparsed statement may not:
# subqueries reading the copies' own tables, and a WITH list in front.
WHOLE_STATEMENT_ALLOWS = {"subquery in where", "subquery in a projection", "cte"}
WHOLE_STATEMENT_ATTACKS = {
    "a WITH name read before it is defined": "WITH a AS (SELECT id FROM b), b AS (SELECT id FROM t) SELECT id FROM a",
    "a WITH name read inside itself": "WITH a AS (SELECT id FROM a) SELECT id FROM a",
    "a recursive WITH": "WITH RECURSIVE a AS (SELECT id FROM t) SELECT id FROM a",
    "a WITH list inside": "SELECT x.id FROM (WITH a AS (SELECT id FROM t) SELECT id FROM a) x",
    "a bare table that is no WITH name": "SELECT id FROM t WHERE id IN (SELECT id FROM flightdeck_copies)",
    "a set operation": "SELECT id FROM t UNION SELECT id FROM t",
    "EXISTS on another table": "SELECT id FROM t WHERE EXISTS (SELECT 1 FROM memory.main.other)",
    "a table function in a subquery": "SELECT id FROM t WHERE id IN (SELECT 1 FROM read_csv('/etc/passwd'))",
    "a function in a subquery": "SELECT (SELECT getenv('HOME')) FROM t",
    "a CTE shadowing nothing, read out of its scope": "SELECT id FROM t WHERE id IN (SELECT id FROM a)",
}


@pytest.mark.parametrize("label", sorted(set(STATEMENT_ATTACKS) | set(WHOLE_STATEMENT_ATTACKS)))
def test_the_whole_statement_validator_refuses_what_reads_beyond_the_copies(label):
    """Whole statements for DuckDB copies are checked against a wider allow-list: still one
    SELECT reading only the copies' tables, no function outside the list, no table function."""
    statement = STATEMENT_ATTACKS.get(label) or WHOLE_STATEMENT_ATTACKS[label]
    try:
        trees = sqlglot.parse(statement, read="duckdb")
    except sqlglot.errors.SqlglotError:
        return  # it does not even parse: never sent
    assert len(trees) == 1
    if label in WHOLE_STATEMENT_ALLOWS:
        check_shape(trees[0], {("t",)}, whole=True)
        return
    with pytest.raises(StatementRefused):
        check_shape(trees[0], {("t",)}, whole=True)


def test_a_whole_statement_binds_every_text_and_takes_only_the_plans_texts():
    tree = sqlglot.parse_one("WITH a AS (SELECT id, name FROM t WHERE name LIKE 'x%') "
                             "SELECT id FROM a WHERE EXISTS (SELECT 1 FROM t WHERE t.name = 'x''y')", read="postgres")
    bound = bound_statement(tree, "duckdb", "numbered", None, None, {("t",)}, whole=True,
                            plan_texts={"x%", "x'y"})
    assert bound.params == ["x%", "x'y"] and "'" not in bound.sql
    with pytest.raises(StatementRefused):  # a text DataFusion did not read from the statement
        bound_statement(tree, "duckdb", "numbered", None, None, {("t",)}, whole=True, plan_texts={"x%"})


@pytest.mark.parametrize("statement", [
    "SELECT id FROM t WHERE name = 'y'",                      # a literal the plan does not hold
    "SELECT id FROM t WHERE name = 'x' OR name = 'x'' OR 1=1'",
    "SELECT id FROM t WHERE name = 'x' OR 1 = 1 AND name = 'z'",
    "SELECT id FROM t WHERE name = $2",                       # a parameter with no value
    "SELECT id FROM t AS x WHERE x.name = 'x'",               # fine: the control case
])
def test_bound_statement_accepts_only_the_plans_own_literals(world, statement):
    planned = world.backends["lite"].engine.plan("SELECT id FROM lite_t WHERE name = 'x' AND id > 1")
    plan = planned.frame.optimized_logical_plan()
    tree = sqlglot.parse_one(statement, read="postgres")
    if statement.endswith("x.name = 'x'"):
        bound = bound_statement(tree, "postgres", "numbered", plan, None, {("t",)})
        assert bound.params == ["x"] and "'x'" not in bound.sql
        return
    with pytest.raises(StatementRefused):
        bound_statement(tree, "postgres", "numbered", plan, None, {("t",)})


def test_an_unfaithful_plan_literal_is_never_written(world):
    engine = world.backends["lite"].engine
    plan = engine.plan("SELECT id FROM lite_t WHERE name = E'zz\\\\\\' OR 1=1) --'").frame.optimized_logical_plan()
    tree = sqlglot.parse_one("SELECT id FROM t WHERE name = 'zz\\'", read="postgres")
    with pytest.raises(StatementRefused):
        bound_statement(tree, "postgres", "numbered", plan, None, {("t",)})


# ---- 3. the accelerated copies' query connections cannot write ---------------------------

DUCKDB_WRITES = [
    f"CREATE TABLE {PWNED} AS SELECT 1",
    "INSERT INTO memory.main.flightdeck_copies VALUES ('x', NULL, 1)",
    "INSERT INTO accel_file.main.flightdeck_copies VALUES ('x', NULL, 1)",
    "DELETE FROM accel_file.main.flightdeck_copies",
    "UPDATE accel_file.main.public__ad_t SET name = 'x'",
    "DELETE FROM accel_file.main.public__ad_t",
    "DROP TABLE memory.main.public__ad_t2",
    f"CREATE SEQUENCE {PWNED}_seq",
    f"CREATE VIEW {PWNED}_v AS SELECT 1",
    f"CREATE MACRO {PWNED}_m() AS 1",
    f"ATTACH ':memory:' AS {PWNED}_db",
    "DETACH accel_file",
    "SET lock_configuration = false",
    f"COPY accel_file.main.public__ad_t TO '/tmp/{PWNED}.csv'",
    f"COMMIT; CREATE TABLE {PWNED}_x AS SELECT 1",
    "ROLLBACK; DELETE FROM accel_file.main.flightdeck_copies",
    "ABORT; DROP TABLE accel_file.main.public__ad_t",
    f"END; CREATE TABLE memory.main.{PWNED}_y AS SELECT 1",
]


@pytest.fixture
def duckdb_copies(tmp_path):
    """A DuckDB copy store of its own (file and memory copies, as a runtime has them): an attack
    that succeeded must not break the other tests' store."""
    engine = DuckDBEngine(tmp_path / "data", tmp_path)
    schema = pa.schema([("id", pa.int32()), ("name", pa.string())])
    for dataset, mode in (("public.ad_t", "file"), ("public.ad_t2", "memory")):
        DuckDBStore(dataset, schema, mode, engine).replace(_table().to_reader(), Stamp(dt.datetime.now(dt.timezone.utc), 1))

    def state() -> dict:
        cursor = engine.cursor()
        try:
            found = {"databases": cursor.sql("SELECT database_name, path FROM duckdb_databases() ORDER BY ALL").fetchall(),
                     "tables": cursor.sql("SELECT database_name, schema_name, table_name FROM duckdb_tables() "
                                          "ORDER BY ALL").fetchall(),
                     "other objects": cursor.sql("SELECT sequence_name FROM duckdb_sequences() UNION ALL SELECT "
                                                 "view_name FROM duckdb_views() WHERE NOT internal UNION ALL SELECT "
                                                 "function_name FROM duckdb_functions() WHERE NOT internal").fetchall()}
            for database, schema_name, name in found["tables"]:
                found[name] = _digest(cursor.sql(f'SELECT * FROM "{database}"."{schema_name}"."{name}" ORDER BY ALL')
                                      .fetchall())
            return found
        finally:
            cursor.close()

    yield engine, state
    engine.close()


@pytest.mark.parametrize("statement", DUCKDB_WRITES)
def test_the_duckdb_copy_reader_refuses_writes_handed_to_it(duckdb_copies, statement):
    engine, state = duckdb_copies
    reader = engine.reader  # AcceleratedDuckDB: what every query routed to a DuckDB copy runs on
    before = state()
    with pytest.raises(ConnectorError):
        reader.stream(statement, [], None).read_all()
    assert state() == before
    assert not Path(f"/tmp/{PWNED}.csv").exists()
    count = reader.stream("SELECT count(*) FROM accel_file.main.public__ad_t", [], None).read_all()
    assert count.column(0).to_pylist() == [len(ROWS)]  # and it still reads


SQLITE_WRITES = [
    f"CREATE TABLE {PWNED} AS SELECT 1", "INSERT INTO flightdeck_copies VALUES ('x', NULL, 1)",
    "DELETE FROM flightdeck_copies", "UPDATE public__as_t SET name = 'x'", "DELETE FROM public__as_t",
    "DROP TABLE public__as_t", f"CREATE VIEW {PWNED}_v AS SELECT 1", f"CREATE TRIGGER {PWNED}_tr AFTER INSERT "
    "ON public__as_t BEGIN SELECT 1; END", "ATTACH DATABASE '{outside}' AS pwned", "VACUUM INTO '{outside}'",
    "PRAGMA journal_mode = DELETE", "PRAGMA user_version = 7", f"SELECT 1; CREATE TABLE {PWNED}_x (i)",
    "SELECT load_extension('/tmp/x')",
]


@pytest.mark.parametrize("statement", SQLITE_WRITES)
def test_the_sqlite_copy_reader_refuses_writes_handed_to_it(tmp_path, statement):
    engine = SQLiteEngine("file", tmp_path / "data", tmp_path)
    try:
        schema = pa.schema([("id", pa.int64()), ("name", pa.string())])
        SQLiteStore("public.as_t", schema, "file", engine).replace(
            _table().cast(schema).to_reader(), Stamp(dt.datetime.now(dt.timezone.utc), 1))
        outside = tmp_path / f"{PWNED}.sqlite"

        def state():
            with sqlite3.connect(f"file:{engine.path}?mode=ro", uri=True) as con:
                names = [r[0] for r in con.execute("SELECT name FROM sqlite_master ORDER BY 1")]
                return names, con.execute("PRAGMA user_version").fetchall(), [
                    _digest(con.execute(f'SELECT * FROM "{n}" ORDER BY 1')) for n in names if n.startswith(("public", "flight"))]

        before = state()
        with pytest.raises(ConnectorError):
            engine.reader.stream(statement.format(outside=outside), [], None).read_all()
        assert state() == before
        assert not outside.exists(), "the reader wrote a file outside the copy"
    finally:
        engine.close()


# ---- 4. identifiers ---------------------------------------------------------------------

WEIRD_TABLE = 'we"ird`\\%é表'
WEIRD_ID = 'i"d`'
WEIRD_NAME = 'na`me\\%é "x"'
WEIRD_ROWS = [(1, "a"), (2, "b'c"), (3, "a"), (4, "zz\\' OR 1=1) --"), (5, "%"), (6, "é")]


def _dq(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _bq(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


@pytest.fixture(scope="module")
def weird(world):
    folder = world.folder
    _pg(f"CREATE TABLE {SCHEMA}.{_dq(WEIRD_TABLE)} ({_dq(WEIRD_ID)} int, {_dq(WEIRD_NAME)} text COLLATE \"C\")")
    with adbc_postgres.connect(PG_URI, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {SCHEMA}.{_dq(WEIRD_TABLE)} VALUES ($1, $2)", WEIRD_ROWS)
    connection = pymysql.connect(host="127.0.0.1", user="root", autocommit=True, charset="utf8mb4", database=SCHEMA)
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE {_bq(WEIRD_TABLE)} ({_bq(WEIRD_ID)} INT, {_bq(WEIRD_NAME)} TEXT)")
        # with arguments PyMySQL reads the text as a format string: the name's % is written %%
        cursor.executemany(f"INSERT INTO {_bq(WEIRD_TABLE).replace('%', '%%')} VALUES (%s, %s)", WEIRD_ROWS)
    connection.close()
    with sqlite3.connect(folder / "weird.sqlite") as con:
        con.execute(f"CREATE TABLE {_dq(WEIRD_TABLE)} ({_dq(WEIRD_ID)} INTEGER, {_dq(WEIRD_NAME)} TEXT)")
        con.executemany(f"INSERT INTO {_dq(WEIRD_TABLE)} VALUES (?, ?)", WEIRD_ROWS)
    with duckdb.connect(str(folder / "weird.duckdb")) as con:
        con.execute(f"CREATE TABLE {_dq(WEIRD_TABLE)} ({_dq(WEIRD_ID)} INTEGER, {_dq(WEIRD_NAME)} VARCHAR)")
        con.executemany(f"INSERT INTO {_dq(WEIRD_TABLE)} VALUES (?, ?)", WEIRD_ROWS)
    specs = [DatasetSpec("pg_w", f"postgres:{SCHEMA}.{WEIRD_TABLE}", PG),
             DatasetSpec("my_w", f"mysql:{SCHEMA}.{WEIRD_TABLE}", MY),
             DatasetSpec("lite_w", f"sqlite:{WEIRD_TABLE}", {"sqlite_file": "weird.sqlite"}),
             DatasetSpec("duck_w", f"duckdb:{WEIRD_TABLE}", {"duckdb_open": "weird.duckdb"})]
    catalog = Catalog(specs, folder)
    yield QueryEngine(catalog)
    catalog.close()


@pytest.mark.parametrize("key", ["pg", "my", "lite", "duck"])
def test_identifiers_with_quotes_backticks_backslashes_percent_and_unicode(weird, key):
    engine = weird
    dataset = engine.catalog.datasets[f"public.{key}_w"]
    assert dataset.state == "ready", dataset.error
    assert dataset.arrow_schema.names == [WEIRD_ID, WEIRD_NAME]
    table, ident, name = f"{key}_w", _dq(WEIRD_ID), _dq(WEIRD_NAME)
    stats = dataset.connector.stats
    for value, ids in [("a", [1, 3]), ("b'c", [2]), ("zz\\' OR 1=1) --", [4]), ("%", [5]), ("é", [6]), ("x", [])]:
        # scan pushdown: the filter goes to the backend, the value bound
        before = stats.queries
        planned = engine.plan(f"SELECT {ident} FROM {table} WHERE {name} = ? AND length({name}) >= 0", [value])
        assert planned.remote is None
        got = sorted(engine.execute(planned).read_all().column(0).to_pylist())
        assert got == ids and stats.queries == before + 1, (key, value, stats.last_request)
        assert "WHERE" in stats.last_request
        # whole-query pushdown (text columns never go whole on MariaDB)
        planned = engine.plan(f"SELECT {ident} FROM {table} WHERE {name} = ?", [value])
        assert (planned.remote is not None) == (key != "my"), key
        assert sorted(engine.execute(planned).read_all().column(0).to_pylist()) == ids
    planned = engine.plan(f"SELECT count(*) AS n, max({ident}) AS m FROM {table} WHERE {ident} > 1")
    assert planned.remote is not None, key  # numbers only: whole everywhere, MariaDB included
    assert engine.execute(planned).read_all().to_pylist() == [{"n": 5, "m": 6}]
    planned = engine.plan(f"SELECT {name} AS v FROM {table} WHERE {ident} = 5")
    assert engine.execute(planned).read_all().to_pylist() == [{"v": "%"}]


# ---- 5. values never read as SQL: float NaN / infinity, table function arguments -------

NAN_SCHEMA = "fd_inj_nan"  # PostgreSQL schema and MariaDB database of these tests
INF, NAN = float("inf"), float("nan")
# (id, v, nan, inf): the columns named nan and inf hold what a bare word NaN or inf would read
# instead of the value; MariaDB stores no NaN or infinity, SQLite stores a NaN as NULL.
NAN_ROWS = [(1, 1.0, 1.0, 5.0), (2, NAN, 7.0, 5.0), (3, 3.0, 3.0, 0.0), (4, INF, 0.0, 0.0),
            (5, -INF, 0.0, 0.0), (6, 2.0, 9.0, -1.0), (7, -3.0, 0.0, 2.0)]
NON_FINITE_QUERIES = [
    "SELECT id FROM {t} WHERE v = 'NaN'::double", "SELECT id FROM {t} WHERE v = CAST('NaN' AS DOUBLE)",
    "SELECT id FROM {t} WHERE v <> 'NaN'::double", "SELECT id FROM {t} WHERE v < 'Infinity'",
    "SELECT id FROM {t} WHERE v < CAST('inf' AS DOUBLE)", "SELECT id FROM {t} WHERE v > '-inf'",
    "SELECT id FROM {t} WHERE v > '-Infinity'::double AND v < 'Infinity'::double",
    "SELECT id, 'Infinity'::double AS x FROM {t} WHERE id < 4", "SELECT count(*) AS n FROM {t} WHERE v >= '-inf'",
]


def _load_nan_tables(folder: Path) -> None:
    finite = [row for row in NAN_ROWS if all(v == v and abs(v) != INF for v in row)]
    _pg(f"DROP SCHEMA IF EXISTS {NAN_SCHEMA} CASCADE")
    _pg(f"CREATE SCHEMA {NAN_SCHEMA}")
    _pg(f"CREATE TABLE {NAN_SCHEMA}.t (id int, v double precision, nan double precision, inf double precision)")
    with adbc_postgres.connect(PG_URI, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.executemany(f"INSERT INTO {NAN_SCHEMA}.t VALUES ($1, $2, $3, $4)", NAN_ROWS)
    _my(f"DROP DATABASE IF EXISTS {NAN_SCHEMA}")
    _my(f"CREATE DATABASE {NAN_SCHEMA}")
    _my(f"CREATE TABLE {NAN_SCHEMA}.t (id INT, v DOUBLE, nan DOUBLE, inf DOUBLE)")
    for row in finite:
        _my(f"INSERT INTO {NAN_SCHEMA}.t VALUES (%s, %s, %s, %s)", row)
    with sqlite3.connect(folder / "nan.sqlite") as con:
        con.execute("CREATE TABLE t (id INTEGER, v REAL, nan REAL, inf REAL)")
        con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", NAN_ROWS)
    with duckdb.connect(str(folder / "nan.duckdb")) as con:
        con.execute("CREATE TABLE t (id INTEGER, v DOUBLE, nan DOUBLE, inf DOUBLE)")
        con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)", NAN_ROWS)


@pytest.fixture(scope="module")
def nan_tables(tmp_path_factory):
    """Tables with columns named nan and inf on each SQL backend kind: (pushdown on, off)."""
    folder = tmp_path_factory.mktemp("nan")
    try:
        _load_nan_tables(folder)
    except Exception as error:  # noqa: BLE001
        _service_missing("PostgreSQL and MariaDB", error)
    catalog = Catalog([DatasetSpec("pg_nan", f"postgres:{NAN_SCHEMA}.t", PG),
                       DatasetSpec("my_nan", f"mysql:{NAN_SCHEMA}.t", MY),
                       DatasetSpec("lite_nan", "sqlite:t", {"sqlite_file": "nan.sqlite"}),
                       DatasetSpec("duck_nan", "duckdb:t", {"duckdb_open": "nan.duckdb"})], folder)
    try:
        yield QueryEngine(catalog), QueryEngine(catalog, EngineSettings(whole_query_pushdown=False))
    finally:
        catalog.close()
        _pg(f"DROP SCHEMA IF EXISTS {NAN_SCHEMA} CASCADE")
        _my(f"DROP DATABASE IF EXISTS {NAN_SCHEMA}")


@pytest.mark.parametrize("key", ["pg", "my", "lite", "duck"])
def test_a_float_nan_or_infinity_never_reaches_a_backend_as_a_column_name(nan_tables, key):
    """DataFusion's unparser writes NaN and infinities as the bare words NaN and inf: sent as
    such, the backend compares with the columns named nan and inf. The answer must be
    DataFusion's, as over the scanned rows with pushdown off."""
    engine, local = nan_tables
    table = f"{key}_nan"
    for query in NON_FINITE_QUERIES:
        sql = query.format(t=table)
        expected = _sorted(local.query(sql).read_all())
        assert _sorted(engine.query(sql).read_all()) == expected, (key, sql)
    finite = f"SELECT id FROM {table} WHERE v > 1.5"
    planned = engine.plan(finite)
    assert planned.remote is not None, key  # finite floats still go down whole
    assert _ids(engine.execute(planned).read_all()) == _ids(local.query(finite).read_all())


@pytest.mark.parametrize("key", ["pg", "my", "lite", "duck"])
def test_a_bound_float_nan_or_infinity_is_not_handed_to_a_backends_driver(nan_tables, key):
    """SQLite's driver binds NaN as NULL, PyMySQL refuses it, PostgreSQL orders it above every
    number: a binding holding one runs in DataFusion, a later finite one goes down again."""
    engine, local = nan_tables
    for sql in (f"SELECT id FROM {key}_nan WHERE v <> $1", f"SELECT id FROM {key}_nan WHERE v < $1"):
        for value in (NAN, INF, -INF, 2.5):  # the first binding and later ones take separate paths
            expected = _sorted(local.query(sql, [value]).read_all())
            planned = engine.plan(sql, [value])
            assert _sorted(engine.execute(planned).read_all()) == expected, (key, sql, value)
            assert (planned.remote is not None) == (value == 2.5), (key, sql, value)
            explained = engine.query(f"EXPLAIN {sql}", [value]).read_all().column("plan_type").to_pylist()
            assert any("whole query sent" in kind for kind in explained) == (value == 2.5), explained


@pytest.mark.parametrize("statement, refused", [
    ('SELECT "t"."id" FROM "s"."t" AS "t" WHERE ("t"."v" = NaN)', "bare word"),
    ('SELECT "t"."id" FROM "s"."t" AS "t" WHERE ("t"."v" > -inf)', "bare word"),
    ('SELECT "t"."id", inf AS "x" FROM "s"."t" AS "t"', "bare word"),
    ('SELECT "t"."id" FROM "s"."t" AS "t" WHERE "t"."hidden" = 1', "no table it reads"),
    ('SELECT "x"."n" FROM (SELECT "t"."id" AS "m" FROM "s"."t" AS "t") AS "x"', "no table it reads"),
    ('SELECT "x"."m" FROM (SELECT "t"."id" AS "m" FROM "s"."t" AS "t") AS "x" ORDER BY "x"."m"', None),
    ('SELECT count(*) AS "n", "t"."v" FROM "s"."t" AS "t" GROUP BY "t"."v" ORDER BY "n"', None),
])
@pytest.mark.parametrize("dialect", ["postgres", "mysql", "sqlite", "duckdb"])
def test_the_validator_takes_only_quoted_columns_of_the_tables_read_or_aliases(statement, refused, dialect):
    tree = sqlglot.parse_one(statement.replace('"', "`") if dialect in ("mysql", "sqlite") else statement,
                             read=dialect)
    columns = {"id", "v", "nan", "inf"}
    if refused is None:
        check_shape(tree, {("s", "t")}, remote_columns=columns)
        return
    with pytest.raises(StatementRefused, match=refused):
        check_shape(tree, {("s", "t")}, remote_columns=columns)


@pytest.fixture
def echoing_engine(tmp_path):
    """An engine with ``echo(text)``, a table function returning its argument as it received it."""
    engine = QueryEngine(Catalog([], tmp_path))

    def echo(argument):
        value = argument.python_value()
        value = value.as_py() if isinstance(value, pa.Scalar) else value
        return Table(pa_dataset.dataset(pa.table({"s": pa.array([value], pa.string())})))

    engine.ctx.register_udtf(udtf(echo, "echo"))
    return engine


INLINED_VALUES = ["a'b", "''", "\\", "a\\'b", "\\\\'", "E'x", "x\ny", "x\r\ny", "x\ry", "-- c", "/* c", "*/ c",
                  "\t\x0b\x0c\x01\x1b\x1f\x7f\x85", "\u2028\u2029\u00a0\u200b\ufeff\u202e", "é e\u0301 ß İ ✓ 😀 中文",
                  "$1 ? %s", "\n3) UNION ALL SELECT 1 /*", ""]


def test_a_table_function_argument_binds_to_exactly_itself(echoing_engine):
    """Bound values are written into the statement as DataFusion literals (a table function
    is called while planning): each must come back as itself, and its literal is one line
    of printable text (so it can end no comment and no line)."""
    for value in INLINED_VALUES:
        planned = echoing_engine.plan("SELECT s FROM echo($1)", [value])
        assert all(char.isprintable() or char == " " for char in planned.sql), repr(planned.sql)
        assert echoing_engine.execute(planned).read_all().column("s").to_pylist() == [value], repr(value)
    with pytest.raises(QueryError, match="NUL"):  # DataFusion SQL has no way to write it
        echoing_engine.plan("SELECT s FROM echo($1)", ["a\x00b"])


MISREAD_ARGUMENTS = {  # statements where sqlglot reads a $n argument that DataFusion does not
    "a lone carriage return, which ends a -- comment for sqlglot only":
        "SELECT * FROM generate_series(1, -- c\r $1\n 3) -- */",
    "a backquoted name": "SELECT * FROM generate_series(1, `$1`)",
    "a q'[...]' string": "SELECT * FROM generate_series(1, q'[ ' , $1 , ' ]')",
    "a parameter running on into a name": "SELECT * FROM generate_series(1, $1a)",
}


@pytest.mark.parametrize("label", sorted(MISREAD_ARGUMENTS))
def test_a_table_function_argument_datafusion_reads_otherwise_is_refused(echoing_engine, label):
    """The value inlined where DataFusion reads a comment or quoted text would be read as
    SQL once it ends them: such statements are refused, bound or not."""
    sql = MISREAD_ARGUMENTS[label]
    for params in (None, [2], ["\n3) UNION ALL SELECT count(*) AS value FROM generate_series(1, 5) /*"]):
        with pytest.raises(QueryError, match="not where DataFusion reads a parameter|a carriage return|backquoted"):
            echoing_engine.query(sql, params).read_all()


def test_a_table_function_argument_cannot_run_on_into_the_text_around_it(echoing_engine):
    """-$1 bound to -3 must not become --3, a comment swallowing the rest of the line."""
    sql = "SELECT * FROM generate_series(1, -$1) WHERE value > 1"
    assert echoing_engine.query(sql, [-3]).read_all().column(0).to_pylist() == [2, 3]
    assert echoing_engine.query("SELECT s FROM echo(  $1\r\n)", ["ok"]).read_all().column(0).to_pylist() == ["ok"]


# Column names a source may give its table, written to end a quoted name in a copy's statements.
HOSTILE_NAMES = ['a"=0);UPDATE memory.main.public__prices SET price=0;--',
                 'x" TEXT, "y', 'b"; DELETE FROM flightdeck_copies; --']


@pytest.mark.parametrize("engine_kind", ["duckdb", "sqlite"])
def test_a_source_naming_its_columns_cannot_write_sql_into_the_copies(tmp_path, engine_kind):
    """Names are data like values: a key column named to end its quotes ran as DuckDB SQL when
    change capture applied a batch, and set every other copy's prices to 0."""
    now = dt.datetime.now(dt.timezone.utc)
    if engine_kind == "duckdb":
        engine = DuckDBEngine(None, tmp_path)
        store = lambda name, schema: DuckDBStore(name, schema, "memory", engine)  # noqa: E731
    else:
        engine = SQLiteEngine("memory", tmp_path / "data", tmp_path)
        store = lambda name, schema: SQLiteStore(name, schema, "memory", engine)  # noqa: E731
    try:
        prices = store("public.prices", pa.schema([("sku", pa.int64()), ("price", pa.float64())]))
        prices.replace(pa.table({"sku": [1, 2], "price": [10.0, 20.0]}).to_reader(), Stamp(now, 1))
        schema = pa.schema([("a", pa.int64())] + [(name, pa.int64()) for name in HOSTILE_NAMES] + [("note", pa.string())])
        key = ("a", *HOSTILE_NAMES)
        row = {"a": [1], **{name: [1] for name in HOSTILE_NAMES}, "note": ["first"]}
        items = store("public.items", schema)
        items.replace(pa.table(row, schema=schema).to_reader(), Stamp(now, 1), indexes=(HOSTILE_NAMES[0],))
        changed = pa.table({**row, "a": [2], "note": ["second"]}, schema=schema)
        items.apply_changes(changed, None, key, Stamp(now, 1), {"lsn": "0/1"})
        items.upsert(pa.table({**row, "note": ["first, again"]}, schema=schema).to_reader(), Stamp(now, 1), key,
                     "upsert")
        read = lambda copy: copy.connector.stream(f"SELECT * FROM {copy.table}", [], None).read_all()  # noqa: E731
        assert [float(price) for price in read(prices).sort_by("sku").column("price").to_pylist()] == [10.0, 20.0]
        assert sorted(read(items).column("note").to_pylist()) == ["first, again", "second"]
    finally:
        engine.close()
