"""Per-source load budgets, measured where they matter: PostgreSQL's own pg_stat_activity,
sampled from a separate connection while 64 ADBC clients hammer one source and an accelerated
copy of the same source keeps refreshing."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_postgresql.dbapi as adbc_postgres
import httpx
import pyarrow as pa
import pytest

from conftest import POSTGRES_URI, ServerProcess, postgres, require_postgres, serving, write_config
from test_backend_cancel_and_errors import CLIENT
from federation.budget import QUERY, BudgetExceeded, LoadBudget, released_at_end
from flightdeck.auth import OPERATOR

PG = {"pg_host": "127.0.0.1", "pg_port": 5432, "pg_db": "test", "pg_user": "postgres"}
BUDGET_ERROR = "is at its load budget"
# A self-join PostgreSQL runs whole (about 0.1 s), so statements overlap under load.
PUSHED = "SELECT count(*) AS n FROM items a, items b WHERE a.v + b.v > {k}"
# Runs for minutes in PostgreSQL unless stopped.
ENDLESS = "SELECT count(*) AS n FROM items a, items b, items c WHERE a.v + b.v + c.v > -1"
# A join with a local file: DataFusion runs it, scanning PostgreSQL from its own threads.
LOCAL_JOIN = "SELECT count(*) AS n FROM items i JOIN labels l ON l.v = i.v WHERE i.id > {k}"
# Statements flightdeck has running in the test database, as PostgreSQL sees them.
ACTIVE = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'flightdeck' "
          "AND datname = 'test' AND state = 'active' AND pid <> pg_backend_pid()")


@pytest.fixture(scope="module")
def items():
    require_postgres()
    postgres("DROP SCHEMA IF EXISTS fd_budget CASCADE")
    postgres("CREATE SCHEMA fd_budget")
    postgres("CREATE TABLE fd_budget.items (id int PRIMARY KEY, v int)")
    postgres("INSERT INTO fd_budget.items SELECT g, g % 13 FROM generate_series(1, 1200) g")
    yield
    postgres("DROP SCHEMA fd_budget CASCADE")


def _config(tmp_path, budget: dict, accelerated: bool = False) -> dict:
    (tmp_path / "labels.csv").write_text("v,label\n" + "".join(f"{v},l{v}\n" for v in range(13)))
    params = {**PG, **budget}
    datasets = [{"from": "postgres:fd_budget.items", "name": "items", "params": params},
                {"from": "file:labels.csv", "name": "labels"}]
    if accelerated:  # the same source, read again by refreshes every second
        datasets.append({"from": "postgres:fd_budget.items", "name": "items_copy", "params": params,
                         "acceleration": {"enabled": True, "refresh_check_interval": "1s"}})
    # Every client is the same anonymous caller: let all 64 in, so that the source's budget is
    # what holds them back, not the places among running queries.
    limits = {"max_concurrent_queries": 128, "max_concurrent_queries_per_principal": 128}
    return {"datasets": datasets, "runtime": {"limits": limits}}


class ActivitySampler:
    """Counts flightdeck's active statements in PostgreSQL, over and over, from its own connection."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with adbc_postgres.connect(POSTGRES_URI, autocommit=True) as conn, conn.cursor() as cursor:
            while not self._stop.is_set():
                cursor.execute(ACTIVE)
                self.samples.append(cursor.fetchone()[0])
                time.sleep(0.005)

    def __enter__(self) -> "ActivitySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _run_query(url: str, sql: str) -> str:
    """"ok", or the error's message."""
    try:
        with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute(sql)
            cursor.fetchall()
        return "ok"
    except Exception as error:
        return str(error)


def _refreshes(url: str) -> tuple[int, int, str | None]:
    with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT refreshes, failures, last_error FROM flightdeck.runtime.datasets "
                       "WHERE name = 'public.items_copy'")
        return cursor.fetchone()


def test_64_clients_never_put_more_than_the_budget_on_postgres(items, tmp_path):
    config = write_config(tmp_path / "flightdeck.yaml",
                          _config(tmp_path, {"max_concurrent_requests": 4, "budget_timeout": 3}, accelerated=True))
    server = ServerProcess(["run", "-c", str(config), "--flight-port", "0"])
    try:
        refreshes_before = _refreshes(server.url)[0]
        statements = [(PUSHED if i % 2 else LOCAL_JOIN).format(k=i % 5) for i in range(64 * 3)]
        with ActivitySampler() as sampler, ThreadPoolExecutor(64) as clients:
            outcomes = list(clients.map(lambda sql: _run_query(server.url, sql), statements))
        refreshes, failures, last_error = _refreshes(server.url)
    finally:
        server.stop()
    answered = outcomes.count("ok")
    refused = [o for o in outcomes if o != "ok"]
    print(f"\n{answered} answered, {len(refused)} refused at the budget; "
          f"{len(sampler.samples)} samples of pg_stat_activity, peak {max(sampler.samples)} active; "
          f"{refreshes - refreshes_before} refreshes during the run")
    assert all(BUDGET_ERROR in o for o in refused), refused[:3]
    assert answered > 0
    assert max(sampler.samples) <= 4
    assert max(sampler.samples) >= 2, "the clients never overlapped: the test proves nothing"
    assert refreshes > refreshes_before and failures == 0 and last_error is None


