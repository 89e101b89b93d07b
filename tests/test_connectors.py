"""Foundation connectors against real files: discovery, pushdown, limits, read-only opens."""
from __future__ import annotations

import datetime as dt
import json
import sqlite3
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from federation import expr as fx
from federation.arrow_expr import decode, referenced_fields, to_arrow
from federation.catalog import Catalog, DatasetSpec
from federation.connectors import ConnectorError
from federation.connectors.duckdb import DuckDBConnector
from federation.connectors.file import FileConnector
from federation.connectors.http import HttpConnector
from federation.connectors.postgres import PostgresConnector
from federation.connectors.sqlite import SQLiteConnector, arrow_type_for
from federation.cancel import Cancellation, cancellation_scope
from federation.engine import EngineSettings, QueryEngine

# ---- the expression format DataFusion hands to Python datasets (pinned pyarrow) ----


def test_decode_arrow_expressions():
    expression = ((pc.field("a") > 5) & (pc.field("b") == "x")) | pc.field("c").isin([1, 2])
    assert decode(expression) == fx.Or((
        fx.And((fx.Compare(">", fx.Column("a"), fx.Literal(5)),
                fx.Compare("=", fx.Column("b"), fx.Literal("x")))),
        fx.InList(fx.Column("c"), (1, 2))))
    assert decode(pc.scalar(3) < pc.field("a")) == fx.Compare(">", fx.Column("a"), fx.Literal(3))
    assert decode(~pc.field("d").is_null()) == fx.Not(fx.IsNull(fx.Column("d")))
    assert decode(pc.field("d").is_valid()) == fx.Not(fx.IsNull(fx.Column("d")))
    day = dt.date(2026, 11, 20)
    assert decode(pc.field("day") >= pc.scalar(day)) == fx.Compare(">=", fx.Column("day"), fx.Literal(day))


def test_undecodable_parts_are_dropped_only_under_and():
    cast = pc.field("t").cast(pa.int32()) == 1
    assert decode((pc.field("a") > 1) & cast) == fx.Compare(">", fx.Column("a"), fx.Literal(1))
    assert decode((pc.field("a") > 1) | cast) is None
    assert decode(~cast) is None
    assert referenced_fields((pc.field("a") > 1) & cast) == {"a", "t"}


def test_to_arrow_round_trips():
    original = fx.And((fx.Compare("<=", fx.Column("x"), fx.Literal(3)),
                       fx.Or((fx.InList(fx.Column("y"), ("a", "b")), fx.IsNull(fx.Column("y"))))))
    assert decode(to_arrow(original)) == original


def test_sql_rendering():
    renderer = fx.SqlRenderer(fx.quote_double, fx.standard_literal)
    bindings = renderer.bindings()
    where, kept, exact = renderer.render_where([
        fx.Compare("=", fx.Column('we"ird'), fx.Literal("it's")),
        fx.Compare(">", fx.Column("at"), fx.Literal(dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc))),
        fx.InList(fx.Column("n"), (1, 2)),
        fx.InList(fx.Column("s"), ("x\\'", "y")),
    ], bindings=bindings)
    # Text is bound, never written: only identifiers and numbers are in the statement.
    assert where == '("we""ird" = $1) AND ("n" IN (1, 2)) AND ("s" IN ($2, $3))'
    assert bindings.values == ["it's", "x\\'", "y"]
    assert len(kept) == 1 and not exact  # a time-zone literal stays local
    qmark = fx.SqlRenderer(fx.quote_double, fx.standard_literal, "qmark")
    assert qmark.render_where([fx.Compare("=", fx.Column("a"), fx.Literal("v"))])[0] == '("a" = ?)'


# ---- file: ----


@pytest.fixture
def files(tmp_path):
    table = pa.table({"id": [1, 2, 3, 4], "name": ["a", "b", "c", "d"], "score": [0.5, 1.5, 2.5, None]})
    pq.write_table(table, tmp_path / "one.parquet")
    for region, part in (("eu", table.slice(0, 2)), ("us", table.slice(2))):
        (tmp_path / "hive" / f"region={region}").mkdir(parents=True)
        pq.write_table(part, tmp_path / "hive" / f"region={region}" / "part.parquet")
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "a.csv").write_text("id,name\n1,a\n2,b\n")
    (tmp_path / "csv" / "b.csv").write_text("id,name\n3,c\n")
    (tmp_path / "rows.ndjson").write_text('{"id": 1, "tags": ["x"]}\n{"id": 2, "tags": []}\n')
    (tmp_path / "api.json").write_text(json.dumps([{"id": 1, "user": {"login": "ada"}}]))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "guide.md").write_text("# Pooling\n\nUse transaction mode.\n")
    return tmp_path


