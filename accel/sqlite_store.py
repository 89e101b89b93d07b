"""Copies in SQLite: one database for every SQLite-accelerated dataset of a mode.

The database runs in WAL mode, so readers keep their snapshot while a refresh writes, and a
refresh commits its swap in one transaction. File mode keeps it under the data directory;
memory mode keeps it on a RAM-backed filesystem (/dev/shm when there is one): a shared-cache
``:memory:`` database would make readers fail with "table is locked" during every refresh.
Types: SQLite stores text, integers and floats, so timestamps are kept as UTC ISO text, dates
as ISO text and decimals with NUMERIC affinity; declared column types bring them back.
"""
from __future__ import annotations

import datetime as dt
import itertools
import json
import shutil
import sqlite3
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from accel.store import Stamp, Store, StoreError, distinct_names_ignoring_case, key_matches, local_table_name
from federation.connectors.base import CursorLease
from federation.connectors.sqlite import KeptConnections, SQLiteConnector
from federation.expr import quote_double as q
from federation.snapshots import Pin, pinned_read

META_TABLE = "flightdeck_copies"
POSITIONS_TABLE = "flightdeck_positions"  # where each change-following copy stands in its stream
STAGING_PREFIX = "sqlite-staging-"  # a folder holding a refresh's source rows until they are written
_index_numbers = itertools.count()


def declared_type(arrow_type: pa.DataType) -> str:
    """The SQLite column type that the sqlite: connector maps back to ``arrow_type``."""
    if pa.types.is_boolean(arrow_type):
        return "BOOLEAN"
    if pa.types.is_integer(arrow_type):
        return "BIGINT"
    if pa.types.is_floating(arrow_type):
        return "DOUBLE"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "TEXT"
    if pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type):
        return "BLOB"
    if pa.types.is_timestamp(arrow_type):
        return "TIMESTAMP"
    if pa.types.is_date(arrow_type):
        return "DATE"
    if pa.types.is_decimal(arrow_type):
        return f"DECIMAL({arrow_type.precision}, {arrow_type.scale})"
    raise StoreError(f"engine sqlite cannot hold {arrow_type} columns: use engine duckdb")


class AcceleratedSQLite(SQLiteConnector):
    def __init__(self, path: Path, base_dir: Path):
        super(SQLiteConnector, self).__init__({}, base_dir)
        self.path = path
        self.kept = KeptConnections(self.path, self._connect)
        self.commit_lock = threading.Lock()

    def _stream_lease(self) -> CursorLease:
        pinned = pinned_read(self)
        return CursorLease(pinned) if pinned is not None else self.kept.take()

    def pin(self, table: str) -> Pin:
        connection = self._connect(snapshot_of=META_TABLE)  # in the file whatever the scan reads
        return Pin(self, connection, connection.close)

    @property
    def compute_context(self) -> str:
        return f"accelerated:sqlite:{self.path}"

    def describe(self) -> str:
        return "sqlite (accelerated copies)"


class SQLiteEngine:
    """The database file behind every SQLite copy of one mode."""

    def __init__(self, mode: str, data_dir: Path | None, base_dir: Path):
        if mode == "file":
            data_dir.mkdir(parents=True, exist_ok=True)
            self._scratch = None
            self.path = data_dir / "accelerated.sqlite"
            for left in data_dir.glob(f"{STAGING_PREFIX}*"):  # by a process that stopped while refreshing
                shutil.rmtree(left, ignore_errors=True)
        else:
            ram = Path("/dev/shm")
            self._scratch = Path(tempfile.mkdtemp(prefix="flightdeck-", dir=ram if ram.is_dir() else None))
            self.path = self._scratch / "accelerated.sqlite"
        self.writer = self.connect()
        self.writer.execute("PRAGMA journal_mode = WAL")
        self.writer.execute(f"CREATE TABLE IF NOT EXISTS {META_TABLE} "
                            "(dataset TEXT PRIMARY KEY, as_of TEXT, bytes INTEGER)")
        self.writer.execute(f"CREATE TABLE IF NOT EXISTS {POSITIONS_TABLE} (dataset TEXT PRIMARY KEY, position TEXT)")
        self.lock = threading.RLock()  # one writer at a time, as SQLite allows
        self.reader = AcceleratedSQLite(self.path, base_dir)

    def connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(self.path, timeout=60, check_same_thread=False,
                                     isolation_level=None)  # transactions are explicit
        return connection

    def close(self) -> None:
        self.reader.close()
        self.writer.close()
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)


