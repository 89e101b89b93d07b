"""Plans kept for reuse: a prepared statement is planned once and bound on every call, through
the real ADBC client, against PostgreSQL (federated) and a DuckDB copy of the same table.
Cached plans must answer exactly what a fresh plan answers: new data after a refresh, a changed
dataset, every parameter type, and concurrent bindings that never mix."""
from __future__ import annotations

import datetime as dt
import re
import threading
from collections import Counter

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from datafusion import DataFrame

from conftest import postgres, require_postgres, run_clients, serving
from federation.catalog import CATALOG_NAME
from federation.engine import EngineSettings, QueryEngine
from flightdeck.auth import Principal

PG = {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"}
SCHEMA = "fd_plan_cache"
FILLER = range(100, 1300)  # ids of plain rows, besides the special ones below
SPECIAL = [  # id, i, f, t, b, d, ts
    (1, 7, 1.5, "it's", True, dt.date(2024, 1, 2), dt.datetime(2024, 1, 2, 3, 4, 5)),
    (2, 7, -0.25, "back\\slash' OR 1=1 --", False, dt.date(1999, 12, 31), dt.datetime(1999, 12, 31, 23, 59, 59)),
    (3, None, None, None, None, None, None),
    (4, -3, 1.5, "''", True, dt.date(2024, 1, 2), dt.datetime(2024, 1, 2, 3, 4, 5)),
    (5, 0, 0.0, "", False, dt.date(1970, 1, 1), dt.datetime(1970, 1, 1)),
    (6, 2_000_000_000, 1e300, "ünï \"quoted\" $1 ?", None, dt.date(2100, 6, 30), dt.datetime(2100, 6, 30, 12)),
]
COLUMNS = ["i", "f", "t", "b", "d", "ts"]


@pytest.fixture(scope="module")
def table():
    require_postgres()
    postgres(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    postgres(f"CREATE SCHEMA {SCHEMA}")
    postgres(f"CREATE TABLE {SCHEMA}.typed (id bigint PRIMARY KEY, i integer, f double precision, t text, "
           f"b boolean, d date, ts timestamp)")
    for row in SPECIAL:
        postgres(f"INSERT INTO {SCHEMA}.typed VALUES ($1, $2, $3, $4, $5, $6, $7)", list(row))
    postgres(f"INSERT INTO {SCHEMA}.typed SELECT g, g % 10, g * 0.5, 'row ' || g, g % 2 = 0, "
           f"DATE '2020-01-01' + g, TIMESTAMP '2020-01-01' + g * interval '1 hour' "
           f"FROM generate_series({FILLER.start}, {FILLER.stop - 1}) g")
    yield
    postgres(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def _config(tmp_path) -> dict:
    source = f"postgres:{SCHEMA}.typed"
    return {"runtime": {"data_dir": str(tmp_path / "data")},
            "datasets": [{"from": source, "name": "typed", "params": PG},
                         {"from": source, "name": "typed_copy", "params": {**PG, "connect_timeout": 9},
                          "acceleration": {"engine": "duckdb", "mode": "memory"}}]}


@pytest.fixture(scope="module")
def runtime(table, tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan_cache")
    with serving(_config(folder), folder) as running:
        for refresher in running.accelerator.refreshers.values():
            assert refresher.loaded.wait(60), refresher.status
        yield running


def _stats(runtime) -> dict[str, int]:
    return runtime.engine.plans.snapshot()


def _metric(runtime, name: str) -> float:
    text = runtime.service.metrics()[0].decode()
    return float(re.search(rf"^{name} (\S+)$", text, re.MULTILINE).group(1))


@pytest.mark.parametrize("dataset", ["typed", "typed_copy"])
def test_a_prepared_statement_is_planned_once_for_a_thousand_bindings(runtime, dataset):
    sql = f"SELECT id, t FROM {dataset} WHERE id = ?"
    before = _stats(runtime)
    planned_metric = _metric(runtime, "flightdeck_statements_planned_total")
    with flightsql.connect(runtime.flight_url, autocommit=True) as connection, connection.cursor() as cursor:
        for key in range(FILLER.start, FILLER.start + 1000):
            cursor.execute(sql, [key])
            assert cursor.fetchall() == [(key, f"row {key}")]
    after = _stats(runtime)
    assert after["statements_planned"] - before["statements_planned"] == 1  # at CreatePreparedStatement
    assert after["bindings_planned"] - before["bindings_planned"] == 1     # the first int64 binding
    assert after["hits"] - before["hits"] >= 999
    assert _metric(runtime, "flightdeck_statements_planned_total") == planned_metric + 1
    # The statement went whole to the backend every time, values bound by its driver.
    assert runtime.engine.plan(sql, [5]).remote is not None


def test_a_repeated_ad_hoc_statement_is_planned_once(runtime):
    sql = "SELECT count(*) AS n FROM typed_copy WHERE i = 7"
    before = _stats(runtime)
    with flightsql.connect(runtime.flight_url, autocommit=True) as connection:
        for _ in range(20):
            with connection.cursor() as cursor:  # a new cursor: a new prepared statement each time
                cursor.execute(sql)
                assert cursor.fetchall() == [(2 + sum(1 for k in FILLER if k % 10 == 7),)]
    assert _stats(runtime)["statements_planned"] - before["statements_planned"] == 1


@pytest.mark.parametrize("sql", [
    "SELECT t.i, count(*) AS n FROM typed t JOIN typed_copy c ON c.id = t.id WHERE t.i = 7 GROUP BY t.i",
    "SELECT i, count(*) AS n FROM typed WHERE t LIKE 'row 1%' GROUP BY i ORDER BY i LIMIT 3",
    "SELECT id FROM typed_copy WHERE i = 7 ORDER BY id LIMIT 5",
])
def test_each_plan_is_optimized_once(runtime, monkeypatch, sql):
    """The result's schema, the pushdown decisions, the scans read and the audit each asked
    DataFusion for the optimized plan, which optimized afresh each time (7 times for a join)."""
    optimized = []
    optimize = DataFrame.optimized_logical_plan
    monkeypatch.setattr(DataFrame, "optimized_logical_plan", lambda frame: optimized.append(frame) or optimize(frame))
    expected = runtime.engine.query(sql).read_all()
    fresh = runtime.service.query(Principal("anonymous"), sql + " ").read_all()  # not a cached plan
    assert fresh.to_pylist() == expected.to_pylist() and fresh.num_rows > 0
    times = Counter(id(frame) for frame in optimized)  # the frames are kept alive: ids are not reused
    assert times and max(times.values()) == 1, sorted(times.values())


def _expected(column: str, value) -> list[int]:
    """Ids whose ``column`` equals ``value`` (SQL equality: NULL matches nothing)."""
    index = COLUMNS.index(column) + 1
    special = [row[0] for row in SPECIAL if value is not None and row[index] is not None
               and row[index] == value and type(row[index]) is type(value)]
    return sorted(special + [k for k in FILLER if value is not None and _filler(k, column) == value])


def _filler(key: int, column: str):
    return {"i": key % 10, "f": key * 0.5, "t": f"row {key}", "b": key % 2 == 0,
            "d": dt.date(2020, 1, 1) + dt.timedelta(days=key),
            "ts": dt.datetime(2020, 1, 1) + dt.timedelta(hours=key)}[column]


@pytest.mark.parametrize("dataset", ["typed", "typed_copy"])
@pytest.mark.parametrize("column", COLUMNS)
def test_every_type_quotes_and_nulls_bind_to_the_cached_plan(runtime, dataset, column):
    index = COLUMNS.index(column) + 1
    values = [row[index] for row in SPECIAL] + [_filler(FILLER.start + 3, column)]
    sql = f"SELECT id FROM {dataset} WHERE {column} = ? ORDER BY id"
    with flightsql.connect(runtime.flight_url, autocommit=True) as connection, connection.cursor() as cursor:
        for _ in range(2):  # the second round binds every value to plans kept by the first
            for value in values:
                cursor.execute(sql, [value])
                assert [r[0] for r in cursor.fetchall()] == _expected(column, value), (column, value)


def test_values_echoed_through_a_cached_local_plan_keep_their_type(runtime):
    sql = "SELECT ? AS v"  # no table: DataFusion runs it, each call binding into the kept plan
    values = [r[index] for r in SPECIAL for index in range(1, 7)] + [b"\x00bytes'", 2**62]
    with flightsql.connect(runtime.flight_url, autocommit=True) as connection, connection.cursor() as cursor:
        for _ in range(2):
            for value in values:
                cursor.execute(sql, [value])
                assert cursor.fetchall() == [(value,)]


def test_cached_plans_see_a_refresh_and_a_routing_change(runtime):
    sql = "SELECT id, t FROM typed_copy WHERE id = ?"
    dataset = runtime.catalog.datasets["public.typed_copy"]
    copy, copy_table = dataset.connector, dataset.table
    # A statement without parameters is prepared once by ADBC and its plan kept with its handle:
    # it went on reading wherever the dataset was routed when it was prepared.
    fixed_sql = "SELECT count(*) AS n FROM typed_copy WHERE id = 9001"
    with flightsql.connect(runtime.flight_url, autocommit=True) as connection, connection.cursor() as cursor, \
            connection.cursor() as fixed:
        fixed.adbc_prepare(fixed_sql)

        def both() -> tuple[list, int]:
            cursor.execute(sql, [9001])
            fixed.execute(fixed_sql)
            return cursor.fetchall(), fixed.fetchone()[0]
        assert both() == ([], 0)
        postgres(f"INSERT INTO {SCHEMA}.typed VALUES (9001, 1, 1, 'fresh', true, NULL, NULL)")
        try:
            assert both() == ([], 0)  # the copy, until it is refreshed
            # Routed to its source (as before a first load), the dataset's kept plans go with it.
            runtime.catalog.route("public.typed_copy", dataset.source_connector, dataset.spec.location)
            assert both() == ([(9001, "fresh")], 1)
            runtime.catalog.route("public.typed_copy", copy, copy_table)
            assert both() == ([], 0)
            runtime.refresh("typed_copy")
            assert both() == ([(9001, "fresh")], 1)
        finally:
            runtime.catalog.route("public.typed_copy", copy, copy_table)
            postgres(f"DELETE FROM {SCHEMA}.typed WHERE id = 9001")
            runtime.refresh("typed_copy")


def test_cached_plans_see_a_dataset_schema_change(tmp_path):
    """A dataset registered anew with other columns: the catalog's change (which any change of
    routing, availability or schema raises) drops the plans made over the old table."""
    first = pa.table({"id": [1, 2], "name": ["a", "b"]})
    second = pa.table({"id": [1, 2], "name": ["a", "b"], "added": [10.5, 20.5]})
    with serving({"datasets": []}, tmp_path) as running:
        engine = running.engine
        name = f"{CATALOG_NAME}.public.changing"
        engine.ctx.register_dataset(name, pads.dataset(first))
        with flightsql.connect(running.flight_url, autocommit=True) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT * FROM changing WHERE id = ?", [2])
            assert cursor.fetchall() == [(2, "b")]
            engine.ctx.deregister_table(name)
            engine.ctx.register_dataset(name, pads.dataset(second))
            running.catalog.changed()
            cursor.execute("SELECT * FROM changing WHERE id = ?", [2])
            assert cursor.fetchall() == [(2, "b", 20.5)]
            assert [d[0] for d in cursor.description] == ["id", "name", "added"]


def test_concurrent_bindings_of_one_statement_never_mix(runtime):
    statements = ["SELECT id, t FROM typed_copy WHERE id = ?", "SELECT id, t FROM typed WHERE id = ?",
                  "SELECT CAST(? AS BIGINT) AS id, 'row ' || CAST(? AS VARCHAR) AS t"]
    failures: list[str] = []

    def client(number: int) -> None:
        try:
            with flightsql.connect(runtime.flight_url, autocommit=True) as connection:
                cursors = [connection.cursor() for _ in statements]
                for step in range(60):
                    key = FILLER.start + (number * 97 + step * 13) % len(FILLER)
                    for sql, cursor in zip(statements, cursors):
                        cursor.execute(sql, [key] * sql.count("?"))
                        rows = cursor.fetchall()
                        if rows != [(key, f"row {key}")]:
                            failures.append(f"{sql} with {key}: {rows}")
                for cursor in cursors:
                    cursor.close()
        except Exception as error:
            failures.append(f"client {number}: {error}")

    run_clients(client, 8)
    assert failures == []


def test_plans_that_hold_for_one_execution_are_not_kept(runtime):
    engine = runtime.engine
    for sql in ["SELECT now() AS at", "EXPLAIN SELECT id FROM typed WHERE id = 1",
                "SELECT current_timestamp AS at"]:
        before = _stats(runtime)["statements_planned"]
        engine.plan(sql)
        engine.plan(sql)
        assert _stats(runtime)["statements_planned"] - before == 2, sql
    first = engine.query("SELECT now() AS at").read_all().column(0)[0].as_py()
    threading.Event().wait(0.01)
    assert engine.query("SELECT now() AS at").read_all().column(0)[0].as_py() > first


def test_the_cache_is_bounded_and_per_session(runtime):
    small = QueryEngine(runtime.catalog, EngineSettings(plan_cache_entries=3))
    for n in range(10):
        assert small.query(f"SELECT {n} AS n").read_all().column(0)[0].as_py() == n
    stats = small.plans.snapshot()
    assert stats["entries"] == 3 and stats["evictions"] == 7
    small.plan("SELECT 1 AS n")  # planned by this engine's session, not found in the other's
    assert small.session_id != runtime.engine.session_id
    none = QueryEngine(runtime.catalog, EngineSettings(plan_cache_entries=0))
    none.plan("SELECT 1 AS n")
    none.plan("SELECT 1 AS n")
    assert none.plans.snapshot()["statements_planned"] == 2


def test_the_cache_is_bounded_by_what_its_plans_weigh(runtime):
    """A 16 KB statement whose CTEs read each other twice over plans to about 20 MB: 512 such
    plans kept would hold 10 GB. Plans are weighed by their text's length, and kept within a total."""
    doubling = ["c0 AS (SELECT {n} AS n, " + ", ".join(f"{i} AS c{i}" for i in range(100)) + ")"]
    doubling += [f"c{i} AS (SELECT * FROM c{i - 1} UNION ALL SELECT * FROM c{i - 1})" for i in range(1, 5)]
    heavy = "WITH " + ", ".join(doubling) + " SELECT count(*) AS rows FROM c4"
    engine = QueryEngine(runtime.catalog)
    weight = engine.plan(heavy.format(n=0)).plan_characters()
    assert weight > 100 * engine.plan("SELECT 1 AS n").plan_characters()
    engine.plans.max_weight = int(2.5 * weight)
    for n in range(1, 6):
        assert engine.query(heavy.format(n=n)).read_all().to_pylist() == [{"rows": 16}]
    stats = engine.plans.snapshot()
    assert stats["entries"] <= 3 and stats["evictions"] >= 3
    engine.plans.max_weight = weight // 2
    engine.plan(heavy.format(n=9))
    assert engine.plans.get((engine.session_id, heavy.format(n=9), ()), engine.generation) is None  # too heavy to keep
