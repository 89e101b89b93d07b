"""Whole-query pushdown: a query whose every table lives on one SQL backend runs there whole.

DataFusion plans the query; when the optimized plan only reads one SQL backend and only
uses constructs whose meaning is the same there, the plan is unparsed into that backend's
dialect and sent as one statement (an aggregate then returns one row per group instead of
the table). Everything else runs in DataFusion with projection and filters pushed per scan.

What makes a query ineligible (each is a way the backend could answer differently):
semi/anti/outer joins (NOTES: the unparser drops filters there), dialects other than
PostgreSQL, DuckDB, SQLite, MySQL/MariaDB, Snowflake and Spark (on Spark, no TIMESTAMP column: it
follows the session time zone; ORDER BY is written with explicit NULLS LAST/FIRST; SQLite's LIKE ignores case and its decimals are
binary floats, so neither is pushed there; on MySQL no text column (collations ignore case and
trailing spaces), ORDER BY (NULLs sort first), avg (a rounded decimal), LIKE, TIMESTAMP columns
(session time zone) or backslashes in strings), functions outside a short allow-list (``lower``/``upper`` differ on some Unicode),
division (decimal scale and DuckDB's float division differ), ``avg`` over decimals, casts
other than widening ones (PostgreSQL and DuckDB round float→int, DataFusion truncates;
timestamp→text formats differ), LIKE patterns with a backslash (DuckDB has no default escape),
ILIKE (DataFusion folds case as Unicode does: ``'ſ' ILIKE 's'``; backends lower both sides),
any column the backend does not compare exactly (its comparison rule is not EXACT: text under
a non-C collation, citext, char(n), SQLite dates kept as text, ...), and ``*`` or a column count that differs from
the plan's (the unparser drops duplicate names).

The same guards decide about the parts of a query that reads several backends: see
``federation.subplan``, which offers each single-backend part to ``whole_query``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Mapping, Protocol

import pyarrow as pa
import sqlglot
from datafusion import DataFrame, SessionContext, unparser
from sqlglot import exp

from federation import expr as fx
from federation.backend_statement import (StatementRefused, bound_statement, log_refusal_once, quoted_name,
                                         table_key)
from federation.catalog import DEFAULT_SCHEMA, Catalog, Dataset
from federation.connectors.base import SqlConnector
from federation.optimized import optimized_plan

log = logging.getLogger("flightdeck.pushdown")

SAFE_NODES = {"Projection", "Filter", "Aggregate", "Sort", "Limit", "TableScan", "SubqueryAlias",
              "Join", "Distinct"}
DIALECTS = {"postgres": unparser.Dialect.postgres, "duckdb": unparser.Dialect.duckdb,
            "sqlite": unparser.Dialect.sqlite, "mysql": unparser.Dialect.mysql,
            "snowflake": unparser.Dialect.postgres,  # no Snowflake or Spark unparser: standard SQL, then sqlglot
            "sparkansi": unparser.Dialect.postgres}
PARSE_AS = {"snowflake": "postgres", "sparkansi": "postgres"}  # how the unparsed SQL of a dialect is read back
SAFE_FUNCTIONS = (exp.Count, exp.Sum, exp.Min, exp.Max, exp.Avg, exp.Coalesce, exp.Abs, exp.Cast,
                  exp.Case, exp.If, exp.Connector)  # Connector: AND / OR
FLOAT_TYPES = {exp.DataType.Type.DOUBLE, exp.DataType.Type.FLOAT}
INTEGER_TYPES = {exp.DataType.Type.BIGINT, exp.DataType.Type.INT, exp.DataType.Type.SMALLINT}


@dataclass
class RemoteQuery:
    connector: SqlConnector
    sql: str
    params: list = field(default_factory=list)  # bound by the driver, in placeholder order

    def describe_request(self, with_values: bool = True) -> str:
        """The statement as EXPLAIN shows it, with the values it binds (or only their count)."""
        if not self.params:
            return self.sql
        if with_values:
            return f"{self.sql}  -- parameters: {self.params!r}"
        return f"{self.sql}  -- {len(self.params)} bound value{'s' if len(self.params) != 1 else ''}"

    def bound(self, values: Mapping[str, object]) -> "RemoteQuery":
        """The statement with each ParameterSlot among its params replaced by that parameter's
        value from ``values`` (by number): one statement written once, bound for each call."""
        params = [_python(values[p.number]) if isinstance(p, ParameterSlot) else p for p in self.params]
        return RemoteQuery(self.connector, self.sql, params)


@dataclass(frozen=True)
class ParameterSlot:
    """Stands for the value of parameter ``$number`` in a statement written for any values:
    passed to ``whole_query`` in place of the values, it lands where the driver binds it."""
    number: str


def result_schema(ctx: SessionContext, frame: DataFrame) -> pa.Schema:
    """The schema of the rows ``frame`` (of ``ctx``) yields. ``frame.schema()`` is the plan's
    before types are coerced: a CASE there has its first branch's type (``CASE WHEN b THEN 0
    ELSE d END`` is an integer where the result is d's decimal), and rows cast to it are rounded."""
    try:
        return ctx.create_dataframe_from_logical_plan(optimized_plan(frame)).schema()
    except Exception:  # a placeholder whose type only a bound value gives
        return frame.schema()


