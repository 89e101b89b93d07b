"""Agent-loop benchmark: many small queries from many clients, flightdeck vs the transport's floor.

    python -m bench.agent_loop [--seconds 20] [--clients 1,4,16] [--rows 1000000] [--only 'NAME;NAME']

The floor is a bare pyarrow.flight server answering the Flight SQL call sequence of the ADBC
driver with a constant one-row batch (bench/bare_flight_server.py). Against it, flightdeck runs
the loops an agent runs, from ADBC dbapi clients in separate processes (one prepared cursor each,
a new binding per call): ``SELECT 1``; a key lookup with a bound parameter on an accelerated
DuckDB copy of a PostgreSQL table of ``--rows`` rows; the same lookup on a SQLite copy of it;
the same lookup on the PostgreSQL table
itself (federated); a small aggregate on the copy; and the lookup on the copy through
HTTP POST /v1/sql with httpx. Each series reports q/s, p50, p99 and the server's CPU seconds
per query, each also as a ratio to the floor at the same client count.

A cProfile of the in-process call path (what the Flight SQL door asks of the Service per call)
gives the per-call breakdown. Writes bench/results/agent_loop.json and agent_loop.png.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import multiprocessing
import os
import platform
import pstats
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pyarrow as pa

from bench.common import RESULTS, Process, flightdeck_server, wait_until_accelerated

PG_URI = "postgresql://postgres@127.0.0.1:5432/test"
PG_PARAMS = {"pg_host": "127.0.0.1", "pg_db": "test", "pg_user": "postgres"}
SCHEMA = "fd_bench_agent"
TABLE = "items"
GROUPS = 100
PROFILE_CALLS = 2000


def progress(message: str) -> None:
    print(f"[bench.agent_loop] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Workload:
    name: str
    sql: str
    parameters: Callable[[random.Random, int], list] | None  # (rng, rows) -> one binding
    http: bool = False  # through HTTP POST /v1/sql instead of Flight SQL


def _key(rng: random.Random, rows: int) -> list:
    return [rng.randrange(rows)]


WORKLOADS = [
    Workload("SELECT 1", "SELECT 1 AS one", None),
    Workload("lookup, DuckDB copy", "SELECT id, name, value FROM items_copy WHERE id = ?", _key),
    Workload("lookup, SQLite copy", "SELECT id, name, value FROM items_sqlite WHERE id = ?", _key),
    Workload("lookup, PostgreSQL", "SELECT id, name, value FROM items_pg WHERE id = ?", _key),
    Workload("aggregate, DuckDB copy",
             "SELECT grp, count(*) AS n, sum(value) AS total FROM items_copy WHERE id < 2000 "
             "GROUP BY grp ORDER BY grp LIMIT 5", None),
    Workload("lookup, DuckDB copy, HTTP", "SELECT id, name, value FROM items_copy WHERE id = $1", _key, http=True),
]


# ---- data ----

def ensure_table(rows: int) -> None:
    """``rows`` rows in PostgreSQL (id primary key, name, value, grp), created once."""
    import adbc_driver_postgresql.dbapi as pg

    with pg.connect(PG_URI, autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name = $2",
                       [SCHEMA, TABLE])
        if cursor.fetchone()[0]:
            cursor.execute(f"SELECT count(*) FROM {SCHEMA}.{TABLE}")
            if cursor.fetchone()[0] == rows:
                return
        progress(f"loading {rows:,} rows into PostgreSQL {SCHEMA}.{TABLE}")
        cursor.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
        cursor.execute(f"CREATE SCHEMA {SCHEMA}")
        rng = np.random.default_rng(7)
        ids = np.arange(rows, dtype=np.int64)
        table = pa.table({"id": ids, "name": pa.array([f"item-{i}" for i in ids]),
                          "value": rng.random(rows), "grp": (ids % GROUPS).astype(np.int32)})
        cursor.adbc_ingest(TABLE, table, mode="create", db_schema_name=SCHEMA)
        cursor.execute(f"ALTER TABLE {SCHEMA}.{TABLE} ADD PRIMARY KEY (id)")
        cursor.execute(f"ANALYZE {SCHEMA}.{TABLE}")


def write_config(folder: Path) -> Path:
    import yaml

    source = f"postgres:{SCHEMA}.{TABLE}"
    config = {
        "runtime": {"data_dir": str(folder / "data")},
        "datasets": [
            {"from": source, "name": "items_copy", "params": {**PG_PARAMS, "connect_timeout": 9},
             "acceleration": {"engine": "duckdb", "mode": "memory", "indexes": {"id": "enabled"}}},
            {"from": source, "name": "items_sqlite", "params": {**PG_PARAMS, "connect_timeout": 9},
             "acceleration": {"engine": "sqlite", "mode": "memory", "indexes": {"id": "enabled"}}},
            {"from": source, "name": "items_pg", "params": PG_PARAMS},
        ],
    }
    path = folder / "flightdeck.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---- clients, one process each ----

def _client(kind: str, url: str, workload: Workload, rows: int, seconds: float, start_at: float,
            seed: int, results) -> None:
    rng = random.Random(seed)
    latencies: list[float] = []
    call = _http_call(url, workload) if kind == "http" else _adbc_call(url, workload)
    try:
        for _ in range(5):  # warm-up: connection, prepared statement
            call(workload.parameters(rng, rows) if workload.parameters else None)
        time.sleep(max(0.0, start_at - time.time()))
        deadline = time.perf_counter() + seconds
        while True:
            started = time.perf_counter()
            if started >= deadline:
                break
            call(workload.parameters(rng, rows) if workload.parameters else None)
            latencies.append(time.perf_counter() - started)
        results.put((latencies, None))
    except Exception as error:  # reported by the parent
        results.put((latencies, f"{type(error).__name__}: {error}"))


def _adbc_call(url: str, workload: Workload) -> Callable[[list | None], None]:
    import adbc_driver_flightsql.dbapi as flightsql

    connection = flightsql.connect(url, autocommit=True)
    cursor = connection.cursor()

    def call(parameters: list | None) -> None:
        cursor.execute(workload.sql, parameters)
        rows = cursor.fetchall()
        assert len(rows) >= 1

    return call


def _http_call(url: str, workload: Workload) -> Callable[[list | None], None]:
    import httpx

    client = httpx.Client(base_url=url, timeout=30)

    def call(parameters: list | None) -> None:
        response = client.post("/v1/sql", json={"sql": workload.sql, "parameters": parameters or []},
                               headers={"accept": "application/json"})
        response.raise_for_status()

    return call


def run_series(kind: str, url: str, server_pid: int, workload: Workload, clients: int,
               rows: int, seconds: float) -> dict:
    """``clients`` processes running ``workload`` for ``seconds``: q/s, latency, server CPU."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    start_at = time.time() + 3.0 + 0.3 * clients  # every client connected and warmed up by then
    processes = [context.Process(target=_client, args=(kind, url, workload, rows, seconds, start_at, i, results))
                 for i in range(clients)]
    for process in processes:
        process.start()
    server = psutil.Process(server_pid)
    time.sleep(max(0.0, start_at - time.time()))
    cpu_before = sum(server.cpu_times()[:2])
    collected = [results.get(timeout=seconds + 120) for _ in processes]
    cpu = sum(server.cpu_times()[:2]) - cpu_before
    for process in processes:
        process.join(timeout=30)
    errors = [error for _, error in collected if error]
    if errors:
        raise RuntimeError(f"{workload.name} ({kind}, {clients} clients): {errors[0]}")
    latencies = np.array([x for run, _ in collected for x in run]) * 1000
    queries = len(latencies)
    return {"clients": clients, "queries": queries, "qps": round(queries / seconds, 1),
            "p50_ms": round(float(np.percentile(latencies, 50)), 3),
            "p99_ms": round(float(np.percentile(latencies, 99)), 3),
            "p999_ms": round(float(np.percentile(latencies, 99.9)), 3),
            "max_ms": round(float(latencies.max()), 3),
            "server_cpu_ms_per_query": round(cpu * 1000 / max(queries, 1), 4)}


