"""Statements sent whole to a SQL backend: validated, with every text value bound by the driver.

DataFusion's unparser writes a plan back as SQL, but it does not escape string literals
faithfully: a quote that follows a backslash stays undoubled (in PostgreSQL, SQLite and
DuckDB it then ends the literal) and a doubled quote is left as it is (the value changes).
Its text is therefore never trusted as it stands:

1. A plan holding a text value the unparser cannot write faithfully (a backslash, or two
   quotes in a row) is not sent. Values bound as query parameters never reach the unparser
   at all: the statement is planned with its placeholders unbound, and the values go to
   the backend's driver. Nor is a plan holding a float NaN or infinity: the unparser writes
   it as a bare word (NaN, inf) that a backend reads as a column name.
2. The unparsed text is parsed in the backend's dialect and checked: exactly one SELECT made
   only of allow-listed constructs (no INTO, locking, DDL/DML, set operations or subqueries
   in expressions), reading only the tables the plan's scans name, naming only their columns
   (always quoted, as the unparser writes names) or aliases it defines, and its text
   literals must be values the plan holds.
3. Every text literal and placeholder then becomes a bound parameter of the driver. What
   stays in the text is sqlglot's own writing of identifiers, numbers and keywords, and the
   written statement must parse back to the validated tree.

A statement translated whole for local read-only copies (``federation.whole_statement``)
is checked the same way against a wider allow-list (subqueries anywhere, a WITH list read
only where its names are in scope, EXTRACT, SUBSTRING, division); its text literals must be
texts DataFusion read from the statement.

A statement that fails any check is not sent: the query runs in DataFusion instead, and
the reason is logged once.
"""
from __future__ import annotations

import datetime as dt
import decimal
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import sqlglot
from sqlglot import exp
from sqlglot.tokens import TokenType

from federation.expr import PARAM_STYLES, non_finite

log = logging.getLogger("flightdeck.pushdown")

MARKER = re.compile(r"__fdbind_(\d+)__")
_PLACEHOLDER_NAME = re.compile(r"\$(\d+)")
# Text an INTERVAL literal may hold and still be written in place (no driver binds an
# INTERVAL's text): nothing here can end a string in any dialect.
_INERT_INTERVAL = re.compile(r"[0-9A-Za-z .:+-]*")

# Every construct a statement sent to a backend may contain. Functions beyond these are
# refused earlier by the pushdown guards; anything else (INTO, locks, set operations,
# commands, table functions, subquery expressions) is refused here.
ALLOWED_NODES = (
    exp.Select, exp.From, exp.Join, exp.Where, exp.Group, exp.Having, exp.Order, exp.Ordered,
    exp.Limit, exp.Offset, exp.Column, exp.Identifier, exp.Table, exp.TableAlias, exp.Alias,
    exp.Subquery, exp.Literal, exp.Null, exp.Boolean, exp.Parameter, exp.Placeholder, exp.Paren,
    exp.And, exp.Or, exp.Not, exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE, exp.Is, exp.In,
    exp.Between, exp.Like, exp.ILike, exp.Add, exp.Sub, exp.Mul, exp.Mod, exp.Neg, exp.Cast,
    exp.DataType, exp.DataTypeParam, exp.Case, exp.If, exp.Coalesce, exp.Count, exp.Sum, exp.Min,
    exp.Max, exp.Avg, exp.Abs, exp.Distinct, exp.Star, exp.Tuple, exp.Interval, exp.Var,
    exp.Escape, exp.NullSafeEQ, exp.NullSafeNEQ,
)
SELECT_PARTS = {"expressions", "from_", "joins", "where", "group", "having", "order", "limit",
                "offset", "distinct"}
# A whole statement translated for local read-only copies (federation.whole_statement) may
# also hold what TPC-H-like analytics need: subqueries anywhere (correlated, EXISTS, IN),
# a WITH list in front, integer division, EXTRACT and SUBSTRING. Still one SELECT, reading
# only the copies' tables (or a WITH name in scope), no function outside the list.
WHOLE_STATEMENT_NODES = ALLOWED_NODES + (exp.Exists, exp.With, exp.CTE, exp.IntDiv, exp.Div, exp.Extract,
                                         exp.Substring, exp.Sub, exp.Select)
WHOLE_SELECT_PARTS = SELECT_PARTS | {"with_"}


