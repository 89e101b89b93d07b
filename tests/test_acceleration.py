"""Acceleration against the real PostgreSQL: refresh modes x engines, routing, faults, shielding."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_postgresql.dbapi as adbc_postgres
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flightdeck.config import ConfigError, parse_config

from conftest import REPO, ServerProcess, serving, write_config

PG_URI = "postgresql://postgres@127.0.0.1:5432/test"
READER = {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "fd_accel_reader"}
ENGINES = ["duckdb", "sqlite", "arrow"]
ROWS = 1000  # ids 1..900 within the last 15 hours; 901..1000 three days old


def _admin(sql: str, params: list | None = None) -> list:
    with adbc_postgres.connect(PG_URI, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


@pytest.fixture
def source():
    """A fresh fd_accel.events for each test, readable by the role flightdeck connects as."""
    try:
        _admin("SELECT 1")
    except Exception as error:
        message = f"PostgreSQL is not reachable ({error}); `make test` starts it"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    _admin("DROP SCHEMA IF EXISTS fd_accel CASCADE")
    _admin("CREATE SCHEMA fd_accel")
    _admin("DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'fd_accel_reader') "
           "THEN CREATE ROLE fd_accel_reader LOGIN; END IF; END $$")
    _admin("CREATE TABLE fd_accel.events (id bigint PRIMARY KEY, at timestamptz NOT NULL, region text, "
           "amount numeric(10,2))")
    _admin(f"INSERT INTO fd_accel.events SELECT g, CASE WHEN g <= 900 THEN now() - g * interval '1 minute' "
           f"ELSE now() - interval '3 days' END, (ARRAY['eu','us','ap'])[g % 3 + 1], g * 1.5 "
           f"FROM generate_series(1, {ROWS}) g")
    _admin("CREATE VIEW fd_accel.slow_events AS SELECT e.* FROM fd_accel.events e, pg_sleep(2)")
    _admin("GRANT USAGE ON SCHEMA fd_accel TO fd_accel_reader")
    _admin("GRANT SELECT ON ALL TABLES IN SCHEMA fd_accel TO fd_accel_reader")
    yield
    _admin("DROP SCHEMA IF EXISTS fd_accel CASCADE")


def _config(tmp_path: Path, acceleration: dict, table: str = "events", **dataset) -> dict:
    return {"runtime": {"data_dir": str(tmp_path / "data")},
            "datasets": [{"from": f"postgres:fd_accel.{table}", "name": "events", "params": READER,
                          "time_column": "at", "acceleration": acceleration, **dataset}]}


def _insert(first_id: int, count: int, at: str = "now()", region: str = "eu") -> None:
    _admin(f"INSERT INTO fd_accel.events SELECT g, {at}, '{region}', 1 FROM generate_series({first_id}, "
           f"{first_id + count - 1}) g")


def _scalar(runtime, sql: str):
    return runtime.engine.query(sql).read_all().column(0)[0].as_py()


def _source_queries(runtime) -> int:
    rows = runtime.engine.query("SELECT queries FROM flightdeck.runtime.source_stats "
                                "WHERE kind = 'postgres'").read_all()
    return rows.column(0)[0].as_py()


def _status(runtime) -> dict:
    rows = runtime.engine.query("SELECT * FROM flightdeck.runtime.datasets WHERE name = 'public.events'")
    return rows.read_all().to_pylist()[0]


def _loaded(runtime, name: str = "public.events"):
    refresher = runtime.accelerator.refresher(name)
    assert refresher.loaded.wait(30), refresher.status
    return refresher


@pytest.mark.parametrize("engine", ENGINES)
def test_full_refresh_shows_new_rows_after_the_next_refresh_only(source, tmp_path, engine):
    with serving(_config(tmp_path, {"engine": engine}), tmp_path) as runtime:
        _loaded(runtime)
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS
        _insert(5001, 7)
        queries = _source_queries(runtime)
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS  # the copy, not the source
        assert _source_queries(runtime) == queries
        status = runtime.refresh("events")
        assert status["state"] == "ready" and status["last_error"] is None
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS + 7
        assert _scalar(runtime, "SELECT sum(amount) FROM events WHERE id > 5000") == 7
        assert status["rows"] == ROWS + 7 and status["last_refresh_rows"] == ROWS + 7


@pytest.mark.parametrize("engine", ENGINES)
def test_append_refresh_reads_only_rows_newer_than_the_copy(source, tmp_path, engine):
    acceleration = {"engine": engine, "refresh_mode": "append", "primary_key": "id"}
    with serving(_config(tmp_path, acceleration), tmp_path) as runtime:
        _loaded(runtime)
        _insert(5001, 5, at="now() + interval '1 minute'")
        status = runtime.refresh("events")
        assert status["last_refresh_rows"] == 5  # only the new rows crossed the wire
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS + 5
        last_request = runtime.catalog.source_stats()[0]["last_request"]
        assert '"at" >' in last_request, last_request  # the time filter went to PostgreSQL
        assert runtime.refresh("events")["last_refresh_rows"] == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_append_overlap_picks_up_late_rows_without_duplicates(source, tmp_path, engine):
    acceleration = {"engine": engine, "refresh_mode": "append", "primary_key": "id",
                    "refresh_append_overlap": "1h"}
    with serving(_config(tmp_path, acceleration), tmp_path) as runtime:
        _loaded(runtime)
        _insert(6001, 3, at="now() - interval '10 minutes'")   # arrived late, still in the overlap
        _admin("UPDATE fd_accel.events SET amount = 99 WHERE id = 1")  # re-read in the overlap: upserted
        status = runtime.refresh("events")
        assert status["last_refresh_rows"] >= 3
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS + 3
        assert _scalar(runtime, "SELECT count(DISTINCT id) FROM events") == ROWS + 3
        assert _scalar(runtime, "SELECT amount FROM events WHERE id = 1") == 99


@pytest.mark.parametrize("engine", ENGINES)
def test_append_on_conflict_drop_keeps_the_first_copy(source, tmp_path, engine):
    acceleration = {"engine": engine, "refresh_mode": "append", "primary_key": "id",
                    "refresh_append_overlap": "1h", "on_conflict": {"id": "drop"}}
    with serving(_config(tmp_path, acceleration), tmp_path) as runtime:
        _loaded(runtime)
        _admin("UPDATE fd_accel.events SET amount = 99 WHERE id = 1")
        runtime.refresh("events")
        assert _scalar(runtime, "SELECT amount FROM events WHERE id = 1") == 1.5
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS


@pytest.mark.parametrize("engine", ENGINES)
def test_retention_deletes_old_rows_locally(source, tmp_path, engine):
    acceleration = {"engine": engine, "retention_period": "1d", "retention_check_interval": "1s"}
    config = _config(tmp_path, acceleration)
    # The same rows without retention: the copies' reported sizes must agree per row.
    config["datasets"].append({**config["datasets"][0], "name": "events_all",
                               "acceleration": {"engine": engine}})
    with serving(config, tmp_path) as runtime:
        _loaded(runtime)
        all_rows = _loaded(runtime, "public.events_all").status
        assert _scalar(runtime, "SELECT count(*) FROM events") == 900  # applied after the load
        assert _scalar(runtime, "SELECT min(id) FROM events") == 1
        kept = runtime.accelerator.refresher("public.events").status
        assert kept.bytes / 900 == pytest.approx(all_rows.bytes / all_rows.rows, rel=0.02)  # shrank with the rows
        _insert(7001, 4, at="now() - interval '2 days'")
        _insert(7101, 2)
        runtime.refresh("events")
        assert _scalar(runtime, "SELECT count(*) FROM events") == 902
        # The retention schedule also deletes rows that age out between refreshes.
        _admin("UPDATE fd_accel.events SET at = now() - interval '1 day' - interval '2 seconds' "
               "WHERE id = 7101")
        runtime.refresh("events")
        deadline = time.monotonic() + 10
        while _scalar(runtime, "SELECT count(*) FROM events") != 901 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _scalar(runtime, "SELECT count(*) FROM events") == 901
    assert _admin("SELECT count(*) FROM fd_accel.events")[0][0] == ROWS + 6  # never the source


@pytest.mark.parametrize("engine", ENGINES)
def test_refresh_sql_limits_the_working_set(source, tmp_path, engine):
    acceleration = {"engine": engine, "refresh_sql": "SELECT * FROM events WHERE region = 'eu'"}
    with serving(_config(tmp_path, acceleration), tmp_path) as runtime:
        _loaded(runtime)
        expected = _admin("SELECT count(*) FROM fd_accel.events WHERE region = 'eu'")[0][0]
        assert _scalar(runtime, "SELECT count(*) FROM events") == expected
        assert _scalar(runtime, "SELECT count(DISTINCT region) FROM events") == 1
        stats = runtime.catalog.source_stats()[0]
        assert '"region" = $1' in stats["last_request"] and stats["rows"] == expected  # filtered at the source


def test_refresh_data_window_keeps_recent_rows(source, tmp_path):
    with serving(_config(tmp_path, {"refresh_data_window": "1d"}), tmp_path) as runtime:
        _loaded(runtime)
        assert _scalar(runtime, "SELECT count(*) FROM events") == 900


@pytest.mark.parametrize("engine", ENGINES)
def test_on_zero_results_use_source_falls_through(source, tmp_path, engine):
    acceleration = {"engine": engine, "refresh_sql": "SELECT * FROM events WHERE region = 'eu'",
                    "on_zero_results": "use_source"}
    with serving(_config(tmp_path, acceleration), tmp_path) as runtime:
        _loaded(runtime)
        queries = _source_queries(runtime)
        eu = _scalar(runtime, "SELECT count(*) FROM events WHERE region = 'eu'")
        assert eu > 0 and _source_queries(runtime) == queries  # answered locally
        us = _scalar(runtime, "SELECT count(*) FROM events WHERE region = 'us'")
        assert us == _admin("SELECT count(*) FROM fd_accel.events WHERE region = 'us'")[0][0]
        assert _source_queries(runtime) == queries + 1


def test_return_empty_is_the_default(source, tmp_path):
    acceleration = {"refresh_sql": "SELECT * FROM events WHERE region = 'eu'"}
    with serving(_config(tmp_path, acceleration), tmp_path) as runtime:
        _loaded(runtime)
        assert _scalar(runtime, "SELECT count(*) FROM events WHERE region = 'us'") == 0


def test_ready_state_on_registration_reads_the_source_until_loaded(source, tmp_path):
    config = _config(tmp_path, {}, table="slow_events", ready_state="on_registration")
    with serving(config, tmp_path) as runtime:
        started = time.monotonic()
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS
        assert runtime.accelerator.refresher("public.events").status.state in ("loading", "ready")
        refresher = _loaded(runtime)
        assert refresher.status.refreshes == 1
        queries = _source_queries(runtime)
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS
        assert _source_queries(runtime) == queries
        assert time.monotonic() - started < 30


def test_ready_state_on_load_fails_clearly_before_the_first_load(source, tmp_path):
    config = _config(tmp_path, {"ready_timeout": "0.2s"}, table="slow_events")
    with serving(config, tmp_path) as runtime:
        with pytest.raises(Exception, match="events is not loaded yet.*on_load"):
            _scalar(runtime, "SELECT count(*) FROM events")
        _loaded(runtime)
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS


def test_on_load_queries_wait_for_the_first_load(source, tmp_path):
    with serving(_config(tmp_path, {}, table="slow_events"), tmp_path) as runtime:
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS  # waited, then read the copy
        assert runtime.accelerator.refresher("public.events").status.refreshes == 1


@pytest.mark.parametrize("engine", ["duckdb", "sqlite"])
def test_source_failure_mid_refresh_keeps_the_last_copy_and_retries_with_backoff(source, tmp_path, engine):
    config = _config(tmp_path, {"engine": engine, "refresh_retry_max_attempts": 3}, table="slow_events")
    with serving(config, tmp_path) as runtime:
        refresher = _loaded(runtime)
        good_as_of = refresher.status.data_as_of
        _insert(8001, 10)
        delays_before = len(refresher.retry_delays)
        worker = threading.Thread(target=runtime.refresh, args=("events",))
        worker.start()
        time.sleep(0.7)  # the refresh is waiting on PostgreSQL: revoke and cut its session
        _admin("REVOKE SELECT ON ALL TABLES IN SCHEMA fd_accel FROM fd_accel_reader")
        _admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'fd_accel_reader'")
        while worker.is_alive():
            assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS  # the last good copy answers
            time.sleep(0.2)
        status = _status(runtime)
        assert status["refresh_state"] == "ready" and status["failures"] == 3
        assert "permission denied" in status["last_error"] or "terminat" in status["last_error"], status
        assert status["data_as_of"] == good_as_of
        delays = refresher.retry_delays[delays_before:]  # 3 attempts, 2 waits, each in its doubled range
        assert len(delays) == 2 and 0.5 <= delays[0] <= 1.0 <= delays[1] <= 2.0, delays
        _admin("GRANT SELECT ON ALL TABLES IN SCHEMA fd_accel TO fd_accel_reader")
        status = runtime.refresh("events")
        assert status["last_error"] is None and status["state"] == "ready"
        assert _scalar(runtime, "SELECT count(*) FROM events") == ROWS + 10


@pytest.mark.parametrize("engine", ["duckdb", "sqlite"])
def test_sigkill_mid_refresh_leaves_the_file_copy_intact(source, tmp_path, engine):
    config = write_config(tmp_path / "flightdeck.yaml",
                          _config(tmp_path, {"engine": engine, "mode": "file"}, table="slow_events"))
    server = ServerProcess(["run", "-c", str(config), "--flight-port", "0"])
    try:
        status = _wait_for_state(server.url, "ready")
        first_as_of = status["data_as_of"]
        _insert(9001, 25)
        refresher = threading.Thread(target=_flight_refresh, args=(server.url,), daemon=True)
        refresher.start()
        _wait_for_state(server.url, "refreshing")
        time.sleep(0.5)
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
    restarted = ServerProcess(["run", "-c", str(config), "--flight-port", "0"])
    try:
        with flightsql.connect(restarted.url, autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM events")  # served at once from the kept copy
            assert cursor.fetchone()[0] == ROWS
            cursor.execute("SELECT data_as_of FROM flightdeck.runtime.datasets WHERE name = 'public.events'")
            assert cursor.fetchone()[0] == first_as_of
        _wait_for(lambda: _query(restarted.url, "SELECT count(*) FROM events")[0][0] == ROWS + 25)
    finally:
        restarted.stop()


def _flight_refresh(url: str, body: dict | None = None) -> dict:
    client = flight.FlightClient(url)
    try:
        action = flight.Action("Refresh", json.dumps(body or {"dataset": "events"}).encode())
        return json.loads(next(iter(client.do_action(action))).body.to_pybytes())
    except flight.FlightError:
        return {}
    finally:
        client.close()


def _query(url: str, sql: str) -> list[tuple]:
    with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def _wait_for(condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def _wait_for_state(url: str, state: str) -> dict:
    found = {}

    def reached() -> bool:
        rows = _query(url, "SELECT refresh_state, data_as_of FROM flightdeck.runtime.datasets "
                           "WHERE name = 'public.events'")
        found.update(state=rows[0][0], data_as_of=rows[0][1])
        return rows[0][0] == state

    _wait_for(reached)
    return found


def test_refresh_action_and_cli_with_one_off_refresh_sql(source, tmp_path):
    config = write_config(tmp_path / "flightdeck.yaml", _config(tmp_path, {}))
    server = ServerProcess(["run", "-c", str(config), "--flight-port", "0"])
    try:
        _wait_for_state(server.url, "ready")
        cli = subprocess.run([sys.executable, "-m", "flight.cli", "refresh", "events", "--url", server.url,
                              "--sql", "SELECT * FROM events WHERE id <= 10"],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        assert "10 rows" in cli.stdout
        assert _query(server.url, "SELECT count(*) FROM events")[0][0] == 10
        assert _flight_refresh(server.url)["rows"] == ROWS  # the configured working set again
        refused = subprocess.run([sys.executable, "-m", "flight.cli", "refresh", "nope", "--url", server.url],
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0 and "unknown dataset 'nope'" in refused.stderr
        assert "Traceback" not in refused.stderr
        bad = subprocess.run([sys.executable, "-m", "flight.cli", "refresh", "events", "--url", server.url,
                              "--sql", "DELETE FROM events"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "read" in bad.stderr.lower()
        listing = subprocess.run([sys.executable, "-m", "flight.cli", "datasets", "--url", server.url],
                                 cwd=REPO, capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0, listing.stderr
        assert "duckdb (memory)" in listing.stdout and "ready" in listing.stdout
    finally:
        server.stop()


def test_sixteen_clients_looping_cause_no_source_queries_between_refreshes(source, tmp_path):
    config = write_config(tmp_path / "flightdeck.yaml",
                          _config(tmp_path, {"refresh_check_interval": "10s"}))
    server = ServerProcess(["run", "-c", str(config), "--flight-port", "0"])
    answered = []
    errors = []

    def client(stop: threading.Event) -> None:
        count = 0
        try:
            with flightsql.connect(server.url, autocommit=True) as conn, conn.cursor() as cursor:
                while not stop.is_set():
                    cursor.execute("SELECT region, count(*), sum(amount) FROM events WHERE id > ? GROUP BY region",
                                   (count % 500,))
                    assert len(cursor.fetchall()) == 3
                    count += 1
        except Exception as error:  # reported below: a client must never fail
            errors.append(error)
        answered.append(count)

    try:
        _wait_for_state(server.url, "ready")
        before = _stats(server.url)
        stop = threading.Event()
        clients = [threading.Thread(target=client, args=(stop,)) for _ in range(16)]
        for thread in clients:
            thread.start()
        time.sleep(30)
        stop.set()
        for thread in clients:
            thread.join(timeout=30)
        after = _stats(server.url)
    finally:
        server.stop()
    assert not errors, errors[:3]
    refreshes = after["refreshes"] - before["refreshes"]
    print(f"\n16 clients, 30 s: {sum(answered):,} queries answered; {refreshes} refreshes; "
          f"source queries {after['queries'] - before['queries']}")
    assert sum(answered) > 16 * 10
    assert 2 <= refreshes <= 4
    assert after["queries"] - before["queries"] == refreshes  # one per refresh, none from the clients


def _stats(url: str) -> dict:
    """Source queries and finished refreshes, read while no refresh is under way: a refresh
    counts its query when it starts and itself when it ends."""
    refresh_sql = "SELECT refresh_state, refreshes FROM flightdeck.runtime.datasets WHERE name = 'public.events'"
    while True:
        state, refreshes = _query(url, refresh_sql)[0]
        queries = _query(url, "SELECT queries FROM flightdeck.runtime.source_stats WHERE kind = 'postgres'")[0][0]
        if state == "ready" and _query(url, refresh_sql)[0] == (state, refreshes):
            return {"queries": queries, "refreshes": refreshes}
        time.sleep(0.05)


def test_status_reports_engine_mode_rows_and_times(source, tmp_path):
    with serving(_config(tmp_path, {"engine": "sqlite", "mode": "file"}), tmp_path) as runtime:
        _loaded(runtime)
        status = _status(runtime)
    assert status["acceleration"] == "sqlite (file)" and status["refresh_state"] == "ready"
    assert status["rows"] == ROWS and status["bytes"] > 0 and status["refreshes"] == 1
    assert status["last_refresh_start"] <= status["last_refresh_end"]
    assert status["data_as_of"] == status["last_refresh_start"]
    assert (tmp_path / "data" / "accelerated.sqlite").exists()


@pytest.mark.parametrize("acceleration, message", [
    ({"engine": "arrow", "mode": "file"}, "engine 'arrow' keeps data in memory only"),
    ({"refresh_mode": "append"}, "needs the dataset's time_column"),
    ({"refresh_append_overlap": "5m", "refresh_mode": "append"}, "set primary_key"),
    ({"refresh_check_interval": "soon"}, "expected a duration"),
    ({"engine": "oracle"}, "datasets[0].acceleration.engine"),
])
def test_bad_acceleration_config_is_refused_precisely(tmp_path, acceleration, message):
    config = {"datasets": [{"from": "postgres:fd_accel.events", "name": "events",
                            "acceleration": acceleration}]}
    if acceleration.get("refresh_append_overlap"):
        config["datasets"][0]["time_column"] = "at"
    with pytest.raises(ConfigError) as raised:
        parse_config(config, tmp_path, {})
    assert message in str(raised.value)


@pytest.mark.parametrize("source", ["sqlite:missing.db:events", "file:not_yet.parquet", "http://127.0.0.1:9/x"])
def test_changes_from_a_source_that_cannot_stream_them_is_refused_at_start(tmp_path, source):
    """It was refused only once the dataset could be opened: a source missing at start (a file
    not yet written, a server down) was retried, then refused hours later."""
    config = {"datasets": [{"from": source, "name": "events", "acceleration": {"refresh_mode": "changes"}}]}
    with pytest.raises(ConfigError) as raised:
        parse_config(config, tmp_path, {})
    kind = source.partition(":")[0]
    assert f"refresh_mode 'changes' needs a source that streams its changes; {kind} does not" in str(raised.value)
    for streams in ("postgres:s.t", "mysql:db.t", "kafka:topic", "mongodb:db.c"):
        parse_config({"datasets": [{"from": streams, "name": "events", "acceleration": {"refresh_mode": "changes"}}]},
                     tmp_path, {})


def test_refresh_sql_must_read_the_dataset_itself(source, tmp_path):
    acceleration = {"refresh_sql": "SELECT id FROM events"}
    with pytest.raises(Exception, match=r"must be SELECT \* FROM events"):
        with serving(_config(tmp_path, acceleration), tmp_path):
            pass


def test_duckdb_sessions_cannot_reach_host_files(source, tmp_path):
    with serving(_config(tmp_path, {"mode": "file"}), tmp_path) as runtime:
        _loaded(runtime)
        engine = runtime.accelerator.refresher("public.events").store.duckdb
        cursor = engine.cursor()
        with pytest.raises(Exception, match="disabled|Permission"):
            cursor.execute("SELECT * FROM read_csv('/etc/passwd')")
        with pytest.raises(Exception, match="lock"):
            cursor.execute("SET enable_external_access = true")


def test_accelerated_time_values_keep_their_type(source, tmp_path):
    for engine in ENGINES:
        with serving(_config(tmp_path / engine, {"engine": engine}), tmp_path) as runtime:
            _loaded(runtime)
            row = runtime.engine.query("SELECT id, at, region, amount FROM events WHERE id = 3").read_all()
            assert str(row.schema.field("at").type) == "timestamp[us, tz=UTC]", engine
            assert str(row.schema.field("amount").type) == "decimal128(10, 2)", engine
            expected = _admin("SELECT at FROM fd_accel.events WHERE id = 3")[0][0]
            assert row.column("at")[0].as_py() == expected.astimezone(dt.timezone.utc), engine


@pytest.mark.parametrize("engine", ["duckdb", "sqlite"])
def test_configured_indexes_are_built_on_each_copy(source, tmp_path, engine):
    with serving(_config(tmp_path, {"engine": engine, "indexes": {"region": "enabled"}}), tmp_path) as runtime:
        store = _loaded(runtime).store
        runtime.refresh("events")  # the next copy gets its own index too
        if engine == "duckdb":
            cursor = store.duckdb.cursor()
            indexed = cursor.execute("SELECT expressions FROM duckdb_indexes() WHERE table_name = ?",
                                     [store.name]).fetchall()
        else:
            indexed = store.sqlite.writer.execute("SELECT name FROM pragma_index_list(?)", [store.name]).fetchall()
        assert len(indexed) == 1, indexed
        assert _scalar(runtime, "SELECT count(*) FROM events WHERE region = 'eu'") == \
            _admin("SELECT count(*) FROM fd_accel.events WHERE region = 'eu'")[0][0]


@pytest.mark.parametrize("engine", ["duckdb", "sqlite"])
def test_columns_named_alike_but_for_case_are_not_copied_into_an_engine_that_folds_them(tmp_path, engine):
    """DuckDB renamed the second of Note and note to note_1, and a read of note found Note: a key
    granted only note read Note's values. Such a dataset is read from its source instead."""
    (tmp_path / "events.jsonl").write_text(json.dumps({"id": 1, "Note": "HIDDEN-internal", "note": "public text"}) + "\n")
    config = {"datasets": [{"from": "file:events.jsonl", "name": "events", "acceleration": {"engine": engine}}],
              "runtime": {"auth": {"api_keys": ["admin-key-0123456789", {
                  "name": "agent", "key": "agent-key-0123456789", "columns": {"events": ["id", "note"]}}]}}}
    with serving(config, tmp_path) as runtime:
        assert "public.events" not in runtime.accelerator.refreshers
        with flightsql.connect(runtime.flight_url, autocommit=True, db_kwargs={
                "adbc.flight.sql.authorization_header": "Bearer agent-key-0123456789"}) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT * FROM events")
            assert cursor.fetchall() == [(1, "public text")]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_query_reading_a_copy_twice_reads_one_version_of_it(source, tmp_path, engine):
    """Each scan opened its own read of the copy: a query reading it twice (here a UNION ALL of
    two parts, which DataFusion runs since ILIKE is never sent down) could read one part before a
    refresh and the other after, and answer with rows of two versions."""
    with serving(_config(tmp_path, {"engine": engine}), tmp_path) as runtime:
        _loaded(runtime)
        sql = ("SELECT id, region FROM events WHERE id <= 500 AND region ILIKE '%' "
               "UNION ALL SELECT id, region FROM events WHERE id > 500 AND region ILIKE '%'")
        reader = runtime.engine.execute(runtime.engine.plan(sql))
        first = reader.read_next_batch()  # the first part is read: its scan has opened
        _admin("UPDATE fd_accel.events SET region = 'after'")
        assert runtime.refresh("events")["last_error"] is None
        rows = [first.to_pylist(), *(batch.to_pylist() for batch in reader)]
        regions = {row["region"] for batch in rows for row in batch}
        assert sum(map(len, rows)) == ROWS and "after" not in regions, regions
        assert _scalar(runtime, "SELECT count(*) FROM events WHERE region = 'after'") == ROWS


