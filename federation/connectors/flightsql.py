"""`flightsql:[schema.]table` — a table of another Arrow Flight SQL server, through ADBC.

Scans become SELECTs sent to the remote server (projection and filters in standard SQL);
results arrive as Arrow batches and stream on. The remote's own read-only guarantees
apply; flightdeck only ever sends SELECTs.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

import adbc_driver_flightsql.dbapi as adbc_flightsql
import pyarrow as pa
from adbc_driver_flightsql import DatabaseOptions

from federation import expr as fx
from federation.cancel import on_cancel
from federation.connectors.base import ConnectorError, SqlConnector, Unreachable, cancel_quietly, shown_url


class FlightSQLConnector(SqlConnector):
    kind = "flightsql"
    dialect = "postgres"  # standard double-quoted identifiers and ANSI literals
    # Instants are bound as Arrow timestamps with their zone: no literal says "timestamptz" to every
    # Flight SQL server, and an append refresh from an upstream flightdeck filters on one.
    renderer = fx.SqlRenderer(fx.quote_double, fx.standard_literal, "qmark", bound_types=(str, dt.datetime))
    secret_params = ("flightsql_api_key", "flightsql_password")

    def __init__(self, params: dict[str, Any], base_dir):
        super().__init__(params, base_dir)
        if "flightsql_endpoint" not in params:
            raise ConnectorError("flightsql: params.flightsql_endpoint (grpc://host:port) is required")
        self.endpoint = str(params["flightsql_endpoint"])
        query_timeout = str(float(params.get("query_timeout", 300)))
        self._options = {DatabaseOptions.TIMEOUT_QUERY.value: query_timeout,
                         DatabaseOptions.TIMEOUT_FETCH.value: query_timeout}
        if "flightsql_api_key" in params:
            self._options[DatabaseOptions.AUTHORIZATION_HEADER.value] = f"Bearer {params['flightsql_api_key']}"
        elif "flightsql_username" in params:
            self._options["username"] = str(params["flightsql_username"])
            self._options["password"] = str(params.get("flightsql_password", ""))

    @property
    def compute_context(self) -> str:
        return f"flightsql:{self.endpoint}"

    def describe(self) -> str:
        return f"flightsql ({shown_url(self.endpoint)})"

    def clean_error(self, error: Exception) -> str:
        return super().clean_error(str(error).split(". Detail:")[0])  # without gRPC's debug context

    def _connect(self):
        # One connection per request: ADBC connections are not shared across threads.
        try:
            return adbc_flightsql.connect(self.endpoint, db_kwargs=self._options, autocommit=True)
        except Exception as error:
            raise Unreachable(f"{self.describe()}: cannot connect: {self.clean_error(error)}") from None

    def tables(self) -> list[str]:
        with self._connect() as connection:
            listing = connection.adbc_get_objects(depth="tables").read_all().to_pylist()
        return sorted(f"{schema['db_schema_name']}.{table['table_name']}"
                      for catalog in listing for schema in catalog["catalog_db_schemas"] or []
                      for table in schema["db_schema_tables"] or [])

    def _comparison_rules(self, table: str) -> dict[str, str]:
        """Text takes only = and IN (the remote server's text collation is unknown); other types compare exactly."""
        return self.loose_columns(table)

    def schema(self, table: str) -> pa.Schema:
        reader = self.execute_sql(f"SELECT * FROM {self.quote_table(table)} LIMIT 0")
        return reader.schema

    def open_stream(self, sql: str, params: list[Any] | None, target: pa.Schema | None) -> pa.RecordBatchReader:
        connection = self._connect()
        cursor = connection.cursor()
        on_cancel(cursor.adbc_cancel)
        try:
            cursor.execute(sql, params)
            reader = cursor.fetch_record_batch()
        except Exception as error:
            cursor.close()
            connection.close()
            self.stats.record_error()
            raise ConnectorError(f"{self.describe()}: {self.clean_error(error)}") from None
        def release(finished: bool) -> None:
            if not finished:
                cancel_quietly(cursor.adbc_cancel)
            cursor.close()
            connection.close()

        return self.stream_arrow(sql, reader, target, release)
