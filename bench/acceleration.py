"""Acceleration benchmark: TPC-H in PostgreSQL, the 22 queries through flightdeck accelerated
(DuckDB copies) vs federated (read from PostgreSQL), and vs DuckDB in-process, in one run.

    python -m bench.acceleration [--scale 1] [--timeout 60] [--repeats 3]

1. tpchgen-cli writes TPC-H at ``--scale`` as Parquet; it is loaded into PostgreSQL (once).
2. A flightdeck server with the eight tables accelerated in DuckDB loads its copies: refresh
   throughput is rows/s from PostgreSQL into DuckDB.
3. Each query through flightdeck (ADBC Flight SQL client, server in its own process):
   accelerated (best of ``--repeats``) and federated (once: PostgreSQL does the work or sends
   rows). A query past ``--timeout`` is cancelled and reported as a timeout, not left out.
4. The same queries in DuckDB in-process over the same data: the stack's own overhead.
Writes bench/results/acceleration.json and acceleration.png.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import adbc_driver_postgresql.dbapi as adbc_postgres
import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import DATA, RESULTS, flightdeck_server, progress, wait_until_accelerated
from tests.tpch_queries import QUERIES, sql_type

TABLES = ("nation", "region", "part", "supplier", "partsupp", "customer", "orders", "lineitem")
PG_URI = "postgresql://postgres@127.0.0.1:5432/test"


def generate(scale: float) -> Path:
    folder = DATA / f"tpch_sf{scale:g}"
    if not (folder / "lineitem.parquet").exists():
        folder.mkdir(parents=True, exist_ok=True)
        progress(f"tpchgen-cli: TPC-H scale factor {scale:g} -> {folder}")
        tpchgen = Path(sys.executable).with_name("tpchgen-cli")
        subprocess.run([str(tpchgen), "parquet", "-s", str(scale), f"--output-dir={folder}"], check=True)
    return folder


def _plain(table: pa.Table) -> pa.Table:
    return table.cast(pa.schema([pa.field(f.name, pa.string() if pa.types.is_string_view(f.type) else f.type)
                                 for f in table.schema]))


def load_postgres(folder: Path, schema: str) -> int:
    """Load the Parquet files into ``schema`` unless it already holds them; returns total rows."""
    expected = {name: pq.ParquetFile(folder / f"{name}.parquet").metadata.num_rows for name in TABLES}
    with adbc_postgres.connect(PG_URI, autocommit=True) as conn, conn.cursor() as cursor:
        present = _row_counts(cursor, schema)
        if present == expected:
            progress(f"PostgreSQL schema {schema} already holds the data")
            return sum(expected.values())
        cursor.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        cursor.execute(f"CREATE SCHEMA {schema}")
        for name in TABLES:
            table = _plain(pq.read_table(folder / f"{name}.parquet"))
            progress(f"loading {name} ({table.num_rows:,} rows) into PostgreSQL")
            columns = ", ".join(f"{f.name} {sql_type(f.type, 'postgres')}" for f in table.schema)
            cursor.execute(f"CREATE TABLE {schema}.{name} ({columns})")
            cursor.adbc_ingest(name, table, mode="append", db_schema_name=schema)
            cursor.execute(f"ANALYZE {schema}.{name}")
    return sum(expected.values())


def _row_counts(cursor, schema: str) -> dict[str, int]:
    counts = {}
    for name in TABLES:
        try:
            cursor.execute(f"SELECT count(*) FROM {schema}.{name}")
        except Exception:  # not loaded yet
            return {}
        counts[name] = cursor.fetchone()[0]
    return counts


def write_config(folder: Path, schema: str, accelerated: bool, timeout: float) -> Path:
    lines = ["runtime: {data_dir: data, limits: {prepared_statement_ttl_seconds: 3600}}", "datasets:"]
    for name in TABLES:
        lines.append(f"  - from: 'postgres:{schema}.{name}'")
        lines.append(f"    name: {name}")
        lines.append(f"    params: {{pg_db: test, query_timeout: {timeout:g}}}")
        if accelerated:
            lines.append("    acceleration: {engine: duckdb, mode: memory}")
    path = folder / ("accelerated.yaml" if accelerated else "federated.yaml")
    path.write_text("\n".join(lines) + "\n")
    return path


def wait_for_copies(url: str) -> dict:
    """Wait until every copy is loaded; the refresh figures from the server's own status."""
    rows = wait_until_accelerated(
        url, report=lambda rows: f"refreshing copies: {sum(r['rows_loaded'] or 0 for r in rows):,} rows loaded")
    started = min(r["last_refresh_start"] for r in rows)
    ended = max(r["last_refresh_end"] for r in rows)
    total = sum(r["rows"] for r in rows)
    seconds = (ended - started).total_seconds()
    per_table = {r["name"]: {"rows": r["rows"], "seconds": round((r["last_refresh_end"] - r["last_refresh_start"])
                                                                 .total_seconds(), 3)} for r in rows}
    return {"rows": total, "seconds": round(seconds, 3), "rows_per_s": round(total / seconds),
            "tables": per_table}


class Timeout(Exception):
    pass


def run_limited(connection, sql: str, limit: float) -> tuple[float, int]:
    """(seconds, rows) of one query; cancelled and Timeout raised past ``limit`` seconds."""
    outcome: dict = {}
    cursor = connection.cursor()

    def work() -> None:
        started = time.perf_counter()
        try:
            cursor.execute(sql)
            outcome["rows"] = cursor.fetch_arrow_table().num_rows
            outcome["seconds"] = time.perf_counter() - started
        except Exception as error:
            outcome["error"] = error

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    thread.join(limit)
    if thread.is_alive():
        try:
            cursor.adbc_cancel()
        except Exception:
            pass
        thread.join(30)
        raise Timeout()
    cursor.close()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["seconds"], outcome["rows"]


