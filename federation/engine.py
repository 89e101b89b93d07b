"""The query engine: DataFusion over the catalog, behind the read-only gate."""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlglot
from datafusion import DataFrame, SessionConfig, SessionContext, SQLOptions
from sqlglot.errors import TokenError
from sqlglot.tokens import TokenType

from federation.catalog import CATALOG_NAME, DEFAULT_SCHEMA, Catalog
from federation.connectors.base import ConnectorError
from federation.pushdown import RemoteQuery, backend_requests, literal_value, whole_query
from federation.safety import UnsafeStatement, check_read_only


class QueryError(Exception):
    """A query could not be planned or run; the message is safe to show a client."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind  # "invalid" (the request), "refused" (not read-only), "unavailable" (a backend)


log = logging.getLogger("flightdeck.engine")


@dataclass
class EngineSettings:
    batch_rows: int = 65_536
    target_partitions: int = os.cpu_count() or 2
    whole_query_pushdown: bool = True


@dataclass
class PlannedQuery:
    sql: str
    frame: DataFrame
    schema: pa.Schema
    remote: RemoteQuery | None = None  # set when the whole query runs on one backend
    explain_rows: list[tuple[str, str]] | None = None  # EXPLAIN: what each backend is sent


class QueryEngine:
    def __init__(self, catalog: Catalog, settings: EngineSettings | None = None):
        self.catalog = catalog
        self.settings = settings or EngineSettings()
        config = (SessionConfig()
                  .with_default_catalog_and_schema(CATALOG_NAME, DEFAULT_SCHEMA)
                  .with_create_default_catalog_and_schema(True)
                  .with_information_schema(True)
                  .with_batch_size(self.settings.batch_rows)
                  .with_target_partitions(self.settings.target_partitions)
                  # Plain string/binary, not the view types: clients (JDBC, older ADBC) expect them.
                  .set("datafusion.execution.parquet.schema_force_view_types", "false"))
        self.ctx = SessionContext(config)
        # The second lock after the gate: the engine itself refuses DDL, DML, COPY and SET.
        self.read_only = (SQLOptions().with_allow_ddl(False).with_allow_dml(False)
                          .with_allow_statements(False))
        catalog.register_into(self.ctx)

    def plan(self, sql: str, params: list[Any] | None = None) -> PlannedQuery:
        try:
            check_read_only(sql)
        except UnsafeStatement as error:
            raise QueryError(str(error), kind="refused") from None
        numbered = number_placeholders(sql)
        values = {str(i + 1): _as_scalar(v) for i, v in enumerate(params or [])}
        try:
            frame = self.ctx.sql(numbered, options=self.read_only, param_values=values or None)
            planned = PlannedQuery(numbered, frame, frame.schema())
        except Exception as error:  # DataFusion raises bare Exceptions
            raise self._query_error(error) from None
        explained = _EXPLAIN.match(numbered)
        if explained:
            planned.explain_rows = self._backend_requests(numbered[explained.end():], values)
        elif self.settings.whole_query_pushdown:
            planned.remote = self._whole_query(frame)
        return planned

    def _backend_requests(self, inner_sql: str, values: dict) -> list[tuple[str, str]]:
        """For EXPLAIN: the statement or request each backend would receive for the query."""
        try:
            inner = self.ctx.sql(inner_sql, options=self.read_only, param_values=values or None)
            remote = self._whole_query(inner) if self.settings.whole_query_pushdown else None
            return backend_requests(inner, self.catalog, remote)
        except Exception:
            log.warning("could not describe backend requests", exc_info=True)
            return []

    def _whole_query(self, frame: DataFrame) -> RemoteQuery | None:
        try:
            return whole_query(frame, self.catalog)
        except Exception:  # never fail a query because it could not be pushed down
            log.warning("whole-query pushdown skipped", exc_info=True)
            return None

    def parameter_schema(self, sql: str) -> pa.Schema:
        """The parameters a statement takes, with the types DataFusion infers for them."""
        numbered = number_placeholders(sql)
        count = placeholder_count(numbered)
        if count == 0:
            return pa.schema([])
        types = {}
        try:
            plan_text = str(self.ctx.sql(numbered, options=self.read_only).logical_plan())
            types = {int(n): _arrow_type(t) for n, t in _PLACEHOLDER_TYPE.findall(plan_text)}
        except Exception:  # planning errors surface when the statement runs
            pass
        return pa.schema([pa.field(f"${i}", types.get(i, pa.null())) for i in range(1, count + 1)])

    def execute(self, planned: PlannedQuery) -> pa.RecordBatchReader:
        if planned.remote is not None:
            try:
                return planned.remote.connector.stream(planned.remote.sql, None, planned.schema)
            except ConnectorError as error:  # e.g. a function the backend lacks: run it here
                log.info("whole-query pushdown failed, running in DataFusion: %s", error)
        try:
            if planned.explain_rows:
                explained = planned.frame.to_arrow_table()
                extra = pa.table([pa.array([r[0] for r in planned.explain_rows]),
                                  pa.array([r[1] for r in planned.explain_rows])], schema=explained.schema)
                return pa.concat_tables([explained, extra]).to_reader()
            return pa.RecordBatchReader.from_stream(planned.frame)
        except Exception as error:
            raise self._query_error(error) from None

    def query(self, sql: str, params: list[Any] | None = None) -> pa.RecordBatchReader:
        return self.execute(self.plan(sql, params))

    def known_row_count(self, planned: PlannedQuery) -> int | None:
        """The result's row count when the plan is a bare scan of a table that knows it."""
        node = planned.frame.optimized_logical_plan()
        fetch = None
        while True:
            variant = node.to_variant()
            kind = type(variant).__name__
            if kind == "Projection":
                node = node.inputs()[0]
            elif kind == "Limit" and fetch is None and not _skip_of(variant):
                fetch = _fetch_of(variant)
                if fetch is None:
                    return None
                node = node.inputs()[0]
            elif kind == "TableScan" and not variant.filters():
                count = self._table_row_count(variant.fqn())
                limits = [n for n in (count, fetch, _literal_int(variant.fetch())) if n is not None]
                return None if count is None else min(limits)
            else:
                return None

    def _table_row_count(self, fqn: tuple) -> int | None:
        *_, schema_name, table_name = (CATALOG_NAME, DEFAULT_SCHEMA, *[p for p in fqn if p])
        dataset = self.catalog.find(schema_name, table_name)
        if dataset is None or dataset.connector is None:
            return None
        return dataset.connector.row_count(dataset.spec.location)

    def _query_error(self, error: Exception) -> QueryError:
        message = clean_engine_message(str(error))
        missing = re.search(r"table '([^']+)' not found", message)
        if missing:
            name = missing.group(1).split(".")
            dataset = self.catalog.find(*name[-2:]) if len(name) >= 2 else None
            if dataset is not None and dataset.state == "unavailable":
                return QueryError(f"dataset {dataset.spec.name} is unavailable: {dataset.error}",
                                  kind="unavailable")
        if "External error" in str(error) or "ConnectorError" in str(error):
            return QueryError(message, kind="unavailable")
        return QueryError(message)


