"""Sub-plan pushdown: in a query that reads several backends, the parts that live on one SQL
backend go down as SQL, and DataFusion only combines what comes back.

``pushdown.whole_query`` sends a query whole when every table sits on one SQL backend. Other
queries used to run in DataFusion from per-table scans (projection and filters pushed), so a
join of two PostgreSQL tables fetched both tables. This module sends each single-backend part
of such a query as one statement.

Route: the rewrite works on the SQL text, with sqlglot. DataFusion takes no Python table
provider and cannot rebuild a logical plan from parts, and its unparser is known to lose
filters around semi/anti joins, so the mixed plan itself is never unparsed. Each
candidate part is cut out of the SQL, planned alone by DataFusion and offered to
``whole_query``: every guard of the whole-query path decides about the part, unchanged. An
accepted part becomes a table in a hidden schema (a ``PushedSubplan`` scanned through
``scan.ConnectorDataset``: each scan runs the part's statement, narrowed to the columns and
integer/decimal/date filters DataFusion asks for, which it also re-applies), the SQL is
rewritten to read that table, and DataFusion plans the rewritten SQL. The tables exist only
while that plan is made: a logical plan holds its table providers, so the names go at once
and nothing outlives a query or is shared between concurrent ones.

What goes down:
1. A *piece*: a derived table, CTE body, UNION branch or uncorrelated subquery (scalar, IN,
   EXISTS) whose plan ``whole_query`` accepts and that does more than a scan already does (a
   join, aggregate, DISTINCT or LIMIT). It depends on nothing outside itself, so its rows can
   stand in for it. Outermost first: a piece takes everything inside it along.
2. A *join group*: in one SELECT whose FROM has only inner joins (or commas), two or more
   tables of one backend that conditions among themselves connect. It is sent as
   ``SELECT <the columns the rest of the query reads> FROM <the tables> WHERE <every ON and
   WHERE conjunct that reads only them>``, and the SELECT reads one table instead of several,
   keeping its other conjuncts. Applying a filter to the inputs of inner joins first is exact.
   If the guards refuse the group because of a conjunct with a function or a division, it is
   tried once more with that conjunct left local.

What does not, and why (each is a way the rewritten query could answer differently):
- Outer, semi, anti, NATURAL, USING and LATERAL joins: no join group forms in such a SELECT,
  and ``whole_query`` refuses pieces containing them. What was local stays local: an IN
  subquery's own body may go down, the semi-join it feeds never does.
- Correlated subqueries never plan alone, so they are never pieces (a join group may still
  form inside one; its references to the outer query stay as they are). A piece naming any
  CTE of the statement is not sent either: planned alone, the name could mean a table.
- A join-group table whose alias occurs twice in the statement (a qualified column could then
  belong to another scope), columns qualified by a schema, ``*`` in the group's SELECT list
  (its expansion would change), a group no conjunct connects (a cross product would cross
  the wire), and unaliased computed columns whose DataFusion-made name would change outside
  the statement's result (derived tables, CTEs, UNION branches, scalar subqueries).
- Column names: a group's column keeps its name unless two of its tables share it; then only
  qualified references exist and they are rewritten. Unqualified references are never
  touched, so they resolve exactly as before; a new name never equals any identifier of the
  statement, and result columns keep their names (an alias where the text changed).
- sqlglot must regenerate the original statement into SQL that DataFusion plans to the same
  optimized plan, and the rewritten statement must have exactly the original result schema;
  otherwise nothing is pushed. Any refusal simply leaves that part to DataFusion.
"""
from __future__ import annotations

import logging
import re
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import pyarrow as pa
import sqlglot
from datafusion import DataFrame, SessionContext
from datafusion.catalog import Schema as DataFusionSchema
from sqlglot import exp

