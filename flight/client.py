"""Connecting to a flightdeck server as a client: ADBC Flight SQL, Arrow results."""
from __future__ import annotations

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
from adbc_driver_flightsql import DatabaseOptions


def connect(url: str, api_key: str | None = None, username: str | None = None,
            password: str | None = None) -> flightsql.Connection:
    kwargs: dict = {}
    if api_key:
        kwargs["db_kwargs"] = {DatabaseOptions.AUTHORIZATION_HEADER.value: f"Bearer {api_key}"}
    elif username:
        kwargs["db_kwargs"] = {"username": username, "password": password or ""}
    return flightsql.connect(url, autocommit=True, **kwargs)


def run_query(connection: flightsql.Connection, query: str,
              parameters: tuple | list | None = None) -> pa.Table:
    with connection.cursor() as cursor:
        cursor.execute(query, parameters)
        return cursor.fetch_arrow_table()
