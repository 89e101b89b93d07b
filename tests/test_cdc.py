"""refresh_mode changes against the real PostgreSQL (logical replication) and MariaDB (binlog).

tests/services.sh switches the servers to logical WAL and a row binlog. Each test changes a table
of its own at the source and compares the copy with the source table, row for row.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg2
import pymysql
import pytest

from conftest import REPO, ServerProcess, serving, write_config

# The machine's servers; a developer may point these tests at servers of their own.
PG_PORT = int(os.environ.get("FD_CDC_PG_PORT", 5432))
MY_PORT = int(os.environ.get("FD_CDC_MYSQL_PORT", 3306))
PG = {"pg_host": "127.0.0.1", "pg_port": PG_PORT, "pg_db": "test", "pg_user": "postgres"}
MY = {"mysql_host": "127.0.0.1", "mysql_tcp_port": MY_PORT, "mysql_user": "root"}
SLOT = "flightdeck_fd_cdc_items"
START_ROWS = 300
OPS = 1000          # mixed inserts, updates and deletes, in bursts
BURSTS = 4
ACCEPTANCE_SECONDS = 2.0


class Peer:
    """One source server: runs statements as its administrator, reads the table back."""

    kind: str
    params: dict
    table: str

    def run(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    def rows(self) -> list[tuple]:
        return [tuple(row) for row in self.run(f"SELECT id, name, amount, at FROM {self.table} ORDER BY id")]


class Postgres(Peer):
    kind, params, table = "postgres", PG, "fd_cdc.items"

    def __init__(self):
        try:
            self.connection = psycopg2.connect(host="127.0.0.1", port=PG_PORT, dbname="test", user="postgres")
        except psycopg2.Error as error:
            if os.environ.get("CI") == "true":
                pytest.fail(f"PostgreSQL is not reachable: {error}")
            pytest.skip(f"needs PostgreSQL: {error}")
        self.connection.autocommit = True
        if self.run("SHOW wal_level")[0][0] != "logical":
            message = "PostgreSQL's wal_level is not logical: tests/services.sh switches it"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        self.drop_ours()
        self.run("DROP SCHEMA IF EXISTS fd_cdc CASCADE")
        self.run("CREATE SCHEMA fd_cdc")
        self.run("CREATE TABLE fd_cdc.items (id int PRIMARY KEY, name text, amount numeric(10,2), "
                 "at timestamptz)")
        self.run(f"INSERT INTO fd_cdc.items SELECT g, 'item ' || g, g * 1.25, "
                 f"'2026-01-01'::timestamptz + g * interval '1 minute' FROM generate_series(1, {START_ROWS}) g")

    def drop_ours(self) -> None:
        self.run("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                 "WHERE slot_name = %s AND NOT active", (SLOT,))
        self.run(f"DROP PUBLICATION IF EXISTS {SLOT}")

    def ours(self) -> tuple[list, list]:
        return (self.run("SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'flightdeck_fd_cdc%%'"),
                self.run("SELECT pubname FROM pg_publication WHERE pubname LIKE 'flightdeck_fd_cdc%%'"))

    def close(self) -> None:
        _until(lambda: not self.run("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND active",
                                    (SLOT,)), timeout=30)
        self.drop_ours()
        self.run("DROP SCHEMA IF EXISTS fd_cdc CASCADE")
        self.connection.close()


class MariaDB(Peer):
    kind, params, table = "mysql", MY, "fd_cdc.items"

    def __init__(self):
        try:
            self.connection = pymysql.connect(host="127.0.0.1", port=MY_PORT, user="root", autocommit=True)
        except pymysql.MySQLError as error:
            if os.environ.get("CI") == "true":
                pytest.fail(f"MariaDB is not reachable: {error}")
            pytest.skip(f"needs MariaDB: {error}")
        if self.run("SELECT @@log_bin, @@binlog_format")[0] != (1, "ROW"):
            message = "MariaDB writes no row binlog: tests/services.sh switches it on"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        self.run("DROP DATABASE IF EXISTS fd_cdc")
        self.run("CREATE DATABASE fd_cdc")
        self.run("CREATE TABLE fd_cdc.items (id int PRIMARY KEY, name varchar(100), amount decimal(10,2), "
                 "at datetime(6))")
        self.run("INSERT INTO fd_cdc.items SELECT seq, concat('item ', seq), seq * 1.25, "
                 "'2026-01-01' + INTERVAL seq MINUTE FROM fd_cdc.seq_1_to_%s" % START_ROWS)

    def ours(self) -> tuple[list, list]:
        return [], []

    def close(self) -> None:
        self.run("DROP DATABASE IF EXISTS fd_cdc")
        self.connection.close()


@pytest.fixture(params=["postgres", "mariadb"])
def peer(request):
    made = Postgres() if request.param == "postgres" else MariaDB()
    yield made
    made.close()


def _config(tmp_path: Path, peer: Peer, **acceleration) -> dict:
    return {"runtime": {"data_dir": str(tmp_path / "data")},
            "datasets": [{"from": f"{peer.kind}:{peer.table}", "name": "items", "params": peer.params,
                          "acceleration": {"refresh_mode": "changes", **acceleration}}]}


def _until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _copy(runtime) -> list[tuple]:
    return [tuple(row.values()) for row in
            runtime.engine.query("SELECT id, name, amount, at FROM items ORDER BY id").read_all().to_pylist()]


def _status(runtime) -> dict:
    return runtime.engine.query("SELECT * FROM flightdeck.runtime.datasets WHERE name = 'public.items'") \
        .read_all().to_pylist()[0]


def _burst(peer: Peer, operations: int, rng: random.Random, first_new_id: int) -> int:
    """``operations`` single-statement transactions: about 40% inserts, 40% updates, 20% deletes
    (an update or delete of a missing row changes nothing). Returns the next unused id."""
    next_id = first_new_id
    for _ in range(operations):
        roll = rng.random()
        if roll < 0.4:
            peer.run(f"INSERT INTO {peer.table} VALUES (%s, %s, %s, '2026-06-01 12:00:00')",
                     (next_id, f"new {next_id}", next_id % 1000 / 4))
            next_id += 1
        elif roll < 0.8:
            peer.run(f"UPDATE {peer.table} SET name = %s, amount = amount + 1 WHERE id = %s",
                     (f"updated {rng.random():.6f}", rng.randrange(1, next_id)))
        else:
            peer.run(f"DELETE FROM {peer.table} WHERE id = %s", (rng.randrange(1, next_id),))
    return next_id


@pytest.mark.parametrize("engine", ["duckdb", "sqlite"])
def test_mixed_changes_reach_the_copy_which_equals_the_source_after_each_burst(peer, tmp_path, engine):
    rng = random.Random(7)
    with serving(_config(tmp_path, peer, engine=engine), tmp_path) as runtime:
        _until(lambda: _status(runtime)["refresh_state"] == "ready")
        assert _copy(runtime) == peer.rows() and len(peer.rows()) == START_ROWS
        next_id, caught_up = START_ROWS + 1, []
        for _ in range(BURSTS):
            next_id = _burst(peer, OPS // BURSTS, rng, next_id)
            committed = time.monotonic()
            source = peer.rows()
            _until(lambda: _copy(runtime) == source)
            caught_up.append(time.monotonic() - committed)
        status = _status(runtime)
        assert status["refresh_state"] == "ready" and status["last_error"] is None
        assert status["refreshes"] == 1, "one snapshot, then changes only"
        assert status["changes_applied"] >= OPS * 0.6
        print(f"\n{peer.kind}/{engine}: {OPS} changes in {BURSTS} bursts; lag p50 {status['lag_p50_ms']} ms, "
              f"p99 {status['lag_p99_ms']} ms (commit -> applied); copy equal after the last commit of a burst "
              f"in {max(caught_up):.2f}s at most")
        assert status["lag_p99_ms"] is not None
        if peer.kind == "postgres":
            _until(lambda: _status(runtime)["source_backlog_bytes"] is not None)
            metrics = runtime.stack.metrics.render().decode()
            assert 'flightdeck_change_backlog_bytes{dataset="public.items"}' in metrics
            assert 'flightdeck_change_lag_seconds{dataset="public.items",quantile="0.99"}' in metrics


def _flightdeck_run(config: Path) -> ServerProcess:
    return ServerProcess(["run", "-c", str(config), "--flight-port", "0"])


def _query(server: ServerProcess, sql: str) -> list[tuple]:
    import adbc_driver_flightsql.dbapi as flightsql
    with flightsql.connect(server.url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def _served_copy(server: ServerProcess) -> list[tuple]:
    return [tuple(row) for row in _query(server, "SELECT id, name, amount, at FROM items ORDER BY id")]


def test_sigkill_mid_stream_then_restart_resumes_without_loss_or_duplicates(peer, tmp_path):
    config = write_config(tmp_path / "flightdeck.yaml", _config(tmp_path, peer, engine="duckdb", mode="file"))
    server = _flightdeck_run(config)
    rng = random.Random(11)
    writer_done = threading.Event()
    try:
        _until(lambda: _query(server, "SELECT refresh_state FROM flightdeck.runtime.datasets "
                                      "WHERE name = 'public.items'")[0][0] == "ready")

        def write() -> None:
            _burst(peer, 3000, rng, START_ROWS + 1)
            writer_done.set()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        _until(lambda: _query(server, "SELECT changes_applied FROM flightdeck.runtime.datasets "
                                      "WHERE name = 'public.items'")[0][0] > 200)
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
    assert not writer_done.is_set(), "the source was still changing when flightdeck was killed"
    writer.join(timeout=120)
    restarted = _flightdeck_run(config)
    try:
        source = peer.rows()
        _until(lambda: _served_copy(restarted) == source)
        status = _query(restarted, "SELECT refreshes, refresh_state, last_error FROM flightdeck.runtime.datasets "
                                   "WHERE name = 'public.items'")[0]
        assert status == (0, "ready", None), "resumed from the kept copy's position, not re-snapshotted"
        assert len({row[0] for row in _served_copy(restarted)}) == len(source), "no row twice"
    finally:
        restarted.stop()


@pytest.mark.parametrize("reset", ["truncate", "schema"])
def test_a_truncated_or_altered_source_is_a_clear_error_then_a_resnapshot_when_configured(peer, tmp_path, reset):
    if reset == "truncate":
        statement = f"TRUNCATE TABLE {peer.table}"
        said = "truncated"
    else:
        statement = f"ALTER TABLE {peer.table} ADD COLUMN note {'text' if peer.kind == 'postgres' else 'varchar(20)'}"
        said = "schema changed" if peer.kind == "postgres" else "altered"
    with serving(_config(tmp_path / "stop", peer), tmp_path) as runtime:
        _until(lambda: _status(runtime)["refresh_state"] == "ready")
        peer.run(statement)
        peer.run(f"INSERT INTO {peer.table} (id, name, amount, at) VALUES (100000, 'after', 1, '2026-06-01')")
        _until(lambda: _status(runtime)["refresh_state"] == "error")
        status = _status(runtime)
        assert said in status["last_error"] and "the source" in status["last_error"], status["last_error"]
        assert len(_copy(runtime)) == START_ROWS, "the last good copy keeps serving"
    with serving(_config(tmp_path / "resnapshot", peer, refresh_on_source_reset="resnapshot"), tmp_path) as runtime:
        _until(lambda: _status(runtime)["refresh_state"] == "ready")
        peer.run(statement.replace("ADD COLUMN note", "ADD COLUMN note2"))
        peer.run(f"INSERT INTO {peer.table} (id, name, amount, at) VALUES (100001, 'again', 2, '2026-06-01')")
        _until(lambda: _status(runtime)["refreshes"] == 2 and _copy(runtime) == peer.rows())
        peer.run(f"UPDATE {peer.table} SET name = 'still followed' WHERE id = 100001")
        _until(lambda: _copy(runtime) == peer.rows())
        assert _status(runtime)["refresh_state"] == "ready"


def test_mariadb_statements_are_read_by_their_words_and_whole_names(tmp_path):
    """Any ALTER, TRUNCATE or DROP whose text held the table's name stopped the copy: an index
    added to it, or ``items_archive`` truncated. And a migration tool's comment before an ALTER
    hid it: the copy stayed ready while the source's column was retyped under it."""
    peer = MariaDB()
    try:
        with serving(_config(tmp_path, peer), tmp_path) as runtime:
            _until(lambda: _status(runtime)["refresh_state"] == "ready")
            for statement in ["CREATE TABLE fd_cdc.items_archive (id int PRIMARY KEY, note varchar(10))",
                              "ALTER TABLE fd_cdc.items_archive ADD COLUMN extra int",
                              "TRUNCATE fd_cdc.items_archive",
                              "ALTER TABLE fd_cdc.items ADD INDEX by_name (name)",
                              "ALTER TABLE fd_cdc.items COMMENT = 'items, altered and truncated'",
                              "DROP TABLE fd_cdc.items_archive"]:
                peer.run(statement)
            peer.run(f"INSERT INTO {peer.table} VALUES (100000, 'after', 1, '2026-06-01')")
            _until(lambda: _copy(runtime) == peer.rows())
            assert _status(runtime)["refresh_state"] == "ready"
            peer.run(f"/* migration 42 */ ALTER TABLE {peer.table} MODIFY amount decimal(12, 3)")
            peer.run(f"INSERT INTO {peer.table} VALUES (100001, 'retyped', 1.125, '2026-06-01')")
            _until(lambda: _status(runtime)["refresh_state"] == "error")
            assert "altered" in _status(runtime)["last_error"]
    finally:
        peer.close()


