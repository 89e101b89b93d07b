"""Whole statements for a backend that takes any read-only SELECT over its tables (DuckDB
copies): the client's statement translated, not DataFusion's plan unparsed.

The unparser cannot write back what the optimizer made of correlated subqueries, EXISTS,
IN (subquery) or semi/anti joins, and it writes a plan whose decimal arithmetic DuckDB
computes otherwise. For a connector that declares ``takes_whole_statements`` (local,
read-only copies in one DuckDB) the original statement is parsed as DataFusion reads it
(PostgreSQL's grammar), its tables resolved and typed with sqlglot's optimizer, and written
in DuckDB's dialect with DataFusion's semantics kept where the two engines differ:

- integer / integer is DataFusion's truncating integer division (DuckDB's ``/`` gives a
  double); ``avg`` of a decimal column and a decimal / decimal in the result are computed
  exactly in integers and truncated at DataFusion's scale, as DataFusion does (DuckDB
  divides decimals as doubles and rounds);
- each result column is cast to the type DataFusion's plan gives it (decimal precision and
  scale, integer widths, ``extract`` as Int32, a date plus an interval as a date);
- DESC puts NULLs first (sqlglot writes the PostgreSQL ordering explicitly).

What is refused (the query then runs in DataFusion, or through the plan's own pushdown):
anything DataFusion does not plan as the same tables the statement names, a division or
cast whose operand types sqlglot cannot tell, a cast to an integer from a non-integer
(DataFusion truncates, DuckDB rounds) or to text (formats differ), an ``avg`` of a decimal
expression other than a column, a decimal division inside an expression, LIKE with a bound
pattern or a backslash (DuckDB has no default escape), ILIKE (DuckDB lowers both sides,
DataFusion folds case as Unicode does), ``substring`` with a start or length
other than a positive literal (DuckDB counts a negative start from the end), ``extract`` of
fields the engines may number differently, text literals that are not values of DataFusion's
plan, and every construct outside the statement validator's allow-list for whole statements
(``federation.backend_statement``).
"""
from __future__ import annotations

import decimal
import logging
import re
from typing import Mapping

import pyarrow as pa
import sqlglot
from datafusion import DataFrame
from sqlglot import exp
from sqlglot.optimizer.annotate_types import annotate_types
from sqlglot.optimizer.qualify import qualify

from federation.backend_statement import StatementRefused, bound_statement, log_refusal_once, table_key
from federation.catalog import CATALOG_NAME, DEFAULT_SCHEMA, Catalog, Dataset
from federation.connectors.base import SqlConnector
from federation.optimized import optimized_plan
from federation.pushdown import RemoteQuery, sql_backend, table_scans
from federation.tokens import parse_postgres

log = logging.getLogger("flightdeck.pushdown")

READ_AS = "postgres"  # DataFusion's grammar, as near as sqlglot has it
Type = exp.DataType.Type
INTEGER_TYPES = exp.DataType.INTEGER_TYPES
DECIMAL_TYPES = {Type.DECIMAL}
EXACT_DIGITS = 15  # numbers of up to 15 significant digits order as their Float64s do
FLOAT_TYPES = {Type.DOUBLE, Type.FLOAT}
TEXT_TYPES = {Type.VARCHAR, Type.TEXT}
TEMPORAL_TYPES = {Type.DATE, Type.TIMESTAMP, Type.TIME}
# Fields that both engines extract as the same whole number.
SAME_EXTRACT_PARTS = {"year", "quarter", "month", "day", "hour", "minute"}
_UTF8_LITERAL = re.compile(r'Utf8(?:View)?\("((?:[^"\\]|\\.)*)"\)')


def translated_statement(frame: DataFrame, result: pa.Schema, sql: str, catalog: Catalog,
                         values: Mapping[str, object] | None = None) -> RemoteQuery | None:
    """The whole query as one statement for its backend, translated from ``sql``; None when
    its tables are not all on one backend that takes whole statements, or it is refused.
    ``result``: the schema of the rows ``frame`` yields, which the statement's must be."""
    datasets = _scanned(frame, catalog)
    if datasets is None:
        return None
    connector = datasets[0][1]
    try:
        tree, copies = _translate(sql, result, datasets, connector)
        statement = bound_statement(tree, connector.dialect, connector.renderer.param_style, None,
                                    dict(values) if values else None, copies,
                                    whole=True, plan_texts=_plan_texts(frame))
    except StatementRefused as refused:
        log_refusal_once(f"whole statement: {refused}")
        return None
    except sqlglot.errors.SqlglotError as error:  # a statement sqlglot cannot read or resolve
        log_refusal_once(f"whole statement: sqlglot: {(str(error).splitlines() or [''])[0]}")
        return None
    except Exception:  # never fail a query because it could not be translated: the plan's way
        log.warning("whole statement not translated", exc_info=True)
        return None
    return RemoteQuery(connector, statement.sql, statement.params)