def _query(tmp_path, specs, sql):
    engine = QueryEngine(Catalog(specs, tmp_path))
    return engine.query(sql).read_all()


def test_file_formats_and_layouts(files):
    specs = [
        DatasetSpec("single", "file:one.parquet"),
        DatasetSpec("hive", "file:hive/"),
        DatasetSpec("globbed", "file:hive/*/*.parquet"),
        DatasetSpec("csvs", "file:csv/"),
        DatasetSpec("csv_glob", "file:csv/*.csv"),
        DatasetSpec("lines", "file:rows.ndjson"),
        DatasetSpec("api", "file:api.json"),
        DatasetSpec("docs", "file:docs/"),
    ]
    assert _query(files, specs, "SELECT sum(id) AS s FROM single").to_pylist() == [{"s": 10}]
    hive = _query(files, specs, "SELECT region, count(*) AS n FROM hive GROUP BY region ORDER BY region")
    assert hive.to_pylist() == [{"region": "eu", "n": 2}, {"region": "us", "n": 2}]
    assert _query(files, specs, "SELECT count(*) AS n FROM globbed").to_pylist() == [{"n": 4}]
    assert _query(files, specs, "SELECT max(id) AS m FROM csvs").to_pylist() == [{"m": 3}]
    assert _query(files, specs, "SELECT count(*) AS n FROM csv_glob").to_pylist() == [{"n": 3}]
    lines = _query(files, specs, "SELECT id, tags FROM lines ORDER BY id")
    assert lines.to_pylist() == [{"id": 1, "tags": ["x"]}, {"id": 2, "tags": []}]
    assert _query(files, specs, "SELECT \"user\"['login'] AS login FROM api").to_pylist() == [{"login": "ada"}]
    docs = _query(files, specs, "SELECT path, title, content FROM docs")
    assert docs.to_pylist()[0]["path"] == "guide.md" and docs.to_pylist()[0]["title"] == "Pooling"


def test_file_scan_pushes_projection_filter_and_limit(files):
    connector = FileConnector({}, files, "hive/")
    reader = connector.scan("hive/", ["id", "region"],
                            [fx.Compare(">", fx.Column("id"), fx.Literal(1))], limit=2)
    table = reader.read_all()
    assert table.column_names == ["id", "region"] and table.num_rows == 2
    assert all(v > 1 for v in table.column("id").to_pylist())
    assert connector.row_count("hive/") == 4


def test_a_folder_is_listed_again_at_each_scan(tmp_path):
    """A writer that adds files (a new minute of logs) is seen at the next scan; a file still
    being written under a dot name is not."""
    pq.write_table(pa.table({"n": [1, 2]}), tmp_path / "part-0.parquet")
    connector = FileConnector({}, tmp_path, ".")
    assert connector.scan(".", None, [], None).read_all().num_rows == 2
    pq.write_table(pa.table({"n": [3]}), tmp_path / "part-1.parquet")
    pq.write_table(pa.table({"n": [4]}), tmp_path / ".part-2.parquet")
    assert sorted(connector.scan(".", None, [], None).read_all().column("n").to_pylist()) == [1, 2, 3]


def test_file_errors_are_clear(files):
    with pytest.raises(ConnectorError, match="does not exist"):
        FileConnector({}, files, "missing.parquet")
    (files / "odd.bin").write_bytes(b"x")
    with pytest.raises(ConnectorError, match="set params.file_format"):
        FileConnector({}, files, "odd.bin")


# ---- sqlite: and duckdb: through the engine (pushdown visible in the source counters) ----


@pytest.fixture
def databases(tmp_path):
    with sqlite3.connect(tmp_path / "crm.sqlite") as con:
        con.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT, city TEXT)")
        con.executemany("INSERT INTO people VALUES (?, ?, ?)",
                        [(i, f"p{i}", "Paris" if i % 2 else "Rome") for i in range(1, 1001)])
    with duckdb.connect(str(tmp_path / "events.duckdb")) as con:
        con.execute("CREATE TABLE events AS SELECT range AS id, range % 10 AS kind, "
                    "'e' || range AS label FROM range(500000)")
    return tmp_path


def _engine(databases):
    """The scan path: whole-query pushdown off, so each scan's own SQL is what is checked."""
    specs = [DatasetSpec("people", "sqlite:people", {"sqlite_file": "crm.sqlite"}),
             DatasetSpec("events", "duckdb:events", {"duckdb_open": "events.duckdb"})]
    catalog = Catalog(specs, databases)
    return QueryEngine(catalog, EngineSettings(whole_query_pushdown=False)), catalog