@pytest.mark.parametrize("engine", ["duckdb", "sqlite"])
def test_a_copy_kept_with_other_types_than_its_source_has_now_is_not_served(tmp_path, engine):
    """A file copy kept across a restart, its source's column retyped meanwhile: served at start
    with the old types, it failed every query that summed the column until the next restart."""
    import pyarrow as pa
    from accel.duckdb_store import DuckDBEngine, DuckDBStore
    from accel.sqlite_store import SQLiteEngine, SQLiteStore
    from accel.store import Stamp

    kinds = {"duckdb": (lambda: DuckDBEngine(tmp_path / "data", tmp_path), DuckDBStore),
             "sqlite": (lambda: SQLiteEngine("file", tmp_path / "data", tmp_path), SQLiteStore)}
    make_engine, store_of = kinds[engine]
    was = pa.schema([("id", pa.int32()), ("v", pa.int32()), ("note", pa.string()), ("at", pa.timestamp("us", "UTC"))])
    store = store_of("public.amounts", was, "file", make_engine())
    store.replace(pa.RecordBatchReader.from_batches(was, [pa.record_batch(
        [pa.array([1], pa.int32()), pa.array([1], pa.int32()), pa.array(["a"]),
         pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)], pa.timestamp("us", "UTC"))], schema=was)]),
        Stamp(dt.datetime.now(dt.timezone.utc)))
    store.duckdb.close() if engine == "duckdb" else store.sqlite.close()
    restarted = make_engine()  # the next start
    assert store_of("public.amounts", was, "file", restarted).has_copy()
    retyped = was.set(1, pa.field("v", pa.decimal128(10, 2)))
    assert not store_of("public.amounts", retyped, "file", restarted).has_copy()
    restarted.close()


