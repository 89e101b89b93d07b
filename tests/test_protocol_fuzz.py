"""Malformed requests through every door of a running server, by the ten thousand.

A seeded generator sends Flight SQL commands (Any-wrapped protobufs, random or mutated, wrong
type URLs, truncated), tickets, actions, DoPut streams (bad descriptors, wrong schemas, and
garbage FlightData sent over raw gRPC), HTTP requests (bad JSON, wrong types, huge and
negative numbers, wrong content types, paths, methods and headers) and MCP JSON-RPC messages.
After every batch the server must still answer a query and /health. No answer may hold a
traceback, a Python file path or a secret, and each failure has its expected class: Flight
errors are never INTERNAL, HTTP answers are never 5xx.

Volume: FD_FUZZ_REQUESTS (10,000 by default), split over the doors; seed FD_FUZZ_SEED.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import urllib.parse
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from google.protobuf import any_pb2

from conftest import ServerProcess, write_config
from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flight.flightsql.server import pack

from test_flight_protocol import action, descriptor, fetch

REQUESTS = int(os.environ.get("FD_FUZZ_REQUESTS") or 10_000)
SEED = int(os.environ.get("FD_FUZZ_SEED") or 20261129)
BATCH = 250
API_KEY = "fd-fuzz-key-5f0c2e9a7d1b"
PG_PASSWORD = "fd-fuzz-pg-password-81d3"  # a backend secret in the configuration
SECRETS = (API_KEY, PG_PASSWORD)
LEAKS = re.compile(r"Traceback|File \"|/[\w./-]+\.py\b|\.py\", line")
SHARES = {"flight": 0.55, "grpc": 0.05, "http": 0.25, "mcp": 0.15}


# ---- the server -------------------------------------------------------------------------

class FuzzedServer:
    """``flightdeck run`` in its own process, its log drained (a full pipe would stall it)."""

    def __init__(self, config: Path):
        self.process = ServerProcess(["--log-level", "warning", "run", "-c", str(config), "--flight-port", "0",
                                      "--http-port", "0"])
        self.log: list[str] = []
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()
        self.options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {API_KEY}".encode())],
                                                timeout=30)

    def _read_log(self) -> None:
        for line in self.process.process.stderr:
            self.log.append(line)

    def alive(self) -> bool:
        return self.process.process.poll() is None

    def stop(self) -> int:
        self.process.process.send_signal(signal.SIGINT)
        try:
            code = self.process.process.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.process.process.kill()
            code = self.process.process.wait()
        self._drain.join(timeout=10)
        return code


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    pq.write_table(pa.table({"id": [1, 2, 3], "name": ["a", "b", "c"]}), folder / "t.parquet")
    (folder / "c.csv").write_text("k,v\n1,x\n2,y\n")
    config = write_config(folder / "fuzz.yaml", {
        "datasets": [{"from": "file:t.parquet", "name": "t"}, {"from": "file:c.csv", "name": "c"},
                     # unreachable: its errors must not show the password
                     {"from": "postgres:public.x", "name": "gone",
                      "params": {"pg_host": "127.0.0.1", "pg_port": 1, "pg_pass": PG_PASSWORD,
                                 "connect_timeout": 1}}],
        "runtime": {"auth": {"api_keys": [API_KEY]}}})
    server = FuzzedServer(config)
    client = flight.FlightClient(server.process.url)
    yield server, client
    client.close()
    assert server.stop() == 0, "".join(server.log[-20:])
    internal = [line for line in server.log if "Traceback" in line or "internal error" in line]
    assert not internal, "".join(server.log[-40:])


def _healthy(server: FuzzedServer, client: flight.FlightClient, http: httpx.Client) -> None:
    assert server.alive(), "".join(server.log[-20:])
    info = client.get_flight_info(descriptor(sql_pb.CommandStatementQuery(query="SELECT count(*) AS n FROM t")),
                                  server.options)
    assert client.do_get(info.endpoints[0].ticket, server.options).read_all().to_pylist() == [{"n": 3}]
    assert http.get("/health").status_code == 200


# pyarrow 26 attaches a traceback to every GetSchema failure (flight/flightsql/server.py keeps
# it to these frames); any other frame would be a leak.
_GET_SCHEMA_TRACEBACK = re.compile(r'Traceback \(most recent call last\):|\s*File "pyarrow/_flight\.pyx", line \d+, '
                                   r'in pyarrow\._flight\._get_schema|\s*File "flightdeck", line \d+, in get_schema')


def _clean(text: str, get_schema: bool = False) -> None:
    if get_schema:
        text = _GET_SCHEMA_TRACEBACK.sub("", text)
    assert not LEAKS.search(text), text[:500]
    assert not any(secret in text for secret in SECRETS), text[:500]


# ---- generators -------------------------------------------------------------------------

SQL_TOKENS = ["SELECT", "FROM", "t", "c", "gone", "id", "name", "*", ",", "(", ")", "'", "''", "\\", ";", "--",
              "/*", "*/", "1", "-1", "9223372036854775808", "1e309", "NULL", "WHERE", "=", "?", "$1", "JOIN",
              "ON", "UNION", "DROP", "TABLE", "read_csv('/etc/passwd')", "\x00", "é", "\u202e", "LIMIT",
              "ORDER BY", "GROUP BY", "COUNT(*)", "CAST(", "AS", "INT", "x" * 50]


def _sql(rng: random.Random) -> str:
    return " ".join(rng.choice(SQL_TOKENS) for _ in range(rng.randint(0, 10)))


def _text(rng: random.Random, limit: int = 24) -> str:
    alphabet = "abcXYZ019 _-./%'\"\\;:$@#*?\x00\n\té中😀\u202e"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, limit)))


def _printable(rng: random.Random) -> bytes:
    """Header values gRPC lets through (it refuses others itself, before they are sent)."""
    return bytes(rng.randrange(0x20, 0x7F) for _ in range(rng.randint(0, 40)))


def _bytes(rng: random.Random, limit: int = 48) -> bytes:
    return rng.randbytes(rng.randint(0, limit))


def _commands(rng: random.Random) -> list:
    handle = rng.choice([b"", rng.randbytes(8), b"\x00" * 16, b"x" * 40])
    return [
        sql_pb.CommandStatementQuery(query=_sql(rng)),
        sql_pb.CommandStatementQuery(query=_sql(rng), transaction_id=_bytes(rng, 8)),
        sql_pb.CommandGetTables(catalog=_text(rng), db_schema_filter_pattern=_text(rng),
                                table_name_filter_pattern=_text(rng), include_schema=rng.random() < 0.5,
                                table_types=[_text(rng, 8)]),
        sql_pb.CommandGetDbSchemas(catalog=_text(rng), db_schema_filter_pattern=_text(rng)),
        sql_pb.CommandGetCatalogs(),
        sql_pb.CommandGetTableTypes(),
        sql_pb.CommandGetSqlInfo(info=[rng.randint(0, 2**32 - 1) for _ in range(rng.randint(0, 4))]),
        sql_pb.CommandGetXdbcTypeInfo(data_type=rng.randint(-2**31, 2**31 - 1)),
        sql_pb.CommandGetPrimaryKeys(catalog=_text(rng), db_schema=_text(rng), table=_text(rng)),
        sql_pb.CommandGetExportedKeys(table=_text(rng)),
        sql_pb.CommandGetImportedKeys(table=_text(rng)),
        sql_pb.CommandGetCrossReference(pk_table=_text(rng), fk_table=_text(rng)),
        sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=handle),
        sql_pb.CommandStatementUpdate(query=_sql(rng)),
        sql_pb.CommandStatementIngest(table=_text(rng)),
        sql_pb.CommandStatementSubstraitPlan(),
        sql_pb.TicketStatementQuery(statement_handle=handle),
    ]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and data:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del data[rng.randint(0, len(data)):]
    elif kind == 2:  # insert bytes
        position = rng.randint(0, len(data))
        data[position:position] = rng.randbytes(rng.randint(1, 8))
    elif kind == 3:  # a wrong or look-alike type URL
        wrapper = any_pb2.Any()
        wrapper.type_url = rng.choice([
            "", "type.googleapis.com/", "type.googleapis.com/arrow.flight.protocol.sql.CommandNope",
            "type.googleapis.com/arrow.flight.protocol.sql.commandstatementquery",
            "evil.example/arrow.flight.protocol.sql.CommandStatementQuery", _text(rng, 60),
            "type.googleapis.com/arrow.flight.protocol.sql.ActionCreatePreparedStatementRequest",
            "type.googleapis.com/google.protobuf.Any"])
        wrapper.value = bytes(data)
        return wrapper.SerializeToString()
    elif kind == 4:  # Any inside Any
        outer = any_pb2.Any()
        outer.type_url = "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery"
        outer.value = bytes(data)
        return outer.SerializeToString()
    else:  # noise
        return _bytes(rng)
    return bytes(data)


def _command_bytes(rng: random.Random) -> bytes:
    packed = pack(rng.choice(_commands(rng)))
    return packed if rng.random() < 0.15 else _mutate(rng, packed)


ACTIONS = ["CreatePreparedStatement", "ClosePreparedStatement", "CancelFlightInfo", "CancelQuery", "CloseSession",
           "Refresh", "BeginTransaction", "EndTransaction", "BeginSavepoint", "EndSavepoint", "SetSessionOptions",
           "GetSessionOptions", "CreatePreparedSubstraitPlan", "RenewFlightEndpoint", "DropEverything", "",
           "refresh", "CreatePreparedStatement\x00", "Créer"]


def _action_body(rng: random.Random, kind: str) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        return _bytes(rng)
    if choice == 1 and kind == "Refresh":
        value = rng.choice([{"dataset": _text(rng)}, {"dataset": "t", "refresh_sql": _sql(rng)}, [], "x", 1,
                            {"dataset": rng.randint(-10**20, 10**20)}, None])
        return json.dumps(value).encode()
    requests = [sql_pb.ActionCreatePreparedStatementRequest(query=_sql(rng)),
                sql_pb.ActionClosePreparedStatementRequest(prepared_statement_handle=_bytes(rng, 16)),
                sql_pb.CancelFlightInfoRequest(info=_bytes(rng)), sql_pb.CloseSessionRequest(),
                sql_pb.ActionBeginTransactionRequest()]
    message = rng.choice(requests)
    data = message.SerializeToString() if kind.startswith(("Cancel", "Close")) else pack(message)
    return data if choice == 2 else _mutate(rng, data)


SCHEMAS = [pa.schema([("a", pa.int64())]), pa.schema([("customer_id", pa.string()), ("x", pa.float64())]),
           pa.schema([]), pa.schema([("p", pa.list_(pa.int8()))]), pa.schema([("n", pa.null())])]


# ---- the doors --------------------------------------------------------------------------

FLIGHT_EXPECTED = (pa.ArrowException,  # GetSchema's failures come as UNKNOWN (see above)
                   flight.FlightServerError, flight.FlightUnauthorizedError, flight.FlightUnauthenticatedError,
                   flight.FlightCancelledError, flight.FlightUnavailableError, pa.ArrowInvalid,
                   pa.ArrowNotImplementedError)


def _flight_request(rng: random.Random, server: FuzzedServer, client: flight.FlightClient, seen: Counter,
                    prepared: bytes) -> None:
    options = server.options
    if rng.random() < 0.05:  # no key or a wrong one
        options = flight.FlightCallOptions(headers=rng.choice(
            [[], [(b"authorization", b"Bearer wrong")], [(b"authorization", _printable(rng))]]), timeout=30)
    kind = rng.choice(["info", "info", "schema", "ticket", "action", "action", "put", "path"])
    try:
        if kind == "info":
            info = client.get_flight_info(flight.FlightDescriptor.for_command(_command_bytes(rng)), options)
            if info.endpoints and rng.random() < 0.5:
                client.do_get(info.endpoints[0].ticket, options).read_all()
        elif kind == "path":
            client.get_flight_info(flight.FlightDescriptor.for_path(*[_text(rng) for _ in range(3)]), options)
        elif kind == "schema":
            client.get_schema(flight.FlightDescriptor.for_command(_command_bytes(rng)), options)
        elif kind == "ticket":
            ticket = rng.choice([_bytes(rng), _command_bytes(rng),
                                 pack(sql_pb.TicketStatementQuery(statement_handle=_bytes(rng, 20)))])
            client.do_get(flight.Ticket(ticket), options).read_all()
        elif kind == "action":
            name = rng.choice(ACTIONS + [_text(rng, 12)])
            list(client.do_action(flight.Action(name, _action_body(rng, name)), options))
        else:
            command = rng.choice([_command_bytes(rng),
                                  pack(sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=prepared))])
            schema = rng.choice(SCHEMAS)
            writer, reader = client.do_put(flight.FlightDescriptor.for_command(command), schema, options)
            try:
                if len(schema):
                    writer.write_table(pa.table({f.name: pa.nulls(rng.randint(0, 3), f.type) for f in schema},
                                                schema=schema))
                writer.done_writing()
                reader.read()
            finally:
                writer.close()
        seen[f"flight {kind}: answered"] += 1
    except flight.FlightInternalError as error:
        pytest.fail(f"INTERNAL for a malformed {kind} request: {error}")
    except FLIGHT_EXPECTED as error:
        _clean(str(error), get_schema=kind == "schema")
        seen[f"flight {kind}: {type(error).__name__}"] += 1
    except OSError as error:  # how pyarrow reports an unauthenticated GetSchema
        assert "Unauthenticated" in str(error), error
        _clean(str(error))
        seen[f"flight {kind}: unauthenticated"] += 1


def _field(number: int, data: bytes) -> bytes:
    """One length-delimited protobuf field (FlightData is built by hand: garbage included)."""
    key, length, out = (number << 3) | 2, len(data), bytearray()
    for value in (key, length):
        while value > 0x7F:
            out.append((value & 0x7F) | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + data


def _grpc_request(rng: random.Random, channel: grpc.Channel, seen: Counter) -> None:
    """Bytes no Flight client would send: garbage FlightData into DoPut, garbage messages into
    GetFlightInfo, DoGet and DoAction."""
    metadata = [("authorization", f"Bearer {API_KEY}")]
    method = rng.choice(["DoPut", "DoPut", "GetFlightInfo", "DoGet", "DoAction", "GetSchema"])
    path = f"/arrow.flight.protocol.FlightService/{method}"
    try:
        if method == "DoPut":
            descriptor_bytes = _field(2, _command_bytes(rng))
            first = _field(1, descriptor_bytes) + _field(2, _bytes(rng, 64)) + _field(1000, _bytes(rng, 64))
            rest = [rng.choice([_bytes(rng, 64), _field(2, _bytes(rng, 64)) + _field(1000, _bytes(rng))])
                    for _ in range(rng.randint(0, 3))]
            call = channel.stream_stream(path)
            list(call(iter([first, *rest]), metadata=metadata, timeout=30))
        elif method in ("DoGet", "DoAction"):
            list(channel.unary_stream(path)(_bytes(rng, 64), metadata=metadata, timeout=30))
        else:
            channel.unary_unary(path)(_bytes(rng, 64), metadata=metadata, timeout=30)
        seen[f"grpc {method}: answered"] += 1
    except grpc.RpcError as error:
        code = error.code()
        # bytes that are not a protobuf message stop in gRPC's own decoding: INTERNAL, no text
        assert code != grpc.StatusCode.INTERNAL or not error.details(), error.details()
        assert code not in (grpc.StatusCode.UNAVAILABLE,), error.details()  # the server went away
        _clean(error.details() or "", get_schema=method == "GetSchema")
        seen[f"grpc {method}: {code.name}"] += 1


def _json_value(rng: random.Random, depth: int = 0):
    choice = rng.randrange(9 if depth < 2 else 6)
    if choice == 6:
        return [_json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if choice == 7:
        return {_text(rng, 6): _json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    if choice == 8:
        return {"sql": _json_value(rng, depth + 1), "parameters": _json_value(rng, depth + 1)}
    return [None, rng.random() < 0.5, rng.choice([0, -1, 2**63, -2**63, 10**30, 1e308, -0.5]), _text(rng),
            _sql(rng), rng.randint(-5, 5)][choice]


HTTP_PATHS = ["/v1/sql", "/v1/search", "/v1/embeddings", "/v1/models", "/v1/models/nope", "/v1/datasets",
              "/v1/datasets/t", "/v1/datasets/gone", "/v1/datasets/../../etc/passwd", "/v1/datasets/t/acceleration/refresh",
              "/health", "/v1/ready", "/v1/status", "/metrics", "/", "/v1", "/v1/sql/", "/v2/sql", "/v1/%00",
              "/v1/datasets/%2e%2e%2f", "/" + "a" * 300]
HTTP_FIELDS = {"/v1/sql": ["sql", "parameters"], "/v1/search": ["text", "datasets", "limit", "where",
                                                                 "additional_columns", "mode"],
               "/v1/embeddings": ["input", "model", "encoding_format", "dimensions"],
               "/v1/datasets/t/acceleration/refresh": ["refresh_sql"]}
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 "application/json; charset=latin-1", "application/vnd.apache.arrow.stream", "", "x/\x7f"]
ACCEPTS = ["*/*", "application/json", "text/csv", "application/vnd.apache.arrow.stream", "image/png", "",
           "application/x-ndjson", "text/event-stream;q=0"]


def _http_request(rng: random.Random, http: httpx.Client, seen: Counter) -> None:
    path = rng.choice(HTTP_PATHS + [f"/v1/{urllib.parse.quote(_text(rng, 10))}"])
    method = rng.choice(["POST", "POST", "GET", "GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": rng.choice(CONTENT_TYPES),
               "Accept": rng.choice(ACCEPTS)}
    if rng.random() < 0.1:
        headers["Authorization"] = rng.choice(["", "Bearer", "Basic Zm9vOmJhcg==", "Bearer wrong", _text(rng)])
    if rng.random() < 0.1:
        headers["Accept-Encoding"] = rng.choice(["zstd", "gzip", "br", "identity;q=0", _text(rng, 8)])
    if rng.random() < 0.05:
        headers["X-API-Key"] = rng.choice([API_KEY, "wrong"])
    fields = HTTP_FIELDS.get(path, ["sql", "text", "limit"])
    shape = rng.randrange(5)
    if shape == 0:
        content = _bytes(rng, 64)
    elif shape == 1:
        content = _sql(rng).encode()
    elif shape == 2:
        content = json.dumps(_json_value(rng)).encode()
    else:
        body = {name: _json_value(rng) for name in rng.sample(fields, rng.randint(0, len(fields)))}
        content = json.dumps(body).encode()
        if shape == 4:
            content = content[:rng.randint(0, len(content))]  # cut short
    headers = {name: value.encode("utf-8") for name, value in headers.items()}  # raw bytes, any of them
    try:
        response = http.request(method, path, content=content, headers=headers)
    except httpx.LocalProtocolError:
        seen["http: refused by the client library"] += 1
        return
    # 503 is the answer for the unreachable dataset (and /v1/ready while it is down), nothing else
    unavailable = "unavailable" in response.text or path in ("/v1/datasets/gone", "/v1/ready")
    assert response.status_code < 500 or (response.status_code == 503 and unavailable), \
        (method, path, response.status_code, response.text[:300])
    _clean(response.text)
    seen[f"http: {response.status_code}"] += 1


MCP_TOOLS = ["list_datasets", "table_schema", "sql", "explain", "search", "random_sample", "top_n_sample",
             "sample_distinct_columns", "refresh_dataset", "nope", ""]
MCP_METHODS = ["tools/call", "tools/call", "tools/call", "tools/list", "resources/list", "resources/read",
               "prompts/list", "prompts/get", "completion/complete", "logging/setLevel", "ping", "initialize",
               "nope/nope", "", "notifications/cancelled"]


def _mcp_session(http: httpx.Client) -> dict:
    headers = {"Authorization": f"Bearer {API_KEY}", "Accept": "application/json, text/event-stream"}
    hello = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "fuzz", "version": "1"}}}
    response = http.post("/v1/mcp", json=hello, headers=headers)
    assert response.status_code == 200, response.text
    headers["mcp-session-id"] = response.headers["mcp-session-id"]
    headers["mcp-protocol-version"] = "2025-06-18"
    http.post("/v1/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    return headers


def _mcp_request(rng: random.Random, http: httpx.Client, session: dict, seen: Counter, number: int) -> None:
    headers = dict(session)
    if rng.random() < 0.05:
        headers.pop(rng.choice(["Authorization", "mcp-session-id", "Accept"]))
    method = rng.choice(MCP_METHODS + [_text(rng, 10)])
    if method == "tools/call":
        params = {"name": rng.choice(MCP_TOOLS),
                  "arguments": rng.choice([{}, _json_value(rng), {"query": _sql(rng)},
                                           {"dataset": rng.choice(["t", "gone", "c", _text(rng)]),
                                            "limit": _json_value(rng)},
                                           {"text": _json_value(rng), "datasets": _json_value(rng)}])}
    else:
        params = rng.choice([{}, _json_value(rng), {"uri": rng.choice(["flightdeck://datasets/t/schema",
                                                                         _text(rng)])}])
    message = {"jsonrpc": rng.choice(["2.0", "2.0", "2.0", "1.0", None]),
               "id": rng.choice([number, number, str(number), None, [1], {"a": 1}, 2**70]),
               "method": method, "params": params}
    shape = rng.randrange(6)
    if shape == 0:
        content = _bytes(rng, 64)
    elif shape == 1:
        content = json.dumps([message, message]).encode()  # a batch
    elif shape == 2:
        content = json.dumps(message).encode()[:rng.randint(0, 40)]
    else:
        content = json.dumps(message).encode()
    headers["Content-Type"] = rng.choice(["application/json", "application/json", "text/plain", ""])
    response = http.post("/v1/mcp", content=content, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    _clean(response.text)
    seen[f"mcp: {response.status_code}"] += 1


# ---- the test ---------------------------------------------------------------------------

def test_ten_thousand_malformed_requests_never_break_the_server(fuzzed):
    server, client = fuzzed
    rng = random.Random(SEED)
    seen: Counter = Counter()
    channel = grpc.insecure_channel(server.process.url.split("://", 1)[1])
    http = httpx.Client(base_url=server.process.http_url, timeout=30)
    try:
        prepared = _prepared_handle(server, client)
        session = _mcp_session(http)
        doors = list(SHARES)
        weights = [SHARES[d] for d in doors]
        for number in range(REQUESTS):
            door = rng.choices(doors, weights)[0]
            if door == "flight":
                _flight_request(rng, server, client, seen, prepared)
            elif door == "grpc":
                _grpc_request(rng, channel, seen)
            elif door == "http":
                _http_request(rng, http, seen)
            else:
                _mcp_request(rng, http, session, seen, number)
            if number % BATCH == BATCH - 1:
                _healthy(server, client, http)
        _healthy(server, client, http)
    finally:
        channel.close()
        http.close()
    print(f"\n{sum(seen.values())} malformed requests (seed {SEED}):")
    for outcome, count in sorted(seen.items()):
        print(f"  {outcome:<48}{count:>7}")
    assert sum(seen.values()) == REQUESTS
    # every door was reached, and refused most of what it got
    assert {key.split(":")[0].split()[0] for key in seen} == {"flight", "grpc", "http", "mcp"}


def _prepared_handle(server: FuzzedServer, client: flight.FlightClient) -> bytes:
    [result] = list(client.do_action(flight.Action("CreatePreparedStatement", pack(
        sql_pb.ActionCreatePreparedStatementRequest(query="SELECT id FROM t WHERE id = ?"))), server.options))
    wrapper = any_pb2.Any.FromString(result.body.to_pybytes())
    return sql_pb.ActionCreatePreparedStatementResult.FromString(wrapper.value).prepared_statement_handle


# ---- the hand-written malformed requests (moved from test_flight_protocol.py) -------------

def test_malformed_requests_get_clean_errors(flight_client):
    with pytest.raises(flight.FlightServerError) as raised:
        flight_client.get_flight_info(flight.FlightDescriptor.for_command(b"\xff\x00not protobuf"))
    assert "Traceback" not in str(raised.value)
    with pytest.raises(flight.FlightServerError, match="unknown or expired ticket"):
        flight_client.do_get(flight.Ticket(pack(sql_pb.TicketStatementQuery(statement_handle=b"x")))).read_all()
    with pytest.raises(flight.FlightServerError, match="unsupported action"):
        action(flight_client, "DropEverything", b"")
    with pytest.raises(flight.FlightServerError) as raised:
        list(flight_client.list_flights())
    assert "not supported" in str(raised.value) and "Traceback" not in str(raised.value)
    with pytest.raises(flight.FlightServerError) as raised:
        writer, _ = flight_client.do_exchange(flight.FlightDescriptor.for_command(b"x"))
        writer.begin(pa.schema([("a", pa.int64())]))
        writer.close()
    assert "Traceback" not in str(raised.value)
    _, table = fetch(flight_client, sql_pb.CommandStatementQuery(query="SELECT 1 AS still_serving"))
    assert table.to_pylist() == [{"still_serving": 1}]