from federation import expr as fx
from federation.catalog import CATALOG_NAME, DEFAULT_SCHEMA, Catalog
from federation.connectors.base import Connector, ConnectorError, SqlConnector
from federation.optimized import optimized_plan
from federation.pushdown import RemoteQuery, sql_backend, whole_query
from federation.scan import ConnectorDataset
from federation.tokens import parse_postgres

log = logging.getLogger("flightdeck.subplan")

HIDDEN_SCHEMA = "_fd_subplans"  # where the temporary tables live while a rewritten query is planned
FAILED = "pushed sub-plan rejected by the backend"  # marks errors that fall back to local execution
SQL_DIALECT = "postgres"  # sqlglot's closest dialect to DataFusion's SQL; the round-trip check guards it
WORTH_PUSHING = {"Aggregate", "Join", "Distinct", "Limit"}  # a plain scan is pushed per table already
WRAPPER = "_fd_subplan"

@dataclass
class Planner:
    """Plans SQL in the query's session: ``bound`` with the statement's parameter values (what
    runs here), ``unbound`` with its ``$n`` placeholders left open (what is written for a
    backend, whose driver then binds ``values``)."""
    bound: Callable[[str], DataFrame]
    unbound: Callable[[str], DataFrame]
    values: dict[str, object]
    schema: Callable[[DataFrame], pa.Schema]  # of the rows a plan yields (``pushdown.result_schema``)

    def __call__(self, sql: str) -> DataFrame:
        return self.bound(sql)

    def remote(self, sql: str, planned: DataFrame, catalog: Catalog) -> RemoteQuery | None:
        """The statement for a part planned alone as ``planned``, or None."""
        if not self.values:
            return whole_query(planned, catalog)
        try:
            open_plan = self.unbound(sql)
        except Exception:
            return None
        return whole_query(open_plan, catalog, self.values)


class PushedSubplan(Connector):
    """One pushed part as a table DataFusion can scan: every scan runs its statement on the
    backend, narrowed to the columns and (exactly comparable) filters DataFusion asks for."""

    kind = "subplan"

    def __init__(self, backend: SqlConnector, remote: RemoteQuery, schema: pa.Schema):
        super().__init__({}, backend.base_dir)
        self.backend = backend
        self.sql = remote.sql
        self.params = remote.params
        self.result_schema = schema
        self.table = f"t_{uuid.uuid4().hex}"  # unique: concurrent queries never share one

    def tables(self) -> list[str]:
        return [self.table]

    def schema(self, table: str) -> pa.Schema:
        return self.result_schema

    def describe(self) -> str:
        return self.backend.describe()

    @property
    def store(self) -> Connector:
        return self.backend

    def request(self, columns: list[str] | None, filters: list[fx.Expr]) -> tuple[str, list]:
        """The statement the backend receives for a scan of ``columns`` under ``filters``,
        and the values it binds (the part's own first: they come first in the text)."""
        names = self.result_schema.names
        fetched = self._fetched(columns)
        pushable = [f for f in filters if self._exactly_compared(f)]
        bindings = self.backend.renderer.bindings()
        bindings.values.extend(self.params)
        where = self.backend.renderer.render_where(pushable, bindings=bindings)[0] if pushable else None
        if fetched == names and where is None:
            return self.sql, list(self.params)
        # A CTE with a column list names the statement's columns by position: the unparsed
        # statement's own output names need not be DataFusion's (SQLite has no derived-table
        # column lists; all three dialects take this form).
        quote = self.backend.renderer.quote_identifier
        sql = (f"WITH {quote(WRAPPER)}({', '.join(quote(n) for n in names)}) AS ({self.sql}) "
               f"SELECT {', '.join(quote(c) for c in fetched)} FROM {quote(WRAPPER)}")
        return sql + (f" WHERE {where}" if where else ""), bindings.values

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
             limit: int | None) -> pa.RecordBatchReader:
        # ConnectorDataset re-applies the whole filter (filters_exact is False): pushing one is
        # only ever a narrowing of what crosses the wire.
        fetched = self._fetched(columns)
        target = pa.schema([self.result_schema.field(c) for c in fetched])
        try:
            sql, params = self.request(columns, filters)
            return self.backend.stream(sql, params, target)
        except ConnectorError as error:
            raise ConnectorError(f"{FAILED}: {error}") from None

    def _fetched(self, columns: list[str] | None) -> list[str]:
        names = self.result_schema.names
        if columns is None:
            return list(names)
        return list(columns) or names[:1]  # a row count still needs one column per row

    def _exactly_compared(self, condition: fx.Expr) -> bool:
        """Push only comparisons of integers (and, off SQLite, decimals, dates and booleans):
        these compare the same in every backend; text, floats (NaN) and SQLite's text dates
        may not, so DataFusion alone filters on them."""
        for name in fx.referenced_columns(condition):
            if name not in self.result_schema.names:
                return False
            kind = self.result_schema.field(name).type
            if pa.types.is_integer(kind):
                continue
            if self.backend.dialect != "sqlite" and (
                    pa.types.is_decimal(kind) or pa.types.is_date32(kind) or pa.types.is_boolean(kind)):
                continue
            return False
        return True


