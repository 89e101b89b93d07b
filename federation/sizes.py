"""How large the values a statement makes can be, judged before anything runs.

A text or list value is made whole, in one piece: once the engine starts computing one, neither
the query's deadline nor its memory pool stops it until it is done. So a statement of a few
hundred characters must not be able to ask for a value of gigabytes: ten nested
``replace(..., 'a', 'aaaaaaaaaa')`` make 10 GB from one letter, as do a chain of CTEs each
concatenating its column to itself, or a recursive CTE doubling a text at each step. Worse, the
engine folds calls on constants while it plans, before any limit of the query holds at all.

Each expression's length is bounded as ``fixed + per_value * L + squared * L**2``: ``fixed``
characters or list elements come from the statement's own constants, and L is the length of the
longest value read from a table (``squared``: a value read, inserted throughout another). A column
of a CTE or subquery carries the bound of the expression that made it, so growth through a chain
of them multiplies as it would when run; a name the gate cannot resolve takes the largest bound
it could stand for. The bound overestimates (a CASE is its longest branch, an unknown function of
several texts their sum) and follows the calls that multiply: repeat, lpad/rpad, array_repeat,
array_resize, scalar ranges, replace, regexp_replace, encode/hex, array_to_string, concat_ws,
array_replace, tuples (a struct of all their parts), and values written out as text: a list
(by a cast, concat, any call that is not a list function), a number or a date (by a cast or a
date format). A value made for every row is made for a whole batch of rows at once, and
string_agg/array_agg repeat theirs for every row they gather, so what they gathered may be
gathered again only once.
"""
from __future__ import annotations

import re
import re._parser as regex_parser
from dataclasses import dataclass, replace

from sqlglot import exp
from sqlglot.errors import OptimizeError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers
from sqlglot.optimizer.scope import Scope, traverse_scope, walk_in_scope

# Characters or list elements the constants of one statement may make. The engine folds calls on
# constants while it plans, outside every limit: a few `repeat('a', 100000000)` would take
# gigabytes and seconds there.
MAX_GENERATED = 16 * 2**20
# How many times longer than the longest value its tables hold an expression's value may be: the
# limit is on what the statement multiplies, since the data's own size is the data's.
MAX_GROWTH = 1000
MAX_SQUARED = 4  # a value read inserted throughout another, a few times; never a cube
# A value made for every row is made for a batch of rows at once (the engine's default batch).
ROWS_PER_BATCH = 65_536
MAX_PER_BATCH = 2**30
MAX_AGGREGATED = 1024  # characters of constants string_agg/array_agg may add for each row
MAX_GATHERINGS = 2  # string_agg/array_agg over the values of another, at most this deep
# The most characters one list element takes when the list is written as text, its separator
# included: a number, a date, an interval ("0 years 0 mons 0 days 0 hours 0 mins 0.000000000 secs")
# may be far longer than the one character or element it was made from. A list written out as
# text, split into a list again and written out again grows by this much each time.
ELEMENT_TEXT = 64
EMBEDDING_ELEMENTS = 4096  # the widest embedding a model gives (MiniLM's: 384)
FORMAT_FIELD = 32  # the most characters a date format writes for one of its characters ('%+' is 35)
_CAP = 2**62  # bounds past every limit are all alike: kept small for the arithmetic
# Calls that make values from a size written in the statement, besides repeat, lpad/rpad and
# generate_series, which sqlglot parses as nodes of their own.
_GENERATING_CALLS = frozenset({"array_repeat", "list_repeat", "array_resize", "list_resize", "range",
                               "generate_series"})


class TooLarge(ValueError):
    """A statement that would make a value larger than its limits allow."""


