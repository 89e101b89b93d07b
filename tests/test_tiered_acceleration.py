"""Tiered acceleration: a sidecar keeps its copy fresh from an upstream flightdeck (a hub, over
Flight SQL) instead of from PostgreSQL, so production sees the hub's statements only."""
from __future__ import annotations

import time

import psutil
import pytest

from conftest import ServerProcess, postgres, require_postgres, serving, write_config

READER = {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"}
ROWS = 200


@pytest.fixture
def events():
    require_postgres()
    postgres("DROP SCHEMA IF EXISTS fd_tiered CASCADE")
    postgres("CREATE SCHEMA fd_tiered")
    postgres("CREATE TABLE fd_tiered.events (id bigint PRIMARY KEY, at timestamptz NOT NULL, amount int)")
    postgres(f"INSERT INTO fd_tiered.events SELECT g, now() - interval '1 hour', 1 FROM generate_series(1, {ROWS}) g")
    yield
    postgres("DROP SCHEMA IF EXISTS fd_tiered CASCADE")


def hub_config(interval: str = "1s") -> dict:
    """A flightdeck whose copy of fd_tiered.events is append-refreshed from PostgreSQL."""
    return {"datasets": [{
        "from": "postgres:fd_tiered.events", "name": "events", "params": READER, "time_column": "at",
        "acceleration": {"engine": "duckdb", "refresh_mode": "append", "primary_key": "id",
                         "refresh_check_interval": interval}}]}


def sidecar_config(hub_url: str, interval: str = "1s") -> dict:
    """A flightdeck whose copy is append-refreshed from the hub's dataset over Flight SQL."""
    return {"datasets": [{
        "from": "flightsql:public.events", "name": "events", "params": {"flightsql_endpoint": hub_url},
        "time_column": "at",
        "acceleration": {"engine": "arrow", "refresh_mode": "append", "primary_key": "id",
                         "refresh_check_interval": interval}}]}


def _count(runtime) -> int:
    return runtime.engine.query("SELECT count(*) FROM events").read_all().column(0)[0].as_py()


def _wait_for(check, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return False


def _flightdeck_backends() -> set[int]:
    """Client ports of PostgreSQL sessions flightdeck opened on the test database."""
    rows = postgres("SELECT client_port FROM pg_stat_activity WHERE datname = 'test' "
                    "AND application_name = 'flightdeck'")
    return {port for (port,) in rows}


def _ports_to_postgres(pid: int) -> set[int]:
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == 5432}


def test_new_rows_reach_the_sidecar_through_the_hub(events, tmp_path):
    hub = ServerProcess(["run", "-c", str(write_config(tmp_path / "hub.yaml", hub_config())),
                         "--flight-port", "0"])
    try:
        with serving(sidecar_config(hub.url), tmp_path / "sidecar") as sidecar:
            assert sidecar.accelerator.refresher("public.events").loaded.wait(60)
            assert _wait_for(lambda: _count(sidecar) == ROWS)
            postgres("INSERT INTO fd_tiered.events SELECT g, now(), 2 FROM generate_series(1001, 1010) g")
            assert _wait_for(lambda: _count(sidecar) == ROWS + 10), _count(sidecar)
            total = sidecar.engine.query("SELECT sum(amount) FROM events WHERE id > 1000").read_all()
            assert total.column(0)[0].as_py() == 20
            # The sidecar's only source is the hub; its refreshes ask for new rows only.
            stats = sidecar.catalog.source_stats()
            assert "postgres" not in [s["kind"] for s in stats]
            upstream = next(s for s in stats if s["kind"] == "flightsql")
            assert '"at" >' in upstream["last_request"] and upstream["queries"] >= 2
            status = sidecar.accelerator.refresher("public.events").status
            assert status.refreshes >= 2 and status.last_error is None
            # PostgreSQL: every flightdeck session on it belongs to the hub, none to this process.
            backends = _flightdeck_backends()
            assert backends and backends <= _ports_to_postgres(hub.process.pid)
            assert not _ports_to_postgres(psutil.Process().pid) & backends
    finally:
        hub.stop()
