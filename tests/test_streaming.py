"""Large results stream: bounded server memory, batches under the message limit, cancellation."""
from __future__ import annotations

import threading
import time

import adbc_driver_flightsql.dbapi as flightsql
import duckdb
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest

from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flight.flightsql.server import pack, split_batch

from conftest import ServerProcess, run_clients, serving, write_config

ROWS = 10_000_000


@pytest.fixture(scope="module")
def ten_million_rows(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(7)
    table = pa.table({
        "id": np.arange(ROWS, dtype=np.int64),
        "value": rng.random(ROWS),
        "label": pa.array(np.array(["alpha", "beta", "gamma", "delta"])[rng.integers(0, 4, ROWS)]),
    })
    pq.write_table(table, folder / "big.parquet", row_group_size=1_000_000)
    return folder


class PeakMemory:
    """Samples a process's resident memory in the background."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_ten_million_rows_stream_with_bounded_server_memory(ten_million_rows):
    config = write_config(ten_million_rows / "flightdeck.yaml",
                          {"datasets": [{"from": "file:big.parquet", "name": "big"}]})
    server = ServerProcess(["run", "-c", str(config), "--flight-port", "0"])
    try:
        with flightsql.connect(server.url, autocommit=True) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT 1")  # warm up before measuring
            cursor.fetchall()
            with PeakMemory(server.process.pid) as memory:
                cursor.execute("SELECT id, value, label FROM big")
                reader = cursor.fetch_record_batch()
                first = reader.read_next_batch()
                time.sleep(1.5)  # a paused client: the server must not run ahead
                paused_growth = memory.process.memory_info().rss - memory.baseline
                rows, result_bytes, largest_batch = first.num_rows, first.nbytes, first.nbytes
                for batch in reader:
                    rows += batch.num_rows
                    result_bytes += batch.nbytes
                    largest_batch = max(largest_batch, batch.nbytes)
        growth = memory.peak - memory.baseline
        print(f"\nresult {result_bytes / 2**20:.0f} MiB; server RSS baseline "
              f"{memory.baseline / 2**20:.0f} MiB, peak {memory.peak / 2**20:.0f} MiB "
              f"(growth {growth / 2**20:.0f} MiB, {paused_growth / 2**20:.0f} MiB while the client "
              f"paused); largest batch {largest_batch / 2**20:.1f} MiB")
        assert rows == ROWS
        assert largest_batch < 16 * 2**20
        assert paused_growth < 64 * 2**20  # batches are produced as the client reads them
        # What the result costs the server is its growth over the idle process (whose libraries
        # alone take ~350 MiB): under the result's size, so never the result held whole.
        assert growth < result_bytes       # the result is never held whole
    finally:
        server.stop()


def test_split_batch_respects_the_limit():
    batch = pa.record_batch({"text": ["x" * 1000] * 10_000})
    pieces = list(split_batch(batch, 1_000_000))
    assert all(p.nbytes <= 1_000_000 for p in pieces)
    assert sum(p.num_rows for p in pieces) == 10_000
    assert pa.Table.from_batches(pieces).equals(pa.Table.from_batches([batch]))


def test_wide_rows_are_split_under_the_message_limit(tmp_path):
    text = "y" * 4096  # 4 KiB per row, 65,536 rows per engine batch = 256 MiB unsplit
    pq.write_table(pa.table({"id": np.arange(100_000), "payload": [text] * 100_000}), tmp_path / "wide.parquet")
    with serving({"datasets": [{"from": "file:wide.parquet", "name": "wide"}]}, tmp_path) as runtime:
        client = flight.FlightClient(runtime.flight_url)
        info = client.get_flight_info(flight.FlightDescriptor.for_command(
            pack(sql_pb.CommandStatementQuery(query="SELECT * FROM wide"))))
        sizes, rows = [], 0
        for chunk in client.do_get(info.endpoints[0].ticket):
            sizes.append(chunk.data.nbytes)
            rows += chunk.data.num_rows
        assert rows == 100_000
        assert max(sizes) <= runtime.server.max_batch_bytes


@pytest.fixture
def big_duckdb(tmp_path):
    with duckdb.connect(str(tmp_path / "big.duckdb")) as con:
        con.execute("CREATE TABLE events AS SELECT range AS id, range % 7 AS kind FROM range(3000000)")
    return tmp_path


def _ticket_for(client, query):
    info = client.get_flight_info(flight.FlightDescriptor.for_command(
        pack(sql_pb.CommandStatementQuery(query=query))))
    return info


def test_client_cancellation_stops_the_backend_scan(big_duckdb):
    config = {"datasets": [{"from": "duckdb:events", "name": "events",
                            "params": {"duckdb_open": "big.duckdb"}}]}
    with serving(config, big_duckdb) as runtime:
        stats = runtime.catalog.datasets["public.events"].connector.stats
        client = flight.FlightClient(runtime.flight_url)
        info = _ticket_for(client, "SELECT * FROM events")
        reader = client.do_get(info.endpoints[0].ticket)
        reader.read_chunk()
        reader.cancel()
        time.sleep(1.0)
        rows_after_cancel = stats.rows
        time.sleep(1.0)
        assert stats.rows == rows_after_cancel < 3_000_000  # the scan stopped
        assert client.do_get(_ticket_for(client, "SELECT count(*) AS n FROM events")
                             .endpoints[0].ticket).read_all().to_pylist() == [{"n": 3_000_000}]


def test_cancel_flight_info_stops_a_running_stream(big_duckdb):
    config = {"datasets": [{"from": "duckdb:events", "name": "events",
                            "params": {"duckdb_open": "big.duckdb"}}],
              "runtime": {"flight": {"port": 0}, "limits": {"batch_rows": 1024}}}
    with serving(config, big_duckdb) as runtime:
        client = flight.FlightClient(runtime.flight_url)
        info = _ticket_for(client, "SELECT * FROM events")
        reader = client.do_get(info.endpoints[0].ticket)
        reader.read_chunk()
        request = sql_pb.CancelFlightInfoRequest(info=info.serialize()).SerializeToString()
        [result] = list(client.do_action(flight.Action("CancelFlightInfo", request)))
        assert sql_pb.CancelFlightInfoResult.FromString(result.body.to_pybytes()).status == 1
        with pytest.raises(flight.FlightCancelledError):
            while True:
                reader.read_chunk()


def test_queries_run_by_the_engine_reuse_a_few_event_loops(tmp_path, monkeypatch):
    """A stream the engine computes is awaited on an event loop (so that a cancellation can
    interrupt it). Flight's handler threads lose their Python thread state after every call, so
    a loop kept per thread was made anew for every query; the loops are now shared. (A join:
    a plan of constants alone is read without the loop.)"""
    import asyncio

    import federation.cancel

    made = []
    new_event_loop = asyncio.new_event_loop
    idle: list = []
    monkeypatch.setattr(federation.cancel, "_idle_loops", idle)  # none left by earlier tests
    monkeypatch.setattr(asyncio, "new_event_loop", lambda: made.append(1) or new_event_loop())
    with serving({"datasets": []}, tmp_path) as running:
        with flightsql.connect(running.flight_url, autocommit=True) as connection, connection.cursor() as cursor:
            for value in range(40):
                cursor.execute("SELECT a.v * 2 AS doubled FROM (SELECT ? AS v) a CROSS JOIN (SELECT 1) b", [value])
                assert cursor.fetchall() == [(value * 2,)]

        def client(n: int) -> None:
            with flightsql.connect(running.flight_url, autocommit=True) as connection, \
                    connection.cursor() as cursor:
                for value in range(20):
                    cursor.execute("SELECT a.v + 1 AS next FROM (SELECT ? AS v) a CROSS JOIN (SELECT 1) b", [value * n])
                    assert cursor.fetchall() == [(value * n + 1,)]

        run_clients(client, 4)
    for loop in idle:
        loop.close()
    assert 1 <= len(made) <= 4  # at most one per query running at once