def test_filters_and_projection_reach_the_backend(databases):
    engine, catalog = _engine(databases)
    rows = engine.query("SELECT name FROM people WHERE city = 'Rome' AND id <= 10").read_all()
    assert sorted(rows.column("name").to_pylist()) == ["p10", "p2", "p4", "p6", "p8"]
    people = catalog.datasets["public.people"].connector.stats
    assert people.rows == 5
    # The value is bound by the driver: the statement holds only its placeholder.
    assert "WHERE" in people.last_request and '"city" = ?' in people.last_request and "Rome" not in people.last_request
    assert people.last_request.startswith('SELECT "name", ')

    engine.query("SELECT label FROM events WHERE id IN (7, 70, 700)").read_all()
    events = catalog.datasets["public.events"].connector.stats
    # DataFusion rewrites a short IN list to ORs before handing it over
    assert events.rows == 3 and '("id" = 7) OR ("id" = 70)' in events.last_request


def test_filters_the_backend_cannot_take_are_applied_locally(databases):
    engine, catalog = _engine(databases)
    result = engine.query("SELECT id FROM people WHERE length(name) = 4 AND id < 200 ORDER BY id").read_all()
    assert result.column("id").to_pylist() == list(range(100, 200))
    stats = catalog.datasets["public.people"].connector.stats
    assert stats.rows == 199  # id < 200 was pushed; length(name) = 4 ran locally


def test_limit_stops_the_scan_early(databases):
    engine, catalog = _engine(databases)
    assert engine.query("SELECT * FROM events LIMIT 5").read_all().num_rows == 5
    assert catalog.datasets["public.events"].connector.stats.rows < 500_000 // 2


def test_cross_backend_join(databases):
    engine, _ = _engine(databases)
    result = engine.query("SELECT p.city, count(*) AS n FROM events e JOIN people p ON p.id = e.id "
                          "WHERE e.kind = 3 GROUP BY p.city ORDER BY p.city").read_all()
    assert result.to_pylist() == [{"city": "Paris", "n": 100}]


def test_backends_are_opened_read_only(databases):
    _, catalog = _engine(databases)
    sqlite = catalog.datasets["public.people"].connector
    with pytest.raises(ConnectorError, match="only one SELECT is sent"):  # the connector sends only reads
        sqlite.execute_sql("DELETE FROM people").read_all()
    with pytest.raises(ConnectorError, match="not authorized"):  # the authorizer lets statements only read
        sqlite.open_stream("DELETE FROM people", None, None).read_all()
    with pytest.raises(sqlite3.OperationalError, match="readonly"):  # and the file is opened mode=ro beneath
        raw = sqlite3.connect(f"file:{sqlite.path}?mode=ro", uri=True)
        raw.execute("DELETE FROM people")
    duck = catalog.datasets["public.events"].connector
    with pytest.raises(ConnectorError, match="(?i)read-only|read only"):
        duck.execute_sql("DELETE FROM events").read_all()


def test_primary_keys_are_discovered(databases):
    _, catalog = _engine(databases)
    assert catalog.datasets["public.people"].primary_key == ["id"]
    assert catalog.datasets["public.events"].primary_key == []


@pytest.mark.parametrize("declared,expected", [
    ("INTEGER", pa.int64()), ("BIGINT", pa.int64()), ("VARCHAR(20)", pa.string()), ("TEXT", pa.string()),
    ("REAL", pa.float64()), ("DOUBLE PRECISION", pa.float64()), ("BLOB", pa.binary()),
    ("DECIMAL(12, 3)", pa.decimal128(12, 3)), ("NUMERIC", pa.float64()), ("BOOLEAN", pa.bool_()),
    ("DATE", pa.date32()), ("DATETIME", pa.timestamp("us")), ("", pa.string()),
])
def test_sqlite_type_mapping(declared, expected):
    assert arrow_type_for(declared) == expected


def test_sqlite_unconvertible_values_name_the_column(tmp_path):
    with sqlite3.connect(tmp_path / "bad.sqlite") as con:
        con.execute("CREATE TABLE t (id INTEGER, day DATE)")
        con.execute("INSERT INTO t VALUES (1, 'not a date')")
    connector = SQLiteConnector({"sqlite_file": "bad.sqlite"}, tmp_path)
    with pytest.raises((ConnectorError, ValueError), match="day|not a date"):
        connector.scan("t", None, [], None).read_all()