class StatementRefused(Exception):
    """Why a statement is not sent to the backend; the query then runs in DataFusion."""


@dataclass(frozen=True)
class BackendStatement:
    sql: str            # in the backend's dialect, with the driver's placeholders
    params: list[Any]   # bound values, in the order their placeholders appear


def faithful_text(value: str) -> bool:
    """Whether the unparser writes this text value as a literal that reads back as itself."""
    return "\\" not in value and "''" not in value


def plan_literals(plan) -> list[Any]:
    """The Python values of every literal in a DataFusion logical plan."""
    found: list[Any] = []
    stack = [plan]
    while stack:
        node = stack.pop()
        for expression in _node_expressions(node.to_variant()):
            _collect_literals(expression, found)
        stack.extend(node.inputs())
    return found


_EXPRESSION_GETTERS = ("projections", "predicate", "group_by_exprs", "aggregate_exprs",
                       "sort_exprs", "filters", "on", "filter")


def _node_expressions(variant) -> Iterable:
    for name in _EXPRESSION_GETTERS:
        getter = getattr(variant, name, None)
        if getter is None:
            continue
        value = getter()
        if value is None:
            continue
        yield from (value if isinstance(value, (list, tuple)) else [value])


def _collect_literals(expression, found: list[Any]) -> None:
    if isinstance(expression, tuple):  # a join's (left, right) key pair
        for part in expression:
            _collect_literals(part, found)
        return
    if type(expression).__name__ == "SortExpr":
        expression = expression.expr()
    kind = str(expression.rex_type())
    if "Literal" in kind:
        found.append(expression.python_value().as_py())
        return
    if "Call" in kind or "Alias" in kind:
        try:
            operands = expression.rex_call_operands()
        except Exception:
            if type(expression.to_variant()).__name__ == "Placeholder":
                return  # a parameter: its value is bound, not written
            raise StatementRefused(f"cannot read the literals of {expression}") from None
        for operand in operands:
            _collect_literals(operand, found)


def bound_statement(tree: exp.Expression, dialect: str, param_style: str, plan,
                    values: dict[str, Any] | None, remote_tables: set[tuple[str, ...]],
                    whole: bool = False, plan_texts: set[str] | None = None,
                    remote_columns: set[str] | None = None) -> BackendStatement:
    """The statement to send for ``tree`` (parsed from the unparser's text, tables already
    pointing at the backend's), or StatementRefused. ``values`` holds the statement's
    parameter values by number ("1", "2", ...) for its ``$n`` placeholders. ``whole``: a
    statement translated for local copies, checked against the wider allow-list, its text
    literals checked against ``plan_texts`` (the texts DataFusion read) instead of ``plan``'s.
    ``remote_columns``: the columns of the tables it reads, the only names (with the aliases
    it defines) it may reference."""
    if plan_texts is None:
        literals = plan_literals(plan)
        _refuse_non_finite_floats(literals)
        plan_texts = {text for value in literals for text in _texts_of(value)}
    if any(not faithful_text(text) for text in plan_texts):
        raise StatementRefused("a text value in the query cannot be written faithfully as SQL")
    check_shape(tree, remote_tables, whole, remote_columns)
    tree = tree.copy()
    bound: list[Any] = []

    def bind(node: exp.Expression, value: Any) -> None:
        bound.append(value)
        node.replace(exp.column(exp.to_identifier(f"__fdbind_{len(bound)}__", quoted=False)))

    for node in list(tree.find_all(exp.Parameter, exp.Placeholder, exp.Column)):
        number = _placeholder_number(node)
        if number is None:
            continue
        if values is None or number not in values:
            raise StatementRefused(f"placeholder ${number} has no value")
        value = values[number]
        bind(node, value.as_py() if hasattr(value, "as_py") else value)
    for literal in list(tree.find_all(exp.Literal)):
        if not literal.is_string:
            continue
        if isinstance(literal.parent, exp.Interval):
            if not _INERT_INTERVAL.fullmatch(literal.this):
                raise StatementRefused("an INTERVAL holds text that cannot stay in place")
            continue
        if literal.this not in plan_texts:
            raise StatementRefused("a text literal of the statement is not a value of the plan")
        bind(literal, literal.this)
    return BackendStatement(*_written(tree, dialect, param_style, bound))


