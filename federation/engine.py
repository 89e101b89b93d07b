"""The query engine: DataFusion over the catalog, behind the read-only gate."""
from __future__ import annotations

import itertools
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import pyarrow as pa
from datafusion import DataFrame, RuntimeEnvBuilder, SessionConfig, SessionContext, SQLOptions
from datafusion.common import DFSchema
from sqlglot.errors import TokenError
from sqlglot.tokens import TokenType

from federation import expr as fx
from federation.budget import QUERY, BudgetExceeded, LoadBudget, patience, released_at_end, reserve, run_reserved
from federation.catalog import CATALOG_NAME, DEFAULT_SCHEMA, Catalog
from federation.connectors.base import Connector, ConnectorError, Unreachable
from federation.cancel import stoppable_stream
from federation.optimized import optimized_plan
from federation.plan_cache import DEFAULT_ENTRIES, PlanCache
from federation.pushdown import (ParameterSlot, RemoteQuery, backend_requests, literal_value, parameter_slots, planner_filter,
                                 result_schema, table_scans, whole_query)
from federation.subplan import FAILED, Planner, PushedSubplan, ensure_hidden_schema, registered, split_query
from federation.safety import (MAX_DEPTH, GeneratesTooMuch, NotAStatement, UnsafeStatement, check_read_only,
                               explain_parts)
from federation.snapshots import QuerySnapshots, pinning
from federation.tokens import postgres_tokens
from federation.whole_statement import translated_statement


class QueryError(Exception):
    """A query could not be planned or run; the message is safe to show a client."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        # "invalid" (the request), "refused" (not read-only), "unavailable" (a backend),
        # "limit_exceeded" (a source at its load budget)
        self.kind = kind


LIMIT_EXCEEDED = "limit_exceeded"
RESOURCES_EXHAUSTED = "Resources exhausted:"  # DataFusion's memory pool refused an allocation


log = logging.getLogger("flightdeck.engine")


@dataclass
class EngineSettings:
    batch_rows: int = 65_536
    target_partitions: int = os.cpu_count() or 2
    whole_query_pushdown: bool = True  # False: no statement goes down whole, nor any sub-plan
    plan_cache_entries: int = DEFAULT_ENTRIES  # plans kept for reuse (0: plan every statement anew)
    # Bytes the session's sorts, joins and aggregates may hold (None: unbounded). Over it a
    # query fails ("Resources exhausted"): nothing spills to disk, which a runaway could fill.
    memory_limit: int | None = None


@dataclass
class PlannedQuery:
    sql: str
    _frame: DataFrame | None  # None until asked for: ``make_frame`` plans it
    schema: pa.Schema
    remote: RemoteQuery | None = None  # set when the whole query runs on one backend
    explain_rows: list[tuple[str, str]] | None = None  # EXPLAIN: what each backend is sent
    subplans: list[PushedSubplan] = field(default_factory=list)  # parts ``frame`` sends as statements
    limited_scan: "LimitedScan | None" = None  # a bare ``SELECT cols FROM t LIMIT n``, read directly
    local_frame: DataFrame | None = None  # ``frame`` without them: run when a backend rejects one
    reusable: bool = False  # may be kept and executed again, or bound again with other values
    # What is derived from the plan once and holds for every execution and binding of it
    # (e.g. the datasets it reads); shared by the bindings of one cached plan.
    derived: dict[str, Any] = field(default_factory=dict)
    make_frame: Callable[[], DataFrame] | None = None
    # A statement whose table functions take ``$n`` arguments is planned with them inlined:
    # ``numbered`` is the statement before that, ``arguments`` where each value goes.
    numbered: str | None = None
    arguments: tuple[tuple[int, int, str], ...] = ()
    generation: int = -1  # the engine's when it was planned: a plan kept past a change is planned again

    @property
    def frame(self) -> DataFrame:
        """The DataFusion plan (a statement sent whole to its backend plans it only if needed)."""
        if self._frame is None:
            self._frame = self.make_frame()
        return self._frame

    @frame.setter
    def frame(self, frame: DataFrame) -> None:
        self._frame = frame

    def plan_characters(self) -> int:
        """The length of the plan's text: what the plan holds grows with it (about 30 bytes a
        character: 21 MB for a 16 KB statement whose CTEs read each other twice over)."""
        if self._frame is None:  # sent whole to its backend, not planned here
            return 0
        return self.derive("plan_characters", lambda: len(self._frame.logical_plan().display_indent()))

    def derive(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per cached plan: it must depend on the plan only, not on values."""
        if name not in self.derived:
            self.derived[name] = compute()
        return self.derived[name]


@dataclass
class _Binding:
    """A parameterized statement planned for parameters of given types: each call binds its
    values without planning the statement again."""
    sql: str                      # numbered, rewritten: what DataFusion plans
    schema: pa.Schema
    remote: RemoteQuery | None    # written once, with ParameterSlots where the values go
    optimized: bool               # the first binding found a limited scan or sub-plans: look again
    derived: dict[str, Any]
    arguments: tuple[tuple[int, int, str], ...] = ()  # table functions' ``$n`` arguments: inlined

    def bind(self, engine: "QueryEngine", values: dict[str, pa.Scalar]) -> PlannedQuery:
        sql = inline_arguments(self.sql, self.arguments, values)
        if self.remote is not None and all_finite(values):
            return PlannedQuery(sql, None, self.schema, self.remote.bound(values), reusable=True,
                                derived=self.derived, make_frame=lambda: engine._bound_frame(sql, values))
        frame = engine._bound_frame(sql, values, bool(self.arguments))
        planned = PlannedQuery(sql, frame, self.schema, reusable=True, derived=self.derived)
        if self.optimized:
            engine._optimize_locally(planned, values)
        return planned


