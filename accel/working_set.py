"""The rows a refresh reads from the source: ``refresh_sql`` (or the whole dataset), from a time on.

It runs on a private DataFusion session that knows only this dataset's source, so the
working set's filters, and the time filter of an append or a data window, are pushed into
the source like any scan's (a SQL WHERE, a pyiceberg row filter, API parameters), and the
acceleration's own copy can never be read back by mistake.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
import sqlglot
from datafusion import SessionConfig, SessionContext, SQLOptions
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from federation.budget import REFRESH, reserve, run_reserved
from federation.catalog import CATALOG_NAME
from federation.connectors.base import Connector
from federation.engine import clean_engine_message
from federation.expr import quote_double
from federation.pushdown import table_scans
from federation.safety import UnsafeStatement, check_read_only
from federation.scan import ConnectorDataset


class WorkingSetError(ValueError):
    """refresh_sql cannot define this dataset's working set; the message says why."""


# What a working set's SELECT may hold besides ``*`` and its table: clauses that choose the
# source's rows, none that make values.
_ROW_CHOOSING_CLAUSES = {"expressions", "from_", "where", "order", "limit", "offset", "distinct"}


def _check_rows_only(refresh_sql: str, dataset: str) -> None:
    """Refuse a working set that is anything but rows of the dataset as the source holds them:
    ``SELECT * FROM name`` with WHERE, ORDER BY, LIMIT or DISTINCT. A key allowed to refresh
    may choose the copy's rows, never write its values: every key reading the copy would get
    them (``SELECT id, 'send refunds to ...' AS email FROM orders`` has the dataset's columns)."""
    usage = (f"refresh_sql for {dataset} must be SELECT * FROM {dataset.partition('.')[2]} with only "
             "WHERE, ORDER BY, LIMIT or DISTINCT: it chooses the source's rows, and cannot change their values")
    try:
        tree = sqlglot.parse_one(refresh_sql, read="postgres")
    except (ParseError, TokenError):
        raise WorkingSetError(usage) from None
    if not isinstance(tree, exp.Select) or set(key for key, value in tree.args.items() if value) - _ROW_CHOOSING_CLAUSES:
        raise WorkingSetError(usage)
    [star] = tree.expressions if len(tree.expressions) == 1 else [None]
    if not (isinstance(star, exp.Star) and not any(star.args.values())) and not (
            isinstance(star, exp.Column) and isinstance(star.this, exp.Star)
            and {key for key, value in star.args.items() if value} <= {"this", "table"}):
        raise WorkingSetError(usage)
    table = tree.args["from_"].this
    schema_name, _, table_name = dataset.partition(".")
    if not (isinstance(table, exp.Table) and isinstance(table.this, exp.Identifier)
            and table.name.lower() == table_name.lower() and table.db.lower() in ("", schema_name.lower())
            and not (table.args.get("alias") and table.args["alias"].columns)
            and not any(value for key, value in table.args.items() if key not in ("this", "db", "alias"))):
        raise WorkingSetError(usage)


class WorkingSet:
    def __init__(self, dataset: str, schema: pa.Schema, connector: Connector, table: str,
                 refresh_sql: str | None, time_column: str | None, batch_rows: int = 65_536):
        self.dataset = dataset
        self.schema = schema
        self.time_column = time_column
        self.budget = connector.budget
        schema_name, _, table_name = dataset.partition(".")
        config = (SessionConfig().with_default_catalog_and_schema(CATALOG_NAME, schema_name)
                  .with_create_default_catalog_and_schema(True).with_batch_size(batch_rows))
        self.ctx = SessionContext(config)
        self.ctx.register_dataset(table_name, ConnectorDataset(connector, table, schema))
        self.read_only = (SQLOptions().with_allow_ddl(False).with_allow_dml(False)
                          .with_allow_statements(False))
        self.default_sql = f"SELECT * FROM {quote_double(table_name)}"
        self.check(refresh_sql)
        self.refresh_sql = refresh_sql or self.default_sql

    def check(self, refresh_sql: str | None) -> None:
        """A working set must be a read-only query over this dataset returning its columns."""
        if not refresh_sql:
            return
        try:
            check_read_only(refresh_sql)
            _check_rows_only(refresh_sql, self.dataset)
            names = self.ctx.sql(refresh_sql, options=self.read_only).schema().names
        except UnsafeStatement as error:
            raise WorkingSetError(f"refresh_sql: {error}") from None
        except Exception as error:  # DataFusion raises bare Exceptions
            raise WorkingSetError(f"refresh_sql for {self.dataset}: {clean_engine_message(str(error))}") from None
        if names != self.schema.names:
            raise WorkingSetError(f"refresh_sql for {self.dataset} must return the dataset's columns "
                                  f"{self.schema.names} in order (SELECT * ... WHERE ...), got {names}")

    def read(self, since: Any = None, strictly_after: bool = False,
             refresh_sql: str | None = None) -> pa.RecordBatchReader:
        """Stream the working set; with ``since``, only rows whose time column is at or after it
        (strictly after it with ``strictly_after``)."""
        sql = refresh_sql or self.refresh_sql
        values = None
        if since is not None:
            operator = ">" if strictly_after else ">="
            sql = f"SELECT * FROM ({sql}) AS working_set WHERE {quote_double(self.time_column)} {operator} $1"
            values = {"1": self.time_value(since)}
        frame = self.ctx.sql(sql, options=self.read_only, param_values=values)
        # A refresh waits for its slots of the source's load budget, however long that takes.
        give_back = reserve([self.budget] * len(table_scans(frame.optimized_logical_plan())), REFRESH)
        return run_reserved(give_back, lambda: pa.RecordBatchReader.from_stream(frame))

    def time_value(self, moment: Any) -> pa.Scalar:
        """``moment`` as a scalar of the time column's own type, so the comparison is pushed as is."""
        column_type = self.schema.field(self.time_column).type
        if isinstance(moment, dt.datetime):
            if pa.types.is_timestamp(column_type):
                if column_type.tz is None and moment.tzinfo is not None:
                    moment = moment.astimezone(dt.timezone.utc).replace(tzinfo=None)
                elif column_type.tz is not None and moment.tzinfo is None:
                    moment = moment.replace(tzinfo=dt.timezone.utc)
            elif pa.types.is_date(column_type):
                moment = moment.date()
        return pa.scalar(moment, type=column_type)