def with_ratios(series: dict, floor: dict) -> dict:
    """q/s as a share of the floor's (higher is better); latency and CPU as multiples of it."""
    return {**series,
            "qps_vs_floor": round(series["qps"] / floor["qps"], 3),
            "p50_vs_floor": round(series["p50_ms"] / floor["p50_ms"], 3),
            "p99_vs_floor": round(series["p99_ms"] / floor["p99_ms"], 3),
            "p999_vs_floor": round(series["p999_ms"] / floor["p999_ms"], 3),
            "cpu_vs_floor": round(series["server_cpu_ms_per_query"] / max(floor["server_cpu_ms_per_query"], 1e-6), 3)}


# ---- the per-call profile, in process ----

def profile_calls(config: Path, rows: int) -> dict:
    """What one lookup on the copy costs inside the server, by phase and by function: the calls
    the Flight SQL door makes per execution (plan with the binding, row count, execute, read)."""
    from flight.cli import Serving
    from flightdeck.auth import OPERATOR
    from flightdeck.config import load_config

    serving = Serving(load_config(config))
    try:
        for refresher in serving.stack.accelerator.refreshers.values():
            refresher.loaded.wait(600)
        service, rng = serving.service, random.Random(3)
        sql = WORKLOADS[1].sql
        service.plan(OPERATOR, sql, door="bench")  # as CreatePreparedStatement does
        phases = {"plan": 0.0, "row_count": 0.0, "execute": 0.0, "read": 0.0}

        def one_call() -> None:
            marks = [time.perf_counter()]
            planned = service.plan(OPERATOR, sql, [pa.scalar(rng.randrange(rows))], door="bench")
            marks.append(time.perf_counter())
            service.row_count(planned)
            marks.append(time.perf_counter())
            reader = service.execute(planned)
            marks.append(time.perf_counter())
            reader.read_all()
            marks.append(time.perf_counter())
            for phase, start, end in zip(phases, marks, marks[1:]):
                phases[phase] += end - start

        for _ in range(50):
            one_call()
        phases = dict.fromkeys(phases, 0.0)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(PROFILE_CALLS):
            one_call()
        profiler.disable()
    finally:
        serving.close()
    stats = pstats.Stats(profiler)
    top = sorted(((key, value) for key, value in stats.stats.items()), key=lambda kv: -kv[1][3])
    functions = [{"function": f"{Path(file).name}:{line}({name})", "calls_per_query": round(calls / PROFILE_CALLS, 2),
                  "cumulative_ms_per_query": round(cumulative * 1000 / PROFILE_CALLS, 4),
                  "own_ms_per_query": round(own * 1000 / PROFILE_CALLS, 4)}
                 for (file, line, name), (_, calls, own, cumulative, _) in top[:25]]
    return {"sql": sql, "calls": PROFILE_CALLS, "note": "times include cProfile's own overhead",
            "phases_ms_per_query": {k: round(v * 1000 / PROFILE_CALLS, 4) for k, v in phases.items()},
            "top_functions_by_cumulative_time": functions}