def _scanned(frame: DataFrame, catalog: Catalog) -> list[tuple[Dataset, SqlConnector]] | None:
    """Each dataset the optimized plan scans, with its backend, when all share one backend
    that takes whole statements."""
    scans = [tuple(p for p in node.to_variant().fqn() if p) for node in table_scans(optimized_plan(frame))]
    found = []
    for fqn in scans:
        dataset = catalog.scanned(fqn)
        connector = sql_backend(dataset)
        if connector is None or not getattr(connector, "takes_whole_statements", False):
            return None
        found.append((dataset, connector))
    if not found or any(c is not found[0][1] for _, c in found):
        return None
    return found


def _translate(sql: str, result: pa.Schema, datasets: list[tuple[Dataset, SqlConnector]],
               connector: SqlConnector) -> tuple[exp.Expression, set[tuple[str, ...]]]:
    """The statement in the backend's dialect, and the backend tables it may read."""
    tree = parse_postgres(sql)
    if not isinstance(tree, exp.Select):
        raise StatementRefused(f"not a single SELECT ({type(tree).__name__})")
    schema = _schema(dataset for dataset, _ in datasets)
    # Every table named is resolved against the scanned datasets only: a table the plan does
    # not scan fails here, and every column gets its table.
    tree = qualify(tree, schema=schema, catalog=CATALOG_NAME, db=DEFAULT_SCHEMA, dialect=READ_AS,
                   expand_stars=True, validate_qualify_columns=True, quote_identifiers=True)
    tree = annotate_types(tree, schema=schema, dialect=READ_AS)
    if not isinstance(tree, exp.Select) or any(isinstance(e, exp.Star) for e in tree.expressions):
        raise StatementRefused("the result's columns are not listed")
    if len(tree.expressions) != len(result):
        raise StatementRefused("the statement lists another number of columns than the plan")
    _keep_datafusion_semantics(tree, result)
    copies = _point_at_copies(tree, {d.qualified_name: d for d, _ in datasets}, connector)
    return tree, copies


def _schema(datasets) -> dict:
    """The datasets' columns, typed, as sqlglot's optimizer reads a schema."""
    schema: dict = {}
    for dataset in datasets:
        columns = {field.name: exp.DataType.build(_sql_type(field.type), dialect="duckdb")
                   for field in dataset.arrow_schema}
        schema.setdefault(CATALOG_NAME, {}).setdefault(dataset.spec.schema_name, {})[dataset.spec.table_name] = columns
    return schema


def _sql_type(arrow: pa.DataType) -> str:
    if pa.types.is_decimal(arrow):
        return f"DECIMAL({arrow.precision}, {arrow.scale})"
    for check, name in _TYPE_NAMES:
        if check(arrow):
            return name
    return "UNKNOWN"


_TYPE_NAMES = ((pa.types.is_int8, "TINYINT"), (pa.types.is_int16, "SMALLINT"), (pa.types.is_int32, "INT"),
               (pa.types.is_int64, "BIGINT"), (pa.types.is_uint8, "UTINYINT"), (pa.types.is_uint16, "USMALLINT"),
               (pa.types.is_uint32, "UINT"), (pa.types.is_uint64, "UBIGINT"), (pa.types.is_float32, "FLOAT"),
               (pa.types.is_float64, "DOUBLE"), (pa.types.is_boolean, "BOOLEAN"), (pa.types.is_date, "DATE"),
               (pa.types.is_string, "VARCHAR"), (pa.types.is_large_string, "VARCHAR"),
               (pa.types.is_string_view, "VARCHAR"), (pa.types.is_timestamp, "TIMESTAMP"))


