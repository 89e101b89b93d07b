"""`sqlite:` — tables of a SQLite database file, opened read-only (mode=ro)."""
from __future__ import annotations

import datetime as dt
import decimal
import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa

from federation import expr as fx
from federation.cancel import on_cancel
from federation.connectors.base import DEFAULT_BATCH_ROWS, ConnectorError, CursorLease, SqlConnector

_DECIMAL = re.compile(r"(DECIMAL|NUMERIC)\s*\(\s*(\d+)\s*(?:,\s*(\d+))?\s*\)")


def arrow_type_for(declared: str) -> pa.DataType:
    """SQLite's declared column type to Arrow, following SQLite's affinity rules."""
    text = (declared or "").upper()
    if "BOOL" in text:
        return pa.bool_()
    if "INT" in text:
        return pa.int64()
    if any(word in text for word in ("CHAR", "CLOB", "TEXT")):
        return pa.string()
    if "BLOB" in text or not text:
        return pa.binary() if "BLOB" in text else pa.string()
    if any(word in text for word in ("REAL", "FLOA", "DOUB")):
        return pa.float64()
    if text.startswith("DATETIME") or text.startswith("TIMESTAMP"):
        return pa.timestamp("us")
    if text.startswith("DATE"):
        return pa.date32()
    match = _DECIMAL.match(text)
    if match:
        return pa.decimal128(int(match.group(2)), int(match.group(3) or 0))
    return pa.float64()  # NUMERIC affinity


_FALSE_WORDS = frozenset(("false", "f", "no", "n", "off", "0", ""))


def _as_boolean(value: Any) -> bool | None:
    """A BOOLEAN column's value: SQLite stores 0/1, but a column of any type may hold text."""
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_WORDS
    return value if value is None else bool(value)


def _value_converter(arrow_type: pa.DataType) -> Callable[[Any], Any] | None:
    if pa.types.is_boolean(arrow_type):
        return _as_boolean
    if pa.types.is_timestamp(arrow_type):
        return lambda v: v if v is None or isinstance(v, dt.datetime) else dt.datetime.fromisoformat(str(v))
    if pa.types.is_date32(arrow_type):
        return lambda v: v if v is None or isinstance(v, dt.date) else dt.date.fromisoformat(str(v)[:10])
    if pa.types.is_decimal(arrow_type):
        return lambda v: None if v is None else decimal.Decimal(str(v))
    if pa.types.is_string(arrow_type):
        return lambda v: v if v is None or isinstance(v, str) else str(v)
    return None


def sqlite_literal(value: object) -> str | None:
    """SQLite has no typed literals: dates compare as their ISO text.

    Timestamps stay local: stored text may use 'T' or ' ' between date and time, and
    comparing text across the two forms could drop rows the real filter keeps.
    """
    if isinstance(value, dt.datetime):
        return None
    if isinstance(value, dt.date):
        return f"'{value.isoformat()}'"
    if isinstance(value, bool):
        return "1" if value else "0"
    return fx.standard_literal(value)


_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
_SCHEMA_TABLES = {"sqlite_master", "sqlite_temp_master", "sqlite_schema", "sqlite_temp_schema"}
_READ_PRAGMAS = {"table_info", "table_xinfo", "index_list", "index_info", "foreign_key_list"}


def _reads_only(action: int, first: str | None, second: str | None, database: str | None,
                trigger: str | None) -> int:
    """SQLite authorizer: reading tables and calling functions; the schema pragmas
    (``pragma_table_info``) that describe a table; nothing else."""
    if action in _READ_ACTIONS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA and (first or "").lower() in _READ_PRAGMAS:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_UPDATE and first in _SCHEMA_TABLES:
        return sqlite3.SQLITE_OK  # SQLite loading the schema (the connection is mode=ro besides)
    return sqlite3.SQLITE_DENY


