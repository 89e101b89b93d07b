"""The connector contract every backend implements."""
from __future__ import annotations

import logging
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import pyarrow as pa

from federation import expr as fx
from federation.arrow_expr import to_arrow
from federation.budget import UNLIMITED, BudgetExceeded, LoadBudget
from federation.cancel import Stopped
from federation.connectors.typing import conform_batch
from federation.safety import UnsafeStatement, check_backend_select
from federation.snapshots import Pin

log = logging.getLogger("flightdeck.connectors")
DEFAULT_BATCH_ROWS = 65_536
MIN_SECRET_WORD = 8  # a secret's word this long is masked alone too (a header's token)


class ConnectorError(Exception):
    """A backend failed; the message names the dataset source, never a secret."""


class Unreachable(ConnectorError):
    """No connection to the source could be made: running the query another way would only
    wait for it again."""


def shown_url(url: str) -> str:
    """A URL as a message or a status shows it: without the user and password it may carry, nor
    its query string, which may hold a token (``?api_key=...``)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2], query="", fragment=""))


def first_line(error: Exception) -> str:
    """An error's first line: the precise part, without a driver's or engine's detail."""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def cancel_quietly(cancel: Callable[[], None]) -> None:
    """Stop a backend statement that may already have ended."""
    try:
        cancel()
    except Exception:
        pass


@dataclass
class SourceStats:
    """Counters for what one backend was asked and sent back."""
    queries: int = 0
    rows: int = 0
    bytes: int = 0
    errors: int = 0
    seconds: float = 0.0
    last_request: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record_request(self, request: str) -> None:
        with self._lock:
            self.queries += 1
            self.last_request = request

    def record_batch(self, batch: pa.RecordBatch, seconds: float) -> None:
        with self._lock:
            self.rows += batch.num_rows
            self.bytes += batch.nbytes
            self.seconds += seconds

    def record_error(self) -> None:
        with self._lock:
            self.errors += 1

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"queries": self.queries, "rows": self.rows, "bytes": self.bytes,
                    "errors": self.errors, "seconds": round(self.seconds, 6),
                    "last_request": self.last_request}