def _keep_datafusion_semantics(tree: exp.Select, result: pa.Schema) -> None:
    """Rewrite, in place, what DuckDB would compute otherwise than DataFusion (see above)."""
    for node in list(tree.walk()):
        if isinstance(node, exp.Div):
            _division(node)
        elif isinstance(node, exp.Avg):
            _average(node)
        elif isinstance(node, exp.Cast):
            _cast(node)
        elif isinstance(node, exp.Literal) and node.is_number and not node.is_int:
            _float_literal(node)
        elif isinstance(node, (exp.Like, exp.ILike)):
            _pattern(node)
        elif isinstance(node, exp.Extract) and node.name.lower() not in SAME_EXTRACT_PARTS:
            raise StatementRefused(f"extract({node.name}) may differ between the engines")
        elif isinstance(node, exp.Substring):
            _substring(node)
    for position, (expression, field) in enumerate(zip(list(tree.expressions), result)):
        if pa.types.is_duration(field.type):  # a timestamp minus a timestamp: DuckDB makes an interval
            raise StatementRefused("a duration in the result")
        tree.expressions[position].replace(_cast_result(expression, field.type))


def _cast(node: exp.Cast) -> None:
    """Casts both engines compute alike: a text literal to a date or time (``date '...'``),
    text to text, any number to a float, an integer to an integer or a decimal. Not a float or
    decimal to an integer (DataFusion truncates, DuckDB rounds), nor anything to text (the
    engines format numbers and times differently)."""
    target, operand = node.to.this, _type_of(node.this)
    literal_text = isinstance(node.this, exp.Literal) and node.this.is_string
    integer = operand in INTEGER_TYPES or (isinstance(node.this, exp.Literal) and node.this.is_int)
    if target in TEMPORAL_TYPES and literal_text:
        return
    if target in TEXT_TYPES and (literal_text or operand in TEXT_TYPES):
        return
    if target in FLOAT_TYPES and (integer or operand in FLOAT_TYPES | DECIMAL_TYPES):
        return
    if (target in INTEGER_TYPES or target in DECIMAL_TYPES) and integer:
        return
    raise StatementRefused(f"a cast that the engines may compute differently: {node.sql()[:60]}")


def _pattern(node: exp.Like | exp.ILike) -> None:
    """DuckDB's LIKE has no default escape character: a pattern must be a literal without a
    backslash (a bound pattern's text is not known when the statement is written). ILIKE is
    not sent: DataFusion folds case as Unicode does (``'ſ' ILIKE 's'``), DuckDB lowers both
    sides, whatever the pattern."""
    if isinstance(node, exp.ILike):
        raise StatementRefused("ILIKE folds case otherwise in DuckDB")
    pattern = node.expression
    if not (isinstance(pattern, exp.Literal) and pattern.is_string) or "\\" in pattern.this:
        raise StatementRefused("a LIKE pattern that is not a literal without a backslash")


def _substring(node: exp.Substring) -> None:
    """A start or length below 1 means other things to each engine (DuckDB counts a negative
    start from the end): only positive integer literals."""
    for part in (node.args.get("start"), node.args.get("length")):
        if part is not None and not (isinstance(part, exp.Literal) and part.is_int and int(part.this) >= 1):
            raise StatementRefused("substring with a start or length other than a positive literal")


def _division(node: exp.Div) -> None:
    left, right = _type_of(node.left), _type_of(node.right)
    if left in INTEGER_TYPES and right in INTEGER_TYPES:
        node.replace(exp.IntDiv(this=node.left, expression=node.right))
    elif left is None or right is None or Type.UNKNOWN in (left, right):
        raise StatementRefused("a division whose operand types are unknown")
    elif not _top_level(node) and not (_is_float(node.left) or _is_float(node.right)):
        raise StatementRefused("a decimal division inside an expression")  # DuckDB's is a double
    else:
        node.set("typed", False)  # an operand is not an integer: "/" means the same in both


def _top_level(node: exp.Expression) -> bool:
    """A result column of the outermost SELECT (under an alias or parentheses)."""
    parent = node.parent
    while isinstance(parent, (exp.Paren, exp.Alias)):
        parent = parent.parent
    return isinstance(parent, exp.Select) and parent.parent is None and node.parent_select is parent


def _is_float(node: exp.Expression) -> bool:
    return _type_of(node) in FLOAT_TYPES


def _float_literal(node: exp.Literal) -> None:
    """DataFusion reads ``0.2`` as a Float64, DuckDB as a decimal: in arithmetic with a
    column (``0.2 * avg(x)``, ``sum(x) / 7.0``) the result is a double, as in DataFusion.
    Constant arithmetic and comparisons keep DuckDB's decimal (see ``_compared_exactly``)."""
    top = node
    while isinstance(top.parent, (exp.Add, exp.Sub, exp.Mul, exp.Div, exp.Paren, exp.Neg)):
        top = top.parent
    if top is not node and any(isinstance(n, (exp.Column, exp.AggFunc)) for n in top.walk()):
        node.replace(exp.Cast(this=node.copy(), to=exp.DataType.build("DOUBLE")))
    else:
        _compared_exactly(node, top)


