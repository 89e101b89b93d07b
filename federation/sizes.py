"""How large the values a statement makes can be, judged before anything runs.

A text or list value is made whole, in one piece: once the engine starts computing one, neither
the query's deadline nor its memory pool stops it until it is done. So a statement of a few
hundred characters must not be able to ask for a value of gigabytes: ten nested
``replace(..., 'a', 'aaaaaaaaaa')`` make 10 GB from one letter, as do a chain of CTEs each
concatenating its column to itself, or a recursive CTE doubling a text at each step. Worse, the
engine folds calls on constants while it plans, before any limit of the query holds at all.

Each expression's length is bounded as ``fixed + per_value * L``: ``fixed`` characters or list
elements come from the statement's own constants, and L is the length of the longest value read
from a table. A column of a CTE or subquery carries the bound of the expression that made it, so
growth through a chain of them multiplies as it would when run. The bound overestimates (a CASE
is its longest branch, an unknown function of several texts their sum) and is exact for the calls
that multiply: repeat, lpad/rpad, array_repeat/array_resize, scalar ranges, replace,
regexp_replace, encode and hex, array_to_string.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sqlglot import exp
from sqlglot.optimizer.scope import Scope, traverse_scope, walk_in_scope

# Characters or list elements the constants of one statement may make. The engine folds calls on
# constants while it plans, outside every limit: a few `repeat('a', 100000000)` would take
# gigabytes and seconds there.
MAX_GENERATED = 16 * 2**20
# How many times longer than the longest value its tables hold an expression's value may be: the
# limit is on what the statement multiplies, since the data's own size is the data's.
MAX_GROWTH = 1000
_CAP = 2**62  # bounds past every limit are all alike: kept small for the arithmetic


class TooLarge(ValueError):
    """A statement that would make a value larger than its limits allow."""


def check_sizes(tree: exp.Expression) -> None:
    """Raise TooLarge if the statement's generating calls make more than MAX_GENERATED values
    in all, or any of its expressions can be longer than MAX_GENERATED from constants or
    MAX_GROWTH times the longest value its tables hold."""
    _check_generated(tree)
    try:
        scopes = list(traverse_scope(tree))
    except Exception:  # sqlglot cannot resolve every statement the engine reads
        scopes = []
    if scopes:
        _Sizer(scopes).check()
    else:  # every column as a table's value: calls on calls are still bounded, chains of CTEs not
        _Sizer([]).check_alone(tree)


# Calls whose values check_sizes bounds, and concatenation, as they appear in a statement's text.
_GROWING_CALL = re.compile(r"\b(repeat|lpad|rpad|replace|regexp_replace|encode|to_hex|to_base64|array_repeat|"
                           r"array_resize|range|generate_series|array_to_string|array_join|list_to_string|"
                           r"concat|concat_ws)\s*\(|\|\|", re.IGNORECASE)


def check_unread(sql: str) -> None:
    """Raise TooLarge if a statement the gate's parser cannot read calls a function whose values
    check_sizes would bound: the engine may read what the gate cannot, and would then make them
    unchecked. Other statements are left to the engine, which answers a syntax error itself."""
    found = _GROWING_CALL.search(sql)
    if found:
        raise TooLarge(f"the statement uses {found.group(0).rstrip('(').strip()}, whose values are bounded before "
                       "planning, in SQL the gate cannot read: write it in PostgreSQL's syntax")


def _check_generated(tree: exp.Expression) -> None:
    total = sum(_generated_by(node) for node in tree.find_all(exp.Func)
                if not isinstance(node.parent, (exp.Table, exp.Lateral)))  # a table function streams
    if total > MAX_GENERATED:
        raise TooLarge(f"the statement makes {total:,} values from constants (repeat, lpad, range, ...); "
                       f"at most {MAX_GENERATED:,}: generate rows with a table function such as "
                       "FROM range(n) instead")


def _generated_by(node: exp.Expression) -> int:
    """How many characters or list elements a call makes: its size times the length of what it
    repeats; 0 for a call that generates nothing."""
    if isinstance(node, exp.Repeat):
        return _size(node.args.get("times")) * _width(node.this)
    if isinstance(node, exp.Pad):
        return _size(node.args.get("expression"))
    if isinstance(node, (exp.GenerateSeries, exp.ExplodingGenerateSeries)):
        return _span([node.args.get("start"), node.args.get("end"), node.args.get("step")])
    if isinstance(node, exp.Anonymous):
        name, arguments = str(node.this).lower(), node.expressions
        if name == "array_repeat" and len(arguments) >= 2:
            return _size(arguments[1]) * _width(arguments[0])
        if name == "array_resize" and len(arguments) >= 2:
            return _size(arguments[1])
        if name in ("range", "generate_series") and arguments:
            return _span(arguments if len(arguments) > 1 else [None, arguments[0]])
    return 0


def _width(node: exp.Expression | None) -> int:
    """How long a repeated value is, as far as the statement says: a text literal's length, or
    what a generating call inside makes; 1 otherwise."""
    while isinstance(node, (exp.Paren, exp.Cast)):
        node = node.this
    if isinstance(node, exp.Literal) and node.is_string:
        return max(1, len(node.this))
    return max(1, _generated_by(node)) if node is not None else 1


def _span(bounds: list[exp.Expression | None]) -> int:
    """How many values a range makes from (start, end[, step]); a missing start is 0."""
    start, end = (_size(bound, signed=True) if bound is not None else 0 for bound in bounds[:2])
    step = abs(_size(bounds[2], signed=True)) if len(bounds) > 2 and bounds[2] is not None else 1
    return abs(end - start) // max(step, 1)


def _size(node: exp.Expression | None, signed: bool = False) -> int:
    """A size argument's value, which must be a number written in the statement (arithmetic of
    numbers is worked out). A size read from a column is known only while the values are being
    made, too late to stop one; a bound parameter or a function is folded unseen while planning."""
    value = _constant(node)
    if value is None:
        raise TooLarge(f"the size {node.sql(dialect='postgres')[:60] if node is not None else ''} of a generating "
                       "call (repeat, lpad, rpad, array_repeat, array_resize, range, generate_series) must be "
                       "written as a number")
    return value if signed else abs(value)


_ARITHMETIC = {exp.Add: lambda a, b: a + b, exp.Sub: lambda a, b: a - b, exp.Mul: lambda a, b: a * b,
               exp.Div: lambda a, b: a / b if b else None, exp.IntDiv: lambda a, b: a // b if b else None,
               exp.Pow: lambda a, b: a ** b if abs(b) < 64 else None}


def _constant(node: exp.Expression | None) -> int | None:
    """The value of a number written in the statement, or of arithmetic over such numbers
    (casts and parentheses seen through); None for anything else."""
    if isinstance(node, (exp.Paren, exp.Cast)):
        return _constant(node.this)
    if isinstance(node, exp.Neg):
        value = _constant(node.this)
        return None if value is None else -value
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return int(float(node.this))
        except (ValueError, OverflowError):
            return MAX_GENERATED + 1  # too large for a float is too large here
    operation = _ARITHMETIC.get(type(node))
    if operation is None:
        return None
    left, right = _constant(node.left), _constant(node.right)
    if left is None or right is None:
        return None
    value = operation(left, right)
    return None if value is None else int(value)


@dataclass(frozen=True)
class Bound:
    """A value's length is at most ``fixed + per_value * L`` (L: the longest value read)."""
    fixed: int = 0
    per_value: int = 0

    def __add__(self, other: "Bound") -> "Bound":
        return Bound(min(self.fixed + other.fixed, _CAP), min(self.per_value + other.per_value, _CAP))

    def times(self, factor: int) -> "Bound":
        return Bound(min(self.fixed * factor, _CAP), min(self.per_value * factor, _CAP))

    def most(self, other: "Bound") -> "Bound":
        return Bound(max(self.fixed, other.fixed), max(self.per_value, other.per_value))

    @property
    def factor(self) -> int:
        """As a multiplier of another length: a value read from a table counts as one unit."""
        return max(1, self.fixed + self.per_value)


