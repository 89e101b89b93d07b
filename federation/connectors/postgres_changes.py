"""One PostgreSQL table's change stream: logical replication with pgoutput.

A publication for the table and a logical replication slot, both named ``flightdeck_<table>``
(or the dataset's ``cdc_name`` param), are created on first use. A snapshot creates the slot
afresh: only a slot's creation exports a snapshot, and that snapshot is exactly the slot's
start, so the rows read in it (REPEATABLE READ, SET TRANSACTION SNAPSHOT) and the stream that
follows meet with nothing lost or repeated. The stream resumes at the position the copy
committed; the slot's flush position is confirmed only when the consumer asks for the next
batch, so the server keeps every change the copy has not committed. The replication connection
reads the WAL only; the snapshot's session is read-only. Creating and dropping the publication
and slot are the only statements that change anything at the server, and only its catalogs.
"""
from __future__ import annotations

import datetime as dt
import decimal
import re
import select
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator

import psycopg2
import psycopg2.errors
import psycopg2.extras
import pyarrow as pa

from federation import expr as fx
from federation.changes import ChangeBatch, PendingChanges, SourceReset
from federation.connectors import pgoutput
from federation.connectors.base import ConnectorError

if TYPE_CHECKING:
    from federation.connectors.postgres import PostgresConnector

MAX_BATCH_ROWS = 20_000      # a batch closes at the first transaction end past this many rows
WAIT_SECONDS = 0.05          # how long one wait for the server's next message lasts
HEARTBEAT_SECONDS = 5.0      # idle: confirm how far the server has read (frees its WAL)
SLOT_RELEASE_SECONDS = 10.0  # how long a slot a stream just left may stay active


def object_name(table: str, configured: str | None) -> str:
    """The slot's and publication's name: lower-case letters, digits and _, at most 63."""
    name = configured or "flightdeck_" + table.replace(".", "_")
    return re.sub(r"[^a-z0-9_]", "_", name.lower())[:63]


