"""The bundled demo: an SRE incident, as deterministic generated files.

On 2026-11-20 at 13:55 UTC the checkout service is scaled from one to three
replicas. PgBouncer runs in session mode, so the orders database runs out of
connections and orders fail from 14:02 until the pooler is switched to
transaction mode at 14:40. The data lets an agent walk the whole incident:
alert (metrics), diagnosis (logs, orders), the fix (guides) and the post-mortem
(customers whose orders failed).
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
import sqlite3
from importlib import resources
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from flightdeck import __version__

log = logging.getLogger("flightdeck.demo")

DAY = dt.datetime(2026, 11, 20, tzinfo=dt.timezone.utc)
SCALE_OUT = DAY + dt.timedelta(hours=13, minutes=55)
INCIDENT_START = DAY + dt.timedelta(hours=14, minutes=2)
INCIDENT_END = DAY + dt.timedelta(hours=14, minutes=40)
CUSTOMERS = 2_000
ORDERS = 30_000
SEED = 20261120

CONFIG = """\
# The bundled flightdeck demo: the SRE incident of 2026-11-20.
version: v1
kind: Flightdeck
name: sre-incident-demo
datasets:
  - from: duckdb:orders
    name: orders
    description: Orders placed on 2026-11-20 (the orders database)
    params:
      duckdb_open: data/orders.duckdb
  - from: sqlite:customers
    name: crm.customers
    description: Customers from the CRM
    params:
      sqlite_file: data/crm.sqlite
  - from: file:data/logs/
    name: logs
    description: Service logs, partitioned by service
  - from: file:data/metrics.csv
    name: metrics
    description: Per-minute service metrics
  - from: file:data/guides/
    name: guides
    description: Troubleshooting guides (Markdown), searchable
    acceleration:
      engine: duckdb
    columns:
      - name: content
        embeddings:
          - from: minilm
            chunking: {enabled: true, target_chunk_size: 800, overlap_size: 100}
        full_text_search: {enabled: true}
