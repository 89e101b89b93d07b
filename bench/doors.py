"""Door benchmark: one flightdeck through HTTP, MCP and Flight SQL, side by side in one run.

    python -m bench.doors [--seconds 10] [--clients 1 16] [--rows 10000000] [--repeats 3]
                          [--sentences 1024]

One flightdeck process (Flight SQL, and HTTP with MCP at /v1/mcp) serves generated data:
(a) Small queries, `SELECT 1` and a key lookup bound as a parameter on a 10,000-row table:
    POST /v1/sql with JSON rows (httpx, one keep-alive client each), the MCP `sql` tool (the
    SDK's client over streamable HTTP, one session each, reused across calls) and Flight SQL
    (ADBC dbapi, one connection and cursor each), at 1 and 16 concurrent clients. Every client
    is a process of its own, so no client's interpreter caps the server; all of a round's
    clients start together after a warm-up and run for --seconds. q/s over all clients,
    p50/p99 of each call, and each door's ratio to Flight SQL.
(b) Bulk: `SELECT id, value, label` over a 10M-row Parquet file as Arrow IPC over HTTP (read
    with pyarrow.ipc as the response streams in; plain, zstd and gzip Content-Encoding) vs
    Flight SQL DoGet (pyarrow.flight); runs interleaved, median of --repeats after a warm-up.
(c) Embeddings: POST /v1/embeddings with the stock `openai` client, batches of 32, vs
    `SELECT embed(text)` over Flight SQL on the same sentences, batch by batch (the id range
    bound as parameters) and as one query; median of --repeats.

Writes bench/results/doors.json and doors.png.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import random
import statistics
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import adbc_driver_flightsql.dbapi as flightsql
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from bench.common import (DATA, RESULTS, busy_note, flightdeck_server, make_parquet, percentile, progress,
                          read_flightsql, sentences)
from tests.http_stream import ChunkFile

HERE = DATA / "doors"
KEYS = 10_000
MODEL = "minilm"
EMBED_BATCH = 32
WARMUP_CALLS = 20
BARRIER_SECONDS = 300  # how long a round's clients wait for each other to connect and warm up
DOORS = {"flight": "Flight SQL (ADBC)", "http": "HTTP /v1/sql (JSON)", "mcp": "MCP sql tool"}
BULK_QUERY = "SELECT id, value, label FROM big"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
BULK_SERIES = {"Flight SQL DoGet": None, "HTTP Arrow IPC": "identity",
               "HTTP Arrow IPC, zstd": "zstd", "HTTP Arrow IPC, gzip": "gzip"}


@dataclass(frozen=True)
class SmallQuery:
    label: str
    sql: str
    keyed: bool  # one placeholder, bound to a random key of the small table on each call


SMALL_QUERIES = (SmallQuery("SELECT 1", "SELECT 1 AS one", False),
                 SmallQuery("key lookup", "SELECT id, name, amount FROM keys WHERE id = ?", True))


def write_data(rows: int, count: int) -> tuple[Path, list[str]]:
    """The small table, the sentences and the server's config (the bulk file is shared with
    bench.flight); returns the config and the sentences."""
    HERE.mkdir(parents=True, exist_ok=True)
    big = make_parquet(rows)
    rng = np.random.default_rng(7)
    pq.write_table(pa.table({"id": np.arange(KEYS, dtype=np.int64),
                             "name": [f"customer {i}" for i in range(KEYS)],
                             "amount": rng.random(KEYS) * 1000}), HERE / "keys.parquet")
    texts = sentences(count, 6, 18, 3)
    pq.write_table(pa.table({"id": np.arange(count, dtype=np.int64), "text": texts}), HERE / "sentences.parquet")
    config = {
        "datasets": [{"from": f"file:../{big.name}", "name": "big"},
                     {"from": "file:keys.parquet", "name": "keys"},
                     {"from": "file:sentences.parquet", "name": "sentences"}],
        "embeddings": [{"name": MODEL, "from": "minilm", "params": {"threads": 2, "batch_size": EMBED_BATCH}}],
        "runtime": {"data_dir": "state"},  # the converted model stays here between runs
    }
    path = HERE / "flightdeck.yaml"
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path, texts


# --------------------------------------------------------------------------- small queries

Call = Callable[[str, list | None], int]  # (sql, parameters) -> rows returned


@contextmanager
def flight_door(urls: dict[str, str]) -> Iterator[Call]:
    with flightsql.connect(urls["flight"], autocommit=True) as connection, connection.cursor() as cursor:
        def call(sql: str, parameters: list | None) -> int:
            cursor.execute(sql, parameters)
            return len(cursor.fetchall())
        yield call


@contextmanager
def http_door(urls: dict[str, str]) -> Iterator[Call]:
    with httpx.Client(base_url=urls["http"], timeout=120) as client:
        def call(sql: str, parameters: list | None) -> int:
            response = client.post("/v1/sql", json={"sql": sql, **({"parameters": parameters} if parameters else {})})
            response.raise_for_status()
            return len(response.json())
        yield call


@contextmanager
def mcp_door(urls: dict[str, str]) -> Iterator[Call]:
    """One MCP session over streamable HTTP, its event loop in a thread, called synchronously."""
    import httpx2
    from anyio.from_thread import start_blocking_portal
    from mcp.client import Client
    from mcp.client.streamable_http import streamable_http_client

    with start_blocking_portal() as portal, ExitStack() as stack:
        http = stack.enter_context(portal.wrap_async_context_manager(httpx2.AsyncClient(timeout=120)))
        client = stack.enter_context(portal.wrap_async_context_manager(
            Client(streamable_http_client(f"{urls['http']}/v1/mcp", http_client=http))))

        def call(sql: str, parameters: list | None) -> int:
            result = portal.call(client.call_tool, "sql", {"query": sql, **({"parameters": parameters}
                                                                            if parameters else {})})
            if result.is_error:
                raise RuntimeError(result.content[0].text)
            return len(result.structured_content["rows"])
        yield call


OPENERS: dict[str, Callable[[dict[str, str]], ContextManager[Call]]] = {
    "flight": flight_door, "http": http_door, "mcp": mcp_door}


def run_client(door: str, urls: dict[str, str], query: SmallQuery, seconds: float,
               barrier: threading.Barrier, seed: int) -> dict:
    """One client (in a pool process): connect, warm up, wait for the round's other clients,
    then call for ``seconds``; returns every call's latency."""
    rng = random.Random(seed)
    with OPENERS[door](urls) as call:
        def once() -> None:
            rows = call(query.sql, [rng.randrange(KEYS)] if query.keyed else None)
            if rows != 1:
                raise RuntimeError(f"{door} {query.label}: {rows} rows, expected 1")
        for _ in range(WARMUP_CALLS):
            once()
        barrier.wait(BARRIER_SECONDS)
        latencies = []
        started = time.perf_counter()
        while (before := time.perf_counter()) - started < seconds:
            once()
            latencies.append((time.perf_counter() - before) * 1000)
        return {"latencies_ms": latencies, "seconds": time.perf_counter() - started}


