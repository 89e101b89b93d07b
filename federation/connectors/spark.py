"""`spark:database.table` — a table of a Spark cluster, through Spark Connect (the optional
extra ``flightdeck[spark]``). Statements run on the cluster's executors; results come back as Arrow.

Spark Connect has no read-only session switch, and ``spark.sql()`` runs a command (DDL, DML,
SET, ...) as soon as it is called. So every statement is checked here, before it leaves, to be
exactly one SELECT; and the deployment should give flightdeck a Spark Connect server whose
catalog user may only read (see the README).
"""
from __future__ import annotations

import datetime as dt
import decimal
import socket
import threading
import urllib.parse
import uuid
from typing import Any

import pyarrow as pa
import sqlglot
from sqlglot import exp
from sqlglot.dialects.spark import Spark

from federation import expr as fx
from federation.cancel import on_cancel
from federation.connectors.base import ConnectorError, SqlConnector, Unreachable, cancel_quietly

try:  # the optional extra: without it, naming a spark: source says what to install
    from pyspark.errors import PySparkException
    from pyspark.sql import SparkSession
    from pyspark.sql import types as spark_types
except ImportError:  # pragma: no cover - exercised only without the extra
    SparkSession = None


class SparkAnsi(Spark):
    """Spark SQL as Spark 4 runs it (ANSI mode, set on every session here): CAST fails on a bad
    value, as in DataFusion. sqlglot's own spark dialect reads CAST as TRY_CAST (Spark 3's
    default), so a statement would not read back as the tree that was validated. Registered
    with sqlglot by subclassing, under the name ``sparkansi``. Its parser stays Spark's own (a
    compiled class: sqlglot's compiled build allows no subclass of it), and a CAST it read as a
    TRY_CAST is made a CAST again: only a TRY_CAST written so is marked ``safe``."""

    def parse(self, sql: str, **opts) -> list[exp.Expression | None]:
        return [None if tree is None else tree.transform(_strict_cast) for tree in super().parse(sql, **opts)]


def _strict_cast(node: exp.Expression) -> exp.Expression:
    if isinstance(node, exp.TryCast) and not node.args.get("safe"):
        return exp.Cast(**node.args)
    return node


