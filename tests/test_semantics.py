"""Answers must not depend on where a filter or a query runs.

Each case compares flightdeck (whole-query pushdown on, and off) with DataFusion over an
in-memory copy of the same rows: the planner's own semantics. The cases are the ways a
backend compares differently: collations, citext, char(n), NaN, untyped SQLite columns,
text dates, rounding casts, Unicode lower(), LIKE escapes, duplicate column names."""
from __future__ import annotations

import datetime as dt
import decimal
import sqlite3

import adbc_driver_postgresql.dbapi as adbc_postgres
import datafusion
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pymysql
import pytest

from federation.arrow_expr import to_arrow
from federation.catalog import Catalog, DatasetSpec
from federation.pushdown import planner_filter
from federation.engine import EngineSettings, QueryEngine

PG = {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"}


def _rows(table):
    """Rows as tuples (duplicate column names survive), NaN made comparable."""
    columns = [column.to_pylist() for column in table.columns]
    rows = [tuple("NaN" if isinstance(v, float) and v != v else v for v in row) for row in zip(*columns)]
    return sorted(rows, key=lambda row: tuple((v is None, str(v)) for v in row))


def check(specs, base, queries):
    catalog = Catalog(specs, base)
    pushed = QueryEngine(catalog)
    scanned = QueryEngine(catalog, EngineSettings(whole_query_pushdown=False))
    truth = datafusion.SessionContext()
    for spec in specs:
        truth.register_record_batches(spec.name, [scanned.query(f"SELECT * FROM {spec.name}").read_all().to_batches()])
    for sql in queries:
        expected = _rows(truth.sql(sql).to_arrow_table())
        assert _rows(pushed.query(sql).read_all()) == expected, f"pushdown on: {sql}"
        assert _rows(scanned.query(sql).read_all()) == expected, f"pushdown off: {sql}"
    return pushed


@pytest.fixture(scope="module")
def pg_probe():
    with adbc_postgres.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn, \
            conn.cursor() as cursor:
        cursor.execute("CREATE EXTENSION IF NOT EXISTS citext")
        cursor.execute("DROP SCHEMA IF EXISTS fd_sem CASCADE")
        cursor.execute("CREATE SCHEMA fd_sem")
        # Domains compare as the type under them, with its collation.
        cursor.execute("CREATE DOMAIN fd_sem.code AS char(4)")
        cursor.execute("CREATE DOMAIN fd_sem.label AS text COLLATE \"en-US-x-icu\"")
        cursor.execute("CREATE TABLE fd_sem.t (id int, r double precision, s text, ci citext, ch char(4), "
                       "icu text COLLATE \"en-US-x-icu\", n int, dch fd_sem.code, dicu fd_sem.label)")
        cursor.execute("INSERT INTO fd_sem.t VALUES (1, 'NaN', 'ab', 'ABC', 'ab', 'B', 3, 'ab', 'B'), "
                       "(2, 2.7, 'ΑΣ', 'abc', 'xy', 'a', -7, 'xy', 'a'), "
                       "(3, -2.5, 'a\\_b', NULL, NULL, 'c', NULL, NULL, 'c'), "
                       "(4, 0.5, 'ſ', NULL, NULL, NULL, NULL, NULL, NULL)")
    yield [DatasetSpec("t", "postgres:fd_sem.t", PG), DatasetSpec("t2", "postgres:fd_sem.t", PG)]
    with adbc_postgres.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn, \
            conn.cursor() as cursor:
        cursor.execute("DROP SCHEMA IF EXISTS fd_sem CASCADE")


def test_postgres_collations_citext_char_and_nan(pg_probe, tmp_path):
    engine = check(pg_probe, tmp_path, [
        "SELECT id FROM t WHERE icu < 'a'", "SELECT id FROM t WHERE icu <> 'a'",
        "SELECT id FROM t WHERE ci <> 'abc'", "SELECT id FROM t WHERE ci < 'abc'", "SELECT id FROM t WHERE ci = 'abc'",
        "SELECT id FROM t WHERE ch <> 'ab'", "SELECT id FROM t WHERE ch = 'ab'",
        "SELECT id FROM t WHERE dch = 'ab'", "SELECT id FROM t WHERE dicu < 'a'", "SELECT id FROM t WHERE dicu > 'B'",
        "SELECT dicu FROM t ORDER BY dicu LIMIT 2",
        "SELECT id FROM t WHERE r > 0", "SELECT id FROM t WHERE r >= 2.7", "SELECT id FROM t WHERE NOT (r < 0)",
        "SELECT icu FROM t ORDER BY icu LIMIT 2", "SELECT min(icu) AS m FROM t",
        "SELECT ci, count(*) AS n FROM t GROUP BY ci",
        "SELECT CAST(r AS INT) AS i FROM t WHERE id = 2", "SELECT lower(s) AS l FROM t WHERE id = 2",
        "SELECT * FROM (SELECT id FROM t ORDER BY id LIMIT 2) x JOIN t2 ON x.id = t2.id",
        # DataFusion's ILIKE folds case as Unicode does (ſ is s), PostgreSQL's lowers both sides
        "SELECT id FROM t WHERE s ILIKE 's'", "SELECT id FROM t WHERE s NOT ILIKE 'S'",
    ])
    assert engine.plan("SELECT id, n FROM t WHERE n > 0").remote is not None  # numbers still go down whole


def test_sub_plans_of_mixed_queries_keep_the_meaning(pg_probe, tmp_path):
    """Two PostgreSQL tables joined with a SQLite one: the PostgreSQL join goes down only
    where every column it touches compares exactly and every expression means the same."""
    with sqlite3.connect(tmp_path / "labels.sqlite") as con:
        con.execute("CREATE TABLE labels (id INTEGER, label TEXT)")
        con.executemany("INSERT INTO labels VALUES (?, ?)", [(1, "one"), (2, "two"), (3, "three")])
    specs = pg_probe + [DatasetSpec("labels", "sqlite:labels", {"sqlite_file": "labels.sqlite"})]
    join = "FROM t JOIN t2 ON t2.id = t.id JOIN labels l ON l.id = t.id"
    pushed_sql = [f"SELECT l.label, t.r {join} WHERE t.r > 0", f"SELECT l.label, t2.n {join} WHERE NOT (t.r < 0)",
                  f"SELECT l.label, t.n + t2.n AS m {join} WHERE t2.n IS NOT NULL",
                  f"SELECT l.label, CAST(t.r AS INT) AS i {join} WHERE t.id = 2",  # the cast stays local
                  f"SELECT l.label {join} WHERE t.n / 2 < t2.n"]  # so does the division
    local_sql = [f"SELECT l.label {join} WHERE t.icu < 'a'", f"SELECT l.label {join} WHERE t.ci = 'abc'",
                 f"SELECT l.label {join} WHERE t.ch = 'ab'", f"SELECT l.label, t.icu {join} ORDER BY t.icu",
                 "SELECT l.label FROM t JOIN t2 ON t2.n / 2 = t.n JOIN labels l ON l.id = t.id"]  # no cross product
    engine = check(specs, tmp_path, pushed_sql + local_sql + [f"SELECT lower(t.s) AS low, l.label {join}"])
    assert all(len(engine.plan(sql).subplans) == 1 for sql in pushed_sql)
    assert all(engine.plan(sql).subplans == [] for sql in local_sql)


def test_mysql_case_insensitive_collation(tmp_path):
    admin = pymysql.connect(host="127.0.0.1", user="root", autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute("DROP DATABASE IF EXISTS fd_sem")
        cursor.execute("CREATE DATABASE fd_sem")
        cursor.execute("CREATE TABLE fd_sem.t (id INT, name VARCHAR(10))")
        cursor.execute("INSERT INTO fd_sem.t VALUES (1, 'ABC'), (2, 'abc'), (3, 'abc '), (4, 'B')")
    try:
        check([DatasetSpec("t", "mysql:fd_sem.t", {"mysql_host": "127.0.0.1", "mysql_user": "root"})], tmp_path, [
            "SELECT id FROM t WHERE name <> 'abc'", "SELECT id FROM t WHERE name < 'a'",
            "SELECT id FROM t WHERE name = 'abc'", "SELECT id FROM t WHERE name IN ('ABC', 'x')",
            "SELECT id FROM t WHERE NOT (name = 'abc')"])
    finally:
        with admin.cursor() as cursor:
            cursor.execute("DROP DATABASE IF EXISTS fd_sem")
        admin.close()


def test_sqlite_untyped_nocase_and_text_dates(tmp_path):
    with sqlite3.connect(tmp_path / "sem.sqlite") as con:
        con.execute("CREATE TABLE t (id INTEGER, u, nc TEXT COLLATE NOCASE, day DATE)")
        con.executemany("INSERT INTO t VALUES (?, ?, ?, ?)",
                        [(1, 5, "ABC", "2024-01-01 10:00:00"), (2, "x", "abc", "2024-01-02"), (3, None, "B", None)])
    check([DatasetSpec("t", "sqlite:t", {"sqlite_file": "sem.sqlite"})], tmp_path, [
        "SELECT id FROM t WHERE u = '5'", "SELECT id FROM t WHERE nc <> 'abc'", "SELECT id FROM t WHERE nc < 'a'",
        "SELECT id FROM t WHERE nc = 'abc'", "SELECT id FROM t WHERE day = DATE '2024-01-01'",
        "SELECT id FROM t WHERE day <= DATE '2024-01-01'"])


def test_sqlite_booleans_holding_other_values(tmp_path):
    """SQLite keeps whatever it is given in a BOOLEAN column, and reads text as 0 in a WHERE:
    a condition on one is decided on the values flightdeck shows, not at the source."""
    with sqlite3.connect(tmp_path / "flags.sqlite") as con:
        con.execute("CREATE TABLE t (id INTEGER, b BOOLEAN)")
        con.executemany("INSERT INTO t VALUES (?, ?)",
                        [(1, 0), (2, 1), (3, 2), (4, "yes"), (5, None), (6, "false"), (7, "true")])
    engine = check([DatasetSpec("t", "sqlite:t", {"sqlite_file": "flags.sqlite"})], tmp_path, [
        "SELECT id FROM t WHERE b", "SELECT id FROM t WHERE NOT b", "SELECT id FROM t WHERE b = false",
        "SELECT id FROM t WHERE b IN (true)", "SELECT id FROM t WHERE b OR id > 100",
        "SELECT b, count(*) AS n FROM t GROUP BY b", "SELECT count(*) AS n FROM t WHERE b IS NULL"])
    shown = engine.query("SELECT id, b FROM t ORDER BY id").read_all().to_pylist()
    assert [row["b"] for row in shown] == [False, True, True, True, None, False, True]


NAN_QUERIES = ["SELECT id FROM {t} WHERE x > 0.5", "SELECT id FROM {t} WHERE x >= 1",
               "SELECT id FROM {t} WHERE x = 'NaN'::double", "SELECT id FROM {t} WHERE NOT (x < 0.5)",
               "SELECT id FROM {t} WHERE x IN ('NaN'::double, 7.0)", "SELECT id FROM {t} WHERE x <> 'NaN'::double",
               "SELECT id FROM {t} WHERE x <= 'NaN'::double", "SELECT id FROM {t} WHERE x < 'NaN'::double"]


def test_files_read_through_pyarrow_keep_nan_where_the_planner_does(tmp_path):
    """To DataFusion NaN is above every number and equal to itself; to pyarrow's comparisons it is
    neither. A filter applied by pyarrow (a JSON file's scan, a Parquet file read for a key that
    sees some of its columns) must keep the rows the planner keeps."""
    rows = [(1, 1.0), (2, float("nan")), (3, 0.0), (4, None), (5, float("-inf"))]
    (tmp_path / "m.ndjson").write_text("\n".join(
        '{"id": %d, "x": %s}' % (i, "null" if x is None else "NaN" if x != x else repr(x).replace("inf", "Infinity"))
        for i, x in rows))
    pq.write_table(pa.table({"id": [i for i, _ in rows], "x": [x for _, x in rows]}), tmp_path / "m.parquet")
    check([DatasetSpec("j", "file:m.ndjson", {})], tmp_path, [sql.format(t="j") for sql in NAN_QUERIES])
    for sql in NAN_QUERIES:  # the planner's filters as pyarrow applies them to a scan's rows
        table = pq.read_table(tmp_path / "m.parquet")
        truth = datafusion.SessionContext()
        truth.register_record_batches("m", [table.to_batches()])
        expected = truth.sql(sql.format(t="m")).to_arrow_table().column("id").to_pylist()
        plan = truth.sql(sql.format(t="m")).optimized_logical_plan()
        [condition] = [planner_filter(node.to_variant().predicate()) for node in _walk(plan)
                       if type(node.to_variant()).__name__ == "Filter"]
        assert condition is not None and table.filter(to_arrow(condition)).column("id").to_pylist() == expected, sql


def _walk(plan):
    yield plan
    for child in plan.inputs():
        yield from _walk(child)


VIEW_QUERIES = ["SELECT id FROM {t} WHERE name = 'abc'", "SELECT id FROM {t} WHERE name < 'a'",
                "SELECT id FROM {t} WHERE name > 'B'", "SELECT name FROM {t} ORDER BY name"]


def test_sqlite_quoted_collations_and_views_of_nocase_columns(tmp_path):
    """A view's column takes the collation of the column it selects, and a collation's name may
    be quoted: neither is written where a look at the table's own SQL finds it."""
    rows = [(1, "abc"), (2, "ABC"), (3, "b")]
    with sqlite3.connect(tmp_path / "views.sqlite") as con:
        con.execute('CREATE TABLE quoted (id INTEGER, name TEXT COLLATE "NOCASE")')
        con.execute("CREATE TABLE base (id INTEGER, name TEXT COLLATE NOCASE)")
        con.execute("CREATE VIEW v AS SELECT id, name FROM base")
        con.executemany("INSERT INTO quoted VALUES (?, ?)", rows)
        con.executemany("INSERT INTO base VALUES (?, ?)", rows)
    for table in ("quoted", "v"):
        check([DatasetSpec(table, f"sqlite:{table}", {"sqlite_file": "views.sqlite"})], tmp_path,
              [sql.format(t=table) for sql in VIEW_QUERIES])


def test_duckdb_views_of_nocase_columns(tmp_path):
    with duckdb.connect(str(tmp_path / "views.duckdb")) as con:
        con.execute("CREATE TABLE base (id INTEGER, name VARCHAR COLLATE NOCASE)")
        con.execute("INSERT INTO base VALUES (1, 'abc'), (2, 'ABC'), (3, 'b')")
        con.execute("CREATE VIEW v AS SELECT id, name FROM base")
    check([DatasetSpec("v", "duckdb:v", {"duckdb_open": "views.duckdb"})], tmp_path,
          [sql.format(t="v") for sql in VIEW_QUERIES])


def test_duckdb_like_escape_and_nocase(tmp_path):
    with duckdb.connect(str(tmp_path / "sem.duckdb")) as con:
        con.execute("CREATE TABLE t (id INTEGER, s VARCHAR, nc VARCHAR COLLATE NOCASE)")
        con.execute("INSERT INTO t VALUES (1, 'a\\_b', 'ABC'), (2, 'axb', 'abc'), (3, 'a_b', 'B')")
    engine = check([DatasetSpec("t", "duckdb:t", {"duckdb_open": "sem.duckdb"})], tmp_path, [
        "SELECT id FROM t WHERE s LIKE 'a\\_b'", "SELECT id FROM t WHERE s LIKE 'a_b'",
        "SELECT id FROM t WHERE nc <> 'abc'", "SELECT id FROM t WHERE nc < 'a'", "SELECT nc FROM t ORDER BY nc"])
    assert engine.plan("SELECT id FROM t WHERE s LIKE 'a_b'").remote is None  # NOCASE in the table


def test_sqlite_whole_query_pushdown(tmp_path):
    with sqlite3.connect(tmp_path / "whole.sqlite") as con:
        con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer INTEGER, status TEXT, qty INTEGER, "
                    "price DECIMAL(10,2), placed DATE)")
        con.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, tier TEXT)")
        con.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
                        [(i, i % 7, ("open", "closed", "Open")[i % 3], i % 5 if i % 11 else None, round(i * 0.1, 2),
                          f"2026-11-{i % 28 + 1:02d}") for i in range(1, 200)])
        con.executemany("INSERT INTO customers VALUES (?, ?, ?)",
                        [(i, f"c{i}", "pro" if i % 2 else None) for i in range(7)])
    specs = [DatasetSpec("orders", "sqlite:orders", {"sqlite_file": "whole.sqlite"}),
             DatasetSpec("customers", "sqlite:customers", {"sqlite_file": "whole.sqlite"})]
    pushed_sql = [
        "SELECT status, count(*) AS n, sum(qty) AS q, min(qty) AS lo, max(status) AS top FROM orders "
        "GROUP BY status ORDER BY status",
        "SELECT c.tier, count(*) AS n FROM orders o JOIN customers c ON c.id = o.customer "
        "WHERE o.qty >= 2 GROUP BY c.tier ORDER BY c.tier DESC",
        "SELECT id, qty FROM orders ORDER BY qty, id LIMIT 5",
        "SELECT DISTINCT status FROM orders ORDER BY status",
        "SELECT avg(qty) AS a FROM orders",
    ]
    local_sql = ["SELECT id FROM orders WHERE status LIKE 'o%'", "SELECT sum(price) AS p FROM orders",
                 "SELECT count(*) AS n FROM orders WHERE placed >= DATE '2026-11-20'"]
    engine = check(specs, tmp_path, pushed_sql + local_sql)
    assert all(engine.plan(sql).remote is not None for sql in pushed_sql)
    assert all(engine.plan(sql).remote is None for sql in local_sql)