def _compared_exactly(node: exp.Literal, top: exp.Expression) -> None:
    """DataFusion compares a column with ``0.2`` as Float64s (or as the column's type, where the
    constant converts without loss), DuckDB exactly. They agree while the numbers compared have
    at most 15 significant digits and stay below 2^53: such numbers order as their Float64s do.
    ``big = 9223372036854775807.0`` or ``d = 2.5000000000000000001`` would not."""
    value = decimal.Decimal(node.this)
    if len(value.normalize().as_tuple().digits) > EXACT_DIGITS or abs(value) >= 2 ** 53:
        raise StatementRefused(f"a number of more than {EXACT_DIGITS} significant digits compared")
    comparison = top.parent
    if isinstance(comparison, (exp.In, exp.Between)):
        operands = [comparison.this]
    elif isinstance(comparison, (exp.EQ, exp.NEQ, exp.GT, exp.GTE, exp.LT, exp.LTE)):
        operands = [comparison.left if comparison.right is top else comparison.right]
    else:
        return
    for operand in operands:
        if _type_of(operand) in DECIMAL_TYPES and _decimal_precision(operand) > EXACT_DIGITS:
            raise StatementRefused(f"a decimal of more than {EXACT_DIGITS} digits compared with a fraction")


def _decimal_precision(node: exp.Expression) -> int:
    """A decimal expression's precision where its type says (a column's), else more than any."""
    parameters = node.type.expressions if node.type is not None else []
    return int(parameters[0].name) if len(parameters) == 2 else 39


def _average(node: exp.Avg) -> None:
    """DataFusion's avg of a Decimal(p, s) is a Decimal(p + 4, s + 4): the sum over the count,
    truncated at that scale."""
    operand = node.this
    if _type_of(operand) not in DECIMAL_TYPES:
        return
    if not isinstance(operand, exp.Column) or node.args.get("distinct"):
        raise StatementRefused("avg of a decimal expression")
    scale = decimal_scale(operand)
    node.replace(_exact_quotient(exp.Sum(this=operand.copy()), exp.Count(this=operand.copy(), big_int=True), min(scale + 4, 38)))


def _exact_quotient(numerator: exp.Expression, denominator: exp.Expression, scale: int) -> exp.Expression:
    """numerator / denominator as a decimal of ``scale``, truncated toward zero like
    DataFusion's decimal division: in DuckDB's 128-bit integers, then scaled back exactly."""
    numerator_scale, denominator_scale = decimal_scale(numerator), decimal_scale(denominator)
    shift = scale - numerator_scale + denominator_scale
    if shift < 0:
        raise StatementRefused("a decimal division to a smaller scale")
    top = exp.Mul(this=_unscaled(numerator, numerator_scale), expression=exp.Literal.number(10 ** shift))
    quotient = exp.IntDiv(this=top, expression=_unscaled(denominator, denominator_scale))
    whole = exp.Cast(this=quotient, to=exp.DataType.build("DECIMAL(38, 0)"))
    if scale == 0:
        return exp.Paren(this=whole)
    return exp.Paren(this=exp.Mul(this=whole, expression=exp.Literal.number("0." + "0" * (scale - 1) + "1")))


def _unscaled(expression: exp.Expression, scale: int) -> exp.Expression:
    shifted = exp.Mul(this=exp.Paren(this=expression), expression=exp.Literal.number(10 ** scale))
    return exp.Cast(this=shifted, to=exp.DataType.build("HUGEINT", dialect="duckdb"))


def decimal_scale(node: exp.Expression) -> int:
    """The scale DuckDB gives an exact numeric expression (a product adds its operands'
    scales, a sum keeps the larger); StatementRefused for anything else."""
    node = _strip(node)
    kind = _type_of(node)
    if isinstance(node, exp.Column) and _derived(node) is not None:
        return decimal_scale(_derived(node))
    if isinstance(node, exp.Column):
        if kind in INTEGER_TYPES:
            return 0
        if kind in DECIMAL_TYPES and len(node.type.expressions) == 2:
            return int(node.type.expressions[1].name)
    elif isinstance(node, exp.Literal) and not node.is_string:
        return len(node.this.partition(".")[2]) if "e" not in node.this.lower() else _no_scale(node)
    elif isinstance(node, exp.Mul):
        return decimal_scale(node.left) + decimal_scale(node.right)
    elif isinstance(node, (exp.Add, exp.Sub)):
        return max(decimal_scale(node.left), decimal_scale(node.right))
    elif isinstance(node, (exp.Sum, exp.Min, exp.Max, exp.Neg, exp.Abs)):
        return decimal_scale(node.this)
    elif isinstance(node, exp.Count):
        return 0
    elif isinstance(node, exp.Case):
        branches = [i.args["true"] for i in node.args.get("ifs") or []] + [node.args.get("default")]
        return max(decimal_scale(b) for b in branches if b is not None)
    return _no_scale(node)


