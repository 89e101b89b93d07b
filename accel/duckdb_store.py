"""Copies in DuckDB: one in-process database for every DuckDB-accelerated dataset.

Memory-mode copies live in DuckDB's in-memory catalog ``memory``; file-mode copies in one
database file under the data directory, attached as ``accel_file``. Because both sit in
one DuckDB instance, a query over any mix of them runs whole inside DuckDB (one connector,
one compute context for the planner). DuckDB's MVCC gives readers a snapshot: a refresh
swaps tables in one transaction while earlier readers finish on the old copy, and a
process killed mid-refresh leaves the committed copy intact (its WAL is replayed on open).
"""
from __future__ import annotations

import datetime as dt
import itertools
import json
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import duckdb
import pyarrow as pa

from accel.store import Stamp, Store, StoreError, distinct_names_ignoring_case, key_matches, local_table_name
from federation.connectors.base import first_line
from federation.connectors.base import CursorLease
from federation.connectors.duckdb import DuckDBConnector
from federation.expr import quote_double
from federation.snapshots import Pin, pinned_read

FILE_CATALOG = "accel_file"
MEMORY_CATALOG = "memory"
META_TABLE = "flightdeck_copies"
POSITIONS_TABLE = "flightdeck_positions"  # where each change-following copy stands in its stream
_index_numbers = itertools.count()


class ReadTransactions:
    """Cursors in a READ ONLY transaction, each kept from one statement to the next while
    nothing commits: a BEGIN and a new cursor cost half as much as a key lookup itself.

    A transaction sees the database as it was at its first read, so one kept across a commit
    would answer from before it, and DuckDB would keep the rows the commit replaced for it
    (a whole copy's worth). So each cursor is kept with the generation of commits its
    transaction began in, and only used again within it; every commit is made inside
    ``committing``, which starts the next generation and closes the idle cursors."""

    def __init__(self, begin: Callable[[], duckdb.DuckDBPyConnection], commit_lock: threading.Lock,
                 most_kept: int = 16):
        self._begin = begin
        self.commit_lock = commit_lock
        self.most_kept = most_kept
        self._idle: list[tuple[duckdb.DuckDBPyConnection, int]] = []
        self._generation = 0
        self._lock = threading.Lock()

    def take(self) -> CursorLease:
        outdated, cursor = [], None
        with self._lock:
            generation = self._generation  # read before a new BEGIN: a commit after it is seen
            while self._idle and cursor is None:
                cursor, began = self._idle.pop()
                if began != generation:  # handed back while a commit was under way
                    outdated.append(cursor)
                    cursor = None
        for stale in outdated:
            stale.close()
        if cursor is None:
            cursor = self._begin()
        return CursorLease(cursor, lambda handed: self._keep(handed, generation))

    def _keep(self, cursor: duckdb.DuckDBPyConnection, generation: int) -> bool:
        with self._lock:
            if generation != self._generation or len(self._idle) >= self.most_kept:
                return False
            self._idle.append((cursor, generation))
            return True

    @contextmanager
    def committing(self) -> Iterator[None]:
        """Around a commit: no pinned query plans meanwhile, and no transaction kept from before."""
        with self.commit_lock:
            self.close()
            try:
                yield
            finally:
                with self._lock:
                    self._generation += 1
                self.close()  # those handed back while it committed

    def close(self) -> None:
        """Close the idle cursors (their transactions end)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for cursor, _ in idle:
            cursor.close()


class AcceleratedDuckDB(DuckDBConnector):
    """Reads the local copies; the planner sees one DuckDB backend holding all of them.

    The instance it reads is the writable one the refreshes write to, so every read runs in
    a READ ONLY transaction: DuckDB itself refuses any write a statement could attempt (a
    table, a sequence, an attachment), whatever reached it. Being local, read-only and
    isolated, it takes whole statements translated from the client's SQL
    (``federation.whole_statement``), not only the plan's unparsed parts."""

    takes_whole_statements = True

    def __init__(self, connection: duckdb.DuckDBPyConnection, base_dir: Path, catalogs: list[str]):
        super(DuckDBConnector, self).__init__({}, base_dir)
        self.path = Path("accelerated")
        self.use_connection(connection)
        self.catalogs = catalogs
        self.commit_lock = threading.Lock()
        self.reads = ReadTransactions(self._cursor, self.commit_lock)

    @property
    def compute_context(self) -> str:
        return "accelerated:duckdb"

    def describe(self) -> str:
        return "duckdb (accelerated copies)"

    def _stream_lease(self) -> CursorLease:
        pinned = pinned_read(self)
        return CursorLease(pinned) if pinned is not None else self.reads.take()

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cursor = super()._cursor()
        cursor.execute("BEGIN TRANSACTION READ ONLY")
        return cursor

    def pin(self, table: str) -> Pin:
        """A cursor whose transaction already sees every copy as they stand: DuckDB takes a
        transaction's snapshot of a database when it first reads from it, not at BEGIN."""
        cursor = self._cursor()
        for catalog in self.catalogs:
            cursor.execute(f"SELECT NULL FROM {catalog}.main.{META_TABLE} LIMIT 0").fetchall()
        return Pin(self, cursor, cursor.close)