# ---- the report ----

def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = report["series"]
    names = [n for n in series if n != "floor"]
    counts = sorted({int(c) for s in series.values() for c in s})
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    x = np.arange(len(names))
    width = 0.8 / len(counts)
    for column, (key, label) in enumerate([("qps_vs_floor", "q/s as a share of the floor's (higher is better)"),
                                           ("p99_vs_floor", "p99 latency, multiple of the floor's"),
                                           ("cpu_vs_floor", "server CPU per query, multiple of the floor's")]):
        axis = axes[column]
        for offset, count in enumerate(counts):
            values = [series[n].get(str(count), {}).get(key, 0) for n in names]
            bars = axis.bar(x + offset * width, values, width, label=f"{count} client(s)")
            axis.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=2)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set_xticks(x + width * (len(counts) - 1) / 2, [n.replace(", ", "\n") for n in names], fontsize=8)
        axis.set_title(label, fontsize=10)
        axis.legend(fontsize=8)
    figure.suptitle(f"Agent loop: flightdeck vs a bare Flight SQL server (the floor), {report['seconds']} s per series")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of each series")
    parser.add_argument("--clients", default="1,4,16", help="client counts, comma-separated")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the looked-up table")
    parser.add_argument("--only", default="", help="workload names to run, separated by semicolons (default: all)")
    parser.add_argument("--no-profile", action="store_true", help="skip the in-process cProfile")
    parser.add_argument("--output", default=str(RESULTS / "agent_loop.json"))
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    chosen = [w for w in WORKLOADS if not args.only or w.name in args.only.split(";")]

    ensure_table(args.rows)
    folder = Path(tempfile.mkdtemp(prefix="fd-agent-loop-"))
    config = write_config(folder)
    floor = Process([sys.executable, "-m", "bench.bare_flight_server"])
    ours = flightdeck_server(config)
    series: dict[str, dict[str, dict]] = {"floor": {}}
    try:
        progress("waiting for the DuckDB copy")
        wait_until_accelerated(ours.url)
        http_url = ours.http_url
        for count in counts:
            floor_result = run_series("adbc", floor.url, floor.process.pid, WORKLOADS[1], count, args.rows, args.seconds)
            series["floor"][str(count)] = floor_result
            progress(f"floor, {count} client(s): {floor_result['qps']} q/s, p50 {floor_result['p50_ms']} ms, "
                     f"p99 {floor_result['p99_ms']} ms, p99.9 {floor_result['p999_ms']} ms, CPU {floor_result['server_cpu_ms_per_query']} ms/q")
            for workload in chosen:
                kind, url = ("http", http_url) if workload.http else ("adbc", ours.url)
                result = with_ratios(run_series(kind, url, ours.process.pid, workload, count, args.rows,
                                                args.seconds), floor_result)
                series.setdefault(workload.name, {})[str(count)] = result
                progress(f"{workload.name}, {count} client(s): {result['qps']} q/s ({result['qps_vs_floor']}x floor), "
                         f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms ({result['p99_vs_floor']}x), "
                         f"p99.9 {result['p999_ms']} ms ({result['p999_vs_floor']}x), max {result['max_ms']} ms, "
                         f"CPU {result['server_cpu_ms_per_query']} ms/q")
    finally:
        ours.stop()
        floor.stop()
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "seconds": args.seconds, "rows": args.rows,
              "statements": {w.name: w.sql for w in chosen}, "series": series}
    if not args.no_profile:
        progress(f"profiling {PROFILE_CALLS} lookups in process")
        report["per_call_profile"] = profile_calls(config, args.rows)
        phases = report["per_call_profile"]["phases_ms_per_query"]
        progress("per call (ms): " + ", ".join(f"{k} {v}" for k, v in phases.items()))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, output.with_suffix(".png"))
    progress(f"wrote {output} and {output.with_suffix('.png')}")


if __name__ == "__main__":
    main()
