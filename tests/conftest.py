"""Shared fixtures: the demo data, a real server process, in-process servers, clients."""
from __future__ import annotations

import gc
import hashlib
import os
import sqlite3
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_postgresql.dbapi as adbc_postgres
import pyarrow.flight as flight
import pymysql
import pytest
import yaml

import contract_matrix
from flight.cli import Serving
from flightdeck.config import parse_config
from flightdeck.demo import ensure_demo
from flightdeck.errors import ServiceError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_config(tmp_path_factory) -> Path:
    return ensure_demo(tmp_path_factory.mktemp("demo") / "demo")


class ServerProcess:
    """``flightdeck ARGS`` in its own process; ``run`` gets a free HTTP port unless one is given.
    ``url`` is the Flight SQL URL, ``http_url`` the HTTP one (from the READY line)."""

    def __init__(self, args: list[str], env: dict | None = None):
        if args[:1] == ["run"] and "--http-port" not in args:
            args = [*args, "--http-port", "0"]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flight.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            self.process.kill()
            raise RuntimeError(f"server did not start: {line}{self.process.stderr.read()}")
        urls = line.split()[1:]
        self.url = next((u for u in urls if u.startswith("grpc")), None)
        self.http_url = next((u for u in urls if u.startswith("http")), None)

    def stop(self, timeout: float = 30) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        try:
            _, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
        return self.process.returncode, err


@pytest.fixture(scope="session")
def server(demo_config) -> Iterator[ServerProcess]:
    process = ServerProcess(["run", "-c", str(demo_config), "--flight-port", "0"])
    yield process
    process.stop()