SMALL = Bound()          # a number, a boolean, a date: its length does not grow
READ = Bound(0, 1)       # a value read from a table
Outputs = list[tuple[str, Bound]]  # a scope's columns, by name, in order

# Function results of a fixed small size (numbers, hashes, positions), whatever their arguments.
_SMALL_RESULTS = frozenset("""
    length char_length character_length octet_length bit_length strpos position instr ascii
    cardinality array_length array_position array_has array_has_all array_has_any levenshtein
    abs round ceil floor trunc sqrt cbrt exp ln log log2 log10 power pow atan2 mod sign signum
    gcd lcm greatest_common_divisor extract date_part datepart md5 sha224 sha256 sha384 sha512
    digest uuid random now count sum avg mean stddev variance corr covar approx_distinct
    approx_median approx_percentile_cont median regexp_count regexp_like starts_with ends_with
""".split())
# Results that are one of their arguments (the longest of them), not a combination.
_CHOICES = (exp.Case, exp.If, exp.Coalesce, exp.Nullif, exp.Greatest, exp.Least, exp.Max, exp.Min,
            exp.First, exp.Last, exp.AnyValue)
_SMALL_NODES = (exp.Predicate, exp.Connector, exp.Not, exp.Neg, exp.Length, exp.Count, exp.Add, exp.Sub,
                exp.Mul, exp.Div, exp.IntDiv, exp.Mod, exp.Pow, exp.BitwiseAnd, exp.BitwiseOr, exp.BitwiseXor,
                exp.BitwiseLeftShift, exp.BitwiseRightShift)


