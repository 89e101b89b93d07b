"""Decode a ``pyarrow.compute.Expression`` into the planner's filter type.

DataFusion hands filters to a Python dataset as ``pc.Expression`` objects, which
pyarrow offers no public way to walk. Their pickled form is Arrow's own
expression serialization: an Arrow IPC file whose schema metadata lists the
tree in prefix order (``call``/``field_ref``/``literal``/``options``/``end``) and
whose columns hold the literal values with their exact types. The metadata has
repeated keys, which ``Schema.metadata`` (a dict) would lose, so the file footer
is read directly. pyarrow is pinned; tests/test_arrow_expr.py guards the format.

Anything that is not understood decodes to None; under an AND only that part is
dropped (the planner re-applies the exact filter locally), elsewhere the whole
sub-expression is.
"""
from __future__ import annotations

import struct

import pyarrow as pa
import pyarrow.compute as pc

from federation import expr as fx

_COMPARISONS = {
    "equal": "=", "not_equal": "!=", "less": "<", "less_equal": "<=",
    "greater": ">", "greater_equal": ">=",
}


def decode(expression: pc.Expression | None) -> fx.Expr | None:
    return decode_fully(expression)[0]


def decode_fully(expression: pc.Expression | None) -> tuple[fx.Expr | None, bool]:
    """(the decoded filter, whether it is the whole filter: nothing was dropped)."""
    if expression is None:
        return None, True
    _, (buffer,) = expression.__reduce__()
    tokens, literals = _read_serialized(buffer)
    dropped: list[bool] = []
    node, end = _parse(tokens, literals, 0, dropped)
    if end != len(tokens) or node is None or node is _UNKNOWN:
        return None, False
    return node, not dropped



# ---- the serialized form -------------------------------------------------

def _read_serialized(buffer: pa.Buffer) -> tuple[list[tuple[str, str]], list[object]]:
    data = memoryview(buffer)
    footer_length = struct.unpack_from("<i", data, len(data) - 10)[0]
    footer_start = len(data) - 10 - footer_length
    footer = footer_start + _u32(data, footer_start)
    schema = _deref(data, _field(data, footer, 1))
    metadata_field = _field(data, schema, 2)
    tokens = []
    if metadata_field is not None:
        for entry in _vector(data, metadata_field):
            key_value = _deref(data, entry)
            tokens.append((_string(data, _field(data, key_value, 0)),
                           _string(data, _field(data, key_value, 1))))
    reader = pa.ipc.open_file(buffer)
    batch = reader.get_batch(0) if reader.num_record_batches else None
    literals = [] if batch is None else [column[0].as_py() for column in batch.columns]
    return tokens, literals


def _u32(data: memoryview, pos: int) -> int:
    return struct.unpack_from("<I", data, pos)[0]


def _deref(data: memoryview, pos: int) -> int:
    return pos + _u32(data, pos)


def _field(data: memoryview, table: int, index: int) -> int | None:
    """Absolute position of field ``index`` of the flatbuffer table at ``table``."""
    vtable = table - struct.unpack_from("<i", data, table)[0]
    vtable_length = struct.unpack_from("<H", data, vtable)[0]
    slot = 4 + 2 * index
    if slot >= vtable_length:
        return None
    offset = struct.unpack_from("<H", data, vtable + slot)[0]
    return table + offset if offset else None


def _vector(data: memoryview, pos: int) -> list[int]:
    start = _deref(data, pos)
    return [start + 4 + 4 * i for i in range(_u32(data, start))]


def _string(data: memoryview, pos: int) -> str:
    start = _deref(data, pos)
    return bytes(data[start + 4:start + 4 + _u32(data, start)]).decode()


# ---- the tree ----------------------------------------------------------

_UNKNOWN = object()


def _parse(tokens: list[tuple[str, str]], literals: list[object], i: int, dropped: list[bool]):
    key, value = tokens[i]
    if key == "literal":
        return fx.Literal(literals[int(value)]), i + 1
    if key == "field_ref":
        return fx.Column(value), i + 1
    if key == "nested_field_ref":
        j = i + 1
        for _ in range(int(value)):
            _, j = _parse(tokens, literals, j, dropped)
        return _UNKNOWN, j
    if key != "call":
        raise ValueError(f"unexpected token {key!r} in a serialized expression")
    args, options, j = [], None, i + 1
    while tokens[j][0] != "end":
        if tokens[j][0] == "options":
            options = literals[int(tokens[j][1])]
            j += 1
            continue
        arg, j = _parse(tokens, literals, j, dropped)
        args.append(arg)
    return _build(value, args, options, dropped), j + 1