def summarize(outcomes: list[dict]) -> dict:
    latencies = [ms for outcome in outcomes for ms in outcome["latencies_ms"]]
    return {"clients": len(outcomes), "calls": len(latencies),
            "queries_per_second": round(sum(len(o["latencies_ms"]) / o["seconds"] for o in outcomes), 1),
            "p50_ms": round(percentile(latencies, 50), 3), "p99_ms": round(percentile(latencies, 99), 3)}


def measure_small(urls: dict[str, str], client_counts: list[int], seconds: float) -> dict:
    context = multiprocessing.get_context("spawn")
    report: dict = {}
    with context.Manager() as manager, ProcessPoolExecutor(max(client_counts), mp_context=context) as pool:
        for clients in client_counts:
            for query in SMALL_QUERIES:
                row: dict = {}
                for door in DOORS:
                    barrier = manager.Barrier(clients)
                    futures = [pool.submit(run_client, door, urls, query, seconds, barrier, seed)
                               for seed in range(clients)]
                    row[door] = summarize([future.result() for future in futures])
                    progress(f"{query.label}, {clients} client(s), {DOORS[door]}: "
                             f"{row[door]['queries_per_second']:,.0f} q/s, p50 {row[door]['p50_ms']:.2f} ms, "
                             f"p99 {row[door]['p99_ms']:.2f} ms")
                for door in ("http", "mcp"):
                    row[f"{door}_vs_flight"] = {
                        "queries_per_second": round(row[door]["queries_per_second"]
                                                    / row["flight"]["queries_per_second"], 3),
                        "p50": round(row[door]["p50_ms"] / row["flight"]["p50_ms"], 3)}
                progress(f"{query.label}, {clients} client(s): q/s HTTP/Flight "
                         f"{row['http_vs_flight']['queries_per_second']:.2f}, MCP/Flight "
                         f"{row['mcp_vs_flight']['queries_per_second']:.2f}")
                report.setdefault(query.label, {"sql": query.sql, "by_clients": {}})["by_clients"][str(clients)] = row
    return report