def quote_backtick(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def spark_literal(value: object) -> str | None:
    """A filter value as Spark SQL text: doubles and decimals carry their type suffix (an
    unsuffixed ``0.5`` is a DECIMAL in Spark), the rest as ANSI literals."""
    if isinstance(value, float) and not isinstance(value, bool):
        text = fx.standard_literal(value)
        return None if text is None else text + "D"
    if isinstance(value, decimal.Decimal):
        return None if not value.is_finite() else f"{value:f}BD"
    if isinstance(value, dt.datetime):
        return None  # Spark's TIMESTAMP follows the session time zone: kept local
    return fx.standard_literal(value)


def arrow_type_for(data_type) -> pa.DataType | None:
    """Arrow type of a Spark SQL type, or None when flightdeck cannot read it."""
    simple = {
        spark_types.ByteType: pa.int8(), spark_types.ShortType: pa.int16(),
        spark_types.IntegerType: pa.int32(), spark_types.LongType: pa.int64(),
        spark_types.FloatType: pa.float32(), spark_types.DoubleType: pa.float64(),
        spark_types.BooleanType: pa.bool_(), spark_types.StringType: pa.string(),
        spark_types.DateType: pa.date32(), spark_types.BinaryType: pa.binary(),
        spark_types.TimestampType: pa.timestamp("us", tz="UTC"),
        spark_types.TimestampNTZType: pa.timestamp("us"),
    }
    if isinstance(data_type, spark_types.DecimalType):
        return pa.decimal128(data_type.precision, data_type.scale)
    if isinstance(data_type, spark_types.ArrayType):
        element = arrow_type_for(data_type.elementType)
        # Spark names the element "element"; Arrow's type equality ignores the name, DataFusion's does not
        return None if element is None else pa.list_(pa.field("element", element))
    for spark_type, arrow_type in simple.items():
        if type(data_type) is spark_type:
            return arrow_type
    if isinstance(data_type, (spark_types.CharType, spark_types.VarcharType)):
        return pa.string()
    return None


def _loose(data_type) -> bool:
    """Text whose = may match more than DataFusion's: CHAR(n) pads, non-binary collations
    ignore case or accents."""
    if isinstance(data_type, spark_types.CharType):
        return True
    collation = getattr(data_type, "collation", "UTF8_BINARY") if isinstance(data_type, spark_types.StringType) else None
    return collation is not None and collation.upper() != "UTF8_BINARY"


def check_select(sql: str) -> None:
    """Only one plain query may leave: Spark runs any command the moment ``sql()`` is called."""
    try:
        statements = [s for s in sqlglot.parse(sql, read=SparkConnector.dialect) if s is not None]
    except sqlglot.errors.ParseError:
        raise ConnectorError("spark: not sent: the statement does not parse as Spark SQL") from None
    if len(statements) != 1 or not isinstance(statements[0], (exp.Select, exp.Union)):
        raise ConnectorError("spark: not sent: only a single SELECT goes to Spark")


class SparkConnector(SqlConnector):
    kind = "spark"
    dialect = "sparkansi"  # SparkAnsi above
    renderer = fx.SqlRenderer(quote_backtick, spark_literal, "qmark")
    secret_params = ("spark_token",)

    def __init__(self, params: dict[str, Any], base_dir):
        super().__init__(params, base_dir)
        if SparkSession is None:
            raise ConnectorError("spark: the spark extra is not installed (pip install 'flightdeck[spark]')")
        remote = str(params.get("spark_remote", ""))
        parsed = urllib.parse.urlparse(remote)
        if parsed.scheme != "sc" or not parsed.hostname:
            raise ConnectorError("spark: params.spark_remote (sc://host:port) is required")
        self.host, self.port = parsed.hostname, parsed.port or 15002
        self.connect_timeout = float(params.get("connect_timeout", 10))
        self.query_timeout = float(params.get("query_timeout", 300))
        self._url = f"sc://{self.host}:{self.port}/;user_agent=flightdeck"
        if params.get("spark_token"):  # Spark Connect sends a token only over TLS
            self._url += f";token={params['spark_token']}"
        if str(params.get("spark_use_ssl", "")).lower() in ("true", "1"):
            self._url += ";use_ssl=true"
        self._session = None
        self._lock = threading.Lock()
        self._types: dict[str, Any] = {}

    @property
    def compute_context(self) -> str:
        return f"spark://{self.host}:{self.port}"

    def describe(self) -> str:
        return f"spark ({self.host}:{self.port})"

    def session(self):
        """One Spark Connect session per connector (its client is safe to share between threads)."""
        with self._lock:
            if self._session is None:
                self._session = self._connect()
            return self._session

    def _connect(self):
        try:  # gRPC would retry for minutes: say at once when nothing listens
            socket.create_connection((self.host, self.port), timeout=self.connect_timeout).close()
        except OSError as error:
            raise Unreachable(f"{self.describe()}: cannot connect: {error.strerror or error}") from None
        try:
            session = SparkSession.builder.remote(self._url).create()
            # UTC: date and time literals mean what they mean to DataFusion; ANSI: errors
            # (overflow, bad casts) as in DataFusion, not NULLs
            session.conf.set("spark.sql.session.timeZone", "UTC")
            session.conf.set("spark.sql.ansi.enabled", "true")
            return session
        except Exception as error:
            raise Unreachable(f"{self.describe()}: cannot connect: {self.clean_error(error)}") from None

    def _split(self, table: str) -> tuple[str, str]:
        database, _, name = table.rpartition(".")
        return database or "default", name

    def quote_table(self, table: str) -> str:
        return ".".join(quote_backtick(part) for part in self._split(table))

    def tables(self) -> list[str]:
        catalog = self.session().catalog
        try:
            return sorted(f"{database.name}.{table.name}" for database in catalog.listDatabases()
                          for table in catalog.listTables(database.name) if not table.isTemporary)
        except Exception as error:
            raise ConnectorError(f"{self.describe()}: {self.clean_error(error)}") from None

    def _spark_schema(self, table: str):
        if table not in self._types:
            try:  # analysis only: no job runs
                self._types[table] = self.session().table(self.quote_table(table)).schema
            except Exception as error:
                raise ConnectorError(f"{self.describe()}: no table {table}: {self.clean_error(error)}") from None
        return self._types[table]

    def schema(self, table: str) -> pa.Schema:
        fields = []
        for field in self._spark_schema(table).fields:
            arrow_type = arrow_type_for(field.dataType)
            if arrow_type is not None:
                fields.append(pa.field(field.name, arrow_type))
        return pa.schema(fields)

    def unsupported_columns(self, table: str) -> list[str]:
        return [f"{f.name} ({f.dataType.simpleString()})" for f in self._spark_schema(table).fields
                if arrow_type_for(f.dataType) is None]

    def _comparison_rules(self, table: str) -> dict[str, str]:
        return {f.name: fx.LOOSE for f in self._spark_schema(table).fields if _loose(f.dataType)}

    def open_stream(self, sql: str, params: list[Any] | None, target: pa.Schema | None) -> pa.RecordBatchReader:
        check_select(sql)
        session = self.session()
        tag = f"flightdeck-{uuid.uuid4().hex}"
        stop = lambda: cancel_quietly(lambda: session.interruptTag(tag))
        on_cancel(stop)
        timed_out = threading.Event()
        timer = threading.Timer(self.query_timeout, lambda: (timed_out.set(), stop()))
        session.addTag(tag)  # tags are per thread: this statement's operations only
        timer.start()
        try:
            table = session.sql(sql, args=list(params) if params else None).toArrow()
        except Exception as error:
            self.stats.record_error()
            reason = f"query timed out after {self.query_timeout:g} s" if timed_out.is_set() else self._spark_error(error)
            raise ConnectorError(f"{self.describe()}: {reason}") from None
        finally:
            timer.cancel()
            session.removeTag(tag)
        # toArrow() holds the whole result: Spark Connect's Arrow batches arrive in one call
        reader = pa.RecordBatchReader.from_batches(table.schema, table.to_batches())
        return self.stream_arrow(sql, reader, target, lambda finished: None)

    def _spark_error(self, error: Exception) -> str:
        if isinstance(error, PySparkException) and getattr(error, "getCondition", None):
            condition = error.getCondition()
            message = self.clean_error(error)
            return message if condition is None or condition in message else f"[{condition}] {message}"
        return self.clean_error(error)

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                try:
                    self._session.stop()
                except Exception:
                    pass
                self._session = None
