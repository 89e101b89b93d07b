"""spark: a real Spark standalone cluster on loopback (master, two workers, Spark Connect server)
with TPC-H SF 0.01 as Parquet tables the workers read. Queries go through flightdeck; Spark's
own REST API shows the tasks ran on the workers' executors."""
from __future__ import annotations

import datetime as dt
import decimal
import os
import time

import duckdb
import pytest

if os.environ.get("CI") != "true":  # under CI a missing extra fails at the import below
    pytest.importorskip("pyspark", reason="the spark extra is not installed (make test installs it)")

import pyarrow as pa
from pyspark.sql import SparkSession

from federation.catalog import Catalog, DatasetSpec
from federation.connectors.base import ConnectorError
from federation.connectors.spark import SparkConnector
from federation.engine import EngineSettings, QueryEngine

from conftest import postgres, require_postgres
from test_tpch_differential import PLACEMENT, _assert_same
from tpch_queries import QUERIES




@pytest.fixture(scope="module")
def spark_engine(spark_cluster, tmp_path_factory):
    cluster, _ = spark_cluster
    params = {"spark_remote": cluster.remote, "query_timeout": 120}
    specs = [DatasetSpec(name, f"spark:tpch.{name}", params) for name in PLACEMENT]
    specs.append(DatasetSpec("kinds", "spark:kinds.sample", params))
    engine = QueryEngine(Catalog(specs, tmp_path_factory.mktemp("spark-deck")))
    yield engine
    engine.catalog.close()


def _worker_tasks(cluster) -> int:
    return sum(e["totalTasks"] for e in cluster.application("/executors") if e["id"] != "driver")


def test_discovery_from_the_spark_catalog(spark_engine):
    dataset = spark_engine.catalog.datasets["public.lineitem"]
    assert dataset.state == "ready", dataset.error
    offered = dataset.connector.tables()
    assert {f"tpch.{name}" for name in PLACEMENT} <= set(offered) and "kinds.sample" in offered
    assert dataset.arrow_schema.field("l_extendedprice").type == pa.decimal128(15, 2)
    assert dataset.arrow_schema.field("l_shipdate").type == pa.date32()


def test_types_map_to_arrow_and_values_come_back(spark_engine):
    dataset = spark_engine.catalog.datasets["public.kinds"]
    schema = dataset.arrow_schema
    assert [(f.name, f.type) for f in schema] == [
        ("id", pa.int32()), ("small", pa.int8()), ("big", pa.int64()), ("ratio", pa.float64()),
        ("amount", pa.decimal128(10, 2)), ("region", pa.string()), ("day", pa.date32()),
        ("seen", pa.timestamp("us")), ("flag", pa.bool_()), ("tags", pa.list_(pa.int32()))]
    assert dataset.connector.unsupported_columns("kinds.sample") == ["attrs (map<string,string>)"]
    rows = spark_engine.query("SELECT * FROM kinds ORDER BY id").read_all().to_pylist()
    assert rows[0] == {"id": 1, "small": 7, "big": 100, "ratio": 1.5, "amount": decimal.Decimal("12.34"),
                       "region": "eu", "day": dt.date(2026, 11, 1), "seen": dt.datetime(2026, 11, 1, 10),
                       "flag": True, "tags": [1, 2]}
    assert rows[2]["small"] is None and rows[2]["big"] == 9_000_000_000 and rows[2]["tags"] is None