class PostgresChanges:
    def __init__(self, connector: "PostgresConnector", table: str):
        self.connector = connector
        self.table = table
        self.schema_name, self.table_name = connector._split(table)
        self.name = object_name(table, connector.params.get("cdc_name"))

    def describe(self) -> str:
        return f"{self.connector.describe()}: changes of {self.table}"

    # ---- connections -------------------------------------------------------

    def _connect(self, replication: bool = False):
        c = self.connector
        try:
            return psycopg2.connect(
                host=c.host, port=c.port, dbname=c.database, user=c.user, password=c._password or None,
                connect_timeout=c.timeout, application_name="flightdeck cdc", options="-c TimeZone=UTC",
                connection_factory=psycopg2.extras.LogicalReplicationConnection if replication else None)
        except psycopg2.Error as error:
            raise ConnectorError(f"{self.describe()}: cannot connect: {c.clean_error(error)}") from None

    def _admin(self, sql: str, params: tuple = ()) -> list[tuple]:
        """A catalog statement (publication, slot) on a short-lived session of its own."""
        connection = self._connect()
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql, params)
                return cursor.fetchall() if cursor.description else []
        except psycopg2.Error as error:
            raise ConnectorError(f"{self.describe()}: {self.connector.clean_error(error)}") from None
        finally:
            connection.close()

    # ---- publication and slot ----------------------------------------------

    def _ensure_publication(self) -> None:
        if self._admin("SELECT 1 FROM pg_publication WHERE pubname = %s", (self.name,)):
            return
        self._admin(f"CREATE PUBLICATION {self.name} FOR TABLE {self.connector.quote_table(self.table)}")

    def _drop_slot(self) -> None:
        """Drop the slot if there is one; a stream that just ended may hold it a moment longer."""
        deadline = time.monotonic() + SLOT_RELEASE_SECONDS
        while True:
            found = self._admin("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (self.name,))
            if not found:
                return
            if not found[0][0]:
                self._admin("SELECT pg_drop_replication_slot(%s)", (self.name,))
                return
            if time.monotonic() > deadline:
                raise ConnectorError(f"{self.describe()}: replication slot {self.name} is in use by another "
                                     "session (another flightdeck following the same table?)")
            time.sleep(0.1)

    def cleanup(self) -> None:
        self._drop_slot()
        self._admin(f"DROP PUBLICATION IF EXISTS {self.name}")

    def backlog(self) -> int | None:
        rows = self.connector._fetch_all("SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint "
                                         "FROM pg_replication_slots WHERE slot_name = $1", [self.name])
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    # ---- snapshot ----------------------------------------------------------

    def snapshot(self) -> tuple[pa.RecordBatchReader, dict[str, Any]]:
        self._ensure_publication()
        self._drop_slot()  # only a slot's creation exports a snapshot: a new snapshot, a new slot
        replication = self._connect(replication=True)
        try:
            with replication.cursor() as cursor:
                cursor.execute(f"CREATE_REPLICATION_SLOT {self.name} LOGICAL pgoutput EXPORT_SNAPSHOT")
                _slot, consistent_point, snapshot_name, _plugin = cursor.fetchone()
            # The exported snapshot lives until the replication session's next command: import
            # it first, then the slot alone carries the stream on.
            return self._read_snapshot(snapshot_name, pgoutput.lsn_number(consistent_point))
        except psycopg2.Error as error:
            raise ConnectorError(f"{self.describe()}: {self.connector.clean_error(error)}") from None
        finally:
            replication.close()

    def _read_snapshot(self, snapshot_name: str, lsn: int) -> tuple[pa.RecordBatchReader, dict[str, Any]]:
        connector = self.connector
        connection = connector._connect()  # read-only session
        cursor = connection.cursor()
        try:
            cursor.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            cursor.execute(f"SET TRANSACTION SNAPSHOT '{snapshot_name}'")
            cursor.execute("SELECT attname, atttypid::bigint FROM pg_attribute WHERE attrelid = "
                           f"'{connector.quote_table(self.table)}'::regclass AND attnum > 0 AND NOT attisdropped "
                           "ORDER BY attnum")
            columns = [[name, int(oid)] for name, oid in cursor.fetchall()]
            connector.forget_schema(self.table)  # the snapshot may follow a schema change
            schema = connector.schema(self.table)
            sql = (f"SELECT {', '.join(fx.quote_double(n) for n in schema.names)} "
                   f"FROM {connector.quote_table(self.table)}")
            cursor.execute(sql)
            reader = cursor.fetch_record_batch()
        except Exception as error:
            cursor.close()
            connection.close()
            raise ConnectorError(f"{self.describe()}: snapshot: {connector.clean_error(error)}") from None

        def release(finished: bool) -> None:
            cursor.close()
            connection.close()  # ends the snapshot's transaction

        return connector.stream_arrow(sql, reader, schema, release), {"lsn": lsn, "columns": columns}

    # ---- stream ------------------------------------------------------------

    def stream(self, since: dict[str, Any], stop: threading.Event) -> Iterator[ChangeBatch]:
        schema = self.connector.schema(self.table)
        key = tuple(self.connector.change_key(self.table))
        decoder = _Decoder(self, schema, key, since)
        replication = self._connect(replication=True)
        try:
            cursor = replication.cursor()
            try:
                cursor.start_replication(slot_name=self.name, decode=False, start_lsn=since["lsn"],
                                         options={"proto_version": "1", "publication_names": self.name})
            except psycopg2.errors.UndefinedObject:
                raise SourceReset(f"{self.describe()}: replication slot {self.name} is gone "
                                  "(cleaned up?): a new snapshot is needed") from None
            yield from self._batches(cursor, decoder, stop)
        except psycopg2.Error as error:
            raise ConnectorError(f"{self.describe()}: {self.connector.clean_error(error)}") from None
        finally:
            replication.close()

    def _batches(self, cursor, decoder: "_Decoder", stop: threading.Event) -> Iterator[ChangeBatch]:
        confirmed = decoder.since
        idle_since = time.monotonic()
        while not stop.is_set():
            message = cursor.read_message()
            if message is not None:
                decoder.take(message.payload)
                idle_since = time.monotonic()
                if not decoder.complete(MAX_BATCH_ROWS):
                    continue
                batch = decoder.batch()
            elif decoder.complete():
                batch = decoder.batch()
            elif decoder.idle() and time.monotonic() - idle_since >= HEARTBEAT_SECONDS \
                    and cursor.wal_end > confirmed:
                # Nothing of this table is open or pending: every change before the server's
                # read position has come, so the copy can stand there (and the slot free WAL).
                batch = ChangeBatch(None, None, decoder.position(cursor.wal_end), None)
                idle_since = time.monotonic()
            else:
                if time.monotonic() - idle_since >= HEARTBEAT_SECONDS:
                    cursor.send_feedback(reply=True)  # asks the server where it has read to
                    idle_since = time.monotonic() - HEARTBEAT_SECONDS / 2
                select.select([cursor], [], [], WAIT_SECONDS)
                continue
            yield batch
            # Asked for the next batch: the last one is committed in the copy.
            confirmed = batch.position["lsn"]
            cursor.send_feedback(write_lsn=confirmed, flush_lsn=confirmed)


class _Decoder:
    """pgoutput messages of one table into batches of collapsed changes."""

    def __init__(self, changes: PostgresChanges, schema: pa.Schema, key: tuple[str, ...], since: dict[str, Any]):
        self.changes = changes
        self.schema = schema
        self.key = key
        self.since = since["lsn"]
        self.columns = [tuple(c) for c in since["columns"]]
        self.relation_id: int | None = None
        self.parsers: list[tuple[str, Callable[[str], Any]] | None] = []
        self.pending = PendingChanges(schema, key)
        self.in_transaction = False
        self.skipping = False
        self.end_lsn: int | None = None      # the last whole transaction's end: the batch's position
        self.committed_at: dt.datetime | None = None

    def take(self, payload: bytes) -> None:
        message = pgoutput.decode(payload)
        if isinstance(message, pgoutput.Begin):
            self.in_transaction = True
            self.skipping = message.final_lsn < self.since  # committed before the copy's position
        elif isinstance(message, pgoutput.Commit):
            self.in_transaction = False
            if not self.skipping:
                self.end_lsn, self.committed_at = message.end_lsn, message.committed_at
        elif isinstance(message, pgoutput.Relation):
            self._relation(message)
        elif self.skipping or message is None:
            return
        elif isinstance(message, pgoutput.Truncate):
            if self.relation_id in message.relation_ids or self.relation_id is None:
                raise SourceReset(f"{self.changes.describe()}: the table was truncated at the source")
        elif message.relation_id == self.relation_id:
            self._row(message)

    def _relation(self, relation: pgoutput.Relation) -> None:
        if (relation.namespace, relation.name) != (self.changes.schema_name, self.changes.table_name):
            return
        if list(relation.columns) != self.columns:
            was = ", ".join(name for name, _ in self.columns)
            now = ", ".join(name for name, _ in relation.columns)
            raise SourceReset(f"{self.changes.describe()}: the table's schema changed at the source "
                              f"(columns were {was}; now {now}, or a type changed)")
        self.relation_id = relation.relation_id
        self.parsers = [(name, value_parser(self.schema.field(name).type)) if name in self.schema.names else None
                        for name, _ in relation.columns]

    def _row(self, message: pgoutput.Insert | pgoutput.Update | pgoutput.Delete) -> None:
        try:
            if isinstance(message, pgoutput.Delete):
                self.pending.delete(self._values(message.old, None))
                return
            if isinstance(message, pgoutput.Update) and message.old is not None:
                old = self._values(message.old, None)
                if any(old[name] is not None for name in self.key):  # the key changed
                    self.pending.delete(old)
            self.pending.upsert(self._values(message.new, getattr(message, "old", None)))
        except (ValueError, ArithmeticError) as error:
            self.pending.skipped.append(f"{type(message).__name__.lower()}: {error}")

    def _values(self, values: tuple, old: tuple | None) -> dict[str, Any]:
        row = {}
        for index, (parser, value) in enumerate(zip(self.parsers, values)):
            if parser is None:
                continue
            name, parse = parser
            if value is pgoutput.UNCHANGED:
                if old is None or old[index] is pgoutput.UNCHANGED:
                    raise ValueError(f"column {name}: an unchanged TOASTed value was not sent "
                                     "(set REPLICA IDENTITY FULL on the table)")
                value = old[index]
            row[name] = None if value is None else parse(value)
        return row

    def complete(self, rows: int = 0) -> bool:
        """Whole transactions are there (no transaction open), with at least ``rows`` rows."""
        return not self.in_transaction and self.end_lsn is not None and \
            len(self.pending) + len(self.pending.skipped) >= rows

    def idle(self) -> bool:
        return not self.in_transaction and self.end_lsn is None

    def position(self, lsn: int) -> dict[str, Any]:
        return {"lsn": lsn, "columns": [list(c) for c in self.columns]}

    def batch(self) -> ChangeBatch:
        batch = self.pending.batch(self.position(self.end_lsn), self.committed_at)
        self.since = self.end_lsn
        self.pending = PendingChanges(self.schema, self.key)
        self.end_lsn = self.committed_at = None
        return batch


def value_parser(arrow_type: pa.DataType) -> Callable[[str], Any]:
    """Turns PostgreSQL's text output of a value into the Python value of ``arrow_type``."""
    if pa.types.is_boolean(arrow_type):
        return lambda text: text == "t"
    if pa.types.is_integer(arrow_type):
        return int
    if pa.types.is_floating(arrow_type):
        return float
    if pa.types.is_decimal(arrow_type):
        return decimal.Decimal
    if pa.types.is_timestamp(arrow_type):
        return _timestamp
    if pa.types.is_date(arrow_type):
        return dt.date.fromisoformat
    if pa.types.is_time(arrow_type):
        return dt.time.fromisoformat
    if pa.types.is_binary(arrow_type):
        return lambda text: bytes.fromhex(text[2:])  # bytea_output = hex: \x0102...
    if pa.types.is_list(arrow_type):
        return _array(value_parser(arrow_type.value_type))
    if pa.types.is_string(arrow_type):
        return str

    def unreadable(text: str) -> Any:  # the record is skipped with this reason; the stream goes on
        raise ValueError(f"{arrow_type} values are not read from the change stream")
    return unreadable


def _timestamp(text: str) -> dt.datetime:
    if text in ("infinity", "-infinity"):
        raise ValueError(f"timestamp {text} has no Arrow value")
    return dt.datetime.fromisoformat(text)


def _array(element: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        if not (text.startswith("{") and text.endswith("}")) or "{" in text[1:-1]:
            raise ValueError(f"array {text[:40]!r}: only one-dimensional arrays are read")
        items, current, quoted, escaped, was_quoted = [], [], False, False, False
        for char in text[1:-1] + ",":
            if escaped:
                current.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted, was_quoted = not quoted, True
            elif char == "," and not quoted:
                value = "".join(current)
                items.append(None if value == "NULL" and not was_quoted else element(value))
                current, was_quoted = [], False
            else:
                current.append(char)
        return [] if text == "{}" else items
    return parse