@dataclass
class Split:
    """A query with its single-backend parts pushed: ``sql`` reads their results from hidden tables."""
    sql: str
    subplans: list[PushedSubplan]


def ensure_hidden_schema(ctx: SessionContext) -> None:
    """The schema sub-plans' tables are registered in (listed nowhere but information_schema)."""
    catalog = ctx.catalog(CATALOG_NAME)
    if HIDDEN_SCHEMA not in catalog.schema_names():
        catalog.register_schema(HIDDEN_SCHEMA, DataFusionSchema.memory_schema())


@contextmanager
def registered(ctx: SessionContext, subplans: list[PushedSubplan]) -> Iterator[None]:
    """The sub-plans' tables exist in the session while the body plans the rewritten query."""
    schema = ctx.catalog(CATALOG_NAME).schema(HIDDEN_SCHEMA)
    done = []
    try:
        for subplan in subplans:
            ctx.register_dataset(f"{HIDDEN_SCHEMA}.{subplan.table}",
                                 ConnectorDataset(subplan, subplan.table, subplan.result_schema))
            done.append(subplan)
        yield
    finally:
        for subplan in done:
            schema.deregister_table(subplan.table)


def hidden_table(table: str) -> str:
    """The SQL name of a sub-plan's table."""
    return f'{CATALOG_NAME}."{HIDDEN_SCHEMA}"."{table}"'


def split_query(sql: str, frame: DataFrame, catalog: Catalog, plan: Planner) -> Split | None:
    """The query with its pushable single-backend parts replaced, or None when none is."""
    try:
        tree = parse_postgres(sql)
    except sqlglot.errors.SqlglotError:
        return None
    if not isinstance(tree, (exp.Select, exp.SetOperation)) or _recursive(tree):
        return None
    splitter = _Splitter(tree, catalog, plan, frame.schema().names)
    if not splitter.reads_sql_backend():
        return None
    original = tree.sql(dialect=SQL_DIALECT)
    splitter.push_pieces(tree)
    for select in list(tree.find_all(exp.Select)):
        splitter.push_join_groups(select)
    if not splitter.subplans:
        return None
    if not _round_trips(original, frame, plan):
        log.debug("no sub-plan pushdown: the statement does not survive sqlglot unchanged")
        return None
    return Split(tree.sql(dialect=SQL_DIALECT), splitter.subplans)


def _recursive(tree: exp.Expression) -> bool:
    return any(w.args.get("recursive") for w in tree.find_all(exp.With))


def _round_trips(original: str, frame: DataFrame, plan: Planner) -> bool:
    """sqlglot's regeneration of the statement plans exactly like the statement itself, so the
    rewritten text (made by the same generator) only differs where it was rewritten."""
    try:
        return _plan_text(plan(original)) == _plan_text(frame)
    except Exception:
        return False