def _refuse_non_finite_floats(literals: list[Any]) -> None:
    """The unparser writes a float NaN or infinity as a bare word (NaN, inf, -inf), which a
    backend reads as a column of that name. Not bound as a parameter instead: the engines
    disagree on these values (PostgreSQL and DuckDB hold every NaN equal and above all
    numbers, DataFusion orders a negative NaN below -inf, SQLite binds NaN as NULL,
    MySQL/MariaDB and PyMySQL have none), so such a query runs in DataFusion."""
    if any(non_finite(value) for value in literals):
        raise StatementRefused("a float NaN or infinity has no SQL literal (the unparser writes a bare word)")


def _texts_of(value: Any) -> set[str]:
    """How the unparser may write a plan value as a text literal (dates and times are
    written as text inside a CAST)."""
    if isinstance(value, str):
        return {value}
    if isinstance(value, dt.datetime):
        return {value.isoformat(sep=" "), value.isoformat(), value.strftime("%Y-%m-%d %H:%M:%S")}
    if isinstance(value, (dt.date, dt.time, decimal.Decimal)):
        return {value.isoformat() if not isinstance(value, decimal.Decimal) else str(value)}
    return set()


_COMPARISONS = (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)


def check_shape(tree: exp.Expression, remote_tables: set[tuple[str, ...]], whole: bool = False,
                remote_columns: set[str] | None = None) -> None:
    """Exactly one SELECT of allow-listed constructs reading only ``remote_tables`` (and,
    ``whole``, the names of its WITH list where they are in scope). With ``remote_columns``
    (the columns of those tables), every column it names is quoted and one of them or an
    alias the statement defines."""
    if not isinstance(tree, exp.Select):
        raise StatementRefused(f"not a single SELECT ({type(tree).__name__})")
    if remote_columns is not None:
        _check_columns(tree, remote_columns)
    allowed, parts = (WHOLE_STATEMENT_NODES, WHOLE_SELECT_PARTS) if whole else (ALLOWED_NODES, SELECT_PARTS)
    in_scope = _with_names_in_scope(tree) if whole else {}
    for node in tree.walk():
        if not isinstance(node, allowed):
            raise StatementRefused(f"the statement contains {type(node).__name__}")
        if isinstance(node, exp.Select):
            extra = {key for key, value in node.args.items() if value and key not in parts}
            if extra:
                raise StatementRefused(f"the SELECT has {', '.join(sorted(extra))}")
            if node is not tree and node.args.get("with_"):
                raise StatementRefused("a WITH list inside the statement")
        elif isinstance(node, exp.With) and node.args.get("recursive"):
            raise StatementRefused("a recursive WITH")
        elif isinstance(node, exp.Identifier) and MARKER.fullmatch(str(node.this)):
            raise StatementRefused("an identifier looks like a parameter marker")
        elif whole:
            _check_whole_statement_node(node, remote_tables, in_scope)
        elif isinstance(node, exp.Subquery) and not isinstance(node.parent, (exp.From, exp.Join) + _COMPARISONS):
            # Derived tables, and the scalar subquery the unparser writes for a join with a
            # one-row aggregate; never EXISTS or IN (subquery).
            raise StatementRefused("a subquery outside FROM or a comparison")
        elif isinstance(node, exp.Table):
            if table_key(node) not in remote_tables:
                raise StatementRefused(f"the statement reads {node.sql()}, which no scan of the plan names")
        elif isinstance(node, exp.Var) and not _is_interval_unit(node):
            raise StatementRefused(f"a bare word in the statement: {node.sql()}")


def _check_columns(tree: exp.Select, remote_columns: set[str]) -> None:
    """The unparser quotes every name it writes: an unquoted column is a value it wrote as a
    word (NaN, inf), which the backend would resolve against whatever column has that name.
    A quoted one must exist in the tables read or be defined by the statement itself."""
    known = remote_columns | _defined_names(tree)
    for column in tree.find_all(exp.Column):
        if isinstance(column.this, exp.Star) or _placeholder_number(column) is not None:
            continue
        if not quoted_name(column):
            raise StatementRefused(f"a bare word where a column belongs: {column.sql()}")
        if column.name not in known:
            raise StatementRefused(f"the statement names {column.sql()}, a column no table it reads has")


def quoted_name(column: exp.Column) -> bool:
    """Whether a column is written as a quoted name, as the unparser writes every name."""
    return isinstance(column.this, exp.Identifier) and bool(column.this.quoted)


