"""Where the simulated systems write: the orders database (PostgreSQL, or SQLite when no server
is reachable), log and metric files, and the guides' git repository.

Each simulated minute is written whole (one transaction, one file renamed into place), so a
reader never sees half a minute, and an append refresh that copies "everything after the newest
time I hold" never skips a row.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import sqlite3
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = "incident"
ORDERS_SCHEMA = pa.schema([
    ("order_id", pa.int64()), ("customer_id", pa.int32()), ("created_at", pa.timestamp("us", tz="UTC")),
    ("status", pa.string()), ("amount", pa.float64()), ("latency_ms", pa.int32()), ("replica", pa.string()),
    ("error_code", pa.string()),
])
CUSTOMERS_SCHEMA = pa.schema([
    ("customer_id", pa.int32()), ("name", pa.string()), ("email", pa.string()), ("tier", pa.string()),
    ("country", pa.string()),
])
LOGS_SCHEMA = pa.schema([
    ("ts", pa.timestamp("us", tz="UTC")), ("service", pa.string()), ("level", pa.string()),
    ("replica", pa.string()), ("message", pa.string()), ("order_id", pa.int64()), ("line_id", pa.int64()),
])
METRICS_SCHEMA = pa.schema([
    ("ts", pa.timestamp("us", tz="UTC")), ("service", pa.string()), ("metric", pa.string()),
    ("value", pa.float64()),
])
ORDERS_DDL = ("order_id BIGINT PRIMARY KEY, customer_id INTEGER NOT NULL, created_at {ts} NOT NULL, "
              "status TEXT NOT NULL, amount DOUBLE PRECISION, latency_ms INTEGER, replica TEXT, error_code TEXT")
CUSTOMERS_DDL = "customer_id INTEGER PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, tier TEXT, country TEXT"


class OrdersDatabase(Protocol):
    def create(self, customers: list[dict]) -> None: ...
    def insert_orders(self, orders: list[dict]) -> None: ...
    def datasets(self) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


class PostgresOrders:
    """The orders database on PostgreSQL: schema ``incident``, written by its administrator; the
    datasets read it as a read-only session."""

    def __init__(self, uri: str, host: str, port: int, database: str, user: str):
        import adbc_driver_postgresql.dbapi as adbc_postgres
        self.connection = adbc_postgres.connect(uri, autocommit=True)
        self.params = {"pg_host": host, "pg_port": port, "pg_db": database, "pg_user": user}

    def create(self, customers: list[dict]) -> None:
        with self.connection.cursor() as cursor:
            cursor.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
            cursor.execute(f"CREATE SCHEMA {SCHEMA}")
            cursor.execute(f"CREATE TABLE {SCHEMA}.customers ({CUSTOMERS_DDL})")
            cursor.execute(f"CREATE TABLE {SCHEMA}.orders ({ORDERS_DDL.format(ts='TIMESTAMPTZ')})")
            cursor.execute(f"CREATE INDEX ON {SCHEMA}.orders (created_at)")
            cursor.adbc_ingest("customers", pa.Table.from_pylist(customers, CUSTOMERS_SCHEMA), mode="append",
                               db_schema_name=SCHEMA)

    def insert_orders(self, orders: list[dict]) -> None:
        if orders:
            with self.connection.cursor() as cursor:  # one COPY: the minute lands whole
                cursor.adbc_ingest("orders", pa.Table.from_pylist(orders, ORDERS_SCHEMA), mode="append",
                                   db_schema_name=SCHEMA)

    def datasets(self) -> list[dict[str, Any]]:
        return [{"from": f"postgres:{SCHEMA}.orders", "params": self.params},
                {"from": f"postgres:{SCHEMA}.customers", "params": self.params}]

    def close(self) -> None:
        self.connection.close()


class SqliteOrders:
    """The embedded stand-in: one SQLite file in WAL mode, so flightdeck reads while it is written."""

    def __init__(self, path: Path):
        self.path = path
        self.connection = sqlite3.connect(path, check_same_thread=False)
        self.connection.execute("PRAGMA journal_mode=WAL")

    def create(self, customers: list[dict]) -> None:
        with self.connection:
            self.connection.execute(f"CREATE TABLE customers ({CUSTOMERS_DDL})")
            self.connection.execute(f"CREATE TABLE orders ({ORDERS_DDL.format(ts='TIMESTAMP')})")
            self.connection.executemany("INSERT INTO customers VALUES (:customer_id, :name, :email, :tier, :country)",
                                        customers)

    def insert_orders(self, orders: list[dict]) -> None:
        rows = [{**o, "created_at": o["created_at"].strftime("%Y-%m-%d %H:%M:%S.%f")} for o in orders]
        with self.connection:
            self.connection.executemany(
                "INSERT INTO orders VALUES (:order_id, :customer_id, :created_at, :status, :amount, :latency_ms, "
                ":replica, :error_code)", rows)

    def datasets(self) -> list[dict[str, Any]]:
        params = {"sqlite_file": str(self.path)}
        return [{"from": "sqlite:orders", "params": params}, {"from": "sqlite:customers", "params": params}]

    def close(self) -> None:
        self.connection.close()


def write_part(rows: list[dict], schema: pa.Schema, folder: Path, minute: int) -> None:
    """One minute's rows as ``folder/minute-NNNNN.parquet``, renamed into place when complete."""
    if not rows:
        return
    folder.mkdir(parents=True, exist_ok=True)
    hidden = folder / f".minute-{minute:05d}.parquet"  # the file connector skips dot files
    pq.write_table(pa.Table.from_pylist(rows, schema), hidden)
    os.replace(hidden, folder / f"minute-{minute:05d}.parquet")


def write_guides_repository(folder: Path) -> None:
    """The troubleshooting guides as a git repository, committed at a fixed date."""
    folder.mkdir(parents=True, exist_ok=True)
    for package in ("flightdeck.demo", "flightdeck.demo.incident"):
        for guide in resources.files(package).joinpath("guides").iterdir():
            if guide.name.endswith(".md"):
                (folder / guide.name).write_text(guide.read_text())
    when = "2026-11-01T09:00:00+00:00"
    env = {**os.environ, "GIT_AUTHOR_NAME": "SRE team", "GIT_AUTHOR_EMAIL": "sre@example.com",
           "GIT_COMMITTER_NAME": "SRE team", "GIT_COMMITTER_EMAIL": "sre@example.com",
           "GIT_AUTHOR_DATE": when, "GIT_COMMITTER_DATE": when}
    for command in (["init", "-q", "-b", "main"], ["add", "."], ["commit", "-q", "-m", "Troubleshooting guides"]):
        subprocess.run(["git", "-C", str(folder), *command], check=True, env=env, capture_output=True)


def write_oncall(path: Path) -> None:
    """A dataset the SRE agent is not granted: the on-call roster with phone numbers."""
    path.write_text("name,phone,team\nAda Lovelace,+44 20 7946 0001,checkout\n"
                    "Grace Hopper,+1 202 555 0102,database\n")


def reset(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