_GENERATED_ALIAS = re.compile(r"\b(__[A-Za-z_]+?_)(\d+)\b")


def _plan_text(frame: DataFrame) -> str:
    """The optimized plan in full, with the optimizer's generated aliases (``__correlated_sq_3``,
    ``__common_expr_1``) numbered by first appearance: their counter runs on per optimization."""
    numbers: dict[tuple[str, str], str] = {}

    def renumber(match: re.Match) -> str:
        key = (match.group(1), match.group(2))
        if key not in numbers:
            numbers[key] = str(sum(1 for prefix, _ in numbers if prefix == match.group(1)) + 1)
        return match.group(1) + numbers[key]

    return _GENERATED_ALIAS.sub(renumber, str(optimized_plan(frame)))


def _norm(identifier: exp.Expression | None) -> str:
    """An identifier as DataFusion resolves it: unquoted ones are lower-cased."""
    if not isinstance(identifier, exp.Identifier):
        return "" if identifier is None else identifier.name
    return identifier.this if identifier.quoted else identifier.this.lower()


def _source_name(node: exp.Expression) -> str:
    """What a FROM item's columns are qualified by: its alias, else the table's name."""
    alias = node.args.get("alias")
    if alias is not None and alias.this is not None:
        return _norm(alias.this)
    return _norm(node.this) if isinstance(node, exp.Table) else ""


def _conjuncts(condition: exp.Expression | None) -> list[exp.Expression]:
    if condition is None:
        return []
    condition = condition.unnest()
    if isinstance(condition, exp.And):
        return _conjuncts(condition.left) + _conjuncts(condition.right)
    return [condition]


@dataclass
class _Member:
    """A catalog table in a SELECT's FROM that a join group may take."""
    key: str                  # what its columns are qualified by (alias, else table name)
    node: exp.Table
    backend: SqlConnector
    columns: set[str]