class KeptConnections:
    """Read-only connections to one database file, kept idle from one statement to the next:
    opening a connection and preparing the statement cost more than a key lookup itself, and a
    kept connection runs again the statements it prepared (the sqlite3 module caches them). A
    connection is kept only between statements, outside any transaction, so each statement
    reads the file as it stands when the statement starts; and only while the path names the
    same file (device and inode): a database written aside and renamed over it is opened anew."""

    def __init__(self, path: Path, connect: Callable[[], sqlite3.Connection], most_kept: int = 8):
        self.path = path
        self._connect = connect
        self.most_kept = most_kept
        self._idle: list[sqlite3.Connection] = []
        self._file: tuple[int, int] | None = None  # the file the idle connections have open
        self._closed = False
        self._lock = threading.Lock()

    def take(self) -> CursorLease:
        """A statement's connection: an idle one, else a new one (``connect``'s errors raise)."""
        file = self._file_now()
        with self._lock:
            stale = self._idle if file != self._file else []
            if stale:
                self._idle = []
            connection = self._idle.pop() if self._idle else None
        for old in stale:
            old.close()
        if connection is None:
            connection = self._connect()
        return CursorLease(connection, lambda handed: self._keep(handed, file))

    def _keep(self, connection: sqlite3.Connection, file: tuple[int, int] | None) -> bool:
        with self._lock:
            if self._closed or file is None or connection.in_transaction or len(self._idle) >= self.most_kept:
                return False
            if file != self._file:  # the path names another file now: the idle ones read the old one
                if self._idle:
                    return False
                self._file = file
            self._idle.append(connection)
            return True

    def _file_now(self) -> tuple[int, int] | None:
        try:
            found = os.stat(self.path)
        except OSError:
            return None  # gone: connecting says so
        return found.st_dev, found.st_ino

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


# A COLLATE naming anything but BINARY, quoted or not.
_OTHER_COLLATION = re.compile(r"COLLATE\s*[\"'`\[]?(?!BINARY\b)\w", re.IGNORECASE)