def clean_engine_message(text: str) -> str:
    """DataFusion's message without its wrapping prefixes or Python frames.

    DataFusion chains causes as "outer\ncaused by\ninner": the innermost cause is
    the precise one, so it goes first.
    """
    lines = [line.strip() for line in text.strip().splitlines()]
    lines = [line for line in lines if line and not _is_python_frame(line)]
    causes = [line for line in lines if line != "caused by"]
    text = causes[-1] if len(causes) > 1 and "caused by" in lines else " ".join(causes)
    text = text or "query failed"
    for prefix in ("DataFusion error: ", "External error: ", "Execution error: ",
                   "Error during planning: ", "SQL error: ", "ArrowError(ExternalError("):
        text = text.replace(prefix, "")
    return text.strip() or "query failed"


def _is_python_frame(line: str) -> bool:
    return line.startswith(("Traceback (most recent call last)", 'File "')) or line.startswith("^")


def _placeholder_tokens(sql: str) -> list:
    try:
        return [t for t in sqlglot.tokenize(sql, read="postgres")
                if t.token_type in (TokenType.PLACEHOLDER, TokenType.PARAMETER)]
    except TokenError:
        return []


def number_placeholders(sql: str) -> str:
    """Rewrite JDBC/ADBC-style ``?`` placeholders to DataFusion's ``$1, $2, ...``."""
    question_marks = [t for t in _placeholder_tokens(sql) if t.text == "?"]
    for index, token in reversed(list(enumerate(question_marks, start=1))):
        sql = sql[:token.start] + f"${index}" + sql[token.end + 1:]
    return sql


def placeholder_count(numbered_sql: str) -> int:
    numbers = [int(n) for n in re.findall(r"\$(\d+)", _strip_strings(numbered_sql))]
    return max(numbers, default=0)


def _strip_strings(sql: str) -> str:
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


_EXPLAIN = re.compile(r"^\s*EXPLAIN(\s+VERBOSE)?\s+(?!ANALYZE)", re.IGNORECASE)
_PLACEHOLDER_TYPE = re.compile(
    r'Placeholder \{ id: "\$(\d+)", field: Some\(Field \{ name: "[^"]*", data_type: (.+?), nullable:')
_DECIMAL_TYPE = re.compile(r"Decimal128\((\d+), (-?\d+)\)")
_TIMESTAMP_TYPE = re.compile(r'Timestamp\((\w+), (?:None|Some\("([^"]+)"\))\)')
_TIME_UNITS = {"Second": "s", "Millisecond": "ms", "Microsecond": "us", "Nanosecond": "ns"}
_DATAFUSION_TYPES = {
    "Int8": pa.int8(), "Int16": pa.int16(), "Int32": pa.int32(), "Int64": pa.int64(),
    "UInt8": pa.uint8(), "UInt16": pa.uint16(), "UInt32": pa.uint32(), "UInt64": pa.uint64(),
    "Float32": pa.float32(), "Float64": pa.float64(), "Utf8": pa.string(),
    "LargeUtf8": pa.large_string(), "Utf8View": pa.string(), "Boolean": pa.bool_(),
    "Date32": pa.date32(), "Binary": pa.binary(),
}


def _arrow_type(name: str) -> pa.DataType:
    """Arrow type for DataFusion's debug rendering of a type; null when not recognised."""
    decimal = _DECIMAL_TYPE.fullmatch(name)
    if decimal:
        return pa.decimal128(int(decimal.group(1)), int(decimal.group(2)))
    timestamp = _TIMESTAMP_TYPE.fullmatch(name)
    if timestamp and timestamp.group(1) in _TIME_UNITS:
        return pa.timestamp(_TIME_UNITS[timestamp.group(1)], tz=timestamp.group(2))
    return _DATAFUSION_TYPES.get(name, pa.null())


def _as_scalar(value: Any) -> Any:
    return value if isinstance(value, pa.Scalar) else pa.scalar(value)


def _literal_int(expression) -> int | None:
    if expression is None or isinstance(expression, int):
        return expression
    try:
        return literal_value(expression)
    except Exception:
        return None


def _fetch_of(limit_variant) -> int | None:
    return _literal_int(limit_variant.fetch())


def _skip_of(limit_variant) -> int:
    return _literal_int(limit_variant.skip()) or 0
