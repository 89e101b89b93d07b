"""Query limits, global and per key: a deadline over the whole stream, result size, places
among running queries (held until the stream ends), statement length; each ends with a clean
error of its kind through every door while other callers keep being answered."""
from __future__ import annotations

import gc
import json
import threading
import time
from typing import Any, Iterator

import adbc_driver_flightsql.dbapi as flightsql
import anyio
import httpx
import pyarrow as pa
import pyarrow.ipc  # noqa: F401
import pytest
import yaml
from mcp.client import Client
from mcp.client.streamable_http import streamable_http_client

from conftest import service_error, serving
from flightdeck.auth import Credentials
from flightdeck.errors import CANCELLED, LIMIT_EXCEEDED, TIMED_OUT, ServiceError
from federation.cancel import Cancellation
from flightdeck.limits import MAX_BUCKETS, Admission, RequestRates, Slot
from flightdeck.service import Truncation

LOOPER, PATIENT, OTHER = "looper-key-0123456789", "patient-key-0123456789", "other-key-0123456789"
HURRIED = "hurried-key-0123456789"
KEYS = [
    {"name": "looper", "key": LOOPER, "limits": {"max_result_rows": 100, "max_concurrent_queries": 1}},
    {"name": "hurried", "key": HURRIED, "limits": {"query_timeout_seconds": 1}},
    {"name": "patient", "key": PATIENT, "limits": {"max_result_bytes": 1_000_000}},
    {"name": "other", "key": OTHER},
]
ENDLESS = "SELECT a.order_id, b.order_id AS other FROM orders a CROSS JOIN orders b"  # 900M rows


@pytest.fixture(scope="module")
def deck(demo_config) -> Iterator[Any]:
    config = yaml.safe_load(demo_config.read_text())
    config["datasets"] = [d for d in config["datasets"] if d["name"] in ("orders", "metrics")]
    config["runtime"] = {"auth": {"api_keys": KEYS},
                         "limits": {"admission_wait_seconds": 0.2, "max_sql_length": 5000}}
    with serving(config, demo_config.parent) as running:
        yield running


def principal(deck, key: str):
    return deck.service.authenticate(Credentials(bearer=key))


def test_a_result_over_the_row_or_byte_limit_fails_naming_the_limit(deck):
    looper, patient = principal(deck, LOOPER), principal(deck, PATIENT)
    service = deck.service
    assert service.query(looper, "SELECT * FROM orders LIMIT 100").read_all().num_rows == 100
    error = service_error(lambda: service.query(looper, "SELECT * FROM orders LIMIT 101"))
    assert error.kind == LIMIT_EXCEEDED and "max_result_rows" in error.message and "100" in error.message
    error = service_error(lambda: service.query(patient, "SELECT * FROM orders"))
    assert error.kind == LIMIT_EXCEEDED and "max_result_bytes" in error.message
    assert service.query(principal(deck, OTHER), "SELECT * FROM orders").read_all().num_rows == 30000


def test_a_door_that_truncates_gets_exactly_the_limit_and_a_notice(deck):
    service = deck.service
    looper, patient = principal(deck, LOOPER), principal(deck, PATIENT)
    everything = service.query(principal(deck, OTHER), "SELECT * FROM orders ORDER BY order_id").read_all()
    cut = Truncation()
    rows = service.execute(service.plan(looper, "SELECT * FROM orders ORDER BY order_id"), truncation=cut).read_all()
    assert rows.num_rows == 100 and rows.equals(everything.slice(0, 100))
    assert "max_result_rows" in cut.notice and "first 100" in cut.notice
    whole = Truncation()
    assert service.execute(service.plan(looper, "SELECT * FROM orders LIMIT 100"), truncation=whole).read_all() \
        .num_rows == 100
    assert whole.notice is None  # exactly at the limit is not cut
    cut = Truncation()
    rows = service.execute(service.plan(patient, "SELECT * FROM orders ORDER BY order_id"), truncation=cut).read_all()
    assert 0 < rows.num_rows < everything.num_rows and rows.equals(everything.slice(0, rows.num_rows))
    assert rows.nbytes <= 1_000_000 < everything.slice(0, rows.num_rows + 1).nbytes
    assert "max_result_bytes" in cut.notice and f"first {rows.num_rows} rows" in cut.notice
    assert service.admission.running() == 0
    mine = service.query(looper, "SELECT outcome, rows, error FROM flightdeck.runtime.queries "
                                 "WHERE outcome = 'truncated'").read_all().to_pylist()
    assert any(entry["rows"] == 100 and "max_result_rows" in entry["error"] for entry in mine)


@pytest.mark.parametrize("accept", ["application/json", "application/x-ndjson", "text/csv",
                                    "application/vnd.apache.arrow.stream", "application/vnd.spiceai.sql.v1+json"])
