"""One MySQL/MariaDB table's change stream: row events read from the binlog.

The snapshot is one ``START TRANSACTION WITH CONSISTENT SNAPSHOT``: InnoDB's snapshot and the
binlog position it matches (MariaDB's ``binlog_snapshot_file``/``binlog_snapshot_position``
status, read in the same transaction), so no lock is taken and no write waits. The stream
(``BinLogStreamReader``, as a replica would) resumes from a position after a whole transaction
(its XID event): the copy never stands inside a transaction. Columns are named by the binlog's
own metadata (``binlog_row_metadata = FULL``). The server keeps nothing for this reader, so
there is nothing to clean up there; the binlog's own retention is the limit of a resume.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import threading
import time
import zlib
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pymysql
import pymysql.cursors
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import HeartbeatLogEvent, QueryEvent, RotateEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from federation.changes import ChangeBatch, PendingChanges, SourceReset
from federation.connectors.base import ConnectorError

if TYPE_CHECKING:
    from federation.connectors.mysql import MySQLConnector

MAX_BATCH_ROWS = 20_000       # a batch closes at the first transaction end past this many rows
HEARTBEAT_SECONDS = 0.1       # the server's heartbeat while idle: how soon a stop or a pause is seen
BATCH_SECONDS = 0.1           # while changes keep coming, a batch is handed on this often
_DDL = re.compile(r"^\s*(truncate|alter|drop|rename|create\s+or\s+replace)\b", re.IGNORECASE)


class MySQLChanges:
    def __init__(self, connector: "MySQLConnector", table: str):
        self.connector = connector
        self.table = table
        self.database, self.table_name = connector._split(table)

    def describe(self) -> str:
        return f"{self.connector.describe()}: changes of {self.table}"

    def _server_id(self) -> int:
        """A replica id of its own per table (a server drops an older reader with the same id)."""
        return 100_000 + zlib.crc32(f"flightdeck {self.database}.{self.table_name}".encode()) % 1_000_000_000

    # ---- snapshot ----------------------------------------------------------

    def snapshot(self, rows: Any) -> tuple[pa.RecordBatchReader, dict[str, Any]]:
        """``rows(connection, sql)``: the connector's stream of a statement on a given session."""
        connector = self.connector
        connection = connector._connect()  # read-only session
        try:
            with connection.cursor(pymysql.cursors.Cursor) as cursor:
                cursor.execute("START TRANSACTION WITH CONSISTENT SNAPSHOT")
                cursor.execute("SHOW STATUS LIKE 'binlog_snapshot_%'")
                status = dict(cursor.fetchall())
        except pymysql.MySQLError as error:
            connection.close()
            raise ConnectorError(f"{self.describe()}: snapshot: {connector.clean_error(error)}") from None
        if not status.get("Binlog_snapshot_file"):
            connection.close()
            raise ConnectorError(f"{self.describe()}: the server writes no binlog: refresh_mode 'changes' "
                                 "needs log_bin, binlog_format = ROW and binlog_row_metadata = FULL")
        connector.forget_schema(self.table)
        position = {"file": status["Binlog_snapshot_file"], "pos": int(status["Binlog_snapshot_position"]),
                    "columns": [row[0] for row in connector._columns(self.table)]}
        return rows(connection, connector.schema(self.table)), position

    # ---- stream ------------------------------------------------------------

    def stream(self, since: dict[str, Any], stop: threading.Event) -> Iterator[ChangeBatch]:
        connector = self.connector
        schema = connector.schema(self.table)
        key = tuple(connector.change_key(self.table))
        reader = BinLogStreamReader(
            connection_settings={"host": connector.host, "port": connector.port, "user": connector.user,
                                 "password": connector._password, "connect_timeout": connector.timeout},
            server_id=self._server_id(), resume_stream=True, blocking=True,
            log_file=since["file"], log_pos=since["pos"],  # file and position (is_mariadb would use GTIDs)
            only_events=[WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent, XidEvent, QueryEvent,
                         RotateEvent, HeartbeatLogEvent],
            only_schemas=[self.database], only_tables=[self.table_name],  # row events; statements all come
            slave_heartbeat=HEARTBEAT_SECONDS)
        decoder = _Decoder(self, schema, key, since)
        first_complete = None  # when the oldest whole transaction not yet handed on ended
        try:
            while not stop.is_set():
                event = reader.fetchone()
                if event is None:
                    continue
                decoder.take(event, reader.log_file, reader.log_pos)
                if not decoder.complete():
                    continue
                first_complete = first_complete or time.monotonic()
                # A blocking reader cannot tell whether more is on its way: hand on what is
                # there when the server goes quiet (its heartbeat), or after a short wait.
                if isinstance(event, HeartbeatLogEvent) or decoder.complete(MAX_BATCH_ROWS) \
                        or time.monotonic() - first_complete >= BATCH_SECONDS:
                    yield decoder.batch()
                    first_complete = None
        except pymysql.MySQLError as error:
            raise ConnectorError(f"{self.describe()}: {connector.clean_error(error)}") from None
        finally:
            reader.close()