def test_sqlite_dates_are_filtered_locally(databases, tmp_path):
    """SQLite keeps dates as text in whatever format was written: comparing that text could
    drop rows the real filter keeps, so date filters run in DataFusion."""
    with sqlite3.connect(tmp_path / "days.sqlite") as con:
        con.execute("CREATE TABLE d (id INTEGER, day DATE, at DATETIME)")
        con.executemany("INSERT INTO d VALUES (?, ?, ?)",
                        [(1, "2026-01-05", "2026-01-05T10:00:00"), (2, "2026-02-01 09:00:00", "2026-02-01 09:00:00")])
    engine = QueryEngine(Catalog([DatasetSpec("d", "sqlite:d", {"sqlite_file": "days.sqlite"})], tmp_path))
    assert engine.query("SELECT id FROM d WHERE day <= DATE '2026-02-01'").read_all().column("id").to_pylist() == [1, 2]
    assert "WHERE" not in engine.catalog.datasets["public.d"].connector.stats.last_request
    later = engine.query("SELECT id FROM d WHERE at < TIMESTAMP '2026-01-05 11:00:00'").read_all()
    assert later.column("id").to_pylist() == [1]


def _counting_connects(monkeypatch) -> list[str]:
    opened, connect = [], sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *args, **kwargs: opened.append(args[0]) or connect(*args, **kwargs))
    return opened


@pytest.mark.parametrize("connector_class, param", [(SQLiteConnector, "sqlite_file"), (DuckDBConnector, "duckdb_open")])
def test_a_missing_database_file_is_named_without_the_servers_folders(tmp_path, connector_class, param):
    """The message is the dataset's error, which every key granted the dataset reads."""
    with pytest.raises(ConnectorError) as raised:
        connector_class({param: str(tmp_path / "hidden-folder" / "db.file")}, tmp_path)
    assert str(raised.value).endswith(f"database file db.file (params.{param}) does not exist")
    assert "hidden-folder" not in str(raised.value)


def test_sqlite_statements_reuse_a_kept_connection_and_read_the_file_as_it_stands(tmp_path, monkeypatch):
    """Opening a connection and preparing its statement cost more than a key lookup itself: a
    connection is kept from one statement to the next, outside any transaction, so each
    statement still reads the latest commit, and a file renamed over the path is read anew."""
    path = tmp_path / "kept.sqlite"
    with sqlite3.connect(path) as con:
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT)")
        con.executemany("INSERT INTO t VALUES (?, ?)", [(i, f"n{i}") for i in range(100)])
    con.close()
    connector = SQLiteConnector({"sqlite_file": "kept.sqlite"}, tmp_path)
    opened = _counting_connects(monkeypatch)
    lookup = lambda key: connector.stream("SELECT note FROM t WHERE id = ?", [key], None).read_all()  # noqa: E731
    assert [lookup(key).column("note")[0].as_py() for key in range(50)] == [f"n{i}" for i in range(50)]
    assert len(opened) == 1
    with sqlite3.connect(path) as writer:  # a commit between two statements is seen by the next
        writer.execute("UPDATE t SET note = 'changed' WHERE id = 7")
    writer.close()
    assert lookup(7).column("note").to_pylist() == ["changed"]
    replacement = tmp_path / "written-aside.sqlite"
    with sqlite3.connect(replacement) as con:
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, note TEXT)")
        con.execute("INSERT INTO t VALUES (7, 'from the new file')")
    con.close()
    replacement.rename(path)
    assert lookup(7).column("note").to_pylist() == ["from the new file"]
    connector.close()


def test_a_sqlite_connection_is_kept_only_after_a_statement_read_to_its_end(tmp_path, monkeypatch):
    """A statement left half read holds a read open (in WAL mode, a snapshot the file cannot be
    checkpointed past), and an interrupted one may be left interrupted: neither is kept."""
    with sqlite3.connect(tmp_path / "big.sqlite") as con:
        con.execute("CREATE TABLE t (id INTEGER)")
        con.executemany("INSERT INTO t VALUES (?)", [(i,) for i in range(5000)])
    con.close()
    connector = SQLiteConnector({"sqlite_file": "big.sqlite"}, tmp_path)
    opened = _counting_connects(monkeypatch)
    reader = connector.stream("SELECT id FROM t", None, None)
    assert next(iter(reader)).num_rows > 0
    reader.close()  # abandoned after its first batch
    assert connector.stream("SELECT count(*) AS n FROM t", None, None).read_all().column(0).to_pylist() == ["5000"]
    assert len(opened) == 2  # the abandoned statement's connection was closed, not kept
    cancellation = Cancellation()
    with cancellation_scope(cancellation):
        reader = connector.stream("SELECT a.id FROM t a, t b", None, None)
    cancellation.cancel()
    with pytest.raises(Exception):
        reader.read_all()
    assert connector.stream("SELECT count(*) AS n FROM t", None, None).read_all().column(0).to_pylist() == ["5000"]
    assert len(opened) == 3
    connector.close()