def test_a_query_that_gets_no_slot_in_time_fails_clearly_everywhere(items, tmp_path):
    budget = {"max_concurrent_requests": 1, "budget_timeout": 0.5}
    with serving(_config(tmp_path, budget), tmp_path) as running:
        held = running.service.query(OPERATOR, PUSHED.format(k=-1))  # holds the one slot until read or closed
        try:
            for sql in (PUSHED.format(k=0), LOCAL_JOIN.format(k=0)):
                message = _run_query(running.flight_url, sql)
                assert "source postgres (127.0.0.1:5432/test) is at its load budget " \
                       "(max_concurrent_requests 1): no slot within 0.5s" in message
            response = httpx.post(f"{running.http_url}/v1/sql", content=PUSHED.format(k=1),
                                  headers={"Content-Type": "text/plain"}, timeout=30)
            assert BUDGET_ERROR in response.text and response.status_code >= 400
            metrics = httpx.get(f"{running.http_url}/metrics").text
            source = 'source="postgres (127.0.0.1:5432/test)"'
            assert f"flightdeck_source_budget_refusals_total{{{source}}} 3.0" in metrics
            assert f"flightdeck_source_budget_in_use{{{source}}} 1.0" in metrics
        finally:
            held.close()
            del held  # a closed pyarrow reader keeps its source until dropped; then the slot goes back
        assert _run_query(running.flight_url, PUSHED.format(k=2)) == "ok"


def test_a_client_that_goes_away_gives_its_slot_back(items, tmp_path):
    with serving(_config(tmp_path, {"max_concurrent_requests": 1, "budget_timeout": 20}), tmp_path) as running:
        client = subprocess.Popen([sys.executable, "-c", CLIENT, running.flight_url, ENDLESS])
        deadline = time.monotonic() + 15
        while postgres(ACTIVE)[0][0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert postgres(ACTIVE)[0][0] == 1, "the statement never started in PostgreSQL"
        client.kill()  # mid-statement, holding the one slot
        client.wait()
        assert _run_query(running.flight_url, PUSHED.format(k=0)) == "ok"  # within budget_timeout


def test_datafusion_scans_wait_on_reserved_slots_without_stalling_the_engine(items, tmp_path):
    """Eight joins DataFusion runs, one slot: each waits its turn on the caller's thread."""
    with serving(_config(tmp_path, {"max_concurrent_requests": 1, "budget_timeout": 60}), tmp_path) as running:
        assert running.engine.plan(LOCAL_JOIN.format(k=0)).remote is None
        with ThreadPoolExecutor(8) as clients:
            outcomes = list(clients.map(lambda k: _run_query(running.flight_url, LOCAL_JOIN.format(k=k)), range(8)))
    assert outcomes == ["ok"] * 8


def test_max_requests_per_second_spaces_request_starts(items, tmp_path):
    with serving(_config(tmp_path, {"max_requests_per_second": 4, "budget_timeout": 60}), tmp_path) as running:
        started = time.monotonic()
        statements = [f"SELECT id FROM items WHERE id = {k + 1}" if k % 2 else LOCAL_JOIN.format(k=k) for k in range(12)]
        with ThreadPoolExecutor(12) as clients:
            outcomes = list(clients.map(lambda sql: _run_query(running.flight_url, sql), statements))
        elapsed = time.monotonic() - started
    assert outcomes == ["ok"] * 12
    assert elapsed >= (12 - 1) / 4 * 0.95  # 12 starts (pushed statements and DataFusion's scans), 4 a second


def test_two_datasets_of_one_source_may_not_state_different_budgets(items, tmp_path):
    config = _config(tmp_path, {"max_concurrent_requests": 4})
    config["datasets"].append({"from": "postgres:fd_budget.items", "name": "again",
                               "params": {**PG, "max_concurrent_requests": 8}})
    with serving(config, tmp_path) as running:
        again = next(d for d in running.service.datasets(OPERATOR) if d["name"] == "public.again")
    assert again["state"] != "ready"
    assert "params.max_concurrent_requests is 4 for another dataset of this source and 8 here" in again["error"]


def test_a_slot_is_released_however_the_stream_ends():
    budget = LoadBudget("test source")
    budget.configure({"max_concurrent_requests": 1, "budget_timeout": 0.1})
    table = pa.table({"x": [1, 2]})
    ends = {"exhausted": lambda r: r.read_all(), "closed unread": lambda r: r.close(),
            "dropped unread": lambda r: None}
    for how, end in ends.items():
        end(budget.hold(lambda: table.to_reader(max_chunksize=1)))
        assert budget.snapshot()["in_use"] == 0, how

    def failing() -> pa.RecordBatchReader:
        raise RuntimeError("backend down")
    with pytest.raises(RuntimeError):
        budget.hold(failing)
    assert budget.snapshot()["in_use"] == 0
    reader = released_at_end(table.to_reader(), lambda: None)
    assert reader.read_all() == table


def test_a_plan_takes_its_slots_all_at_once_or_none():
    """A plan reserving its slots one by one held part of what it needed while it waited: two
    plans of two scans each on a budget of two could each hold one and wait for the other until
    both were refused at budget_timeout."""
    budget = LoadBudget("test source")
    budget.configure({"max_concurrent_requests": 2, "budget_timeout": 0.5})
    give_back = budget.reserve(1, QUERY)
    outcome = []
    waiting = threading.Thread(target=lambda: outcome.append(budget.reserve(2, QUERY)))
    waiting.start()
    time.sleep(0.2)
    assert budget.snapshot()["in_use"] == 1  # nothing held while it waits
    give_back()
    waiting.join()
    assert budget.snapshot()["in_use"] == 2
    outcome[0]()
    assert budget.snapshot()["in_use"] == 0
    with pytest.raises(BudgetExceeded):
        budget.reserve(3, QUERY)