def parameter_slots(count: int) -> dict[str, ParameterSlot]:
    return {str(n): ParameterSlot(str(n)) for n in range(1, count + 1)}


def _python(value: object) -> object:
    return value.as_py() if hasattr(value, "as_py") else value


def whole_query(frame: DataFrame, catalog: Catalog, values: Mapping[str, object] | None = None
                ) -> RemoteQuery | None:
    """The statement to send when the whole query can run on one backend, else None.
    ``frame`` may hold unbound ``$n`` placeholders: ``values`` (by number) are then bound by
    the backend's driver, so they never pass through the unparser."""
    plan = optimized_plan(frame)
    scans: list[tuple] = []
    if not _safe_plan(plan, scans) or not scans:
        return None
    datasets = [catalog.scanned(fqn) for fqn in scans]
    backends = [sql_backend(d, names_checked=True) for d in datasets]
    connector = backends[0]
    if connector is None or any(b is not connector for b in backends):
        return None
    try:
        sql = unparser.Unparser(DIALECTS[connector.dialect]()).plan_to_sql(plan)
        tree = sqlglot.parse_one(sql, read=PARSE_AS.get(connector.dialect, connector.dialect))
    except Exception as error:  # the unparser or the parser cannot express it: run locally
        log.debug("no whole-query pushdown: %s", error)
        return None
    if any(d.columns_restricted for d in datasets) and not _names_only_visible(tree, datasets):
        return None
    if not _same_meaning(tree, connector, datasets) or not _same_columns(tree, frame):
        return None
    if any(pa.types.is_duration(field.type) for field in frame.schema()):
        return None  # a timestamp minus a timestamp: an interval to the backends
    if not _in_plan_order(tree, plan, frame.schema().names):
        return None
    remote_tables = _point_at_remote_tables(tree, catalog, connector)
    _point_at_remote_columns(tree, connector)
    try:
        statement = bound_statement(tree, connector.dialect, connector.renderer.param_style, plan,
                                    dict(values) if values else None, remote_tables,
                                    remote_columns=_remote_columns(datasets, connector))
    except StatementRefused as refused:
        log_refusal_once(str(refused))
        return None
    return RemoteQuery(connector, statement.sql, statement.params)


def sql_backend(dataset: Dataset | None, names_checked: bool = False) -> SqlConnector | None:
    """The connector a dataset is read through when statements may be sent to it: SQL, in a
    dialect whose differences from DataFusion are known (see above). A dataset with hidden
    columns only for a caller that proves its statement names visible columns alone
    (``names_checked``); a masked one never (a filter would see the raw values)."""
    if (dataset is None or dataset.state != "ready" or dataset.masks is not None
            or (dataset.columns_restricted and not names_checked)
            or not isinstance(dataset.connector, SqlConnector)):
        return None
    return dataset.connector if dataset.connector.dialect in DIALECTS else None


def _names_only_visible(tree: exp.Expression, datasets: list[Dataset]) -> bool:
    """The statement, written from a plan over the visible columns, names no other: no star
    (the backend would expand it to every column) but ``count(*)``'s, and each column it
    references visible (a table's name as a column is its whole row on some backends)."""
    visible = {name for dataset in datasets for name in dataset.arrow_schema.names}
    stars_counted = all(isinstance(star.parent, exp.Count) for star in tree.find_all(exp.Star))
    return stars_counted and _columns_in(tree) <= visible


