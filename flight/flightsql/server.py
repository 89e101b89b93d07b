"""The Arrow Flight SQL door, on pyarrow.flight.

Commands arrive packed in ``google.protobuf.Any`` and are dispatched from one table
(COMMANDS: message class, result schema, handler; ACTIONS for DoAction). Queries are
planned at GetFlightInfo (so a bad query fails before any data moves) and streamed at
DoGet. Everything that writes is refused: flightdeck is read-only. Every request goes to
the Service; its errors become Flight errors in one place (``flight_error``).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf import any_pb2

from flight.flightsql import metadata
from flight.flightsql.auth import AuthMiddlewareFactory, NoOpAuthHandler
from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flightdeck import __version__
from flightdeck.auth import Principal
from flightdeck.errors import (CANCELLED, INVALID, LIMIT_EXCEEDED, NOT_FOUND, REFUSED, TIMED_OUT,
                               UNAUTHENTICATED, UNAVAILABLE, ServiceError)
from flightdeck.runtime_config import TlsFiles
from flightdeck.service import MAX_PARAMETER_BYTES, Cancellation, Freshness, Planned, Service

log = logging.getLogger("flightdeck.flightsql")

DOOR = "flightsql"  # this door's label in the metrics
TYPE_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."
Item = TypeVar("Item")
READ_ONLY_MESSAGE = "flightdeck is read-only: {what} is not allowed"
CANCEL_STATUS_CANCELLED, CANCEL_STATUS_NOT_CANCELLABLE = 1, 3
CLOSE_SESSION_CLOSED = 1
DATA_AS_OF = "flightdeck.data_as_of"                    # result schema metadata: the oldest copy read
DATA_AS_OF_DATASETS = "flightdeck.data_as_of.datasets"  # each copy read, as JSON {name: time}
SMALL_RESULT_BYTES = 256 * 1024  # a result this small is read whole before it is sent
HANDLES_PER_PRINCIPAL = 1000  # prepared statements (and, apart, pending tickets) a principal keeps
HANDLE_BYTES_PER_PRINCIPAL = 256 * 1024 * 1024  # what they may weigh, per principal and registry
HANDLE_BYTES = 2 * 1024 * 1024 * 1024           # and for every principal together (without auth, names are free)
# A kept plan holds DataFusion's plan of the statement (Planned.plan_bytes) beside its text: about
# 0.4 MB for a short statement planned afresh (a plan cache of 0 entries) is counted at least.
PLAN_BYTES = 256 * 1024
SCALAR_BYTES = 16  # a bound number, date or the like


# ---- errors: the core's kinds as Flight statuses, in one place ----

FLIGHT_ERRORS: dict[str, type[flight.FlightError]] = {
    INVALID: flight.FlightServerError,
    NOT_FOUND: flight.FlightServerError,
    REFUSED: flight.FlightUnauthorizedError,
    UNAVAILABLE: flight.FlightUnavailableError,
    LIMIT_EXCEEDED: flight.FlightServerError,
    UNAUTHENTICATED: flight.FlightUnauthenticatedError,
    CANCELLED: flight.FlightCancelledError,
    TIMED_OUT: flight.FlightTimedOutError,
}


def flight_error(error: Exception) -> flight.FlightError:
    """Any failure as the Flight error a client sees: a clean message, never a traceback."""
    if isinstance(error, flight.FlightError):
        return error
    if isinstance(error, ServiceError):
        return FLIGHT_ERRORS[error.kind](error.message)
    log.exception("internal error")
    return flight.FlightInternalError(f"internal error ({type(error).__name__}); details are in the server log")


def clean_errors(method: Callable) -> Callable:
    """Only FlightError subclasses cross pyarrow without the server's Python traceback
    attached, so every other exception is translated here."""
    @functools.wraps(method)
    def wrapper(self: "FlightSqlServer", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            raise flight_error(error) from None
    return wrapper


# ---- the wire format ----

def pack(message) -> bytes:
    wrapper = any_pb2.Any()
    wrapper.Pack(message, type_url_prefix="type.googleapis.com/")
    return wrapper.SerializeToString()


def unpack(data: bytes) -> tuple[str, bytes]:
    """(message name, its bytes) of an Any-packed Flight SQL command."""
    wrapper = any_pb2.Any()
    try:
        wrapper.ParseFromString(data)
    except Exception:
        raise ServiceError(INVALID, "malformed request: not a Flight SQL command") from None
    if not wrapper.type_url.startswith(TYPE_PREFIX):
        raise ServiceError(INVALID, f"unsupported command type {wrapper.type_url or '(none)'}")
    return wrapper.type_url[len(TYPE_PREFIX):], wrapper.value


def parse(message_class, data: bytes):
    message = message_class()
    try:
        message.ParseFromString(data)
    except Exception:
        raise ServiceError(INVALID, f"malformed {message_class.__name__}") from None
    return message


# ---- server-side state ----

def value_bytes(value: pa.Scalar) -> int:
    """About what one value bound over DoPut holds in memory."""
    if pa.types.is_primitive(value.type):
        return SCALAR_BYTES
    if hasattr(value, "as_buffer"):  # a string or binary, without copying it
        buffer = value.as_buffer()
        return SCALAR_BYTES if buffer is None else buffer.size
    return pa.repeat(value, 1).nbytes  # a list, struct, map or dictionary value


def kept_bytes(planned: Planned, parameters: Iterable[pa.Scalar] | None) -> int:
    """About what a kept plan and the values bound to it hold in memory."""
    return max(PLAN_BYTES, planned.plan_bytes) + len(planned.sql) + sum(value_bytes(v) for v in parameters or ())


@dataclass
class PreparedStatement:
    principal: Principal
    sql: str
    planned: Planned               # the plan without parameters, reused until some are bound
    parameter_schema: pa.Schema
    parameters: list[Any] | None = None
    weight: int = 0                # what it holds (``kept_bytes``), weighed when made and when bound

    def __post_init__(self) -> None:
        self.bind(self.parameters)

    def bind(self, parameters: list[Any] | None) -> None:
        self.parameters = parameters
        self.weight = kept_bytes(self.planned, parameters)

    @property
    def dataset_schema(self) -> pa.Schema:
        return self.planned.schema


@dataclass
class PendingQuery:
    principal: Principal
    planned: Planned
    cancelled: threading.Event = field(default_factory=threading.Event)
    backend: Cancellation = field(default_factory=Cancellation)  # its running backend statements
    weight: int = 0  # what it holds (``kept_bytes``)

    def __post_init__(self) -> None:
        self.weight = kept_bytes(self.planned, self.planned.parameters)

    def cancel(self) -> None:
        self.cancelled.set()
        self.backend.cancel()


class ClientWatch:
    """While a call waits on the engine (for a backend's first rows, say), a thread watches
    whether its client went away or cancelled, and then cancels the query's backend
    statements at once. A call context is only valid during its call, so it is looked at
    only inside ``waiting`` and under the lock that ``waiting`` takes on its way out."""

    def __init__(self, interval_seconds: float = 0.1):
        self.interval_seconds = interval_seconds
        self._waiting: dict[int, tuple[Any, PendingQuery]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def waiting(self, context, query: PendingQuery) -> Iterator[None]:
        key = id(context)
        with self._lock:
            self._waiting[key] = (context, query)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="flightdeck-client-watch", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._waiting.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval_seconds)
            with self._lock:
                gone = [query for context, query in self._waiting.values()
                        if query.cancelled.is_set() or context.is_cancelled()]
            for query in gone:
                query.cancel()


class HandleRegistry(Generic[Item]):
    """Items by opaque handle, each visible to its own principal only; an item unused for
    ``ttl_seconds`` is forgotten, and so are a principal's least recently used ones past its
    ``per_principal`` or past ``bytes_per_principal`` of their ``weight`` (a client preparing
    statements in a loop must not fill the memory), and everyone's least recently used past
    ``total_bytes`` (without authentication, each name a client gives is a principal)."""

    def __init__(self, ttl_seconds: float, missing: str, per_principal: int = HANDLES_PER_PRINCIPAL,
                 bytes_per_principal: int = HANDLE_BYTES_PER_PRINCIPAL, total_bytes: int = HANDLE_BYTES):
        self.ttl_seconds = ttl_seconds
        self.missing = missing
        self.per_principal = per_principal
        self.bytes_per_principal = bytes_per_principal
        self.total_bytes = total_bytes
        self._items: dict[bytes, tuple[Item, float]] = {}
        self._lock = threading.Lock()

    def add(self, item: Item) -> bytes:
        handle = uuid.uuid4().bytes
        with self._lock:
            self._items[handle] = (item, time.monotonic())
            self._fit(handle)
        return handle

    def refit(self, handle: bytes) -> None:
        """Keep to the bounds again after the item of ``handle`` grew (parameters bound to it)."""
        with self._lock:
            if handle in self._items:
                self._fit(handle)

    def _fit(self, kept: bytes) -> None:
        """Forget expired items, then the least recently used ones past the bounds, never ``kept``."""
        now = time.monotonic()
        self._items = {h: entry for h, entry in self._items.items() if entry[1] > now - self.ttl_seconds}
        principal = self._items[kept][0].principal
        by_age = sorted((used, h, item.weight, item.principal.owns(principal))
                        for h, (item, used) in self._items.items() if h != kept)
        kept_weight = self._items[kept][0].weight
        own = [entry for entry in by_age if entry[3]]
        own_count, own_bytes = len(own) + 1, kept_weight + sum(entry[2] for entry in own)
        for _, handle, weight, _ in own:
            if own_count <= self.per_principal and own_bytes <= self.bytes_per_principal:
                break
            del self._items[handle]
            own_count, own_bytes = own_count - 1, own_bytes - weight
        total = kept_weight + sum(entry[2] for entry in by_age if entry[1] in self._items)
        for _, handle, weight, _ in by_age:
            if total <= self.total_bytes:
                break
            if handle in self._items:
                del self._items[handle]
                total -= weight

    def get(self, handle: bytes, principal: Principal) -> Item:
        item = self.find(handle, principal)
        if item is None:
            raise ServiceError(NOT_FOUND, self.missing)
        with self._lock:
            if handle in self._items:
                self._items[handle] = (item, time.monotonic())
        return item

    def find(self, handle: bytes, principal: Principal) -> Item | None:
        with self._lock:
            entry = self._items.get(handle)
        if entry is None or not entry[0].principal.owns(principal):
            return None
        return entry[0]

    def remove(self, handle: bytes) -> None:
        with self._lock:
            self._items.pop(handle, None)


# ---- the command table ----

@dataclass(frozen=True)
class Command:
    """How the door answers one Flight SQL command. ``schema`` gives the result schema
    (GetFlightInfo, GetSchema); a statement has ``plan`` (planned at GetFlightInfo, streamed
    by ticket), a metadata command has ``rows`` (its result, at DoGet), a command DoPut takes
    has ``put``; ``refusal`` answers a command flightdeck does not run."""
    message: type
    schema: Callable[["FlightSqlServer", Principal, Any], pa.Schema] | None = None
    plan: Callable[["FlightSqlServer", Principal, Any], Planned] | None = None
    rows: Callable[["FlightSqlServer", Principal, Any], pa.Table] | None = None
    put: Callable[["FlightSqlServer", Principal, Any, Any, Any], None] | None = None
    refusal: tuple[str, str] | None = None   # (error kind, message)


def _fixed(schema: pa.Schema):
    return lambda server, principal, command: schema


def _refused(what: str) -> tuple[str, str]:
    return REFUSED, READ_ONLY_MESSAGE.format(what=what)


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def _tables_schema(server, principal, command) -> pa.Schema:
    return metadata.TABLES_WITH_SCHEMA_SCHEMA if command.include_schema else metadata.TABLES_SCHEMA


def _tables_rows(server: "FlightSqlServer", principal: Principal, command) -> pa.Table:
    service = server.service
    return metadata.tables_table(
        service.catalog_name, service.tables(principal), _optional(command, "catalog"),
        _optional(command, "db_schema_filter_pattern"), _optional(command, "table_name_filter_pattern"),
        list(command.table_types), command.include_schema)


_FOREIGN_KEYS = Command(sql_pb.CommandGetExportedKeys, _fixed(metadata.FOREIGN_KEYS_SCHEMA),
                        rows=lambda server, principal, command: metadata.foreign_keys_table())
_SUBSTRAIT = (INVALID, "Substrait plans are not supported: send SQL")

COMMANDS: dict[str, Command] = {
    "CommandStatementQuery": Command(
        sql_pb.CommandStatementQuery,
        schema=lambda server, principal, command: server.plan_statement(principal, command).schema,
        plan=lambda server, principal, command: server.plan_statement(principal, command)),
    "CommandPreparedStatementQuery": Command(
        sql_pb.CommandPreparedStatementQuery,
        schema=lambda server, principal, command: server.prepared.get(
            command.prepared_statement_handle, principal).dataset_schema,
        plan=lambda server, principal, command: server.plan_prepared(principal, command),
        put=lambda server, principal, command, reader, writer: server.bind(principal, command, reader, writer)),
    "CommandGetSqlInfo": Command(
        sql_pb.CommandGetSqlInfo, _fixed(metadata.SQL_INFO_SCHEMA),
        rows=lambda server, principal, command: metadata.sql_info_table(list(command.info), __version__)),
    "CommandGetCatalogs": Command(
        sql_pb.CommandGetCatalogs, _fixed(metadata.CATALOGS_SCHEMA),
        rows=lambda server, principal, command: metadata.catalogs_table(server.service.catalog_name)),
    "CommandGetDbSchemas": Command(
        sql_pb.CommandGetDbSchemas, _fixed(metadata.DB_SCHEMAS_SCHEMA),
        rows=lambda server, principal, command: metadata.db_schemas_table(
            server.service.catalog_name, server.service.schema_names(principal),
            _optional(command, "catalog"), _optional(command, "db_schema_filter_pattern"))),
    "CommandGetTables": Command(sql_pb.CommandGetTables, _tables_schema, rows=_tables_rows),
    "CommandGetTableTypes": Command(
        sql_pb.CommandGetTableTypes, _fixed(metadata.TABLE_TYPES_SCHEMA),
        rows=lambda server, principal, command: metadata.table_types_table()),
    "CommandGetPrimaryKeys": Command(
        sql_pb.CommandGetPrimaryKeys, _fixed(metadata.PRIMARY_KEYS_SCHEMA),
        rows=lambda server, principal, command: metadata.primary_keys_table(
            server.service.catalog_name,
            server.service.primary_keys(principal, command.table, _optional(command, "db_schema")),
            _optional(command, "catalog"))),
    "CommandGetExportedKeys": _FOREIGN_KEYS,
    "CommandGetImportedKeys": Command(sql_pb.CommandGetImportedKeys, _FOREIGN_KEYS.schema, rows=_FOREIGN_KEYS.rows),
    "CommandGetCrossReference": Command(sql_pb.CommandGetCrossReference, _FOREIGN_KEYS.schema,
                                        rows=_FOREIGN_KEYS.rows),
    "CommandGetXdbcTypeInfo": Command(
        sql_pb.CommandGetXdbcTypeInfo, _fixed(metadata.XDBC_TYPE_INFO_SCHEMA),
        rows=lambda server, principal, command: metadata.xdbc_type_info_table(_optional(command, "data_type"))),
    "CommandStatementSubstraitPlan": Command(sql_pb.CommandStatementSubstraitPlan, refusal=_SUBSTRAIT),
    "CommandStatementUpdate": Command(sql_pb.CommandStatementUpdate,
                                      refusal=_refused("CommandStatementUpdate")),
    "CommandPreparedStatementUpdate": Command(sql_pb.CommandPreparedStatementUpdate,
                                              refusal=_refused("CommandPreparedStatementUpdate")),
    "CommandStatementIngest": Command(sql_pb.CommandStatementIngest, refusal=_refused("CommandStatementIngest")),
}


def tls_options(tls: TlsFiles | None) -> dict[str, Any]:
    """pyarrow.flight's server TLS arguments: the certificate, and with mutual TLS the CA that
    every client certificate must chain to."""
    if tls is None:
        return {}
    options: dict[str, Any] = {"tls_certificates": [(tls.cert.read_bytes(), tls.key.read_bytes())]}
    if tls.client_ca is not None:
        options.update(verify_client=True, root_certificates=tls.client_ca.read_bytes())
    return options


def command_of(data: bytes) -> tuple[Command, Any]:
    """The table entry for an Any-packed command, and the command parsed."""
    name, body = unpack(data)
    command = COMMANDS.get(name)
    if command is None:
        raise ServiceError(INVALID, f"unsupported Flight SQL command {name}")
    if command.refusal is not None:
        raise ServiceError(*command.refusal)
    return command, parse(command.message, body)


# ---- the server ----

def _one_row(reader) -> pa.Table:
    """The one row of parameters a DoPut binds, read batch by batch: an upload of more rows, or
    of more than MAX_PARAMETER_BYTES, is refused as soon as it shows it, not once it is all held."""
    batches, rows, size = [], 0, 0
    for chunk in reader:
        if chunk.data is None:
            continue
        rows, size = rows + chunk.data.num_rows, size + chunk.data.nbytes
        if rows > 1:
            raise ServiceError(INVALID, "a query takes one set of parameters; bind one row (executemany is for "
                                        "updates, and flightdeck is read-only)")
        if size > MAX_PARAMETER_BYTES:
            raise ServiceError(LIMIT_EXCEEDED, f"the parameters are larger than {MAX_PARAMETER_BYTES:,} bytes")
        batches.append(chunk.data)
    return pa.Table.from_batches(batches, schema=reader.schema)


class FlightSqlServer(flight.FlightServerBase):
    def __init__(self, service: Service, location: str, max_batch_bytes: int = 8 * 1024 * 1024,
                 handle_ttl_seconds: float = 3600, tls: TlsFiles | None = None):
        """``location`` is ``grpc://host:port`` (``grpc+tls://`` when ``tls`` is given)."""
        super().__init__(location, auth_handler=NoOpAuthHandler(),
                         middleware={"auth": AuthMiddlewareFactory(service, flight_error)},
                         **tls_options(tls))
        self.service = service
        self.max_batch_bytes = max_batch_bytes
        self.prepared: HandleRegistry[PreparedStatement] = HandleRegistry(
            handle_ttl_seconds, "unknown or closed prepared statement handle")
        self.queries: HandleRegistry[PendingQuery] = HandleRegistry(
            handle_ttl_seconds, "unknown or expired ticket: call GetFlightInfo again")
        self.client_watch = ClientWatch()

    @staticmethod
    def principal(context) -> Principal:
        return context.get_middleware("auth").principal

    # ---- GetFlightInfo / GetSchema ----

    @clean_errors
    def get_flight_info(self, context, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        principal = self.principal(context)
        command, message = command_of(descriptor.command)
        if command.plan is not None:
            planned = command.plan(self, principal, message)
            handle = self.queries.add(PendingQuery(principal, planned))
            ticket = pack(sql_pb.TicketStatementQuery(statement_handle=handle))
            rows = self.service.row_count(planned)
            schema = planned.schema.with_metadata({**(planned.schema.metadata or {}),
                                                   **freshness_metadata(self.service.freshness(planned.accelerated))})
            return flight.FlightInfo(schema, descriptor, [flight.FlightEndpoint(ticket, [])],
                                     -1 if rows is None else rows, -1)
        if command.rows is None:
            raise ServiceError(INVALID, f"GetFlightInfo does not take {type(message).__name__}")
        return flight.FlightInfo(command.schema(self, principal, message), descriptor,
                                 [flight.FlightEndpoint(descriptor.command, [])], -1, -1)

    def schema_or_error(self, context, descriptor: flight.FlightDescriptor
                        ) -> tuple[flight.SchemaResult | None, flight.FlightError | None]:
        """GetSchema's answer, or the error to send instead (see ``get_schema`` below)."""
        try:
            return self._schema(context, descriptor), None
        except Exception as error:
            return None, flight_error(error)

    def _schema(self, context, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        principal = self.principal(context)
        command, message = command_of(descriptor.command)
        if command.schema is None:
            raise ServiceError(INVALID, f"GetSchema does not take {type(message).__name__}")
        return flight.SchemaResult(command.schema(self, principal, message))

    def plan_statement(self, principal: Principal, command) -> Planned:
        self._refuse_transaction(command)
        return self.service.plan(principal, command.query, door=DOOR)

    def plan_prepared(self, principal: Principal, command) -> Planned:
        statement = self.prepared.get(command.prepared_statement_handle, principal)
        if statement.parameters is None and len(statement.parameter_schema) == 0:
            # ADBC prepares every statement: plan it once, and again only when what it reads
            # changed (a table's columns), so that FlightInfo announces the schema that streams.
            statement.planned = self.service.current(statement.planned)
            return statement.planned
        return self.service.plan(principal, statement.sql, statement.parameters, door=DOOR,
                                 paid=statement.planned.paid)

    @staticmethod
    def _refuse_transaction(command) -> None:
        if command.HasField("transaction_id"):
            raise ServiceError(*_refused("a transaction"))

    # ---- DoGet ----

    @clean_errors
    def do_get(self, context, ticket: flight.Ticket) -> flight.FlightDataStream:
        principal = self.principal(context)
        name, body = unpack(ticket.ticket)
        if name == "TicketStatementQuery":
            handle = parse(sql_pb.TicketStatementQuery, body).statement_handle
            return self._stream_query(context, principal, handle)
        command, message = command_of(ticket.ticket)
        if command.rows is None:
            raise ServiceError(INVALID, f"unsupported ticket {name}")
        return flight.RecordBatchStream(command.rows(self, principal, message))

    def _stream_query(self, context, principal: Principal, handle: bytes) -> flight.FlightDataStream:
        """A small result is read whole here and sent by pyarrow from C++ (no Python per batch);
        a larger one streams through ``_guarded``, starting with the batches already read."""
        query = self.queries.get(handle, principal)
        try:
            freshness = self.service.freshness(query.planned.accelerated)
            with self.client_watch.waiting(context, query):
                reader = self.service.execute(query.planned, query.cancelled, query.backend)
        except Exception as error:
            self.queries.remove(handle)
            if query.cancelled.is_set() and not _timed_out(error):
                raise ServiceError(CANCELLED, "the query was cancelled") from None
            raise error
        schema = reader.schema.with_metadata({**(reader.schema.metadata or {}), **freshness_metadata(freshness)})
        head, complete, failure = [], False, None
        try:
            with self.client_watch.waiting(context, query):
                head, complete = read_head(reader, min(SMALL_RESULT_BYTES, self.max_batch_bytes))
        except Exception as error:  # the client meets it in the stream, as it would have later
            failure = error
        if complete and all(batch.nbytes <= self.max_batch_bytes for batch in head):
            reader.close()
            self.queries.remove(handle)
            return flight.RecordBatchStream(pa.Table.from_batches(head, reader.schema).replace_schema_metadata(
                schema.metadata))
        return flight.GeneratorStream(schema, self._guarded(context, handle, query, reader, head, failure))

    def _guarded(self, context, handle: bytes, query: PendingQuery, reader: pa.RecordBatchReader,
                 head: list[pa.RecordBatch], failure: Exception | None = None) -> Iterator[pa.RecordBatch]:
        """Stream batches under the message size limit, ``head`` first (or ``failure`` met while
        reading it); stop when the client cancels."""
        try:
            if failure is not None:
                raise failure
            while True:
                if head:
                    batch = head.pop(0)
                else:
                    with self.client_watch.waiting(context, query):
                        batch = next(reader, None)
                if batch is None:
                    break
                if query.cancelled.is_set() or context.is_cancelled():
                    raise ServiceError(CANCELLED, "the query was cancelled")
                yield from split_batch(batch, self.max_batch_bytes)
        except Exception as error:
            if query.cancelled.is_set() and not _timed_out(error):
                # the backend stopped because the query was cancelled
                error = ServiceError(CANCELLED, "the query was cancelled")
            raise flight_error(error) from None
        finally:
            reader.close()
            self.queries.remove(handle)

    # ---- not part of Flight SQL: refused cleanly rather than with pyarrow's default ----

    def list_flights(self, context, criteria):
        raise flight.FlightServerError("ListFlights is not supported: use the Flight SQL catalog commands")

    def do_exchange(self, context, descriptor, reader, writer):
        raise flight.FlightServerError("DoExchange is not supported by flightdeck")

    # ---- DoPut ----

    @clean_errors
    def do_put(self, context, descriptor: flight.FlightDescriptor, reader, writer) -> None:
        principal = self.principal(context)
        command, message = command_of(descriptor.command)
        if command.put is None:
            raise ServiceError(INVALID, f"DoPut does not take {type(message).__name__}")
        with self.service.receiving(principal):
            command.put(self, principal, message, reader, writer)

    def bind(self, principal: Principal, command, reader, writer) -> None:
        """Parameters for a prepared statement: one row, one value per placeholder."""
        handle = command.prepared_statement_handle
        statement = self.prepared.get(handle, principal)
        parameters = _one_row(reader)
        expected = len(statement.parameter_schema)
        if parameters.num_rows == 1 and parameters.num_columns != expected:
            raise ServiceError(
                INVALID, f"the statement takes {expected} parameter(s), {parameters.num_columns} were bound")
        statement.bind([parameters.column(i)[0] for i in range(parameters.num_columns)]
                       if parameters.num_rows else None)
        self.prepared.refit(handle)
        result = sql_pb.DoPutPreparedStatementResult(prepared_statement_handle=handle)
        writer.write(pa.py_buffer(result.SerializeToString()))

    # ---- DoAction ----

    def list_actions(self, context):
        return [(name, description) for name, (_, description) in ACTIONS.items()]

    @clean_errors
    def do_action(self, context, action: flight.Action):
        principal = self.principal(context)
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        if kind in ACTIONS:
            return ACTIONS[kind][0](self, principal, body)
        if kind in REFUSED_ACTIONS:
            raise ServiceError(*REFUSED_ACTIONS[kind])
        raise ServiceError(INVALID, f"unsupported action {kind!r}")

    def create_prepared_statement(self, principal: Principal, body: bytes) -> list[flight.Result]:
        name, value = unpack(body)
        if name != "ActionCreatePreparedStatementRequest":
            raise ServiceError(INVALID, f"CreatePreparedStatement expects its request, got {name}")
        request = parse(sql_pb.ActionCreatePreparedStatementRequest, value)
        self._refuse_transaction(request)
        planned = self.service.plan(principal, request.query, door=DOOR)
        statement = PreparedStatement(principal, request.query, planned,
                                      self.service.parameter_schema(principal, request.query))
        handle = self.prepared.add(statement)
        result = sql_pb.ActionCreatePreparedStatementResult(
            prepared_statement_handle=handle,
            dataset_schema=statement.dataset_schema.serialize().to_pybytes(),
            parameter_schema=statement.parameter_schema.serialize().to_pybytes())
        return [flight.Result(pa.py_buffer(pack(result)))]

    def close_prepared_statement(self, principal: Principal, body: bytes) -> list:
        _, value = unpack(body)
        handle = parse(sql_pb.ActionClosePreparedStatementRequest, value).prepared_statement_handle
        if self.prepared.find(handle, principal) is not None:
            self.prepared.remove(handle)
        return []

    def refresh(self, principal: Principal, body: bytes) -> list[flight.Result]:
        try:
            request = json.loads(body or b"{}")
            dataset, refresh_sql = request["dataset"], request.get("refresh_sql")
        except (ValueError, KeyError, TypeError):
            raise ServiceError(
                INVALID, 'Refresh expects a JSON body {"dataset": NAME, "refresh_sql": optional SQL}') from None
        status = self.service.refresh(principal, str(dataset), refresh_sql)
        return [flight.Result(pa.py_buffer(json.dumps(status, default=str).encode()))]

    def cancel_flight_info(self, principal: Principal, body: bytes) -> list[flight.Result]:
        status = self._cancel(principal, parse(sql_pb.CancelFlightInfoRequest, body).info)
        return [flight.Result(pa.py_buffer(sql_pb.CancelFlightInfoResult(status=status).SerializeToString()))]

    def cancel_query(self, principal: Principal, body: bytes) -> list[flight.Result]:
        _, value = unpack(body)
        status = self._cancel(principal, parse(sql_pb.ActionCancelQueryRequest, value).info)
        return [flight.Result(pa.py_buffer(pack(sql_pb.ActionCancelQueryResult(result=status))))]

    def _cancel(self, principal: Principal, info_bytes: bytes) -> int:
        try:
            info = flight.FlightInfo.deserialize(info_bytes)
        except Exception:
            raise ServiceError(INVALID, "malformed FlightInfo in cancel request") from None
        cancelled = False
        for endpoint in info.endpoints:
            name, body = unpack(endpoint.ticket.ticket)
            if name != "TicketStatementQuery":
                continue
            handle = parse(sql_pb.TicketStatementQuery, body).statement_handle
            query = self.queries.find(handle, principal)
            if query is not None:
                query.cancel()
                cancelled = True
        return CANCEL_STATUS_CANCELLED if cancelled else CANCEL_STATUS_NOT_CANCELLABLE

    def close_session(self, principal: Principal, body: bytes) -> list[flight.Result]:
        result = sql_pb.CloseSessionResult(status=CLOSE_SESSION_CLOSED)
        return [flight.Result(pa.py_buffer(result.SerializeToString()))]


# DoAction: name -> (handler, description for ListActions)
ACTIONS: dict[str, tuple[Callable[[FlightSqlServer, Principal, bytes], list], str]] = {
    "CreatePreparedStatement": (FlightSqlServer.create_prepared_statement,
                                "Prepare a read statement; returns its handle and schemas"),
    "ClosePreparedStatement": (FlightSqlServer.close_prepared_statement, "Release a prepared statement"),
    "CancelFlightInfo": (FlightSqlServer.cancel_flight_info, "Cancel the query behind a FlightInfo"),
    "CancelQuery": (FlightSqlServer.cancel_query, "Cancel the query behind a FlightInfo (deprecated form)"),
    "CloseSession": (FlightSqlServer.close_session, "End the client's session"),
    "Refresh": (FlightSqlServer.refresh, 'flightdeck: refresh an accelerated dataset now; body JSON '
                                         '{"dataset": NAME, "refresh_sql": optional one-off working set}; '
                                         'returns its status'),
}
REFUSED_ACTIONS: dict[str, tuple[str, str]] = {
    **{name: _refused("a transaction")
       for name in ("BeginTransaction", "EndTransaction", "BeginSavepoint", "EndSavepoint")},
    "CreatePreparedSubstraitPlan": _SUBSTRAIT,
}


def freshness_metadata(freshness: Freshness | None) -> dict[str, str]:
    """Schema metadata telling when the accelerated copies a result read were taken."""
    if freshness is None:
        return {}
    return {DATA_AS_OF: freshness.oldest.isoformat(),
            DATA_AS_OF_DATASETS: json.dumps({name: when.isoformat() for name, when in freshness.datasets.items()})}


def read_head(reader: pa.RecordBatchReader, max_bytes: int) -> tuple[list[pa.RecordBatch], bool]:
    """The first batches of a result, up to about ``max_bytes``, and whether that was all of it."""
    head, size = [], 0
    while size <= max_bytes:
        batch = next(reader, None)
        if batch is None:
            return head, True
        head.append(batch)
        size += batch.nbytes
    return head, False


def split_batch(batch: pa.RecordBatch, max_bytes: int) -> Iterator[pa.RecordBatch]:
    """Slices of ``batch`` small enough for the client's message size limit."""
    size = batch.nbytes
    if size <= max_bytes or batch.num_rows <= 1:
        yield batch
        return
    pieces = -(-size // max_bytes)
    rows = max(1, batch.num_rows // pieces)
    for start in range(0, batch.num_rows, rows):
        yield from split_batch(batch.slice(start, rows), max_bytes)


# pyarrow 26's GetSchema callback, unlike every other, does not catch FlightError: whatever
# get_schema raises reaches the client as UNKNOWN with the Python traceback attached. The
# status cannot be fixed from Python, but the traceback can be kept free of server paths:
# get_schema is compiled without a source file, and raises from its own frame only.
_GET_SCHEMA = """
def get_schema(self, context, descriptor):
    schema, error = self.schema_or_error(context, descriptor)
    if error is not None:
        raise error
    return schema
"""
_compiled: dict = {}
exec(compile(_GET_SCHEMA, "flightdeck", "exec"), _compiled)
FlightSqlServer.get_schema = _compiled["get_schema"]


def _timed_out(error: Exception) -> bool:
    """Whether a query stopped at its deadline (the core cancels it then too, but says why)."""
    return isinstance(error, ServiceError) and error.kind == TIMED_OUT
