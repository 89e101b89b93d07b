"""Fleet simulation: N agent sidecars, each with its own accelerated copy of one PostgreSQL table,
refreshing either from PostgreSQL directly or from one hub flightdeck over Flight SQL.

    python -m bench.fleet [--sizes 1,4,16,64] [--seconds 40] [--interval 1] [--workers 4]

Everything runs on loopback. PostgreSQL gets its own database (fd_fleet, dropped at the end) with
one table; an inserter adds one row a second. Each sidecar is a whole flightdeck Stack (catalog,
engine, accelerator; no doors, it serves one in-process agent) with an append-refreshed copy in
memory (Arrow engine); sidecars are spread over ``--workers`` processes so 64 of them fit on a
small machine. Each sidecar's agent loops a query against its own copy. The hub is a real
flightdeck process (DuckDB copy, append refresh from PostgreSQL) that the sidecars read with
the flightsql: source.

Measured per topology and N:
- backend statements per minute at PostgreSQL, counted by flightdeck itself: the ``queries``
  counter of the postgres source in ``runtime.source_stats`` of every process that talks to
  PostgreSQL (each sidecar when direct, the hub otherwise), over the measured window. The
  database's ``pg_stat_database.xact_commit`` delta for fd_fleet is reported beside it as a
  cross-check (it also counts the inserter's commits, which are subtracted; PostgreSQL flushes
  these counters lazily, so it is read after a pause).
- freshness lag: from the commit of an inserted row at PostgreSQL to the moment each sidecar's
  refresh makes it visible in its copy (a refresh listener reads the copy's newest id when a
  refresh lands), p50/p95/max over all rows and sidecars.

Writes bench/results/fleet.json and fleet.png.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import adbc_driver_postgresql.dbapi as adbc_postgres

from bench.common import RESULTS, busy_note, flightdeck_server, percentile, progress, wait_until_accelerated

ADMIN = "postgresql://postgres@127.0.0.1:5432/{db}"
DATABASE = "fd_fleet"
PG_PARAMS = {"pg_host": "127.0.0.1", "pg_db": DATABASE, "pg_user": "postgres"}
INITIAL_ROWS = 1000
AGENT_QUERY = "SELECT region, count(*) AS n, sum(amount) AS total FROM events WHERE id > 900 GROUP BY region"


def _admin(sql: str, db: str = DATABASE) -> list[tuple]:
    with adbc_postgres.connect(ADMIN.format(db=db), autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall() if cursor.description else []


def create_database() -> None:
    _admin(f"DROP DATABASE IF EXISTS {DATABASE}", db="test")
    _admin(f"CREATE DATABASE {DATABASE}", db="test")
    _admin("CREATE TABLE events (id bigint PRIMARY KEY, at timestamptz NOT NULL, region text, amount int)")
    _admin(f"INSERT INTO events SELECT g, now() - interval '1 hour', CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 1 "
           f"FROM generate_series(1, {INITIAL_ROWS}) g")


def drop_database() -> None:
    _admin(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)", db="test")


def commits() -> int:
    return int(_admin(f"SELECT xact_commit FROM pg_stat_database WHERE datname = '{DATABASE}'", db="test")[0][0])


def acceleration(interval: float, engine: str) -> dict:
    return {"engine": engine, "mode": "memory", "refresh_mode": "append", "primary_key": "id",
            "refresh_check_interval": f"{interval}s"}


def sidecar_config(upstream: str | None, interval: float, data_dir: str) -> dict:
    """Direct (``upstream`` None): the copy reads PostgreSQL. Else it reads the hub at ``upstream``."""
    source = ({"from": "postgres:public.events", "params": PG_PARAMS} if upstream is None else
              {"from": "flightsql:public.events", "params": {"flightsql_endpoint": upstream}})
    return {"runtime": {"data_dir": data_dir},
            "datasets": [{**source, "name": "events", "time_column": "at",
                          "acceleration": acceleration(interval, "arrow")}]}


def hub_config(interval: float) -> dict:
    return {"datasets": [{"from": "postgres:public.events", "name": "events", "params": PG_PARAMS,
                          "time_column": "at", "acceleration": acceleration(interval, "duckdb")}]}


# ---- a worker process hosting some sidecars ------------------------------------------------

def _postgres_queries(stack) -> int:
    return sum(row["queries"] for row in stack.catalog.source_stats() if row["kind"] == "postgres")


def sidecars_worker(count: int, upstream: str | None, interval: float, agent_every: float,
                    commands: multiprocessing.Queue, replies: multiprocessing.Queue) -> None:
    """Runs ``count`` sidecars; answers "ready", then "snapshot" (statement counters) and
    "stop" (counters, first-seen times per row id, agent queries run); "error" if it fails."""
    try:
        _host_sidecars(count, upstream, interval, agent_every, commands, replies)
    except Exception as error:  # the parent must hear of it, not wait for a reply that never comes
        replies.put(("error", f"{type(error).__name__}: {error}"))


def _host_sidecars(count: int, upstream: str | None, interval: float, agent_every: float,
                   commands: multiprocessing.Queue, replies: multiprocessing.Queue) -> None:
    from flightdeck.config import parse_config
    from flightdeck.stack import Stack

    stacks, seen, agent_queries = [], [], [0]
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="fd-fleet-") as scratch:
        for number in range(count):
            config = sidecar_config(upstream, interval, str(Path(scratch) / str(number)))
            stack = Stack(parse_config(config, Path(scratch), {}))
            first_seen: dict[int, float] = {}
            refresher = stack.accelerator.refresher("public.events")
            refresher.listeners.append(lambda r, first_seen=first_seen: _note_newest(r, first_seen))
            stacks.append(stack)
            seen.append(first_seen)
        for stack in stacks:
            refresher = stack.accelerator.refresher("public.events")
            if not refresher.loaded.wait(120):
                raise RuntimeError(f"a sidecar's copy did not load: {refresher.status.last_error}")
        replies.put(("ready", None))
        stop = threading.Event()

        def agent(stack) -> None:
            while not stop.wait(agent_every):
                stack.engine.query(AGENT_QUERY).read_all()
                with lock:
                    agent_queries[0] += 1

        agents = [threading.Thread(target=agent, args=(s,), daemon=True) for s in stacks]
        for thread in agents:
            thread.start()
        agents_started = time.monotonic()
        while True:
            command = commands.get()
            if command == "snapshot":
                replies.put(("snapshot", sum(_postgres_queries(s) for s in stacks)))
            elif command == "stop":
                stop.set()
                for thread in agents:
                    thread.join()
                replies.put(("stopped", {"postgres_queries": sum(_postgres_queries(s) for s in stacks),
                                         "seen": [dict(s) for s in seen], "agent_queries": agent_queries[0],
                                         "agent_seconds": time.monotonic() - agents_started}))
                break
        for stack in stacks:
            stack.close()


def _note_newest(refresher, first_seen: dict[int, float]) -> None:
    """Called when a refresh lands: every id up to the copy's newest is visible from now on."""
    newest = refresher.store.max_value("id")
    if newest is None:
        return
    now = time.time()
    start = max(first_seen) + 1 if first_seen else INITIAL_ROWS + 1
    for row_id in range(start, int(newest) + 1):
        first_seen[row_id] = now