def through_flightdeck(config: Path, repeats: int, limit: float, label: str) -> tuple[dict, dict | None]:
    """Per query: best seconds (or "timeout"), rows. Restarts the server after a timeout so
    no abandoned query keeps the CPUs busy for the next one."""
    server = flightdeck_server(config)
    results = {}
    try:
        # Inside the try: a refresh that fails stops the server too.
        refresh = wait_for_copies(server.url) if "accelerated" in config.name else None
        for number, sql in sorted(QUERIES.items()):
            times, rows = [], None
            try:
                with flightsql.connect(server.url, autocommit=True) as connection:
                    for _ in range(repeats):
                        seconds, rows = run_limited(connection, sql, limit)
                        times.append(seconds)
                results[number] = {"seconds": round(min(times), 4), "rows": rows}
                progress(f"{label} Q{number}: {min(times) * 1000:,.0f} ms")
            except Timeout:
                results[number] = {"seconds": "timeout", "rows": None}
                progress(f"{label} Q{number}: timeout after {limit:g}s; restarting the server")
                server.stop()
                server = flightdeck_server(config)
    finally:
        server.stop()
    return results, refresh


def in_process_duckdb(folder: Path, repeats: int) -> dict:
    connection = duckdb.connect()
    for name in TABLES:
        connection.register("incoming", _plain(pq.read_table(folder / f"{name}.parquet")))
        connection.execute(f"CREATE TABLE {name} AS SELECT * FROM incoming")
        connection.unregister("incoming")
    results = {}
    for number, sql in sorted(QUERIES.items()):
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            rows = connection.sql(sql).to_arrow_table().num_rows
            times.append(time.perf_counter() - started)
        results[number] = {"seconds": round(min(times), 4), "rows": rows}
    progress("DuckDB in-process: done")
    return results


def geometric_mean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def compare(slow: dict, fast: dict, limit: float) -> dict:
    """Per-query ratio slow/fast and their geometric mean; a timeout counts as the limit
    (so the mean is a lower bound when any query timed out)."""
    ratios = {}
    for number in sorted(QUERIES):
        slow_seconds = slow[number]["seconds"]
        slow_seconds = limit if slow_seconds == "timeout" else slow_seconds
        ratios[number] = round(slow_seconds / fast[number]["seconds"], 2)
    return {"per_query": ratios, "geometric_mean": round(geometric_mean(list(ratios.values())), 2),
            "timeouts_counted_as_limit": sum(1 for n in QUERIES if slow[n]["seconds"] == "timeout")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--timeout", type=float, default=60.0, help="per-query limit, seconds")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder = generate(args.scale)
    schema = f"fd_bench_tpch_sf{str(args.scale).replace('.', '_')}"
    total_rows = load_postgres(folder, schema)
    accelerated, refresh = through_flightdeck(write_config(folder, schema, True, args.timeout),
                                              args.repeats, args.timeout, "accelerated")
    progress(f"refresh: {refresh['rows']:,} rows in {refresh['seconds']}s = {refresh['rows_per_s']:,} rows/s")
    in_process = in_process_duckdb(folder, args.repeats)
    federated, _ = through_flightdeck(write_config(folder, schema, False, args.timeout), 1, args.timeout,
                                      "federated")
    for number in QUERIES:
        assert accelerated[number]["rows"] == in_process[number]["rows"], f"Q{number}: row counts differ"
    report = {
        "scale_factor": args.scale, "rows": total_rows, "timeout_s": args.timeout, "repeats": args.repeats,
        "refresh_postgres_to_duckdb": refresh,
        "seconds": {"accelerated_duckdb": accelerated, "federated_postgres": federated,
                    "duckdb_in_process": in_process},
        "speedup_accelerated_vs_federated": compare(federated, accelerated, args.timeout),
        "overhead_accelerated_vs_in_process": compare(accelerated, in_process, args.timeout),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "acceleration.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    plot(report, RESULTS / "acceleration.png")
    print(json.dumps({k: report[k]["geometric_mean"] for k in ("speedup_accelerated_vs_federated",
                                                                 "overhead_accelerated_vs_in_process")}))
    print(f"refresh throughput: {refresh['rows_per_s']:,} rows/s")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    numbers = sorted(QUERIES)
    limit = report["timeout_s"]
    figure, axis = plt.subplots(figsize=(13, 4.8))
    x = np.arange(len(numbers))
    series = (("federated_postgres", "federated (PostgreSQL)"), ("accelerated_duckdb", "accelerated (DuckDB copy)"),
              ("duckdb_in_process", "DuckDB in-process"))
    for offset, (key, label) in zip((-0.27, 0, 0.27), series):
        values = [report["seconds"][key][n]["seconds"] for n in numbers]
        heights = [limit if v == "timeout" else v for v in values]
        bars = axis.bar(x + offset, heights, 0.27, label=label)
        for bar, value in zip(bars, values):
            if value == "timeout":
                bar.set_hatch("//")
    axis.set_yscale("log")
    axis.set_xticks(x, [f"Q{n}" for n in numbers])
    axis.set_ylabel("seconds (log; hatched = timeout)")
    speedup = report["speedup_accelerated_vs_federated"]["geometric_mean"]
    overhead = report["overhead_accelerated_vs_in_process"]["geometric_mean"]
    axis.set_title(f"TPC-H SF{report['scale_factor']:g}: accelerated is {speedup}x faster than federated "
                   f"(geo. mean); {overhead}x DuckDB in-process")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