@dataclass
class LimitedScan:
    """A plain scan with a LIMIT, read from the connector directly with the limit passed down."""
    connector: Connector
    table: str
    columns: list[str]
    limit: int
    filters: list = field(default_factory=list)  # applied exactly by the connector

    def read(self, schema: pa.Schema) -> pa.RecordBatchReader:
        reader = self.connector.scan(self.table, self.columns, self.filters, self.limit)

        def batches():
            remaining = self.limit
            for batch in reader:  # a connector may send more than asked: cut at the limit
                if remaining <= 0:
                    break
                batch = batch.slice(0, remaining).select(self.columns)
                remaining -= batch.num_rows
                yield batch if batch.schema == schema else batch.cast(schema)

        return pa.RecordBatchReader.from_batches(schema, batches())


@dataclass
class _Split:
    frame: DataFrame            # the query, reading its pushed parts
    stated: DataFrame           # the same with the statement's prefix (EXPLAIN) in front
    subplans: list[PushedSubplan]


# Logical plan nodes whose work is bounded by the size of their input: no join, unnesting,
# recursion or subquery, which multiply rows or hide a plan of their own.
BOUNDED_NODES = frozenset({"Projection", "Filter", "Sort", "Limit", "Aggregate", "Distinct", "Union",
                           "SubqueryAlias", "EmptyRelation", "Values"})
# What their expressions may call, as the plan's text shows it: literals (``Int64(1)``,
# ``Decimal128(Some(150),5,2)``), casts, and aggregates linear in their input. Any other function
# (``repeat``, ``range``, a model's ``predict``) may take unbounded work on a single row.
CHEAP_CALLS = frozenset({
    "CAST", "TRY_CAST", "count", "sum", "min", "max", "avg", "Some",
    "Boolean", "Utf8", "Utf8View", "LargeUtf8", "Binary", "BinaryView", "LargeBinary",
    "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64", "Float16", "Float32", "Float64",
    "Decimal32", "Decimal64", "Decimal128", "Decimal256", "Date32", "Date64",
    "TimestampSecond", "TimestampMillisecond", "TimestampMicrosecond", "TimestampNanosecond"})