def _defined_names(tree: exp.Select) -> set[str]:
    """The names the statement gives: its aliases, and the column names of its table aliases."""
    names = {alias.alias for alias in tree.find_all(exp.Alias)}
    for table_alias in tree.find_all(exp.TableAlias):
        names.update(column.name for column in table_alias.columns)
    return names


def _check_whole_statement_node(node: exp.Expression, remote_tables: set[tuple[str, ...]],
                                in_scope: dict[int, set[str]]) -> None:
    if isinstance(node, exp.Table) and table_key(node) not in remote_tables:
        if not (isinstance(node.this, exp.Identifier) and len(table_key(node)) == 1
                and node.name in in_scope.get(id(node), ())):
            raise StatementRefused(f"the statement reads {node.sql()}, which is neither a copy nor a WITH name")
    elif isinstance(node, exp.Var) and not isinstance(node.parent, (exp.Interval, exp.Extract)):
        raise StatementRefused(f"a bare word in the statement: {node.sql()}")


def _with_names_in_scope(tree: exp.Select) -> dict[int, set[str]]:
    """For each table reference (by id), the WITH names it may read: those defined before the
    definition it sits in, or all of them in the body. A name out of scope would otherwise
    fall through to a table of the backend's own."""
    scope: dict[int, set[str]] = {}
    with_ = tree.args.get("with_")
    ctes = list(with_.expressions) if with_ is not None else []
    names = [cte.alias for cte in ctes]
    for index, cte in enumerate(ctes):
        for table in cte.find_all(exp.Table):
            scope[id(table)] = set(names[:index])
    for table in tree.find_all(exp.Table):
        scope.setdefault(id(table), set(names))
    return scope


def table_key(table: exp.Table) -> tuple[str, ...]:
    """A table reference as (catalog, schema, name), as written (quoting aside)."""
    if not isinstance(table.this, exp.Identifier):
        return ("<function>",)
    return tuple(part.name for part in (table.args.get("catalog"), table.args.get("db"), table.this)
                 if part is not None)


def _is_interval_unit(node: exp.Var) -> bool:
    return isinstance(node.parent, exp.Interval)


def _placeholder_number(node: exp.Expression) -> str | None:
    """The number of a ``$n`` placeholder, as each dialect's parser reads it, else None."""
    if isinstance(node, exp.Parameter):
        return str(node.this.this) if isinstance(node.this, exp.Literal) else None
    if isinstance(node, exp.Placeholder):
        return str(node.this) if node.this is not None and str(node.this).isdigit() else None
    if isinstance(node, exp.Column) and not node.table and isinstance(node.this, exp.Identifier) \
            and not node.this.quoted:
        match = _PLACEHOLDER_NAME.fullmatch(node.this.this)  # SQLite and MySQL read $n as a name
        return match.group(1) if match else None
    return None


def _written(tree: exp.Expression, dialect: str, param_style: str, bound: list[Any]) -> tuple[str, list[Any]]:
    """The tree as text with the driver's placeholders, and the values in their text order."""
    text = tree.sql(dialect=dialect)
    if sqlglot.parse_one(text, read=dialect) != tree:
        raise StatementRefused("the written statement does not read back as validated")
    placeholder: Callable[[int], str] = PARAM_STYLES[param_style]
    escape = (lambda s: s.replace("%", "%%")) if param_style == "format" else (lambda s: s)
    pieces, params, position = [], [], 0
    for token in sqlglot.tokenize(text, read=dialect):
        marker = MARKER.fullmatch(token.text) if token.token_type == TokenType.VAR else None
        if marker is None:
            continue
        pieces.append(escape(text[position:token.start]))
        params.append(bound[int(marker.group(1)) - 1])
        pieces.append(placeholder(len(params)))
        position = token.end + 1
    pieces.append(escape(text[position:]))
    if len(params) != len(bound):
        raise StatementRefused("a bound value has no placeholder in the written statement")
    return "".join(pieces), params


_refusals_logged: set[str] = set()


def log_refusal_once(reason: str) -> None:
    """Each kind of refusal is logged once per process: a loop of agent queries must not
    flood the log."""
    if reason in _refusals_logged or len(_refusals_logged) > 1000:
        return
    _refusals_logged.add(reason)
    log.warning("not sent to the backend, runs in DataFusion: %s", reason)
