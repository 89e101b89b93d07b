"""The baselines: a bare pyarrow.flight server with none of flightdeck's layers.

Ticket ``parquet`` streams the Parquet file with ``pyarrow.dataset`` on each request
(the same data work flightdeck does); ticket ``memory`` streams the table from memory
(the transport's ceiling). Run as a separate process, like flightdeck.
"""
from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.parquet as pq

BATCH_ROWS = 65_536


class BareServer(flight.FlightServerBase):
    def __init__(self, parquet_path: str):
        super().__init__("grpc://127.0.0.1:0")
        self.parquet_path = parquet_path
        table = pq.read_table(parquet_path)
        self.in_memory = pa.Table.from_batches(table.to_batches(max_chunksize=BATCH_ROWS))

    def do_get(self, context, ticket):
        if ticket.ticket == b"parquet":
            return flight.RecordBatchStream(ds.dataset(self.parquet_path).scanner().to_reader())
        if ticket.ticket == b"memory":
            return flight.RecordBatchStream(self.in_memory)
        raise flight.FlightServerError("unknown ticket")


if __name__ == "__main__":
    server = BareServer(sys.argv[1])
    print(f"READY grpc://127.0.0.1:{server.port}", flush=True)
    server.serve()