def _derived(column: exp.Column) -> exp.Expression | None:
    """What a column of a derived table (``FROM (SELECT a * b AS c ...) t``) stands for: its
    type as sqlglot infers it need not carry the exact scale."""
    select = column.parent_select
    while select is not None:
        for source in [select.args.get("from_"), *(select.args.get("joins") or [])]:
            derived = source.this if source is not None else None
            if isinstance(derived, exp.Subquery) and derived.alias == column.table \
                    and isinstance(derived.this, exp.Select):
                for expression in derived.this.expressions:
                    if expression.alias_or_name == column.name:
                        return expression.this if isinstance(expression, exp.Alias) else expression
        select = select.parent_select
    return None


def _no_scale(node: exp.Expression) -> int:
    raise StatementRefused(f"no exact decimal scale for {node.sql()[:60]}")


def _cast_result(expression: exp.Expression, arrow: pa.DataType) -> exp.Expression:
    """A result column as DataFusion types it: cast, its name kept (ORDER BY may name it)."""
    name = expression.alias_or_name if isinstance(expression, (exp.Alias, exp.Column)) else None
    inner = expression.this if isinstance(expression, exp.Alias) else expression
    division = _strip(inner)
    if pa.types.is_decimal(arrow) and isinstance(division, exp.Div):
        inner = _exact_quotient(division.left.copy(), division.right.copy(), arrow.scale)
    target = _duckdb_type(arrow)
    if target is None:
        return expression
    cast = exp.Cast(this=inner.copy(), to=exp.DataType.build(target, dialect="duckdb"))
    return exp.alias_(cast, name, quoted=True) if name else cast


def _strip(expression: exp.Expression) -> exp.Expression:
    while isinstance(expression, exp.Paren):
        expression = expression.this
    return expression


def _duckdb_type(arrow: pa.DataType) -> str | None:
    """DuckDB's name for a numeric or date result type; None to leave the column as it is."""
    if pa.types.is_decimal(arrow):
        return f"DECIMAL({arrow.precision}, {arrow.scale})"
    if pa.types.is_integer(arrow) or pa.types.is_floating(arrow) or pa.types.is_date32(arrow):
        return _sql_type(arrow)
    return None


def _type_of(expression: exp.Expression) -> Type | None:
    kind = expression.type
    return None if kind is None else kind.this


def _point_at_copies(tree: exp.Expression, datasets: dict[str, Dataset], connector: SqlConnector
                     ) -> set[tuple[str, ...]]:
    """Dataset names become the copies' tables; the dataset's name stays as the alias.
    Returns the copies' tables (every scanned dataset's, read or not)."""
    copies = {table_key(_remote_table(d, connector)) for d in datasets.values()}
    for table in list(tree.find_all(exp.Table)):
        if not table.args.get("db"):
            continue  # a CTE's name (the validator checks it is one in scope)
        dataset = datasets.get(f"{table.db}.{table.name}")
        if dataset is None:
            raise StatementRefused(f"the statement reads {table.sql()}, which no scan of the plan names")
        remote = _remote_table(dataset, connector)
        remote.set("alias", exp.TableAlias(this=exp.to_identifier(table.alias_or_name, quoted=True)))
        table.replace(remote)
    return copies


def _remote_table(dataset: Dataset, connector: SqlConnector) -> exp.Table:
    return sqlglot.parse_one(f"SELECT 1 FROM {connector.quote_table(dataset.table)}",
                             read=connector.dialect).find(exp.Table).copy()


def _plan_texts(frame: DataFrame) -> set[str]:
    """The text values DataFusion read from the statement (subqueries included), from the
    plan before optimization: what each text literal sent must be."""
    shown = frame.logical_plan().display_indent()
    return {match.replace('\\"', '"').replace("\\\\", "\\") for match in _UTF8_LITERAL.findall(shown)}