class SQLiteConnector(SqlConnector):
    schema_may_change = True
    kind = "sqlite"
    dialect = "sqlite"
    renderer = fx.SqlRenderer(fx.quote_double, sqlite_literal, "qmark")

    def __init__(self, params: dict[str, Any], base_dir):
        super().__init__(params, base_dir)
        self.path = self.required_database_file("sqlite_file")
        self.kept = KeptConnections(self.path, self._connect)

    @property
    def compute_context(self) -> str:
        return f"sqlite:{self.path}"

    def describe(self) -> str:
        return f"sqlite ({self.path.name})"

    def _connect(self, snapshot_of: str | None = None) -> sqlite3.Connection:
        """A read-only connection; with ``snapshot_of`` (a table), in a read transaction that has
        read it already: in WAL mode, its snapshot is the database as of that first read."""
        try:
            connection = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            if snapshot_of is not None:  # before the authorizer, which refuses BEGIN
                connection.execute("BEGIN")
                connection.execute(f"SELECT 1 FROM {self.quote_table(snapshot_of)} LIMIT 1").fetchall()
        except sqlite3.Error as error:  # the file went away or cannot be read: the source is unavailable
            self.stats.record_error()
            raise ConnectorError(f"{self.describe()}: {error}") from None
        # mode=ro keeps this database unchanged, but not the host: VACUUM INTO and ATTACH write
        # other files. SQLite's authorizer lets a statement only read.
        connection.set_authorizer(_reads_only)
        return connection

    def _stream_lease(self) -> CursorLease:
        """The connection a statement's stream runs on (the catalog's own lookups use ``_reading``)."""
        return self.kept.take()

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A connection for one look at the database, closed after it; its failures are the
        source's (ConnectorError), not the server's."""
        connection = self._connect()
        try:
            yield connection
        except sqlite3.Error as error:
            self.stats.record_error()
            raise ConnectorError(f"{self.describe()}: {error}") from None
        finally:
            connection.close()

    def tables(self) -> list[str]:
        with self._reading() as connection:
            rows = connection.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
                "AND name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()
        return [row[0] for row in rows]

    def _columns(self, table: str) -> list[tuple[str, str, bool, int]]:
        with self._reading() as connection:
            rows = connection.execute(
                "SELECT name, type, \"notnull\", pk FROM pragma_table_info(?)", [table]).fetchall()
        if not rows:
            raise ConnectorError(f"{self.describe()}: no table named {table}")
        return rows

    def schema(self, table: str) -> pa.Schema:
        # Every column is nullable: SQLite enforces NOT NULL only on writes it sees.
        return pa.schema([pa.field(name, arrow_type_for(declared))
                          for name, declared, _, _ in self._columns(table)])

    def _comparison_rules(self, table: str) -> dict[str, str]:
        """Untyped columns may hold numbers where text is expected, dates are text in whatever
        format was written, and a BOOLEAN column may hold text SQLite reads as 0 ('yes' is false
        in a WHERE) where flightdeck shows true: none of them is pushed. Text under any collation but BINARY is
        loose, and so is a view's text: its columns take the collation of whatever they select,
        which SQLite does not tell."""
        with self._reading() as connection:
            row = connection.execute("SELECT type, sql FROM sqlite_master WHERE name = ?", [table]).fetchone()
        loose_text = bool(row and (row[0] == "view" or (row[1] and _OTHER_COLLATION.search(row[1]))))
        rules = {}
        for name, declared, _, _ in self._columns(table):
            arrow_type = arrow_type_for(declared)
            if not declared or pa.types.is_date32(arrow_type) or pa.types.is_timestamp(arrow_type) \
                    or pa.types.is_boolean(arrow_type):
                rules[name] = fx.NONE
            elif pa.types.is_string(arrow_type) and loose_text:
                rules[name] = fx.LOOSE
        return rules

    def primary_key(self, table: str) -> list[str]:
        keyed = sorted((pk, name) for name, _, _, pk in self._columns(table) if pk)
        return [name for _, name in keyed]

    def row_count(self, table: str) -> int | None:
        with self._reading() as connection:
            return connection.execute(f"SELECT count(*) FROM {self.quote_table(table)}").fetchone()[0]

    def open_stream(self, sql: str, params: list[Any] | None, declared: pa.Schema | None,
               batch_rows: int = DEFAULT_BATCH_ROWS) -> pa.RecordBatchReader:
        """Results take the table's declared types; computed columns are read as text."""
        lease = self._stream_lease()
        on_cancel(lease.interrupt)
        try:
            cursor = lease.cursor.execute(sql, params or [])
        except sqlite3.Error as error:
            lease.give_back(False)
            self.stats.record_error()
            raise ConnectorError(f"{self.describe()}: {error}") from None
        if cursor.description is None:
            lease.give_back(False)
            raise ConnectorError(f"{self.describe()}: not a query (only SELECT statements are read)")
        schema = self._result_schema(cursor, declared)

        def batches():
            finished = False
            try:
                while rows := cursor.fetchmany(batch_rows):
                    yield self._to_batch(schema, rows)
                finished = True
            finally:
                cursor.close()  # its statement reset: a kept connection holds no read open
                lease.give_back(finished)

        return self.counted(schema, sql, batches)

    def close(self) -> None:
        self.kept.close()

    @staticmethod
    def _result_schema(cursor: sqlite3.Cursor, declared: pa.Schema | None) -> pa.Schema:
        """The declared types, by position when the result has exactly their columns (scans and
        pushed-down queries); otherwise by name, computed columns read as text."""
        if declared is not None and len(declared) == len(cursor.description):
            return declared
        fields = []
        for description in cursor.description:
            name = description[0]
            if declared is not None and name in declared.names:
                fields.append(declared.field(name))
            else:
                fields.append(pa.field(name, pa.string()))
        return pa.schema(fields)

    @staticmethod
    def _to_batch(schema: pa.Schema, rows: list[tuple]) -> pa.RecordBatch:
        arrays = []
        for index, field in enumerate(schema):
            values = [row[index] for row in rows]
            convert = _value_converter(field.type)
            if convert is not None:
                values = [convert(v) for v in values]
            try:
                arrays.append(pa.array(values, type=field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as error:
                raise ConnectorError(
                    f"column {field.name}: values do not fit its declared type {field.type}: {error}"
                ) from None
        return pa.RecordBatch.from_arrays(arrays, schema=schema)