def _reply(replies: multiprocessing.Queue, expected: str, timeout: float):
    kind, value = replies.get(timeout=timeout)
    if kind != expected:
        raise RuntimeError(f"a sidecar process failed: {value}")
    return value


def insert_rows(seconds: float, started: float) -> dict[int, float]:
    """About one row a second at PostgreSQL, on one connection (one commit each); id -> commit
    time. The gaps are random (0.5-1.5 s): at a fixed 1 s they would keep one phase against the
    1 s refreshes, and every lag would be the same offset."""
    inserted: dict[int, float] = {}
    next_id = INITIAL_ROWS + 1
    rng = random.Random(7)
    with adbc_postgres.connect(ADMIN.format(db=DATABASE), autocommit=True) as conn, conn.cursor() as cursor:
        while time.monotonic() - started < seconds:
            cursor.execute(f"INSERT INTO events VALUES ({next_id}, now(), 'eu', 2)")
            inserted[next_id] = time.time()
            next_id += 1
            time.sleep(rng.uniform(0.5, 1.5))
    return inserted


# ---- one run: a topology at one fleet size ------------------------------------------------

def _hub_postgres_queries(url: str) -> int:
    import adbc_driver_flightsql.dbapi as flightsql
    with flightsql.connect(url, autocommit=True) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT sum(queries) FROM flightdeck.runtime.source_stats WHERE kind = 'postgres'")
        return int(cursor.fetchone()[0] or 0)


