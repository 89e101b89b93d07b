"""Flight benchmark: DoGet throughput and 1-row query latency, side by side in one run.

    python -m bench.flight [--rows 10000000] [--repeats 7] [--latency-queries 300]

(a) Throughput of a 10M-row, 3-column result read from Parquet: flightdeck (Flight SQL:
    GetFlightInfo + DoGet, planning included) vs a bare pyarrow.flight server streaming
    the same file with pyarrow.dataset, and the bare server streaming from memory (the
    transport ceiling). Runs are interleaved; medians are reported.
(b) Latency of a 1-row query through ADBC dbapi vs the same query on the engine in-process.

Writes bench/results/flight.json and flight.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from bench.common import (DATA, RESULTS, Process, drain, flightdeck_server, make_parquet, percentile,
                          progress, read_flightsql)

THROUGHPUT_QUERY = "SELECT id, value, label FROM big"
WARMUP_RUNS = 3


def read_flightdeck(client: flight.FlightClient) -> tuple[int, int]:
    return read_flightsql(client, THROUGHPUT_QUERY)


def measure_throughput(parquet: Path, config: Path, repeats: int) -> dict:
    bare = Process([sys.executable, "-m", "bench.bare_flight_server", str(parquet)])
    ours = flightdeck_server(config)
    # DataFusion's allocator (mimalloc) keeps freed memory for reuse; purging at once returns
    # it to the OS after every query. This series shows what that would cost.
    ours_purging = flightdeck_server(config, {"MIMALLOC_PURGE_DELAY": "0"})
    clients = {
        "flightdeck": (flight.FlightClient(ours.url), read_flightdeck),
        "flightdeck, MIMALLOC_PURGE_DELAY=0": (flight.FlightClient(ours_purging.url), read_flightdeck),
        "bare pyarrow.dataset": (flight.FlightClient(bare.url), lambda c: drain(c.do_get(flight.Ticket(b"parquet")))),
        "bare from memory (ceiling)": (flight.FlightClient(bare.url), lambda c: drain(c.do_get(flight.Ticket(b"memory")))),
    }
    seconds: dict[str, list[float]] = {name: [] for name in clients}
    sizes: dict[str, tuple[int, int]] = {}
    try:
        # Warm-up, the same for every series: page cache, connections, and the allocator's
        # high-water mark (DataFusion's mimalloc needs a few runs to reach its steady state).
        for _ in range(WARMUP_RUNS):
            for name, (client, read) in clients.items():
                sizes[name] = read(client)
        for repeat in range(repeats):
            for name, (client, read) in clients.items():
                started = time.perf_counter()
                rows, size = read(client)
                seconds[name].append(time.perf_counter() - started)
                assert rows == sizes[name][0]
            progress(f"throughput round {repeat + 1}/{repeats}: " + ", ".join(
                f"{n} {seconds[n][-1]:.3f}s" for n in clients))
    finally:
        for process in (bare, ours, ours_purging):
            process.stop()
    report = {}
    for name in clients:
        median = statistics.median(seconds[name])
        rows, size = sizes[name]
        report[name] = {"rows": rows, "bytes": size, "median_seconds": round(median, 4),
                        "seconds": [round(s, 4) for s in seconds[name]],
                        "rows_per_second": round(rows / median), "mib_per_second": round(size / median / 2**20, 1)}
    bare_parquet = report["bare pyarrow.dataset"]["median_seconds"]
    ceiling = report["bare from memory (ceiling)"]["median_seconds"]
    for name in clients:
        report[name]["ratio_vs_bare_parquet"] = round(bare_parquet / report[name]["median_seconds"], 3)
        report[name]["ratio_vs_ceiling"] = round(ceiling / report[name]["median_seconds"], 3)
    return report


def measure_latency(config: Path, queries: int) -> dict:
    import adbc_driver_flightsql.dbapi as flightsql

    from federation.catalog import Catalog
    from federation.engine import QueryEngine
    from flightdeck.config import load_config

    statements = {
        "SELECT 1": "SELECT 1 AS one",
        "point lookup (DuckDB orders)": "SELECT order_id, status, amount FROM orders WHERE order_id = 100042",
    }
    loaded = load_config(config)
    engine = QueryEngine(Catalog(loaded.config.dataset_specs(), loaded.base_dir))
    server = flightdeck_server(config)
    report = {}
    try:
        with flightsql.connect(server.url, autocommit=True) as connection:
            for label, sql in statements.items():
                over_adbc, in_process = [], []
                for _ in range(20):  # warm-up
                    with connection.cursor() as cursor:
                        cursor.execute(sql)
                        cursor.fetchall()
                    engine.query(sql).read_all()
                for _ in range(queries):
                    started = time.perf_counter()
                    with connection.cursor() as cursor:
                        cursor.execute(sql)
                        rows = cursor.fetchall()
                    over_adbc.append((time.perf_counter() - started) * 1000)
                    assert len(rows) == 1
                    started = time.perf_counter()
                    assert engine.query(sql).read_all().num_rows == 1
                    in_process.append((time.perf_counter() - started) * 1000)
                p50_adbc, p50_engine = percentile(over_adbc, 50), percentile(in_process, 50)
                report[label] = {
                    "sql": sql, "queries": queries,
                    "adbc_ms": {"p50": round(p50_adbc, 3), "p99": round(percentile(over_adbc, 99), 3)},
                    "in_process_engine_ms": {"p50": round(p50_engine, 3),
                                             "p99": round(percentile(in_process, 99), 3)},
                    "server_engine_share_of_p50": round(p50_engine / p50_adbc, 3),
                }
                progress(f"latency {label}: ADBC p50 {p50_adbc:.2f} ms, engine p50 {p50_engine:.2f} ms")
    finally:
        server.stop()
        engine.catalog.close()
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = report["throughput"]
    latency = report["latency"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8))
    names = list(throughput)
    values = [throughput[n]["mib_per_second"] for n in names]
    bars = left.barh(names, values, color=["#2b6cb0", "#90cdf4", "#718096", "#cbd5e0"])
    left.bar_label(bars, labels=[f"{v:.0f} MiB/s ({throughput[n]['ratio_vs_bare_parquet']:.2f}x)"
                                 for n, v in zip(names, values)], padding=3)
    left.set_xlabel("MiB/s (median); ratio vs bare pyarrow.dataset")
    left.set_title(f"DoGet, {throughput['flightdeck']['rows']:,} rows x 3 columns")
    left.invert_yaxis()
    left.set_xlim(0, max(values) * 1.45)
    labels = list(latency)
    x = np.arange(len(labels))
    for offset, (key, name) in enumerate([("adbc_ms", "through ADBC"), ("in_process_engine_ms", "engine in-process")]):
        p50 = [latency[l][key]["p50"] for l in labels]
        p99 = [latency[l][key]["p99"] for l in labels]
        right.bar(x + offset * 0.38, p50, 0.36, label=f"{name} p50")
        right.scatter(x + offset * 0.38, p99, marker="_", s=400, color="black", zorder=3,
                      label="p99" if offset == 0 else None)
    right.set_xticks(x + 0.19, labels)
    right.set_ylabel("milliseconds")
    right.set_title("1-row query latency")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--latency-queries", type=int, default=300)
    args = parser.parse_args()

    from flightdeck.demo import ensure_demo
    parquet = make_parquet(args.rows)
    config = DATA / "bench.yaml"
    config.write_text(f"datasets:\n  - from: file:{parquet.name}\n    name: big\n")
    demo_config = ensure_demo(DATA / "demo")

    report = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyarrow": pa.__version__},
        "throughput": measure_throughput(parquet, config, args.repeats),
        "latency": measure_latency(demo_config, args.latency_queries),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "flight.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "flight.png")
    print(json.dumps({"throughput_ratio_vs_bare_parquet": report["throughput"]["flightdeck"]["ratio_vs_bare_parquet"],
                      "throughput": {n: v["mib_per_second"] for n, v in report["throughput"].items()},
                      "latency_p50_ms": {n: v["adbc_ms"]["p50"] for n, v in report["latency"].items()},
                      "engine_share_of_p50": {n: v["server_engine_share_of_p50"] for n, v in report["latency"].items()}},
                     indent=2))
    progress(f"wrote {RESULTS / 'flight.json'} and {RESULTS / 'flight.png'}")


if __name__ == "__main__":
    main()