class _Sizer:
    """Bounds every expression of a statement, its scopes (CTEs, subqueries) taken in the order
    sqlglot resolves them: a scope's columns are known before another scope reads them."""

    def __init__(self, scopes: list[Scope], assumed: dict[int, Outputs] | None = None):
        self.scopes = scopes
        self.scope_of = {id(scope.expression): scope for scope in scopes}
        self.assumed = assumed or {}  # a recursive CTE's rows, as its recursive part reads them
        self.outputs_of: dict[int, Outputs] = {}
        self.bounds: dict[int, Bound] = {}
        self.busy: set[int] = set()

    def check(self) -> None:
        for scope in self.scopes:
            self.outputs(scope)
            for node in walk_in_scope(scope.expression):  # the outermost call named first
                if isinstance(node, (exp.Func, exp.DPipe)) and self._scope_value(node) is None:
                    self._checked(node, self.bound(node, scope))

    def check_alone(self, tree: exp.Expression) -> None:
        for node in tree.walk():
            if isinstance(node, (exp.Func, exp.DPipe)):
                self._checked(node, self.bound(node, None))

    @staticmethod
    def _checked(node: exp.Expression, bound: Bound) -> None:
        if bound.fixed > MAX_GENERATED:
            raise TooLarge(f"{_shown(node)} would make a value of up to {bound.fixed:,} characters or elements "
                           f"from the statement's constants; at most {MAX_GENERATED:,}")
        if bound.per_value > MAX_GROWTH:
            raise TooLarge(f"{_shown(node)} could make a value up to {bound.per_value:,} times as long as the "
                           f"longest value its tables hold; at most {MAX_GROWTH:,} times")

    def outputs(self, scope: Scope) -> Outputs:
        key = id(scope.expression)  # a recursive CTE's reference to itself is another Scope of it
        if key in self.assumed:
            return self.assumed[key]
        if key not in self.outputs_of:
            if key in self.busy:
                return []  # read before it is known (a recursive CTE's own rows): as a table's
            self.busy.add(key)
            try:
                self.outputs_of[key] = self._outputs(scope)
            finally:
                self.busy.discard(key)
        return self.outputs_of[key]

    def _outputs(self, scope: Scope) -> Outputs:
        node = scope.expression
        if isinstance(node, exp.SetOperation):
            outputs = self._set_outputs(scope, node)
        elif isinstance(node, exp.Select):
            outputs = []
            for projection in node.expressions:
                if projection.is_star:
                    outputs.extend(self._star(projection, scope))
                else:
                    outputs.append((projection.alias_or_name.lower(), self.bound(projection, scope)))
        else:  # VALUES, a table function
            outputs = [("", self._whole(node, scope))]
        return _renamed(scope, outputs)

    def _set_outputs(self, scope: Scope, node: exp.SetOperation) -> Outputs:
        left, right = (self._branch(side) for side in (node.left, node.right))
        first = self.outputs(left) if left else []
        if right is None:
            return first
        if left is not None and _recursive_cte(scope):
            return self._recursive(scope, left, right)
        return _positional_most(first, self.outputs(right))

    def _branch(self, side: exp.Expression) -> Scope | None:
        return self.scope_of.get(id(side.unnest() if isinstance(side, exp.Subquery) else side))

    def _recursive(self, scope: Scope, anchor: Scope, step: Scope) -> Outputs:
        """A recursive CTE's columns after any number of steps: two steps are bounded from the
        anchor's rows; a column whose second step adds more than its first grows geometrically.
        (sqlglot resolves the CTE's name inside it to its anchor.)"""
        start = self.outputs(anchor)
        once = _positional_most(start, self._stepped(scope, anchor, start, step))
        twice = _positional_most(once, self._stepped(scope, anchor, once, step))
        for (name, before), (_, first), (_, second) in zip(_renamed(scope, start), once, twice):
            if (second.fixed - first.fixed > first.fixed - before.fixed
                    or second.per_value - first.per_value > first.per_value - before.per_value):
                raise TooLarge(f"the recursive CTE's column {name or '?'} grows by a factor at every step "
                               "(a text concatenated to itself, say): its values would double until no memory is left")
        return twice

    def _stepped(self, scope: Scope, anchor: Scope, rows: Outputs, step: Scope) -> Outputs:
        assumed = {**self.assumed, id(anchor.expression): _renamed(scope, rows)}
        return _Sizer(self.scopes, assumed).outputs(step)

    def _star(self, star: exp.Expression, scope: Scope) -> Outputs:
        table = star.table if isinstance(star, exp.Column) else ""
        sources = [scope.sources.get(table)] if table else list(scope.sources.values())
        outputs: Outputs = []
        for source in sources:
            outputs.extend(self.outputs(source) if isinstance(source, Scope) else [("*", READ)])
        return outputs

    def bound(self, node: exp.Expression, scope: Scope | None) -> Bound:
        """Children first, without recursion: a statement may nest deeper than Python's stack."""
        inner = self._scope_value(node)
        if inner is not None:
            return inner
        pending, order = [node], []
        while pending:
            current = pending.pop()
            order.append(current)
            pending.extend(child for child in current.iter_expressions()
                           if id(child) not in self.bounds and self._scope_value(child) is None)
        for current in reversed(order):
            if id(current) not in self.bounds:
                self.bounds[id(current)] = self._bound_of(current, scope)
        return self.bounds[id(node)]

    def _scope_value(self, node: exp.Expression) -> Bound | None:
        """A subquery's value (its first column); None for an expression of this scope."""
        scope = self.scope_of.get(id(node.this if isinstance(node, exp.Subquery) else node))
        if scope is None:
            return None
        outputs = self.outputs(scope)
        return outputs[0][1] if outputs else READ

    def _of(self, node: exp.Expression | None) -> Bound:
        if node is None:
            return SMALL
        inner = self._scope_value(node)
        return inner if inner is not None else self.bounds.get(id(node), SMALL)

    def _bound_of(self, node: exp.Expression, scope: Scope | None) -> Bound:
        if isinstance(node, exp.Literal):
            return Bound(len(node.this)) if node.is_string else SMALL
        if isinstance(node, exp.Column):
            return SMALL if node.is_star else self._column(node, scope)
        multiplied = self._multiplied(node)
        if multiplied is not None:
            return multiplied
        if isinstance(node, _SMALL_NODES) or _call_name(node) in _SMALL_RESULTS:
            return SMALL
        if isinstance(node, exp.Window):
            return self._of(node.this)
        children = [self._of(child) for child in node.iter_expressions()]
        if isinstance(node, _CHOICES) or not isinstance(node, (exp.Func, exp.DPipe)):
            return _most(children)  # one of its parts (a clause, a tuple's values, a CASE's branch)
        return sum(children, SMALL)  # a function of several values may hold them all

    def _multiplied(self, node: exp.Expression) -> Bound | None:
        """The bound of a call that multiplies its argument's length; None for any other."""
        if isinstance(node, exp.Repeat):
            return self._of(node.this).times(_size(node.args.get("times")))
        if isinstance(node, exp.Pad):
            return Bound(_size(node.args.get("expression")))
        if isinstance(node, (exp.GenerateSeries, exp.ExplodingGenerateSeries)):
            if isinstance(node.parent, (exp.Table, exp.Lateral)):
                return SMALL  # a table function: one small value per row
            return Bound(_span([node.args.get("start"), node.args.get("end"), node.args.get("step")]))
        if isinstance(node, exp.Replace):
            return self._replaced(node)
        if isinstance(node, exp.RegexpReplace):
            # Every position may match (an empty match), each match becomes the replacement,
            # whose group references copy at most the whole text once more each.
            replacement = self._of(node.args.get("replacement"))
            return self._of(node.this).times(1 + replacement.factor) + replacement
        if isinstance(node, (exp.Encode, exp.Hex, exp.ToBase64)):
            return self._of(node.this).times(2)
        if isinstance(node, exp.ArrayToString):  # the separator once per element
            return self._of(node.this).times(1 + self._of(node.expression).factor)
        if isinstance(node, exp.Anonymous):
            name, arguments = str(node.this).lower(), node.expressions
            if name == "array_repeat" and len(arguments) >= 2:
                return self._of(arguments[0]).times(_size(arguments[1]))
            if name == "array_resize" and len(arguments) >= 2:
                return Bound(_size(arguments[1])) + self._of(arguments[0])
            if name in ("range", "generate_series") and arguments and not isinstance(node.parent, (exp.Table, exp.Lateral)):
                return Bound(_span(arguments if len(arguments) > 1 else [None, arguments[0]]))
            if name in ("encode", "to_hex", "to_base64"):
                return self._of(arguments[0]).times(2) if arguments else SMALL
            if name in ("list_to_string", "list_join") and len(arguments) >= 2:
                return self._of(arguments[0]).times(1 + self._of(arguments[1]).factor)
        return None

    def _replaced(self, node: exp.Replace) -> Bound:
        text, found = self._of(node.this), node.args.get("expression")
        replacement = self._of(node.args.get("replacement"))
        if isinstance(found, exp.Literal) and found.is_string and found.this:
            return text.times(max(1, math.ceil(replacement.factor / len(found.this))))
        return text.times(1 + replacement.factor) + replacement  # an empty search inserts everywhere

    def _column(self, column: exp.Column, scope: Scope | None) -> Bound:
        """A column's bound: what its CTE or subquery made it of, or a table's value."""
        name, table = column.name.lower(), column.table
        while scope is not None:
            if table:
                source = scope.sources.get(table)
                if isinstance(source, Scope):  # a name it does not give (an unnamed expression): any
                    outputs = self.outputs(source)
                    return _named(outputs, name) or _most([bound for _, bound in outputs] or [READ])
                if source is not None:
                    return READ
            else:
                found = [_named(self.outputs(source), name) for source in scope.sources.values()
                         if isinstance(source, Scope)]
                found = [bound for bound in found if bound is not None]
                if found:
                    return _most(found)
                if scope.sources:
                    return READ
            scope = scope.parent
        return READ

    def _whole(self, node: exp.Expression, scope: Scope) -> Bound:
        return _most([self.bound(row, scope) for row in node.expressions] or [SMALL])


