"""Query routing over accelerated copies, on TPC-H SF 0.01 loaded in the real PostgreSQL:
all tables accelerated in DuckDB (memory and file mixed) -> the whole query runs in DuckDB and
agrees with DataFusion over the same copies; some tables accelerated -> local copies join
federated tables, and the accelerated sources are not asked again."""
from __future__ import annotations

import os

import adbc_driver_postgresql.dbapi as adbc_postgres
import duckdb
import pytest

from accel.duckdb_store import AcceleratedDuckDB
from federation.engine import EngineSettings, QueryEngine

from conftest import serving
from test_tpch_differential import PLACEMENT, _assert_same, _generate, _load_postgres
from tpch_queries import QUERIES

PG = {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"}
SCHEMA = "fd_accel_tpch"
PARTLY_ACCELERATED = {"lineitem", "orders", "nation"}


@pytest.fixture(scope="module")
def tpch_in_postgres(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tpch_accel")
    try:
        tables = _generate(folder)
        _load_postgres(tables, SCHEMA)
    except Exception as error:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"needs PostgreSQL: {error}")
    reference = duckdb.connect()
    for name, table in tables.items():
        reference.register(name, table)
    yield folder, reference
    with adbc_postgres.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn, \
            conn.cursor() as cursor:
        cursor.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")


def _config(folder, accelerated: set[str]) -> dict:
    datasets = []
    for index, name in enumerate(PLACEMENT):
        dataset = {"from": f"postgres:{SCHEMA}.{name}", "name": name, "params": PG}
        if name in accelerated:  # alternate memory and file copies: still one DuckDB
            dataset["acceleration"] = {"engine": "duckdb", "mode": "file" if index % 2 else "memory"}
            # Other params, so accelerated sources get their own connector and counters.
            dataset["params"] = {**PG, "connect_timeout": 9}
        datasets.append(dataset)
    return {"runtime": {"data_dir": str(folder / f"data{len(accelerated)}")}, "datasets": datasets}


def _wait_loaded(runtime) -> None:
    for refresher in runtime.accelerator.refreshers.values():
        assert refresher.loaded.wait(60), refresher.status


def test_all_accelerated_in_duckdb_runs_whole_in_duckdb_and_agrees(tpch_in_postgres):
    folder, reference = tpch_in_postgres
    with serving(_config(folder, set(PLACEMENT)), folder) as runtime:
        _wait_loaded(runtime)
        in_datafusion = QueryEngine(runtime.catalog, EngineSettings(whole_query_pushdown=False))
        sent_to_postgres = _postgres_stats(runtime)
        pushed = []
        for number, sql in sorted(QUERIES.items()):
            planned = runtime.engine.plan(sql)
            if planned.remote is not None:
                assert isinstance(planned.remote.connector, AcceleratedDuckDB)
                pushed.append(number)
            whole = runtime.engine.execute(planned).read_all()
            in_df = in_datafusion.query(sql).read_all()
            assert whole.schema == in_df.schema, f"Q{number}: DuckDB's result types are not DataFusion's"
            _assert_same(whole, in_df, f"Q{number}: DuckDB vs DataFusion")
            _assert_same(whole, reference.sql(sql).to_arrow_table(), f"Q{number}: vs reference")
        assert _postgres_stats(runtime) == sent_to_postgres  # no query reached PostgreSQL
    print(f"\nrun whole inside DuckDB: {len(pushed)}/22 {pushed}")
    assert pushed == sorted(QUERIES)  # translated from the statement: subqueries and decimals too


def test_local_copies_join_federated_tables(tpch_in_postgres):
    folder, reference = tpch_in_postgres
    with serving(_config(folder, PARTLY_ACCELERATED), folder) as runtime:
        _wait_loaded(runtime)

        def accelerated_source_queries() -> int:
            rows = [row for row in _postgres_stats(runtime) if "public.lineitem" in row["datasets"]]
            assert rows[0]["datasets"] == "public.lineitem, public.nation, public.orders"
            return rows[0]["queries"]

        before = accelerated_source_queries()
        for number in (3, 5, 10, 12):
            sql = QUERIES[number]
            _assert_same(runtime.engine.query(sql).read_all(), reference.sql(sql).to_arrow_table(), f"Q{number}")
        assert accelerated_source_queries() == before


def _postgres_stats(runtime) -> list[dict]:
    return [row for row in runtime.catalog.source_stats() if row["kind"] == "postgres"]