def run(topology: str, size: int, args) -> dict:
    create_database()
    hub = None
    scratch = tempfile.mkdtemp(prefix="fd-fleet-hub-")
    context = multiprocessing.get_context("spawn")
    workers, results = [], []
    try:
        if topology == "hub":
            hub_file = Path(scratch) / "hub.yaml"
            hub_file.write_text(json.dumps(hub_config(args.interval)))  # JSON is YAML
            hub = flightdeck_server(hub_file)
            wait_until_accelerated(hub.url)
        upstream = hub.url if hub else None
        shares = [size // args.workers + (1 if i < size % args.workers else 0) for i in range(min(size, args.workers))]
        for share in shares:
            commands, replies = context.Queue(), context.Queue()
            process = context.Process(target=sidecars_worker, daemon=True,
                                      args=(share, upstream, args.interval, args.agent_every, commands, replies))
            process.start()
            workers.append((process, commands, replies))
        for _, _, replies in workers:
            _reply(replies, "ready", 600)
        progress(f"{topology}, {size} sidecars: all copies loaded; measuring {args.seconds:.0f} s")

        def counted() -> int:
            total = 0
            for _, commands, replies in workers:
                commands.put("snapshot")
                total += _reply(replies, "snapshot", 60)
            return total + (_hub_postgres_queries(hub.url) if hub else 0)

        time.sleep(2 * args.interval)  # past the first refreshes
        commits_before, queries_before, started = commits(), counted(), time.monotonic()
        inserted = insert_rows(args.seconds, started)
        queries_after, window = counted(), time.monotonic() - started
        time.sleep(3 * args.interval + 2)  # let every sidecar see the last rows
        for _, commands, replies in workers:
            commands.put("stop")
            results.append(_reply(replies, "stopped", 120))
        time.sleep(args.settle)  # PostgreSQL flushes idle sessions' counters lazily
        commits_after = commits()
    finally:
        for process, _, _ in workers:  # stopped by now, unless the run failed or was interrupted
            process.join(timeout=60 if len(results) == len(workers) else 0)
            if process.is_alive():
                process.kill()
        if hub is not None:
            hub.stop()
        shutil.rmtree(scratch, ignore_errors=True)
        drop_database()
    lags = [seen[row_id] - at for result in results for seen in result["seen"]
            for row_id, at in inserted.items() if row_id in seen]
    missing = sum(1 for result in results for seen in result["seen"] for row_id in inserted if row_id not in seen)
    minutes = window / 60
    statements = (queries_after - queries_before) / minutes
    # The reads of pg_stat_database run on test, not fd_fleet; every insert is one commit here
    # (the inserter's connection adds the driver's own few catalog reads).
    commit_rate = (commits_after - commits_before - len(inserted)) / minutes
    row = {"topology": topology, "sidecars": size, "window_seconds": round(window, 1),
           "statements_per_minute": round(statements, 1),
           "xact_commit_per_minute_cross_check": round(commit_rate, 1),
           "agent_queries_per_second": round(sum(r["agent_queries"] / r["agent_seconds"] for r in results), 1),
           "rows_inserted": len(inserted), "sightings_missing": missing,
           "lag_p50_s": round(percentile(lags, 50), 3) if lags else None,
           "lag_p95_s": round(percentile(lags, 95), 3) if lags else None,
           "lag_max_s": round(max(lags), 3) if lags else None}
    progress(f"{topology}, {size} sidecars: {row['statements_per_minute']:.0f} statements/min at PostgreSQL "
             f"(xact_commit cross-check {row['xact_commit_per_minute_cross_check']:.0f}), freshness lag "
             f"p50 {row['lag_p50_s']} s, p95 {row['lag_p95_s']} s")
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for topology, marker, color in (("direct", "o", "tab:blue"), ("hub", "s", "tab:orange")):
        mine = [r for r in rows if r["topology"] == topology]
        sizes = [r["sidecars"] for r in mine]
        label = "each sidecar refreshes from PostgreSQL" if topology == "direct" else "sidecars refresh from one hub"
        left.plot(sizes, [r["statements_per_minute"] for r in mine], marker=marker, color=color, label=label)
        right.plot(sizes, [r["lag_p50_s"] for r in mine], marker=marker, color=color, label=f"{topology} p50")
        right.plot(sizes, [r["lag_p95_s"] for r in mine], marker=marker, color=color, linestyle="--", label=f"{topology} p95")
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xlabel("sidecars (agents)")
    left.set_ylabel("statements per minute at PostgreSQL")
    left.set_title("Load on production")
    left.legend(fontsize=8)
    right.set_xscale("log", base=2)
    right.set_xlabel("sidecars (agents)")
    right.set_ylabel("seconds from INSERT to visible in a sidecar")
    right.set_title("Freshness lag")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,16,64", help="fleet sizes (sidecars)")
    parser.add_argument("--seconds", type=float, default=40.0, help="measured window per run")
    parser.add_argument("--interval", type=float, default=1.0, help="refresh_check_interval of every copy, s")
    parser.add_argument("--agent-every", type=float, default=1.0, help="seconds between one agent's queries")
    parser.add_argument("--workers", type=int, default=4, help="processes the sidecars are spread over")
    parser.add_argument("--settle", type=float, default=11.0, help="wait before reading xact_commit, s")
    args = parser.parse_args()
    note = busy_note()
    if note:
        progress(note)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [run(topology, size, args) for topology in ("direct", "hub") for size in sizes]
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "fleet", "machine": {"cpus": multiprocessing.cpu_count(), "python": platform.python_version()},
              "settings": vars(args), "busy": note, "counted_by": "flightdeck runtime.source_stats (postgres queries) "
              "of every process that reads PostgreSQL; xact_commit of fd_fleet as a cross-check", "runs": rows}
    (RESULTS / "fleet.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / "fleet.png")
    print(f"{'topology':<8} {'sidecars':>8} {'stmts/min':>10} {'xact/min':>9} {'agent q/s':>9} "
          f"{'lag p50':>8} {'lag p95':>8} {'lag max':>8}")
    for r in rows:
        print(f"{r['topology']:<8} {r['sidecars']:>8} {r['statements_per_minute']:>10.0f} "
              f"{r['xact_commit_per_minute_cross_check']:>9.0f} {r['agent_queries_per_second']:>9.1f} "
              f"{r['lag_p50_s']!s:>8} {r['lag_p95_s']!s:>8} {r['lag_max_s']!s:>8}")
    print(f"wrote {RESULTS / 'fleet.json'} and {RESULTS / 'fleet.png'}")


if __name__ == "__main__":
    main()
