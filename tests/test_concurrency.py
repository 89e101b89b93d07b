"""Many clients at once: correct answers for each, while a long stream is in flight."""
from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow.flight as flight
import pytest

from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flight.flightsql.server import pack
from conftest import REPO

QUERIES = {
    "SELECT count(*) FROM orders WHERE status = 'failed'": 576,
    "SELECT count(*) FROM crm.customers WHERE tier = 'enterprise'": None,
    "SELECT count(*) FROM logs WHERE level = 'ERROR'": 470,
    "SELECT count(*) FROM metrics WHERE metric = 'replicas'": 1440,
}


def _client_loop(url: str, rounds: int) -> list[tuple[str, int]]:
    answers = []
    with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        for _ in range(rounds):
            for sql in QUERIES:
                cursor.execute(sql)
                answers.append((sql, cursor.fetchone()[0]))
            try:
                cursor.execute("SELECT nope FROM orders")  # errors interleaved with answers
            except Exception:
                pass
    return answers


def test_concurrent_clients_get_correct_answers(server):
    slow = flight.FlightClient(server.url)
    info = slow.get_flight_info(flight.FlightDescriptor.for_command(
        pack(sql_pb.CommandStatementQuery(query="SELECT * FROM logs"))))
    long_stream = slow.do_get(info.endpoints[0].ticket)
    long_stream.read_chunk()  # a stream left open mid-way while the others run
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda _: _client_loop(server.url, 10), range(8)))
    expected = dict(_client_loop(server.url, 1))
    for answers in results:
        assert len(answers) == 10 * len(QUERIES)
        for sql, value in answers:
            assert value == expected[sql]
            if QUERIES[sql] is not None:
                assert value == QUERIES[sql]
    rest = long_stream.read_all()
    assert rest.num_rows > 0


KEPT_PLAN_ON_MANY_THREADS = """
import os, sys, threading
from pathlib import Path
from federation.catalog import Catalog, DatasetSpec
from federation.engine import EngineSettings, QueryEngine

base = Path(sys.argv[1])
(base / "t.csv").write_text("id,status\\n" + "".join(f"{i},{'failed' if i % 7 == 0 else 'ok'}\\n" for i in range(5000)))
engine = QueryEngine(Catalog([DatasetSpec("t", "file:t.csv", {})], base), EngineSettings(whole_query_pushdown=False))
sql = "SELECT count(*) FROM t WHERE status = 'failed'"
answers = []

def loop():
    for _ in range(150):
        answers.append(engine.query(sql).read_all().column(0)[0].as_py())

threads = [threading.Thread(target=loop) for _ in range(8)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(len(answers), set(answers), flush=True)
os._exit(0)  # the engine's threads may still drop plans: a finalizing interpreter must not meet them
"""


def test_one_kept_plan_runs_on_many_threads_at_once(tmp_path):
    """The same cached plan executed by eight threads at once (as eight agents asking the same
    question do). In its own process: a deadlock would hold the GIL and stop pytest too."""
    try:
        done = subprocess.run([sys.executable, "-c", KEPT_PLAN_ON_MANY_THREADS, str(tmp_path)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("executing one kept plan on eight threads at once deadlocked")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1200", "{715}"]