COPY_CASES = [  # (statement, parameters, whether it runs whole in DuckDB; None: either way)
    # A CASE's type is its branches' common type (the plan before coercion gives the first's)
    ("SELECT id, CASE WHEN b THEN 0 ELSE d END AS c FROM t", [], True),
    ("SELECT id, CASE WHEN b THEN 1 ELSE 2.5 END AS c FROM t", [], True),
    ("SELECT id, CASE WHEN b THEN i32 ELSE 1.5 END AS c FROM t", [], True),
    ("SELECT id, CASE i32 WHEN 3 THEN 1 ELSE 0.25 END AS c FROM t", [], True),
    ("SELECT g, sum(CASE WHEN b THEN 0 ELSE d END) AS s FROM t GROUP BY g", [], True),
    # DataFusion folds case as Unicode does (ſ is s, σ and ς are Σ); DuckDB lowers both sides
    ("SELECT id FROM t WHERE s ILIKE 's'", [], False),
    ("SELECT id FROM t WHERE s NOT ILIKE 'σ'", [], False),
    # Text bound for a timestamp: DataFusion applies its offset and keeps nanoseconds
    ("SELECT id FROM t WHERE ts > $1", ["2021-03-14T02:00:00+05:00"], False),
    ("SELECT id FROM t WHERE ts < $1", ["1960-01-01 00:00:00.1234567"], False),
    ("SELECT id FROM t WHERE s = $1", ["S"], True),
    ("SELECT id, ts - ts AS z FROM t", [], False),
    # Numbers beyond a Float64's 15 digits, compared: DataFusion compares Float64s
    ("SELECT id FROM t WHERE big = 9223372036854775807.0", [], None),  # as the plan writes it, then
    ("SELECT id FROM t WHERE big > 9223372036854775806.5", [], None),
    ("SELECT id FROM t WHERE d = 2.5000000000000000001", [], None),
    ("SELECT id FROM t WHERE d > 2.5 AND i32 > 0.5", [], True),
    # A semi join's side gets a constant filter, which DataFusion hands over as a bare scalar
    ("SELECT count(*) AS c FROM t WHERE EXISTS (SELECT 1 FROM u WHERE k = 11)", [], True),
    ("SELECT id, row_number() OVER (ORDER BY id) AS r FROM t WHERE EXISTS (SELECT 1 FROM u WHERE k = 11)", [], False),
    ("SELECT count(*) AS c FROM t WHERE NOT EXISTS (SELECT 1 FROM u WHERE k = 11)", [], True),
]


