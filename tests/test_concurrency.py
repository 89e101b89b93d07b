"""Many clients at once: correct answers for each, while a long stream is in flight."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow.flight as flight

from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flight.flightsql.server import pack

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
