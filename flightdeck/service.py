"""The Service: the one API every door calls.

Sync and blocking (an async door calls it in a worker thread). Every request names its
caller (a Principal, from ``authenticate``); every failure is a ServiceError whose kind the
door maps to its protocol and whose message is safe to show. The engine, the accelerator and
the models stay behind this class: a door never imports them.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import pyarrow as pa

from accel.accelerator import AccelerationError
from federation.cancel import Cancellation, cancellation_scope
from federation.catalog import CATALOG_NAME
from federation.catalog_view import unmasked_columns
from federation.connectors import ConnectorError
from federation.engine import PlannedQuery, QueryEngine, QueryError, clean_engine_message, error_kind
from federation.expr import quote_double, standard_literal
from flightdeck import __version__
from flightdeck.audit import AuditEntry
from flightdeck.auth import OPERATOR, Authenticator, Credentials, Key, Principal, User
from flightdeck.errors import (CANCELLED, INVALID, LIMIT_EXCEEDED, NOT_FOUND, REFUSED, TIMED_OUT, UNAVAILABLE,
                               ServiceError)
from flightdeck.grants import qualified
from flightdeck.limits import MAX_PARAMETER_BYTES, MAX_PARAMETERS, Admission, QueryLimits, RequestRates, Slot
from flightdeck.runtime_config import QueryLimitSettings
from flightdeck.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from flightdeck.metrics import INTERNAL_ERROR, OK, TRUNCATED
from flightdeck.search_functions import MODES as SEARCH_MODES
from flightdeck.search_functions import SearchError
from flightdeck.stack import Stack
from inference.errors import ModelError

log = logging.getLogger("flightdeck.service")

SAMPLE_KINDS = ("first", "random", "distinct")
CORE = "core"  # the door label of queries the core runs for itself
MAX_SAMPLE_ROWS = 10_000
PLAN_BYTES_PER_CHARACTER = 32  # of a plan's text: measured at about 30
AUDITED_BACKENDS = 32  # backend statements one audit entry keeps
AUDITED_SQL_CHARS = 4096  # of a statement, in the audit
EMBED_PART = 256  # texts embedded between looks at the clock: the model's run cannot be stopped


class PaidRequest:
    """The request that planned a statement was counted against its principal's rate: the
    first execution is part of that request; each later one is a request of its own."""

    def __init__(self) -> None:
        self._unused = True
        self._lock = threading.Lock()

    def use(self) -> bool:
        """True the first time only."""
        with self._lock:
            unused, self._unused = self._unused, False
            return unused


@dataclass(frozen=True)
class Planned:
    """A statement planned for one principal: its result schema is known, nothing has run.
    It can be executed any number of times. ``accelerated`` names the accelerated datasets it
    reads (``Service.freshness`` tells how fresh their copies are); ``door`` labels its metrics."""
    principal: Principal
    sql: str
    parameters: tuple[Any, ...] | None
    schema: pa.Schema
    query: PlannedQuery
    accelerated: tuple[str, ...] = ()  # the accelerated datasets it reads (their copies or indexes)
    door: str = CORE
    paid: PaidRequest = field(default_factory=PaidRequest, compare=False, repr=False)

    @property
    def plan_bytes(self) -> int:
        """About what its plan holds in memory (a door keeping plans weighs them by it)."""
        return PLAN_BYTES_PER_CHARACTER * self.query.plan_characters()


@dataclass
class Truncation:
    """Handed to ``execute`` by a door that cuts results at the principal's row and byte limits
    instead of failing there (HTTP and MCP do; Flight SQL fails): the stream then ends at the
    limit and ``notice`` says so and why. Nothing is cut without it being said."""
    notice: str | None = None


@dataclass(frozen=True)
class Freshness:
    """When the accelerated copies a result reads were taken from their sources."""
    datasets: dict[str, dt.datetime]  # qualified name -> its copy's data as of

    @property
    def oldest(self) -> dt.datetime:
        return min(self.datasets.values())


@dataclass(frozen=True)
class TableEntry:
    """A queryable table as catalog listings show it."""
    schema_name: str
    table_name: str
    table_type: str              # TABLE or SYSTEM TABLE
    arrow_schema: pa.Schema


@dataclass(frozen=True)
class PrimaryKey:
    schema_name: str
    table_name: str
    columns: tuple[str, ...]


class Service:
    def __init__(self, stack: Stack):
        self.stack = stack
        runtime = stack.loaded.config.runtime
        auth, self.limits = runtime.auth, runtime.limits
        self.authenticator = Authenticator(
            [Key(k.name, k.key, k.refresh, k.grant(), k.key_sha256, self._limits(k.limits))
             for k in auth.keys()],
            {u.username: User(u.password, u.refresh, u.grant(), self._limits(u.limits))
             for u in auth.users},
            self._limits(QueryLimitSettings()))
        self.admission = Admission(self.limits.max_concurrent_queries, self.limits.admission_wait_seconds)
        # Uploads have places of their own, as many as queries: a client binds its next
        # parameters while its last stream may still be ending.
        self.uploads = Admission(self.limits.max_concurrent_queries, self.limits.admission_wait_seconds, "uploads")
        self.rates = RequestRates()
        self.redact = stack.loaded.redact

    def _limits(self, own: QueryLimitSettings) -> QueryLimits:
        """A principal's limits: its own where it has them, the global ones elsewhere."""
        def pick(name: str, global_name: str | None = None):
            value = getattr(own, name)
            return value if value is not None else getattr(self.limits, global_name or name)
        return QueryLimits(pick("query_timeout_seconds"), pick("max_result_rows"), pick("max_result_bytes"),
                           pick("max_concurrent_queries", "max_concurrent_queries_per_principal"),
                           pick("requests_per_second"))

    # ---- who is calling ----

    def authenticate(self, credentials: Credentials) -> Principal:
        return self.authenticator.authenticate(credentials)

    # ---- SQL ----

    def plan(self, principal: Principal, sql: str, parameters: list[Any] | None = None,
             door: str = CORE, paid: PaidRequest | None = None) -> Planned:
        """Check and plan a read statement; ``parameters`` bind its placeholders (never spliced).
        ``door`` is the interface asking (a metrics label). ``paid``: the request that prepared
        this statement, whose first use is part of it (a prepared statement's first execution)."""
        started = time.perf_counter()
        try:
            if paid is None or not paid.use():  # a refused giant statement is a request too
                self._count_request(principal)
            if len(sql) > self.limits.max_sql_length:
                raise ServiceError(LIMIT_EXCEEDED, f"the statement has {len(sql)} characters; at most "
                                                   f"{self.limits.max_sql_length} (max_sql_length)")
            if parameters is not None and len(parameters) > MAX_PARAMETERS:
                raise ServiceError(LIMIT_EXCEEDED, f"{len(parameters):,} parameters; a statement takes at most "
                                                   f"{MAX_PARAMETERS:,}")
            bound = sum(len(value) for value in parameters or () if isinstance(value, (str, bytes)))
            if bound > MAX_PARAMETER_BYTES:
                raise ServiceError(LIMIT_EXCEEDED, f"the parameters hold {bound:,} characters or bytes; at most "
                                                   f"{MAX_PARAMETER_BYTES:,}")
            with self._admitted(principal), self._translated():
                engine = self._engine(principal)
                query = engine.plan(sql, list(parameters) if parameters is not None else None)
                accelerated = query.derive("accelerated", lambda: self._accelerated(engine, query))
        except Exception as error:
            self._finished(principal, door, sql, parameters, None, _outcome(error), started, 0, 0, error)
            raise
        return Planned(principal, sql, None if parameters is None else tuple(parameters), query.schema, query,
                       accelerated, door)

    def _count_request(self, principal: Principal) -> None:
        """One request of the principal against its rate (LIMIT_EXCEEDED over it)."""
        self.rates.take(principal.name, principal.limits.requests_per_second)

    @contextmanager
    def _admitted(self, principal: Principal, places: Admission | None = None) -> Iterator[None]:
        """Work for a request outside a query's stream (planning, embedding, a refresh), holding
        one of the principal's places among running queries (or among ``places``) meanwhile."""
        release = (places or self.admission).enter(principal.name, principal.limits.max_concurrent)
        try:
            yield
        finally:
            release()

    def receiving(self, principal: Principal) -> AbstractContextManager[None]:
        """For a door reading a request's body as a stream (a Flight DoPut): each open upload
        holds a thread of the server, so a principal has no more uploads open at once than
        queries running (``max_concurrent_queries``), waiting for a place as queries do."""
        return self._admitted(principal, self.uploads)

    def _engine(self, principal: Principal) -> QueryEngine:
        """The engine of the principal's grant: its session holds only what the grant shows."""
        return self.stack.engine_for(principal.grant)

    def _view(self, principal: Principal):
        """The catalog as the principal's grant shows it."""
        return self._engine(principal).catalog

    def _accelerated(self, engine: QueryEngine, query: PlannedQuery) -> tuple[str, ...]:
        refreshers = self.stack.accelerator.refreshers
        if not refreshers:
            return ()
        read = set(engine.scanned_datasets(query)) | set(self._searched(engine, query))
        return tuple(sorted(name for name in read if name in refreshers))

    def _searched(self, engine: QueryEngine, query: PlannedQuery) -> list[str]:
        """The datasets whose search indexes the plan reads, among those the engine's grant lets
        it search: the statement's text may name a hidden one, whose name and freshness the
        result must not then carry."""
        def plan_text() -> str:
            return (query.local_frame or query.frame).logical_plan().display_indent()
        return self.stack.search.datasets_searched(query.sql, plan_text, unmasked_columns(engine.catalog))

    def freshness(self, datasets: Iterable[str]) -> Freshness | None:
        """When the accelerated copies of these datasets that queries read now were taken from
        their sources; None when none of them is read from a copy. A door reports it with a
        result: pass ``Planned.accelerated`` (or the datasets searched) just before executing."""
        found = {}
        for name in datasets:
            refresher = self.stack.accelerator.refreshers.get(qualified(name))
            if refresher is not None and not refresher.loaded.is_set() and refresher.spec.ready_state == "on_load":
                refresher.loaded.wait(refresher.spec.ready_timeout)  # as the query itself will wait for it
            if refresher is not None and refresher.copy_serves and refresher.status.data_as_of is not None:
                taken = refresher.status.data_as_of
                indexed = self.stack.search.data_as_of(refresher.spec.dataset)
                # A searchable dataset answers a search from its indexes, which may still hold
                # the copy before: the older time is the one that holds for every part read.
                found[refresher.spec.dataset] = min(taken, indexed) if indexed is not None else taken
        return Freshness(found) if found else None

    def parameter_schema(self, principal: Principal, sql: str) -> pa.Schema:
        """The parameters a statement takes (``$1``, ``?``), with the types inferred for them."""
        with self._translated():
            return self._engine(principal).parameter_schema(sql)

    def row_count(self, planned: Planned) -> int | None:
        """The result's row count when it is known without running the query."""
        with self._translated():
            return self._engine(planned.principal).known_row_count(planned.query)

    def execute(self, planned: Planned, cancelled: threading.Event | None = None,
                backend: Cancellation | None = None, truncation: Truncation | None = None) -> pa.RecordBatchReader:
        """Run a planned statement; the reader raises ServiceError, and stops with a ``cancelled``
        one once ``cancelled`` is set. Close the reader (or drop it) to release the backends.
        Backend statements the query starts register with ``backend``: cancelling it stops
        them at the backend (a door does so when its client goes away). The principal's limits
        hold until the stream ends: a place among running queries, a deadline, a result size
        (past which the stream fails, or ends early when given a ``truncation`` to say so in)."""
        planned = self.current(planned)
        started = time.perf_counter()
        cancelled = cancelled or threading.Event()
        backend = backend or Cancellation()
        slot = None
        try:
            if cancelled.is_set():
                raise ServiceError(CANCELLED, "the query was cancelled")
            limits = planned.principal.limits
            if not planned.paid.use():  # every execution counts, its planning included
                self._count_request(planned.principal)
            slot = Slot(self.admission.enter(planned.principal.name, limits.max_concurrent),
                        limits.timeout_seconds, lambda: (cancelled.set(), backend.cancel()))
            with self._translated(), cancellation_scope(backend):
                reader = self._engine(planned.principal).execute(planned.query)
        except Exception as error:
            if slot is not None:
                slot.release()
            self._finished(planned.principal, planned.door, planned.sql, planned.parameters, planned.query,
                           _outcome(error), started, 0, 0, error)
            raise
        return pa.RecordBatchReader.from_batches(reader.schema, self._stream(planned, reader, cancelled, started, slot,
                                                                                   truncation))

    def current(self, planned: Planned) -> Planned:
        """``planned``, or planned again if what it read has changed since (an accelerated copy
        took over from its source, a dataset's schema changed): a plan a client keeps, a prepared
        statement's, reads what a new one would. Its request is the execution's, counted once."""
        if self._engine(planned.principal).is_current(planned.query):
            return planned
        parameters = None if planned.parameters is None else list(planned.parameters)
        return self.plan(planned.principal, planned.sql, parameters, planned.door, paid=planned.paid)

    def query(self, principal: Principal, sql: str, parameters: list[Any] | None = None,
              door: str = CORE) -> pa.RecordBatchReader:
        return self.execute(self.plan(principal, sql, parameters, door))

    def _stream(self, planned: Planned, reader: pa.RecordBatchReader, cancelled: threading.Event,
                started: float, slot: Slot, truncation: Truncation | None) -> Iterator[pa.RecordBatch]:
        rows = nbytes = 0
        outcome, failure = INTERNAL_ERROR, None
        limits = planned.principal.limits
        try:
            for batch in reader:
                if cancelled.is_set():
                    raise _stopped(slot, limits)
                if truncation is not None:
                    batch, truncation.notice = limits.within(batch, rows, nbytes)
                rows += batch.num_rows
                nbytes += batch.nbytes
                limits.check_result(rows, nbytes)
                yield batch
                if truncation is not None and truncation.notice:
                    break  # closing the reader below stops the query
            if slot.expired:  # the backend stopped early because the deadline passed
                raise _stopped(slot, limits)
            outcome = TRUNCATED if truncation is not None and truncation.notice else OK
        except GeneratorExit:  # the door closed the stream before its end
            outcome = CANCELLED
            raise
        except ServiceError as error:
            outcome, failure = error.kind, error
            raise
        except (QueryError, ConnectorError) as error:  # a stopped backend statement fails this way too
            failure = _stopped(slot, limits) if slot.expired or cancelled.is_set() else self._service_error(error)
            outcome = failure.kind
            raise failure from None
        except Exception as error:  # the engine's stream raises bare Exceptions and ArrowErrors
            text = str(error)
            failure = (_stopped(slot, limits) if slot.expired or cancelled.is_set()
                       else _engine_error(error_kind(text), self.redact(clean_engine_message(text))))
            outcome = failure.kind
            raise failure from None
        finally:
            slot.release()
            reader.close()
            self._finished(planned.principal, planned.door, planned.sql, planned.parameters, planned.query,
                           outcome, started, rows, nbytes, failure or truncation)

    def _finished(self, principal: Principal, door: str, sql: str, parameters: Any, query: PlannedQuery | None,
                  outcome: str, started: float, rows: int, nbytes: int,
                  error: Exception | Truncation | None) -> None:
        """A query's end, in the metrics and the audit log."""
        seconds = time.perf_counter() - started
        self.stack.metrics.query_finished(door, outcome, seconds, rows, nbytes)
        audit = self.stack.audit
        engine = self._engine(principal)
        datasets = engine.scanned_datasets(query) if query is not None else []
        backends = _audited_list([self.redact(b) for b in engine.backend_statements(query)]) if query is not None else []
        message = (error.message if isinstance(error, ServiceError)
                   else error.notice if isinstance(error, Truncation) else None)
        shown_parameters = audit.parameters(None if parameters is None else tuple(parameters))
        if message is not None and not audit.show_parameters:  # an error may quote a bound value
            message = _without_values(message, parameters or ())
        audit.record(AuditEntry(principal.name, door, _audited(self.redact(sql)),
                                None if shown_parameters is None else _audited(shown_parameters), datasets, backends,
                                rows, nbytes, round(seconds, 6), outcome, message, grant=principal.grant))

    # ---- the catalog ----

    @property
    def catalog_name(self) -> str:
        return CATALOG_NAME

    def schema_names(self, principal: Principal) -> list[str]:
        return self._view(principal).schema_names()

    def tables(self, principal: Principal) -> list[TableEntry]:
        """Every table the principal may query (datasets and system tables), sorted by schema and name."""
        return [TableEntry(*row) for row in self._view(principal).listing()]

    def primary_keys(self, principal: Principal, table: str, schema: str | None = None) -> list[PrimaryKey]:
        return [PrimaryKey(d.spec.schema_name, d.spec.table_name, tuple(d.primary_key))
                for d in self._view(principal).datasets.values()
                if d.spec.table_name == table and (schema is None or d.spec.schema_name == schema)]

    def datasets(self, principal: Principal) -> list[dict]:
        """One entry per configured dataset: name, kind, state, description, acceleration status,
        searchable columns."""
        view = self._view(principal)
        searchable: dict[str, list[str]] = {}
        for dataset, column in self.stack.search.searchable(unmasked_columns(view)):
            searchable.setdefault(dataset, []).append(column)
        rows = []
        for row in view.dataset_rows():
            for key in ("error", "last_error"):
                if row.get(key):
                    row[key] = self.redact(str(row[key]))
            row["searchable_columns"] = searchable.get(row["name"], [])
            rows.append(row)
        return rows

    def dataset(self, principal: Principal, name: str) -> dict:
        """One dataset's entry as ``datasets`` lists it (``name`` may leave out the ``public`` schema)."""
        found = self._dataset(principal, name).qualified_name
        return next(row for row in self.datasets(principal) if row["name"] == found)

    def schema(self, principal: Principal, name: str) -> pa.Schema:
        dataset = self._dataset(principal, name)
        if dataset.arrow_schema is None:
            raise ServiceError(UNAVAILABLE, self.redact(f"dataset {dataset.qualified_name} is unavailable: "
                                                        f"{dataset.error}"))
        return dataset.arrow_schema

    def sample(self, principal: Principal, name: str, n: int = 10, how: str = "first",
               door: str = CORE) -> pa.RecordBatchReader:
        """Up to ``n`` rows of a dataset: the first ones, a random choice, or distinct rows."""
        return self.execute(self.plan_sample(principal, name, n, how, door))

    def plan_sample(self, principal: Principal, name: str, n: int = 10, how: str = "first",
                    door: str = CORE) -> Planned:
        if how not in SAMPLE_KINDS:
            raise ServiceError(INVALID, f"unknown sample kind {how!r} (expected {', '.join(SAMPLE_KINDS)})")
        _check_sample_size(n)
        table = self._table(principal, name)
        select = {"first": f"SELECT * FROM {table}",
                  "random": f"SELECT * FROM {table} ORDER BY random()",
                  "distinct": f"SELECT DISTINCT * FROM {table}"}[how]
        return self.plan(principal, f"{select} LIMIT {n}", door=door)

    def plan_top(self, principal: Principal, name: str, order_by: str, n: int = 10,
                 descending: bool = True) -> Planned:
        """The ``n`` rows of a dataset with the largest (or smallest) ``order_by``; NULLs last."""
        _check_sample_size(n)
        column = quote_double(self._columns(principal, name, [order_by])[0])
        direction = "DESC" if descending else "ASC"
        return self.plan(principal, f"SELECT * FROM {self._table(principal, name)} ORDER BY {column} {direction} "
                                    f"NULLS LAST LIMIT {n}")

    def plan_distinct_values(self, principal: Principal, name: str, columns: list[str] | None = None,
                             n: int = 10) -> Planned:
        """Up to ``n`` distinct non-NULL values of each column (all of them by default), as text:
        one row per value, ``column_name`` and ``value``, in the columns' order."""
        _check_sample_size(n)
        table = self._table(principal, name)
        chosen = self._columns(principal, name, columns)
        parts = [f"SELECT {position} AS position, {standard_literal(column)} AS column_name, "
                 f"CAST({quote_double(column)} AS VARCHAR) AS value "
                 f"FROM (SELECT DISTINCT {quote_double(column)} FROM {table} "
                 f"WHERE {quote_double(column)} IS NOT NULL LIMIT {n})"
                 for position, column in enumerate(chosen)]
        union = " UNION ALL ".join(f"({part})" for part in parts)
        return self.plan(principal, f"SELECT column_name, value FROM ({union}) ORDER BY position, value")

    def search(self, principal: Principal, dataset: str, text: str, k: int = 10, mode: str = "hybrid",
               where: str | None = None, column: str | None = None, door: str = CORE,
               truncation: Truncation | None = None) -> pa.RecordBatchReader:
        """The ``k`` best rows of a dataset for ``text`` (the dataset's columns plus ``score`` and
        ``chunk``), through the search table functions, so it obeys everything SQL does.
        ``where`` is a SQL condition on the dataset's columns, applied before ranking."""
        return self.execute(self.plan_search(principal, dataset, text, k, mode, where, column, door),
                            truncation=truncation)

    def plan_search(self, principal: Principal, dataset: str, text: str, k: int = 10, mode: str = "hybrid",
                    where: str | None = None, column: str | None = None, door: str = CORE) -> Planned:
        if mode not in SEARCH_MODES:
            raise ServiceError(INVALID, f"unknown search mode {mode!r} (expected {', '.join(SEARCH_MODES)})")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ServiceError(INVALID, "the number of results must be a positive integer")
        if not isinstance(text, str) or not text.strip():
            raise ServiceError(INVALID, "the search text must be a non-empty string")
        searched = self._dataset(principal, dataset).qualified_name
        arguments = [standard_literal(searched), "$1", str(k)]
        if column is not None:
            arguments.append(standard_literal(column))
        sql = f"SELECT * FROM {mode}_search({', '.join(arguments)})"
        if where:
            sql += f" WHERE {where}"
        return self.plan(principal, sql + " ORDER BY score DESC", [text], door=door)

    def qualified_name(self, principal: Principal, dataset: str) -> str:
        """A dataset's full name (``schema.table``); NOT_FOUND for an unknown one."""
        return self._dataset(principal, dataset).qualified_name

    # ---- models ----

    def embedding_models(self, principal: Principal) -> list[str]:
        return self.stack.models.embedding_names

    def embed(self, principal: Principal, model: str | None, texts: list[str],
              check_tokens: Callable[[list[int]], None] = lambda tokens: None
              ) -> tuple[pa.FixedSizeListArray, list[int]]:
        """One normalized vector per text, and each text's length in the model's tokens (before
        its own truncation); ``model`` None is the default embedding model. ``check_tokens`` may
        refuse the texts by their lengths: it runs once the request is counted and admitted, as
        counting tokens is work too."""
        name = self._embedding_model(model, texts)
        timeout = principal.limits.timeout_seconds
        self._count_request(principal)
        with self._admitted(principal), self._translated():
            embedder = self.stack.models.embedder(name)
            _check_result_bytes(principal.limits, len(texts) * embedder.dim * 4, f"{len(texts)} vectors")
            tokens = embedder.count_tokens(texts)
            check_tokens(tokens)
            started, parts = time.monotonic(), []
            for first in range(0, len(texts), EMBED_PART):
                if parts and timeout is not None and time.monotonic() - started > timeout:
                    raise ServiceError(TIMED_OUT, f"embedding {len(texts)} texts ran out of time after "
                                                  f"{first} (its limit is {timeout:g} s: query_timeout_seconds)")
                parts.append(embedder.embed(pa.array(texts[first:first + EMBED_PART], pa.string())))
            self.stack.metrics.embedded(name, len(texts), sum(tokens))
        return (pa.concat_arrays(parts) if len(parts) != 1 else parts[0]), tokens

    def _embedding_model(self, model: str | None, texts: list[str]) -> str:
        names = self.stack.models.embedding_names
        name = model if model is not None else self.stack.model_functions.default_embedding
        if name not in names:
            raise ServiceError(NOT_FOUND, f"unknown embedding model {name!r} (known: {', '.join(names) or 'none'})")
        if not all(isinstance(t, str) for t in texts):
            raise ServiceError(INVALID, "every input to embed must be a string")
        return name

    # ---- acceleration ----

    def refresh(self, principal: Principal, dataset: str, sql: str | None = None) -> dict:
        """Refresh an accelerated dataset now and wait; its status after the refresh. A one-off
        ``sql`` (SELECT * FROM NAME WHERE ...) replaces the working set for this refresh only.
        A refresh makes the backend work on demand: only a caller allowed to refresh may."""
        if not principal.may_refresh:
            raise ServiceError(REFUSED, f"{principal.name} may not refresh datasets: "
                                        "give its key `refresh: true` in runtime.auth")
        name = self._dataset(principal, dataset).qualified_name
        # Its SQL filters on every column and the copy's rows then tell the raw values apart.
        if sql is not None and (principal.grant.masks_of(name) or principal.grant.columns_of(name) is not None):
            raise ServiceError(REFUSED, f"{principal.name} sees only some columns of {name}, or sees them masked: "
                                        "it may not refresh it with SQL of its own")
        try:
            self._count_request(principal)  # backend work on demand: a request
            with self._admitted(principal), self._translated():
                return self.stack.refresh(name, sql)
        except ValueError as error:  # a refresh_sql that cannot be used for this dataset
            raise ServiceError(INVALID, self.redact(str(error))) from None

    # ---- the process ----

    def health(self) -> dict:
        return {"status": "ok", "version": __version__}

    def ready(self) -> bool:
        """True once every accelerated dataset with ``ready_state: on_load`` has a loaded copy
        (but one whose source could first be opened after startup: the server was ready without it)."""
        accelerator = self.stack.accelerator
        return all(refresher.loaded.is_set() for name, refresher in accelerator.refreshers.items()
                   if accelerator.gates_readiness(name))

    def metrics(self, principal: Principal = OPERATOR) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type, for a principal granted
        everything: its labels name every dataset and source."""
        if not principal.grant.is_full:
            raise ServiceError(REFUSED, f"{principal.name} is granted some datasets only, and the metrics name "
                                        "every dataset and source: scrape them with a key granted everything")
        return self.stack.metrics.render(), METRICS_CONTENT_TYPE

    def status(self, principal: Principal = OPERATOR) -> dict:
        """The process and what the principal may see of its datasets and sources."""
        return {"version": __version__, "ready": self.ready(),
                "datasets": self.datasets(principal),
                "sources": self._view(principal).source_stats()}

    # ---- errors ----

    def _dataset(self, principal: Principal, name: str):
        """A dataset as the principal sees it; one it may not see is as unknown as one that does not exist."""
        datasets = self._view(principal).datasets
        dataset = datasets.get(qualified(name))
        if dataset is None:
            known = ", ".join(sorted(datasets)) or "none"
            raise ServiceError(NOT_FOUND, f"unknown dataset {name!r} (datasets: {known})")
        return dataset

    def _table(self, principal: Principal, name: str) -> str:
        """A dataset's name quoted for SQL."""
        spec = self._dataset(principal, name).spec
        return f"{quote_double(spec.schema_name)}.{quote_double(spec.table_name)}"

    def _columns(self, principal: Principal, name: str, columns: list[str] | None) -> list[str]:
        """``columns`` checked against the dataset's schema (None: every column)."""
        known = self.schema(principal, name).names
        if columns is None:
            return list(known)
        if not columns:
            raise ServiceError(INVALID, "name at least one column")
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise ServiceError(INVALID, f"unknown column {unknown[0]!r} in {name} (columns: {', '.join(known)})")
        return list(columns)

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """Known failures of the engine, connectors, models and accelerator become ServiceErrors."""
        try:
            yield
        except Exception as error:
            translated = self._service_error(error)
            if translated is None or translated is error:
                raise
            raise translated from None

    def _service_error(self, error: Exception) -> ServiceError | None:
        """The engine's, connectors', models' and accelerator's errors in the core's taxonomy;
        None for anything else (a bug: the door reports an internal error)."""
        if isinstance(error, ServiceError):
            return error
        if isinstance(error, QueryError):
            return _engine_error(error.kind, self.redact(str(error)))
        if isinstance(error, ConnectorError):
            return ServiceError(UNAVAILABLE, self.redact(str(error)))
        if isinstance(error, (ModelError, SearchError, AccelerationError)):
            return ServiceError(INVALID, self.redact(str(error)))
        return None