@pytest.mark.parametrize("mode", ["memory", "file"])
def test_a_slow_source_holds_up_no_other_sqlite_copy(tmp_path, mode):
    """Every SQLite copy of a mode writes through one writer: a refresh that held it while its
    source was still sending rows made every other copy's refresh and changes wait for that source."""
    import pyarrow as pa
    from accel.sqlite_store import STAGING_PREFIX, SQLiteEngine, SQLiteStore
    from accel.store import Stamp

    schema = pa.schema([("id", pa.int64()), ("v", pa.string())])
    engine = SQLiteEngine(mode, tmp_path / "data", tmp_path)
    slow, quick = SQLiteStore("public.slow", schema, mode, engine), SQLiteStore("public.quick", schema, mode, engine)
    more_rows = threading.Event()

    def slow_source():
        yield pa.record_batch([pa.array([1]), pa.array(["a"])], schema=schema)
        assert more_rows.wait(60)
        yield pa.record_batch([pa.array([2]), pa.array(["b"])], schema=schema)

    now = dt.datetime.now(dt.timezone.utc)
    slow_refresh = threading.Thread(target=lambda: slow.replace(
        pa.RecordBatchReader.from_batches(schema, slow_source()), Stamp(now)))
    slow_refresh.start()
    try:
        time.sleep(0.2)  # the slow source has sent its first batch and waits
        quick_refresh = threading.Thread(target=lambda: quick.replace(
            pa.RecordBatchReader.from_batches(schema, [pa.record_batch([pa.array([7]), pa.array(["q"])],
                                                                       schema=schema)]), Stamp(now)))
        quick_refresh.start()
        quick_refresh.join(30)
        assert not quick_refresh.is_alive() and slow_refresh.is_alive()
        quick.upsert(pa.RecordBatchReader.from_batches(schema, [pa.record_batch(
            [pa.array([8]), pa.array(["r"])], schema=schema)]), Stamp(now), ("id",), "upsert")
        assert quick.row_count() == 2 and not slow.has_copy()
    finally:
        more_rows.set()
        slow_refresh.join(60)
    assert slow.row_count() == 2 and not list((tmp_path / "data").glob(f"{STAGING_PREFIX}*"))
    engine.close()
    if mode == "file":  # what a process killed while staging left is cleared at the next start
        left = tmp_path / "data" / f"{STAGING_PREFIX}killed"
        left.mkdir()
        (left / "rows.arrow").write_bytes(b"x" * 1000)
        SQLiteEngine(mode, tmp_path / "data", tmp_path).close()
        assert not left.exists()