class SQLiteStore(Store):
    engine = "sqlite"

    def __init__(self, dataset: str, schema: pa.Schema, mode: str, engine: SQLiteEngine):
        super().__init__(dataset, schema, mode)
        distinct_names_ignoring_case(dataset, schema, self.engine)
        self.columns = {f.name: declared_type(f.type) for f in schema}
        self.sqlite = engine
        self.name = local_table_name(dataset)

    @property
    def connector(self) -> AcceleratedSQLite:
        return self.sqlite.reader

    @property
    def table(self) -> str:
        return self.name

    def has_copy(self) -> bool:
        rows = self.sqlite.writer.execute("SELECT name, type FROM pragma_table_info(?)", [self.name]).fetchall()
        return dict(rows) == self.columns  # a copy kept from before its source retyped a column is not

    def replace(self, reader: pa.RecordBatchReader, stamp: Stamp, indexes: tuple[str, ...] = (),
                position: dict | None = None) -> None:
        staging = f"{self.name}__refresh"

        def write(db: sqlite3.Connection) -> None:
            db.execute(f"DROP TABLE IF EXISTS {q(staging)}")
            self._create(db, staging)
            self._insert(db, staging, staged)
            for column in indexes:
                index = q(f"{self.name}_{column}_{next(_index_numbers)}")
                db.execute(f"CREATE INDEX {index} ON {q(staging)} ({q(column)})")
            db.execute(f"DROP TABLE IF EXISTS {q(self.name)}")
            db.execute(f"ALTER TABLE {q(staging)} RENAME TO {q(self.name)}")
            self._record(db, stamp, stamp.bytes)
            self._record_position(db, position)

        with self._staged(reader) as staged:
            self._transaction(write)

    def upsert(self, reader: pa.RecordBatchReader, stamp: Stamp, key: tuple[str, ...],
               on_conflict: str) -> None:
        def write(db: sqlite3.Connection) -> None:
            db.execute("DROP TABLE IF EXISTS temp.batch")
            db.execute(f"CREATE TEMP TABLE batch AS SELECT * FROM main.{q(self.name)} WHERE 0")
            self._insert(db, "temp.batch", staged)
            columns = ", ".join(q(c) for c in self.schema.names)
            matches = key_matches("batch", self.name, key)
            if key and on_conflict == "upsert":
                db.execute(f"DELETE FROM {q(self.name)} WHERE EXISTS (SELECT 1 FROM batch WHERE {matches})")
            insert = f"INSERT INTO {q(self.name)} ({columns}) SELECT {columns} FROM batch"
            if key and on_conflict == "drop":
                insert += f" WHERE NOT EXISTS (SELECT 1 FROM {q(self.name)} WHERE {matches})"
            db.execute(insert)
            db.execute("DROP TABLE temp.batch")
            previous = self.stamp()
            self._record(db, stamp, (previous.bytes if previous else 0) + stamp.bytes)

        with self._staged(reader) as staged:
            self._transaction(write)

    @contextmanager
    def _staged(self, reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatchReader]:
        """The source's rows, read to a local Arrow file before the copy's transaction starts:
        every SQLite copy of this mode writes through one writer, which must not wait for a slow
        source (other copies' refreshes and changes would wait behind it)."""
        with tempfile.TemporaryDirectory(prefix=STAGING_PREFIX, dir=self.sqlite.path.parent) as folder:
            path = str(Path(folder) / "rows.arrow")
            try:
                with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, reader.schema) as rows:
                    for batch in reader:
                        rows.write_batch(batch)
            except (OSError, pa.ArrowIOError) as error:
                raise StoreError(f"sqlite copy of {self.dataset}: staging the source's rows: {error}") from error
            with pa.memory_map(path) as source:
                yield pa.ipc.open_stream(source)

    def apply_changes(self, upserts: pa.Table | None, deletes: pa.Table | None, key: tuple[str, ...],
                      stamp: Stamp, position: dict) -> None:
        def write(db: sqlite3.Connection) -> None:
            added = self._temp_copy(db, "batch", self.schema.names, upserts)
            if key:
                gone = self._temp_copy(db, "gone", list(key), deletes)
                for incoming in (gone, added):
                    matches = key_matches(incoming, self.name, key)
                    db.execute(f"DELETE FROM {q(self.name)} WHERE EXISTS (SELECT 1 FROM {incoming} WHERE {matches})")
            columns = ", ".join(q(c) for c in self.schema.names)
            db.execute(f"INSERT INTO {q(self.name)} ({columns}) SELECT {columns} FROM {added}")
            db.execute("DROP TABLE IF EXISTS temp.batch")
            db.execute("DROP TABLE IF EXISTS temp.gone")
            previous = self.stamp()
            self._record(db, stamp, (previous.bytes if previous else 0) + stamp.bytes)
            self._record_position(db, position)

        self._transaction(write)

    def _temp_copy(self, db: sqlite3.Connection, name: str, columns: list[str], rows: pa.Table | None) -> str:
        """``rows`` (may be None: no rows) in a temporary table with the copy's column types."""
        listed = ", ".join(q(c) for c in columns)
        db.execute(f"DROP TABLE IF EXISTS temp.{name}")
        db.execute(f"CREATE TEMP TABLE {name} AS SELECT {listed} FROM main.{q(self.name)} WHERE 0")
        if rows is not None and rows.num_rows:
            marks = ", ".join("?" for _ in columns)
            for batch in rows.select(columns).to_batches():
                db.executemany(f"INSERT INTO temp.{name} ({listed}) VALUES ({marks})", _sqlite_rows(batch))
        return f"temp.{name}"

    def _record_position(self, db: sqlite3.Connection, position: dict | None) -> None:
        db.execute(f"DELETE FROM {POSITIONS_TABLE} WHERE dataset = ?", [self.dataset])
        if position is not None:
            db.execute(f"INSERT INTO {POSITIONS_TABLE} VALUES (?, ?)", [self.dataset, json.dumps(position)])

    def position(self) -> dict | None:
        row = self._one(f"SELECT position FROM {POSITIONS_TABLE} WHERE dataset = ?", [self.dataset])
        return None if row is None else json.loads(row[0])

    def _create(self, db: sqlite3.Connection, name: str) -> None:
        columns = ", ".join(f"{q(column)} {declared}" for column, declared in self.columns.items())
        db.execute(f"CREATE TABLE {q(name)} ({columns})")

    def _insert(self, db: sqlite3.Connection, name: str, reader: pa.RecordBatchReader) -> None:
        quoted = name if "." in name else q(name)
        marks = ", ".join("?" for _ in self.schema.names)
        columns = ", ".join(q(c) for c in self.schema.names)
        for batch in reader:
            db.executemany(f"INSERT INTO {quoted} ({columns}) VALUES ({marks})",
                           _sqlite_rows(batch.select(self.schema.names)))

    def _transaction(self, write) -> None:
        with self.sqlite.lock:
            db = self.sqlite.writer
            try:
                db.execute("BEGIN IMMEDIATE")
                write(db)
                with self.sqlite.reader.commit_lock:  # not while a query pins its scans' reads
                    db.execute("COMMIT")
            except Exception as error:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StoreError(f"sqlite copy of {self.dataset}: {error}") from error

    def _record(self, db: sqlite3.Connection, stamp: Stamp, size: int) -> None:
        db.execute(f"INSERT OR REPLACE INTO {META_TABLE} VALUES (?, ?, ?)",
                   [self.dataset, stamp.as_of.isoformat(), size])

    def stamp(self) -> Stamp | None:
        row = self._one(f"SELECT as_of, bytes FROM {META_TABLE} WHERE dataset = ?", [self.dataset])
        return None if row is None else Stamp(dt.datetime.fromisoformat(row[0]), int(row[1] or 0))

    def _delete_older(self, column: str, cutoff: Any) -> int:
        with self.sqlite.lock, self.sqlite.reader.commit_lock:  # a statement of its own: it commits
            cursor = self.sqlite.writer.execute(f"DELETE FROM {q(self.name)} WHERE {q(column)} < ?",
                                                [_sqlite_value(cutoff)])
            return cursor.rowcount

    def _record_bytes(self, size: int) -> None:
        self._one(f"UPDATE {META_TABLE} SET bytes = ? WHERE dataset = ?", [size, self.dataset])

    def max_value(self, column: str) -> Any:
        value = self._one(f"SELECT max({q(column)}) FROM {q(self.name)}")[0]
        return _from_sqlite(value, self.schema.field(column).type)

    def row_count(self) -> int:
        return int(self._one(f"SELECT count(*) FROM {q(self.name)}")[0])

    def _one(self, sql: str, params: list | None = None) -> tuple | None:
        with self.sqlite.lock:
            try:
                return self.sqlite.writer.execute(sql, params or []).fetchone()
            except sqlite3.Error as error:
                raise StoreError(f"sqlite copy of {self.dataset}: {error}") from None


def _sqlite_rows(batch: pa.RecordBatch) -> Iterator[tuple]:
    columns = [_column_values(column) for column in batch.columns]
    return zip(*columns)


def _column_values(column: pa.Array) -> list:
    if pa.types.is_timestamp(column.type) and column.type.tz is not None:
        column = column.cast(pa.timestamp(column.type.unit))  # the same instants, as naive UTC
    values = column.to_pylist()
    if pa.types.is_timestamp(column.type) or pa.types.is_date(column.type) or pa.types.is_decimal(column.type):
        return [_sqlite_value(v) for v in values]
    return values


def _sqlite_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value.isoformat(sep=" ")
    if isinstance(value, dt.date):
        return value.isoformat()
    if value is not None and not isinstance(value, (int, float, str, bytes, bool)):
        return str(value)  # decimals
    return value


def _from_sqlite(value: Any, arrow_type: pa.DataType) -> Any:
    if value is None:
        return None
    if pa.types.is_timestamp(arrow_type):
        parsed = dt.datetime.fromisoformat(str(value))
        return parsed.replace(tzinfo=dt.timezone.utc) if arrow_type.tz else parsed
    if pa.types.is_date(arrow_type):
        return dt.date.fromisoformat(str(value)[:10])
    return value