class DuckDBEngine:
    """The DuckDB instance behind every DuckDB copy of this runtime."""

    def __init__(self, data_dir: Path | None, base_dir: Path, memory_limit: int | None = None):
        self.connection = duckdb.connect(":memory:")
        if memory_limit is not None:  # the process's ceiling, not DuckDB's default share of the machine
            self.connection.execute(f"SET memory_limit = '{int(memory_limit)}B'")
        self.file = None
        if data_dir is not None:
            data_dir.mkdir(parents=True, exist_ok=True)
            self.file = data_dir / "accelerated.duckdb"
            self.connection.execute(f"ATTACH '{_sql_text(str(self.file))}' AS {FILE_CATALOG}")
        for catalog in self.catalogs():
            self.connection.execute(f"CREATE TABLE IF NOT EXISTS {catalog}.main.{META_TABLE} "
                                    "(dataset VARCHAR PRIMARY KEY, as_of TIMESTAMPTZ, bytes BIGINT)")
            self.connection.execute(f"CREATE TABLE IF NOT EXISTS {catalog}.main.{POSITIONS_TABLE} "
                                    "(dataset VARCHAR PRIMARY KEY, position VARCHAR)")
        # Same session rules as the duckdb: connector; files were attached above, before the lock.
        self.connection.execute("SET TimeZone = 'UTC'")
        self.connection.execute("SET enable_external_access = false")
        self.connection.execute("SET lock_configuration = true")
        self.reader = AcceleratedDuckDB(self.connection, base_dir, self.catalogs())
        self._lock = threading.Lock()

    def catalogs(self) -> list[str]:
        return [MEMORY_CATALOG] + ([FILE_CATALOG] if self.file is not None else [])

    def cursor(self) -> duckdb.DuckDBPyConnection:
        with self._lock:  # cursor() itself is not safe to call from two threads at once
            return self.connection.cursor()

    def close(self) -> None:
        self.reader.reads.close()
        self.connection.close()