def _build(function: str, args: list, options: dict | None, dropped: list[bool]):
    if function in _COMPARISONS and len(args) == 2:
        left, right = args
        if _UNKNOWN in (left, right) or None in (left, right):
            return None
        op = _COMPARISONS[function]
        if isinstance(left, fx.Literal) and isinstance(right, fx.Column):
            return fx.Compare(fx.FLIPPED[op], right, left)
        return fx.Compare(op, left, right)
    if function in ("and", "and_kleene"):
        kept = tuple(a for a in args if a is not None and a is not _UNKNOWN)
        if len(kept) < len(args):
            dropped.append(True)
        return fx.And(kept) if len(kept) > 1 else (kept[0] if kept else None)
    if function in ("or", "or_kleene"):
        if any(a is None or a is _UNKNOWN for a in args):
            return None
        return fx.Or(tuple(args))
    if function == "invert" and _known(args):
        return fx.Not(args[0])
    if function == "is_null" and _known(args) and not (options or {}).get("nan_is_null"):
        return fx.IsNull(args[0])
    if function == "is_valid" and _known(args):
        return fx.Not(fx.IsNull(args[0]))
    if function == "is_in" and _known(args) and options:
        values = options.get("value_set") or []
        if any(v is None for v in values):
            return None  # NULL matching rules differ between engines
        return fx.InList(args[0], tuple(values))
    return None


def _known(args: list) -> bool:
    return len(args) == 1 and args[0] is not None and args[0] is not _UNKNOWN


# ---- the other way: planner filters to pyarrow ---------------------------

_ARROW_COMPARISONS = {
    "=": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b,
}


# Comparisons as the planner makes them, where pyarrow's differ: NaN is above every number and
# equal to itself (pyarrow's comparisons with NaN are all false). Each gives the rows, of two
# non-NULL sides, that the planner's comparison keeps and pyarrow's does not, from whether each
# side is NaN; != keeps fewer (NaN != NaN is false).
_NAN_ALSO = {
    "=": lambda left, right: left & right,
    "<": lambda left, right: ~left & right,
    "<=": lambda left, right: right,
    ">": lambda left, right: left & ~right,
    ">=": lambda left, right: left,
}


def _compared(expression: fx.Compare) -> pc.Expression:
    left, right = to_arrow(expression.left), to_arrow(expression.right)
    plain = _ARROW_COMPARISONS[expression.op](left, right)
    # A float literal: the planner cast it to the column's type, so the column holds floats too.
    if not any(isinstance(side, fx.Literal) and isinstance(side.value, float)
               for side in (expression.left, expression.right)):
        return plain
    left_nan, right_nan = pc.is_nan(left), pc.is_nan(right)
    if expression.op == "!=":
        return plain & ~(left_nan & right_nan)
    return plain | (_NAN_ALSO[expression.op](left_nan, right_nan) & left.is_valid() & right.is_valid())


def to_arrow(expression: fx.Expr) -> pc.Expression:
    """A planner filter as a pyarrow expression (for pyarrow-backed scans), meaning what it
    means to the planner."""
    if isinstance(expression, fx.Column):
        return pc.field(expression.name)
    if isinstance(expression, fx.Literal):
        return pc.scalar(expression.value)
    if isinstance(expression, fx.Compare):
        return _compared(expression)
    if isinstance(expression, fx.And):
        result = to_arrow(expression.args[0])
        for arg in expression.args[1:]:
            result = result & to_arrow(arg)
        return result
    if isinstance(expression, fx.Or):
        result = to_arrow(expression.args[0])
        for arg in expression.args[1:]:
            result = result | to_arrow(arg)
        return result
    if isinstance(expression, fx.Not):
        return ~to_arrow(expression.arg)
    if isinstance(expression, fx.IsNull):
        return to_arrow(expression.arg).is_null()
    if isinstance(expression, fx.InList):
        return to_arrow(expression.arg).isin(list(expression.values))
    raise TypeError(f"not a filter expression: {expression!r}")


def referenced_fields(expression: pc.Expression | None) -> set[str]:
    """Every column an arrow expression names, including parts decode() cannot express."""
    if expression is None:
        return set()
    _, (buffer,) = expression.__reduce__()
    tokens, _ = _read_serialized(buffer)
    return {value for key, value in tokens if key == "field_ref"}
