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
import threading
import time
import zlib
from typing import TYPE_CHECKING, Any, Iterator

import pyarrow as pa
import pymysql
import sqlglot
import pymysql.cursors
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import HeartbeatLogEvent, QueryEvent, RotateEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent
from sqlglot.errors import TokenError
from sqlglot.tokens import TokenType

from federation.changes import ChangeBatch, PendingChanges, SourceReset
from federation.connectors.base import ConnectorError

if TYPE_CHECKING:
    from federation.connectors.mysql import MySQLConnector

MAX_BATCH_ROWS = 20_000       # a batch closes at the first transaction end past this many rows
HEARTBEAT_SECONDS = 0.1       # the server's heartbeat while idle: how soon a stop or a pause is seen
BATCH_SECONDS = 0.1           # while changes keep coming, a batch is handed on this often
IDLE_POSITION_SECONDS = 5.0   # the table at rest: how often the copy's position follows the server's
# ALTER TABLE clauses that leave every column's values and types as they were: anything else an
# ALTER of the table does (a column added, dropped, retyped or renamed, the key changed, the
# table renamed or converted to another character set) stops the stream.
_KEEPING_COLUMNS_AFTER_ADD_OR_DROP = {"INDEX", "KEY", "UNIQUE", "FULLTEXT", "SPATIAL", "CONSTRAINT", "FOREIGN", "CHECK"}
_KEEPING_COLUMNS = {"ENGINE", "COMMENT", "AUTO_INCREMENT", "ROW_FORMAT", "KEY_BLOCK_SIZE", "FORCE", "ALGORITHM",
                    "LOCK", "ENABLE", "DISABLE", "STATS_PERSISTENT", "STATS_AUTO_RECALC", "STATS_SAMPLE_PAGES",
                    "PACK_KEYS", "CHECKSUM", "DELAY_KEY_WRITE", "MAX_ROWS", "MIN_ROWS", "AVG_ROW_LENGTH",
                    "PAGE_CHECKSUM", "TRANSACTIONAL", "DEFAULT", "CHARACTER", "CHARSET", "COLLATE", "ORDER"}


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
        last_handed, handed = time.monotonic(), (since["file"], since["pos"])
        try:
            while not stop.is_set():
                event = reader.fetchone()
                if event is None:
                    continue
                decoder.take(event, reader.log_file, reader.log_pos)
                if isinstance(event, HeartbeatLogEvent) and decoder.idle() \
                        and time.monotonic() - last_handed >= IDLE_POSITION_SECONDS \
                        and (reader.log_file, reader.log_pos) != handed:
                    # The server is quiet and has sent all it wrote, whole transactions only: the
                    # copy stands there, current (its data_as_of moves on while the table rests).
                    last_handed, handed = time.monotonic(), (reader.log_file, reader.log_pos)
                    yield ChangeBatch(None, None, decoder.at(*handed), None)
                if not decoder.complete():
                    continue
                first_complete = first_complete or time.monotonic()
                # A blocking reader cannot tell whether more is on its way: hand on what is
                # there when the server goes quiet (its heartbeat), or after a short wait.
                if isinstance(event, HeartbeatLogEvent) or decoder.complete(MAX_BATCH_ROWS) \
                        or time.monotonic() - first_complete >= BATCH_SECONDS:
                    batch = decoder.batch()
                    yield batch
                    first_complete, last_handed = None, time.monotonic()
                    handed = (batch.position["file"], batch.position["pos"])
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
                self.position = self.at(log_file, log_pos)
                self.committed_at = dt.datetime.fromtimestamp(event.timestamp, dt.timezone.utc)
        elif isinstance(event, QueryEvent):
            self._statement(event)

    def _statement(self, event: QueryEvent) -> None:
        query = event.query if isinstance(event.query, str) else event.query.decode(errors="replace")
        database = event.schema.decode() if isinstance(event.schema, bytes) else event.schema
        what = statement_reset(query, database, self.changes.database, self.changes.table_name)
        if what is not None:
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

    def idle(self) -> bool:
        return not self.open and self.position is None

    def at(self, log_file: str, log_pos: int) -> dict[str, Any]:
        return {"file": log_file, "pos": log_pos, "columns": self.columns}

    def batch(self) -> ChangeBatch:
        batch = self.pending.batch(self.position, self.committed_at)
        self.pending = PendingChanges(self.schema, self.key)
        self.position = self.committed_at = None
        return batch


