"""A dataset whose source cannot be opened at startup is tried again in the background and,
once its source is back, served as if it had been there from the start: read where it is,
accelerated and searchable as configured, through every key that sees it. A table whose columns
change under the server is read as it is now."""
from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from contextlib import contextmanager
from decimal import Decimal
from typing import Any, Callable, Iterator

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_manager
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import postgres, require_postgres, serving
from flightdeck.auth import Credentials
from flightdeck.stack import MASK_MISMATCH, COLUMNS_CHANGED_UNDER_GRANTS

AGENT = "late-agent-key-0123456789"
OPERATOR = "late-operator-key-0123456789"  # a plain key: sees everything
RETRY_SECONDS = 0.2


class PostgresBehindAPort:
    """A port where nothing listens, until ``open()``: then every connection to it is relayed
    to the test PostgreSQL (a database coming back after a restart, on its usual address)."""

    def __init__(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._listener: socket.socket | None = None

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", 5432))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_relay, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()


def _relay(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for end in (source, sink):
            try:
                end.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _eventually(check: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def _rows(url: str, sql: str, key: str = OPERATOR) -> list[dict]:
    with flightsql.connect(url, autocommit=True,
                           db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {key}"}) as conn, \
            conn.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetch_arrow_table().to_pylist()


def _error(url: str, sql: str, key: str = OPERATOR) -> str:
    with pytest.raises(adbc_driver_manager.Error) as raised:
        _rows(url, sql, key)
    return str(raised.value)


def _postgres_schema(name: str, *statements: str) -> Iterator[None]:
    """A PostgreSQL schema of its own for a test, made by ``statements``, dropped after."""
    require_postgres()
    postgres(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    postgres(f"CREATE SCHEMA {name}")
    for statement in statements:
        postgres(statement)
    yield
    postgres(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@pytest.fixture
def late_table() -> Iterator[None]:
    yield from _postgres_schema(
        "fd_late", "CREATE TABLE fd_late.tickets (id int PRIMARY KEY, title text, opened timestamptz)",
        "INSERT INTO fd_late.tickets SELECT i, 'checkout latency ' || i, now() FROM generate_series(1, 50) i")


def test_a_postgres_source_back_after_startup_is_served_read_accelerated_and_searched(tmp_path, late_table):
    database = PostgresBehindAPort()
    (tmp_path / "ok.csv").write_text("a\n1\n")
    params = {"pg_host": "127.0.0.1", "pg_port": database.port, "pg_db": "test", "pg_user": "postgres",
              "connect_timeout": 2}
    config = {
        "datasets": [
            {"from": "postgres:fd_late.tickets", "name": "late.tickets", "params": params},
            {"from": "postgres:fd_late.tickets", "name": "late.copy", "params": params,
             "acceleration": {"engine": "duckdb", "refresh_check_interval": 3600},
             "columns": [{"name": "title", "full_text_search": {"enabled": True}}]},
            {"from": "file:ok.csv", "name": "ok"},
        ],
        "runtime": {"retry_unavailable_seconds": RETRY_SECONDS,
                    "auth": {"api_keys": [OPERATOR, {"name": "late-agent", "key": AGENT, "datasets": ["late.*"]}]}},
    }
    try:
        with serving(config, tmp_path) as running:
            url = running.flight_url
            for name in ("late.tickets", "late.copy"):
                assert running.catalog.datasets[name].state == "unavailable"
                assert f"dataset {name} is unavailable" in _error(url, f"SELECT count(*) FROM {name}", AGENT)
            assert "late.copy" not in running.accelerator.refreshers
            time.sleep(3 * RETRY_SECONDS)  # tried again, still down: still unavailable, nothing else changed
            assert running.catalog.datasets["late.tickets"].state == "unavailable"
            assert _rows(url, "SELECT a FROM ok") == [{"a": 1}]

            assert running.service.ready()
            database.open()
            _eventually(lambda: running.catalog.datasets["late.tickets"].state == "ready"
                        and running.catalog.datasets["late.copy"].state == "ready")
            # The server was ready without them: a late copy's first load does not take it back.
            assert running.service.ready()
            # Through the key whose session was made while the datasets were down, and a plain one.
            for key in (AGENT, OPERATOR):
                assert _rows(url, "SELECT count(*) AS n FROM late.tickets", key) == [{"n": 50}]
            refresher = running.accelerator.refresher("late.copy")
            assert refresher.loaded.wait(60)
            assert _rows(url, "SELECT count(*) AS n FROM late.copy", AGENT) == [{"n": 50}]
            before = _postgres_queries(running)  # the copy answers, not PostgreSQL
            assert _rows(url, "SELECT max(id) AS m FROM late.copy WHERE id < 10", AGENT) == [{"m": 9}]
            assert _postgres_queries(running) == before
            _eventually(lambda: running.stack.search.data_as_of("late.copy") is not None)
            found = _rows(url, "SELECT id FROM text_search('late.copy', 'latency 17', 1)", AGENT)
            assert found == [{"id": 17}]
            agent = running.service.authenticate(Credentials(bearer=AGENT))
            assert {d["name"]: d["state"] for d in running.service.datasets(agent)} == {
                "late.tickets": "ready", "late.copy": "ready"}
    finally:
        database.close()


def _postgres_queries(running) -> int:
    return sum(s["queries"] for s in running.catalog.source_stats() if s["kind"] == "postgres")


def _postgres_reads(running) -> int:
    """Reads sent to PostgreSQL, answered or failed."""
    return sum(s["queries"] + s["errors"] for s in running.catalog.source_stats() if s["kind"] == "postgres")


def test_a_file_written_after_startup_is_served_and_a_mask_it_breaks_keeps_it_unavailable(tmp_path):
    (tmp_path / "ok.csv").write_text("a\n1\n")
    config = {
        "datasets": [{"from": "file:late.parquet", "name": "late"},
                     {"from": "file:masked.parquet", "name": "masked"},
                     {"from": "file:ok.csv", "name": "ok"}],
        "runtime": {"retry_unavailable_seconds": RETRY_SECONDS,
                    "auth": {"api_keys": [OPERATOR, {"name": "late-agent", "key": AGENT,
                                           "masks": {"masked": {"email": "redact"}}}]}},
    }
    with serving(config, tmp_path) as running:
        url = running.flight_url
        assert _rows(url, "SELECT a FROM ok", AGENT) == [{"a": 1}]  # the key's session is made now
        assert "dataset late is unavailable" in _error(url, "SELECT * FROM late", AGENT)
        pq.write_table(pa.table({"id": [1, 2], "email": ["a@x.io", "b@x.io"]}), tmp_path / "late.parquet")
        pq.write_table(pa.table({"id": [1], "mail": ["c@x.io"]}), tmp_path / "masked.parquet")
        _eventually(lambda: running.catalog.datasets["public.late"].state == "ready"
                    and "public.masked" not in running.stack.late.pending())
        assert _rows(url, "SELECT sum(id) AS s FROM late", AGENT) == [{"s": 3}]
        # The key masks a column the file turned out not to have: the typo would leave the real
        # column unmasked, so the dataset is not served and not tried again. What is wrong (the
        # key's name, the file's columns) is the server log's, not any client's.
        masked = running.catalog.datasets["public.masked"]
        assert masked.state == "unavailable" and masked.error == MASK_MISMATCH
        assert "public.masked" not in running.stack.late.pending()
        for key in (AGENT, OPERATOR):
            message = _error(url, "SELECT * FROM masked", key)
            assert f"dataset masked is unavailable: {MASK_MISMATCH}" in message
            assert "mail" not in message and "late-agent" not in message


def test_a_source_that_never_answers_holds_up_no_other_dataset_key_or_stop(tmp_path):
    """A source down at startup comes back accepting connections but saying nothing: its next
    attempt waits for its connect_timeout, and meanwhile another dataset comes in, a key's first
    query runs and the server stops."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "ok.csv").write_text("a\n1\n")
    config = {
        "datasets": [
            {"from": "postgres:public.t", "name": "silent",
             "params": {"pg_host": "127.0.0.1", "pg_port": port, "pg_db": "test", "pg_user": "postgres",
                        "connect_timeout": 120}},
            {"from": "file:late.csv", "name": "late"},
            {"from": "file:ok.csv", "name": "ok"},
        ],
        "runtime": {"retry_unavailable_seconds": RETRY_SECONDS,
                    "auth": {"api_keys": [OPERATOR, {"name": "late-agent", "key": AGENT, "datasets": ["ok", "late"]}]}},
    }
    silent = None
    try:
        with serving(config, tmp_path) as running:
            # Connections now complete, and then nothing is read or sent.
            silent = socket.create_server(("127.0.0.1", port))
            silenced = time.monotonic()
            time.sleep(5 * RETRY_SECONDS)  # the silent source's next attempt is under way
            (tmp_path / "late.csv").write_text("a\n5\n")
            _eventually(lambda: running.catalog.datasets["public.late"].state == "ready", seconds=60)
            assert _rows(running.flight_url, "SELECT a FROM late", AGENT) == [{"a": 5}]  # a new key's session
            assert "public.silent" in running.stack.late.pending()
        assert time.monotonic() - silenced < 100  # stopped without waiting out the silent attempt
    finally:
        if silent is not None:
            silent.close()


@pytest.fixture
def altered_table() -> Iterator[None]:
    yield from _postgres_schema(
        "fd_altered", "CREATE TABLE fd_altered.amounts (id int PRIMARY KEY, v int, secret text)",
        "INSERT INTO fd_altered.amounts SELECT i, i, 's' || i FROM generate_series(1, 4) i")


def _amounts(agent: dict, acceleration: dict | None = None, table: str = "fd_altered.amounts") -> dict:
    """A config serving ``table`` as ``amounts`` to the operator and to an agent key limited by
    ``agent`` (its columns or masks), its source checked every RETRY_SECONDS; when accelerated,
    its column ``secret`` searchable by full text."""
    dataset = {"from": f"postgres:{table}", "name": "amounts",
               "params": {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"}}
    if acceleration is not None:
        dataset["acceleration"] = acceleration
        dataset["columns"] = [{"name": "secret", "full_text_search": {"enabled": True}}]
    return {"datasets": [dataset],
            "runtime": {"schema_check_seconds": RETRY_SECONDS, "retry_unavailable_seconds": RETRY_SECONDS,
                        "auth": {"api_keys": [OPERATOR, {"name": "late-agent", "key": AGENT, **agent}]}}}


def _connect(url: str, key: str):
    return flightsql.connect(url, autocommit=True, db_kwargs={"adbc.flight.sql.authorization_header": f"Bearer {key}"})


def test_a_column_retyped_at_the_source_is_read_as_it_is_now(tmp_path, altered_table):
    """A column retyped from integer to numeric under a running server: plans kept the integer
    type and pushed sum(CAST(v AS BIGINT)), which PostgreSQL answered with rounded values."""
    config = _amounts({"columns": {"amounts": ["id", "v", "added"]}})
    with serving(config, tmp_path) as running, _connect(running.flight_url, OPERATOR) as kept, \
            kept.cursor() as prepared:
        url = running.flight_url
        for key in (OPERATOR, AGENT):
            assert _rows(url, "SELECT sum(v) AS s FROM amounts", key) == [{"s": 10}]
        prepared.adbc_prepare("SELECT * FROM amounts ORDER BY id")  # kept by its client across the change
        prepared.execute("SELECT * FROM amounts ORDER BY id")
        assert prepared.fetch_arrow_table().schema.names == ["id", "v", "secret"]
        postgres("ALTER TABLE fd_altered.amounts ALTER COLUMN v TYPE numeric(10, 2)")
        postgres("ALTER TABLE fd_altered.amounts ADD COLUMN added text DEFAULT 'x'")
        postgres("UPDATE fd_altered.amounts SET v = v + 0.4")
        _eventually(lambda: "added" in running.catalog.datasets["public.amounts"].arrow_schema.names)
        for key in (OPERATOR, AGENT):  # the key's session was made before the change
            assert [float(r["s"]) for r in _rows(url, "SELECT sum(v) AS s FROM amounts", key)] == [11.6]
            assert _rows(url, "SELECT added FROM amounts WHERE id = 1", key) == [{"added": "x"}]
        assert "secret" in _error(url, "SELECT secret FROM amounts", AGENT)  # still hidden from the key
        prepared.execute("SELECT * FROM amounts ORDER BY id")
        table = prepared.fetch_arrow_table()
        assert table.schema.names == ["id", "v", "secret", "added"] and float(table["v"][0].as_py()) == 1.4


@pytest.mark.parametrize("engine", ["duckdb", "sqlite", "arrow"])
def test_an_accelerated_copy_is_made_again_when_its_source_changes_its_columns(tmp_path, altered_table, engine):
    """Refreshes read the source with the columns the dataset was opened with: a column retyped
    from integer to numeric failed every refresh ("Failed to parse string: '4.40' as a scalar of
    type int32"), and the copy served the old rows, without the added column, until a restart.
    A failed refresh now has the source's columns checked: they changed, the copy is made again."""
    config = _amounts({"columns": {"amounts": ["id", "v", "added"]}},  # refreshed on demand only
                      acceleration={"enabled": True, "engine": engine, "refresh_retry_enabled": False})
    with serving(config, tmp_path) as running:
        url = running.flight_url
        refresher = running.accelerator.refresher("amounts")
        assert refresher.loaded.wait(60)
        assert _rows(url, "SELECT sum(v) AS s FROM amounts", AGENT) == [{"s": 10}]
        postgres("DO $$ BEGIN ALTER TABLE fd_altered.amounts ALTER COLUMN v TYPE numeric(10, 2); "
                 "ALTER TABLE fd_altered.amounts ADD COLUMN added text DEFAULT 'x'; "
                 "UPDATE fd_altered.amounts SET v = v + 0.4; END $$")  # one migration
        assert "Failed to parse string" in running.stack.refresh("public.amounts")["last_error"]
        _eventually(lambda: refresher.copy_serves and refresher.status.refreshes == 2)
        read_at_source = _postgres_queries(running)
        for key in (OPERATOR, AGENT):
            assert [float(r["s"]) for r in _rows(url, "SELECT sum(v) AS s FROM amounts", key)] == [11.6]
            assert _rows(url, "SELECT added FROM amounts WHERE id = 1", key) == [{"added": "x"}]
        assert _postgres_queries(running) == read_at_source  # the new copy answers
        # Its search indexes were made again for the new columns, from the new copy.
        assert _rows(url, "SELECT id, v, added FROM text_search('amounts', 's3', 1)") == [
            {"id": 3, "v": Decimal("3.40"), "added": "x"}]
        postgres("UPDATE fd_altered.amounts SET v = v + 1")
        running.stack.refresh("public.amounts")  # later refreshes read the new columns too
        assert [float(r["s"]) for r in _rows(url, "SELECT sum(v) AS s FROM amounts", AGENT)] == [15.6]


def _taken_out_until_a_restart(url: str, dataset: Callable[[], Any]) -> None:
    """The dataset is taken out for its columns' change under a grant, for every key, and stays
    out while its source is checked again."""
    _eventually(lambda: dataset().error == COLUMNS_CHANGED_UNDER_GRANTS)
    for key in (AGENT, OPERATOR):
        assert "dataset amounts is unavailable" in _error(url, "SELECT * FROM amounts", key)
    time.sleep(5 * RETRY_SECONDS)  # checked again meanwhile: still out
    assert dataset().error == COLUMNS_CHANGED_UNDER_GRANTS


def test_a_masked_column_dropped_or_renamed_at_the_source_is_never_shown_unmasked(tmp_path, altered_table):
    """A mask follows a column's name. A masked column dropped takes the dataset out until it is
    back; a masked column renamed, a new one taking its name, would show the old values under
    the new name: the dataset is taken out until a restart."""
    config = _amounts({"masks": {"amounts": {"secret": "redact"}}})
    dataset = lambda: running.catalog.datasets["public.amounts"]  # noqa: E731
    with serving(config, tmp_path) as running:
        url = running.flight_url
        assert _rows(url, "SELECT secret FROM amounts WHERE id = 1", AGENT) == [{"secret": None}]
        postgres("ALTER TABLE fd_altered.amounts DROP COLUMN secret")
        _eventually(lambda: dataset().error == MASK_MISMATCH)
        assert f"dataset amounts is unavailable: {MASK_MISMATCH}" in _error(url, "SELECT id FROM amounts", AGENT)
        postgres("ALTER TABLE fd_altered.amounts ADD COLUMN secret text DEFAULT 'back'")
        _eventually(lambda: dataset().state == "ready")
        assert _rows(url, "SELECT secret FROM amounts WHERE id = 1", AGENT) == [{"secret": None}]
        assert _rows(url, "SELECT secret FROM amounts WHERE id = 1") == [{"secret": "back"}]
        postgres("DO $$ BEGIN ALTER TABLE fd_altered.amounts RENAME COLUMN secret TO secret_old; "
                 "ALTER TABLE fd_altered.amounts ADD COLUMN secret text; END $$")  # one migration
        _taken_out_until_a_restart(url, dataset)


def test_a_hidden_column_renamed_to_a_name_a_grant_lists_takes_the_dataset_out(tmp_path, altered_table):
    """A grant's column list follows names: the column it lists renamed away and a hidden one
    renamed to its name showed the hidden values under the listed name. A rename (a name gone
    and one new) under a column grant takes the dataset out until a restart; a column added or
    dropped alone does not."""
    config = _amounts({"columns": {"amounts": ["id", "v", "added"]}})
    dataset = lambda: running.catalog.datasets["public.amounts"]  # noqa: E731
    with serving(config, tmp_path) as running:
        url = running.flight_url
        postgres("ALTER TABLE fd_altered.amounts ADD COLUMN added text DEFAULT 'x'")
        _eventually(lambda: _rows(url, "SELECT * FROM amounts WHERE id = 1", AGENT) == [
            {"id": 1, "v": 1, "added": "x"}])
        postgres("ALTER TABLE fd_altered.amounts DROP COLUMN added")  # read as before until it is seen
        _eventually(lambda: "added" not in dataset().arrow_schema.names)
        assert _rows(url, "SELECT * FROM amounts WHERE id = 1", AGENT) == [{"id": 1, "v": 1}]
        assert dataset().error is None
        postgres("DO $$ BEGIN ALTER TABLE fd_altered.amounts RENAME COLUMN v TO v_old; "
                 "ALTER TABLE fd_altered.amounts RENAME COLUMN secret TO v; END $$")  # one migration
        _taken_out_until_a_restart(url, dataset)


def test_a_copy_whose_masked_column_is_dropped_or_renamed_never_shows_it_unmasked(tmp_path, altered_table):
    """A masked column dropped fails the copy's refresh, which has the columns checked: the
    dataset is out until the column is back (not refreshed meanwhile), then copied again. A masked column renamed, a new
    one taking its name, fails no refresh: the copy keeps its columns, and the values the mask
    hid are never copied under either name."""
    config = _amounts({"masks": {"amounts": {"secret": "redact"}}},
                      acceleration={"enabled": True, "refresh_retry_enabled": False, "refresh_check_interval": 1})
    dataset = lambda: running.catalog.datasets["public.amounts"]  # noqa: E731
    with serving(config, tmp_path) as running:
        url = running.flight_url
        assert running.accelerator.refresher("amounts").loaded.wait(60)
        assert _rows(url, "SELECT id FROM text_search('amounts', 's1', 1)") == [{"id": 1}]
        postgres("ALTER TABLE fd_altered.amounts DROP COLUMN secret")
        _eventually(lambda: dataset().error == MASK_MISMATCH)
        assert f"dataset amounts is unavailable: {MASK_MISMATCH}" in _error(url, "SELECT id FROM amounts", AGENT)
        assert "no searchable column amounts" in _error(url, "SELECT id FROM text_search('amounts', 's1', 1)")
        out = _postgres_reads(running)
        time.sleep(2.5)
        assert _postgres_reads(running) == out  # no refresh bound to fail (one a second) while it is out
        back = dt.datetime.now(dt.timezone.utc)
        postgres("ALTER TABLE fd_altered.amounts ADD COLUMN secret text DEFAULT 'back'")
        _eventually(lambda: dataset().state == "ready" and running.accelerator.refresher("amounts").copy_serves)
        assert running.accelerator.refresher("amounts").status.data_as_of > back  # not the copy from before
        read_at_source = _postgres_queries(running)
        assert _rows(url, "SELECT secret FROM amounts WHERE id = 1", AGENT) == [{"secret": None}]
        assert _rows(url, "SELECT secret FROM amounts WHERE id = 1") == [{"secret": "back"}]
        assert _postgres_queries(running) - read_at_source <= 1  # from the copy made again (a refresh may come)
        postgres("DO $$ BEGIN ALTER TABLE fd_altered.amounts RENAME COLUMN secret TO secret_old; "
                 "ALTER TABLE fd_altered.amounts ADD COLUMN secret text; END $$")  # one migration
        assert running.stack.refresh("public.amounts")["last_error"] is None
        time.sleep(5 * RETRY_SECONDS)  # no check is due: the refresh succeeded
        for key in (AGENT, OPERATOR):
            assert _rows(url, "SELECT * FROM amounts WHERE id = 1", key) == [{"id": 1, "v": 1, "secret": None}]


@pytest.fixture
def slow_view() -> Iterator[None]:
    yield from _postgres_schema(
        "fd_slow_view", "CREATE TABLE fd_slow_view.t (id int PRIMARY KEY, v int)",
        "INSERT INTO fd_slow_view.t SELECT i, i FROM generate_series(1, 4) i",
        "CREATE VIEW fd_slow_view.amounts AS SELECT t.* FROM fd_slow_view.t, pg_sleep(2)")


def test_a_stop_while_a_copy_is_made_again_ends_it_first(tmp_path, slow_view):
    """The copy made again with the new columns was read on a thread of its own, which the stop
    did not wait for: closing DuckDB under it failed ("connection is busy") and the process
    aborted. It is now read on the refresher's thread, and the stop ends it at its next batch."""
    config = _amounts({"columns": {"amounts": ["id", "v"]}}, table="fd_slow_view.amounts",
                      acceleration={"enabled": True, "refresh_retry_enabled": False})
    with serving(config, tmp_path) as running:
        refresher = running.accelerator.refresher("amounts")
        assert refresher.loaded.wait(60)
        postgres("DO $$ BEGIN DROP VIEW fd_slow_view.amounts; "
                 "ALTER TABLE fd_slow_view.t ALTER COLUMN v TYPE numeric(10, 2); "
                 "CREATE VIEW fd_slow_view.amounts AS SELECT t.*, 'x' AS secret FROM fd_slow_view.t, pg_sleep(2); "
                 "END $$")
        assert "Failed to parse string" in running.stack.refresh("public.amounts")["last_error"]
        _eventually(lambda: not refresher.copy_serves)  # the copy is being made again: its source takes 2 s
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 10
    assert refresher.status.refreshes == 1 and "the refresh was stopped" in refresher.status.last_error


def test_a_copy_no_longer_kept_serves_nothing_and_the_stop_waits_for_its_refresh(tmp_path, slow_view):
    """A copy is no longer kept when its source's new columns cannot be held (two names differing
    only in case). A refresh of it under way went on, then routed the dataset's queries to a copy
    that nothing refreshed any more (stale answers until a restart); and the stop, not waiting for
    it, aborted the process on DuckDB's busy connection."""
    config = _amounts({"columns": {"amounts": ["id", "v"]}}, table="fd_slow_view.amounts",
                      acceleration={"enabled": True, "refresh_retry_enabled": False})
    with serving(config, tmp_path) as running:
        refresher = running.accelerator.refresher("amounts")
        assert refresher.loaded.wait(60)
        source = running.catalog.datasets["public.amounts"].source_connector
        refreshes = [threading.Thread(target=refresher.refresh) for _ in range(2)]
        refreshes[0].start()
        _eventually(lambda: refresher.status.state == "refreshing")  # its source answers in 2 s
        running.accelerator.stop_copying("public.amounts", wait=False)
        running.catalog.route("public.amounts", source, "fd_slow_view.amounts")  # read where it is, as the Stack does
        refreshes[0].join(30)
        assert running.catalog.datasets["public.amounts"].connector is source
        assert refresher.status.refreshes == 1 and "the refresh was stopped" in refresher.status.last_error
        postgres("UPDATE fd_slow_view.t SET v = v + 100")
        assert _rows(running.flight_url, "SELECT sum(v) AS s FROM amounts", AGENT) == [{"s": 410}]
        refresher._stop.clear()  # a refresh under way when the server stops (one asked for on demand)
        refreshes[1].start()
        _eventually(lambda: refresher.status.state == "refreshing")
        refresher._stop.set()
    assert not refreshes[1].is_alive()  # the stop waited for it


@contextmanager
def _copied_from_sqlite(folder, tables: dict[str, str], masks: dict | None = None) -> Iterator[tuple]:
    """A Stack copying each of ``tables`` ({name: its columns}) from one SQLite file into DuckDB,
    with no late retries or schema checks of its own (the tests run them); (stack, source)."""
    import sqlite3
    from flightdeck.config import parse_config
    from flightdeck.stack import Stack

    source = sqlite3.connect(folder / "src.db", isolation_level=None)
    for table, columns in tables.items():
        source.execute(f"CREATE TABLE {table} ({columns})")
    runtime = {"retry_unavailable_seconds": None, "schema_check_seconds": None}
    if masks is not None:
        runtime["auth"] = {"api_keys": [OPERATOR, {"name": "agent", "key": AGENT, "masks": masks}]}
    datasets = [{"from": f"sqlite:{table}", "name": table, "params": {"sqlite_file": "src.db"},
                 "acceleration": {"engine": "duckdb"}} for table in tables]
    stack = Stack(parse_config({"datasets": datasets, "runtime": runtime}, folder, {}))
    try:
        yield stack, source
    finally:
        stack.close()


def test_a_dataset_opened_again_while_its_copy_is_stopped_is_copied_by_a_refresher_of_its_own(tmp_path):
    """A dataset refused for its masks has its refresher stopped, once a refresh under way has
    ended. Opened again in that wait (its columns back, by the other of its late retry and its
    schema check), it took up the refresher being stopped, then lost it to the stop: served,
    never refreshed again, read at its source until a restart."""
    with _copied_from_sqlite(tmp_path, {"t": "id INTEGER PRIMARY KEY, email TEXT"},
                             {"t": {"email": "redact"}}) as (stack, source):
        source.execute("INSERT INTO t VALUES (1, 'a@x.io')")
        first = stack.accelerator.refresher("t")
        assert first.loaded.wait(30)
        source.execute("ALTER TABLE t DROP COLUMN email")
        refreshing = threading.Event()

        def a_refresh_under_way() -> None:
            with first._turn:
                refreshing.set()
                time.sleep(3)

        threading.Thread(target=a_refresh_under_way).start()
        refreshing.wait()
        checking = threading.Thread(target=stack.check_schema, args=("public.t",))
        checking.start()
        _eventually(lambda: stack.catalog.datasets["public.t"].error == MASK_MISMATCH)
        source.execute("ALTER TABLE t ADD COLUMN email TEXT")
        assert stack.bring_in("public.t") == "served"
        checking.join(30)
        second = stack.accelerator.refresher("t")
        assert second is not first and second.loaded.wait(30) and second.copy_serves
        assert stack.catalog.datasets["public.t"].error is None


def test_a_dataset_refused_and_served_again_many_times_keeps_none_of_its_stopped_refreshers(tmp_path):
    import gc
    import weakref

    with _copied_from_sqlite(tmp_path, {"t": "id INTEGER PRIMARY KEY, email TEXT"},
                             {"t": {"email": "redact"}}) as (stack, source):
        stopped = []
        for _ in range(4):
            refresher = stack.accelerator.refresher("t")
            assert refresher.loaded.wait(30)
            source.execute("ALTER TABLE t DROP COLUMN email")
            stack.check_schema("public.t")
            assert stack.catalog.datasets["public.t"].error == MASK_MISMATCH
            stopped.append(weakref.ref(refresher))
            del refresher
            source.execute("ALTER TABLE t ADD COLUMN email TEXT")
            assert stack.bring_in("public.t") == "served"
        assert stack.accelerator.refresher("t").loaded.wait(30)
        gc.collect()
        assert [ref() for ref in stopped] == [None] * 4


def test_two_copies_stopped_at_once_both_stay_waited_for_at_close(tmp_path, monkeypatch):
    """Two datasets' copies stop on threads of their own (one's late retry, the other's schema
    check). Each rewrote the list of stopped refreshers the close waits for from what it had
    read, and could drop the other's while its refresh was still under way."""
    from accel.refresh import Refresher

    ended = Refresher.ended.fget
    monkeypatch.setattr(Refresher, "ended", property(lambda self: time.sleep(0.05) or ended(self)))
    with _copied_from_sqlite(tmp_path, {"a": "id INTEGER PRIMARY KEY", "b": "id INTEGER PRIMARY KEY"}) as (stack, _):
        accelerator = stack.accelerator
        refreshing = accelerator.refresher("a")
        assert refreshing.loaded.wait(30) and accelerator.refresher("b").loaded.wait(30)
        with refreshing._turn:  # a refresh of a's under way, that its stop does not wait for
            stops = [threading.Thread(target=accelerator.stop_copying, args=("public.a", False)),
                     threading.Thread(target=accelerator.stop_copying, args=("public.b",))]
            for stop in stops:
                stop.start()
            for stop in stops:
                stop.join(30)
            assert refreshing in accelerator._stopped


def test_a_refresh_asked_for_before_its_refresher_stopped_does_not_run_after(tmp_path):
    """A refresh on demand looks its refresher up, then waits for its turn: one that comes only
    after the stop would read the source again while nothing waits for it any more."""
    with _copied_from_sqlite(tmp_path, {"t": "id INTEGER PRIMARY KEY"}) as (stack, _):
        refresher = stack.accelerator.refresher("t")
        assert refresher.loaded.wait(30)
        reads = refresher.source.stats.queries
        refresher.stop()
        refresher.refresh()
        assert refresher.source.stats.queries == reads
