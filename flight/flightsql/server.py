"""The Arrow Flight SQL server, on pyarrow.flight.

Commands arrive packed in ``google.protobuf.Any``; queries are planned at
GetFlightInfo (so a bad query fails before any data moves) and streamed at DoGet.
Everything that writes is refused: flightdeck is read-only.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Iterator, TypeVar

import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf import any_pb2

from federation.connectors import ConnectorError
from federation.engine import PlannedQuery, QueryEngine, QueryError, clean_engine_message, error_kind
from flight.flightsql import metadata
from flightdeck import __version__
from flight.flightsql.auth import AuthMiddlewareFactory, AuthPolicy, NoOpAuthHandler
from flight.flightsql.proto import flight_sql_pb2 as sql_pb

log = logging.getLogger("flightdeck.flight")

TYPE_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."
Item = TypeVar("Item")
READ_ONLY_MESSAGE = "flightdeck is read-only: {what} is not allowed"
CANCEL_STATUS_CANCELLED, CANCEL_STATUS_NOT_CANCELLABLE = 1, 3
CLOSE_SESSION_CLOSED = 1


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
        raise flight.FlightServerError("malformed request: not a Flight SQL command") from None
    if not wrapper.type_url.startswith(TYPE_PREFIX):
        raise flight.FlightServerError(f"unsupported command type {wrapper.type_url or '(none)'}")
    return wrapper.type_url[len(TYPE_PREFIX):], wrapper.value


def parse(message_class, data: bytes):
    message = message_class()
    try:
        message.ParseFromString(data)
    except Exception:
        raise flight.FlightServerError(f"malformed {message_class.__name__}") from None
    return message


# ---- server-side state --------------------------------------------------

@dataclass
class PreparedStatement:
    sql: str
    planned: PlannedQuery          # the plan without parameters, reused until some are bound
    parameter_schema: pa.Schema
    parameters: list[Any] | None = None

    @property
    def dataset_schema(self) -> pa.Schema:
        return self.planned.schema


@dataclass
class PendingQuery:
    planned: PlannedQuery
    cancelled: threading.Event = field(default_factory=threading.Event)


class HandleRegistry(Generic[Item]):
    """Items by opaque handle; an item unused for ``ttl_seconds`` is forgotten."""

    def __init__(self, ttl_seconds: float, missing: str):
        self.ttl_seconds = ttl_seconds
        self.missing = missing
        self._items: dict[bytes, tuple[Item, float]] = {}
        self._lock = threading.Lock()

    def add(self, item: Item) -> bytes:
        handle = uuid.uuid4().bytes
        with self._lock:
            oldest = time.monotonic() - self.ttl_seconds
            self._items = {h: entry for h, entry in self._items.items() if entry[1] > oldest}
            self._items[handle] = (item, time.monotonic())
        return handle

    def get(self, handle: bytes) -> Item:
        with self._lock:
            entry = self._items.get(handle)
            if entry is None:
                raise flight.FlightServerError(self.missing)
            self._items[handle] = (entry[0], time.monotonic())
        return entry[0]

    def find(self, handle: bytes) -> Item | None:
        with self._lock:
            entry = self._items.get(handle)
        return None if entry is None else entry[0]

    def remove(self, handle: bytes) -> None:
        with self._lock:
            self._items.pop(handle, None)


# ---- error mapping --------------------------------------------------------

def clean_errors(method: Callable) -> Callable:
    """Every failure reaches the client as a Flight error with a clean message.

    Only FlightError subclasses cross pyarrow without the server's Python traceback
    attached, so every other exception is translated here.
    """
    @functools.wraps(method)
    def wrapper(self: "FlightSqlServer", *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            raise self.to_flight_error(error) from None
    return wrapper


# ---- the server -------------------------------------------------------------

class FlightSqlServer(flight.FlightServerBase):
    def __init__(self, engine: QueryEngine, location: str, auth: AuthPolicy,
                 max_batch_bytes: int = 8 * 1024 * 1024, handle_ttl_seconds: float = 3600,
                 redact: Callable[[str], str] = lambda text: text,
                 refresh: Callable[[str, str | None], dict] | None = None):
        super().__init__(location, auth_handler=NoOpAuthHandler(),
                         middleware={"auth": AuthMiddlewareFactory(auth)})
        self.engine = engine
        self.max_batch_bytes = max_batch_bytes
        self.prepared: HandleRegistry[PreparedStatement] = HandleRegistry(
            handle_ttl_seconds, "unknown or closed prepared statement handle")
        self.queries: HandleRegistry[PendingQuery] = HandleRegistry(
            handle_ttl_seconds, "unknown or expired ticket: call GetFlightInfo again")
        self.redact = redact
        self.refresh = refresh  # refreshes an accelerated dataset (the Refresh action)

    def to_flight_error(self, error: Exception) -> flight.FlightError:
        if isinstance(error, flight.FlightError):
            return error
        message = self.redact(str(error))
        if isinstance(error, QueryError):
            if error.kind == "refused":
                return flight.FlightUnauthorizedError(message)
            if error.kind == "unavailable":
                return flight.FlightUnavailableError(message)
            return flight.FlightServerError(message)
        if isinstance(error, ConnectorError):
            return flight.FlightUnavailableError(message)
        log.exception("internal error")
        return flight.FlightInternalError(
            f"internal error ({type(error).__name__}); details are in the server log")

    # ---- GetFlightInfo / GetSchema ----

    @clean_errors
    def get_flight_info(self, context, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        name, body = unpack(descriptor.command)
        if name in ("CommandStatementQuery", "CommandPreparedStatementQuery"):
            planned = self._plan(name, body)
            handle = self.queries.add(PendingQuery(planned))
            ticket = pack(sql_pb.TicketStatementQuery(statement_handle=handle))
            rows = self.engine.known_row_count(planned)
            return flight.FlightInfo(planned.schema, descriptor, [flight.FlightEndpoint(ticket, [])],
                                     -1 if rows is None else rows, -1)
        schema = self._metadata_schema(name, body)
        return flight.FlightInfo(schema, descriptor,
                                 [flight.FlightEndpoint(descriptor.command, [])], -1, -1)

    @clean_errors
    def get_schema(self, context, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        name, body = unpack(descriptor.command)
        if name == "CommandStatementQuery":
            return flight.SchemaResult(self._plan(name, body).schema)
        if name == "CommandPreparedStatementQuery":
            handle = parse(sql_pb.CommandPreparedStatementQuery, body).prepared_statement_handle
            return flight.SchemaResult(self.prepared.get(handle).dataset_schema)
        return flight.SchemaResult(self._metadata_schema(name, body))

    def _plan(self, name: str, body: bytes) -> PlannedQuery:
        if name == "CommandStatementQuery":
            command = parse(sql_pb.CommandStatementQuery, body)
            self._refuse_transaction(command)
            return self.engine.plan(command.query)
        handle = parse(sql_pb.CommandPreparedStatementQuery, body).prepared_statement_handle
        statement = self.prepared.get(handle)
        if statement.parameters is None and len(statement.parameter_schema) == 0:
            return statement.planned  # ADBC prepares every statement: plan it once
        return self.engine.plan(statement.sql, statement.parameters)

    @staticmethod
    def _refuse_transaction(command) -> None:
        if command.HasField("transaction_id"):
            raise flight.FlightUnauthorizedError(READ_ONLY_MESSAGE.format(what="a transaction"))

    def _metadata_schema(self, name: str, body: bytes) -> pa.Schema:
        schemas = {
            "CommandGetSqlInfo": metadata.SQL_INFO_SCHEMA,
            "CommandGetCatalogs": metadata.CATALOGS_SCHEMA,
            "CommandGetDbSchemas": metadata.DB_SCHEMAS_SCHEMA,
            "CommandGetTableTypes": metadata.TABLE_TYPES_SCHEMA,
            "CommandGetPrimaryKeys": metadata.PRIMARY_KEYS_SCHEMA,
            "CommandGetExportedKeys": metadata.FOREIGN_KEYS_SCHEMA,
            "CommandGetImportedKeys": metadata.FOREIGN_KEYS_SCHEMA,
            "CommandGetCrossReference": metadata.FOREIGN_KEYS_SCHEMA,
            "CommandGetXdbcTypeInfo": metadata.XDBC_TYPE_INFO_SCHEMA,
        }
        if name == "CommandGetTables":
            include = parse(sql_pb.CommandGetTables, body).include_schema
            return metadata.TABLES_WITH_SCHEMA_SCHEMA if include else metadata.TABLES_SCHEMA
        if name in schemas:
            return schemas[name]
        if name == "CommandStatementSubstraitPlan":
            raise flight.FlightServerError("Substrait plans are not supported: send SQL")
        if name in ("CommandStatementUpdate", "CommandPreparedStatementUpdate", "CommandStatementIngest"):
            raise flight.FlightUnauthorizedError(READ_ONLY_MESSAGE.format(what=name))
        raise flight.FlightServerError(f"unsupported Flight SQL command {name}")

    # ---- DoGet ----

    @clean_errors
    def do_get(self, context, ticket: flight.Ticket) -> flight.FlightDataStream:
        name, body = unpack(ticket.ticket)
        if name == "TicketStatementQuery":
            handle = parse(sql_pb.TicketStatementQuery, body).statement_handle
            return self._stream_query(context, handle)
        return flight.RecordBatchStream(self._metadata_table(name, body))

    def _stream_query(self, context, handle: bytes) -> flight.FlightDataStream:
        query = self.queries.get(handle)
        if query.cancelled.is_set():
            self.queries.remove(handle)
            raise flight.FlightCancelledError("the query was cancelled")
        try:
            reader = self.engine.execute(query.planned)
        except Exception:
            self.queries.remove(handle)
            raise
        batches = self._guarded(context, handle, query, reader)
        return flight.GeneratorStream(reader.schema, batches)

    def _guarded(self, context, handle: bytes, query: PendingQuery,
                 reader: pa.RecordBatchReader) -> Iterator[pa.RecordBatch]:
        """Stream batches under the message size limit; stop when the client cancels."""
        try:
            for batch in reader:
                if query.cancelled.is_set() or context.is_cancelled():
                    raise flight.FlightCancelledError("the query was cancelled")
                yield from split_batch(batch, self.max_batch_bytes)
        except flight.FlightError:
            raise
        except Exception as error:
            raise self.to_flight_error(_unwrap_stream_error(error)) from None
        finally:
            reader.close()
            self.queries.remove(handle)

    def _metadata_table(self, name: str, body: bytes) -> pa.Table:
        catalog = self.engine.catalog
        if name == "CommandGetSqlInfo":
            return metadata.sql_info_table(list(parse(sql_pb.CommandGetSqlInfo, body).info), __version__)
        if name == "CommandGetCatalogs":
            return metadata.catalogs_table()
        if name == "CommandGetDbSchemas":
            command = parse(sql_pb.CommandGetDbSchemas, body)
            return metadata.db_schemas_table(catalog, _optional(command, "catalog"),
                                             _optional(command, "db_schema_filter_pattern"))
        if name == "CommandGetTables":
            command = parse(sql_pb.CommandGetTables, body)
            return metadata.tables_table(
                catalog, _optional(command, "catalog"), _optional(command, "db_schema_filter_pattern"),
                _optional(command, "table_name_filter_pattern"), list(command.table_types),
                command.include_schema)
        if name == "CommandGetTableTypes":
            return metadata.table_types_table()
        if name == "CommandGetPrimaryKeys":
            command = parse(sql_pb.CommandGetPrimaryKeys, body)
            return metadata.primary_keys_table(catalog, _optional(command, "catalog"),
                                               _optional(command, "db_schema"), command.table)
        if name in ("CommandGetExportedKeys", "CommandGetImportedKeys", "CommandGetCrossReference"):
            return metadata.foreign_keys_table()
        if name == "CommandGetXdbcTypeInfo":
            command = parse(sql_pb.CommandGetXdbcTypeInfo, body)
            return metadata.xdbc_type_info_table(_optional(command, "data_type"))
        self._metadata_schema(name, body)  # raises the precise error for this command
        raise flight.FlightServerError(f"unsupported ticket {name}")

    # ---- not part of Flight SQL: refused cleanly rather than with pyarrow's default ----

    def list_flights(self, context, criteria):
        raise flight.FlightServerError("ListFlights is not supported: use the Flight SQL catalog commands")

    def do_exchange(self, context, descriptor, reader, writer):
        raise flight.FlightServerError("DoExchange is not supported by flightdeck")

    # ---- DoPut ----

    @clean_errors
    def do_put(self, context, descriptor: flight.FlightDescriptor, reader, writer) -> None:
        name, body = unpack(descriptor.command)
        if name != "CommandPreparedStatementQuery":
            self._metadata_schema(name, body)  # raises: writes are refused, others unsupported
            raise flight.FlightServerError(f"DoPut does not take {name}")
        handle = parse(sql_pb.CommandPreparedStatementQuery, body).prepared_statement_handle
        statement = self.prepared.get(handle)
        parameters = reader.read_all()
        if parameters.num_rows > 1:
            raise flight.FlightServerError(
                "a query takes one set of parameters; bind one row (executemany is for updates, "
                "and flightdeck is read-only)")
        expected = len(statement.parameter_schema)
        if parameters.num_rows == 1 and parameters.num_columns != expected:
            raise flight.FlightServerError(
                f"the statement takes {expected} parameter(s), {parameters.num_columns} were bound")
        statement.parameters = ([parameters.column(i)[0] for i in range(parameters.num_columns)]
                                if parameters.num_rows else None)
        result = sql_pb.DoPutPreparedStatementResult(prepared_statement_handle=handle)
        writer.write(pa.py_buffer(result.SerializeToString()))

    # ---- DoAction ----

    def list_actions(self, context):
        return [
            ("CreatePreparedStatement", "Prepare a read statement; returns its handle and schemas"),
            ("ClosePreparedStatement", "Release a prepared statement"),
            ("CancelFlightInfo", "Cancel the query behind a FlightInfo"),
            ("CancelQuery", "Cancel the query behind a FlightInfo (deprecated form)"),
            ("CloseSession", "End the client's session"),
            ("Refresh", 'flightdeck: refresh an accelerated dataset now; body JSON '
                        '{"dataset": NAME, "refresh_sql": optional one-off working set}; returns its status'),
        ]

    @clean_errors
    def do_action(self, context, action: flight.Action):
        handlers = {
            "CreatePreparedStatement": self._create_prepared_statement,
            "ClosePreparedStatement": self._close_prepared_statement,
            "CancelFlightInfo": self._cancel_flight_info,
            "CancelQuery": self._cancel_query,
            "CloseSession": self._close_session,
            "Refresh": self._refresh,
        }
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        if kind in handlers:
            return handlers[kind](body)
        if kind in ("BeginTransaction", "EndTransaction", "BeginSavepoint", "EndSavepoint"):
            raise flight.FlightUnauthorizedError(READ_ONLY_MESSAGE.format(what="a transaction"))
        if kind == "CreatePreparedSubstraitPlan":
            raise flight.FlightServerError("Substrait plans are not supported: send SQL")
        raise flight.FlightServerError(f"unsupported action {kind!r}")

    def _create_prepared_statement(self, body: bytes) -> list[flight.Result]:
        name, value = unpack(body)
        if name != "ActionCreatePreparedStatementRequest":
            raise flight.FlightServerError(f"CreatePreparedStatement expects its request, got {name}")
        request = parse(sql_pb.ActionCreatePreparedStatementRequest, value)
        self._refuse_transaction(request)
        planned = self.engine.plan(request.query)
        statement = PreparedStatement(request.query, planned, self.engine.parameter_schema(request.query))
        handle = self.prepared.add(statement)
        result = sql_pb.ActionCreatePreparedStatementResult(
            prepared_statement_handle=handle,
            dataset_schema=statement.dataset_schema.serialize().to_pybytes(),
            parameter_schema=statement.parameter_schema.serialize().to_pybytes())
        return [flight.Result(pa.py_buffer(pack(result)))]

    def _refresh(self, body: bytes) -> list[flight.Result]:
        try:
            request = json.loads(body or b"{}")
            dataset, refresh_sql = request["dataset"], request.get("refresh_sql")
        except (ValueError, KeyError, TypeError):
            raise flight.FlightServerError(
                'Refresh expects a JSON body {"dataset": NAME, "refresh_sql": optional SQL}') from None
        if self.refresh is None:
            raise flight.FlightServerError("no dataset is accelerated on this server")
        try:
            status = self.refresh(str(dataset), refresh_sql)
        except ValueError as error:  # not accelerated, or a refresh_sql that cannot be used
            raise flight.FlightServerError(str(error)) from None
        return [flight.Result(pa.py_buffer(json.dumps(status, default=str).encode()))]

    def _close_prepared_statement(self, body: bytes) -> list:
        _, value = unpack(body)
        handle = parse(sql_pb.ActionClosePreparedStatementRequest, value).prepared_statement_handle
        self.prepared.remove(handle)
        return []

    def _cancel_flight_info(self, body: bytes) -> list[flight.Result]:
        info_bytes = parse(sql_pb.CancelFlightInfoRequest, body).info
        status = self._cancel(info_bytes)
        return [flight.Result(pa.py_buffer(sql_pb.CancelFlightInfoResult(status=status).SerializeToString()))]

    def _cancel_query(self, body: bytes) -> list[flight.Result]:
        _, value = unpack(body)
        status = self._cancel(parse(sql_pb.ActionCancelQueryRequest, value).info)
        return [flight.Result(pa.py_buffer(pack(sql_pb.ActionCancelQueryResult(result=status))))]

    def _cancel(self, info_bytes: bytes) -> int:
        try:
            info = flight.FlightInfo.deserialize(info_bytes)
        except Exception:
            raise flight.FlightServerError("malformed FlightInfo in cancel request") from None
        cancelled = False
        for endpoint in info.endpoints:
            name, body = unpack(endpoint.ticket.ticket)
            if name != "TicketStatementQuery":
                continue
            handle = parse(sql_pb.TicketStatementQuery, body).statement_handle
            query = self.queries.find(handle)
            if query is not None:
                query.cancelled.set()
                cancelled = True
        return CANCEL_STATUS_CANCELLED if cancelled else CANCEL_STATUS_NOT_CANCELLABLE

    def _close_session(self, body: bytes) -> list[flight.Result]:
        result = sql_pb.CloseSessionResult(status=CLOSE_SESSION_CLOSED)
        return [flight.Result(pa.py_buffer(result.SerializeToString()))]


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


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


def _unwrap_stream_error(error: Exception) -> Exception:
    """Errors raised inside the engine's stream come back as bare Exceptions or ArrowErrors."""
    if isinstance(error, (QueryError, ConnectorError, flight.FlightError)):
        return error
    text = str(error)
    return QueryError(clean_engine_message(text), kind=error_kind(text))
