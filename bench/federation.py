"""Federation benchmark: each SQL backend through flightdeck vs its own driver, in one run.

    python -m bench.federation [--rows 200000] [--repeats 5]

For PostgreSQL, MariaDB, SQLite and DuckDB, a table of ``--rows`` rows is created, then:
(a) a selective query (a key range of 100 rows) through flightdeck (ADBC Flight SQL client,
    server in its own process) vs the backend's driver directly: the overhead ratio;
(b) a full-table read into Arrow: rows/s through flightdeck vs the backend's plain DB-API
    driver (psycopg-free: ADBC for PostgreSQL, PyMySQL, sqlite3, duckdb).
Writes bench/results/federation.json and federation.png.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_postgresql.dbapi as adbc_postgres
import duckdb
import numpy as np
import pyarrow as pa
import pymysql

from bench.common import DATA, RESULTS, flightdeck_server, progress

SELECTIVE = "SELECT id, kind, amount, note FROM {table} WHERE id >= 5000 AND id < 5100"
FULL = "SELECT id, kind, amount, note FROM {table}"


def make_table(rows: int) -> pa.Table:
    rng = np.random.default_rng(3)
    return pa.table({
        "id": np.arange(rows, dtype=np.int64),
        "kind": pa.array(np.array(["a", "b", "c", "d"])[rng.integers(0, 4, rows)]),
        "amount": rng.random(rows) * 100,
        "note": pa.array([f"note {i}" for i in range(rows)]),
    })


def load(table: pa.Table, folder: Path) -> None:
    ddl = "CREATE TABLE bench_rows (id BIGINT PRIMARY KEY, kind VARCHAR(4), amount DOUBLE PRECISION, note VARCHAR(32))"
    with adbc_postgres.connect("postgresql://postgres@127.0.0.1:5432/test", autocommit=True) as conn, \
            conn.cursor() as cursor:
        cursor.execute("DROP TABLE IF EXISTS public.bench_rows")
        cursor.execute(ddl)
        cursor.adbc_ingest("bench_rows", table, mode="append")
    connection = pymysql.connect(host="127.0.0.1", user="root", autocommit=True)
    with connection.cursor() as cursor:
        cursor.execute("CREATE DATABASE IF NOT EXISTS fd_bench")
        cursor.execute("DROP TABLE IF EXISTS fd_bench.bench_rows")
        cursor.execute(ddl.replace("bench_rows", "fd_bench.bench_rows").replace("DOUBLE PRECISION", "DOUBLE"))
        rows = [tuple(r.values()) for r in table.to_pylist()]
        for start in range(0, len(rows), 10_000):
            cursor.executemany("INSERT INTO fd_bench.bench_rows VALUES (%s, %s, %s, %s)", rows[start:start + 10_000])
    connection.close()
    (folder / "bench.sqlite").unlink(missing_ok=True)
    with sqlite3.connect(folder / "bench.sqlite") as lite:
        lite.execute(ddl.replace("DOUBLE PRECISION", "REAL"))
        lite.executemany("INSERT INTO bench_rows VALUES (?, ?, ?, ?)", [tuple(r.values()) for r in table.to_pylist()])
    (folder / "bench.duckdb").unlink(missing_ok=True)
    with duckdb.connect(str(folder / "bench.duckdb")) as duck:
        duck.register("source", table)
        duck.execute("CREATE TABLE bench_rows AS SELECT * FROM source")


def direct_readers(folder: Path) -> dict[str, Callable[[str], int]]:
    """Each backend's own driver, as a user would call it without flightdeck (rows returned)."""
    def postgres(sql: str) -> int:
        with adbc_postgres.connect("postgresql://postgres@127.0.0.1:5432/test") as conn, conn.cursor() as cursor:
            cursor.execute(sql.format(table="public.bench_rows"))
            return cursor.fetch_arrow_table().num_rows

    def mysql(sql: str) -> int:
        connection = pymysql.connect(host="127.0.0.1", user="root")
        with connection.cursor() as cursor:
            cursor.execute(sql.format(table="fd_bench.bench_rows"))
            rows = cursor.fetchall()
        connection.close()
        columns = list(zip(*rows)) if rows else [[], [], [], []]
        return pa.table({n: list(c) for n, c in zip(["id", "kind", "amount", "note"], columns)}).num_rows

    def sqlite(sql: str) -> int:
        with sqlite3.connect(f"file:{folder / 'bench.sqlite'}?mode=ro", uri=True) as lite:
            rows = lite.execute(sql.format(table="bench_rows")).fetchall()
        columns = list(zip(*rows)) if rows else [[], [], [], []]
        return pa.table({n: list(c) for n, c in zip(["id", "kind", "amount", "note"], columns)}).num_rows

    def duck(sql: str) -> int:
        with duckdb.connect(str(folder / "bench.duckdb"), read_only=True) as connection:
            return connection.sql(sql.format(table="bench_rows")).to_arrow_table().num_rows

    return {"postgres": postgres, "mysql": mysql, "sqlite": sqlite, "duckdb": duck}


