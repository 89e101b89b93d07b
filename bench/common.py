"""What the benchmarks share: where data and results go, a server in its own process, the
generated datasets, and reading a Flight SQL result."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flight.flightsql.server import pack

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
RESULTS = ROOT / "results"
WORDS = ("order orders checkout payment payments gateway latency timeout timeouts database connection "
         "connections pool pooler pgbouncer replica replicas scale scaled service services error errors "
         "failed failing retry retries queue consumer lag kafka disk volume log logs memory leak cache "
         "stampede certificate expiry expired TLS DNS node cluster pod deployment rollback incident "
         "postmortem customer customers region traffic spike query slow index missing transaction mode "
         "session server client limit exceeded alert metric dashboard on-call engineer runbook guide "
         "after before during when because while the a an of to in on for with from by at and or but "
         "is was were are be been has have had not no too many high low p99 seconds minutes three two").split()


def progress(message: str) -> None:
    """A progress line on stderr, prefixed with the running benchmark's module."""
    name = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "bench"
    print(f"[bench.{name}] {message}", file=sys.stderr, flush=True)


class Process:
    """A server in its own process; waits for its READY line (READY, then each door's URL)."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT.parent,
                                        text=True, env={**os.environ, **(env or {})})
        line = self.process.stdout.readline()
        if not line.startswith("READY "):
            self.process.kill()
            raise RuntimeError(f"server did not start: {args}")
        urls = line.split()[1:]
        self.url = urls[0]
        self.http_url = next((u for u in urls if u.startswith("http")), None)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def flightdeck_server(config: Path, env: dict | None = None) -> Process:
    return Process([sys.executable, "-m", "flight.cli", "--log-level", "warning", "run",
                    "-c", str(config), "--flight-port", "0", "--http-port", "0"], env)


def wait_until_accelerated(url: str, names: list[str] | None = None,
                           report: Callable[[list[dict]], str] | None = None, every: float = 2.0,
                           done: Callable[[list[dict]], bool] | None = None) -> list[dict]:
    """Poll a server's `runtime.datasets` until the accelerated datasets (or ``names``) are
    ready (or ``done(rows)``); raises on a refresh error; ``report(rows)`` is printed as
    progress while waiting."""
    import adbc_driver_flightsql.dbapi as flightsql

    with flightsql.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        while True:
            cursor.execute("SELECT * FROM flightdeck.runtime.datasets WHERE acceleration IS NOT NULL")
            rows = [r for r in cursor.fetch_arrow_table().to_pylist() if names is None or r["name"] in names]
            errors = [f"{r['name']}: {r['last_error']}" for r in rows if r["last_error"]]
            if errors:
                raise RuntimeError(f"refresh failed: {errors}")
            if rows and (done(rows) if done else all(r["refresh_state"] == "ready" for r in rows)):
                return rows
            if report is not None:
                progress(report(rows))
            time.sleep(every)


def busy_note() -> str | None:
    """A warning when other work loads the machine (figures will be low and noisy), else None."""
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        return (f"note: the machine is busy (load average {load:.1f} on {os.cpu_count()} cores): "
                "figures will be low and noisy")
    return None


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


def make_parquet(rows: int) -> Path:
    """``rows`` rows of (id, value, label) as Parquet under bench/data, written once."""
    path = DATA / f"big_{rows}.parquet"
    if path.exists():
        return path
    DATA.mkdir(parents=True, exist_ok=True)
    progress(f"writing {rows:,} rows to {path}")
    rng = np.random.default_rng(42)
    table = pa.table({
        "id": np.arange(rows, dtype=np.int64),
        "value": rng.random(rows),
        "label": pa.array(np.array(["alpha", "beta", "gamma", "delta"])[rng.integers(0, 4, rows)]),
    })
    pq.write_table(table, path, row_group_size=1_000_000)
    return path


def sentences(count: int, low: int, high: int, seed: int) -> list[str]:
    """``count`` made-up incident sentences of ``low`` to ``high`` words, numbered so none repeats."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    out = []
    for i in range(count):
        text = " ".join(words[rng.integers(0, len(words), int(rng.integers(low, high + 1)))])
        out.append(f"{text[0].upper()}{text[1:]} (#{i}).")
    return out


def read_flightsql(client: flight.FlightClient, query: str) -> tuple[int, int]:
    """A query's result through GetFlightInfo + DoGet: (rows, Arrow bytes)."""
    command = pack(sql_pb.CommandStatementQuery(query=query))
    info = client.get_flight_info(flight.FlightDescriptor.for_command(command))
    return drain(client.do_get(info.endpoints[0].ticket))


def drain(reader: flight.FlightStreamReader) -> tuple[int, int]:
    rows = size = 0
    for chunk in reader:
        rows += chunk.data.num_rows
        size += chunk.data.nbytes
    return rows, size