def _safe_plan(node, scans: list[tuple]) -> bool:
    variant = node.to_variant()
    kind = type(variant).__name__
    if kind not in SAFE_NODES:
        return False
    if kind == "Join" and str(variant.join_type()) != "Inner":
        return False
    if kind == "TableScan":
        scans.append(tuple(p for p in variant.fqn() if p))
    return all(_safe_plan(child, scans) for child in node.inputs())


def _same_meaning(tree: exp.Expression, connector: SqlConnector, datasets: list[Dataset]) -> bool:
    types = {f.name: f.type for d in datasets for f in d.arrow_schema}
    decimal_columns = {name for name, t in types.items() if pa.types.is_decimal(t)}
    rules = [connector.comparison_rules(d.table) for d in datasets]
    inexact = {name for rule in rules for name, kind in rule.items() if kind != fx.EXACT}
    if connector.dialect == "sqlite":
        inexact |= decimal_columns  # SQLite keeps decimals as binary floats
    if _columns_in(tree) & inexact:
        return False
    if connector.dialect == "mysql" and not _same_on_mysql(tree, types):
        return False
    if connector.dialect == "snowflake" and not _same_on_snowflake(tree, types):
        return False
    if connector.dialect == "sparkansi" and _columns_in(tree) & _timestamp_columns(types):
        return False  # Spark's TIMESTAMP follows the session time zone
    for node in tree.walk():
        if isinstance(node, (exp.Div, exp.IntDiv)):
            return False
        if isinstance(node, exp.Func) and not isinstance(node, SAFE_FUNCTIONS):
            return False
        if isinstance(node, exp.Avg) and _columns_in(node) & decimal_columns:
            return False
        if isinstance(node, exp.Cast) and not _widening_cast(node, types):
            return False
        if isinstance(node, exp.Like) and (connector.dialect == "sqlite" or "\\" in node.expression.sql()):
            return False  # SQLite's LIKE ignores case; DuckDB's has no default escape
        if isinstance(node, exp.ILike):
            return False  # DataFusion folds case as Unicode does (ſ is s); backends lower both sides
    return True


def _same_on_snowflake(tree: exp.Expression, types: dict[str, pa.DataType]) -> bool:
    """Snowflake: timestamps carry its own NTZ/LTZ/TZ semantics, and LIKE has no default escape."""
    if any(isinstance(node, (exp.Like, exp.ILike)) for node in tree.walk()):
        return False
    return not (_columns_in(tree) & _timestamp_columns(types))


def _same_on_mysql(tree: exp.Expression, types: dict[str, pa.DataType]) -> bool:
    """What MySQL/MariaDB computes differently (text is already out: its collations are loose):
    ORDER BY puts NULLs first, avg() returns a decimal rounded to 4 more digits, LIKE ignores
    case, TIMESTAMP columns follow the session time zone, and backslashes in strings escape."""
    for node in tree.walk():
        if isinstance(node, (exp.Order, exp.Avg, exp.Like, exp.ILike)):
            return False
        if isinstance(node, exp.Literal) and node.is_string and "\\" in node.this:
            return False
    return not (_columns_in(tree) & _timestamp_columns(types))


def _timestamp_columns(types: dict[str, pa.DataType]) -> set[str]:
    return {name for name, t in types.items() if pa.types.is_timestamp(t)}


def _widening_cast(node: exp.Cast, types: dict[str, pa.DataType]) -> bool:
    """Casts whose result both engines compute the same way."""
    target = node.to.this
    operand = node.this
    if target == exp.DataType.Type.DATE:
        return isinstance(operand, exp.Literal) and operand.is_string
    if target in FLOAT_TYPES:
        return True  # int/decimal/float to double: the same IEEE rounding everywhere
    if target in INTEGER_TYPES:
        if isinstance(operand, exp.Literal):
            return operand.is_int
        return isinstance(operand, exp.Column) and pa.types.is_integer(types.get(operand.name, pa.null()))
    return False


def _same_columns(tree: exp.Expression, frame: DataFrame) -> bool:
    """The statement must produce exactly the plan's columns (no ``*``, none dropped)."""
    if not isinstance(tree, exp.Select) or any(isinstance(e, exp.Star) for e in tree.expressions):
        return False
    return len(tree.expressions) == len(frame.schema())