def test_a_limit_is_never_applied_before_a_filter_the_source_cannot_take(databases):
    from federation.connectors.sqlite import SQLiteConnector
    connector = SQLiteConnector({"sqlite_file": "crm.sqlite"}, databases)
    pushable = fx.Compare("<", fx.Column("id"), fx.Literal(100))
    local_only = fx.Compare("=", fx.Column("name"), fx.Literal(dt.datetime(2026, 1, 1)))  # not renderable
    assert connector.select_sql("people", ["id"], [pushable], 5)[0].endswith("LIMIT 5")
    assert "LIMIT" not in connector.select_sql("people", ["id"], [pushable, local_only], 5)[0]


def test_a_json_file_nesting_too_deep_is_unavailable_and_the_rest_serve(tmp_path):
    """Arrow's JSON reader recurses once per level on its thread's stack: one line 100,000 levels
    deep ended the process at startup, taking every other dataset down with it."""
    (tmp_path / "events.jsonl").write_text('{"id": 1}\n{"id": 2, "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (tmp_path / "strings.jsonl").write_text(json.dumps({"id": 1, "text": "[" * 1_000}) + "\n")  # brackets in text
    (tmp_path / "ok.csv").write_text("a\n1\n")
    catalog = Catalog([DatasetSpec("events", "file:events.jsonl", {}), DatasetSpec("strings", "file:strings.jsonl", {}),
                       DatasetSpec("ok", "file:ok.csv", {})], tmp_path)
    assert "nests deeper than 64 levels" in catalog.datasets["public.events"].error
    engine = QueryEngine(catalog)
    assert engine.query("SELECT a FROM ok").read_all().to_pylist() == [{"a": 1}]
    assert engine.query("SELECT length(text) AS n FROM strings").read_all().to_pylist() == [{"n": 1000}]


def test_a_json_file_of_one_line_without_a_final_newline_is_read(tmp_path):
    """pyarrow's dataset reader read such a file as one row of NULLs."""
    (tmp_path / "one.jsonl").write_text(json.dumps({"id": 1, "note": "x"}))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.jsonl").write_text(json.dumps({"id": 2, "note": "y"}) + "\n")
    (tmp_path / "folder" / "b.jsonl").write_text(json.dumps({"id": 3, "note": "z"}))
    engine = QueryEngine(Catalog([DatasetSpec("one", "file:one.jsonl", {}),
                                  DatasetSpec("many", "file:folder/", {"file_format": "json"})], tmp_path))
    assert engine.query("SELECT * FROM one").read_all().to_pylist() == [{"id": 1, "note": "x"}]
    assert engine.query("SELECT id, note FROM many ORDER BY id").read_all().to_pylist() == [
        {"id": 2, "note": "y"}, {"id": 3, "note": "z"}]


def test_a_backend_failing_mid_stream_is_quoted_by_its_first_line_with_secrets_masked(tmp_path):
    """An error met while a result streamed went to the client whole: a secret written in the
    configuration, quoted by the backend, reached the client, the audit and the log."""
    connector = PostgresConnector({"pg_host": "db.internal", "pg_pass": "s3cret-pass-1234"}, tmp_path)

    def failing():
        yield pa.record_batch([pa.array([1])], names=["x"])
        raise RuntimeError("server closed: password s3cret-pass-1234 rejected\n\tThis probably means...")
    reader = connector.counted(pa.schema([("x", pa.int64())]), "SELECT 1", failing)
    with pytest.raises(ConnectorError) as raised:
        reader.read_all()
    assert str(raised.value) == "postgres (db.internal:5432/postgres): server closed: password *** rejected"


def test_a_header_secret_is_masked_whole_and_by_its_token():
    connector = HttpConnector({"auth_header": "Bearer tok-SECRET-777"}, Path("."), "http://api.internal/things")
    assert connector.mask_secrets("HTTP 401 token tok-SECRET-777 is invalid (Bearer tok-SECRET-777)") == \
        "HTTP 401 token *** is invalid (***)"