"""


def default_demo_dir() -> Path:
    return Path.home() / ".cache" / "flightdeck" / f"demo-{__version__}"


def ensure_demo(target: Path | None = None) -> Path:
    """Write the demo into ``target`` unless it is already there; returns its config path."""
    target = Path(target) if target else default_demo_dir()
    config_path = target / "flightdeck.yaml"
    marker = target / ".complete"
    stamp = f"{__version__} {hashlib.sha256(CONFIG.encode()).hexdigest()[:12]}"
    if marker.exists() and marker.read_text() == stamp:
        return config_path
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    (building / "data").mkdir(parents=True)
    log.info("generating the demo data in %s", target)
    write_demo(building / "data")
    (building / "flightdeck.yaml").write_text(CONFIG)
    (building / ".complete").write_text(stamp)
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)  # readers never see a half-written demo
    return config_path


def write_demo(data_dir: Path) -> None:
    rng = np.random.default_rng(SEED)
    customers = make_customers(rng)
    orders = make_orders(rng)
    write_customers(customers, data_dir / "crm.sqlite")
    write_orders(orders, data_dir / "orders.duckdb")
    write_logs(make_logs(rng, orders), data_dir / "logs")
    pacsv.write_csv(make_metrics(rng), data_dir / "metrics.csv")
    copy_guides(data_dir / "guides")


# ---- customers (SQLite CRM) ----

FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Radia", "Tim",
         "Margaret", "Dennis", "Leslie", "John", "Katherine", "Linus", "Sophie", "Guido"]
LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
        "Perlman", "Berners-Lee", "Hamilton", "Ritchie", "Lamport", "Backus", "Johnson", "Wilson"]
COUNTRIES = ["DE", "FR", "US", "GB", "NL", "ES", "IT", "SE", "PL", "CA"]


def make_customers(rng: np.random.Generator) -> pa.Table:
    ids = np.arange(1, CUSTOMERS + 1)
    first = rng.choice(FIRST, CUSTOMERS)
    last = rng.choice(LAST, CUSTOMERS)
    signup = [dt.date(2020, 1, 1) + dt.timedelta(days=int(d)) for d in rng.integers(0, 2000, CUSTOMERS)]
    return pa.table({
        "customer_id": ids,
        "name": [f"{f} {l}" for f, l in zip(first, last)],
        "email": [f"{f.lower()}.{l.lower()}{i}@example.com" for i, f, l in zip(ids, first, last)],
        "tier": rng.choice(["free", "pro", "enterprise"], CUSTOMERS, p=[0.6, 0.3, 0.1]),
        "country": rng.choice(COUNTRIES, CUSTOMERS),
        "signup_date": signup,
    })


def write_customers(customers: pa.Table, path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute(
            "CREATE TABLE customers (customer_id INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "email TEXT NOT NULL, tier TEXT NOT NULL, country TEXT, signup_date DATE)")
        rows = zip(*(customers.column(c).to_pylist() for c in customers.column_names))
        connection.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?)",
                               [(*r[:5], r[5].isoformat()) for r in rows])


# ---- orders (DuckDB) ----

def make_orders(rng: np.random.Generator) -> pa.Table:
    seconds = np.sort(rng.integers(0, 86_400, ORDERS))
    created = [DAY + dt.timedelta(seconds=int(s)) for s in seconds]
    in_incident = np.array([INCIDENT_START <= c < INCIDENT_END for c in created])
    after_scale = np.array([c >= SCALE_OUT for c in created])
    replicas = np.where(after_scale, rng.integers(1, 4, ORDERS), 1)
    # During the incident, the new replicas (2 and 3) cannot get a database connection.
    failed = in_incident & (replicas > 1) & (rng.random(ORDERS) < 0.97)
    other_failure = ~failed & (rng.random(ORDERS) < 0.004)
    status = np.where(failed | other_failure, "failed",
                      np.where(rng.random(ORDERS) < 0.02, "pending", "completed"))
    latency = rng.gamma(2.0, 60.0, ORDERS).astype(np.int32) + 40
    latency = np.where(failed, 30_000 + rng.integers(0, 500, ORDERS), latency)
    error_code = [("DB_CONN_EXHAUSTED" if f else ("CARD_DECLINED" if o else None))
                  for f, o in zip(failed, other_failure)]
    return pa.table({
        "order_id": np.arange(100_001, 100_001 + ORDERS, dtype=np.int64),
        "customer_id": rng.integers(1, CUSTOMERS + 1, ORDERS).astype(np.int32),
        "created_at": pa.array(created, type=pa.timestamp("us", tz="UTC")),
        "status": status,
        "amount": pa.array([round(float(a), 2) for a in rng.gamma(2.0, 40.0, ORDERS) + 5],
                           type=pa.float64()).cast(pa.decimal128(10, 2)),
        "latency_ms": latency,
        "region": rng.choice(["eu-west", "eu-central", "us-east"], ORDERS),
        "replica": pa.array([f"checkout-api-{r}" for r in replicas]),
        "error_code": pa.array(error_code, type=pa.string()),
    })


def write_orders(orders: pa.Table, path: Path) -> None:
    connection = duckdb.connect(str(path))
    try:
        connection.execute(
            "CREATE TABLE orders (order_id BIGINT PRIMARY KEY, customer_id INTEGER NOT NULL, "
            "created_at TIMESTAMPTZ NOT NULL, status VARCHAR NOT NULL, amount DECIMAL(10,2), "
            "latency_ms INTEGER, region VARCHAR, replica VARCHAR, error_code VARCHAR)")
        connection.register("generated_orders", orders)
        connection.execute("INSERT INTO orders SELECT * FROM generated_orders")
    finally:
        connection.close()


# ---- logs (Parquet, one folder per service) ----

def make_logs(rng: np.random.Generator, orders: pa.Table) -> pa.Table:
    created = orders.column("created_at").to_pylist()
    statuses = orders.column("status").to_pylist()
    replicas = orders.column("replica").to_pylist()
    codes = orders.column("error_code").to_pylist()
    ids = orders.column("order_id").to_pylist()
    rows: dict[str, list] = {k: [] for k in ("ts", "service", "level", "replica", "message", "order_id")}

    def add(ts, service, level, replica, message, order_id=None):
        for key, value in zip(rows, (ts, service, level, replica, message, order_id)):
            rows[key].append(value)

    add(SCALE_OUT, "deployer", "INFO", None, "scaled checkout-api from 1 to 3 replicas")
    add(INCIDENT_END - dt.timedelta(minutes=1), "pgbouncer", "INFO", None,
        "RELOAD: pool_mode changed from session to transaction")
    for ts, status, replica, code, order_id in zip(created, statuses, replicas, codes, ids):
        add(ts, "checkout-api", "INFO", replica, f"order {order_id} received", order_id)
        if code == "DB_CONN_EXHAUSTED":
            add(ts + dt.timedelta(milliseconds=30_000), "checkout-api", "ERROR", replica,
                "could not acquire database connection: FATAL: sorry, too many clients already",
                order_id)
            add(ts + dt.timedelta(milliseconds=29_900), "pgbouncer", "WARNING", None,
                "pool orders/checkout: no more server connections (session mode, 50/50 in use)")
        elif code == "CARD_DECLINED":
            add(ts + dt.timedelta(milliseconds=800), "payments", "WARNING", None,
                f"card declined for order {order_id}", order_id)
        elif status == "completed":
            add(ts + dt.timedelta(milliseconds=int(rng.integers(50, 400))), "payments", "INFO",
                None, f"payment captured for order {order_id}", order_id)
    return pa.table({
        "ts": pa.array(rows["ts"], type=pa.timestamp("us", tz="UTC")),
        "service": rows["service"], "level": rows["level"],
        "replica": pa.array(rows["replica"], type=pa.string()),
        "message": rows["message"],
        "order_id": pa.array(rows["order_id"], type=pa.int64()),
    })


def write_logs(logs: pa.Table, folder: Path) -> None:
    for service in sorted(set(logs.column("service").to_pylist())):
        part = logs.filter(pa.compute.equal(logs.column("service"), service)).drop_columns(["service"])
        target = folder / f"service={service}"
        target.mkdir(parents=True, exist_ok=True)
        pq.write_table(part.sort_by("ts"), target / "part-0.parquet")


# ---- metrics (CSV, per minute) ----

def make_metrics(rng: np.random.Generator) -> pa.Table:
    ts, service, metric, value = [], [], [], []
    for minute in range(24 * 60):
        now = DAY + dt.timedelta(minutes=minute)
        scaled = now >= SCALE_OUT
        incident = INCIDENT_START <= now < INCIDENT_END
        fixed = now >= INCIDENT_END
        replicas = 3 if scaled else 1
        samples = [
            ("checkout-api", "replicas", replicas),
            ("checkout-api", "error_rate", round(0.6 + rng.random() * 0.1, 3) if incident
             else round(rng.random() * 0.005, 4)),
            ("checkout-api", "p99_latency_ms", 30_000 if incident else int(rng.integers(180, 420))),
            ("pgbouncer", "server_connections", 50 if incident else (12 if fixed else 20 * replicas // 3 + 8)),
            ("pgbouncer", "client_connections", 20 * replicas),
            ("orders-db", "active_connections", 50 if incident else int(rng.integers(8, 20))),
            ("orders-db", "max_connections", 50),
        ]
        for s, m, v in samples:
            ts.append(now.strftime("%Y-%m-%dT%H:%M:%SZ"))
            service.append(s)
            metric.append(m)
            value.append(float(v))
    return pa.table({"ts": ts, "service": service, "metric": metric, "value": value})


def copy_guides(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for guide in resources.files("flightdeck.demo").joinpath("guides").iterdir():
        if guide.name.endswith(".md"):
            (folder / guide.name).write_text(guide.read_text())
