"""`postgres:schema.table` — PostgreSQL through the Arrow-native ADBC driver.

Sessions are read-only at the server (``default_transaction_read_only=on`` set when
connecting), so even a statement that slipped past every other lock could not write.
A table can also be followed by its changes (``refresh_mode: changes``): logical replication,
in postgres_changes.py.
"""
from __future__ import annotations

import queue
import threading
import urllib.parse
from typing import Any, Iterator

import adbc_driver_postgresql.dbapi as adbc_postgres
import pyarrow as pa

from federation import expr as fx
from federation.cancel import on_cancel
from federation.changes import ChangeBatch, ChangeSource, table_key
from federation.connectors.base import ConnectorError, SqlConnector, Unreachable, cancel_quietly
from federation.connectors.postgres_changes import PostgresChanges

POOL_SIZE = 4

# information_schema data_type -> Arrow (parameterised types are handled in arrow_type_for)
_SIMPLE_TYPES = {
    "smallint": pa.int16(), "integer": pa.int32(), "bigint": pa.int64(), "real": pa.float32(),
    "double precision": pa.float64(), "boolean": pa.bool_(), "text": pa.string(),
    "character varying": pa.string(), "character": pa.string(), "name": pa.string(),
    "date": pa.date32(), "bytea": pa.binary(), "uuid": pa.string(), "json": pa.string(),
    "jsonb": pa.string(), "time without time zone": pa.time64("us"),
    "timestamp without time zone": pa.timestamp("us"), "timestamp with time zone": pa.timestamp("us", tz="UTC"),
    "interval": pa.month_day_nano_interval(), "inet": pa.string(), "cidr": pa.string(),
    "money": pa.string(), "xml": pa.string(), "oid": pa.int64(),
}
_ARRAY_ELEMENTS = {"_int2": pa.int16(), "_int4": pa.int32(), "_int8": pa.int64(), "_float4": pa.float32(),
                   "_float8": pa.float64(), "_text": pa.string(), "_varchar": pa.string(), "_bool": pa.bool_()}


def arrow_type_for(data_type: str, udt_name: str, precision: int | None, scale: int | None) -> pa.DataType | None:
    """Arrow type of a PostgreSQL column, or None when flightdeck cannot read it."""
    if data_type == "numeric":
        if precision is None:
            return pa.decimal128(38, 10)  # unconstrained numeric (e.g. the result of numeric arithmetic)
        return pa.decimal128(precision, scale or 0) if precision <= 38 else pa.decimal256(precision, scale or 0)
    if data_type == "ARRAY":
        element = _ARRAY_ELEMENTS.get(udt_name)
        return pa.list_(element) if element is not None else None
    if data_type == "USER-DEFINED":
        return pa.string() if udt_name in ("citext",) else None
    return _SIMPLE_TYPES.get(data_type)


C_COLLATIONS = ("C", "POSIX", "C.UTF-8", "C.utf8", "ucs_basic")
TEXT_TYPES = ("text", "varchar", "name")


def _rule(type_name: str, collation: str, deterministic: bool, database_collation: str) -> str:
    if type_name in ("citext", "bpchar", "jsonb", "uuid") or not deterministic:
        return fx.LOOSE  # = may match more (case, padding, JSON spacing, UUID case)
    if type_name in TEXT_TYPES:
        effective = database_collation if collation in ("default", "") else collation
        return fx.EXACT if effective in C_COLLATIONS else fx.EQUALITY
    if type_name in ("json", "xml", "inet", "cidr", "money", "point") or type_name.startswith("_"):
        return fx.NONE
    return fx.EXACT


def _connection_lost(error: Exception) -> bool:
    """Whether an error says the session is gone, not that the statement failed in it."""
    state = str(getattr(error, "sqlstate", None) or "")
    text = str(error).lower()
    return state.startswith(("08", "57P01", "57P02", "57P03")) or any(
        sign in text for sign in ("server closed the connection", "terminating connection",
                                  "no connection to the server", "connection has been closed"))