def _engine_error(kind: str, message: str) -> ServiceError:
    """The engine's limit errors are a source's load budget, busy now: a retry may work."""
    return ServiceError(kind, message, retry_after=1.0 if kind == LIMIT_EXCEEDED else None)


def _stopped(slot: Slot, limits: QueryLimits) -> ServiceError:
    """Why a query stopped before its end: its deadline, or its caller."""
    if slot.expired:
        return ServiceError(TIMED_OUT, f"the query ran out of time (its limit is {limits.timeout_seconds:g} s: "
                                       "query_timeout_seconds)")
    return ServiceError(CANCELLED, "the query was cancelled")


def _check_sample_size(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_SAMPLE_ROWS:
        raise ServiceError(INVALID, f"the sample size must be an integer from 1 to {MAX_SAMPLE_ROWS}")


def _outcome(error: Exception) -> str:
    """A failure as a metrics outcome: its error kind, or an internal error."""
    return error.kind if isinstance(error, ServiceError) else INTERNAL_ERROR


def _check_result_bytes(limits: QueryLimits, size: int, what: str) -> None:
    """Refuse an answer that cannot be cut (vectors) and would pass the principal's max_result_bytes."""
    if limits.max_bytes is not None and size > limits.max_bytes:
        raise ServiceError(LIMIT_EXCEEDED, f"{what} are {size:,} bytes, over this key's result limit of "
                                           f"{limits.max_bytes:,} (max_result_bytes): send fewer inputs")


def _without_values(message: str, parameters: Any) -> str:
    """A message with the text values bound to the statement written as ***: where the audit
    does not keep parameters, it does not keep them quoted in an error either (nor the start of
    one the message was cut in). Values of a few characters are left: they would be found in
    any message's words."""
    for value in sorted((v for v in parameters if isinstance(v, str) and len(v) >= 4), key=len, reverse=True):
        head = value[:32]
        start = message.find(head)
        while start != -1:
            end = start + len(head)
            while end < len(message) and end - start < len(value) and message[end] == value[end - start]:
                end += 1
            message = f"{message[:start]}***{message[end:]}"
            start = message.find(head, start + 3)
    return message


def _audited_list(statements: list[str]) -> list[str]:
    """The statements a query sent its backends, as the audit keeps them: the first
    AUDITED_BACKENDS, each as ``_audited`` keeps a statement (a query reading a CTE hundreds of
    times sends as many statements)."""
    kept = [_audited(statement) for statement in statements[:AUDITED_BACKENDS]]
    if len(statements) > AUDITED_BACKENDS:
        kept.append(f"... and {len(statements) - AUDITED_BACKENDS:,} more")
    return kept


def _audited(sql: str) -> str:
    """A statement (or the parameters) as the audit keeps it: its first AUDITED_SQL_CHARS characters and, past them,
    its length and hash (a refused giant statement must not fill the audit's memory and files,
    and rotate the earlier entries away), in valid Unicode (half a surrogate pair, which JSON
    escapes can write, would break the audit table for everyone who reads it)."""
    if len(sql) > AUDITED_SQL_CHARS:
        digest = hashlib.sha256(sql.encode("utf-8", "surrogatepass")).hexdigest()
        sql = f"{sql[:AUDITED_SQL_CHARS]}... ({len(sql):,} characters, sha256 {digest})"
    return sql.encode("utf-8", "backslashreplace").decode("utf-8")
