"""The planner's own small filter-expression type.

Connectors receive filters in this form and translate what they can into their
native language (SQL WHERE, Mongo ``$match``, ...). The planner always re-applies
the exact filter to what a connector returns, so a connector may push a *looser*
filter (for example only some conjuncts of an AND) but never a stricter one.
"""
from __future__ import annotations

import datetime as dt
import decimal
import math
from dataclasses import dataclass
from typing import Callable, Union


@dataclass(frozen=True)
class Column:
    name: str


@dataclass(frozen=True)
class Literal:
    value: object  # a plain Python value: int, float, str, bool, bytes, date, datetime, Decimal, None


@dataclass(frozen=True)
class Compare:
    op: str  # one of = != < <= > >=
    left: "Expr"
    right: "Expr"


@dataclass(frozen=True)
class And:
    args: tuple["Expr", ...]


@dataclass(frozen=True)
class Or:
    args: tuple["Expr", ...]


@dataclass(frozen=True)
class Not:
    arg: "Expr"


@dataclass(frozen=True)
class IsNull:
    arg: "Expr"


@dataclass(frozen=True)
class InList:
    arg: "Expr"
    values: tuple[object, ...]


Expr = Union[Column, Literal, Compare, And, Or, Not, IsNull, InList]

COMPARISON_OPS = ("=", "!=", "<", "<=", ">", ">=")


def conjuncts(expr: Expr | None) -> list[Expr]:
    """Split a filter into the parts joined by AND (each can be pushed on its own)."""
    if expr is None:
        return []
    if isinstance(expr, And):
        return [part for arg in expr.args for part in conjuncts(arg)]
    return [expr]


FLIPPED = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}


def column_comparison(expr: Compare) -> tuple[str, str, object] | None:
    """(column, operator, value) of ``column op literal`` written either way round, else None."""
    left, right, op = expr.left, expr.right, expr.op
    if isinstance(left, Literal) and isinstance(right, Column):
        left, right, op = right, left, FLIPPED[op]
    if isinstance(left, Column) and isinstance(right, Literal):
        return left.name, op, right.value
    return None


def referenced_columns(expr: Expr) -> set[str]:
    if isinstance(expr, Column):
        return {expr.name}
    if isinstance(expr, Literal):
        return set()
    if isinstance(expr, Compare):
        return referenced_columns(expr.left) | referenced_columns(expr.right)
    if isinstance(expr, (And, Or)):
        return set().union(*(referenced_columns(a) for a in expr.args))
    if isinstance(expr, (Not, IsNull, InList)):
        return referenced_columns(expr.arg)
    raise TypeError(f"not a filter expression: {expr!r}")


# How faithfully a backend compares one column, as the planner would (see SqlRenderer).
EXACT = "exact"        # every comparison means the same (numbers, dates, byte-ordered text)
EQUALITY = "equality"  # = and != mean the same; ordering differs (a non-C text collation)
LOOSE = "loose"        # = may match more rows (case-insensitive or space-padding text): = and IN only
NONE = "none"          # nothing can be pushed (e.g. an untyped SQLite column)
_ALLOWED = {EXACT: {"=", "!=", "<", "<=", ">", ">="}, EQUALITY: {"=", "!="}, LOOSE: {"="}, NONE: set()}


# How a driver marks a bound value in a statement's text.
PARAM_STYLES: dict[str, Callable[[int], str]] = {
    "numbered": lambda n: f"${n}",  # PostgreSQL (ADBC), DuckDB
    "qmark": lambda n: "?",         # SQLite, Flight SQL (ADBC)
    "format": lambda n: "%s",       # PyMySQL, Snowflake (client-side binding: literal % is written %%)
}


class Bindings:
    """The values one statement binds, in the order their placeholders appear in its text."""

    def __init__(self, style: str):
        self.style = style
        self.values: list[object] = []

    def add(self, value: object) -> str:
        """Bind ``value``; the placeholder to write where it goes."""
        self.values.append(value)
        return PARAM_STYLES[self.style](len(self.values))