def _duckdb_copy(tmp_path: Path, table: pa.Table):
    """A memory-mode DuckDB copy of ``table`` (an ``id`` column first), as its store."""
    from accel.duckdb_store import DuckDBEngine, DuckDBStore
    from accel.store import Stamp

    store = DuckDBStore("public.kept", table.schema, "memory", DuckDBEngine(None, tmp_path))
    store.replace(pa.RecordBatchReader.from_batches(table.schema, table.to_batches()),
                  Stamp(dt.datetime.now(dt.timezone.utc)))
    return store


def _ids(first: int, last: int) -> pa.Table:
    ids = list(range(first, last + 1))
    return pa.table({"id": pa.array(ids, pa.int64()),
                     "at": pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * len(ids),
                                    pa.timestamp("us", "UTC"))})


def test_a_duckdb_read_kept_for_the_next_statement_sees_every_commit(tmp_path):
    """Reads of the DuckDB copies keep their cursor and READ ONLY transaction from one statement
    to the next; kept across a commit, a transaction would answer from before it."""
    from accel.store import Stamp
    from federation.connectors.duckdb import arrow_stream

    store = _duckdb_copy(tmp_path, _ids(1, 3))
    reader = store.connector

    def ids() -> list[int]:
        stream = reader.open_stream(f"SELECT id FROM {store.table} ORDER BY id", None, None)
        return stream.read_all().column("id").to_pylist()

    def rows(table: pa.Table) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(table.schema, table.to_batches())

    now = Stamp(dt.datetime.now(dt.timezone.utc))
    assert ids() == [1, 2, 3]
    store.replace(rows(_ids(1, 5)), now)
    assert ids() == [1, 2, 3, 4, 5]
    store.upsert(rows(_ids(5, 7)), now, ("id",), "upsert")
    assert ids() == [1, 2, 3, 4, 5, 6, 7]
    store.apply_changes(None, _ids(1, 1).select(["id"]), ("id",), now, {"lsn": 1})
    assert ids() == [2, 3, 4, 5, 6, 7]
    store.delete_older("id", 4)
    assert ids() == [4, 5, 6, 7]
    in_use = reader.reads.take()  # a statement under way while a refresh commits
    arrow_stream(in_use.cursor, f"SELECT count(*) FROM {store.table}", None).read_all()
    store.replace(rows(_ids(1, 2)), now)
    in_use.give_back(True)
    assert ids() == [1, 2]
    ending = reader.reads.take()  # a statement that ends while a commit is under way
    arrow_stream(ending.cursor, f"SELECT count(*) FROM {store.table}", None).read_all()
    with reader.reads.committing():
        writer = store.duckdb.cursor()
        writer.execute(f"INSERT INTO {store.table} VALUES (3, TIMESTAMPTZ '2026-01-01 00:00:00+00')")
        writer.close()
        ending.give_back(True)
    assert ids() == [1, 2, 3]
    assert ids() == [1, 2, 3]
    store.duckdb.close()