def check_sizes(tree: exp.Expression) -> None:
    """Raise TooLarge if any of the statement's expressions can be longer than MAX_GENERATED from
    constants or MAX_GROWTH times the longest value its tables hold, or its generating calls make
    more than MAX_GENERATED values in all."""
    try:
        scopes = list(traverse_scope(normalize_identifiers(tree, dialect="postgres")))
    except Exception:  # sqlglot cannot resolve every statement the engine reads
        scopes = []
    sizer = _Sizer(scopes)
    if scopes:
        sizer.check()
    else:  # every column as a table's value: calls on calls are still bounded, chains of CTEs not
        sizer.check_alone(tree)
    sizer.check_generated(tree)


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
    """A value's length is at most ``fixed + per_value * L + squared * L**2`` (L: the longest
    value read); ``per_row``: it is made anew for every row, as it reads a column; ``listed``: it
    may be a list, whose elements are counted, not the characters they take as text; ``gathered``:
    how many string_agg/array_agg, one gathering the other's values, it was made by."""
    fixed: int = 0
    per_value: int = 0
    squared: int = 0
    per_row: bool = False
    listed: bool = False
    gathered: int = 0

    def __add__(self, other: "Bound") -> "Bound":
        return Bound(_capped(self.fixed + other.fixed), _capped(self.per_value + other.per_value),
                     _capped(self.squared + other.squared), self.per_row or other.per_row,
                     self.listed or other.listed, max(self.gathered, other.gathered))

    def times(self, factor: int) -> "Bound":
        return Bound(_capped(self.fixed * factor), _capped(self.per_value * factor), _capped(self.squared * factor),
                     self.per_row, self.listed, self.gathered)

    def as_list(self) -> "Bound":
        return replace(self, listed=True)

    def as_text(self) -> "Bound":
        """A list written out as text: each element as long as any value's text, with brackets
        and separators; anything else as it is."""
        if not self.listed:
            return self
        written = self.times(ELEMENT_TEXT) + Bound(2)
        return replace(written, listed=False)

    def mul(self, other: "Bound") -> "Bound":
        """Every unit of this value becomes one of ``other``: the product, where past L**2 is past every limit."""
        cubic = self.per_value * other.squared + self.squared * other.per_value + self.squared * other.squared
        squared = self.fixed * other.squared + self.per_value * other.per_value + self.squared * other.fixed
        return Bound(_capped(self.fixed * other.fixed),
                     _capped(self.fixed * other.per_value + self.per_value * other.fixed),
                     _CAP if cubic else _capped(squared), self.per_row or other.per_row, self.listed or other.listed,
                     max(self.gathered, other.gathered))

    def divided(self, divisor: int) -> "Bound":
        return Bound(-(-self.fixed // divisor), -(-self.per_value // divisor), -(-self.squared // divisor),
                     self.per_row, self.listed, self.gathered)

    def most(self, other: "Bound") -> "Bound":
        return Bound(max(self.fixed, other.fixed), max(self.per_value, other.per_value),
                     max(self.squared, other.squared), self.per_row or other.per_row, self.listed or other.listed,
                     max(self.gathered, other.gathered))


def _capped(value: int) -> int:
    return min(value, _CAP)


NOTHING = Bound()        # what a sum starts from
ONE = Bound(1)           # a character, an element, a NULL
SCALAR = Bound(128)      # a number, a hash, a date as text: a few characters whatever it was made of
READ = Bound(0, 1, per_row=True)  # a value read from a table
# An element of a list a call makes from a size (array_repeat, a scalar range): whatever it holds,
# it takes 8 bytes or more (a number, or a text's offset), so 16M of them would be 128 MB or more.
ELEMENT = Bound(8)
Outputs = list[tuple[str, Bound]]  # a scope's columns, by name, in order

# Function results of a fixed small size (numbers, hashes, positions), whatever their arguments.
SMALL_RESULTS = frozenset("""
    length char_length character_length octet_length bit_length strpos position instr ascii
    cardinality array_length array_position array_has array_has_all array_has_any levenshtein
    abs round ceil floor trunc sqrt cbrt exp ln log log2 log10 power pow atan2 mod sign signum
    gcd lcm greatest_common_divisor extract date_part datepart md5 sha224 sha256 sha384 sha512
    digest uuid random now count sum avg mean stddev variance corr covar approx_distinct
    approx_median approx_percentile_cont median regexp_count regexp_like starts_with ends_with
    cosine_distance array_distance predict
""".split())
_SMALL_NODES = (exp.Predicate, exp.Connector, exp.Not, exp.Neg, exp.Length, exp.Count, exp.Add, exp.Sub,
                exp.Mul, exp.Div, exp.IntDiv, exp.Mod, exp.Pow, exp.BitwiseAnd, exp.BitwiseOr, exp.BitwiseXor,
                exp.BitwiseLeftShift, exp.BitwiseRightShift)
# The expressions that make a value: calls, concatenations, tuples (a struct of their parts).
_MADE = (exp.Func, exp.DPipe, exp.Tuple)
# Results that are one of their arguments (the longest of them), not a combination.
_CHOICES = (exp.Case, exp.If, exp.Coalesce, exp.Nullif, exp.Greatest, exp.Least, exp.Max, exp.Min,
            exp.First, exp.Last, exp.AnyValue)
_AGGREGATES = frozenset({"string_agg", "array_agg", "listagg", "group_concat"})
# Calls that make lists, besides the array_* and list_* functions.
_LIST_CALLS = frozenset({"string_to_array", "string_to_list", "regexp_match", "split", "range", "generate_series",
                         "flatten", "map_keys", "map_values", "map_extract", "make_list"})
_REPLACE_IN_LISTS = frozenset({"array_replace", "array_replace_n", "array_replace_all", "list_replace",
                               "list_replace_n", "list_replace_all"})
# Patterns the engine's regular expressions (Rust's) and Python's read alike, for their width:
# characters, sets without a set inside ("[[:alpha:]]" is one character in Rust, three in Python),
# \d \w \s and their opposites, \b \B (not Rust's \b{start}), escaped punctuation (not Rust's
# word edges \< \>), groups without flags, quantifiers and alternatives. Any other pattern may
# match anything, even nothing.
_READ_ALIKE = re.compile(r"""(?:[^\\\[(]|\\[dDwWsSbBntr](?!\{)|\\[^A-Za-z0-9<>]|\[\^?\]?(?:[^\\\[\]]|\\.)*\]|\((?!\?))*""")
# A group reference in a regexp_replace replacement (\1, $1, ${name}): a copy of its match.
_GROUP_REFERENCE = re.compile(r"\\\d|\$\{?\w+\}?")


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
        self.any_column: Bound | None = None

    def check(self) -> None:
        for scope in self.scopes:
            self.outputs(scope)
            for node in walk_in_scope(scope.expression):  # the outermost call named first
                if isinstance(node, _MADE) and self._scope_value(node) is None:
                    self._checked(node, self.bound(node, scope))

    def check_alone(self, tree: exp.Expression) -> None:
        for node in tree.walk():
            if isinstance(node, _MADE):
                self._checked(node, self.bound(node, None))

    @staticmethod
    def _checked(node: exp.Expression, bound: Bound) -> None:
        if bound.fixed > MAX_GENERATED:
            raise TooLarge(f"{_shown(node)} would make a value of up to {bound.fixed:,} characters or elements "
                           f"from the statement's constants; at most {MAX_GENERATED:,}")
        if bound.per_value > MAX_GROWTH:
            raise TooLarge(f"{_shown(node)} could make a value up to {bound.per_value:,} times as long as the "
                           f"longest value its tables hold; at most {MAX_GROWTH:,} times")
        if bound.squared > MAX_SQUARED:
            raise TooLarge(f"{_shown(node)} inserts values read from tables throughout others, over and over: its "
                           "length could grow as the square of the longest value its tables hold, or faster; "
                           f"at most {MAX_SQUARED} times that square")
        if bound.per_row and bound.fixed * ROWS_PER_BATCH > MAX_PER_BATCH:
            raise TooLarge(f"{_shown(node)} is made for every row with up to {bound.fixed:,} characters from "
                           f"constants, and a batch of {ROWS_PER_BATCH:,} rows is made at once; at most "
                           f"{MAX_PER_BATCH // ROWS_PER_BATCH:,} per row")

    def check_generated(self, tree: exp.Expression) -> None:
        """All the generating calls of the statement together, each as large as its bound's
        constant part: many calls, each within the limit, may still make too much."""
        total = sum(self.bound(node, None).fixed for node in tree.find_all(exp.Func) if _generates(node))
        if total > MAX_GENERATED:
            raise TooLarge(f"the statement makes {total:,} values from constants (repeat, lpad, range, ...); "
                           f"at most {MAX_GENERATED:,}: generate rows with a table function such as "
                           "FROM range(n) instead")

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
        elif isinstance(node, exp.Values):  # one column per position, named as the engine does
            rows = [row.expressions if isinstance(row, exp.Tuple) else [row] for row in node.expressions]
            width = max((len(row) for row in rows), default=0)
            outputs = [(f"column{index + 1}",
                        _most([self.bound(row[index], scope) for row in rows if index < len(row)]))
                       for index in range(width)]
        else:  # a table function: what its arguments make
            outputs = [("", _most([self.bound(argument, scope) for argument in node.expressions] or [ONE]))]
        return _renamed(scope, outputs)

    def _set_outputs(self, scope: Scope, node: exp.SetOperation) -> Outputs:
        left, right = (self._branch(side) for side in (node.left, node.right))
        first = self.outputs(left) if left else []
        if right is None:
            return first
        if left is not None and _recursive_cte(scope):
            return self._recursive(scope, left, right)
        if node.args.get("by_name"):  # columns matched by name: each may be any of the other side's
            second = self.outputs(right)
            return [(name, bound.most(_named(second, name) or _most([b for _, b in second])))
                    for name, bound in first]
        return _positional_most(first, self.outputs(right))

    def _branch(self, side: exp.Expression) -> Scope | None:
        return self.scope_of.get(id(side.unnest() if isinstance(side, exp.Subquery) else side))

    def _recursive(self, scope: Scope, anchor: Scope, step: Scope) -> Outputs:
        """A recursive CTE's columns after any number of steps, from its first steps over the
        anchor's rows: a column whose last step adds more than the one before grows geometrically.
        A column copying another starts growing a step later: one step per column, and two more.
        (sqlglot resolves the CTE's name inside it to its anchor.)"""
        rows = [self.outputs(anchor)]
        for _ in range(len(rows[0]) + 2):
            rows.append(_positional_most(rows[-1], self._stepped(scope, anchor, rows[-1], step)))
        for (name, before), (_, first), (_, second) in zip(_renamed(scope, rows[-3]), rows[-2], rows[-1]):
            if any(getattr(second, part) - getattr(first, part) > getattr(first, part) - getattr(before, part)
                   for part in ("fixed", "per_value", "squared")):
                raise TooLarge(f"the recursive CTE's column {name or '?'} grows by a factor at every step "
                               "(a text concatenated to itself, say): its values would double until no memory is left")
        return rows[-1]

    def _stepped(self, scope: Scope, anchor: Scope, rows: Outputs, step: Scope) -> Outputs:
        assumed = {**self.assumed, id(anchor.expression): _renamed(scope, rows)}
        return _Sizer(self.scopes, assumed).outputs(step)

    def _star(self, star: exp.Expression, scope: Scope) -> Outputs:
        """The columns ``*`` (or ``t.*``) stands for: of the sources the scope selects from (not
        every CTE it could), less those its EXCEPT drops, with those its REPLACE makes."""
        table = star.table if isinstance(star, exp.Column) else ""
        try:
            selected = {name: source for name, (_, source) in scope.selected_sources.items()}
        except OptimizeError:  # an alias used twice (which the engine refuses): every source it could be
            selected = dict(scope.sources)
        sources = [selected.get(table, scope.sources.get(table))] if table else list(selected.values())
        outputs: Outputs = []
        for source in sources:
            outputs.extend(self.outputs(source) if isinstance(source, Scope) else [("*", READ)])
        modifiers = star.this if isinstance(star, exp.Column) and isinstance(star.this, exp.Star) else star
        dropped = {column.name.lower() for column in modifiers.args.get("except_") or []}
        outputs = [(name, bound) for name, bound in outputs if name not in dropped]
        for made in modifiers.args.get("replace") or []:
            # A replaced column holds what its expression makes, read over the same sources.
            outputs = [(name, bound) for name, bound in outputs if name != made.alias_or_name.lower()]
            outputs.append((made.alias_or_name.lower(), self.bound(made.this, scope)))
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

    def _text(self, node: exp.Expression | None) -> Bound:
        """A value as a function that takes text reads it: a list written out."""
        return self._of(node).as_text()

    def _of(self, node: exp.Expression | None) -> Bound:
        if node is None:
            return NOTHING
        inner = self._scope_value(node)
        return inner if inner is not None else self.bounds.get(id(node), ONE)

    def _bound_of(self, node: exp.Expression, scope: Scope | None) -> Bound:
        if isinstance(node, exp.Literal):
            return Bound(max(1, len(node.this)))
        if isinstance(node, exp.Column):
            return ONE if node.is_star else self._column(node, scope)
        children = [self._of(child) for child in node.iter_expressions()]
        multiplied = self._multiplied(node, children)
        if multiplied is not None:
            return multiplied
        if isinstance(node, _SMALL_NODES) or call_name(node) in SMALL_RESULTS:
            return Bound(SCALAR.fixed, per_row=any(child.per_row for child in children))
        if isinstance(node, exp.Window):
            return self._of(node.this)
        if isinstance(node, exp.Tuple) and not isinstance(node.parent, exp.Values):
            return sum(children, NOTHING)  # (a, b) in an expression is a struct holding both
        if isinstance(node, _CHOICES) or not isinstance(node, (exp.Func, exp.DPipe)):
            return _most(children)  # one of its parts (a clause, a VALUES row, a CASE's branch)
        if _makes_a_list(node):
            return sum(children, NOTHING).as_list()
        if not children:
            return SCALAR  # version(), now(), uuid(): a few characters, not one
        # A function of several values may hold them all, and one that is not a list function may
        # hold a list it was given as text (concat, regexp_replace, a cast and || all write one).
        return sum((child.as_text() for child in children), NOTHING)

    def _multiplied(self, node: exp.Expression, children: list[Bound]) -> Bound | None:
        """The bound of a call that multiplies what it is given; None for any other."""
        name, arguments = call_name(node), node.expressions if isinstance(node, exp.Anonymous) else []
        if isinstance(node, exp.Repeat) or (name in ("array_repeat", "list_repeat") and len(arguments) >= 2):
            repeated, times = (node.this, node.args.get("times")) if isinstance(node, exp.Repeat) else arguments[:2]
            if isinstance(node, exp.Repeat):
                return self._of(repeated).most(ONE).times(_size(times))
            return self._of(repeated).most(ELEMENT).times(_size(times)).as_list()
        if isinstance(node, exp.Pad):
            return Bound(_size(node.args.get("expression")), per_row=any(child.per_row for child in children))
        if name in ("array_resize", "list_resize") and len(arguments) >= 2:
            fill = self._of(arguments[2]) if len(arguments) > 2 else ONE
            return (Bound(_size(arguments[1])).mul(fill.most(ELEMENT)) + self._of(arguments[0])).as_list()
        if isinstance(node, (exp.GenerateSeries, exp.ExplodingGenerateSeries)) or name in ("range", "generate_series"):
            if isinstance(node.parent, (exp.Table, exp.Lateral)):
                return ONE  # a table function: one small value per row
            if isinstance(node, exp.Anonymous):
                if not arguments:
                    return ONE  # refused by the engine
                return ELEMENT.times(_span(arguments if len(arguments) > 1 else [None, arguments[0]])).as_list()
            return ELEMENT.times(_span([node.args.get("start"), node.args.get("end"), node.args.get("step")])).as_list()
        if isinstance(node, exp.Replace):
            return self._replaced(node)
        if isinstance(node, exp.RegexpReplace):
            return self._regexp_replaced(node)
        if name == "embed":  # a vector of the model's width, whatever the text
            return Bound(EMBEDDING_ELEMENTS, per_row=any(child.per_row for child in children), listed=True)
        if isinstance(node, (exp.Encode, exp.Hex, exp.ToBase64)) or name in ("encode", "to_hex", "to_base64") and arguments:
            # Written from bytes: a character is up to four, eight hex digits.
            return self._text(node.this if not arguments else arguments[0]).times(8)
        if isinstance(node, (exp.Upper, exp.Lower, exp.Initcap)) or name in ("upper", "lower", "initcap") and arguments:
            # Case mapping may lengthen a character: 'ß' is 'SS', 'ΐ' three characters in capitals.
            return self._text(node.this if not arguments else arguments[0]).times(3)
        if isinstance(node, exp.ArrayToString) or (name in ("list_to_string", "list_join") and len(arguments) >= 2):
            listed, separator = (node.this, node.expression) if not arguments else arguments[:2]
            # Each element as text, and the separator once per element.
            return replace(self._of(listed).mul(Bound(ELEMENT_TEXT) + self._text(separator)), listed=False)
        if isinstance(node, exp.ConcatWs) and node.expressions:
            separator, *parts = [self._text(part) for part in node.expressions]
            return separator.times(max(0, len(parts) - 1)) + sum(parts, NOTHING)
        if name in _REPLACE_IN_LISTS and len(arguments) >= 3:
            return self._of(arguments[0]).mul(ONE + self._of(arguments[2])).as_list()
        if isinstance(node, exp.Cast) and node.to.is_type(*exp.DataType.TEXT_TYPES) or name == "arrow_cast":
            # A number, a date or an interval as text: as many characters as it takes, whatever
            # the one character it was made from (a 76-digit decimal from '1').
            value = node.this if isinstance(node, exp.Cast) else arguments[0] if arguments else None
            return self._text(value).most(SCALAR)
        if isinstance(node, exp.TimeToStr) or name in ("to_char", "date_format"):
            # Each format character may stand for a long field: '%c' is 24 characters.
            return self._text(node.args.get("format") if not arguments else arguments[-1]).times(FORMAT_FIELD) + SCALAR
        if isinstance(node, (exp.GroupConcat, exp.ArrayAgg)) or name in _AGGREGATES:
            return self._aggregated(node, children)
        return None

    def _replaced(self, node: exp.Replace) -> Bound:
        found, replacement = node.args.get("expression"), node.args.get("replacement")
        if not (isinstance(found, exp.Literal) and found.is_string and found.this):
            # An empty or unknown search may match between every two characters.
            return self._text(node.this).mul(ONE + self._text(replacement)) + self._text(replacement)
        chain = _literal_replacements(node)
        if chain is not None:
            base, factors = chain
            return self._text(base).times(max(factors))
        return self._text(node.this).mul(self._text(replacement).divided(len(found.this)).most(ONE))

    def _regexp_replaced(self, node: exp.RegexpReplace) -> Bound:
        """Matches of a pattern at least ``width`` long become the replacement's text and its group
        references (each at most a copy of the whole text); an empty match may come anywhere."""
        text, replacement = self._text(node.this), node.args.get("replacement")
        width = _shortest_match(node.args.get("expression"))
        if width and isinstance(replacement, exp.Literal) and replacement.is_string:
            references = len(_GROUP_REFERENCE.findall(replacement.this))
            literal = len(_GROUP_REFERENCE.sub("", replacement.this))
            return text.times(1 + references + -(-literal // width))
        return text.mul(ONE + self._text(replacement)) + self._text(replacement)

    def _aggregated(self, node: exp.Expression, children: list[Bound]) -> Bound:
        wrapper = node.parent
        while isinstance(wrapper, (exp.Filter, exp.IgnoreNulls, exp.RespectNulls)):
            wrapper = wrapper.parent
        if isinstance(wrapper, exp.Window):
            raise TooLarge(f"{_shown(node)} as a window function makes, for every row, a value of all the rows "
                           "before it: aggregate it with GROUP BY instead")
        listing = isinstance(node, exp.ArrayAgg) or call_name(node) == "array_agg"
        gathered = sum(children if listing else (child.as_text() for child in children), NOTHING)
        if gathered.fixed > MAX_AGGREGATED:
            raise TooLarge(f"{_shown(node)} adds up to {gathered.fixed:,} characters of constants for every row it "
                           f"gathers; at most {MAX_AGGREGATED:,}")
        if gathered.gathered >= MAX_GATHERINGS:
            # Each gathering multiplies by its rows, which a join with a few constant rows makes
            # as many as wanted: a chain of them doubles a value at every step, unseen.
            raise TooLarge(f"{_shown(node)} gathers values that were gathered from rows {gathered.gathered} times "
                           f"over already; at most {MAX_GATHERINGS} string_agg/array_agg, one over another")
        made = replace(gathered, gathered=gathered.gathered + 1)
        return made.as_list() if listing else made

    def _column(self, column: exp.Column, scope: Scope | None) -> Bound:
        """A column's bound: what its CTE or subquery made it of, or a table's value. A name the
        gate cannot resolve (an unnamed expression's, a duplicated alias) is as large as any."""
        name, table = column.name.lower(), column.table
        while scope is not None:
            sources = scope.sources
            if table:
                source = sources.get(table)
                if isinstance(source, Scope):
                    found = _named(self.outputs(source), name)
                    return found if found is not None else self._any_column()
                if source is not None:
                    return READ
            else:
                derived = [self.outputs(source) for source in sources.values() if isinstance(source, Scope)]
                found = [bound for bound in (_named(outputs, name) for outputs in derived) if bound is not None]
                if found:
                    return _most(found)
                if any(not isinstance(source, Scope) for source in sources.values()):
                    unnamed = [bound for outputs in derived for column_name, bound in outputs if not column_name]
                    return _most([READ, *unnamed])  # a table's, unless an unnamed expression's beside it
            scope = scope.parent
        return self._any_column()

    def _any_column(self) -> Bound:
        if self.any_column is not None:
            return self.any_column
        largest = _most([READ] + [bound for scope in self.scopes for _, bound in self.outputs(scope)])
        if not self.busy:  # while a scope is being bounded its columns are not known yet: not final
            self.any_column = largest
        return largest


def call_name(node: exp.Expression) -> str:
    """A function call's name, lowercase; "" for anything else."""
    if isinstance(node, exp.Anonymous):
        return node.name.lower()  # without the quotes of a quoted name
    return node.sql_name().lower() if isinstance(node, exp.Func) else ""


def _generates(node: exp.Expression) -> bool:
    """A call that makes values from a size, as one value (a table function's rows stream)."""
    if isinstance(node.parent, (exp.Table, exp.Lateral)):
        return False
    return (isinstance(node, (exp.Repeat, exp.Pad, exp.GenerateSeries, exp.ExplodingGenerateSeries))
            or call_name(node) in _GENERATING_CALLS)


def _makes_a_list(node: exp.Expression) -> bool:
    name = call_name(node)
    return (isinstance(node, (exp.Array, exp.ArrayAgg, exp.GenerateSeries))
            or name.startswith(("array", "list", "make_array")) or name in _LIST_CALLS)


def _literal_replacements(node: exp.Replace) -> tuple[exp.Expression, list[int]] | None:
    """A chain of replace calls of text literals, as in escaping HTML: (what it starts from, each
    call's growth), when no search after the first is more than one character or finds text an
    earlier call put in; each character of the start then grows once at most. None otherwise."""
    pairs: list[tuple[str, str]] = []
    current: exp.Expression = node
    while isinstance(current, exp.Replace):
        found, replacement = current.args.get("expression"), current.args.get("replacement")
        if not all(isinstance(part, exp.Literal) and part.is_string for part in (found, replacement)) or not found.this:
            break
        pairs.append((found.this, replacement.this))
        current = current.this
    pairs.reverse()
    if len(pairs) < 2:
        return None
    for index, (found, _) in enumerate(pairs[1:], start=1):
        if len(found) != 1 or any(found in earlier for _, earlier in pairs[:index]):
            return None
    return current, [max(1, -(-len(replacement) // len(found))) for found, replacement in pairs]


def _shortest_match(pattern: exp.Expression | None) -> int:
    """How short a match of a literal pattern can be; 0 when it may be empty or is not known."""
    if not (isinstance(pattern, exp.Literal) and pattern.is_string) or _READ_ALIKE.fullmatch(pattern.this) is None:
        return 0
    try:
        return int(regex_parser.parse(pattern.this).getwidth()[0])
    except Exception:
        return 0


def _named(outputs: Outputs, name: str) -> Bound | None:
    """The bound of the column ``name`` (a table's star gives every name); None if none is."""
    found = [bound for column, bound in outputs if column in (name, "*")]
    return _most(found) if found else None


def _most(bounds: list[Bound]) -> Bound:
    result = ONE
    for bound in bounds:
        result = result.most(bound)
    return result


def _positional_most(first: Outputs, second: Outputs) -> Outputs:
    if len(first) != len(second):
        return [(name, _most([bound for _, bound in first + second])) for name, _ in first or second]
    return [(name, bound.most(other)) for (name, bound), (_, other) in zip(first, second)]


def _renamed(scope: Scope, outputs: Outputs) -> Outputs:
    """A CTE's or an aliased subquery's column list names its columns in order."""
    node = scope.expression
    alias = node.args.get("alias") or (node.parent.args.get("alias") if node.parent is not None else None)
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
