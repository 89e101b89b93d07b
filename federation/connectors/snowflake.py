"""`snowflake:database.schema.table` — Snowflake through snowflake-connector-python (Arrow batches).

Snowflake has no read-only session switch: connect with a role that can only read
(``snowflake_role``); flightdeck itself only ever sends SELECTs. Unquoted Snowflake names
are upper case; datasets show them in lower case and map back when generating SQL.
"""
from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import snowflake.connector

from federation import expr as fx
from federation.connectors.base import ConnectorError, SqlConnector, Unreachable
from federation.connectors.typing import conform_batch

_SIMPLE_TYPES = {
    "FLOAT": pa.float64(), "DOUBLE": pa.float64(), "REAL": pa.float64(), "TEXT": pa.string(),
    "VARCHAR": pa.string(), "STRING": pa.string(), "CHAR": pa.string(), "BOOLEAN": pa.bool_(),
    "DATE": pa.date32(), "TIME": pa.time64("ns"), "TIMESTAMP_NTZ": pa.timestamp("ns"),
    "TIMESTAMP_LTZ": pa.timestamp("ns", tz="UTC"), "TIMESTAMP_TZ": pa.timestamp("ns", tz="UTC"),
    "BINARY": pa.binary(), "VARIANT": pa.string(), "OBJECT": pa.string(), "ARRAY": pa.string(),
}


def arrow_type_for(data_type: str, precision: int | None, scale: int | None) -> pa.DataType | None:
    data_type = data_type.upper()
    if data_type in ("NUMBER", "DECIMAL", "NUMERIC", "INT", "INTEGER", "BIGINT"):
        if not scale:
            return pa.int64()  # Snowflake's INT is NUMBER(38,0); values beyond int64 fail clearly
        return pa.decimal128(precision or 38, scale)
    return _SIMPLE_TYPES.get(data_type)


class SnowflakeConnector(SqlConnector):
    kind = "snowflake"
    dialect = "snowflake"
    secret_params = ("snowflake_password",)

    def __init__(self, params: dict[str, Any], base_dir):
        super().__init__(params, base_dir)
        self.account = str(params.get("snowflake_account", ""))
        if not self.account:
            raise ConnectorError("snowflake: params.snowflake_account is required")
        self._password = str(params.get("snowflake_password", ""))
        self.connect_args = {
            "account": self.account, "user": str(params.get("snowflake_username", "")),
            "password": self._password, "warehouse": params.get("snowflake_warehouse"),
            "role": params.get("snowflake_role"), "login_timeout": int(params.get("connect_timeout", 30)),
            "network_timeout": int(params.get("query_timeout", 300)),
            "paramstyle": "qmark",  # values are bound by the server, never formatted into the text
            "session_parameters": {"QUERY_TAG": "flightdeck",
                                   "STATEMENT_TIMEOUT_IN_SECONDS": int(params.get("query_timeout", 300))},
        }
        for key in ("host", "port", "protocol"):  # a private endpoint or a local test server
            if f"snowflake_{key}" in params:
                self.connect_args[key] = params[f"snowflake_{key}"]
        self.connect_args = {k: v for k, v in self.connect_args.items() if v is not None}
        self._names: dict[str, str] = {}  # column as shown -> column in Snowflake
        self.renderer = fx.SqlRenderer(self._quote_remote, fx.standard_literal, "qmark")

    @property
    def compute_context(self) -> str:
        return f"snowflake:{self.account}"

    def describe(self) -> str:
        return f"snowflake ({self.account})"

    def _quote_remote(self, name: str) -> str:
        return fx.quote_double(self.remote_column(name))

    def remote_column(self, name: str) -> str:
        return self._names.get(name, name)

    def _connect(self):
        try:
            return snowflake.connector.connect(**self.connect_args)
        except Exception as error:
            raise Unreachable(f"{self.describe()}: cannot connect: {self.clean_error(error)}") from None

    def _split(self, table: str) -> tuple[str, str, str]:
        parts = table.split(".")
        if len(parts) != 3:
            raise ConnectorError(f"snowflake: name the table as database.schema.table, not {table!r}")
        return parts[0], parts[1], parts[2]

    def quote_table(self, table: str) -> str:
        return ".".join(fx.quote_double(p if p != p.lower() else p.upper()) for p in self._split(table))

    def _rows(self, sql: str, params: list[Any] | None = None) -> list[tuple]:
        connection = self._connect()
        try:
            cursor = connection.cursor()
            cursor.execute(sql, params)
            return list(cursor.fetchall())
        except snowflake.connector.Error as error:
            raise ConnectorError(f"{self.describe()}: {self.clean_error(error)}") from None
        finally:
            connection.close()

    def tables(self) -> list[str]:
        database = str(self.params.get("snowflake_database", ""))
        if not database:
            return []
        rows = self._rows(f'SELECT table_schema, table_name FROM {fx.quote_double(database.upper())}.information_schema.tables '
                          "WHERE table_schema <> 'INFORMATION_SCHEMA' ORDER BY 1, 2")
        return [f"{database}.{schema}.{name}".lower() for schema, name in rows]

    def _comparison_rules(self, table: str) -> dict[str, str]:
        """Text takes only = and IN (Snowflake columns may carry collation specifications); other types compare exactly."""
        return self.loose_columns(table)

    def schema(self, table: str) -> pa.Schema:
        database, schema_name, table_name = self._split(table)
        rows = self._rows(
            f'SELECT column_name, data_type, numeric_precision, numeric_scale FROM {fx.quote_double(database.upper())}'
            ".information_schema.columns WHERE table_schema = ? AND table_name = ? ORDER BY ordinal_position",
            [schema_name.upper(), table_name.upper()])
        if not rows:
            raise ConnectorError(f"{self.describe()}: no table {table}")
        fields = []
        for name, data_type, precision, scale in rows:
            arrow_type = arrow_type_for(data_type, precision, scale)
            if arrow_type is None:
                continue
            shown = name.lower() if re.fullmatch(r"[A-Z_][A-Z0-9_$]*", name) else name
            self._names[shown] = name
            fields.append(pa.field(shown, arrow_type))
        return pa.schema(fields)

    def open_stream(self, sql: str, params: list[Any] | None, target: pa.Schema | None) -> pa.RecordBatchReader:
        connection = self._connect()
        cursor = connection.cursor()
        try:
            cursor.execute(sql, params)
        except snowflake.connector.Error as error:
            connection.close()
            self.stats.record_error()
            raise ConnectorError(f"{self.describe()}: {self.clean_error(error)}") from None
        tables = cursor.fetch_arrow_batches()
        first = next(tables, None)
        if target is not None:
            schema = target
        elif first is not None:
            schema = first.schema  # the backend's own types
        else:
            schema = pa.schema([pa.field(d.name, pa.string()) for d in cursor.description])

        def batches():
            try:
                for table in ([first] if first is not None else []):
                    yield from (conform_batch(b, schema) for b in table.to_batches())
                for table in tables:
                    yield from (conform_batch(b, schema) for b in table.to_batches())
            finally:
                connection.close()

        return self.counted(schema, sql, batches)