_BARE_NAME = re.compile(r"\w+")
_FUNCTION_NAME = re.compile(r"(\w+)\(")


def _in_plan_order(tree: exp.Select, plan, names: list[str]) -> bool:
    """The statement's result columns in the plan's order: results are read by position. The
    unparser writes an Aggregate with no Projection above it as ``SELECT <aggregates>,
    <groups>``; those are put back in order, and anything else out of order is refused."""
    expressions = list(tree.expressions)
    if _named_like(expressions, names):
        return True
    top = plan
    while type(top.to_variant()).__name__ in ("Sort", "Limit", "Filter"):  # ORDER BY, LIMIT, HAVING
        top = top.inputs()[0]
    if type(top.to_variant()).__name__ != "Aggregate":
        return False
    aggregates = len(top.to_variant().aggregate_exprs())
    rotated = expressions[aggregates:] + expressions[:aggregates]
    group, order = tree.args.get("group"), tree.args.get("order")
    ordinals = any(isinstance(e, exp.Literal) for e in (group.expressions if group else [])) or any(
        isinstance(o.this, exp.Literal) for o in (order.expressions if order else []))
    if ordinals or not _named_like(rotated, names):
        return False  # positions in GROUP BY / ORDER BY would move with the columns
    tree.set("expressions", rotated)
    return True


def _named_like(expressions: list[exp.Expression], names: list[str]) -> bool:
    """Each expression could be the plan's column of that name: an alias or column by its name,
    an aggregate by its function, anything computed by a name that is not a bare column's."""
    for expression, name in zip(expressions, names):
        if isinstance(expression, exp.Alias):
            same = expression.alias == name
        elif isinstance(expression, exp.Column):
            same = expression.name == name
        else:
            same = not _BARE_NAME.fullmatch(name)
            if same and isinstance(expression, exp.AggFunc):
                called = _FUNCTION_NAME.match(name)
                function = expression.name if isinstance(expression, exp.Anonymous) else expression.key
                same = called is not None and called.group(1).lower() == function.lower()
        if not same:
            return False
    return True


def _columns_in(node: exp.Expression) -> set[str]:
    return {column.name for column in node.find_all(exp.Column)}


def _point_at_remote_tables(tree: exp.Expression, catalog: Catalog, connector: SqlConnector
                            ) -> set[tuple[str, ...]]:
    """Dataset names become the backend's own table names; the old name stays as the alias.
    Returns the backend tables now read (a name no dataset has is left as it is, unread)."""
    remote_tables = set()
    for table in list(tree.find_all(exp.Table)):
        dataset = catalog.find(table.db or DEFAULT_SCHEMA, table.name)
        if dataset is None:
            continue
        remote = sqlglot.parse_one(f"SELECT 1 FROM {connector.quote_table(dataset.table)}",
                                   read=connector.dialect).find(exp.Table)
        alias = table.alias or table.name
        replacement = remote.copy()
        replacement.set("alias", exp.TableAlias(this=exp.to_identifier(alias, quoted=True)))
        table.replace(replacement)
        remote_tables.add(table_key(replacement))
    return remote_tables


def _point_at_remote_columns(tree: exp.Expression, connector: SqlConnector) -> None:
    """Column names as the backend spells them (Snowflake's upper case), where they differ.
    Only quoted ones: the unparser quotes every name, and a bare word is a value it wrote as
    one (NaN, inf), which must stay recognisable as such for the validator to refuse it."""
    for column in list(tree.find_all(exp.Column)):
        if not quoted_name(column):
            continue
        remote = connector.remote_column(column.name)
        if remote != column.name:
            column.set("this", exp.to_identifier(remote, quoted=True))


def _remote_columns(datasets: list[Dataset], connector: SqlConnector) -> set[str]:
    """The names the scanned tables' columns may have in the statement: the datasets' own
    (only the visible ones where columns are restricted) and the backend's spelling of them."""
    names = {name for dataset in datasets for name in dataset.arrow_schema.names}
    return names | {connector.remote_column(name) for name in names}


# ---- what each backend will be sent (for EXPLAIN) --------------------------

_DF_COMPARISONS = {"=": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}


