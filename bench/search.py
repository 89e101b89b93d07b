"""Search benchmark: latency of vector, full-text and hybrid search over 100k embedded rows,
through Flight SQL (ADBC client, server in its own process), where that time goes, and the
approximate index at 1M generated vectors.

    python -m bench.search [--rows 100000] [--queries 200] [--ann-rows 1000000] [--output PATH]

1. Flight SQL: the rows are short incident notes written to Parquet and accelerated in DuckDB
   (file mode) with an embedded, full-text-indexed column; the first run embeds them all and
   builds the approximate index (progress lines), later runs reuse the kept copy, its
   embeddings and its index. Each query text is new (its embedding is part of the latency),
   except in the "repeated" row, which asks the same 10 texts over and over (the query
   embedding cache). Reports p50/p99 per mode, with and without a WHERE filter.
2. Breakdown: the same vector search in process (after the server stopped), its parts timed
   one by one, and a cProfile of the whole in-process call; the Flight SQL transport is the
   difference between the Flight SQL p50 and the in-process p50.
3. Approximate index at scale: ``--ann-rows`` generated embedding-like unit vectors
   (bench.vectors), the index built as a refresh builds it (rows/s), searched as a query is
   (p50), recall@10 against exact search, and exact search's p50 as the baseline; then under a
   WHERE that keeps one row in eight, by chance and against the query.
   ``--ann-rows 0`` skips it (the last run's figures for it are kept in the JSON).
Writes bench/results/search.json and search.png (``--output`` names another JSON, its PNG beside it).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import DATA, RESULTS, flightdeck_server, percentile, progress, wait_until_accelerated
from bench.vectors import exact_top_k, recall_at_k, unit_vectors

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
        f"    acceleration: {{engine: duckdb, mode: file, ready_timeout: {_ready_timeout(parquet)}}}\n"
        "    columns:\n"
        "      - name: note\n"
        "        embeddings: [{from: minilm}]\n"
        "        full_text_search: {enabled: true}\n")
    return config


def _ready_timeout(parquet: Path) -> int:
    """Seconds the first load may take: embedding runs at a few hundred notes a second here."""
    return max(3600, pq.ParquetFile(parquet).metadata.num_rows // 100)


def wait_indexed(url: str) -> None:
    """Wait until the notes are loaded, embedded and indexed, including the refresh a restart
    runs over a kept copy: a copy kept from an earlier run serves at once, while the server
    still reads the source again and indexes it, which would be measured with the searches."""
    def loaded(rows: list[dict]) -> bool:
        return all(r["refresh_state"] == "ready" and r["refreshes"] >= 1 for r in rows)

    def report(rows: list[dict]) -> str:  # a first load counts its chunks when it has embedded them all
        done = ", ".join(r["refresh_state"] + (f", {r['embedded_total']:,} chunks embedded"
                                               if r["embedded_total"] else "") for r in rows)
        return f"loading and embedding the notes ({done or 'starting'})"
    wait_until_accelerated(url, ["public.notes"], every=5, report=report, done=loaded)


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
    parser.add_argument("--ann-rows", type=int, default=1_000_000)
    parser.add_argument("--output", default=str(RESULTS / "search.json"))
    args = parser.parse_args()
    output = Path(args.output)
    folder = DATA / ("search" if args.rows == 100_000 else f"search_{args.rows}")  # each size keeps its copy
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
            report["vector_repeated_texts"] = measure(connection, "SELECT id, score FROM vector_search(notes, ?, 10)",
                                                      [queries[i % 10] for i in range(len(queries))])
            for mode in ("vector", "text", "hybrid"):  # texts new to each series: every one is embedded
                plain = measure(connection, f"SELECT id, score FROM {mode}_search(notes, ?, 10)",
                                [f"{query} ({mode})" for query in queries])
                filtered = measure(connection, f"SELECT id, score FROM {mode}_search(notes, ?, 10) "
                                               "WHERE service = 'pgbouncer'",
                                   [f"{query} ({mode}, filtered)" for query in queries])
                report["modes"][mode] = {"plain": plain, "where_service": filtered}
                progress(f"{mode}: p50 {plain['p50_ms']} ms, p99 {plain['p99_ms']} ms; "
                         f"with WHERE p50 {filtered['p50_ms']} ms")
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
                cursor.fetchall()
            report["select_1"] = measure(connection, "SELECT ? AS q", queries[:50])
    finally:
        server.stop()
    progress("vector search in process: where the time goes")
    report["breakdown"] = breakdown(write_config(folder, parquet), queries)
    report["breakdown"]["flight_sql_transport_ms"] = round(
        report["modes"]["vector"]["plain"]["p50_ms"] - report["breakdown"]["in_process_total_p50_ms"], 2)
    if args.ann_rows:
        report["approximate_index"] = approximate_at_scale(args.ann_rows, min(args.queries, 200))
    elif output.exists():  # skipped: the last run's figures at scale stay
        kept = json.loads(output.read_text()).get("approximate_index")
        if kept:
            report["approximate_index"] = kept
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, output.with_suffix(".png"))
    print(json.dumps({m: v["plain"] for m, v in report["modes"].items()}, indent=2))


def timed(call, repeat: list) -> float:
    """p50 milliseconds of ``call(item)`` over the items."""
    times = []
    for item in repeat:
        started = time.perf_counter()
        call(item)
        times.append((time.perf_counter() - started) * 1000)
    return round(percentile(times, 50), 3)


def breakdown(config: Path, queries: list[str]) -> dict:
    """The parts of one vector search, timed alone in this process, plus a cProfile."""
    from flightdeck.auth import Principal
    from flightdeck.config import load_config
    from flightdeck.service import Service
    from flightdeck.stack import Stack

    stack = Stack(load_config(config))
    try:
        service, anyone = Service(stack), Principal("anonymous")
        sql = "SELECT id, score FROM vector_search(notes, $1, 10)"
        service.query(anyone, sql, ["warm up"]).read_all()  # waits for the index
        status = stack.accelerator.refresher("public.notes").status
        while not (status.refreshes >= 1 and status.state == "ready"):  # the restart's refresh, as above
            time.sleep(1)
        index = stack.search.find("public.notes", None, "vector")
        embedder = stack.models.embedder("minilm")
        # 200 texts never asked before (the query embedding cache must not answer), however
        # few queries the run was given: each part below times its own slice of them.
        fresh = [f"{queries[i % len(queries)]} (breakdown {i})" for i in range(200)]
        vectors = [embedder.embed_numpy([q])[0] for q in fresh[:50]]
        snapshot = index._require().vectors
        parts = {
            "embed_query_p50_ms": timed(lambda q: embedder.embed_numpy([q]), fresh[:100]),
            "approximate_search_p50_ms": timed(lambda v: snapshot.search(v, 40, None), vectors),
            "exact_search_p50_ms": timed(lambda v: snapshot.exact.search(v, 40), vectors),
            "plan_p50_ms": timed(lambda q: service.plan(anyone, sql, [q]), fresh[100:150]),
            "in_process_total_p50_ms": timed(lambda q: service.query(anyone, sql, [q]).read_all(), fresh[150:]),
            "approximate": index.vectors.approximate is not None,
        }
        profiler = cProfile.Profile()
        profiler.enable()
        for q in fresh[:50]:
            service.query(anyone, sql, [q + " profiled"]).read_all()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(25)
        parts["cprofile_50_calls_top25_cumulative"] = [line for line in text.getvalue().splitlines() if line.strip()]
        progress(f"breakdown: { {k: v for k, v in parts.items() if not k.startswith('cprofile')} }")
        return parts
    finally:
        stack.close()


def approximate_at_scale(rows: int, queries: int) -> dict:
    """Build the approximate index over generated vectors as a refresh does; search it as a
    query does (chunk positions, exact rescoring); recall@10 against exact search."""
    import numpy as np

    from flightdeck.search_vectors import VectorSnapshot
    from inference.ann import EXPANSION_SEARCH, ApproximateIndex

    progress(f"approximate index: generating {rows:,} vectors")
    vectors, asked = unit_vectors(rows), unit_vectors(queries, seed=99)
    index = ApproximateIndex(vectors.shape[1])
    started = time.perf_counter()
    last = [started]

    def report(done: int, total: int) -> None:
        if time.perf_counter() - last[0] >= 10:
            last[0] = time.perf_counter()
            progress(f"approximate index: {done:,} of {total:,} vectors ({done / (last[0] - started):.0f}/s)")
    index.add(np.arange(rows), vectors, report)
    build_s = time.perf_counter() - started
    progress(f"approximate index: built in {build_s:.0f}s; exact reference for {queries} queries")
    exact = exact_top_k(vectors, asked, 10)
    slots = np.arange(rows, dtype=np.int64)
    snapshot = VectorSnapshot.of(vectors, slots, index)
    result = {"rows": rows, "dim": int(vectors.shape[1]), "build_s": round(build_s, 1),
              "build_rows_per_s": round(rows / build_s), "queries": queries,
              "exact_search_p50_ms": timed(lambda q: snapshot.exact.search(q, 10), asked[:20]),
              "by_ef_search": {}}
    for ef in sorted({128, 256, EXPANSION_SEARCH, 1024, 2048}):  # the default and its neighbours
        index.expansion_search = ef
        found, times = [], []
        for q in asked:
            begun = time.perf_counter()
            found.append(snapshot.search(q, 10, None).row_ids)
            times.append((time.perf_counter() - begun) * 1000)
        result["by_ef_search"][ef] = {"p50_ms": round(percentile(times, 50), 3),
                                      "p99_ms": round(percentile(times, 99), 3),
                                      "recall_at_10": round(recall_at_k(found, exact), 4)}
        progress(f"approximate index, efSearch {ef}: {result['by_ef_search'][ef]}")
    result["default_ef_search"] = EXPANSION_SEARCH
    result.update(result["by_ef_search"][EXPANSION_SEARCH])
    result["where_one_in_eight"] = filtered_at_scale(snapshot, vectors, asked[:20])
    progress(f"approximate index: {result}")
    return result


def filtered_at_scale(snapshot, vectors, asked) -> dict:
    """p50/p99 ms of a search for 40 chunks (what k = 10 asks for) under a WHERE that keeps one row
    in eight: by chance (found among the index's neighbours), or against the query (the eighth
    of the rows least like it, which its neighbours never hold: the kept rows are searched exactly)."""
    import numpy as np

    eighth = len(vectors) // 8
    by_chance = np.sort(np.random.default_rng(5).choice(len(vectors), eighth, replace=False))
    times: dict[str, list[float]] = {"by_chance": [], "against_the_query": []}
    for q in asked:
        least_like = np.sort(np.argpartition(vectors @ q, eighth)[:eighth])
        for name, kept in (("by_chance", by_chance), ("against_the_query", least_like)):
            begun = time.perf_counter()
            snapshot.search(q, 40, kept)
            times[name].append((time.perf_counter() - begun) * 1000)
    result = {name: {"p50_ms": round(percentile(t, 50), 2), "p99_ms": round(percentile(t, 99), 2)}
              for name, t in times.items()}
    progress(f"approximate index, WHERE keeping one row in eight: {result}")
    return result


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(report["modes"])
    scale = report.get("approximate_index")
    figure, axes = plt.subplots(1, 2 if scale else 1, figsize=(13 if scale else 8, 4.2), squeeze=False)
    axis = axes[0][0]
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
    if scale:
        plot_scale(axes[0][1], scale)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_scale(axis, scale: dict) -> None:
    """Approximate search at scale: p50 per efSearch, each bar labelled with its recall@10."""
    efs = list(scale["by_ef_search"])
    values = [scale["by_ef_search"][ef]["p50_ms"] for ef in efs]
    bars = axis.bar([str(ef) for ef in efs], values, color="tab:green")
    for bar, ef in zip(bars, efs):
        axis.annotate(f"recall {scale['by_ef_search'][ef]['recall_at_10']:.3f}",
                      (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    axis.set_xlabel(f"efSearch (default {scale['default_ef_search']}); exact search p50 "
                    f"{scale['exact_search_p50_ms']:.1f} ms")
    axis.set_ylabel("ms per search, in process")
    axis.set_title(f"HNSW over {scale['rows']:,} generated vectors (built at {scale['build_rows_per_s']:,} rows/s)")


if __name__ == "__main__":
    sys.exit(main())
