"""Connecting to a flightdeck server as a client: ADBC Flight SQL, Arrow results."""
from __future__ import annotations

import json
from pathlib import Path

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pyarrow.flight as flight
from adbc_driver_flightsql import DatabaseOptions


def connect(url: str, api_key: str | None = None, username: str | None = None,
            password: str | None = None, tls_ca: str | None = None) -> flightsql.Connection:
    """``tls_ca``: a PEM file of the CA that signed a ``grpc+tls://`` server's certificate, when
    the system's roots do not cover it."""
    options: dict[str, str] = {}
    if api_key:
        options[DatabaseOptions.AUTHORIZATION_HEADER.value] = f"Bearer {api_key}"
    elif username:
        options.update(username=username, password=password or "")
    if tls_ca:
        options[DatabaseOptions.TLS_ROOT_CERTS.value] = Path(tls_ca).read_text()
    return flightsql.connect(url, autocommit=True, db_kwargs=options or None)


def run_query(connection: flightsql.Connection, query: str,
              parameters: tuple | list | None = None) -> pa.Table:
    with connection.cursor() as cursor:
        cursor.execute(query, parameters)
        return cursor.fetch_arrow_table()


def refresh(url: str, dataset: str, refresh_sql: str | None = None, api_key: str | None = None,
            username: str | None = None, password: str | None = None, tls_ca: str | None = None) -> dict:
    """Ask the server to refresh an accelerated dataset now (the Refresh action); its status after."""
    client = flight.FlightClient(url, tls_root_certs=Path(tls_ca).read_bytes() if tls_ca else None)
    try:
        headers = []
        if api_key:
            headers.append((b"authorization", f"Bearer {api_key}".encode()))
        elif username:
            headers.append(client.authenticate_basic_token(username, password or ""))
        body = json.dumps({"dataset": dataset, "refresh_sql": refresh_sql}).encode()
        results = client.do_action(flight.Action("Refresh", body), flight.FlightCallOptions(headers=headers))
        return json.loads(next(iter(results)).body.to_pybytes())
    finally:
        client.close()
