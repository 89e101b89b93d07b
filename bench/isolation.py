"""The cost of isolation: small queries with grants, limits and the audit file on vs off.

    python -m bench.isolation [--seconds 10] [--rounds 3] [--rows 100000]

Three flightdeck servers over the same generated DuckDB table, run in turns, one ADBC client
each: "open" (no auth, the default limits, the audit kept only in memory), "granted" (an API key
granted one of two datasets, its own limits, every query also written to the audit file) and
"columns" (the same, and the dataset's columns limited to an allow-list, which keeps its
statements from going to DuckDB whole). Each series runs ``--rounds`` times, interleaved, for
``--seconds``. Reports q/s, p50 and p99 per series and the ratios to "open"; writes
bench/results/isolation.json and isolation.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import duckdb
import yaml

from bench.common import DATA, RESULTS, busy_note, flightdeck_server, percentile, progress

KEY = "isolation-bench-key-0123456789"
SERIES = ("open", "granted", "columns")
QUERIES = {
    "SELECT 1": ("SELECT 1 AS one", None),
    "key lookup": ("SELECT id, label, amount FROM items WHERE id = ?", "id"),
    "small aggregate": ("SELECT label, count(*) AS n FROM items WHERE id < ? GROUP BY label", "id"),
}


def write_table(rows: int) -> Path:
    path = DATA / f"isolation_{rows}.duckdb"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        progress(f"writing {rows:,} rows to {path}")
        with duckdb.connect(str(path)) as con:
            con.execute(f"CREATE TABLE items AS SELECT range AS id, 'label ' || (range % 50) AS label, "
                        f"range * 0.5 AS amount, md5(range::VARCHAR) AS secret FROM range({rows})")
            con.execute("CREATE TABLE other AS SELECT range AS id FROM range(10)")
    return path


def configs(folder: Path, table: Path) -> dict[str, Path]:
    datasets = [{"from": "duckdb:items", "name": "items", "params": {"duckdb_open": str(table)}},
                {"from": "duckdb:other", "name": "other", "params": {"duckdb_open": str(table)}}]
    def isolated(columns: dict) -> dict:
        return {"auth": {"api_keys": [{"name": "agent", "key": KEY, "datasets": ["items"], "columns": columns,
                                       "limits": {"query_timeout_seconds": 30, "max_result_rows": 100_000,
                                                  "max_concurrent_queries": 4}}]},
                "limits": {"max_sql_length": 10_000},
                "audit": {"log": str(folder / f"audit-{len(columns)}.jsonl")}}

    paths = {}
    for name, runtime in (("open", {}), ("granted", isolated({})),
                          ("columns", isolated({"items": ["id", "label", "amount"]}))):
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump({"datasets": datasets, "runtime": runtime}))
    return paths


def run_series(url: str, key: str | None, sql: str, bound: str | None, rows: int, seconds: float) -> dict:
    db_kwargs = {"adbc.flight.sql.authorization_header": f"Bearer {key}"} if key else {}
    latencies = []
    with flightsql.connect(url, autocommit=True, db_kwargs=db_kwargs) as conn, conn.cursor() as cursor:
        deadline = time.perf_counter() + seconds
        n = 0
        while time.perf_counter() < deadline:
            parameters = [(n * 7919) % rows] if bound else None
            started = time.perf_counter()
            cursor.execute(sql, parameters)
            cursor.fetch_arrow_table()
            latencies.append(time.perf_counter() - started)
            n += 1
    return {"queries": len(latencies), "queries_per_second": round(len(latencies) / seconds, 1),
            "p50_ms": round(percentile(latencies, 50) * 1000, 3), "p99_ms": round(percentile(latencies, 99) * 1000, 3)}


def merge(rounds: list[dict]) -> dict:
    """Rounds of one series as one: all queries, the median round's figures."""
    by_rate = sorted(rounds, key=lambda r: r["queries_per_second"])
    middle = by_rate[len(by_rate) // 2]
    return {**middle, "rounds": [r["queries_per_second"] for r in rounds]}


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["queries"])
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, metric, label in ((axes[0], "queries_per_second", "queries per second (1 client)"),
                                (axes[1], "p50_ms", "p50 latency, ms")):
        for offset, series in enumerate(SERIES):
            values = [report["queries"][n][series][metric] for n in names]
            bars = axis.bar([i + offset * 0.27 for i in range(len(names))], values, 0.27, label=series)
            axis.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=6, padding=2)
        axis.set_xticks([i + 0.27 for i in range(len(names))], names, fontsize=8)
        axis.set_title(label, fontsize=10)
        axis.legend(fontsize=8)
    figure.suptitle("The cost of isolation: open vs granted (grants, limits, audit file) vs columns (+ allow-list)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each round of a series")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each series, interleaved")
    parser.add_argument("--rows", type=int, default=100_000, help="rows of the queried table")
    args = parser.parse_args()
    note = busy_note()
    if note:
        progress(note)
    table = write_table(args.rows)
    results: dict[str, dict[str, list[dict]]] = {name: {series: [] for series in SERIES} for name in QUERIES}
    with tempfile.TemporaryDirectory() as folder:
        paths = configs(Path(folder), table)
        servers = {name: flightdeck_server(path) for name, path in paths.items()}
        try:
            for round_number in range(1, args.rounds + 1):
                for name, (sql, bound) in QUERIES.items():
                    for series in SERIES:
                        key = None if series == "open" else KEY
                        figures = run_series(servers[series].url, key, sql, bound, args.rows, args.seconds)
                        results[name][series].append(figures)
                        progress(f"round {round_number}/{args.rounds} {name}, {series}: "
                                 f"{figures['queries_per_second']} q/s, p50 {figures['p50_ms']} ms")
        finally:
            for server in servers.values():
                server.stop()
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
              "settings": vars(args), "note": note, "queries": {}}
    for name, rounds in results.items():
        merged = {series: merge(rounds[series]) for series in SERIES}
        entry = report["queries"][name] = dict(merged)
        for series in SERIES[1:]:
            entry[f"{series}_vs_open"] = {
                "p50": round(merged[series]["p50_ms"] / merged["open"]["p50_ms"], 3),
                "queries_per_second": round(merged[series]["queries_per_second"]
                                            / merged["open"]["queries_per_second"], 3)}
            progress(f"{name}: p50 {series}/open {entry[f'{series}_vs_open']['p50']}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "isolation.json").write_text(json.dumps(report, indent=2))
    plot(report, RESULTS / "isolation.png")
    print(json.dumps({name: {k: v for k, v in q.items() if k.endswith("_vs_open")}
                      for name, q in report["queries"].items()}, indent=2))


if __name__ == "__main__":
    main()
