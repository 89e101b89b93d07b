"""`mysql:db.table` — MySQL and MariaDB through PyMySQL, rows streamed into Arrow.

There is no ADBC driver for MySQL; PyMySQL streams rows with an unbuffered cursor and
every session is ``READ ONLY`` at the server before any statement runs. A table can also
be followed by its changes (``refresh_mode: changes``): the binlog, in mysql_changes.py.
"""
from __future__ import annotations

import datetime as dt
import decimal
import threading
from typing import Any, Callable, Iterator

import pyarrow as pa
import pymysql
import pymysql.cursors

from federation import expr as fx
from federation.cancel import on_cancel
from federation.changes import ChangeBatch, ChangeSource, table_key
from federation.connectors.base import DEFAULT_BATCH_ROWS, ConnectorError, SqlConnector, Unreachable
from federation.connectors.mysql_changes import MySQLChanges

_SIMPLE_TYPES = {
    "tinyint": pa.int8(), "smallint": pa.int16(), "mediumint": pa.int32(), "int": pa.int32(),
    "integer": pa.int32(), "bigint": pa.int64(), "float": pa.float32(), "double": pa.float64(),
    "real": pa.float64(), "varchar": pa.string(), "char": pa.string(), "text": pa.string(),
    "tinytext": pa.string(), "mediumtext": pa.string(), "longtext": pa.string(), "json": pa.string(),
    "enum": pa.string(), "set": pa.string(), "date": pa.date32(), "datetime": pa.timestamp("us"),
    "timestamp": pa.timestamp("us", tz="UTC"), "time": pa.duration("us"), "year": pa.int16(),
    "blob": pa.binary(), "tinyblob": pa.binary(), "mediumblob": pa.binary(), "longblob": pa.binary(),
    "binary": pa.binary(), "varbinary": pa.binary(), "bit": pa.int64(),
}
_UNSIGNED = {"tinyint": pa.uint8(), "smallint": pa.uint16(), "mediumint": pa.uint32(),
             "int": pa.uint32(), "integer": pa.uint32(), "bigint": pa.uint64()}


def arrow_type_for(data_type: str, column_type: str, precision: int | None,
                   scale: int | None) -> pa.DataType | None:
    """Arrow type of a MySQL column (information_schema names), or None if unsupported."""
    if data_type == "decimal":
        return pa.decimal128(precision or 10, scale or 0)
    if "unsigned" in column_type and data_type in _UNSIGNED:
        return _UNSIGNED[data_type]
    if column_type == "tinyint(1)":
        return pa.bool_()
    return _SIMPLE_TYPES.get(data_type)


def quote_backtick(name: str) -> str:
    """A MySQL identifier. Every statement is sent with a parameter list, so PyMySQL reads
    its text as a format string: a ``%`` in a name is written ``%%``."""
    return "`" + name.replace("`", "``").replace("%", "%%") + "`"


def _converter(arrow_type: pa.DataType) -> Callable[[Any], Any] | None:
    if pa.types.is_boolean(arrow_type):
        return lambda v: None if v is None else bool(v)
    if pa.types.is_timestamp(arrow_type) and arrow_type.tz:
        return lambda v: None if v is None else v.replace(tzinfo=dt.timezone.utc)
    if pa.types.is_decimal(arrow_type):
        return lambda v: None if v is None else decimal.Decimal(v)
    if pa.types.is_integer(arrow_type):
        return lambda v: None if v is None else (int.from_bytes(v, "big") if isinstance(v, bytes) else int(v))
    return None