def literal_value(expression) -> object:
    """The Python value of a DataFusion literal expression."""
    raw = getattr(expression, "expr", expression)
    return raw.python_value().as_py()


def planner_filter(expression) -> fx.Expr | None:
    """A DataFusion filter expression in the planner's own form; None where it has none."""
    variant = expression.to_variant()
    kind = type(variant).__name__
    if kind == "Column":
        return fx.Column(variant.name())
    if kind == "Literal":
        return fx.Literal(literal_value(expression))
    if kind == "BinaryExpr":
        op = str(variant.op()).upper()
        left, right = planner_filter(variant.left()), planner_filter(variant.right())
        if op in ("AND", "OR"):
            parts = tuple(p for p in (left, right) if p is not None)
            if op == "AND":
                return fx.And(parts) if len(parts) == 2 else (parts[0] if parts else None)
            return fx.Or(parts) if len(parts) == 2 else None
        if op in _DF_COMPARISONS and left is not None and right is not None:
            return fx.Compare(_DF_COMPARISONS[op], left, right)
        return None
    if kind in ("IsNull", "IsNotNull", "Not"):
        inner = planner_filter(variant.expr())
        if inner is None:
            return None
        return fx.IsNull(inner) if kind == "IsNull" else fx.Not(fx.IsNull(inner) if kind == "IsNotNull" else inner)
    return None


class SubplanRequests(Protocol):
    """A pushed sub-plan as EXPLAIN sees it (federation.subplan.PushedSubplan)."""

    backend: SqlConnector

    def describe(self) -> str: ...

    def request(self, columns: list[str] | None, filters: list[fx.Expr]) -> tuple[str, list]: ...


def backend_requests(frame: DataFrame, catalog: Catalog, remote: RemoteQuery | None,
                     subplans: Mapping[str, SubplanRequests] | None = None,
                     with_values: bool = True) -> list[tuple[str, str]]:
    """(label, request) per backend the query will reach: the whole statement, or each scan's.
    ``subplans`` (hidden table name -> sub-plan) are parts sent as statements of their own.
    Without ``with_values`` a statement shows how many values it binds, not which."""
    if remote is not None:
        return [(f"flightdeck: whole query sent to {remote.connector.describe()}", remote.describe_request(with_values))]
    requests = []
    for node in table_scans(optimized_plan(frame)):
        variant = node.to_variant()
        fqn = tuple(p for p in variant.fqn() if p)
        columns = [name for _, name in variant.projection()]
        filters = [f for f in (planner_filter(e) for e in variant.filters()) if f is not None]
        # What the scan fetches: a pushed filter may name columns outside the projection.
        needed = columns + sorted(set().union(*(fx.referenced_columns(f) for f in filters)) - set(columns))
        subplan = (subplans or {}).get(fqn[-1])
        if subplan is not None:
            sql, params = subplan.request(needed, filters)
            requests.append((f"flightdeck: sub-plan sent to {subplan.describe()}",
                             RemoteQuery(subplan.backend, sql, params).describe_request(with_values)))
            continue
        dataset = catalog.scanned(fqn)
        if dataset is None or dataset.connector is None or _read_natively(dataset):
            continue
        if dataset.masks is not None:  # as the masking scan asks: no condition on a masked column
            masked = dataset.masks.columns
            filters = [f for f in filters if not fx.referenced_columns(f) & masked]
        connector = dataset.connector
        label = f"flightdeck: scan of {dataset.qualified_name} on {connector.describe()}"
        if isinstance(connector, SqlConnector):
            sql, params = connector.select_sql(dataset.table, needed, filters, None)
            requests.append((label, RemoteQuery(connector, sql, params).describe_request(with_values)))
        else:
            requests.append((label, f"columns {columns}; filters pushed where the source can take them: "
                                    f"{[str(f) for f in filters]}"))
    return requests


def table_scans(node) -> list:
    """Every TableScan node of a logical plan, depth first."""
    if type(node.to_variant()).__name__ == "TableScan":
        return [node]
    return [scan for child in node.inputs() for scan in table_scans(child)]


def _read_natively(dataset: Dataset) -> bool:
    # DataFusion describes these scans (a grant's restricted or masked view reads them through the connector)
    return dataset.spec.kind == "file" and not dataset.spec.accelerated and not dataset.scanned_only