class PostgresConnector(SqlConnector, ChangeSource):
    schema_may_change = True
    kind = "postgres"
    dialect = "postgres"
    renderer = fx.SqlRenderer(fx.quote_double, fx.zoned_literal)
    secret_params = ("pg_pass",)

    def __init__(self, params: dict[str, Any], base_dir):
        super().__init__(params, base_dir)
        self.host = str(params.get("pg_host", "127.0.0.1"))
        self.port = int(params.get("pg_port", 5432))
        self.database = str(params.get("pg_db", "postgres"))
        self.user = str(params.get("pg_user", "postgres"))
        self._password = str(params.get("pg_pass", ""))
        self.timeout = int(params.get("connect_timeout", 10))
        self.query_timeout = float(params.get("query_timeout", 300))
        self._pool: queue.LifoQueue = queue.LifoQueue(maxsize=POOL_SIZE)
        self._schemas: dict[str, tuple[pa.Schema, list[str]]] = {}
        self._lock = threading.Lock()

    @property
    def compute_context(self) -> str:
        return f"postgres://{self.host}:{self.port}/{self.database}"

    def describe(self) -> str:
        return f"postgres ({self.host}:{self.port}/{self.database})"

    def _uri(self) -> str:
        credentials = urllib.parse.quote(self.user, safe="")
        if self._password:
            credentials += ":" + urllib.parse.quote(self._password, safe="")
        query = urllib.parse.urlencode({
            "connect_timeout": self.timeout, "application_name": "flightdeck",
            # UTC: literals in pushed statements mean what they mean to DataFusion
            "options": f"-c default_transaction_read_only=on -c TimeZone=UTC "
                       f"-c statement_timeout={int(self.query_timeout * 1000)}"},
            quote_via=urllib.parse.quote)
        return f"postgresql://{credentials}@{self.host}:{self.port}/{self.database}?{query}"

    def _connect(self):
        try:
            return adbc_postgres.connect(self._uri(), autocommit=True)
        except Exception as error:
            raise Unreachable(f"{self.describe()}: cannot connect: {self.clean_error(error)}") from None

    def _take(self) -> tuple[Any, bool]:
        """A connection, and whether it came from the pool (it may have outlived its server)."""
        try:
            return self._pool.get_nowait(), True
        except queue.Empty:
            return self._connect(), False

    def _drain_pool(self) -> None:
        while True:
            try:
                self._pool.get_nowait().close()
            except queue.Empty:
                return
            except Exception:  # noqa: BLE001 - a connection already broken closes as it can
                continue

    def _give_back(self, connection) -> None:
        try:
            self._pool.put_nowait(connection)
        except queue.Full:
            connection.close()

    def _run(self, sql: str, params: list[Any] | None = None, cancellable: bool = False) -> tuple[Any, Any]:
        retried = False
        while True:
            connection, pooled = self._take()
            cursor = connection.cursor()
            if cancellable:
                on_cancel(cursor.adbc_cancel)
            try:
                cursor.execute(sql, params)
                return connection, cursor
            except Exception as error:
                cursor.close()
                connection.close()
                if pooled and not retried and _connection_lost(error):
                    # The server restarted (or dropped us) since these connections were opened:
                    # the statement only reads, so it is sent again on a new one.
                    self._drain_pool()
                    retried = True
                    continue
                self.stats.record_error()
                raise ConnectorError(f"{self.describe()}: {self.clean_error(error)}") from None

    def _fetch_all(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        connection, cursor = self._run(sql, params)
        try:
            return cursor.fetchall()
        finally:
            cursor.close()
            self._give_back(connection)

    def _comparison_rules(self, table: str) -> dict[str, str]:
        """Text compares exactly only under a C collation; citext, char(n), nondeterministic
        collations and jsonb compare more loosely; json, inet and the like not at all."""
        schema_name, table_name = self._split(table)
        # A domain compares as the type under it (a domain of a domain: followed down), with the
        # collation the column takes from the domain.
        rows = self._fetch_all(
            "SELECT a.attname, (WITH RECURSIVE chain AS ("
            "  SELECT t.typname, t.typtype, t.typbasetype FROM pg_type t WHERE t.oid = a.atttypid"
            "  UNION ALL SELECT b.typname, b.typtype, b.typbasetype FROM pg_type b JOIN chain"
            "  ON b.oid = chain.typbasetype AND chain.typtype = 'd') "
            " SELECT typname FROM chain WHERE typtype <> 'd' LIMIT 1), "
            "coalesce(c.collname, ''), coalesce(c.collisdeterministic, true), "
            "(SELECT datcollate FROM pg_database WHERE datname = current_database()) "
            "FROM pg_attribute a "
            "LEFT JOIN pg_collation c ON c.oid = a.attcollation "
            "WHERE a.attrelid = (quote_ident($1) || '.' || quote_ident($2))::regclass "
            "AND a.attnum > 0 AND NOT a.attisdropped", [schema_name, table_name])
        return {name: _rule(type_name, collation, deterministic, database_collation)
                for name, type_name, collation, deterministic, database_collation in rows}

    def tables(self) -> list[str]:
        rows = self._fetch_all(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2")
        return [f"{schema}.{name}" for schema, name in rows]

    def _split(self, table: str) -> tuple[str, str]:
        schema_name, _, table_name = table.rpartition(".")
        return schema_name or "public", table_name

    def _describe_table(self, table: str) -> tuple[pa.Schema, list[str]]:
        with self._lock:
            if table in self._schemas:
                return self._schemas[table]
        schema_name, table_name = self._split(table)
        rows = self._fetch_all(
            "SELECT column_name, data_type, udt_name, numeric_precision, numeric_scale "
            "FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2 "
            "ORDER BY ordinal_position", [schema_name, table_name])
        if not rows:
            raise ConnectorError(f"{self.describe()}: no table {schema_name}.{table_name}")
        fields, skipped = [], []
        for name, data_type, udt_name, precision, scale in rows:
            arrow_type = arrow_type_for(data_type, udt_name, precision, scale)
            if arrow_type is None:
                skipped.append(f"{name} ({udt_name})")
            else:
                fields.append(pa.field(name, arrow_type))
        described = (pa.schema(fields), skipped)
        with self._lock:
            self._schemas[table] = described
        return described

    def schema(self, table: str) -> pa.Schema:
        return self._describe_table(table)[0]

    def forget_schema(self, table: str, rules: bool = True) -> None:
        super().forget_schema(table, rules)
        with self._lock:
            self._schemas.pop(table, None)

    def unsupported_columns(self, table: str) -> list[str]:
        """Columns left out of the schema because their type has no mapping."""
        return self._describe_table(table)[1]

    def primary_key(self, table: str) -> list[str]:
        schema_name, table_name = self._split(table)
        rows = self._fetch_all(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indisprimary AND i.indrelid = "
            "(quote_ident($1) || '.' || quote_ident($2))::regclass "
            "ORDER BY array_position(i.indkey, a.attnum)", [schema_name, table_name])
        return [row[0] for row in rows]

    def quote_table(self, table: str) -> str:
        return ".".join(fx.quote_double(part) for part in self._split(table))

    def open_stream(self, sql: str, params: list[Any] | None, target: pa.Schema | None) -> pa.RecordBatchReader:
        connection, cursor = self._run(sql, params, cancellable=True)
        reader = cursor.fetch_record_batch()

        def release(finished: bool) -> None:
            if not finished:
                cancel_quietly(cursor.adbc_cancel)  # the server stops the statement too
            cursor.close()
            if finished:
                self._give_back(connection)
            else:
                connection.close()  # abandoned mid-stream: do not reuse

        return self.stream_arrow(sql, reader, target, release)

    # ---- change data capture ----------------------------------------------

    def change_key(self, table: str) -> tuple[str, ...]:
        return table_key(self, table)

    def snapshot(self, table: str) -> tuple[pa.RecordBatchReader, dict[str, Any]]:
        return PostgresChanges(self, table).snapshot()

    def changes(self, table: str, since: dict[str, Any], stop: threading.Event) -> Iterator[ChangeBatch]:
        return PostgresChanges(self, table).stream(since, stop)

    def cleanup(self, table: str) -> None:
        PostgresChanges(self, table).cleanup()

    def backlog(self, table: str) -> int | None:
        return PostgresChanges(self, table).backlog()

    def close(self) -> None:
        self._drain_pool()