def timed(run: Callable[[], int], repeats: int) -> tuple[float, int]:
    run()  # warm-up
    seconds, rows = [], 0
    for _ in range(repeats):
        started = time.perf_counter()
        rows = run()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    folder = DATA / "federation"
    folder.mkdir(parents=True, exist_ok=True)
    progress(f"loading {args.rows:,} rows into PostgreSQL, MariaDB, SQLite and DuckDB")
    load(make_table(args.rows), folder)
    config = folder / "flightdeck.yaml"
    config.write_text(
        "datasets:\n"
        "  - {from: 'postgres:public.bench_rows', name: pg_rows, params: {pg_db: test}}\n"
        "  - {from: 'mysql:fd_bench.bench_rows', name: my_rows, params: {}}\n"
        "  - {from: 'sqlite:bench_rows', name: lite_rows, params: {sqlite_file: bench.sqlite}}\n"
        "  - {from: 'duckdb:bench_rows', name: duck_rows, params: {duckdb_open: bench.duckdb}}\n")
    datasets = {"postgres": "pg_rows", "mysql": "my_rows", "sqlite": "lite_rows", "duckdb": "duck_rows"}
    server = flightdeck_server(config)
    direct = direct_readers(folder)
    report: dict = {"rows": args.rows, "backends": {}}
    try:
        with flightsql.connect(server.url, autocommit=True) as connection:
            def through_flightdeck(sql: str, dataset: str) -> Callable[[], int]:
                def run() -> int:
                    with connection.cursor() as cursor:
                        cursor.execute(sql.format(table=dataset))
                        return cursor.fetch_arrow_table().num_rows
                return run

            for backend, dataset in datasets.items():
                entry = {}
                for label, sql in (("selective_100_rows", SELECTIVE), ("full_table", FULL)):
                    ours, ours_rows = timed(through_flightdeck(sql, dataset), args.repeats)
                    theirs, their_rows = timed(lambda: direct[backend](sql), args.repeats)
                    assert ours_rows == their_rows, (backend, label, ours_rows, their_rows)
                    entry[label] = {"rows": ours_rows, "flightdeck_ms": round(ours * 1000, 2),
                                    "direct_driver_ms": round(theirs * 1000, 2),
                                    "flightdeck_rows_per_s": round(ours_rows / ours),
                                    "direct_rows_per_s": round(their_rows / theirs),
                                    "speed_ratio_vs_direct": round(theirs / ours, 3)}
                    progress(f"{backend} {label}: flightdeck {ours * 1000:.1f} ms, direct {theirs * 1000:.1f} ms")
                report["backends"][backend] = entry
    finally:
        server.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "federation.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "federation.png")
    print(json.dumps({b: {k: v["speed_ratio_vs_direct"] for k, v in e.items()} for b, e in report["backends"].items()},
                     indent=2))


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backends = list(report["backends"])
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for axis, label, title in ((axes[0], "selective_100_rows", "100-row key range (ms, lower is better)"),
                               (axes[1], "full_table", f"full read of {report['rows']:,} rows (rows/s)")):
        x = np.arange(len(backends))
        key_ours, key_theirs = (("flightdeck_ms", "direct_driver_ms") if label != "full_table"
                                else ("flightdeck_rows_per_s", "direct_rows_per_s"))
        ours = [report["backends"][b][label][key_ours] for b in backends]
        theirs = [report["backends"][b][label][key_theirs] for b in backends]
        axis.bar(x - 0.2, ours, 0.4, label="through flightdeck (ADBC Flight SQL)")
        axis.bar(x + 0.2, theirs, 0.4, label="backend's own driver")
        axis.set_xticks(x, backends)
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