def test_cleanup_leaves_no_slot_or_publication_behind(tmp_path):
    peer = Postgres()
    try:
        config = write_config(tmp_path / "flightdeck.yaml", _config(tmp_path, peer))
        with serving(_config(tmp_path, peer), tmp_path) as runtime:
            _until(lambda: _status(runtime)["refresh_state"] == "ready")
            assert peer.ours() == ([(SLOT,)], [(SLOT,)])
        _until(lambda: not peer.run("SELECT 1 FROM pg_replication_slots WHERE active AND slot_name = %s", (SLOT,)))
        done = subprocess.run([sys.executable, "-m", "flight.cli", "cdc", "cleanup", "-c", str(config)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "public.items" in done.stdout
        assert peer.ours() == ([], [])
        unknown = subprocess.run([sys.executable, "-m", "flight.cli", "cdc", "cleanup", "-c", str(config), "nope"],
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
        assert unknown.returncode != 0 and "not a refresh_mode 'changes' dataset" in unknown.stderr
        assert "Traceback" not in unknown.stderr
    finally:
        peer.close()


def test_the_replication_session_writes_nothing_and_the_snapshot_session_is_read_only(tmp_path):
    peer = Postgres()
    try:
        with serving(_config(tmp_path, peer), tmp_path) as runtime:
            _until(lambda: _status(runtime)["refresh_state"] == "ready")

            def sessions() -> list[tuple]:
                return peer.run("SELECT backend_type, query FROM pg_stat_activity "
                                "WHERE application_name = 'flightdeck cdc'")
            # The copy is ready once the snapshot is loaded; the stream may start a moment later
            # (the walsender still identifying the system), so wait for it, then look at every session.
            _until(lambda: any("START_REPLICATION" in query for _, query in sessions()))
            found = sessions()
            assert found and all(kind == "walsender" for kind, _ in found)
            assert all("START_REPLICATION" in query for _, query in found)
    finally:
        peer.close()