def test_http_truncates_at_the_row_limit_and_says_so_in_every_format(deck, accept):
    headers = {"Authorization": f"Bearer {LOOPER}", "Accept": accept}
    with httpx.Client(base_url=deck.http_url, headers=headers, timeout=30) as client:
        cut = client.post("/v1/sql", content="SELECT order_id FROM orders ORDER BY order_id")
        whole = client.post("/v1/sql", content="SELECT order_id FROM orders ORDER BY order_id LIMIT 100")
    for answer in (cut, whole):
        assert answer.status_code == 200, answer.text
        assert http_order_ids(answer, accept) == first_order_ids(deck)
    assert "max_result_rows" in cut.headers["X-Flightdeck-Truncated"]
    assert "X-Flightdeck-Truncated" not in whole.headers
    if accept == "application/vnd.spiceai.sql.v1+json":
        assert "max_result_rows" in cut.json()["truncated"] and "truncated" not in whole.json()


def test_http_truncates_at_the_byte_limit(deck):
    headers = {"Authorization": f"Bearer {PATIENT}", "Accept": "application/vnd.apache.arrow.stream"}
    with httpx.Client(base_url=deck.http_url, headers=headers, timeout=30) as client:
        answer = client.post("/v1/sql", content="SELECT * FROM orders ORDER BY order_id")
    table = pa.ipc.open_stream(answer.content).read_all()
    assert answer.status_code == 200 and 0 < table.num_rows < 30000 and table.nbytes <= 1_000_000
    assert "max_result_bytes" in answer.headers["X-Flightdeck-Truncated"]


def first_order_ids(deck) -> list[int]:
    query = "SELECT order_id FROM orders ORDER BY order_id LIMIT 100"
    return deck.service.query(principal(deck, OTHER), query).read_all().column("order_id").to_pylist()


def http_order_ids(answer: httpx.Response, accept: str) -> list[int]:
    if accept == "application/json":
        return [row["order_id"] for row in answer.json()]
    if accept == "application/vnd.spiceai.sql.v1+json":
        return [row["order_id"] for row in answer.json()["data"]]
    if accept == "application/x-ndjson":
        return [json.loads(line)["order_id"] for line in answer.text.splitlines()]
    if accept == "text/csv":
        return [int(line) for line in answer.text.splitlines()[1:]]
    return pa.ipc.open_stream(answer.content).read_all().column("order_id").to_pylist()


def test_mcp_truncates_at_the_row_limit_and_says_so(deck):
    async def main() -> Any:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {LOOPER}"}) as client:
            async with Client(streamable_http_client(f"{deck.http_url}/v1/mcp", http_client=client)) as session:
                return (await session.call_tool("sql", {"query": "SELECT order_id FROM orders ORDER BY order_id"}),
                        await session.call_tool("sql", {"query": "SELECT order_id FROM orders LIMIT 100"}))
    cut, whole = anyio.run(main)
    assert not cut.is_error and not whole.is_error
    rows = cut.structured_content
    assert rows["truncated"] and "max_result_rows" in rows["notice"]
    assert [row["order_id"] for row in rows["rows"]] == first_order_ids(deck) and rows["row_count"] == 100
    assert not whole.structured_content["truncated"] and whole.structured_content["row_count"] == 100


def test_the_deadline_covers_the_whole_stream_and_others_keep_answering(deck):
    hurried = principal(deck, HURRIED)
    answered: list[float] = []
    stop = threading.Event()

    def other_caller():
        other = principal(deck, OTHER)
        while not stop.is_set():
            started = time.monotonic()
            deck.service.query(other, "SELECT count(*) FROM metrics").read_all()
            answered.append(time.monotonic() - started)
            time.sleep(0.05)

    thread = threading.Thread(target=other_caller)
    thread.start()
    started = time.monotonic()
    try:
        reader = deck.service.execute(deck.service.plan(hurried, ENDLESS))
        with pytest.raises(ServiceError) as error:
            while True:
                reader.read_next_batch()
                time.sleep(0.01)  # a slow client: the deadline counts its reading too
    finally:
        stop.set()
        thread.join()
    assert error.value.kind == TIMED_OUT and "query_timeout_seconds" in error.value.message
    assert 0.9 < time.monotonic() - started < 10
    assert answered and max(answered) < 1.0
    assert deck.service.admission.running() == 0


def test_places_are_held_until_the_stream_ends_and_given_back_when_it_is_dropped(deck):
    looper, other = principal(deck, LOOPER), principal(deck, OTHER)
    service = deck.service
    first = service.execute(service.plan(looper, "SELECT * FROM orders LIMIT 50"))
    busy = service_error(lambda: service.execute(service.plan(looper, "SELECT 1")))
    assert busy.kind == LIMIT_EXCEEDED and "looper already runs 1" in busy.message and busy.retry_after
    assert service.query(other, "SELECT 1 AS one").read_all().num_rows == 1  # its own places
    first.read_all()
    assert service.query(looper, "SELECT 1 AS one").read_all().num_rows == 1
    unread = service.execute(service.plan(looper, "SELECT * FROM orders LIMIT 50"))
    del unread
    gc.collect()
    assert service.query(looper, "SELECT 1 AS one").read_all().num_rows == 1
    assert service.admission.running() == 0


