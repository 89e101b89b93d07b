"""The Flight SQL protocol spoken with a raw pyarrow.flight client."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight.flightsql import metadata
from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flight.flightsql.server import HANDLE_BYTES_PER_PRINCIPAL, HANDLES_PER_PRINCIPAL, HandleRegistry, pack
from flightdeck.auth import Principal


def descriptor(message) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(pack(message))


def fetch(client: flight.FlightClient, message) -> tuple[flight.FlightInfo, pa.Table]:
    info = client.get_flight_info(descriptor(message))
    table = client.do_get(info.endpoints[0].ticket).read_all()
    return info, table


def action(client: flight.FlightClient, kind: str, body: bytes) -> list[bytes]:
    return [r.body.to_pybytes() for r in client.do_action(flight.Action(kind, body))]


def unpack_any(data: bytes, message_class):
    from google.protobuf import any_pb2
    wrapper = any_pb2.Any.FromString(data)
    assert wrapper.type_url == f"type.googleapis.com/arrow.flight.protocol.sql.{message_class.__name__}"
    return message_class.FromString(wrapper.value)


METADATA_COMMANDS = [
    (sql_pb.CommandGetSqlInfo(), metadata.SQL_INFO_SCHEMA),
    (sql_pb.CommandGetCatalogs(), metadata.CATALOGS_SCHEMA),
    (sql_pb.CommandGetDbSchemas(), metadata.DB_SCHEMAS_SCHEMA),
    (sql_pb.CommandGetTables(), metadata.TABLES_SCHEMA),
    (sql_pb.CommandGetTables(include_schema=True), metadata.TABLES_WITH_SCHEMA_SCHEMA),
    (sql_pb.CommandGetTableTypes(), metadata.TABLE_TYPES_SCHEMA),
    (sql_pb.CommandGetPrimaryKeys(table="orders"), metadata.PRIMARY_KEYS_SCHEMA),
    (sql_pb.CommandGetExportedKeys(table="orders"), metadata.FOREIGN_KEYS_SCHEMA),
    (sql_pb.CommandGetImportedKeys(table="orders"), metadata.FOREIGN_KEYS_SCHEMA),
    (sql_pb.CommandGetXdbcTypeInfo(), metadata.XDBC_TYPE_INFO_SCHEMA),
]


@pytest.mark.parametrize("command,schema", METADATA_COMMANDS, ids=lambda v: type(v).__name__)
def test_metadata_result_schema(flight_client, command, schema):
    info, table = fetch(flight_client, command)
    assert info.schema.equals(schema)
    assert table.schema.equals(schema)
    assert flight_client.get_schema(descriptor(command)).schema.equals(schema)


def test_protocol_schemas_are_the_published_ones():
    # Spot checks against the protocol text, independent of how metadata.py builds them.
    assert metadata.TABLES_SCHEMA.names == ["catalog_name", "db_schema_name", "table_name", "table_type"]
    assert [f.nullable for f in metadata.TABLES_SCHEMA] == [True, True, False, False]
    assert metadata.PRIMARY_KEYS_SCHEMA.names == [
        "catalog_name", "db_schema_name", "table_name", "column_name", "key_sequence", "key_name"]
    assert metadata.SQL_INFO_SCHEMA.field("info_name").type == pa.uint32()
    union = metadata.SQL_INFO_SCHEMA.field("value").type
    assert [union.field(i).name for i in range(6)] == [
        "string_value", "bool_value", "bigint_value", "int32_bitmask", "string_list",
        "int32_to_int32_list_map"]
    assert len(metadata.XDBC_TYPE_INFO_SCHEMA) == 19


def test_sql_info_values(flight_client):
    _, table = fetch(flight_client, sql_pb.CommandGetSqlInfo(info=[0, 3, 8, 9, 504, 563]))
    values = dict(zip(table.column("info_name").to_pylist(), table.column("value").to_pylist()))
    assert values == {0: "flightdeck", 3: True, 8: 0, 9: True, 504: '"', 563: False}


def test_get_tables_filters_and_schema(flight_client):
    _, table = fetch(flight_client, sql_pb.CommandGetTables(
        db_schema_filter_pattern="cr_", table_name_filter_pattern="%omer%", include_schema=True))
    assert table.column("table_name").to_pylist() == ["customers"]
    schema = pa.ipc.read_schema(pa.py_buffer(table.column("table_schema")[0].as_py()))
    assert schema.names[:2] == ["customer_id", "name"]
    _, views = fetch(flight_client, sql_pb.CommandGetTables(table_types=["VIEW"]))
    assert views.num_rows == 0
    _, system = fetch(flight_client, sql_pb.CommandGetTables(table_types=["SYSTEM TABLE"]))
    assert system.column("table_name").to_pylist() == ["datasets", "queries", "source_stats"]
    _, other_catalog = fetch(flight_client, sql_pb.CommandGetTables(catalog="elsewhere"))
    assert other_catalog.num_rows == 0


def test_get_db_schemas_and_catalogs(flight_client):
    _, schemas = fetch(flight_client, sql_pb.CommandGetDbSchemas(db_schema_filter_pattern="p%"))
    assert schemas.to_pylist() == [{"catalog_name": "flightdeck", "db_schema_name": "public"}]
    _, catalogs = fetch(flight_client, sql_pb.CommandGetCatalogs())
    assert catalogs.column("catalog_name").to_pylist() == ["flightdeck"]


def test_primary_keys_come_from_the_backends(flight_client):
    _, orders = fetch(flight_client, sql_pb.CommandGetPrimaryKeys(table="orders"))
    assert orders.to_pylist() == [{"catalog_name": "flightdeck", "db_schema_name": "public",
                                   "table_name": "orders", "column_name": "order_id",
                                   "key_sequence": 1, "key_name": None}]
    _, customers = fetch(flight_client, sql_pb.CommandGetPrimaryKeys(db_schema="crm", table="customers"))
    assert customers.column("column_name").to_pylist() == ["customer_id"]


def test_xdbc_type_info_filter(flight_client):
    _, everything = fetch(flight_client, sql_pb.CommandGetXdbcTypeInfo())
    assert everything.column("data_type").to_pylist() == sorted(everything.column("data_type").to_pylist())
    _, varchar = fetch(flight_client, sql_pb.CommandGetXdbcTypeInfo(data_type=12))
    assert varchar.column("type_name").to_pylist() == ["VARCHAR"]


def test_statement_query_and_total_records(flight_client):
    info, table = fetch(flight_client, sql_pb.CommandStatementQuery(query="SELECT * FROM logs"))
    assert info.total_records == table.num_rows > 0  # Parquet knows its row count
    info, table = fetch(flight_client, sql_pb.CommandStatementQuery(
        query="SELECT * FROM orders WHERE status = 'failed'"))
    assert info.total_records == -1 and table.num_rows == 576
    assert info.endpoints[0].locations == []


def test_a_client_preparing_statements_in_a_loop_keeps_its_latest_thousand(flight_client):
    handles = []
    for i in range(HANDLES_PER_PRINCIPAL + 5):
        request = sql_pb.ActionCreatePreparedStatementRequest(query=f"SELECT {i} AS n")
        [result] = action(flight_client, "CreatePreparedStatement", pack(request))
        handles.append(unpack_any(result, sql_pb.ActionCreatePreparedStatementResult).prepared_statement_handle)
    for forgotten in handles[:5]:
        with pytest.raises(flight.FlightError, match="unknown or closed prepared statement handle"):
            fetch(flight_client, sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=forgotten))
    _, rows = fetch(flight_client, sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=handles[5]))
    assert rows.column("n").to_pylist() == [5]
    for handle in handles[5:]:
        action(flight_client, "ClosePreparedStatement",
               pack(sql_pb.ActionClosePreparedStatementRequest(prepared_statement_handle=handle)))


def bind(client: flight.FlightClient, handle: bytes, parameters: pa.Table) -> None:
    command = sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=handle)
    writer, metadata_reader = client.do_put(descriptor(command), parameters.schema)
    writer.write_table(parameters)
    writer.done_writing()
    metadata_reader.read()
    writer.close()


def test_prepared_statements_holding_large_values_are_kept_within_a_size(flight_client):
    """Prepared statements were bounded by count alone: a thousand of them each bound 16 MiB
    held 16 GB for one key. Past their bound in bytes, the least recently used are forgotten."""
    value_bytes = 12 * 1024 * 1024
    count = HANDLE_BYTES_PER_PRINCIPAL // value_bytes + 3
    handles = []
    for _ in range(count):
        request = sql_pb.ActionCreatePreparedStatementRequest(query="SELECT count(*) AS n FROM orders WHERE status = ?")
        [result] = action(flight_client, "CreatePreparedStatement", pack(request))
        handles.append(unpack_any(result, sql_pb.ActionCreatePreparedStatementResult).prepared_statement_handle)
        bind(flight_client, handles[-1], pa.table({"status": ["x" * value_bytes]}))
    for forgotten in handles[:3]:
        with pytest.raises(flight.FlightError, match="unknown or closed prepared statement handle"):
            fetch(flight_client, sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=forgotten))
    _, rows = fetch(flight_client, sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=handles[-1]))
    assert rows.column("n").to_pylist() == [0]
    for handle in handles[3:]:
        action(flight_client, "ClosePreparedStatement",
               pack(sql_pb.ActionClosePreparedStatementRequest(prepared_statement_handle=handle)))


class Weighed:
    def __init__(self, name: str, weight: int):
        self.principal, self.weight = Principal(name, None), weight


def test_handles_of_every_principal_together_are_kept_within_a_size():
    """Without authentication each name a client gives is a principal of its own, so bounds per
    principal alone would not bound the memory."""
    registry = HandleRegistry(3600, "missing", per_principal=10, bytes_per_principal=100, total_bytes=250)
    handles = [registry.add(Weighed(f"client-{i}", 60)) for i in range(6)]
    kept = [h for h in handles if registry.find(h, Principal(f"client-{handles.index(h)}", None)) is not None]
    assert kept == handles[2:]  # 4 x 60 <= 250, the oldest forgotten first
    own = [registry.add(Weighed("one", 40)) for _ in range(3)]
    assert [registry.find(h, Principal("one", None)) is not None for h in own] == [False, True, True]


def test_prepared_statement_lifecycle(flight_client):
    request = sql_pb.ActionCreatePreparedStatementRequest(
        query="SELECT order_id, amount FROM orders WHERE customer_id = ? AND amount > ?")
    [result] = action(flight_client, "CreatePreparedStatement", pack(request))
    prepared = unpack_any(result, sql_pb.ActionCreatePreparedStatementResult)
    dataset_schema = pa.ipc.read_schema(pa.py_buffer(prepared.dataset_schema))
    parameter_schema = pa.ipc.read_schema(pa.py_buffer(prepared.parameter_schema))
    assert dataset_schema.names == ["order_id", "amount"]
    assert parameter_schema.types == [pa.int32(), pa.decimal128(10, 2)]

    command = sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=prepared.prepared_statement_handle)
    parameters = pa.table({"customer_id": pa.array([42], pa.int32()), "amount": [10.0]})
    writer, metadata_reader = flight_client.do_put(descriptor(command), parameters.schema)
    writer.write_table(parameters)
    writer.done_writing()
    put_result = metadata_reader.read()
    writer.close()
    assert sql_pb.DoPutPreparedStatementResult.FromString(put_result.to_pybytes()) \
        .prepared_statement_handle == prepared.prepared_statement_handle

    _, rows = fetch(flight_client, command)
    _, expected = fetch(flight_client, sql_pb.CommandStatementQuery(
        query="SELECT order_id, amount FROM orders WHERE customer_id = 42 AND amount > 10.0"))
    assert sorted(rows.column("order_id").to_pylist()) == sorted(expected.column("order_id").to_pylist())

    close = sql_pb.ActionClosePreparedStatementRequest(prepared_statement_handle=prepared.prepared_statement_handle)
    assert action(flight_client, "ClosePreparedStatement", pack(close)) == []
    with pytest.raises(flight.FlightServerError, match="unknown or closed prepared statement"):
        flight_client.get_flight_info(descriptor(command))


@pytest.mark.parametrize("row_bytes, rows_per_batch", [(1_000, 1), (4 * 2**20, 1)])
def test_an_upload_of_parameters_is_refused_as_soon_as_it_is_more_than_one_row(flight_client, row_bytes,
                                                                               rows_per_batch):
    """A DoPut binding parameters was read whole before its rows were counted: 480 MiB sent in
    8 MiB batches were all held. It is refused at its second row, or past 16 MiB in one row, so
    the client cannot send it all (gRPC holds a few MiB in flight)."""
    request = sql_pb.ActionCreatePreparedStatementRequest(query="SELECT order_id FROM orders WHERE status = ?")
    [result] = action(flight_client, "CreatePreparedStatement", pack(request))
    handle = unpack_any(result, sql_pb.ActionCreatePreparedStatementResult).prepared_statement_handle
    command = sql_pb.CommandPreparedStatementQuery(prepared_statement_handle=handle)
    batch = pa.record_batch({"status": pa.array(["x" * row_bytes] * rows_per_batch)})
    writer, metadata_reader = flight_client.do_put(descriptor(command), batch.schema)
    sent = 0
    with pytest.raises(flight.FlightError) as raised:
        for _ in range(128 if row_bytes > 2**20 else 2_000):  # 512 MiB, or two thousand rows
            writer.write_batch(batch)
            sent += 1
        writer.done_writing()
        metadata_reader.read()
    assert sent < (100 if row_bytes > 2**20 else 2_000)
    assert "bind one row" in str(raised.value) or "16,777,216 bytes" in str(raised.value)
    with pytest.raises(flight.FlightError):
        writer.close()


def test_cancel_flight_info_stops_the_query(flight_client):
    info = flight_client.get_flight_info(descriptor(sql_pb.CommandStatementQuery(query="SELECT * FROM logs")))
    [result] = action(flight_client, "CancelFlightInfo",
                      sql_pb.CancelFlightInfoRequest(info=info.serialize()).SerializeToString())
    assert sql_pb.CancelFlightInfoResult.FromString(result).status == 1  # CANCELLED
    with pytest.raises(flight.FlightCancelledError, match="cancelled"):
        flight_client.do_get(info.endpoints[0].ticket).read_all()


def test_close_session(flight_client):
    [result] = action(flight_client, "CloseSession", sql_pb.CloseSessionRequest().SerializeToString())
    assert sql_pb.CloseSessionResult.FromString(result).status == 1  # CLOSED


WRITES = [
    sql_pb.CommandStatementUpdate(query="DELETE FROM orders"),
    sql_pb.CommandStatementIngest(table="orders"),
]


@pytest.mark.parametrize("command", WRITES, ids=lambda c: type(c).__name__)
def test_writes_over_do_put_are_refused(flight_client, command):
    data = pa.table({"order_id": [1]})
    writer, reader = flight_client.do_put(descriptor(command), data.schema)
    with pytest.raises(flight.FlightUnauthorizedError, match="read-only"):
        writer.write_table(data)
        writer.done_writing()
        reader.read()
        writer.close()


def test_prepared_update_is_refused(flight_client):
    request = sql_pb.ActionCreatePreparedStatementRequest(query="UPDATE orders SET status = 'x'")
    with pytest.raises(flight.FlightUnauthorizedError, match="UPDATE statements are not allowed"):
        action(flight_client, "CreatePreparedStatement", pack(request))


def test_transactions_are_refused(flight_client):
    with pytest.raises(flight.FlightUnauthorizedError, match="read-only"):
        action(flight_client, "BeginTransaction", pack(sql_pb.ActionBeginTransactionRequest()))