# --------------------------------------------------------------------------- bulk

def read_http_arrow(client: httpx.Client, coding: str) -> tuple[int, int, int]:
    """The bulk query as an Arrow IPC stream over HTTP, decompressed by pyarrow when the server
    compressed it: (rows, Arrow bytes, bytes on the wire)."""
    with client.stream("POST", "/v1/sql", content=BULK_QUERY,
                       headers={"Accept": ARROW_STREAM, "Accept-Encoding": coding}) as response:
        response.raise_for_status()
        sent_as = response.headers.get("content-encoding", "identity")
        if sent_as != coding:
            raise RuntimeError(f"asked for {coding}, the server sent {sent_as}")
        body = ChunkFile(response.iter_raw())
        source = io.BufferedReader(body, 1 << 20)
        stream = source if coding == "identity" else pa.CompressedInputStream(pa.PythonFile(source, mode="r"), coding)
        rows = size = 0
        for batch in ipc.open_stream(stream):
            rows += batch.num_rows
            size += batch.nbytes
        return rows, size, body.received


def measure_bulk(urls: dict[str, str], repeats: int) -> dict:
    flight_client = flight.FlightClient(urls["flight"])
    http_client = httpx.Client(base_url=urls["http"], timeout=600)

    def read(series: str) -> tuple[int, int, int]:
        coding = BULK_SERIES[series]
        if coding is None:
            rows, size = read_flightsql(flight_client, BULK_QUERY)
            return rows, size, size
        return read_http_arrow(http_client, coding)

    seconds: dict[str, list[float]] = {series: [] for series in BULK_SERIES}
    sizes = {}
    try:
        for series in BULK_SERIES:  # warm-up: page cache, connections, the allocator's high-water mark
            sizes[series] = read(series)
            progress(f"bulk warm-up {series}: {sizes[series][0]:,} rows, {sizes[series][2] / 2**20:,.0f} MiB on the wire")
        for repeat in range(repeats):
            for series in BULK_SERIES:
                started = time.perf_counter()
                if read(series) != sizes[series]:
                    raise RuntimeError(f"{series}: a different result than in the warm-up")
                seconds[series].append(time.perf_counter() - started)
            progress(f"bulk round {repeat + 1}/{repeats}: " + ", ".join(
                f"{series} {seconds[series][-1]:.2f}s" for series in BULK_SERIES))
    finally:
        flight_client.close()
        http_client.close()
    report = {}
    for series, (rows, size, wire) in sizes.items():
        median = statistics.median(seconds[series])
        report[series] = {"rows": rows, "arrow_bytes": size, "wire_bytes": wire, "median_seconds": round(median, 4),
                          "seconds": [round(s, 4) for s in seconds[series]],
                          "rows_per_second": round(rows / median),
                          "arrow_mib_per_second": round(size / median / 2**20, 1),
                          "wire_mib_per_second": round(wire / median / 2**20, 1)}
    flight_seconds = report["Flight SQL DoGet"]["median_seconds"]
    for series in report:
        report[series]["ratio_vs_flight"] = round(flight_seconds / report[series]["median_seconds"], 3)
    return report


# --------------------------------------------------------------------------- embeddings