def test_a_statement_over_the_length_limit_is_refused_before_planning(deck):
    error = service_error(lambda: deck.service.plan(principal(deck, OTHER), "SELECT 1" + " " * 5000))
    assert error.kind == LIMIT_EXCEEDED and "max_sql_length" in error.message


def test_each_door_reports_its_limit_errors(deck):
    options = {"adbc.flight.sql.authorization_header": f"Bearer {LOOPER}"}
    with flightsql.connect(deck.flight_url, autocommit=True, db_kwargs=options) as conn, conn.cursor() as cursor:
        with pytest.raises(Exception) as over:
            cursor.execute("SELECT * FROM orders LIMIT 500")
            cursor.fetch_arrow_table()
        assert "max_result_rows" in str(over.value)
    headers = {"Authorization": f"Bearer {LOOPER}"}
    with httpx.Client(base_url=deck.http_url, headers=headers, timeout=30) as client:
        first = deck.service.execute(deck.service.plan(principal(deck, LOOPER), "SELECT * FROM orders"))
        try:
            busy = client.post("/v1/sql", content="SELECT 1")
        finally:
            first.close()
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        assert "too many concurrent queries" in busy.json()["error"]["message"]
        too_long = client.post("/v1/sql", content="SELECT 1" + " " * 5000)
        assert too_long.status_code == 400 and "max_sql_length" in too_long.json()["error"]["message"]


def test_a_cancelled_query_is_reported_as_cancelled_not_timed_out(deck):
    cancelled = threading.Event()
    reader = deck.service.execute(deck.service.plan(principal(deck, OTHER), ENDLESS), cancelled)
    reader.read_next_batch()
    cancelled.set()
    with pytest.raises(ServiceError) as error:
        reader.read_next_batch()
    assert error.value.kind == CANCELLED
    reader.close()


def test_a_principal_waits_for_a_place_with_no_more_requests_than_its_limit():
    """Each request waiting for a place holds a thread of its door's pool (40 for HTTP and MCP,
    shared by every key): a key at its limit that sent 64 more would hold them all for the wait.
    Past its limit in waiting requests too, a request is refused at once."""
    admission = Admission(max_concurrent=8, wait_seconds=30)
    give_back = admission.enter("flooder", 1)
    outcomes: list[str] = []

    def request() -> None:
        try:
            admission.enter("flooder", 1)()
            outcomes.append("admitted")
        except ServiceError as error:
            outcomes.append(error.kind)
    threads = [threading.Thread(target=request) for _ in range(5)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while outcomes.count(LIMIT_EXCEEDED) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert outcomes == [LIMIT_EXCEEDED] * 4  # the fifth is still waiting, alone
    admission.enter("someone else", 1)()  # other principals are not kept waiting
    give_back()
    for thread in threads:
        thread.join(20)
    assert sorted(outcomes) == ["admitted"] + [LIMIT_EXCEEDED] * 4


def test_principals_that_run_nothing_are_not_remembered():
    """Without authentication each name a client gives is a principal: the places and rate
    buckets of names that came once were kept for ever (about 10 KB a name)."""
    admission, rates = Admission(max_concurrent=8, wait_seconds=1), RequestRates()
    for number in range(3 * MAX_BUCKETS):
        admission.enter(f"name-{number}", 1)()
        rates.take(f"name-{number}", 1000.0 if number % 2 else 0.001)  # full again at once, or in hours
    assert admission._running == {}
    assert len(rates._buckets) <= MAX_BUCKETS + 1


def test_a_stop_that_blocks_holds_back_neither_whoever_cancels_nor_other_deadlines():
    """Stops ran on the caller's thread: libpq's cancel request to a frozen PostgreSQL blocked the
    HTTP door's event loop (every HTTP and MCP client, /health too) and the one thread firing
    every query's deadline (a local query ran 30 s past its 4 s limit)."""
    frozen, others_ran = threading.Event(), threading.Event()
    hung = Cancellation()
    hung.add(lambda: frozen.wait(30))  # a backend that never answers its cancel request
    hung.add(others_ran.set)
    blocked = Slot(lambda: None, 0.1, hung.cancel)
    expired = threading.Event()
    started = time.monotonic()
    other = Slot(lambda: None, 0.3, expired.set)
    try:
        assert expired.wait(5) and time.monotonic() - started < 2  # on time, the first stop still stuck
        assert others_ran.wait(2) and blocked.expired
    finally:
        frozen.set()
        blocked.release()
        other.release()