@pytest.fixture
def connection(server) -> Iterator[flightsql.Connection]:
    with flightsql.connect(server.url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def flight_client(server) -> Iterator[flight.FlightClient]:
    client = flight.FlightClient(server.url)
    yield client
    client.close()


class InProcess:
    """An in-process flightdeck as tests see it: the Stack's parts, the Service, the Flight SQL door."""

    def __init__(self, serving: Serving):
        self.serving = serving
        self.stack, self.service = serving.stack, serving.service
        self.engine, self.catalog = serving.stack.engine, serving.stack.catalog
        self.accelerator, self.models = serving.stack.accelerator, serving.stack.models
        self.server, self.flight_url = serving.flightsql, serving.flight_url
        self.http_url = serving.http_url

    def refresh(self, dataset: str, refresh_sql: str | None = None) -> dict:
        return self.stack.refresh(dataset, refresh_sql)


@contextmanager
def serving(config: dict, base_dir: Path, environ: dict | None = None) -> Iterator[InProcess]:
    """flightdeck serving ``config`` in this process (tests can look inside it)."""
    config.setdefault("runtime", {}).setdefault("flight", {"port": 0})
    config["runtime"].setdefault("http", {"port": 0})
    loaded = parse_config(config, base_dir, environ if environ is not None else {})
    running = Serving(loaded)
    try:
        yield InProcess(running)
    finally:
        running.close()
        del running
        gc.collect()  # free what is left of it here, not on an engine thread during the next test


@pytest.fixture(scope="module")
def deck(demo_config) -> Iterator[InProcess]:
    """The bundled demo served in this process, its guides' copy loaded (one per test module:
    a process opens the demo's DuckDB file once)."""
    with serving(yaml.safe_load(demo_config.read_text()), demo_config.parent) as running:
        assert running.accelerator.refresher("guides").loaded.wait(300)
        yield running


def run_clients(client: Callable[[int], None], count: int, timeout: float = 120) -> None:
    """``client(n)`` for each n below ``count``, all at once on their own threads; waits for them
    and fails with the first client's error, or when one has not finished within ``timeout``."""
    errors: list[BaseException] = []

    def run(number: int) -> None:
        try:
            client(number)
        except BaseException as error:  # an assertion in a client fails the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"a client still runs after {timeout} s"
    if errors:
        raise errors[0]


def service_error(call) -> ServiceError:
    """The ServiceError ``call()`` raises (reading the result, if it returns a reader)."""
    with pytest.raises(ServiceError) as raised:
        result = call()
        if hasattr(result, "read_all"):
            result.read_all()
    return raised.value


POSTGRES_URI = "postgresql://postgres@127.0.0.1:5432/test"


def postgres(sql: str, params: list | None = None) -> list[tuple]:
    """Run one statement on the test PostgreSQL as its administrator; its rows, if any."""
    with adbc_postgres.connect(POSTGRES_URI, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def require_postgres() -> None:
    """Skip the test without PostgreSQL; under CI, fail loudly instead."""
    try:
        postgres("SELECT 1")
    except Exception as error:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is not reachable: {error}")
        pytest.skip(f"needs PostgreSQL: {error}")


def service_missing(what: str, error: Exception) -> None:
    """Skip the test without ``what``; under CI, fail loudly instead."""
    message = f"{what} is not reachable ({error}); `make test` starts it"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def mariadb(sql: str, params=None, database: str | None = None) -> list:
    """Run one statement on the test MariaDB as root; its rows, if any."""
    connection = pymysql.connect(host="127.0.0.1", user="root", autocommit=True, charset="utf8mb4",
                                 database=database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())
    finally:
        connection.close()


def require_mariadb() -> None:
    """Skip the test without MariaDB; under CI, fail loudly instead."""
    try:
        mariadb("SELECT 1")
    except Exception as error:  # noqa: BLE001
        service_missing("MariaDB", error)


def digest(rows) -> str:
    """A checksum of rows, in the order given."""
    return hashlib.sha256(repr([tuple(r) for r in rows]).encode()).hexdigest()


def sqlite_fingerprint(path: Path) -> dict:
    """The tables of a SQLite file and a checksum of each one's ordered rows (read-only)."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1")]
        return {"tables": names, **{n: digest(con.execute(f'SELECT * FROM "{n}" ORDER BY 1')) for n in names}}


def duckdb_fingerprint(run) -> dict:
    """The tables and sequences a DuckDB session sees and a checksum of each table's ordered
    rows; ``run(sql)`` returns an Arrow reader."""
    def rows(sql: str) -> list[tuple]:
        return [tuple(r.values()) for r in run(sql).read_all().to_pylist()]
    tables = rows("SELECT database_name, schema_name, table_name FROM duckdb_tables() ORDER BY ALL")
    return {"tables": tables, "sequences": rows("SELECT sequence_name FROM duckdb_sequences()"),
            **{f"{d}.{s}.{n}": digest(rows(f'SELECT * FROM "{d}"."{s}"."{n}" ORDER BY ALL'))
               for d, s, n in tables}}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="session")
def search_peer():
    """An OpenSearch-compatible server (osmem-server) behind a proxy that records requests."""
    from peers import start_search_peer
    with start_search_peer() as peer:
        yield peer


@pytest.fixture(scope="session")
def mongo_server():
    """A MongoDB wire-protocol server (nx-27017), in memory."""
    from peers import start_mongo_peer
    with start_mongo_peer() as server:
        yield server


def pytest_runtest_logreport(report):
    contract_matrix.record(report)


def pytest_terminal_summary(terminalreporter):
    lines = contract_matrix.summary()
    if lines:
        terminalreporter.section("connector contract: connector x capability (gap = known, xfail strict)")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def spark_cluster(tmp_path_factory):
    """A Spark cluster on loopback (tests/spark_cluster.py), started once per run, with database ``tpch``
    (external Parquet tables the workers read) and ``kinds.sample``; yields (cluster, tables)."""
    from pyspark.sql import SparkSession

    from spark_cluster import SparkCluster
    from test_tpch_differential import PLACEMENT, _generate

    work = tmp_path_factory.mktemp("spark")
    cluster = SparkCluster(work)
    try:
        cluster.start()
    except (RuntimeError, OSError) as error:
        cluster.stop()
        if os.environ.get("CI") == "true":
            pytest.fail(f"the Spark cluster did not start: {error}")
        pytest.skip(f"the Spark cluster did not start: {error}")
    tables = _generate(work / "tpch")
    admin = SparkSession.builder.remote(cluster.remote).create()
    try:
        admin.sql("CREATE DATABASE tpch")
        for name in PLACEMENT:
            admin.sql(f"CREATE TABLE tpch.{name} USING parquet LOCATION '{work / 'tpch' / (name + '.parquet')}'")
        admin.sql("CREATE DATABASE kinds")
        admin.sql(
            "CREATE TABLE kinds.sample USING parquet AS SELECT * FROM VALUES "
            "(1, CAST(7 AS TINYINT), CAST(100 AS BIGINT), CAST(1.5 AS DOUBLE), CAST(12.34 AS DECIMAL(10,2)), "
            " 'eu', DATE'2026-11-01', TIMESTAMP_NTZ'2026-11-01 10:00:00', true, ARRAY(1, 2), "
            " MAP('k', 'v')), "
            "(2, CAST(-3 AS TINYINT), NULL, CAST(-0.25 AS DOUBLE), NULL, 'us', NULL, NULL, false, ARRAY(3), "
            " MAP('a', 'b')), "
            "(3, NULL, CAST(9000000000 AS BIGINT), NULL, CAST(0.01 AS DECIMAL(10,2)), NULL, DATE'2026-11-03', "
            " TIMESTAMP_NTZ'2026-11-03 00:00:00', NULL, NULL, NULL) "
            "AS t(id, small, big, ratio, amount, region, day, seen, flag, tags, attrs)")
    finally:
        admin.stop()
    yield cluster, tables
    cluster.stop()