def test_a_cancel_that_comes_after_its_statement_ended_stops_no_later_statement(tmp_path):
    """A cursor handed back is kept for the next statement, maybe another client's: the first
    one's cancel (its deadline, its client gone) must not interrupt it."""
    import duckdb
    from federation.connectors.duckdb import arrow_stream

    store = _duckdb_copy(tmp_path, _ids(1, 3))
    reads = store.connector.reads
    long_count = "SELECT count(*) AS n FROM range(500000000) WHERE hash(range) % 2 < 2"  # a second or two
    first = reads.take()
    arrow_stream(first.cursor, "SELECT 1", None).read_all()
    first.give_back(True)
    second = reads.take()
    assert second.cursor is first.cursor  # kept
    outcome = {}

    def run() -> None:
        try:
            outcome["rows"] = arrow_stream(second.cursor, long_count, None).read_all().to_pylist()
        except duckdb.Error as error:
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.3)
    first.interrupt()  # late: its statement ended
    worker.join(120)
    assert outcome == {"rows": [{"n": 500000000}]}, outcome
    outcome.clear()
    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.3)
    second.interrupt()  # its own statement's cancel does stop it
    worker.join(120)
    assert isinstance(outcome.get("error"), duckdb.InterruptException), outcome
    second.give_back(False)
    assert reads.take().cursor is not second.cursor  # an interrupted cursor is not kept
    store.duckdb.close()


def test_a_commit_ends_the_kept_reads_that_would_hold_the_rows_it_replaced(tmp_path):
    """DuckDB keeps a replaced copy's rows for as long as a transaction older than the commit
    is open: a read kept idle across the refresh would hold a second copy in memory."""
    from accel.store import Stamp

    big = pa.table({"id": pa.array(range(3_000_000), pa.int64()),
                    "at": pa.array([dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)] * 3_000_000,
                                   pa.timestamp("us", "UTC"))})
    store = _duckdb_copy(tmp_path, big)

    def mebibytes() -> int:
        cursor = store.duckdb.cursor()
        try:
            return cursor.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()[0] // 2**20
        finally:
            cursor.close()

    stream = store.connector.open_stream(f"SELECT count(*) AS n FROM {store.table}", None, None)
    assert stream.read_all().column("n").to_pylist() == [3_000_000]  # its cursor is kept, idle
    held = mebibytes()
    small = _ids(1, 1)
    store.replace(pa.RecordBatchReader.from_batches(small.schema, small.to_batches()),
                  Stamp(dt.datetime.now(dt.timezone.utc)))
    assert held >= 20 and mebibytes() < held // 4, (held, mebibytes())
    store.duckdb.close()