def measure_embeddings(urls: dict[str, str], texts: list[str], repeats: int) -> dict:
    from openai import OpenAI

    openai = OpenAI(base_url=f"{urls['http']}/v1", api_key="unused-without-auth", max_retries=0, timeout=600)
    batches = [(start, min(start + EMBED_BATCH, len(texts))) for start in range(0, len(texts), EMBED_BATCH)]
    per_batch = "SELECT embed(text) AS v FROM sentences WHERE id >= ? AND id < ? ORDER BY id"
    whole = "SELECT embed(text) AS v FROM sentences ORDER BY id"
    with flightsql.connect(urls["flight"], autocommit=True) as connection, connection.cursor() as cursor:
        def flight_vectors(sql: str, parameters: tuple | None = None) -> np.ndarray:
            cursor.execute(sql, parameters)
            column = cursor.fetch_arrow_table().column("v").combine_chunks()
            return column.values.to_numpy().reshape(len(column), column.type.list_size)

        def over_http() -> np.ndarray:
            return np.vstack([np.array([item.embedding for item in openai.embeddings.create(
                model=MODEL, input=texts[start:end]).data], dtype=np.float32) for start, end in batches])

        series: dict[str, Callable[[], np.ndarray]] = {
            f"openai client, POST /v1/embeddings (batches of {EMBED_BATCH})": over_http,
            f"embed() over Flight SQL (batches of {EMBED_BATCH})":
                lambda: np.vstack([flight_vectors(per_batch, (start, end)) for start, end in batches]),
            "embed() over Flight SQL (one query)": lambda: flight_vectors(whole),
        }
        vectors = {name: run() for name, run in series.items()}  # warm-up, and the model's first load
        reference = vectors["embed() over Flight SQL (one query)"]
        agreement = {name: float((v * reference).sum(axis=1).min()) for name, v in vectors.items()}
        progress(f"embeddings: {len(texts)} sentences; min cosine to embed() in one query: "
                 + ", ".join(f"{name} {value:.6f}" for name, value in agreement.items()))
        seconds: dict[str, list[float]] = {name: [] for name in series}
        for repeat in range(repeats):
            for name, run in series.items():
                started = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - started)
            progress(f"embeddings round {repeat + 1}/{repeats}: " + ", ".join(
                f"{name} {len(texts) / seconds[name][-1]:,.0f}/s" for name in series))
    report = {name: {"sentences": len(texts), "seconds": [round(s, 3) for s in seconds[name]],
                     "sentences_per_second": round(len(texts) / statistics.median(seconds[name]), 1),
                     "min_cosine_vs_one_query": round(agreement[name], 6)} for name in series}
    http_rate = report[next(iter(series))]["sentences_per_second"]
    for name in report:
        report[name]["http_vs_this"] = round(http_rate / report[name]["sentences_per_second"], 3)
    return report


# --------------------------------------------------------------------------- report