class _Splitter:
    """Finds a statement's pushable parts and rewrites the statement in place to read them."""

    def __init__(self, tree: exp.Expression, catalog: Catalog, plan: Planner, top_names: list[str]):
        self.tree = tree
        self.catalog = catalog
        self.plan = plan
        self.top_names = top_names
        self.subplans: list[PushedSubplan] = []
        self.cte_names = {_norm(cte.args["alias"].this) for cte in tree.find_all(exp.CTE)
                          if cte.args.get("alias")}
        self.source_names = Counter(_source_name(n) for n in tree.find_all(exp.Table, exp.Subquery))
        self.source_names.update(self.cte_names)
        self.identifiers = {i.this.lower() for i in tree.find_all(exp.Identifier) if isinstance(i.this, str)}
        self.groups_made = 0

    # ---- what the statement reads ----

    def _backend_of(self, table: exp.Table) -> tuple[SqlConnector, set[str]] | None:
        """The SQL backend a table reference reads and the table's columns, if it is a dataset."""
        if not isinstance(table.this, exp.Identifier):
            return None  # a table function
        if table.args.get("catalog") and _norm(table.args["catalog"]) != CATALOG_NAME:
            return None
        if not table.args.get("db") and _norm(table.this) in self.cte_names:
            return None
        schema_name = _norm(table.args["db"]) if table.args.get("db") else DEFAULT_SCHEMA
        dataset = self.catalog.find(schema_name, _norm(table.this))
        backend = sql_backend(dataset)
        if backend is None:
            return None
        return backend, set(dataset.arrow_schema.names)

    def reads_sql_backend(self) -> bool:
        return any(self._backend_of(t) is not None for t in self.tree.find_all(exp.Table))

    # ---- pieces: self-contained query parts ----

    def push_pieces(self, node: exp.Expression) -> None:
        """Outermost first: a piece that goes down takes everything inside it along."""
        for child in list(node.iter_expressions()):
            if self._is_piece(child) and self._push_piece(child):
                continue
            self.push_pieces(child)

    @staticmethod
    def _is_piece(node: exp.Expression) -> bool:
        return (isinstance(node, (exp.Select, exp.SetOperation))
                and isinstance(node.parent, (exp.Subquery, exp.CTE, exp.Exists, exp.SetOperation)))

    def _push_piece(self, query: exp.Expression) -> bool:
        if any(not t.args.get("db") and _norm(t.this) in self.cte_names for t in query.find_all(exp.Table)):
            return False  # planned alone, a CTE's name would mean a table
        if not any(self._backend_of(t) for t in query.find_all(exp.Table)):
            return False
        text = query.sql(dialect=SQL_DIALECT)
        try:
            piece = self.plan(text)  # a correlated subquery fails here
        except Exception:
            return False
        schema = self.plan.schema(piece)
        if len(set(schema.names)) != len(schema.names) or not _does_more_than_scan(optimized_plan(piece)):
            return False
        remote = self.plan.remote(text, piece, self.catalog)
        if remote is None:
            return False
        subplan = self.add_subplan(remote, schema)
        query.replace(sqlglot.parse_one(f"SELECT * FROM {hidden_table(subplan.table)}", read=SQL_DIALECT))
        return True

    def add_subplan(self, remote: RemoteQuery, schema: pa.Schema) -> PushedSubplan:
        subplan = PushedSubplan(remote.connector, remote, schema)
        self.subplans.append(subplan)
        log.debug("sub-plan for %s: %s", remote.connector.describe(), remote.sql)
        return subplan

    # ---- join groups: inner-joined tables of one backend in one SELECT ----

    def push_join_groups(self, select: exp.Select) -> None:
        tried: set[frozenset] = set()
        while True:
            group = self._next_group(select, tried)
            if group is None:
                return
            tried.add(frozenset(m.key for m in group))
            _JoinGroup(self, select, group).push()

    def _next_group(self, select: exp.Select, tried: set[frozenset]) -> list[_Member] | None:
        sources = _inner_join_sources(select)
        if sources is None:
            return None
        members = self.members_of(sources)
        readers = [self.movable(c, members) for c in _conjuncts_of(select)]
        for component in _components(members, readers):
            if len(component) >= 2 and frozenset(m.key for m in component) not in tried:
                return component
        return None

    def members_of(self, sources: list[exp.Expression]) -> dict[str, _Member]:
        """The FROM items a join group may take: tables of a SQL backend, named once in the statement."""
        members = {}
        for source in sources:
            if not isinstance(source, exp.Table) or not _plain_table(source):
                continue
            found = self._backend_of(source)
            key = _source_name(source)
            if found is not None and self.source_names[key] == 1:
                members[key] = _Member(key, source, found[0], found[1])
        return members

    def resolve(self, column: exp.Column, members: dict[str, _Member]) -> str | None:
        """The member a column of this SELECT reads, or None (another source, an outer query,
        or an alias). An unqualified name found in exactly one member is that member's: the
        statement planned, so no other source of the SELECT has it."""
        if column.args.get("db") or column.args.get("catalog") or isinstance(column.this, exp.Star):
            return None
        if column.args.get("table"):
            key = _norm(column.args["table"])
            return key if key in members else None
        owners = [key for key, member in members.items() if _norm(column.this) in member.columns]
        return owners[0] if len(owners) == 1 else None

    def movable(self, condition: exp.Expression, members: dict[str, _Member]) -> set[str] | None:
        """The members a conjunct reads when it reads nothing else (so it can go with them)."""
        if condition.find(exp.Query, exp.Exists, exp.AggFunc, exp.Window):
            return None
        owners = set()
        for column in condition.find_all(exp.Column):
            key = self.resolve(column, members)
            if key is None:
                return None
            owners.add(key)
        return owners or None