def statement_reset(query: str, current: str | None, database: str, table: str) -> str | None:
    """What a statement of the binlog did to ``database.table`` that its row events cannot carry
    (``"truncated"``, ``"dropped"``, ``"renamed"``, ``"altered"``, ``"replaced"``), or None. Read
    from its words, comments left out (a migration tool's ``/* ... */`` before an ALTER), with
    names matched whole (``items_archive`` is not ``items``); ``current`` is the database the
    statement ran in, which unqualified names are in. A statement that cannot be split into
    words and names the table anywhere counts as altering it."""
    try:
        tokens = sqlglot.tokenize(query, read="mysql")
        if len(tokens) == 2 and tokens[1].token_type == TokenType.STRING:  # RENAME: the rest as one string
            tokens = tokens[:1] + sqlglot.tokenize(tokens[1].text, read="mysql")
    except TokenError:
        return "altered" if table.lower() in query.lower() else None
    words = [token.text.upper() for token in tokens]
    ours = (database.lower(), table.lower())

    def name_at(at: int) -> tuple[tuple[str | None, str], int]:
        """The (database, table) written at ``at``, and where what follows it starts."""
        if at + 2 < len(tokens) and tokens[at + 1].token_type == TokenType.DOT:
            return (tokens[at].text.lower(), tokens[at + 2].text.lower()), at + 3
        return ((current or "").lower(), tokens[at].text.lower()), at + 1

    def past(at: int, *skipped: str) -> int:
        while at < len(words) and words[at] in skipped:
            at += 1
        return at
    if not words:
        return None
    head = words[0]
    if head == "DROP" and len(words) > 2 and words[1] in ("DATABASE", "SCHEMA"):
        return "dropped" if tokens[past(2, "IF", "EXISTS")].text.lower() == ours[0] else None
    if head == "TRUNCATE":
        at = past(1, "TABLE")
        return "truncated" if at < len(tokens) and name_at(at)[0] == ours else None
    if head == "DROP" and "TABLE" in words[1:3] and "TEMPORARY" not in words[1:2]:
        at, names = past(words.index("TABLE") + 1, "IF", "EXISTS"), []
        while at < len(tokens):
            name, at = name_at(at)
            names.append(name)
            if at >= len(tokens) or tokens[at].token_type != TokenType.COMMA:
                break
            at += 1
        return "dropped" if ours in names else None
    if head == "RENAME" and words[1:2] == ["TABLE"]:
        named = {name_at(at)[0] for at, token in enumerate(tokens)
                 if at >= 2 and token.token_type != TokenType.DOT and tokens[at - 1].token_type != TokenType.DOT
                 and token.token_type in (TokenType.VAR, TokenType.IDENTIFIER) and words[at] != "TO"}
        return "renamed" if ours in named else None
    if head == "CREATE" and words[1:3] == ["OR", "REPLACE"] and "TABLE" in words[3:5]:
        at = past(words.index("TABLE") + 1, "IF", "NOT", "EXISTS")
        return "replaced" if at < len(tokens) and name_at(at)[0] == ours else None
    if head == "ALTER" and "TABLE" in words[1:4]:
        at = words.index("TABLE") + 1
        if at >= len(tokens):
            return None
        name, at = name_at(past(at, "IF", "EXISTS"))
        if name != ours:
            return None
        return "altered" if any(not _keeps_columns(clause) for clause in _clauses(words[at:])) else None
    return None


def _clauses(words: list[str]) -> list[list[str]]:
    """An ALTER TABLE's clauses: its words split at the commas outside parentheses."""
    clauses, depth = [[]], 0
    for word in words:
        depth += (word == "(") - (word == ")")
        if word == "," and depth == 0:
            clauses.append([])
        else:
            clauses[-1].append(word)
    return [clause for clause in clauses if clause]


def _keeps_columns(clause: list[str]) -> bool:
    if "PRIMARY" in clause or clause[:2] in (["CONVERT", "TO"], ["RENAME", "TO"], ["RENAME", "AS"]):
        return False
    if clause[0] in ("ADD", "DROP"):
        return len(clause) > 1 and clause[1] in _KEEPING_COLUMNS_AFTER_ADD_OR_DROP
    if clause[0] in ("RENAME", "ALTER"):
        return len(clause) > 1 and clause[1] in ("INDEX", "KEY")
    return clause[0] in _KEEPING_COLUMNS


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