# Each name once, with the "(" that makes it a call: a pattern that may start anywhere in a name
# would scan a long literal's text once per character.
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\(?")


def bounded_plan(plan: Any, table_functions: set[str]) -> bool:
    """Whether each batch of a logical plan takes bounded work: it reads constants and calls of
    the bounded ``table_functions`` only, through ``BOUNDED_NODES`` whose expressions call
    ``CHEAP_CALLS`` only. Read from the plan's text, where subqueries show (they are not among a
    node's inputs); anything else in it, a literal's text included, makes the plan unbounded."""
    scans = [f"{name}()" for name in table_functions]
    for line in plan.display_indent().splitlines():
        node, _, rest = line.strip().partition(":")
        if node == "TableScan":
            words = rest.split(maxsplit=1)
            if not words or words[0] not in scans:
                return False
        elif node not in BOUNDED_NODES:
            return False
        for scan in scans:  # the scan's name also qualifies its columns: vector_search().score
            rest = rest.replace(scan, " ")
        if any(name.endswith("(") and name[:-1] not in CHEAP_CALLS for name in _NAME.findall(rest)):
            return False
    return True


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
        runtime = RuntimeEnvBuilder()
        if self.settings.memory_limit is not None:
            runtime = runtime.with_fair_spill_pool(self.settings.memory_limit).with_disk_manager_disabled()
        self.ctx = SessionContext(config, runtime)
        self._rewriters: list[Callable[[str], str]] = []
        # The second lock after the gate: the engine itself refuses DDL, DML, COPY and SET.
        self.read_only = (SQLOptions().with_allow_ddl(False).with_allow_dml(False)
                          .with_allow_statements(False))
        catalog.register_into(self.ctx)
        ensure_hidden_schema(self.ctx)
        # Plans are kept per session: a statement means what the session it is planned in holds.
        self.session_id = self.ctx.session_id()
        self.plans = PlanCache(self.settings.plan_cache_entries)
        self._changes = 0  # functions registered after start: plans made before may not hold
        # Table functions whose every call yields a bounded result (a search's k rows): plans
        # reading only these and constants are read without the event loop (``bounded_plan``).
        self.bounded_table_functions: set[str] = set()

    @property
    def generation(self) -> int:
        """Moves on when what plans depend on changes; cached plans of an older one are dropped."""
        return self.catalog.generation + self._changes

    def plan(self, sql: str, params: list[Any] | None = None) -> PlannedQuery:
        """The statement checked and planned, or, when it was already (in this session, with
        parameters of the same types), the kept plan with ``params`` bound."""
        generation = self.generation
        try:
            planned = self._plan_or_reuse(sql, params)
        except RecursionError:  # the SQL parsers recurse once per level of nesting (TooDeep too)
            raise QueryError("the statement nests too deeply (parentheses, subqueries or chained "
                             f"conditions over {MAX_DEPTH} levels deep): flatten it, e.g. a long OR "
                             "chain as IN (...)") from None
        planned.generation = generation
        return planned

    def is_current(self, planned: PlannedQuery) -> bool:
        """Whether nothing a plan depends on has changed since it was made (a copy taking over
        from its source, a dataset's schema): a plan kept by a client is otherwise planned again."""
        return planned.generation == self.generation

    def _plan_or_reuse(self, sql: str, params: list[Any] | None) -> PlannedQuery:
        values = {str(i + 1): _as_scalar(v, i + 1) for i, v in enumerate(params or [])}
        generation = self.generation
        key = (self.session_id, sql, tuple(v.type for v in values.values()))
        cached = self.plans.get(key, generation)
        if cached is not None:
            return cached.bind(self, values) if values else cached
        if values:  # each value is kept in the plan cache's key: no more than the statement takes
            taken = self._placeholders_taken(sql)
            if len(values) > taken:
                raise QueryError(f"the statement takes {taken} parameter(s), {len(values)} were bound")
        if not values:
            planned = self._plan(sql, values)
            if planned.reusable:
                self.plans.put(key, generation, planned, planned.plan_characters())
            return planned
        statement = self.plans.get((self.session_id, sql, ()), generation)
        if statement is None:
            statement = self._plan(sql, {})
            if statement.reusable:
                self.plans.put((self.session_id, sql, ()), generation, statement, statement.plan_characters())
        if not statement.reusable:
            return self._plan(sql, values)
        binding, planned = self._first_binding(statement, values)
        self.plans.put(key, generation, binding)
        return planned

    def _plan(self, sql: str, values: dict[str, pa.Scalar]) -> PlannedQuery:
        """The read-only gate, placeholders, rewriters, then DataFusion's plan and the decision
        where each part runs. Without ``values``, a statement with placeholders is planned for
        its schemas only (as a prepared statement is): nothing is decided about backends."""
        self.plans.count("statements_planned")
        try:
            check_read_only(sql)
        except UnsafeStatement as error:
            raise QueryError(str(error), kind=_gate_error_kind(error)) from None
        original = number_placeholders(sql)
        numbered = self._rewrite(original)
        arguments = table_function_arguments(numbered)
        inlined = inline_arguments(numbered, arguments, values)
        try:
            frame = self.ctx.sql(inlined, options=self.read_only, param_values=values or None)
            planned = PlannedQuery(inlined, frame, self._result_schema(frame), numbered=numbered, arguments=arguments)
            if inlined != original or values or not placeholder_count(inlined):
                # Types are coerced (or refused: 'abc' for an integer, a UDF's arguments) when the
                # plan is optimized: now, as the client's error, not later inside a pushdown decision.
                optimized_plan(frame)
        except Exception as error:  # DataFusion raises bare Exceptions
            raise self._query_error(error) from None
        explained = explain_parts(inlined)
        # EXPLAIN and the time (fixed when planned) make a plan that holds for this one execution
        # only; one with values inlined into table function arguments holds for those values only.
        planned.reusable = not (explained or (arguments and values) or _PLANNING_TIME.search(numbered))
        if explained and "ANALYZE" not in explained[2]:  # EXPLAIN ANALYZE shows what ran instead
            head, inner, _ = explained
            planned.explain_rows = self._backend_requests(planned, head, inner, values)
        elif placeholder_count(inlined) and not values:
            pass  # unbound: whatever runs it must bind values first
        elif self.settings.whole_query_pushdown:
            planned.remote = self._whole_query(frame, inlined, values, planned.schema)
            if planned.remote is None:
                self._optimize_locally(planned, values)
        return planned

    def _optimize_locally(self, planned: PlannedQuery, values: dict[str, pa.Scalar]) -> None:
        """For a query DataFusion runs: a bare limited scan read directly, or its single-backend
        parts sent as statements."""
        try:
            planned.limited_scan = self._limited_scan(planned)
        except Exception as error:  # values the optimizer refuses ('abc' bound for an integer)
            raise self._query_error(error) from None
        split = None if planned.limited_scan else self._split(planned.sql, planned.frame, planned.schema, values)
        if split is not None:
            planned.frame, planned.subplans, planned.local_frame = split.frame, split.subplans, planned.frame

    def _first_binding(self, statement: PlannedQuery, values: dict[str, pa.Scalar]
                       ) -> tuple[_Binding, PlannedQuery]:
        """A planned statement bound to values of new types: what to keep for later bindings of
        these types, and this call's plan. A statement sent whole to its backend is written once
        from the unbound plan, its values left to the driver."""
        self.plans.count("bindings_planned")
        numbered = statement.numbered or statement.sql
        sql = inline_arguments(numbered, statement.arguments, values)
        frame = self._bound_frame(sql, values, bool(statement.arguments))
        planned = PlannedQuery(sql, frame, self._result_schema(frame), reusable=True)
        template = None
        if self.settings.whole_query_pushdown and not statement.arguments:  # table functions run here
            template = self._whole_query(statement.local_frame or statement.frame, statement.sql,
                                         parameter_slots(len(values)), statement.schema)
        if template is not None and _texts_converted(statement.derive(
                "converted_placeholders", lambda: _converted_placeholders(statement.frame)), values):
            template = None  # for every binding of these types
        if template is not None and all_finite(values):
            planned.remote = template.bound(values)
        elif self.settings.whole_query_pushdown:
            self._optimize_locally(planned, values)
        optimized = planned.limited_scan is not None or bool(planned.subplans)
        binding = _Binding(numbered, planned.schema, template, optimized, planned.derived, statement.arguments)
        return binding, planned

    def _bound_frame(self, sql: str, values: dict[str, pa.Scalar], inlined: bool = False) -> DataFrame:
        """``sql`` planned with ``values`` bound; ``inlined``: values were written into table
        function arguments, which are coerced (or refused) when the plan is optimized."""
        try:
            frame = self.ctx.sql(sql, options=self.read_only, param_values=values)
            if inlined:
                optimized_plan(frame)
            return frame
        except Exception as error:  # DataFusion raises bare Exceptions
            raise self._query_error(error) from None

    def _backend_requests(self, planned: PlannedQuery, prefix: str, inner_sql: str,
                          values: dict) -> list[tuple[str, str]]:
        """For EXPLAIN: the statement or request each backend would receive for the query
        (and, when parts of it are pushed, the plan that reads them in place of the local one)."""
        try:
            inner = self.ctx.sql(inner_sql, options=self.read_only, param_values=values or None)
            pushing = self.settings.whole_query_pushdown and all_finite(values or {})  # as execution decides
            schema = self._result_schema(inner)
            remote = self._whole_query(inner, inner_sql, values, schema) if pushing else None
            split = None
            if remote is None and pushing:
                split = self._split(inner_sql, inner, schema, values, prefix)
            if split is None:
                return backend_requests(inner, self.catalog, remote)
            planned.frame = split.stated
            return backend_requests(split.frame, self.catalog, None, {s.table: s for s in split.subplans})
        except Exception:
            log.warning("could not describe backend requests", exc_info=True)
            return []

    def _split(self, sql: str, frame: DataFrame, schema: pa.Schema, values: dict, prefix: str = ""
               ) -> _Split | None:
        """The query planned with its single-backend parts sent as statements, or None.
        ``schema``: the rows ``frame`` yields (``_result_schema``), which the rewritten query's must be."""
        plan = Planner(lambda text: self.ctx.sql(text, options=self.read_only, param_values=values or None),
                       lambda text: self.ctx.sql(text, options=self.read_only), values, self._result_schema)
        try:
            split = split_query(sql, frame, self.catalog, plan)
            if split is None:
                return None
            # The hidden tables exist only while planning: the plans keep what they read.
            with registered(self.ctx, split.subplans):
                rewritten = plan(split.sql)
                stated = plan(prefix + split.sql) if prefix else rewritten
        except Exception:  # never fail a query because parts of it could not be pushed down
            log.warning("sub-plan pushdown skipped", exc_info=True)
            return None
        if self._result_schema(rewritten) != schema:
            log.info("sub-plan pushdown skipped: the rewritten query has another result schema")
            return None
        return _Split(rewritten, stated, split.subplans)

    def _result_schema(self, frame: DataFrame) -> pa.Schema:
        return result_schema(self.ctx, frame)

    def _whole_query(self, frame: DataFrame, sql: str, values: dict, schema: pa.Schema) -> RemoteQuery | None:
        """The whole query as one backend statement, or None. With parameters, the statement
        is written from the plan with its placeholders unbound: their values go to the
        backend's driver and never through SQL text. ``values`` may be ParameterSlots
        (``frame`` is then the unbound plan already). ``schema``: the rows ``frame`` yields."""
        try:
            if values and not isinstance(next(iter(values.values())), ParameterSlot):
                frame = self.ctx.sql(sql, options=self.read_only)
                if not all_finite(values) or _texts_converted(_converted_placeholders(frame), values):
                    return None
                schema = self._result_schema(frame)  # of the plan with its placeholders open
            return (translated_statement(frame, schema, sql, self.catalog, values)
                    or whole_query(frame, self.catalog, values))
        except Exception:  # never fail a query because it could not be pushed down
            log.warning("whole-query pushdown skipped", exc_info=True)
            return None

    def register_udf(self, udf) -> None:
        """A scalar function callable from SQL (the Stack registers model functions this way)."""
        self.ctx.register_udf(udf)
        self._changes += 1

    def add_rewriter(self, rewrite: Callable[[str], str]) -> None:
        """``rewrite(sql) -> sql`` runs on every statement, after its ``?`` are numbered and before
        it is planned: for calls a UDF's fixed signature cannot take (optional or variadic
        arguments, e.g. ``predict('m', a, b)``). It raises QueryError for a call it refuses."""
        self._rewriters.append(rewrite)

    def _rewrite(self, sql: str) -> str:
        for rewrite in self._rewriters:
            sql = rewrite(sql)
        return sql

    def _placeholders_taken(self, sql: str) -> int:
        """How many parameters a statement takes (an EXPLAIN's: the statement it explains), the
        arguments of table functions included."""
        numbered = self._rewrite(number_placeholders(sql))
        explained = explain_parts(numbered)
        return placeholder_count(explained[1] if explained else numbered)

    def parameter_schema(self, sql: str) -> pa.Schema:
        """The parameters a statement takes, with the types DataFusion infers for them."""
        try:
            planned = self.plan(sql)
        except QueryError:  # planning errors surface when the statement runs
            planned = None
        if planned is not None and "parameter_schema" in planned.derived:
            return planned.derived["parameter_schema"]
        count = self._placeholders_taken(sql)
        if planned is None or count == 0:
            return pa.schema([pa.field(f"${i}", pa.null()) for i in range(1, count + 1)])
        return planned.derive("parameter_schema", lambda: _parameter_schema(planned, count))

    def execute(self, planned: PlannedQuery) -> pa.RecordBatchReader:
        """The query's stream. A request to a source waits for a slot of the source's load
        budget on this thread (DataFusion's threads must not wait: its scans run on slots
        reserved here first); no slot within the source's ``budget_timeout`` fails the query."""
        try:
            if planned.limited_scan is not None:
                with patience(QUERY):
                    return planned.limited_scan.read(planned.schema)
            if planned.remote is not None:
                try:
                    with patience(QUERY):
                        return planned.remote.connector.stream(planned.remote.sql, planned.remote.params,
                                                               planned.schema)
                except Unreachable:  # DataFusion's scans would only wait for the source again
                    raise
                except ConnectorError as error:  # e.g. a function the backend lacks: run it here
                    log.info("whole-query pushdown failed, running in DataFusion: %s", error)
            give_back = reserve(self._scanned_budgets(planned), QUERY)
        except BudgetExceeded as error:
            raise QueryError(str(error), kind=LIMIT_EXCEEDED) from None
        return run_reserved(give_back, lambda: self._run(planned))

    def _run(self, planned: PlannedQuery) -> pa.RecordBatchReader:
        """The query run by DataFusion (with its pushed statements, if any)."""
        try:
            if planned.explain_rows:
                explained = planned.frame.to_arrow_table()
                extra = pa.table([pa.array([r[0] for r in planned.explain_rows]),
                                  pa.array([r[1] for r in planned.explain_rows])], schema=explained.schema)
                return pa.concat_tables([explained, extra]).to_reader()
            if planned.subplans:
                return self._with_fallback(planned)
            bounded = planned.derive("bounded", lambda: bounded_plan(planned.frame.logical_plan(),
                                                                     self.bounded_table_functions))
            return self._stream(planned, planned.frame, bounded)
        except Exception as error:
            raise self._query_error(error) from None

    def _stream(self, planned: PlannedQuery, frame: DataFrame, bounded: bool = False) -> pa.RecordBatchReader:
        """``frame`` run by DataFusion for this query; a local store it reads more than once is
        read by every scan as it stood at one moment (``federation.snapshots``)."""
        stores = planned.derive("stores_read_twice", lambda: self._stores_read_twice(planned))
        if not stores:
            return stoppable_stream(self._own_frame(frame), planned.schema, bounded)
        snapshots = QuerySnapshots(stores)
        try:
            with pinning(snapshots):  # DataFusion makes the execution plan, and so the scans, here
                reader = stoppable_stream(self._own_frame(frame), planned.schema, bounded)
        except BaseException:
            snapshots.close()
            raise
        return released_at_end(reader, snapshots.close)

    def _stores_read_twice(self, planned: PlannedQuery) -> set[Connector]:
        """The local stores (connectors with commits to pin reads between) the plan scans twice or more."""
        stores = Counter(dataset.connector.store for dataset in self._scans(planned) if dataset.connector is not None)
        return {store for store, scans in stores.items() if scans > 1 and store.commit_lock is not None}

    def _own_frame(self, frame: DataFrame) -> DataFrame:
        """A DataFrame of the plan for this execution alone. A kept plan runs on many threads
        at once, and DataFusion's DataFrame swaps its last physical plan under a lock taken with
        the GIL held while dropping the previous one needs the GIL: two threads executing one
        DataFrame can deadlock the process."""
        return self.ctx.create_dataframe_from_logical_plan(frame.logical_plan())

    def _with_fallback(self, planned: PlannedQuery) -> pa.RecordBatchReader:
        """The query's stream, its first batch read here: a backend rejects a statement (e.g. a
        function it lacks) as the scan sending it starts, before any result, and then the query
        runs without pushed parts instead, as a whole query does."""
        try:
            pushed = self._stream(planned, planned.frame)
            first = pushed.read_next_batch()
        except StopIteration:
            return pa.RecordBatchReader.from_batches(planned.schema, [])
        except Exception as error:
            if FAILED not in str(error):
                raise
            log.info("sub-plan pushdown failed, running in DataFusion: %s", clean_engine_message(str(error)))
            return self._stream(planned, planned.local_frame)
        return pa.RecordBatchReader.from_batches(planned.schema, itertools.chain([first], pushed))

    def query(self, sql: str, params: list[Any] | None = None) -> pa.RecordBatchReader:
        return self.execute(self.plan(sql, params))

    def _limited_scan(self, planned: PlannedQuery) -> "LimitedScan | None":
        """``SELECT columns FROM t [WHERE ...] LIMIT n`` with nothing else to do and a filter the
        connector applies exactly: the connector is asked for n rows itself, since DataFusion
        hands a Python dataset no limit."""
        bare = _bare_scan(optimized_plan(planned.frame))
        if bare is None or bare.fetch is None or not bare.picks_columns:
            return None
        dataset = self.catalog.scanned(bare.scan.fqn())
        if dataset is None or not dataset.registrations or dataset.arrow_schema is None:
            return None  # natively read files (DataFusion stops their scans itself) and system tables
        if dataset.masks is not None:
            return None  # the connector holds raw values: only the masking scan reads a masked dataset
        columns = planned.schema.names
        fields = {f.name: f.type for f in dataset.arrow_schema}
        if any(fields.get(f.name) != f.type for f in planned.schema):
            return None  # renamed or computed columns: not a plain scan
        filters = [planner_filter(e) for e in bare.scan.filters()]
        if None in filters or (filters and not dataset.connector.filters_exact(dataset.table, filters)):
            return None  # a limit before a filter applied locally would lose rows
        return LimitedScan(dataset.connector, dataset.table, columns, bare.fetch, filters)

    def _scans(self, planned: PlannedQuery) -> list:
        """The catalog dataset of each scan of the plan, in plan order. The plan without pushed
        statements counts: a pushed statement stands for one or more of its scans."""
        frame = planned.local_frame or planned.frame
        try:
            plan = optimized_plan(frame)
        except Exception:  # a plan that cannot be optimized reads nothing
            return []
        found = (self.catalog.scanned(tuple(p for p in node.to_variant().fqn() if p)) for node in table_scans(plan))
        return [dataset for dataset in found if dataset is not None]

    def _scanned_budgets(self, planned: PlannedQuery) -> list[LoadBudget]:
        """The load budget of each scan DataFusion makes of a source."""
        if not self.catalog.pool.budgets.limited:
            return []
        return [dataset.connector.budget for dataset in self._scans(planned) if dataset.connector is not None]

    def scanned_datasets(self, planned: PlannedQuery) -> list[str]:
        """The qualified names of the datasets a planned query reads, in plan order."""
        return planned.derive("scanned_datasets", lambda: list(dict.fromkeys(
            dataset.qualified_name for dataset in self._scans(planned))))

    def backend_statements(self, planned: PlannedQuery) -> list[str]:
        """What the query asks of each backend it reaches ("label: statement"), without the
        values it binds: the same for every binding of a cached plan."""
        def describe() -> list[str]:
            try:
                frame = planned.frame if planned.remote is None else None
                requests = backend_requests(frame, self.catalog, planned.remote,
                                            {s.table: s for s in planned.subplans}, with_values=False)
            except Exception:  # a plan that cannot be optimized reaches no backend
                return []
            return [f"{label}: {request}" for label, request in requests]
        return planned.derive("backend_statements", describe)

    def known_row_count(self, planned: PlannedQuery) -> int | None:
        """The result's row count when the plan is a bare scan of a table that knows it."""
        if planned.derived.get("not_a_bare_scan"):
            return None
        try:
            bare = _bare_scan(optimized_plan(planned.frame))
        except Exception:  # values the optimizer refuses: running the plan tells the client why
            return None
        if bare is None or bare.scan.filters():
            planned.derived["not_a_bare_scan"] = True
            return None
        dataset = self.catalog.scanned(bare.scan.fqn())
        if dataset is None or dataset.connector is None:
            return None
        count = dataset.connector.row_count(dataset.table)
        limits = [n for n in (count, bare.fetch, _literal_int(bare.scan.fetch())) if n is not None]
        return None if count is None else min(limits)

    def _query_error(self, error: Exception) -> QueryError:
        message = clean_engine_message(str(error))
        missing = re.search(r"table '([^']+)' not found", message)
        if missing:
            name = missing.group(1).split(".")
            dataset = self.catalog.find(*name[-2:]) if len(name) >= 2 else None
            if dataset is not None and dataset.state == "unavailable":
                return QueryError(f"dataset {dataset.spec.name} is unavailable: {dataset.error}",
                                  kind="unavailable")
        return QueryError(message, kind=error_kind(str(error)))


def _placeholder_types(frame: DataFrame) -> dict[str, str]:
    """The type DataFusion inferred for each placeholder of an unbound plan (by number, as
    DataFusion names the type); a placeholder it could not type is absent."""
    return dict(_PLACEHOLDER_TYPE.findall(str(frame.logical_plan())))


def _parameter_schema(planned: PlannedQuery, count: int) -> pa.Schema:
    types = {int(n): _arrow_type(t) for n, t in _placeholder_types(planned.frame).items()}
    return pa.schema([pa.field(f"${i}", types.get(i, pa.null())) for i in range(1, count + 1)])


def _converted_placeholders(frame: DataFrame) -> frozenset[str]:
    """The numbers of the placeholders of an unbound plan whose values it takes as something
    other than text (a timestamp, a number), as DataFusion inferred their types."""
    return frozenset(n for n, kind in _placeholder_types(frame).items() if kind not in _TEXT_TYPES)


_TEXT_TYPES = {"Utf8", "LargeUtf8", "Utf8View"}


def _texts_converted(converted: frozenset[str], values: dict[str, pa.Scalar]) -> bool:
    """Whether a text value is bound where the plan takes something else (``converted``
    placeholders). A backend's driver would bind the text and the backend convert it by its own
    rules, and PostgreSQL and DuckDB drop the offset of ``'2021-03-14T02:00:00+05:00'`` that
    DataFusion applies, and cut nanoseconds: such a query runs in DataFusion, its filters still
    pushed, typed."""
    return any(n in converted and (pa.types.is_string(v.type) or pa.types.is_large_string(v.type))
               for n, v in values.items())


def all_finite(values: dict[str, pa.Scalar]) -> bool:
    """Whether no value is a float NaN or infinity. Such a value is not handed to a backend's
    driver: the engines disagree on it (SQLite binds NaN as NULL, MySQL has neither, PostgreSQL
    orders NaN above every number): a query binding one runs in DataFusion."""
    return not any(pa.types.is_floating(v.type) and fx.non_finite(v.as_py()) for v in values.values())


def _gate_error_kind(error: UnsafeStatement) -> str:
    """What a statement the gate stops is: a typo, too much for a limit, or a write."""
    if isinstance(error, NotAStatement):
        return "invalid"
    return LIMIT_EXCEEDED if isinstance(error, GeneratesTooMuch) else "refused"


# A search or a model refusing what it was given, raised while DataFusion scans or calls it.
_REFUSED_INPUT = re.compile(r"External error: (SearchError|ModelError)\b")


def error_kind(text: str) -> str:
    """A DataFusion error's kind: a backend's failure is "unavailable" (a client may retry), a
    source at its load budget "limit_exceeded", a Python function refusing its input (a model,
    a search) or anything else "invalid"."""
    if BudgetExceeded.__name__ in text or RESOURCES_EXHAUSTED in text:
        return LIMIT_EXCEEDED
    if "ConnectorError" in text:
        return "unavailable"
    if "PyErr" in text or "QueryError" in text or _REFUSED_INPUT.search(text):
        return "invalid"
    return "unavailable" if "External error" in text else "invalid"


def clean_engine_message(text: str) -> str:
    """DataFusion's message without its wrapping prefixes or Python frames.

    DataFusion chains causes as "outer\ncaused by\ninner": the innermost cause is
    the precise one, so it goes first.
    """
    raised_in_python = _PYTHON_ERROR.search(text)  # a Python callback's exception, e.g. a table function
    if raised_in_python:
        text = raised_in_python.group(2).replace("\\'", "'")
    lines = [line.strip() for line in text.strip().splitlines()]
    lines = [line for line in lines if line and not _is_python_frame(line)]
    causes = [line for line in lines if line != "caused by"]
    text = causes[-1] if len(causes) > 1 and "caused by" in lines else " ".join(causes)
    text = text or "query failed"
    text = text.replace(RESOURCES_EXHAUSTED, "the query needs more memory than the engine's limit "
                                             "(runtime.limits.memory_limit); aggregate or filter first:")
    for prefix in ("DataFusion error: ", "External error: ", "Execution error: ",
                   "Error during planning: ", "SQL error: ", "ArrowError(ExternalError(",
                   "Arrow error: ", "ConnectorError: "):
        text = text.replace(prefix, "")
    return text.strip() or "query failed"


_PYTHON_ERROR = re.compile(r"PyErr \{ type: <class '[^']+'>, value: \w+\((['\"])(.*?)\1\)", re.DOTALL)


def _is_python_frame(line: str) -> bool:
    return line.startswith(("Traceback (most recent call last)", 'File "')) or line.startswith("^")


def _placeholder_tokens(sql: str) -> list:
    try:
        return [t for t in postgres_tokens(sql)
                if t.token_type in (TokenType.PLACEHOLDER, TokenType.PARAMETER, TokenType.QDCOLON)]
    except TokenError:
        return []


def number_placeholders(sql: str) -> str:
    """Rewrite JDBC/ADBC-style ``?`` placeholders to DataFusion's ``$1, $2, ...`` (``?::int`` too,
    which the tokenizer reads as one word)."""
    question_marks = [t for t in _placeholder_tokens(sql) if t.text in ("?", "?::")]
    for token in question_marks:
        if token.text == "?" and sql[token.end + 1:token.end + 2].isalnum():
            raise QueryError(f"a ? placeholder runs on into {sql[token.end + 1:token.end + 12]!r}: write $1, $2... "
                             "for numbered parameters, or put a space after the ?")
    for index, token in reversed(list(enumerate(question_marks, start=1))):
        sql = sql[:token.start] + f"${index}" + token.text[1:] + sql[token.end + 1:]
    return sql


_CLAUSES = {TokenType.FROM, TokenType.JOIN, TokenType.WHERE, TokenType.GROUP_BY, TokenType.ORDER_BY,
            TokenType.HAVING, TokenType.LIMIT, TokenType.SELECT, TokenType.ON, TokenType.UNION}


def table_function_arguments(numbered_sql: str) -> tuple[tuple[int, int, str], ...]:
    """Where the ``$n`` arguments of table functions (``FROM vector_search(docs, $1, 5)``) are:
    (start, end, number) of each. sqlglot finds them, and DataFusion's own tokenizer must read
    a parameter at each, else QueryError: the two disagree on some texts (sqlglot ends a ``--``
    comment at a lone carriage return, DataFusion only at a newline; backquoted names,
    ``q'[...]'`` strings and ``$tag$`` quotes differ too), and a value written where DataFusion
    reads a comment or quoted text could end it and be read as SQL."""
    try:
        tokens = postgres_tokens(numbered_sql)
    except TokenError:
        return ()
    arguments = []
    clause_at_depth = [None]
    call_depth = None  # the paren depth inside a table function's argument list
    for index, token in enumerate(tokens):
        kind = token.token_type
        if kind == TokenType.L_PAREN:
            previous = tokens[index - 1] if index else None
            opens_call = (call_depth is None and previous is not None and index >= 2
                          and previous.token_type == TokenType.VAR
                          and clause_at_depth[-1] in (TokenType.FROM, TokenType.JOIN)
                          and tokens[index - 2].token_type in (TokenType.FROM, TokenType.JOIN, TokenType.COMMA))
            clause_at_depth.append(None)
            if opens_call:
                call_depth = len(clause_at_depth)
        elif kind == TokenType.R_PAREN:
            if call_depth == len(clause_at_depth):
                call_depth = None
            if len(clause_at_depth) > 1:
                clause_at_depth.pop()
        elif kind in _CLAUSES:
            clause_at_depth[-1] = kind
        elif kind == TokenType.PARAMETER and call_depth is not None and _numbered(tokens, index):
            number = tokens[index + 1]
            arguments.append((token.start, number.end + 1, number.text))
    for start, end, number in arguments:
        _check_datafusion_reads_a_parameter(numbered_sql, start, end, number)
    return tuple(arguments)


def _numbered(tokens: list, index: int) -> bool:
    """Whether the ``$`` at ``index`` and the digits right after it make one ``$n``."""
    if index + 1 >= len(tokens):
        return False
    dollar, number = tokens[index], tokens[index + 1]
    return (number.token_type == TokenType.NUMBER and number.text.isdigit()
            and number.start == dollar.end + 1)


# A session of DataFusion's own, for its tokenizer (the engine's sessions use the same,
# default, SQL dialect): asked whether it reads a parameter where sqlglot found one.
_DATAFUSION_READER = SessionContext()
_OPEN_ESCAPED_STRING = re.compile(r"Unterminated encoded string literal at Line: (\d+), Column: (\d+)\b")


def _check_datafusion_reads_a_parameter(sql: str, start: int, end: int, number: str) -> None:
    """QueryError unless DataFusion reads ``sql[start:end]`` as the parameter ``$number``: in
    code (no comment or quoted text around it), and not run on into a longer token."""
    if not _code_at(sql, start) or _extends_a_parameter(sql[end:end + 1]):
        raise QueryError(f"the table function argument ${number} is not where DataFusion reads a parameter "
                         "(there it is inside a comment, quoted text or a longer name; a lone carriage "
                         "return does not end a -- comment for DataFusion): write the statement without that")


def _extends_a_parameter(char: str) -> bool:
    """Whether DataFusion reads ``char`` right after ``$n`` as more of it (``$1a`` is one
    parameter, ``$1$`` opens a quoted string); any character beyond ASCII is taken to."""
    return char != "" and (not char.isascii() or char.isalnum() or char in "_$")


def _code_at(sql: str, position: int) -> bool:
    """Whether DataFusion's tokenizer is in code at ``position`` of ``sql``, not inside a
    comment, quoted text or quoted name. Asked of DataFusion itself: after a space (which ends
    any word or number before it) an escaped string is opened, and the statement must fail on
    that string left open, at that very place; inside a comment or quoted text the opening is
    no string, or the failure is elsewhere."""
    opened = sql[:position] + " "
    try:
        _DATAFUSION_READER.parse_sql_expr(opened + "E'", DFSchema.empty())
    except Exception as error:  # noqa: BLE001 - DataFusion raises bare Exceptions
        found = _OPEN_ESCAPED_STRING.search(str(error))
        return found is not None and (int(found[1]), int(found[2])) == _datafusion_location(opened)
    return False


def _datafusion_location(prefix: str) -> tuple[int, int]:
    """(line, column) DataFusion reports for the character after ``prefix``: lines end at a
    newline only, columns count characters from 1."""
    return prefix.count("\n") + 1, len(prefix) - (prefix.rfind("\n") + 1) + 1


def inline_arguments(numbered_sql: str, arguments: tuple[tuple[int, int, str], ...],
                     values: dict[str, pa.Scalar]) -> str:
    """The statement with its table functions' ``$n`` arguments written as literals.

    DataFusion calls a table function while planning, before parameters are bound, so its
    arguments must be literals; an unbound one (a statement being prepared) becomes NULL.
    Each goes between spaces, so it cannot run on into what is around it (``-$1`` with -5
    would otherwise open a ``--`` comment).
    """
    for start, end, number in reversed(arguments):
        numbered_sql = numbered_sql[:start] + f" {_sql_literal(values.get(number))} " + numbered_sql[end:]
    return numbered_sql


def _sql_literal(value: pa.Scalar | None) -> str:
    """A value as a literal of DataFusion's own SQL. Text goes as an E-string, in which any
    character can be written as an escape: its quotes and backslashes are, and so is every
    character that is not printable (newline, carriage return, tab, other control and
    separator characters), so the literal is one line of printable text that ends no comment
    wherever it lands. (In a plain string DataFusion reads a backslash as itself, ``'a\\'`` is
    ``a\\``, and has no way to write a control character but as itself.)"""
    python = value.as_py() if isinstance(value, pa.Scalar) else value
    if isinstance(python, str):
        return "E'" + "".join(map(_escaped, python)) + "'"
    return fx.standard_literal(python) or _sql_literal(str(python))


def _escaped(char: str) -> str:
    """One character of text as written inside a DataFusion E-string."""
    if char in "\\'":
        return "\\" + char
    if char.isprintable():
        return char
    if char == "\0":  # DataFusion refuses it written as an escape, and raw it is a control character
        raise QueryError("a table function argument cannot hold a NUL character")
    return _CONTROL_ESCAPES.get(char) or (f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}")


_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def placeholder_count(numbered_sql: str) -> int:
    """The highest ``$n`` of a statement, read from its tokens: a ``$1`` inside a string literal
    (escaped quotes included, ``E'\\'$1'``) is text, not a placeholder."""
    try:
        tokens = postgres_tokens(numbered_sql)
    except TokenError:
        return max((int(n) for n in re.findall(r"\$(\d+)", _strip_strings(numbered_sql))), default=0)
    numbers = [int(number.text) for dollar, number in zip(tokens, tokens[1:])
               if dollar.token_type == TokenType.PARAMETER and dollar.text == "$"
               and number.token_type == TokenType.NUMBER and number.start == dollar.end + 1]
    return max(numbers, default=0)


def _strip_strings(sql: str) -> str:
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


# Functions DataFusion evaluates once, when it plans the statement.
_PLANNING_TIME = re.compile(r"\b(now|today|current_date|current_time|current_timestamp|localtime|localtimestamp)\b",
                            re.IGNORECASE)
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


def _as_scalar(value: Any, number: int) -> pa.Scalar:
    """Placeholder ``$number``'s value as Arrow binds it, or a QueryError every door can show."""
    if isinstance(value, pa.Scalar):
        return value
    try:
        return pa.scalar(value)
    except OverflowError:
        raise QueryError(f"parameter ${number} is outside the 64-bit integer range") from None
    except UnicodeEncodeError:
        raise QueryError(f"parameter ${number} is not valid Unicode text (half a surrogate pair)") from None
    except (pa.ArrowException, TypeError, ValueError):
        raise QueryError(f"parameter ${number} cannot be bound ({type(value).__name__})") from None


def _literal_int(expression) -> int | None:
    if expression is None or isinstance(expression, int):
        return expression
    try:
        return literal_value(expression)
    except Exception:
        return None


@dataclass
class _BareScan:
    scan: Any              # the TableScan variant
    fetch: int | None      # the LIMIT above it, if any
    picks_columns: bool    # every projection above it only picks columns


def _bare_scan(node) -> _BareScan | None:
    """A plan that only projects and limits one table scan ([Projection] [Limit] [Projection]
    TableScan); None for any other plan, or for a LIMIT with an offset or no count."""
    fetch, limited, picks_columns = None, False, True
    while True:
        variant = node.to_variant()
        kind = type(variant).__name__
        if kind == "TableScan":
            return _BareScan(variant, fetch, picks_columns)
        if kind == "Projection":
            picks_columns = picks_columns and all(type(e.to_variant()).__name__ == "Column"
                                                  for e in variant.projections())
        elif kind == "Limit" and not limited and not _skip_of(variant):
            limited, fetch = True, _fetch_of(variant)
            if fetch is None:
                return None
        else:
            return None
        node = node.inputs()[0]


def _fetch_of(limit_variant) -> int | None:
    return _literal_int(limit_variant.fetch())


def _skip_of(limit_variant) -> int:
    return _literal_int(limit_variant.skip()) or 0