def _does_more_than_scan(plan) -> bool:
    variant = plan.to_variant()
    kind = type(variant).__name__
    if kind in WORTH_PUSHING or (kind == "TableScan" and variant.fetch() is not None):
        return True
    if kind == "Sort" and variant.get_fetch_val() is not None:
        return True  # a top-k Sort carries its LIMIT as a fetch
    return any(_does_more_than_scan(child) for child in plan.inputs())


def _plain(condition: exp.Expression) -> bool:
    """Comparisons of columns and literals only: no function (AND/OR and casts of literals,
    e.g. DATE '...', aside) and no division."""
    for node in condition.walk():
        if isinstance(node, exp.Cast) and isinstance(node.this, exp.Literal):
            continue
        if isinstance(node, (exp.Func, exp.Div, exp.IntDiv)) and not isinstance(node, exp.Connector):
            return False
    return True


def _plain_table(table: exp.Table) -> bool:
    """A table reference that is only a name and an alias (no column renames, samples, hints)."""
    alias = table.args.get("alias")
    if alias is not None and alias.args.get("columns"):
        return False
    return not any(value for key, value in table.args.items() if key not in ("this", "db", "catalog", "alias"))


def _inner_join_sources(select: exp.Select) -> list[exp.Expression] | None:
    """The FROM items of a SELECT whose joins are all inner (or cross, or commas), else None."""
    source = select.args.get("from_")
    if source is None:
        return None
    sources = [source.this]
    for join in select.args.get("joins") or []:
        if join.args.get("side") or join.args.get("method") or join.args.get("using"):
            return None
        if (join.args.get("kind") or "INNER").upper() not in ("INNER", "CROSS"):
            return None
        if any(value for key, value in join.args.items() if key not in ("this", "kind", "on", "pivots")):
            return None
        sources.append(join.this)
    if any(not isinstance(s, (exp.Table, exp.Subquery)) for s in sources):
        return None  # LATERAL, UNNEST, table functions, nested join trees: leave them be
    return sources


def _conjuncts_of(select: exp.Select) -> list[exp.Expression]:
    """Every ON and WHERE conjunct: with inner joins only, they all filter the same product."""
    found = [part for join in select.args.get("joins") or [] for part in _conjuncts(join.args.get("on"))]
    where = select.args.get("where")
    return found + _conjuncts(where.this if where is not None else None)


def _components(members: dict[str, _Member], readers: list[set[str] | None]) -> list[list[_Member]]:
    """Members of one backend that conjuncts among themselves connect (no cross products);
    ``readers`` are the members each conjunct reads."""
    parent = {key: key for key in members}

    def root(key: str) -> str:
        while parent[key] != key:
            key = parent[key]
        return key

    for owners in readers:
        if not owners or not owners <= set(members) or len({id(members[k].backend) for k in owners}) != 1:
            continue
        first, *rest = sorted(owners)
        for other in rest:
            parent[root(other)] = root(first)
    groups: dict[str, list[_Member]] = {}
    for key, member in members.items():
        groups.setdefault(root(key), []).append(member)
    return list(groups.values())