def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ((rate, latency), (bulk, embeddings)) = plt.subplots(2, 2, figsize=(14, 9.5))
    colors = {"flight": "#2b6cb0", "http": "#dd6b20", "mcp": "#38a169"}
    small = report["small_queries"]
    groups = [(label, clients) for label, row in small.items() for clients in row["by_clients"]]
    x = np.arange(len(groups))
    width = 0.8 / len(DOORS)
    for offset, door in enumerate(DOORS):
        cells = [small[label]["by_clients"][clients] for label, clients in groups]
        qps = [cell[door]["queries_per_second"] for cell in cells]
        bars = rate.bar(x + offset * width, qps, width, label=DOORS[door], color=colors[door])
        rate.bar_label(bars, labels=[f"{v:,.0f}" + ("" if door == "flight" else
                                                     f"\n{cell[f'{door}_vs_flight']['queries_per_second']:.2f}x")
                                     for v, cell in zip(qps, cells)], padding=2, fontsize=7)
        latency.bar(x + offset * width, [cell[door]["p50_ms"] for cell in cells], width,
                    label=f"{DOORS[door]} p50", color=colors[door])
        latency.scatter(x + offset * width, [cell[door]["p99_ms"] for cell in cells], marker="_", s=300,
                        color="black", zorder=3, label="p99" if offset == 0 else None)
    ticks = [f"{label}\n{clients} client{'s' if clients != '1' else ''}" for label, clients in groups]
    for axis in (rate, latency):
        axis.set_xticks(x + width * (len(DOORS) - 1) / 2, ticks, fontsize=8)
    rate.set_ylabel("queries per second, all clients")
    rate.set_title("Small queries: throughput (under each bar: ratio to Flight SQL)")
    rate.margins(y=0.25)
    rate.legend(fontsize=8, loc="upper left")
    latency.set_yscale("log")
    latency.set_ylabel("milliseconds per call (log)")
    latency.set_title("Small queries: latency, p50 bars and p99 marks")
    latency.legend(fontsize=8, loc="upper left")

    names = list(report["bulk"])
    values = [report["bulk"][n]["arrow_mib_per_second"] for n in names]
    bars = bulk.barh(names, values, color=["#2b6cb0", "#dd6b20", "#f6ad55", "#fbd38d"])
    bulk.bar_label(bars, labels=[f"{v:,.0f} MiB/s, {report['bulk'][n]['rows_per_second'] / 1e6:.1f} M rows/s "
                                 f"({report['bulk'][n]['ratio_vs_flight']:.2f}x)" for n, v in zip(names, values)],
                   padding=3, fontsize=8)
    bulk.invert_yaxis()
    bulk.set_xlim(0, max(values) * 1.9)
    bulk.set_xlabel("result MiB/s as Arrow (median); ratio to Flight SQL DoGet")
    bulk.set_title(f"Bulk: {report['bulk']['Flight SQL DoGet']['rows']:,} rows x 3 columns")

    names = list(report["embeddings"])
    values = [report["embeddings"][n]["sentences_per_second"] for n in names]
    bars = embeddings.barh([textwrap.fill(n, 26) for n in names], values, color=["#dd6b20", "#2b6cb0", "#90cdf4"])
    embeddings.bar_label(bars, labels=[f"{v:,.0f}/s" + ("" if i == 0 else
                                                        f" (HTTP {report['embeddings'][n]['http_vs_this']:.2f}x)")
                                       for i, (n, v) in enumerate(zip(names, values))], padding=3, fontsize=8)
    embeddings.invert_yaxis()
    embeddings.set_xlim(0, max(values) * 1.5)
    embeddings.set_xlabel("sentences per second (median)")
    embeddings.set_title(f"Embeddings: all-MiniLM-L6-v2, {report['embeddings'][names[0]]['sentences']} short sentences")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each small-query round runs")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16], help="concurrent client counts")
    parser.add_argument("--rows", type=int, default=10_000_000, help="rows of the bulk result")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each bulk and embedding series")
    parser.add_argument("--sentences", type=int, default=1024)
    args = parser.parse_args()

    import openai

    config, texts = write_data(args.rows, args.sentences)
    load_before = os.getloadavg()[0]
    if note := busy_note():
        progress(note)
    server = flightdeck_server(config)
    urls = {"flight": server.url, "http": server.http_url}
    progress(f"flightdeck serving {config}: Flight SQL {server.url}, HTTP {server.http_url}")
    try:
        report = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyarrow": pa.__version__,
                        "httpx": httpx.__version__, "openai": openai.__version__},
            "settings": {"seconds": args.seconds, "clients": args.clients, "rows": args.rows,
                         "repeats": args.repeats, "sentences": args.sentences, "embedding_batch": EMBED_BATCH},
            "small_queries": measure_small(urls, args.clients, args.seconds),
            "bulk": measure_bulk(urls, args.repeats),
            "embeddings": measure_embeddings(urls, texts, args.repeats),
        }
    finally:
        server.stop()
    report["machine"]["load_average_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "doors.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(report, RESULTS / "doors.png")
    summary = {
        "small_queries_per_second": {f"{label}, {clients} clients": {door: cell[door]["queries_per_second"]
                                                                    for door in DOORS}
                                     for label, row in report["small_queries"].items()
                                     for clients, cell in row["by_clients"].items()},
        "bulk_ratio_vs_flight": {n: v["ratio_vs_flight"] for n, v in report["bulk"].items()},
        "embeddings_sentences_per_second": {n: v["sentences_per_second"] for n, v in report["embeddings"].items()},
    }
    print(json.dumps(summary, indent=2))
    progress(f"wrote {RESULTS / 'doors.json'} and {RESULTS / 'doors.png'}")


if __name__ == "__main__":
    main()