def _call_name(node: exp.Expression) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.this).lower()
    return node.sql_name().lower() if isinstance(node, exp.Func) else ""


def _named(outputs: Outputs, name: str) -> Bound | None:
    """The bound of the column ``name`` (a table's star gives every name); None if none is."""
    found = [bound for column, bound in outputs if column in (name, "*")]
    return _most(found) if found else None


def _most(bounds: list[Bound]) -> Bound:
    result = SMALL
    for bound in bounds:
        result = result.most(bound)
    return result


def _positional_most(first: Outputs, second: Outputs) -> Outputs:
    if len(first) != len(second):
        return [(name, _most([bound for _, bound in first + second])) for name, _ in first or second]
    return [(name, bound.most(other)) for (name, bound), (_, other) in zip(first, second)]


def _renamed(scope: Scope, outputs: Outputs) -> Outputs:
    """A CTE's or an aliased subquery's column list names its columns in order."""
    alias = scope.expression.parent.args.get("alias") if scope.expression.parent is not None else None
    names = [column.name.lower() for column in alias.columns] if isinstance(alias, exp.TableAlias) else []
    if not names:
        return outputs
    return [(names[index] if index < len(names) else name, bound) for index, (name, bound) in enumerate(outputs)]


def _recursive_cte(scope: Scope) -> bool:
    with_ = scope.expression.parent.parent if scope.is_cte and scope.expression.parent is not None else None
    return isinstance(with_, exp.With) and bool(with_.args.get("recursive"))


def _shown(node: exp.Expression) -> str:
    text = node.sql(dialect="postgres")
    return text if len(text) <= 80 else text[:77] + "..."