class MySQLConnector(SqlConnector, ChangeSource):
    schema_may_change = True
    kind = "mysql"
    dialect = "mysql"
    secret_params = ("mysql_pass",)
    renderer = fx.SqlRenderer(quote_backtick, fx.standard_literal, "format")

    def __init__(self, params: dict[str, Any], base_dir):
        super().__init__(params, base_dir)
        self.host = str(params.get("mysql_host", "127.0.0.1"))
        self.port = int(params.get("mysql_tcp_port", 3306))
        self.database = params.get("mysql_db")
        self.user = str(params.get("mysql_user", "root"))
        self._password = str(params.get("mysql_pass", ""))
        self.timeout = int(params.get("connect_timeout", 10))
        self.query_timeout = float(params.get("query_timeout", 300))
        self._described: dict[str, list[tuple]] = {}

    @property
    def compute_context(self) -> str:
        return f"mysql://{self.host}:{self.port}"

    def describe(self) -> str:
        return f"mysql ({self.host}:{self.port})"

    def _connect(self) -> pymysql.connections.Connection:
        try:
            connection = pymysql.connect(
                host=self.host, port=self.port, user=self.user, password=self._password,
                database=self.database, connect_timeout=self.timeout, charset="utf8mb4",
                read_timeout=self.query_timeout,
                cursorclass=pymysql.cursors.SSCursor, autocommit=True,
                init_command="SET SESSION TRANSACTION READ ONLY")
        except pymysql.MySQLError as error:
            raise Unreachable(f"{self.describe()}: cannot connect: {self.clean_error(error)}") from None
        self._limit_statement_time(connection)
        return connection

    def _limit_statement_time(self, connection: pymysql.connections.Connection) -> None:
        """The server stops a slow statement too (MariaDB and MySQL name the setting differently)."""
        for statement in (f"SET SESSION max_statement_time = {self.query_timeout}",
                          f"SET SESSION max_execution_time = {int(self.query_timeout * 1000)}"):
            try:
                with connection.cursor(pymysql.cursors.Cursor) as cursor:
                    cursor.execute(statement)
                return
            except pymysql.MySQLError:
                continue

    def clean_error(self, error: Exception) -> str:
        # PyMySQL errors are (code, message) tuples: the message alone
        text = str(error.args[-1]) if getattr(error, "args", None) else str(error)
        return self.mask_secrets(text)

    def _split(self, table: str) -> tuple[str, str]:
        database, _, table_name = table.rpartition(".")
        if not database and not self.database:
            raise ConnectorError(f"{self.describe()}: name the database: mysql:<db>.{table}")
        return database or self.database, table_name

    def quote_table(self, table: str) -> str:
        database, table_name = self._split(table)
        return f"{quote_backtick(database)}.{quote_backtick(table_name)}"

    def _query_all(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        connection = self._connect()
        try:
            with connection.cursor(pymysql.cursors.Cursor) as cursor:
                cursor.execute(sql, params or ())
                return list(cursor.fetchall())
        except pymysql.MySQLError as error:
            raise ConnectorError(f"{self.describe()}: {self.clean_error(error)}") from None
        finally:
            connection.close()

    def tables(self) -> list[str]:
        rows = self._query_all(
            "SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema "
            "NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys') ORDER BY 1, 2")
        return [f"{schema}.{name}" for schema, name in rows]

    def _columns(self, table: str) -> list[tuple]:
        # Described once: every scan needs the schema, and a lookup costs a connection.
        if table not in self._described:
            self._described[table] = self._describe_columns(table)
        return self._described[table]

    def _describe_columns(self, table: str) -> list[tuple]:
        database, table_name = self._split(table)
        rows = self._query_all(
            "SELECT column_name, data_type, column_type, numeric_precision, numeric_scale, column_key "
            "FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
            "ORDER BY ordinal_position", [database, table_name])
        if not rows:
            raise ConnectorError(f"{self.describe()}: no table {database}.{table_name}")
        return rows

    def forget_schema(self, table: str, rules: bool = True) -> None:
        super().forget_schema(table, rules)
        self._described.pop(table, None)

    def schema(self, table: str) -> pa.Schema:
        fields = []
        for name, data_type, column_type, precision, scale, _ in self._columns(table):
            arrow_type = arrow_type_for(data_type.lower(), column_type.lower(), precision, scale)
            if arrow_type is not None:
                fields.append(pa.field(name, arrow_type))
        return pa.schema(fields)

    def unsupported_columns(self, table: str) -> list[str]:
        return [f"{name} ({column_type})" for name, data_type, column_type, precision, scale, _
                in self._columns(table)
                if arrow_type_for(data_type.lower(), column_type.lower(), precision, scale) is None]

    def primary_key(self, table: str) -> list[str]:
        return [row[0] for row in self._columns(table) if row[5] == "PRI"]

    def _comparison_rules(self, table: str) -> dict[str, str]:
        """MySQL's text collations ignore case or trailing spaces (even *_bin pads spaces):
        text columns take only = and IN, which may match more rows, never fewer."""
        return self.loose_columns(table, lambda t: pa.types.is_string(t) or pa.types.is_binary(t))

    def _kill_query(self, thread_id: int) -> None:
        """Stop the statement a session is running (from another session: its own is busy)."""
        killer = self._connect()
        try:
            with killer.cursor(pymysql.cursors.Cursor) as cursor:
                cursor.execute("KILL QUERY %s", (int(thread_id),))
        finally:
            killer.close()

    def open_stream(self, sql: str, params: list[Any] | None, target: pa.Schema | None,
               batch_rows: int = DEFAULT_BATCH_ROWS) -> pa.RecordBatchReader:
        return self._stream_on(self._connect(), sql, params, target, batch_rows)

    def _stream_on(self, connection: pymysql.connections.Connection, sql: str, params: list[Any] | None,
                   target: pa.Schema | None, batch_rows: int = DEFAULT_BATCH_ROWS) -> pa.RecordBatchReader:
        """``sql``'s rows on ``connection`` (closed when the stream ends), e.g. in its snapshot."""
        cursor = connection.cursor()
        on_cancel(lambda: self._kill_query(connection.thread_id()))
        try:
            cursor.execute(sql, params or ())  # always formatted: see quote_backtick
        except pymysql.MySQLError as error:
            connection.close()
            self.stats.record_error()
            raise ConnectorError(f"{self.describe()}: {self.clean_error(error)}") from None
        schema = target if target is not None else pa.schema(
            [pa.field(d[0], pa.string()) for d in cursor.description])
        converters = [_converter(f.type) for f in schema]

        def batches():
            try:
                while rows := cursor.fetchmany(batch_rows):
                    yield _to_batch(rows, schema, converters)
            finally:
                connection.close()  # an unbuffered cursor cannot be reused mid-stream

        return self.counted(schema, sql, batches)

    # ---- change data capture ----------------------------------------------

    def change_key(self, table: str) -> tuple[str, ...]:
        return table_key(self, table)

    def snapshot(self, table: str) -> tuple[pa.RecordBatchReader, dict[str, Any]]:
        def rows(connection: pymysql.connections.Connection, schema: pa.Schema) -> pa.RecordBatchReader:
            columns = ", ".join(quote_backtick(name) for name in schema.names)
            return self._stream_on(connection, f"SELECT {columns} FROM {self.quote_table(table)}", None, schema)

        return MySQLChanges(self, table).snapshot(rows)

    def changes(self, table: str, since: dict[str, Any], stop: threading.Event) -> Iterator[ChangeBatch]:
        return MySQLChanges(self, table).stream(since, stop)


def _to_batch(rows: list[tuple], schema: pa.Schema, converters: list) -> pa.RecordBatch:
    arrays = []
    for index, (field, convert) in enumerate(zip(schema, converters)):
        values = [row[index] for row in rows]
        if convert is not None:
            values = [convert(v) for v in values]
        elif pa.types.is_string(field.type):
            values = [v if v is None or isinstance(v, str) else str(v) for v in values]
        try:
            arrays.append(pa.array(values, type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as error:
            raise ConnectorError(f"column {field.name}: values do not fit {field.type}: {error}") from None
    return pa.RecordBatch.from_arrays(arrays, schema=schema)