class DuckDBStore(Store):
    engine = "duckdb"

    def __init__(self, dataset: str, schema: pa.Schema, mode: str, engine: DuckDBEngine):
        super().__init__(dataset, schema, mode)
        distinct_names_ignoring_case(dataset, schema, self.engine)
        self.duckdb = engine
        self.catalog = FILE_CATALOG if mode == "file" else MEMORY_CATALOG
        self.name = local_table_name(dataset)

    @property
    def connector(self) -> AcceleratedDuckDB:
        return self.duckdb.reader

    @property
    def table(self) -> str:
        return f"{self.catalog}.main.{self.name}"

    def _qualified(self, name: str) -> str:
        return f"{self.catalog}.main.{quote_double(name)}"

    def has_copy(self) -> bool:
        """A copy with the dataset's columns and the types DuckDB gives them (a copy kept from
        before its source retyped a column is not)."""
        cursor = self.duckdb.cursor()
        try:
            rows = cursor.execute("SELECT column_name, data_type FROM information_schema.columns WHERE "
                                  "table_catalog = ? AND table_schema = 'main' AND table_name = ?",
                                  [self.catalog, self.name]).fetchall()
            expected = dict(zip(self.schema.names, map(str, cursor.from_arrow(self.schema.empty_table()).types)))
        finally:
            cursor.close()
        return dict(rows) == expected

    def replace(self, reader: pa.RecordBatchReader, stamp: Stamp, indexes: tuple[str, ...] = (),
                position: dict | None = None) -> None:
        staging = f"{self.name}__refresh"

        def write(cursor: duckdb.DuckDBPyConnection, incoming: str) -> None:
            cursor.execute(f"CREATE OR REPLACE TABLE {self._qualified(staging)} AS SELECT * FROM {incoming}")
            cursor.execute(f"DROP TABLE IF EXISTS {self._qualified(self.name)}")
            cursor.execute(f"ALTER TABLE {self._qualified(staging)} RENAME TO {quote_double(self.name)}")
            for column in indexes:  # after the rename: DuckDB cannot rename an indexed table
                index = quote_double(f"{self.name}_{column}_{next(_index_numbers)}")
                cursor.execute(f"CREATE INDEX {index} ON {self._qualified(self.name)} ({quote_double(column)})")
            self._record(cursor, stamp, stamp.bytes)
            self._record_position(cursor, position)

        self._transaction(write, reader)

    def upsert(self, reader: pa.RecordBatchReader, stamp: Stamp, key: tuple[str, ...],
               on_conflict: str) -> None:
        live = self._qualified(self.name)

        def write(cursor: duckdb.DuckDBPyConnection, incoming: str) -> None:
            cursor.execute(f"CREATE TEMP TABLE batch AS SELECT * FROM {incoming}")
            matches = key_matches("batch", self.name, key)
            if key and on_conflict == "upsert":
                cursor.execute(f"DELETE FROM {live} WHERE EXISTS (SELECT 1 FROM batch WHERE {matches})")
                cursor.execute(f"INSERT INTO {live} BY NAME SELECT * FROM batch")
            elif key:
                cursor.execute(f"INSERT INTO {live} BY NAME SELECT * FROM batch WHERE NOT EXISTS "
                               f"(SELECT 1 FROM {live} WHERE {matches})")
            else:
                cursor.execute(f"INSERT INTO {live} BY NAME SELECT * FROM batch")
            cursor.execute("DROP TABLE batch")
            previous = self.stamp()
            self._record(cursor, stamp, (previous.bytes if previous else 0) + stamp.bytes)

        self._transaction(write, reader)

    def apply_changes(self, upserts: pa.Table | None, deletes: pa.Table | None, key: tuple[str, ...],
                      stamp: Stamp, position: dict) -> None:
        live = self._qualified(self.name)
        inputs = [upserts if upserts is not None else self.schema.empty_table()]
        if key:
            inputs.append(deletes if deletes is not None else
                          pa.table({c: pa.array([], self.schema.field(c).type) for c in key}))

        def write(cursor: duckdb.DuckDBPyConnection, added: str, *gone: str) -> None:
            for incoming in (*gone, added) if key else ():
                matches = key_matches("i", self.name, key)
                cursor.execute(f"DELETE FROM {live} WHERE EXISTS (SELECT 1 FROM {incoming} AS i WHERE {matches})")
            cursor.execute(f"INSERT INTO {live} BY NAME SELECT * FROM {added}")
            previous = self.stamp()
            self._record(cursor, stamp, (previous.bytes if previous else 0) + stamp.bytes)
            self._record_position(cursor, position)

        self._transaction(write, *inputs)

    def _record_position(self, cursor: duckdb.DuckDBPyConnection, position: dict | None) -> None:
        positions = f"{self.catalog}.main.{POSITIONS_TABLE}"
        cursor.execute(f"DELETE FROM {positions} WHERE dataset = ?", [self.dataset])
        if position is not None:
            cursor.execute(f"INSERT INTO {positions} VALUES (?, ?)", [self.dataset, json.dumps(position)])

    def position(self) -> dict | None:
        row = self._one(f"SELECT position FROM {self.catalog}.main.{POSITIONS_TABLE} WHERE dataset = ?",
                        [self.dataset])
        return None if row is None else json.loads(row[0])

    def _transaction(self, write, *inputs: pa.RecordBatchReader | pa.Table) -> None:
        """Run ``write`` in one transaction with each of ``inputs`` visible as a table (their
        names are passed on); roll back on error."""
        cursor = self.duckdb.cursor()
        names = [f"incoming_{uuid.uuid4().hex}" for _ in inputs]
        for name, data in zip(names, inputs):
            cursor.register(name, data)
        try:
            cursor.execute("BEGIN TRANSACTION")
            write(cursor, *names)
            with self.duckdb.reader.reads.committing():
                cursor.execute("COMMIT")
        except Exception as error:
            try:
                cursor.execute("ROLLBACK")
            except duckdb.Error:
                pass
            raise StoreError(f"duckdb copy of {self.dataset}: {first_line(error)}") from error
        finally:
            for name in names:
                cursor.unregister(name)
            cursor.close()

    def _record(self, cursor: duckdb.DuckDBPyConnection, stamp: Stamp, size: int) -> None:
        meta = f"{self.catalog}.main.{META_TABLE}"
        cursor.execute(f"DELETE FROM {meta} WHERE dataset = ?", [self.dataset])
        cursor.execute(f"INSERT INTO {meta} VALUES (?, ?, ?)", [self.dataset, stamp.as_of, size])

    def stamp(self) -> Stamp | None:
        row = self._one(f"SELECT as_of, bytes FROM {self.catalog}.main.{META_TABLE} WHERE dataset = ?",
                        [self.dataset])
        return None if row is None else Stamp(_utc(row[0]), int(row[1] or 0))

    def _delete_older(self, column: str, cutoff: Any) -> int:
        with self.duckdb.reader.reads.committing():  # a statement of its own: it commits
            row = self._one(f"DELETE FROM {self._qualified(self.name)} WHERE {quote_double(column)} < ?", [cutoff])
        return int(row[0]) if row else 0

    def _record_bytes(self, size: int) -> None:
        with self.duckdb.reader.reads.committing():
            self._one(f"UPDATE {self.catalog}.main.{META_TABLE} SET bytes = ? WHERE dataset = ?", [size, self.dataset])

    def max_value(self, column: str) -> Any:
        return self._one(f"SELECT max({quote_double(column)}) FROM {self._qualified(self.name)}")[0]

    def row_count(self) -> int:
        return int(self._one(f"SELECT count(*) FROM {self._qualified(self.name)}")[0])

    def _one(self, sql: str, params: list | None = None) -> tuple | None:
        cursor = self.duckdb.cursor()
        try:
            return cursor.execute(sql, params or []).fetchone()
        except duckdb.Error as error:
            raise StoreError(f"duckdb copy of {self.dataset}: {first_line(error)}") from None
        finally:
            cursor.close()


def _utc(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def _sql_text(value: str) -> str:
    return value.replace("'", "''")