class SqlRenderer:
    """Renders filter expressions as SQL for one dialect.

    Text values are never written into the statement: each becomes a placeholder bound by
    the backend's driver (``param_style``). Other values are written by ``render_literal``,
    which only ever formats numbers, booleans, NULL and dates from their Python types (no
    text from a client reaches it). A column's rule (EXACT by default) decides what may be
    pushed: a pushed filter may match more rows than the planner's (the exact filter is
    re-applied), never fewer.
    """

    def __init__(self, quote_identifier: Callable[[str], str],
                 render_literal: Callable[[object], str | None], param_style: str = "numbered",
                 bound_types: tuple[type, ...] = (str,)):
        self.quote_identifier = quote_identifier
        self.render_literal = render_literal
        self.param_style = param_style
        self.bound_types = bound_types  # values the driver binds (text always; more where its types are exact)

    def bindings(self) -> Bindings:
        return Bindings(self.param_style)

    def value(self, value: object, bindings: Bindings) -> str | None:
        """A value's place in a statement: a bound placeholder for text (and ``bound_types``),
        else its literal."""
        if isinstance(value, self.bound_types):
            return bindings.add(value)
        if isinstance(value, (bytes, bytearray)):
            return None
        return self.render_literal(value)

    def _render(self, expr: Expr, rules: dict[str, str], bindings: Bindings) -> tuple[str, bool] | None:
        """(SQL, exact): exact when the backend keeps exactly the rows the planner would."""
        if isinstance(expr, Column):  # a column standing as a condition is read as the backend reads it
            return None if rules.get(expr.name) == NONE else (self.quote_identifier(expr.name), True)
        if isinstance(expr, Literal):
            text = self.value(expr.value, bindings)
            return None if text is None else (text, True)
        if isinstance(expr, Compare):
            rule = _combined_rule(referenced_columns(expr), rules)
            if expr.op not in _ALLOWED[rule]:
                return None
            left = self._render(expr.left, rules, bindings)
            right = self._render(expr.right, rules, bindings) if left is not None else None
            if left is None or right is None:
                return None
            op = "<>" if expr.op == "!=" else expr.op
            return f"({left[0]} {op} {right[0]})", rule != LOOSE
        if isinstance(expr, (And, Or)):
            parts = []
            for arg in expr.args:
                part = self._render(arg, rules, bindings)
                if part is None:
                    return None
                parts.append(part)
            joiner = " AND " if isinstance(expr, And) else " OR "
            return "(" + joiner.join(p[0] for p in parts) + ")", all(p[1] for p in parts)
        if isinstance(expr, Not):
            inner = self._render(expr.arg, rules, bindings)
            if inner is None or not inner[1]:
                return None  # NOT of a looser filter would be stricter
            return f"(NOT {inner[0]})", True
        if isinstance(expr, IsNull):
            inner = self._render(expr.arg, rules, bindings)
            return None if inner is None else (f"({inner[0]} IS NULL)", inner[1])
        if isinstance(expr, InList):
            rule = _combined_rule(referenced_columns(expr.arg), rules)
            inner = self._render(expr.arg, rules, bindings)
            if "=" not in _ALLOWED[rule] or inner is None or not expr.values:
                return None
            values = []
            for value in expr.values:
                text = self.value(value, bindings)
                if text is None:
                    return None
                values.append(text)
            return f"({inner[0]} IN ({', '.join(values)}))", rule != LOOSE
        return None

    def render_where(self, filters: list[Expr], rules: dict[str, str] | None = None,
                     bindings: Bindings | None = None) -> tuple[str | None, list[Expr], bool]:
        """(WHERE body or None, the conjuncts left out, whether the backend filters exactly).
        The values of the pushed conjuncts are added to ``bindings``, in text order."""
        bindings = bindings if bindings is not None else self.bindings()
        pushed, kept_local, exact = [], [], True
        for part in filters:
            mark = len(bindings.values)
            rendered = self._render(part, rules or {}, bindings)
            if rendered is None:
                del bindings.values[mark:]  # a conjunct left out binds nothing
                kept_local.append(part)
            else:
                pushed.append(rendered[0])
                exact = exact and rendered[1]
        return (" AND ".join(pushed) if pushed else None), kept_local, exact and not kept_local


def _combined_rule(columns: set[str], rules: dict[str, str]) -> str:
    order = [EXACT, EQUALITY, LOOSE, NONE]
    return max((rules.get(c, EXACT) for c in columns), key=order.index, default=EXACT)


def quote_double(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def non_finite(value: object) -> bool:
    """Whether a value is a float NaN or infinity: no SQL literal writes one, and the engines
    disagree on how they compare."""
    return isinstance(value, float) and not math.isfinite(value)


def standard_literal(value: object) -> str | None:
    """ANSI-style literal text, shared by DuckDB, SQLite and Postgres-like dialects."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return None if non_finite(value) else repr(value)  # NaN and infinities have no portable literal
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            return None  # time-zone semantics differ per backend: keep it local
        return f"TIMESTAMP '{value.isoformat(sep=' ')}'"
    if isinstance(value, dt.date):
        return f"DATE '{value.isoformat()}'"
    return None


def zoned_literal(value: object) -> str | None:
    """``standard_literal``, plus instants as TIMESTAMPTZ for backends with that type
    (PostgreSQL, DuckDB): an instant compares with an instant the same way everywhere."""
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        instant = value.astimezone(dt.timezone.utc).isoformat(sep=" ")
        return f"TIMESTAMPTZ '{instant}'"
    return standard_literal(value)
