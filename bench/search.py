"""Search benchmark: latency of vector, full-text and hybrid search over 100k embedded rows,
through Flight SQL (ADBC client, server in its own process).

    python -m bench.search [--rows 100000] [--queries 200]

The rows are short incident notes written to Parquet and accelerated in DuckDB (file mode)
with an embedded, full-text-indexed column; the first run embeds them all (progress lines),
later runs reuse the kept copy and its embeddings. Each query text is new (its embedding is
part of the latency). Reports p50/p99 per mode, with and without a WHERE filter.
Writes bench/results/search.json and search.png.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import DATA, RESULTS, flightdeck_server, percentile, progress, wait_until_accelerated

SERVICES = ["checkout-api", "orders-db", "pgbouncer", "payments", "catalog", "search", "auth", "cdn"]
SYMPTOMS = ["connection pool exhausted", "p99 latency above SLO", "disk 95% full on log volume",
            "TLS certificate expires in 3 days", "cache hit ratio dropped to 20%", "502 from the gateway",
            "sequential scan on orders", "too many clients already", "retry storm after deploy",
            "OOM killed after scale out"]


def make_notes(rows: int, path: Path) -> None:
    if path.exists() and pq.ParquetFile(path).metadata.num_rows == rows:
        return
    rng = np.random.default_rng(7)
    services = np.array(SERVICES)[rng.integers(0, len(SERVICES), rows)]
    symptoms = np.array(SYMPTOMS)[rng.integers(0, len(SYMPTOMS), rows)]
    notes = [f"{service}: {symptom} (ticket {i})" for i, (service, symptom) in enumerate(zip(services, symptoms))]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": np.arange(rows, dtype=np.int64), "service": services, "note": notes}), path)


def write_config(folder: Path, parquet: Path) -> Path:
    config = folder / "search.yaml"
    config.write_text(
        "runtime: {data_dir: data}\n"
        "datasets:\n"
        f"  - from: 'file:{parquet.name}'\n"
        "    name: notes\n"
        "    acceleration: {engine: duckdb, mode: file, ready_timeout: 3600}\n"
        "    columns:\n"
        "      - name: note\n"
        "        embeddings: [{from: minilm}]\n"
        "        full_text_search: {enabled: true}\n")
    return config


def wait_indexed(url: str) -> None:
    wait_until_accelerated(url, ["public.notes"], every=5,
                           report=lambda rows: "loading and embedding the notes (progress lines in the server log)")


def measure(connection, sql: str, queries: list[str]) -> dict:
    times = []
    with connection.cursor() as cursor:
        for query in queries:
            started = time.perf_counter()
            cursor.execute(sql, (query,))
            rows = cursor.fetchall()
            times.append((time.perf_counter() - started) * 1000)
            assert rows, sql
    return {"p50_ms": round(percentile(times, 50), 2), "p99_ms": round(percentile(times, 99), 2),
            "mean_ms": round(statistics.mean(times), 2), "queries": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    folder = DATA / "search"
    parquet = folder / f"notes_{args.rows}.parquet"
    make_notes(args.rows, parquet)
    server = flightdeck_server(write_config(folder, parquet))
    rng = np.random.default_rng(11)
    queries = [f"{SERVICES[rng.integers(0, len(SERVICES))]} {SYMPTOMS[rng.integers(0, len(SYMPTOMS))]} #{i}"
               for i in range(args.queries)]
    report: dict = {"rows": args.rows, "k": 10, "modes": {}}
    try:
        started = time.perf_counter()
        wait_indexed(server.url)
        report["startup_to_ready_s"] = round(time.perf_counter() - started, 1)
        with flightsql.connect(server.url, autocommit=True) as connection:
            measure(connection, "SELECT id FROM vector_search(notes, ?, 10)", queries[:5])  # warm up
            for mode in ("vector", "text", "hybrid"):
                plain = measure(connection, f"SELECT id, score FROM {mode}_search(notes, ?, 10)", queries)
                filtered = measure(connection, f"SELECT id, score FROM {mode}_search(notes, ?, 10) "
                                               "WHERE service = 'pgbouncer'", queries)
                report["modes"][mode] = {"plain": plain, "where_service": filtered}
                progress(f"{mode}: p50 {plain['p50_ms']} ms, p99 {plain['p99_ms']} ms; "
                         f"with WHERE p50 {filtered['p50_ms']} ms")
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchall()
            report["select_1"] = measure(connection, "SELECT ? AS q", queries[:50])
    finally:
        server.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "search.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "search.png")
    print(json.dumps({m: v["plain"] for m, v in report["modes"].items()}, indent=2))


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    figure, axis = plt.subplots(figsize=(8, 4.2))
    x = np.arange(len(modes))
    for offset, (variant, label) in zip((-0.3, -0.1, 0.1, 0.3), (("plain", "p50"), ("plain", "p99"),
                                                                 ("where_service", "p50 with WHERE"),
                                                                 ("where_service", "p99 with WHERE"))):
        key = "p50_ms" if label.startswith("p50") else "p99_ms"
        axis.bar(x + offset, [report["modes"][m][variant][key] for m in modes], 0.2, label=label)
    axis.set_xticks(x, [f"{m}_search" for m in modes])
    axis.set_ylabel("ms per query (ADBC Flight SQL)")
    axis.set_title(f"search latency, top 10 of {report['rows']:,} embedded rows")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
