"""Change data capture benchmark: how fast a `refresh_mode: changes` copy applies a backlog, and
how far behind it stays under a steady 1,000 changes/s, for PostgreSQL (logical replication)
and MariaDB (binlog); against a full refresh of the same table, the freshness a periodic
refresh could give at best.

    python -m bench.cdc [--sources postgres,mariadb] [--backlog 50000] [--seconds 10] [--rate 1000]

For each source, a flightdeck server (its own process) follows a table of 100,000 rows copied
in DuckDB (file mode):
1. Apply throughput: the server is stopped, ``--backlog`` changes (updates and inserts, 500 to
   a transaction) are committed, the server starts again and resumes: changes/s from its
   READY line to the copy's position reaching the source's.
2. Lag: ``--rate`` changes/s for ``--seconds`` (25-row transactions, paced; the server restarted
   first so its figures cover this phase only); the copy's lag
   (source commit -> applied, p50/p99 over the last batches) as ``runtime.datasets`` reports it.
3. Baseline: one full refresh of the same table (the copy re-read whole).
Writes bench/results/cdc.json and cdc.png.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import psycopg2
import pymysql

from bench.common import DATA, RESULTS, busy_note, flightdeck_server, progress, wait_until_accelerated

TABLE_ROWS = 100_000
LABELS = {"postgres": "PostgreSQL", "mysql": "MariaDB"}
PG_PORT = int(os.environ.get("FD_CDC_PG_PORT", 5432))       # the machine's servers unless told
MY_PORT = int(os.environ.get("FD_CDC_MYSQL_PORT", 3306))


class Source:
    kind: str
    params: dict
    table = "fd_bench_cdc.items"

    def run(self, sql: str, params: tuple = ()) -> list:
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall()) if cursor.description else []

    def many(self, sql: str, rows: list[tuple]) -> None:
        with self.connection.cursor() as cursor:
            cursor.executemany(sql, rows)
        self.connection.commit()


class Postgres(Source):
    kind, params = "postgres", {"pg_host": "127.0.0.1", "pg_port": PG_PORT, "pg_db": "test", "pg_user": "postgres"}

    def __init__(self):
        self.connection = psycopg2.connect(host="127.0.0.1", port=PG_PORT, dbname="test", user="postgres")
        self.connection.autocommit = True
        self.run("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                 "WHERE slot_name = 'flightdeck_fd_bench_cdc_items' AND NOT active")
        self.run("DROP PUBLICATION IF EXISTS flightdeck_fd_bench_cdc_items")
        self.run("DROP SCHEMA IF EXISTS fd_bench_cdc CASCADE")
        self.run("CREATE SCHEMA fd_bench_cdc")
        self.run("CREATE TABLE fd_bench_cdc.items (id int PRIMARY KEY, name text, amount numeric(12,2), "
                 "at timestamptz)")
        self.run(f"INSERT INTO fd_bench_cdc.items SELECT g, 'item ' || g, g * 1.25, now() "
                 f"FROM generate_series(1, {TABLE_ROWS}) g")
        self.connection.autocommit = False

    def close(self) -> None:
        self.connection.autocommit = True
        self.run("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                 "WHERE slot_name = 'flightdeck_fd_bench_cdc_items' AND NOT active")
        self.run("DROP PUBLICATION IF EXISTS flightdeck_fd_bench_cdc_items")
        self.run("DROP SCHEMA IF EXISTS fd_bench_cdc CASCADE")
        self.connection.close()


class MariaDB(Source):
    kind, params = "mysql", {"mysql_host": "127.0.0.1", "mysql_tcp_port": MY_PORT, "mysql_user": "root"}

    def __init__(self):
        self.connection = pymysql.connect(host="127.0.0.1", port=MY_PORT, user="root", autocommit=True)
        self.run("DROP DATABASE IF EXISTS fd_bench_cdc")
        self.run("CREATE DATABASE fd_bench_cdc")
        self.run("CREATE TABLE fd_bench_cdc.items (id int PRIMARY KEY, name varchar(100), amount decimal(12,2), "
                 "at datetime(6))")
        self.run(f"INSERT INTO fd_bench_cdc.items SELECT seq, concat('item ', seq), seq * 1.25, now() "
                 f"FROM fd_bench_cdc.seq_1_to_{TABLE_ROWS}")
        self.connection.autocommit(False)

    def close(self) -> None:
        self.connection.autocommit(True)
        self.run("DROP DATABASE IF EXISTS fd_bench_cdc")
        self.connection.close()


def _changes(source: Source, count: int, first_new: int, per_transaction: int) -> int:
    """``count`` changes, alternating updates of existing rows and inserts of new ones."""
    updates = f"UPDATE {source.table} SET amount = amount + 1, name = %s WHERE id = %s"
    inserts = f"INSERT INTO {source.table} VALUES (%s, %s, 1, now())"
    done, next_id = 0, first_new
    while done < count:
        size = min(per_transaction, count - done)
        half = size // 2
        source.many(updates, [(f"u{done + i}", 1 + (done + i) * 7919 % TABLE_ROWS) for i in range(half)])
        source.many(inserts, [(next_id + i, f"n{next_id + i}") for i in range(size - half)])
        next_id += size - half
        done += size
    return next_id


def _status(url: str) -> dict:
    with flightsql.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT * FROM flightdeck.runtime.datasets WHERE name = 'public.items'")
        return cursor.fetch_arrow_table().to_pylist()[0]


def _count(url: str) -> int:
    with flightsql.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM items")
        return cursor.fetchone()[0]


def _config(folder: Path, source: Source, mode: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(folder / f"data-{source.kind}-{mode}", ignore_errors=True)  # its stream ended with the last run
    path = folder / f"cdc-{source.kind}-{mode}.json"
    acceleration = {"engine": "duckdb", "mode": "file", "refresh_mode": mode}
    path.write_text(json.dumps({"runtime": {"data_dir": str(folder / f"data-{source.kind}-{mode}")},
                                "datasets": [{"from": f"{source.kind}:{source.table}", "name": "items",
                                              "params": source.params, "acceleration": acceleration}]}))
    return path


def _caught_up(url: str, rows: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while _count(url) != rows:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the copy did not reach {rows:,} rows in {timeout:.0f}s")
        time.sleep(0.05)


def measure(source: Source, backlog: int, seconds: float, rate: int) -> dict:
    folder = DATA / "cdc"
    config = _config(folder, source, "changes")
    server = flightdeck_server(config)
    wait_until_accelerated(server.url, ["public.items"])
    server.stop()

    progress(f"{source.kind}: committing a backlog of {backlog:,} changes with flightdeck stopped")
    next_id = _changes(source, backlog, TABLE_ROWS + 1, 500)
    rows = next_id - 1
    started = time.monotonic()
    server = flightdeck_server(config)
    try:
        _caught_up(server.url, rows)
        # The row count matches once the inserts are in; the updates in the same batches too.
        applied_seconds = time.monotonic() - started
        throughput = backlog / applied_seconds
        progress(f"{source.kind}: backlog applied in {applied_seconds:.2f}s: {throughput:,.0f} changes/s")

        # A fresh process: the lag it reports covers the steady phase only, not the backlog.
        server.stop()
        server = flightdeck_server(config)
        wait_until_accelerated(server.url, ["public.items"])
        progress(f"{source.kind}: {rate:,} changes/s for {seconds:g}s")
        per_tick = 50
        began, sent = time.monotonic(), 0
        while time.monotonic() - began < seconds:
            next_id = _changes(source, per_tick, next_id, per_tick)
            sent += per_tick
            pause = began + sent / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        offered = sent / (time.monotonic() - began)
        rows = next_id - 1
        _caught_up(server.url, rows)
        status = _status(server.url)
    finally:
        server.stop()

    server = flightdeck_server(_config(folder, source, "full"))
    try:
        wait_until_accelerated(server.url, ["public.items"], every=0.2)
        refreshed = _status(server.url)
        full_refresh = (refreshed["last_refresh_end"] - refreshed["last_refresh_start"]).total_seconds()
    finally:
        server.stop()
    p99 = status["lag_p99_ms"] / 1000
    return {"source": source.kind, "table_rows": rows, "backlog_changes": backlog,
            "apply_seconds": round(applied_seconds, 3), "apply_changes_per_second": round(throughput),
            "steady_rate_offered": round(offered), "steady_seconds": seconds,
            "lag_p50_ms": status["lag_p50_ms"], "lag_p99_ms": status["lag_p99_ms"],
            "full_refresh_seconds": round(full_refresh, 3),
            "full_refresh_vs_cdc_p99_lag": round(full_refresh / p99, 1) if p99 else None}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [LABELS[r["source"]] for r in results]
    left.bar(names, [r["apply_changes_per_second"] for r in results], color="#4477aa")
    left.set_title("backlog applied (changes/s)")
    width = 0.25
    for offset, (key, label) in enumerate((("lag_p50_ms", "CDC lag p50"), ("lag_p99_ms", "CDC lag p99"))):
        right.bar([i + (offset - 1) * width for i in range(len(results))], [r[key] for r in results], width,
                  label=label)
    right.bar([i + width for i in range(len(results))], [r["full_refresh_seconds"] * 1000 for r in results],
              width, label="one full refresh", color="#bbbbbb")
    right.set_xticks(range(len(results)), names)
    right.set_yscale("log")
    right.set_title(f"staleness at {results[0]['steady_rate_offered']:,} changes/s (ms, log)")
    right.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", default="postgres,mariadb")
    parser.add_argument("--backlog", type=int, default=50_000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--rate", type=int, default=1000)
    args = parser.parse_args()
    note = busy_note()
    if note:
        progress(note)
    results = []
    for name in args.sources.split(","):
        source = Postgres() if name == "postgres" else MariaDB()
        try:
            results.append(measure(source, args.backlog, args.seconds, args.rate))
        finally:
            source.close()
    report = {"benchmark": "cdc", "note": note, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cdc.json").write_text(json.dumps(report, indent=2))
    plot(results, RESULTS / "cdc.png")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
