"""The baselines: a bare pyarrow.flight server with none of flightdeck's layers.

Ticket ``parquet`` streams the Parquet file with ``pyarrow.dataset`` on each request
(the same data work flightdeck does); ticket ``memory`` streams the table from memory
(the transport's ceiling). Run as a separate process, like flightdeck.

It also answers the Flight SQL call sequence the ADBC driver sends for a query
(CreatePreparedStatement, DoPut of the parameters, GetFlightInfo, DoGet, ClosePreparedStatement,
CloseSession, GetSqlInfo at connect) with a constant one-row batch whatever the statement:
the floor an agent's small query cannot go under through this transport.

    python -m bench.bare_flight_server [PARQUET]
"""
from __future__ import annotations

import sys
import uuid

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq

from flight.flightsql import metadata
from flight.flightsql.proto import flight_sql_pb2 as sql_pb
from flight.flightsql.server import pack, unpack

BATCH_ROWS = 65_536
ONE_ROW = pa.table({"id": pa.array([1], pa.int64()), "name": pa.array(["one"]), "value": pa.array([1.0])})
FLOOR_TICKET = b"floor"


class BareServer(flight.FlightServerBase):
    def __init__(self, parquet_path: str | None = None):
        super().__init__("grpc://127.0.0.1:0")
        self.parquet_path = parquet_path
        self.in_memory = None
        if parquet_path is not None:
            table = pq.read_table(parquet_path)
            self.in_memory = pa.Table.from_batches(table.to_batches(max_chunksize=BATCH_ROWS))

    def do_get(self, context, ticket):
        if ticket.ticket == FLOOR_TICKET:
            return flight.RecordBatchStream(ONE_ROW)
        if ticket.ticket == b"parquet" and self.parquet_path is not None:
            return flight.RecordBatchStream(ds.dataset(self.parquet_path).scanner().to_reader())
        if ticket.ticket == b"memory" and self.in_memory is not None:
            return flight.RecordBatchStream(self.in_memory)
        name, _ = unpack(ticket.ticket)
        if name == "CommandGetSqlInfo":
            return flight.RecordBatchStream(metadata.sql_info_table([], "floor"))
        raise flight.FlightServerError("unknown ticket")

    # ---- the Flight SQL floor: constant answers, no state ----

    def get_flight_info(self, context, descriptor):
        name, _ = unpack(descriptor.command)
        if name == "CommandGetSqlInfo":
            return flight.FlightInfo(metadata.SQL_INFO_SCHEMA, descriptor,
                                     [flight.FlightEndpoint(descriptor.command, [])], -1, -1)
        return flight.FlightInfo(ONE_ROW.schema, descriptor, [flight.FlightEndpoint(FLOOR_TICKET, [])], 1, -1)

    def do_put(self, context, descriptor, reader, writer):
        reader.read_all()
        _, body = unpack(descriptor.command)
        handle = sql_pb.CommandPreparedStatementQuery.FromString(body).prepared_statement_handle
        result = sql_pb.DoPutPreparedStatementResult(prepared_statement_handle=handle)
        writer.write(pa.py_buffer(result.SerializeToString()))

    def do_action(self, context, action):
        if action.type == "CreatePreparedStatement":
            result = sql_pb.ActionCreatePreparedStatementResult(
                prepared_statement_handle=uuid.uuid4().bytes,
                dataset_schema=ONE_ROW.schema.serialize().to_pybytes())
            return [flight.Result(pa.py_buffer(pack(result)))]
        if action.type == "CloseSession":
            result = sql_pb.CloseSessionResult(status=1)
            return [flight.Result(pa.py_buffer(result.SerializeToString()))]
        return []


if __name__ == "__main__":
    server = BareServer(sys.argv[1] if len(sys.argv) > 1 else None)
    print(f"READY grpc://127.0.0.1:{server.port}", flush=True)
    server.serve()