class _JoinGroup:
    """One group's rewrite: its statement, and the SELECT reading the group's result instead."""

    def __init__(self, splitter: _Splitter, select: exp.Select, members: list[_Member]):
        self.splitter = splitter
        self.select = select
        self.members = {m.key: m for m in members}
        splitter.groups_made += 1
        self.alias = f"_fd_group{splitter.groups_made}"

    def push(self) -> bool:
        select, splitter = self.select, self.splitter
        if self.alias.lower() in splitter.identifiers:
            return False
        if any(isinstance(e, exp.Star) or (isinstance(e, exp.Column) and isinstance(e.this, exp.Star))
               for e in select.expressions):
            return False  # the expansion of * would change
        sources = _inner_join_sources(select)
        all_members = splitter.members_of(sources)
        readers = {id(c): owners for c in _conjuncts_of(select)
                   if (owners := splitter.movable(c, all_members)) and owners <= set(self.members)}
        movable = [c for c in _conjuncts_of(select) if id(c) in readers]
        # A conjunct the backend may not evaluate like DataFusion (a function, a division)
        # makes the guards refuse the whole group: then try once more, leaving it local,
        # if the rest still connects every table (never send a cross product).
        plain = [c for c in movable if _plain(c)]
        for moved in ([movable, plain] if len(plain) < len(movable) else [movable]):
            if len(_components(self.members, [readers[id(c)] for c in moved])) != 1:
                continue
            if self._push_moving(sources, moved):
                return True
        return False

    def _push_moving(self, sources: list[exp.Expression], moved: list[exp.Expression]) -> bool:
        moved_ids = {id(node) for c in moved for node in c.walk()}
        outside = [c for c in self.select.find_all(exp.Column) if id(c) not in moved_ids]
        names = self._output_names(outside)
        if not names:
            return False
        text = self._statement(names, moved)
        try:
            piece = self.splitter.plan(text)
        except Exception as error:
            log.debug("join group not planned alone: %s", error)
            return False
        remote = self.splitter.plan.remote(text, piece, self.splitter.catalog)
        if remote is None or not self._rewrite_outputs(outside, names):
            return False
        subplan = self.splitter.add_subplan(remote, self.splitter.plan.schema(piece))
        self._rebuild_from(sources, moved, subplan)
        return True

    def _output_names(self, columns: list[exp.Column]) -> dict[tuple[str, str], str] | None:
        """(member, column) -> the name it gets in the group's result, for every column the
        rest of the statement reads; None when that cannot be done safely."""
        names: dict[tuple[str, str], str] = {}
        for column in columns:
            if column.args.get("db") or column.args.get("catalog"):
                return None  # schema-qualified or struct-field references: not worth the risk
            qualifier = _norm(column.args.get("table")) if column.args.get("table") else None
            if isinstance(column.this, exp.Star):
                if qualifier in self.members:
                    return None
                continue
            name = _norm(column.this)
            if qualifier is not None:
                if qualifier not in self.members:
                    continue
                if name not in self.members[qualifier].columns:
                    return None
                names[(qualifier, name)] = self._result_name(qualifier, name)
            else:
                owners = [k for k, m in self.members.items() if name in m.columns]
                if len(owners) == 1:  # also covers outer references from nested queries
                    names[(owners[0], name)] = name
        taken = set()
        for (key, name), result in names.items():
            renamed = result != name
            if result in taken or (renamed and result.lower() in self.splitter.identifiers):
                return None  # a new name must not capture any reference
            taken.add(result)
        return names

    def _result_name(self, key: str, name: str) -> str:
        """A column keeps its name unless another member has one like it: unqualified
        references then still find it, and qualified ones are rewritten."""
        shared = sum(name in m.columns for m in self.members.values()) > 1
        return f"{key}__{name}" if shared else name

    def _statement(self, names: dict[tuple[str, str], str], moved: list[exp.Expression]) -> str:
        outputs = [exp.alias_(exp.column(exp.to_identifier(name, quoted=True),
                                         table=exp.to_identifier(key, quoted=True)),
                              exp.to_identifier(result, quoted=True))
                   for (key, name), result in names.items()]
        tables = []
        for member in self.members.values():
            table = member.node.copy()
            table.set("alias", exp.TableAlias(this=exp.to_identifier(member.key, quoted=True)))
            tables.append(table)
        statement = exp.Select(expressions=outputs).from_(tables[0], copy=False)
        statement.set("joins", [exp.Join(this=table) for table in tables[1:]])
        if moved:
            statement = statement.where(exp.and_(*[c.copy() for c in moved]), copy=False)
        return statement.sql(dialect=SQL_DIALECT)

    def _rewrite_outputs(self, columns: list[exp.Column], names: dict[tuple[str, str], str]) -> bool:
        """Qualified references to members now read the group; output names must not move."""
        plans = []
        for column in columns:
            qualifier = _norm(column.args.get("table")) if column.args.get("table") else None
            if qualifier in self.members and not isinstance(column.this, exp.Star):
                plans.append((column, names[(qualifier, _norm(column.this))]))
        rewritten = {id(column): result for column, result in plans}
        aliases = self._kept_output_names(rewritten)
        if aliases is None:
            return False
        for column, result in plans:
            column.set("table", exp.to_identifier(self.alias, quoted=True))
            column.set("this", exp.to_identifier(result, quoted=True))
        for index, name in aliases:
            expression = self.select.expressions[index]
            self.select.expressions[index].replace(
                exp.alias_(expression.copy(), exp.to_identifier(name, quoted=True)))
        return True

    def _kept_output_names(self, rewritten: dict[int, str]) -> list[tuple[int, str]] | None:
        """(position, name) of select items that need an alias to keep their output name, or
        None when an alias cannot keep it."""
        role = _role(self.select)
        if role == "value":
            return []  # a scalar/IN/EXISTS subquery's column names are never read
        aliases = []
        for index, expression in enumerate(self.select.expressions):
            if isinstance(expression, exp.Alias):
                continue
            if isinstance(expression, exp.Column):
                if rewritten.get(id(expression), _norm(expression.this)) == _norm(expression.this):
                    continue  # a bare column is named after the column, which keeps its name
                aliases.append((index, _norm(expression.this)))
            elif any(id(c) in rewritten for c in expression.find_all(exp.Column)):
                if role != "root":
                    return None  # DataFusion names it after its text, which is about to change
                aliases.append((index, self.splitter.top_names[index]))
        outputs = Counter(self.splitter.top_names) if role == "root" else Counter()
        if any(outputs[name] > 1 for _, name in aliases):
            return None  # DataFusion keeps equal names apart by qualifier only, not by alias
        return aliases

    def _rebuild_from(self, sources: list[exp.Expression], moved: list[exp.Expression],
                      subplan: PushedSubplan) -> None:
        """FROM the group's table and the other sources, as a product filtered by every
        conjunct that did not go down (equivalent for inner joins; DataFusion re-forms the
        equi-joins)."""
        moved_ids = {id(c) for c in moved}
        kept = [c for c in _conjuncts_of(self.select) if id(c) not in moved_ids]
        group_table = sqlglot.parse_one(f"SELECT 1 FROM {hidden_table(subplan.table)} AS \"{self.alias}\"",
                                        read=SQL_DIALECT).find(exp.Table)
        items, placed = [], False
        for source in sources:
            if isinstance(source, exp.Table) and _source_name(source) in self.members:
                if not placed:
                    items.append(group_table)
                    placed = True
            else:
                items.append(source)
        select = self.select
        select.set("from_", exp.From(this=items[0]))
        select.set("joins", [exp.Join(this=item) for item in items[1:]] or None)
        select.set("where", exp.Where(this=exp.and_(*kept)) if kept else None)


def _role(select: exp.Select) -> str:
    """root: the statement's result; value: an IN/EXISTS/ANY/ALL subquery (column names unused);
    named: anything whose column names reach the statement (derived table, CTE, UNION branch,
    and a scalar subquery, whose column DataFusion names after the subquery's)."""
    parent = select.parent
    if parent is None:
        return "root"
    if isinstance(parent, exp.Exists):
        return "value"
    if isinstance(parent, exp.Subquery) and parent.args.get("alias") is None:
        holder = parent.parent
        if isinstance(holder, exp.In) and holder.args.get("query") is parent:
            return "value"
        if isinstance(holder, (exp.Any, exp.All)):
            return "value"
    return "named"