class Connector(ABC):
    """One backend connection configuration; offers tables and scans them read-only."""

    kind: ClassVar[str]
    secret_params: ClassVar[tuple[str, ...]] = ()  # params never to appear in a message
    # A database whose tables another client may alter at any time, cheaply described again:
    # its datasets read where they are have their columns checked now and then (``Catalog``).
    schema_may_change: ClassVar[bool] = False
    streams_counted: ClassVar[bool] = False  # its streams already quote their errors as the source's

    def __init__(self, params: dict[str, Any], base_dir: Path):
        self.params = params
        self.base_dir = base_dir
        self.stats = SourceStats()
        self.budget: LoadBudget = UNLIMITED  # the source's, shared with its other connectors (ConnectorPool)
        self._known_schemas: dict[str, pa.Schema] = {}
        # A local store whose writers hold this around each commit: its scans can be pinned to
        # one moment for a query reading it more than once (``pin``, ``federation.snapshots``).
        self.commit_lock: threading.Lock | None = None

    def pin(self, table: str) -> Pin:
        """A read of ``table`` as it stands now, for one scan to use later; called with
        ``commit_lock`` held, by connectors that have one."""
        raise NotImplementedError(f"{self.kind} has no commits to pin a read between")

    @property
    def store(self) -> "Connector":
        """The connector whose data this one's scans read (a pushed part: its backend)."""
        return self

    @abstractmethod
    def tables(self) -> list[str]:
        """The tables this backend offers, as the names `from:` uses."""

    @abstractmethod
    def schema(self, table: str) -> pa.Schema:
        """The Arrow schema of one table."""

    def scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
             limit: int | None) -> pa.RecordBatchReader:
        """Stream rows: only ``columns`` (None = all), pre-filtered by what of ``filters``
        the backend can take (the caller re-applies the exact filter), at most ``limit``
        (honoured only when every filter was applied: cutting earlier would lose rows).
        The stream holds a slot of the source's load budget until it ends or is closed."""
        return self.budget.hold(lambda: self.opened(lambda: self.open_scan(table, columns, filters, limit)))

    def opened(self, open_stream: Callable[[], pa.RecordBatchReader]) -> pa.RecordBatchReader:
        """``open_stream()``, any failure of it the source's (ConnectorError): a driver meeting
        an answer it cannot read raises its own errors (a struct.error from a malformed MySQL
        greeting, http.client's BadStatusLine), which are not the server's failure."""
        try:
            reader = open_stream()
        except Exception as error:
            raise self._source_error(error) from None
        if self.streams_counted:
            return reader
        return pa.RecordBatchReader.from_batches(reader.schema, self._read_as_source(reader))

    def _read_as_source(self, reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
        try:
            yield from reader
        except Exception as error:
            raise self._source_error(error) from None
        finally:
            reader.close()

    def _source_error(self, error: Exception) -> Exception:
        if isinstance(error, (ConnectorError, Stopped, BudgetExceeded)):
            return error
        self.stats.record_error()
        log.warning("%s failed: %s: %s", self.describe(), type(error).__name__, self.clean_error(error))
        return ConnectorError(f"{self.describe()}: {type(error).__name__}: {self.clean_error(error)}")

    @abstractmethod
    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
                  limit: int | None) -> pa.RecordBatchReader:
        """``scan`` as the backend does it (the budget is the base class's business)."""

    @property
    def source_identity(self) -> str:
        """Equal for two connectors exactly when they load the same backend (one load budget)."""
        return f"{self.kind}:{self.describe()}"

    def cached_schema(self, table: str) -> pa.Schema:
        """``schema(table)``, asked of the backend once: scans and planning need it every query."""
        if table not in self._known_schemas:
            self._known_schemas[table] = self.schema(table)
        return self._known_schemas[table]

    def forget_schema(self, table: str, rules: bool = True) -> None:
        """Describe ``table`` afresh next time (its schema may have changed); with ``rules``,
        ask again how it compares too (``comparison_rules``)."""
        self._known_schemas.pop(table, None)

    def rows_reader(self, rows: list[dict], schema: pa.Schema, columns: list[str] | None,
                    filters: list[fx.Expr], limit: int | None,
                    batch_rows: int = DEFAULT_BATCH_ROWS) -> pa.RecordBatchReader:
        """Rows already in memory as a scan's result: filtered exactly, limited, projected."""
        data = pa.Table.from_pylist(rows, schema=schema)
        if filters:
            data = data.filter(to_arrow(fx.And(tuple(filters))))
        if limit is not None:
            data = data.slice(0, limit)
        if columns is not None:
            data = data.select(columns)
        batches = data.to_batches(max_chunksize=batch_rows)
        for batch in batches:
            self.stats.record_batch(batch, 0.0)
        return pa.RecordBatchReader.from_batches(data.schema, batches)

    def primary_key(self, table: str) -> list[str]:
        return []

    def unsupported_columns(self, table: str) -> list[str]:
        """Columns left out of ``schema(table)`` because their type has no Arrow mapping."""
        return []

    def filters_exact(self, table: str, filters: list[fx.Expr]) -> bool:
        """True when ``scan`` applies ``filters`` exactly as the planner would (then the
        planner need not filter again, which also keeps its own NaN and NULL semantics)."""
        return False

    def row_count(self, table: str) -> int | None:
        """The table's row count when it is cheap to know, else None."""
        return None

    def register_native(self, ctx: Any, name: str, table: str) -> bool:
        """Register ``table`` in DataFusion with a native reader; False if there is none."""
        return False

    def describe(self) -> str:
        """Where the data comes from, for messages: no credentials."""
        return self.kind

    def clean_error(self, error: Exception) -> str:
        """A backend error for a message: its first line, secrets masked."""
        return self.mask_secrets(first_line(error))

    def mask_secrets(self, text: str) -> str:
        for name in self.secret_params:
            secret = str(self.params.get(name) or "")
            # A header's value is quoted whole or by its token alone ("Bearer <token>").
            for part in sorted({secret, *(w for w in secret.split() if len(w) >= MIN_SECRET_WORD)}, key=len,
                               reverse=True):
                if part:
                    text = text.replace(part, "***")
        return text

    def close(self) -> None:
        pass

    def resolve_path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    def required_database_file(self, param: str) -> Path:
        """The existing database file named by ``params[param]``."""
        if param not in self.params:
            raise ConnectorError(f"{self.kind}: params.{param} (the database file) is required")
        path = self.resolve_path(str(self.params[param]))
        if not path.exists():
            # The file's name only: the message reaches every key the dataset is granted to.
            raise ConnectorError(f"{self.kind}: database file {path.name} (params.{param}) does not exist")
        return path