def test_filters_projection_and_limit_are_pushed(spark_cluster, tmp_path):
    cluster, _ = spark_cluster
    params = {"spark_remote": cluster.remote}
    engine = QueryEngine(Catalog([DatasetSpec("kinds", "spark:kinds.sample", params)], tmp_path),
                         EngineSettings(whole_query_pushdown=False))
    try:
        result = engine.query("SELECT id, region FROM kinds WHERE region = 'eu' OR amount < 1 ORDER BY id")
        assert result.read_all().to_pylist() == [{"id": 1, "region": "eu"}, {"id": 3, "region": None}]
        connector = engine.catalog.datasets["public.kinds"].connector
        sent = connector.stats.last_request
        assert "`region` = ?" in sent and "`amount` < 1.00BD" in sent and "`ratio`" not in sent
    finally:
        engine.catalog.close()
    # A LIMIT goes down with the statement (per-table scans get only projection and filters).
    whole = QueryEngine(Catalog([DatasetSpec("kinds", "spark:kinds.sample", params)], tmp_path))
    try:
        assert whole.query("SELECT id FROM kinds WHERE big > 50 LIMIT 1").read_all().num_rows == 1
        sent = whole.catalog.datasets["public.kinds"].connector.stats.last_request
        assert "`big` > 50" in sent and "LIMIT 1" in sent
    finally:
        whole.catalog.close()


def test_whole_query_runs_on_the_workers(spark_cluster, spark_engine):
    cluster, tables = spark_cluster
    sql = ("SELECT l_returnflag, count(*) AS n, sum(l_quantity) AS qty FROM lineitem "
           "WHERE l_shipmode = 'AIR' GROUP BY l_returnflag ORDER BY l_returnflag")
    explained = spark_engine.query("EXPLAIN " + sql).read_all().to_pylist()
    sent = next(row["plan"] for row in explained if row["plan_type"].startswith("flightdeck:"))
    assert "GROUP BY" in sent and "`tpch`.`lineitem`" in sent and "= ?" in sent and "'AIR'" in sent
    jobs_before, tasks_before = len(cluster.application("/jobs")), _worker_tasks(cluster)
    result = spark_engine.query(sql).read_all()
    connector = spark_engine.catalog.datasets["public.lineitem"].connector
    assert connector.stats.last_request == sent.split("  -- parameters")[0]
    assert result.num_rows == 3 and connector.stats.rows >= 3
    reference = duckdb.connect()
    reference.register("lineitem", tables["lineitem"])
    _assert_same(result, reference.sql(sql).to_arrow_table(), "aggregate on Spark")
    # Spark's own bookkeeping: new jobs, and tasks counted on the workers' executors.
    assert len(cluster.application("/jobs")) > jobs_before
    assert _worker_tasks(cluster) > tasks_before
    executors = [e for e in cluster.application("/executors") if e["id"] != "driver"]
    assert len(executors) == 2 and all(e["totalTasks"] > 0 for e in executors)
    assert sum(w["coresused"] for w in cluster.master_state()["workers"]) == 2


PUSHED: set[int] = set()


@pytest.mark.parametrize("number", sorted(QUERIES))
def test_tpch_on_spark_matches_duckdb(spark_cluster, spark_engine, number):
    _, tables = spark_cluster
    reference = duckdb.connect()
    for name, table in tables.items():
        reference.register(name, table)
    planned = spark_engine.plan(QUERIES[number])
    if planned.remote is not None or planned.subplans:
        PUSHED.add(number)
    _assert_same(spark_engine.execute(planned).read_all(), reference.sql(QUERIES[number]).to_arrow_table(),
                 f"Q{number} ({'pushed whole' if planned.remote else f'{len(planned.subplans)} sub-plans'})")


def test_tpch_work_went_to_spark():
    # Runs after the parametrized cases (file order).
    print(f"\nTPC-H on Spark, pushed whole or in parts: {sorted(PUSHED)}")
    assert len(PUSHED) >= 10


