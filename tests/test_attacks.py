"""flightdeck's read-only and isolation promises, tested as an attacker would.

Every case of tests/attack_cases.py goes through a real client (ADBC over Flight SQL) to a
running server whose datasets live on every kind of backend: Parquet and CSV files, DuckDB,
SQLite, PostgreSQL, MariaDB, and accelerated copies in DuckDB and SQLite stores. Each case is
refused or harmless: the backend's tables are byte-identical afterwards, no host file is
created (the target path) or read (the canary's content never comes back), flightdeck's
PostgreSQL sessions hold no lock and no open transaction, and the server answers the next query.

Beneath the gate, each backend session refuses a write handed to it directly, and the
connectors send a backend nothing but one plain SELECT.
"""
from __future__ import annotations

import glob
import hashlib
import os
import secrets
import sqlite3
from collections import Counter
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import duckdb
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from attack_cases import ANY, BACKENDS, CASES, PWNED, REFUSED, ROWS, Case
from conftest import (duckdb_fingerprint, mariadb, postgres, require_mariadb, require_postgres, serving,
                      sqlite_fingerprint)
from federation.connectors.base import ConnectorError
from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from test_flight_protocol import descriptor, fetch

SCHEMA = "fd_atk"  # PostgreSQL schema and MariaDB database of this file
PG = {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"}
MY = {"mysql_host": "127.0.0.1", "mysql_user": "root"}
# Host paths the database servers can reach too: they write and read as their own users.
CANARY = Path(f"/tmp/fd_atk_canary_{os.getpid()}")
TARGET = Path(f"/tmp/fd_atk_target_{os.getpid()}")
SECRET = f"FD-CANARY-{secrets.token_hex(8)}"

_outcomes: Counter = Counter()


def _table() -> pa.Table:
    return pa.table({"id": pa.array([r[0] for r in ROWS], pa.int32()), "name": [r[1] for r in ROWS]})


def _load_postgres() -> None:
    postgres(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    postgres(f"CREATE SCHEMA {SCHEMA}")
    postgres(f"CREATE TABLE {SCHEMA}.t (id int PRIMARY KEY, name text)")
    postgres(f"CREATE SEQUENCE {SCHEMA}.seq")
    for row in ROWS:
        postgres(f"INSERT INTO {SCHEMA}.t VALUES ($1, $2)", list(row))


def _load_mariadb() -> None:
    mariadb(f"DROP DATABASE IF EXISTS {SCHEMA}")
    mariadb(f"CREATE DATABASE {SCHEMA} CHARACTER SET utf8mb4")
    mariadb("CREATE TABLE t (id INT PRIMARY KEY, name TEXT)", database=SCHEMA)
    for row in ROWS:
        mariadb("INSERT INTO t VALUES (%s, %s)", row, database=SCHEMA)


def _load_files(folder: Path) -> None:
    pq.write_table(_table(), folder / "rows.parquet")
    pacsv.write_csv(_table(), folder / "rows.csv")
    for name in ("rows.sqlite", "source.sqlite"):
        with sqlite3.connect(folder / name) as con:
            con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)")
            con.executemany("INSERT INTO t VALUES (?, ?)", ROWS)
    with duckdb.connect(str(folder / "rows.duckdb")) as con:
        con.register("incoming", _table())
        con.execute("CREATE TABLE t AS SELECT * FROM incoming")


def _config(folder: Path) -> dict:
    source = {"sqlite_file": str(folder / "source.sqlite")}
    return {"runtime": {"data_dir": str(folder / "data")}, "datasets": [
        {"from": "file:rows.parquet", "name": "parquet_t"},
        {"from": "file:rows.csv", "name": "csv_t"},
        {"from": "duckdb:t", "name": "duckdb_t", "params": {"duckdb_open": "rows.duckdb"}},
        {"from": "sqlite:t", "name": "sqlite_t", "params": {"sqlite_file": "rows.sqlite"}},
        {"from": f"postgres:{SCHEMA}.t", "name": "postgres_t", "params": PG},
        {"from": f"mysql:{SCHEMA}.t", "name": "mariadb_t", "params": MY},
        {"from": "sqlite:t", "name": "accel_duckdb_t", "params": source,
         "acceleration": {"engine": "duckdb", "mode": "file"}},
        {"from": "sqlite:t", "name": "accel_sqlite_t", "params": source,
         "acceleration": {"engine": "sqlite", "mode": "file"}}]}


class World:
    def __init__(self, folder: Path, runtime):
        self.folder, self.runtime = folder, runtime
        self.baseline = {backend: self.fingerprint(backend) for backend in BACKENDS}

    def fingerprint(self, backend: str) -> dict:
        """Checksums of what the backend holds, and of anything an attack could have made."""
        files = {"parquet": "rows.parquet", "csv": "rows.csv", "duckdb": "rows.duckdb", "sqlite": "rows.sqlite"}
        if backend in files:
            path = self.folder / files[backend]
            return {"bytes": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "folder": sorted(p.name for p in self.folder.iterdir())}
        if backend == "postgres":
            return {"rows": postgres(f"SELECT md5(string_agg(t::text, E'\\n' ORDER BY id)) FROM {SCHEMA}.t t"),
                    "sequence": postgres(f"SELECT last_value, is_called FROM {SCHEMA}.seq"),
                    "tables": postgres("SELECT schemaname, tablename FROM pg_tables WHERE schemaname = $1 "
                                       "OR tablename LIKE 'fd_atk%' ORDER BY 1, 2", [SCHEMA]),
                    "large objects": postgres("SELECT count(*) FROM pg_largeobject_metadata")}
        if backend == "mariadb":
            return {"rows": mariadb(f"SELECT md5(group_concat(concat_ws(',', id, hex(name)) ORDER BY id "
                                    f"SEPARATOR '\\n')) FROM {SCHEMA}.t"),
                    "tables": mariadb("SELECT table_schema, table_name FROM information_schema.tables WHERE "
                                      "table_schema = %s OR table_name LIKE 'fd_atk%%' ORDER BY 1, 2", [SCHEMA])}
        accelerator = self.runtime.accelerator
        if backend == "accel_sqlite":
            return sqlite_fingerprint(accelerator._sqlite["file"].path)
        cursor = accelerator._duckdb.cursor()
        try:
            return duckdb_fingerprint(lambda sql: cursor.sql(sql).to_arrow_reader(65_536))
        finally:
            cursor.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    require_postgres()
    require_mariadb()
    folder = tmp_path_factory.mktemp("attacks")
    CANARY.write_text(SECRET + "\n")
    CANARY.chmod(0o644)  # readable by the database servers: a read that got through would show
    _load_files(folder)
    _load_postgres()
    _load_mariadb()
    try:
        with serving(_config(folder), folder) as runtime:
            for refresher in runtime.accelerator.refreshers.values():
                assert refresher.loaded.wait(60), refresher.status
            for backend in BACKENDS:
                dataset = runtime.catalog.datasets[f"public.{backend}_t"]
                assert dataset.state == "ready", (backend, dataset.error)
            yield World(folder, runtime)
    finally:
        CANARY.unlink(missing_ok=True)
        for made in glob.glob(f"{TARGET}*"):
            Path(made).unlink()
        postgres(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        mariadb(f"DROP DATABASE IF EXISTS {SCHEMA}")
        _print_summary()


@pytest.fixture(scope="module")
def client(world):
    with flightsql.connect(world.runtime.flight_url, autocommit=True) as conn:
        yield conn


def _print_summary() -> None:
    if not _outcomes:
        return
    categories = sorted({category for _, category, _ in _outcomes})
    print("\nattack cases per backend and category (refused/answered harmlessly):")
    print(f"{'backend':<14}" + "".join(f"{c[:24]:>26}" for c in categories) + f"{'total':>8}")
    for backend in BACKENDS:
        cells, total = [], 0
        for category in categories:
            refused, answered = _outcomes[backend, category, "refused"], _outcomes[backend, category, "answered"]
            total += refused + answered
            cells.append(f"{refused}/{answered}" if refused + answered else "-")
        print(f"{backend:<14}" + "".join(f"{c:>26}" for c in cells) + f"{total:>8}")
    print(f"{'all':<14}{'':>{26 * len(categories)}}{sum(_outcomes.values()):>8}")


ADVISORY_KEYS = (4242, 777)  # the advisory locks the attacks (and the check's own test) try to take


def _flightdeck_postgres_sessions() -> list[tuple]:
    """Locks on this file's tables or advisory keys, and flightdeck transactions left open on
    them (other servers on this machine may hold their own)."""
    return postgres(
        "SELECT l.pid, a.application_name, l.locktype, l.mode FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid AND a.pid <> pg_backend_pid() "
        "LEFT JOIN pg_class c ON c.oid = l.relation LEFT JOIN pg_namespace n ON n.oid = c.relnamespace "
        f"WHERE n.nspname = $1 OR (l.locktype = 'advisory' AND l.objid IN {ADVISORY_KEYS}) "
        "UNION ALL SELECT pid, application_name, state, left(query, 80) FROM pg_stat_activity "
        "WHERE application_name = 'flightdeck' AND state LIKE 'idle in transaction%' AND query LIKE '%fd_atk%'",
        [SCHEMA])


def _case_id(case: Case) -> str:
    return f"{case.backend}-{case.category}-{case.name}"


def test_the_suite_is_large_and_covers_every_backend():
    assert len(CASES) >= 100
    assert {case.backend for case in CASES} == set(BACKENDS)
    assert len({_case_id(case) for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_attack_is_refused_or_harmless(world, client, case):
    table = f"{case.backend}_t"
    sql = case.sql.format(t=table, canary=CANARY, target=TARGET)
    with client.cursor() as cursor:
        try:
            cursor.execute(sql, case.params)
            answer = cursor.fetch_arrow_table()
        except adbc_driver_manager.Error as error:
            answer, message = None, str(error)
            assert "Traceback" not in message and SECRET not in message, message
            assert case.expect in (REFUSED, ANY), f"a bound value was not answered as a value: {message}"
            _outcomes[case.backend, case.category, "refused"] += 1
        else:
            assert case.expect != REFUSED, f"answered instead of refused: {answer.to_pylist()[:3]}"
            assert SECRET not in str(answer.to_pylist())
            if isinstance(case.expect, int):
                assert answer.to_pylist() == [{"n": case.expect}]
            _outcomes[case.backend, case.category, "answered"] += 1
        # the server answers the next query, on the same connection
        cursor.execute(f"SELECT count(*) AS n FROM {table}")
        assert cursor.fetchone() == (len(ROWS),)
    assert not glob.glob(f"{TARGET}*"), "a host file was written"
    assert not glob.glob(f"{PWNED}*") and not glob.glob(str(world.folder / f"{PWNED}*"))
    assert CANARY.read_text() == SECRET + "\n"
    assert world.fingerprint(case.backend) == world.baseline[case.backend]
    assert _flightdeck_postgres_sessions() == []


def test_every_backend_is_unchanged_after_the_whole_suite(world, client):
    """Last: an attack on one backend must not have reached another."""
    for backend in BACKENDS:
        assert world.fingerprint(backend) == world.baseline[backend], backend
    with client.cursor() as cursor:
        cursor.execute(" UNION ALL ".join(f"SELECT '{b}' AS b, count(*) AS n FROM {b}_t" for b in BACKENDS))
        assert sorted(cursor.fetchall()) == sorted((b, len(ROWS)) for b in BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nul_byte_reaches_the_gate_whole_over_raw_flight(world, backend):
    """ADBC cuts a statement at its first NUL; a raw Flight client sends all of it, and the gate
    sees the second statement behind the NUL."""
    table = f"{backend}_t"
    with flight.FlightClient(world.runtime.flight_url) as raw:
        for sql in (f"SELECT id FROM {table}\x00; DROP TABLE {table}",
                    f"SELECT id FROM {table} WHERE name = 'a\x00'; DELETE FROM {table}"):
            with pytest.raises(flight.FlightUnauthorizedError, match="only one statement"):
                raw.get_flight_info(descriptor(sql_pb.CommandStatementQuery(query=sql)))
        _, rows = fetch(raw, sql_pb.CommandStatementQuery(query=f"SELECT count(*) AS n FROM {table}"))
        assert rows.to_pylist() == [{"n": len(ROWS)}]
    assert world.fingerprint(backend) == world.baseline[backend]


# ---- read-only at every layer -------------------------------------------------------------

def _connector(world, backend: str):
    return world.runtime.catalog.datasets[f"public.{backend}_t"].connector


def test_postgres_sessions_refuse_writes_themselves(world):
    """The session flightdeck opens is read-only at the server: a write handed straight to it
    (no gate, no validator) is refused by PostgreSQL."""
    connector = _connector(world, "postgres")
    session = connector._connect()
    try:
        for write in (f"INSERT INTO {SCHEMA}.t VALUES (99, 'x')", f"DELETE FROM {SCHEMA}.t",
                      f"CREATE TABLE {SCHEMA}.{PWNED} (i int)", f"DROP TABLE {SCHEMA}.t",
                      f"SELECT nextval('{SCHEMA}.seq')", f"SELECT * FROM {SCHEMA}.t FOR UPDATE"):
            with session.cursor() as cursor, pytest.raises(Exception, match="read-only transaction"):
                cursor.execute(write)
                cursor.fetchall()
        with session.cursor() as cursor:
            cursor.execute("SELECT current_setting('default_transaction_read_only')")
            assert cursor.fetchone() == ("on",)
    finally:
        session.close()
    assert world.fingerprint("postgres") == world.baseline["postgres"]


READER = "fd_atk_reader"  # a login role with SELECT on the attacked table and nothing else


def test_a_select_only_postgres_role_is_all_flightdeck_needs(world, tmp_path):
    """The suite attacks as a superuser (the gate alone must hold); a deployment gives flightdeck
    a role that may only read: queries, pushed filters and whole statements work under it, and
    what a superuser session could still do on the host is refused by PostgreSQL itself."""
    postgres(f"DO $$ BEGIN CREATE ROLE {READER} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
    postgres(f"GRANT USAGE ON SCHEMA {SCHEMA} TO {READER}")
    postgres(f"GRANT SELECT ON {SCHEMA}.t TO {READER}")
    config = {"runtime": {"data_dir": str(tmp_path / "data")}, "datasets": [
        {"from": f"postgres:{SCHEMA}.t", "name": "t", "params": {**PG, "pg_user": READER}}]}
    try:
        assert postgres(f"SELECT rolsuper, rolcreaterole, rolcreatedb FROM pg_roles WHERE rolname = '{READER}'") \
            == [(False, False, False)]
        with serving(config, tmp_path) as running:
            with flightsql.connect(running.flight_url, autocommit=True) as conn, conn.cursor() as cursor:
                cursor.execute("SELECT count(*) AS n, max(name) AS top FROM t WHERE id > 1")
                assert cursor.fetchall() == [(len(ROWS) - 1, max(r[1] for r in ROWS[1:]))]
                cursor.execute("SELECT a.id FROM t a JOIN t b ON a.id = b.id WHERE a.id = ? ORDER BY 1",
                               parameters=(ROWS[0][0],))
                assert cursor.fetchall() == [(ROWS[0][0],)]
            session = running.catalog.datasets["public.t"].connector._connect()
            try:
                for reach in (f"SELECT pg_read_file('{CANARY}')", "SELECT * FROM pg_ls_dir('/tmp')",
                              "SELECT lo_import('/etc/hostname')"):
                    with session.cursor() as cursor, pytest.raises(Exception, match="permission denied|read-only"):
                        cursor.execute(reach)
                        cursor.fetchall()
            finally:
                session.close()
    finally:
        postgres(f"DROP OWNED BY {READER}")
        postgres(f"DROP ROLE {READER}")
    assert world.fingerprint("postgres") == world.baseline["postgres"]


def test_mariadb_sessions_refuse_writes_themselves(world):
    connector = _connector(world, "mariadb")
    session = connector._connect()
    try:
        for write in (f"INSERT INTO {SCHEMA}.t VALUES (99, 'x')", f"DELETE FROM {SCHEMA}.t",
                      f"UPDATE {SCHEMA}.t SET name = 'x'", f"CREATE TABLE {SCHEMA}.{PWNED} (i int)",
                      f"DROP TABLE {SCHEMA}.t", f"TRUNCATE {SCHEMA}.t", f"SELECT * FROM {SCHEMA}.t FOR UPDATE"):
            with session.cursor() as cursor, pytest.raises(Exception, match="READ ONLY transaction"):
                cursor.execute(write)
    finally:
        session.close()
    assert world.fingerprint("mariadb") == world.baseline["mariadb"]


def test_duckdb_and_sqlite_sessions_refuse_writes_themselves(world):
    duck = _connector(world, "duckdb")._cursor()
    with pytest.raises(duckdb.Error, match="(?i)read-only"):
        duck.execute("INSERT INTO t VALUES (99, 'x')")
    with pytest.raises(duckdb.Error, match="(?i)external access|disabled"):
        duck.execute(f"COPY t TO '{TARGET}'")
    duck.close()
    lite = _connector(world, "sqlite")._connect()
    for write in ("INSERT INTO t VALUES (99, 'x')", "DELETE FROM t", f"ATTACH DATABASE '{TARGET}' AS x",
                  f"VACUUM INTO '{TARGET}'"):
        with pytest.raises(sqlite3.Error):
            lite.execute(write)
    lite.close()
    assert not glob.glob(f"{TARGET}*")
    for backend in ("duckdb", "sqlite"):
        assert world.fingerprint(backend) == world.baseline[backend]


# A read-only session still lets these through (a file written or read by the server, the
# session switched back to read-write, a lock held): the connectors send none of them.
PAST_A_READ_ONLY_SESSION = {
    "postgres": [f"COPY {SCHEMA}.t TO '{TARGET}'", "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
                 "SET default_transaction_read_only = off", f"SELECT * FROM {SCHEMA}.t FOR UPDATE",
                 f"SELECT 1; DELETE FROM {SCHEMA}.t", "SELECT pg_advisory_lock(4242)",
                 "SELECT set_config('default_transaction_read_only', 'off', false)",
                 f"SELECT pg_read_file('{CANARY}')", f"SELECT lo_export(1, '{TARGET}')",
                 f"WITH x AS (DELETE FROM {SCHEMA}.t RETURNING *) SELECT * FROM x"],
    "mariadb": [f"SELECT id FROM {SCHEMA}.t INTO OUTFILE '{TARGET}'",
                f"SELECT name FROM {SCHEMA}.t LIMIT 1 INTO DUMPFILE '{TARGET}'",
                f"SELECT id FROM {SCHEMA}.t /*!50000 INTO OUTFILE '{TARGET}' */",
                "SET SESSION TRANSACTION READ WRITE", f"SELECT LOAD_FILE('{CANARY}')",
                "SELECT GET_LOCK('fd_atk', 1)", f"SELECT id FROM {SCHEMA}.t LOCK IN SHARE MODE"],
    "sqlite": ["PRAGMA user_version", "SELECT 1; SELECT 2"],
    "duckdb": [f"COPY t TO '{TARGET}'", "SELECT 1; SELECT 2"],
}


@pytest.mark.parametrize("backend", sorted(PAST_A_READ_ONLY_SESSION))
def test_connectors_send_a_backend_only_one_plain_select(world, backend):
    connector = _connector(world, backend)
    for statement in PAST_A_READ_ONLY_SESSION[backend]:
        with pytest.raises(ConnectorError) as raised:
            connector.execute_sql(statement).read_all()
        assert SECRET not in str(raised.value)
    assert not glob.glob(f"{TARGET}*")
    assert _flightdeck_postgres_sessions() == []
    table = f"{SCHEMA}.t" if backend in ("postgres", "mariadb") else "t"
    counted = connector.execute_sql(f"SELECT count(*) AS n FROM {table}").read_all()
    assert [int(n) for n in counted.column(0).to_pylist()] == [len(ROWS)]  # a plain SELECT still runs
    assert world.fingerprint(backend) == world.baseline[backend]


def test_the_lock_check_sees_a_lock_held_by_a_flightdeck_session(world):
    """The check after every case is not vacuous: a flightdeck session holding a lock shows."""
    session = _connector(world, "postgres")._connect()
    try:
        with session.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_lock(777)")
            cursor.fetchall()
        assert [row[1:] for row in _flightdeck_postgres_sessions()] == [("flightdeck", "advisory", "ExclusiveLock")]
    finally:
        session.close()
    assert _flightdeck_postgres_sessions() == []