class CursorLease:
    """One statement's hold on a cursor (a DuckDB cursor, a SQLite connection: anything with
    ``interrupt`` and ``close``). A cancel interrupts the cursor only while the statement holds
    it (a cursor handed back may already run another client's statement); handed back, it is
    closed unless ``keep`` takes it for a later statement, which it may only when the statement
    ran to its end uninterrupted."""

    def __init__(self, cursor: Any, keep: Callable[[Any], bool] | None = None):
        self.cursor = cursor
        self._keep = keep
        self._lock = threading.Lock()
        self._held = True
        self._interrupted = False

    def interrupt(self) -> None:
        with self._lock:
            if self._held:
                self._interrupted = True
                self.cursor.interrupt()

    def give_back(self, finished: bool) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
            kept = finished and not self._interrupted and self._keep is not None and self._keep(self.cursor)
        if not kept:
            self.cursor.close()


class SqlConnector(Connector):
    """A backend that speaks SQL: scans become SELECTs in the backend's dialect."""

    streams_counted = True  # its streams go through ``counted`` or ``stream_arrow``
    dialect: ClassVar[str]
    renderer: ClassVar[fx.SqlRenderer] = fx.SqlRenderer(fx.quote_double, fx.standard_literal)

    def __init__(self, params: dict[str, Any], base_dir: Path):
        super().__init__(params, base_dir)
        self._known_rules: dict[str, dict[str, str]] = {}

    def forget_schema(self, table: str, rules: bool = True) -> None:
        super().forget_schema(table, rules)
        if rules:
            self._known_rules.pop(table, None)

    @property
    @abstractmethod
    def compute_context(self) -> str:
        """Equal for two datasets exactly when one query may join them on the backend."""

    @property
    def source_identity(self) -> str:
        return self.compute_context

    def stream(self, sql: str, params: list[Any] | None, target: pa.Schema | None) -> pa.RecordBatchReader:
        """Run one read statement and stream its result, as ``target`` when given, on a slot of
        the source's load budget held until the stream ends or is closed. A backend gets one
        plain SELECT and nothing else, whatever its session would allow."""
        try:
            check_backend_select(sql, self.dialect, self.renderer.param_style)
        except UnsafeStatement as error:
            self.stats.record_error()
            raise ConnectorError(f"{self.describe()}: read-only: {error}") from None
        return self.budget.hold(lambda: self.opened(lambda: self.open_stream(sql, params, target)))

    @abstractmethod
    def open_stream(self, sql: str, params: list[Any] | None, target: pa.Schema | None) -> pa.RecordBatchReader:
        """``stream`` as the backend does it (the budget is the base class's business)."""

    def execute_sql(self, sql: str, params: list[Any] | None = None) -> pa.RecordBatchReader:
        """Run one read statement on the backend and stream its result in the backend's types."""
        return self.stream(sql, params, None)

    def quote_table(self, table: str) -> str:
        return ".".join(self.renderer.quote_identifier(part) for part in table.split("."))

    def remote_column(self, name: str) -> str:
        """A column's name in the backend, when it differs from the dataset's (e.g. case)."""
        return name

    def comparison_rules(self, table: str) -> dict[str, str]:
        """Per column, how faithfully the backend compares it (expr.EXACT when absent); asked of
        the backend once per table, since every scan and every plan consults it."""
        if table not in self._known_rules:
            self._known_rules[table] = self._comparison_rules(table)
        return self._known_rules[table]

    def _comparison_rules(self, table: str) -> dict[str, str]:
        return {}

    def loose_columns(self, table: str, of_type: Callable[[pa.DataType], bool] = pa.types.is_string
                      ) -> dict[str, str]:
        """LOOSE for every column of a type whose comparison the backend may widen
        (text under a collation that ignores case or padding)."""
        return {f.name: fx.LOOSE for f in self.cached_schema(table) if of_type(f.type)}

    def filters_exact(self, table: str, filters: list[fx.Expr]) -> bool:
        return self.renderer.render_where(filters, self.comparison_rules(table))[2]

    def select_sql(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
                   limit: int | None) -> tuple[str, list[Any]]:
        """The scan's SELECT and the values it binds (text values never enter its text)."""
        quote = self.renderer.quote_identifier
        projection = "*" if columns is None else ", ".join(quote(c) for c in columns)
        sql = f"SELECT {projection} FROM {self.quote_table(table)}"
        bindings = self.renderer.bindings()
        where, _, exact = self.renderer.render_where(filters, self.comparison_rules(table), bindings)
        if where:
            sql += f" WHERE {where}"
        if limit is not None and exact:  # a limit before the exact filter would lose rows
            sql += f" LIMIT {int(limit)}"
        return sql, bindings.values

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
                  limit: int | None) -> pa.RecordBatchReader:
        schema = self.cached_schema(table)
        if columns is None:
            columns = schema.names  # never SELECT *: columns of unsupported types stay out
        if columns == []:
            columns = schema.names[:1]  # a row count: fetch the narrowest thing there is
        target = pa.schema([schema.field(c) for c in columns])
        sql, params = self.select_sql(table, columns, filters, limit)
        return self.stream_select(sql, params, target)

    def stream_select(self, sql: str, params: list[Any], target: pa.Schema) -> pa.RecordBatchReader:
        """Stream a generated SELECT whose result has the ``target`` schema (within a scan,
        which holds the budget's slot)."""
        return self.open_stream(sql, params, target)

    def counted(self, schema: pa.Schema, sql: str,
                batches: Callable[[], Iterator[pa.RecordBatch]]) -> pa.RecordBatchReader:
        """Wrap a backend batch stream so every request, batch and error is counted."""
        self.stats.record_request(sql)
        stats, source = self.stats, self.describe()

        def generate() -> Iterator[pa.RecordBatch]:
            iterator = batches()
            while True:
                started = time.perf_counter()
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                except Exception as error:  # as any backend error: its first line, secrets masked
                    stats.record_error()
                    raise ConnectorError(f"{source}: {self.clean_error(error)}") from None
                stats.record_batch(batch, time.perf_counter() - started)
                yield batch

        return pa.RecordBatchReader.from_batches(schema, generate())

    def stream_arrow(self, sql: str, reader: pa.RecordBatchReader, target: pa.Schema | None,
                     release: Callable[[bool], None]) -> pa.RecordBatchReader:
        """A backend's Arrow stream, counted and conformed to ``target``; ``release(finished)``
        frees the backend's cursor or connection when the stream ends or is abandoned."""
        schema = target if target is not None else reader.schema

        def batches() -> Iterator[pa.RecordBatch]:
            finished = False
            try:
                for batch in reader:
                    yield conform_batch(batch, schema) if target is not None else batch
                finished = True
            finally:
                release(finished)

        return self.counted(schema, sql, batches)


def first_rows(reader: pa.RecordBatchReader, limit: int | None) -> pa.RecordBatchReader:
    """The reader cut after ``limit`` rows (a connector honouring a LIMIT it was handed)."""
    if limit is None:
        return reader

    def batches() -> Iterator[pa.RecordBatch]:
        remaining = limit
        for batch in reader:
            if remaining <= 0:
                return
            yield batch.slice(0, remaining)
            remaining -= batch.num_rows
    return pa.RecordBatchReader.from_batches(reader.schema, batches())