def test_duckdb_copies_answer_as_datafusion_does(tmp_path):
    """Queries over DuckDB copies, whole in DuckDB or not, against DataFusion over the same
    rows: the same values and the same types."""
    from accel.duckdb_store import AcceleratedDuckDB
    from conftest import serving

    t = pa.table({"id": pa.array(range(1, 11), pa.int64()), "b": [i % 2 == 0 for i in range(10)],
                  "i32": pa.array(range(1, 11), pa.int32()),
                  "d": pa.array([decimal.Decimal(x) for x in ["-2.55", "99999.99", "2.50", "2.50", "0.10", "3", "2.51",
                                                                 "-1", "0", "7.77"]], pa.decimal128(12, 2)),
                  "big": pa.array([9223372036854775807, 1, 9223372036854775806] + list(range(7)), pa.int64()),
                  "ts": pa.array([dt.datetime(2021, 3, 14, 1, 30), dt.datetime(2021, 3, 14, 3),
                                  dt.datetime(1960, 1, 1, 0, 0, 0, 123456)] + [dt.datetime(2020, 1, i) for i in range(1, 8)],
                                 pa.timestamp("us")),
                  "s": ["ſ", "s", "S", "İ", "i", "σ", "ς", "Σ", "x", None], "g": [i % 3 for i in range(10)]})
    u = pa.table({"k": pa.array([11, 12], pa.int64())})
    truth = datafusion.SessionContext()
    for name, table in {"t": t, "u": u}.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
        truth.register_record_batches(name, [table.to_batches()])
    copies = [{"from": f"file:{name}.parquet", "name": name, "acceleration": {"engine": "duckdb", "mode": "memory"}}
              for name in ("t", "u")]
    with serving({"runtime": {"data_dir": str(tmp_path / "data")}, "datasets": copies}, tmp_path) as running:
        assert all(r.loaded.wait(60) for r in running.accelerator.refreshers.values())
        for sql, parameters, whole in COPY_CASES:
            values = {str(n): pa.scalar(v) for n, v in enumerate(parameters, 1)}
            expected = truth.sql(sql, param_values=values or None).to_arrow_table()
            planned = running.engine.plan(sql, parameters or None)
            got = running.engine.execute(planned).read_all()
            assert got.schema.types == expected.schema.types, sql
            assert _rows(got) == _rows(expected), sql
            if whole is not None:
                assert isinstance(getattr(planned.remote, "connector", None), AcceleratedDuckDB) == whole, sql
        explained = running.engine.query("EXPLAIN SELECT id FROM t WHERE ts > $1", ["2021-03-14T02:00:00+05:00"])
        assert "whole query sent" not in str(explained.read_all().to_pylist())  # as it runs