class _Decoder:
    """Binlog events of one table into batches of collapsed changes."""

    def __init__(self, changes: MySQLChanges, schema: pa.Schema, key: tuple[str, ...], since: dict[str, Any]):
        self.changes = changes
        self.schema = schema
        self.key = key
        self.columns = list(since["columns"])
        self.converters = {field.name: _converter(field.type) for field in schema}
        self.pending = PendingChanges(schema, key)
        self.position: dict[str, Any] | None = None   # after the last whole transaction taken
        self.committed_at: dt.datetime | None = None
        self.open = False                              # rows of a transaction not yet committed

    def take(self, event: Any, log_file: str, log_pos: int) -> None:
        if isinstance(event, (WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent)):
            if (event.schema, event.table) == (self.changes.database, self.changes.table_name):
                self._rows(event)
        elif isinstance(event, XidEvent):
            if self.open:
                self.open = False
                self.position = {"file": log_file, "pos": log_pos, "columns": self.columns}
                self.committed_at = dt.datetime.fromtimestamp(event.timestamp, dt.timezone.utc)
        elif isinstance(event, QueryEvent):
            self._statement(event)

    def _statement(self, event: QueryEvent) -> None:
        query = event.query if isinstance(event.query, str) else event.query.decode(errors="replace")
        database = event.schema.decode() if isinstance(event.schema, bytes) else event.schema
        if not _DDL.match(query) or self.changes.table_name.lower() not in query.lower():
            return
        if database != self.changes.database and self.changes.database.lower() not in query.lower():
            return
        what = "truncated" if query.lstrip().lower().startswith("truncate") else "altered or dropped"
        raise SourceReset(f"{self.changes.describe()}: the table was {what} at the source ({query.strip()[:80]})")

    def _rows(self, event: Any) -> None:
        names = [column.name for column in event.columns]
        if names != self.columns:
            raise SourceReset(f"{self.changes.describe()}: the table's schema changed at the source "
                              f"(columns were {', '.join(self.columns)}; now {', '.join(names)})")
        self.open = True
        for row in event.rows:
            try:
                if isinstance(event, DeleteRowsEvent):
                    self.pending.delete(self._values(row["values"]))
                elif isinstance(event, UpdateRowsEvent):
                    old, new = self._values(row["before_values"]), self._values(row["after_values"])
                    if any(old[name] != new[name] for name in self.key):
                        self.pending.delete(old)
                    self.pending.upsert(new)
                else:
                    self.pending.upsert(self._values(row["values"]))
            except (ValueError, TypeError, ArithmeticError) as error:
                self.pending.skipped.append(f"{type(event).__name__}: {error}")

    def _values(self, values: dict[str, Any]) -> dict[str, Any]:
        return {name: convert(values.get(name)) for name, convert in self.converters.items()}

    def complete(self, rows: int = 0) -> bool:
        """Whole transactions are there (none open), with at least ``rows`` rows."""
        return not self.open and self.position is not None and \
            len(self.pending) + len(self.pending.skipped) >= rows

    def batch(self) -> ChangeBatch:
        batch = self.pending.batch(self.position, self.committed_at)
        self.pending = PendingChanges(self.schema, self.key)
        self.position = self.committed_at = None
        return batch


def _converter(arrow_type: pa.DataType):
    """A binlog value (as pymysqlreplication decodes it) into the value a snapshot reads."""
    if pa.types.is_boolean(arrow_type):
        return lambda v: None if v is None else bool(v)
    if pa.types.is_timestamp(arrow_type) and arrow_type.tz:
        # TIMESTAMP comes as the server's epoch seconds made local: back to UTC
        return lambda v: None if v is None else v.astimezone(dt.timezone.utc)
    if pa.types.is_string(arrow_type):
        return lambda v: v if v is None or isinstance(v, str) else \
            json.dumps(v) if isinstance(v, (dict, list)) else v.decode() if isinstance(v, bytes) else str(v)
    return lambda v: v