def test_join_of_a_spark_table_and_a_postgres_table(spark_cluster, tmp_path):
    require_postgres()
    cluster, tables = spark_cluster
    postgres("DROP TABLE IF EXISTS fd_spark_regions")
    postgres("CREATE TABLE fd_spark_regions (r_regionkey bigint PRIMARY KEY, manager text)")
    postgres("INSERT INTO fd_spark_regions VALUES (0, 'ada'), (1, 'grace'), (3, 'edsger')")
    try:
        specs = [DatasetSpec("nation", "spark:tpch.nation", {"spark_remote": cluster.remote}),
                 DatasetSpec("managers", "postgres:public.fd_spark_regions",
                             {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"})]
        engine = QueryEngine(Catalog(specs, tmp_path))
        sql = ("SELECT m.manager, count(*) AS nations FROM nation n JOIN managers m "
               "ON n.n_regionkey = m.r_regionkey GROUP BY m.manager ORDER BY m.manager")
        result = engine.query(sql).read_all().to_pylist()
        counts = pa.table(tables["nation"]).group_by("n_regionkey").aggregate([("n_nationkey", "count")])
        per_region = dict(zip(counts["n_regionkey"].to_pylist(), counts["n_nationkey_count"].to_pylist()))
        assert result == [{"manager": "ada", "nations": per_region[0]}, {"manager": "edsger", "nations": per_region[3]},
                          {"manager": "grace", "nations": per_region[1]}]
        assert "`tpch`.`nation`" in engine.catalog.datasets["public.nation"].connector.stats.last_request
        engine.catalog.close()
    finally:
        postgres("DROP TABLE IF EXISTS fd_spark_regions")


def test_only_a_select_leaves(spark_engine):
    connector = spark_engine.catalog.datasets["public.nation"].connector
    for statement in ("DROP TABLE tpch.nation", "SELECT 1; DROP TABLE tpch.nation",
                      "INSERT INTO tpch.nation SELECT * FROM tpch.nation", "SET spark.sql.ansi.enabled=false",
                      "CACHE TABLE tpch.nation"):
        with pytest.raises(ConnectorError, match="read-only: only one SELECT is sent"):
            connector.execute_sql(statement).read_all()  # every SQL connector's own check
        with pytest.raises(ConnectorError, match="not sent"):
            connector.open_stream(statement, None, None)  # and, beneath it, the Spark connector's
    assert "tpch.nation" in connector.tables()
    assert spark_engine.query("SELECT count(*) AS n FROM nation").read_all().to_pylist() == [{"n": 25}]


def test_errors_are_precise_and_the_session_keeps_serving(spark_cluster, spark_engine, tmp_path):
    cluster, _ = spark_cluster
    engine = QueryEngine(Catalog([DatasetSpec("ghost", "spark:tpch.no_such_table", {"spark_remote": cluster.remote})],
                                 tmp_path))
    dataset = engine.catalog.datasets["public.ghost"]
    assert dataset.state != "ready" and "no_such_table" in str(dataset.error)
    engine.catalog.close()
    connector = spark_engine.catalog.datasets["public.nation"].connector
    with pytest.raises(ConnectorError, match="UNRESOLVED_COLUMN|cannot be resolved"):
        connector.execute_sql("SELECT no_such_column FROM tpch.nation").read_all()
    dead = QueryEngine(Catalog([DatasetSpec("x", "spark:tpch.nation", {"spark_remote": "sc://127.0.0.1:9",
                                                                       "spark_token": "tok-secret-9"})], tmp_path))
    error = str(dead.catalog.datasets["public.x"].error)
    assert "cannot connect" in error and "tok-secret-9" not in error
    dead.catalog.close()
    assert spark_engine.query("SELECT count(*) AS n FROM region").read_all().to_pylist() == [{"n": 5}]


def test_a_statement_past_its_timeout_is_interrupted_on_the_cluster(spark_cluster, tmp_path):
    cluster, _ = spark_cluster
    connector = SparkConnector({"spark_remote": cluster.remote, "query_timeout": 3}, tmp_path)
    try:
        with pytest.raises(ConnectorError, match="timed out after 3 s"):
            connector.execute_sql("SELECT count(*) AS n FROM range(0, 100000000000, 1, 4)").read_all()
        # The newest job, cancelled by its operation's tag; Spark's status API reports the
        # cancellation a moment after the client has its error.
        give_up = time.monotonic() + 15
        while (status := cluster.application("/jobs")[0]["status"]) == "RUNNING" and time.monotonic() < give_up:
            time.sleep(0.2)
        assert status == "FAILED"
        assert connector.execute_sql("SELECT 1 AS one").read_all().to_pylist() == [{"one": 1}]
    finally:
        connector.close()
