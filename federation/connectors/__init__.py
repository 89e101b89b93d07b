"""Connector kinds, by the prefix a dataset's `from:` uses."""
from __future__ import annotations

import difflib
import importlib
import json
from pathlib import Path
from typing import Any

from federation.budget import LoadBudgets
from federation.changes import ChangeSource
from federation.connectors.base import Connector, ConnectorError, SqlConnector

AVAILABLE_KINDS = {
    "file": "federation.connectors.file:FileConnector",
    "duckdb": "federation.connectors.duckdb:DuckDBConnector",
    "sqlite": "federation.connectors.sqlite:SQLiteConnector",
    "postgres": "federation.connectors.postgres:PostgresConnector",
    "mysql": "federation.connectors.mysql:MySQLConnector",
    "iceberg": "federation.connectors.iceberg:IcebergConnector",
    "flightsql": "federation.connectors.flightsql:FlightSQLConnector",
    "git": "federation.connectors.git:GitConnector",
    "http": "federation.connectors.http:HttpConnector",
    "https": "federation.connectors.http:HttpConnector",
    "github": "federation.connectors.github:GitHubConnector",
    "snowflake": "federation.connectors.snowflake:SnowflakeConnector",
    "mongodb": "federation.connectors.mongodb:MongoDBConnector",
    "kafka": "federation.connectors.kafka:KafkaConnector",
    "nats": "federation.connectors.nats:NatsConnector",
    "mqtt": "federation.connectors.mqtt:MqttConnector",
    "elasticsearch": "federation.connectors.elasticsearch:ElasticsearchConnector",
    "spark": "federation.connectors.spark:SparkConnector",  # needs the spark extra
}
# Kinds whose connector serves exactly one location (a file set, a repository table).
PER_LOCATION_KINDS = ("file", "git", "http", "https", "github")


def check_kind(kind: str) -> str | None:
    """None if ``kind`` can be used, else a message saying what is wrong."""
    if kind in AVAILABLE_KINDS:
        return None
    close = difflib.get_close_matches(kind, list(AVAILABLE_KINDS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown connector '{kind}'{hint}"


def streams_changes(kind: str) -> bool | None:
    """Whether sources of a known ``kind`` can stream their changes (``refresh_mode: changes``);
    None when its connector cannot be loaded here (an extra not installed), which opening it says."""
    module_name, class_name = AVAILABLE_KINDS[kind].split(":")
    try:
        connector_class = getattr(importlib.import_module(module_name), class_name)
    except Exception:  # told precisely when the dataset is opened
        return None
    return issubclass(connector_class, ChangeSource)


class ConnectorPool:
    """Opens connectors, sharing one per backend configuration (same file, same server), and
    gives each the load budget of its source."""

    def __init__(self, base_dir: Path):
        self.base_dir = base_dir
        self._open: dict[str, Connector] = {}
        self.budgets = LoadBudgets()

    def open(self, kind: str, location: str, params: dict[str, Any]) -> Connector:
        problem = check_kind(kind)
        if problem:
            raise ConnectorError(problem)
        module_name, class_name = AVAILABLE_KINDS[kind].split(":")
        connector_class = getattr(importlib.import_module(module_name), class_name)
        if kind in PER_LOCATION_KINDS:
            if kind in ("http", "https"):
                location = f"{kind}:{location}"  # the connector takes the whole URL
            return self._budgeted(connector_class(params, self.base_dir, location), params)
        key = kind + json.dumps(params, sort_keys=True, default=str)
        if key not in self._open:
            self._open[key] = connector_class(params, self.base_dir)
        return self._budgeted(self._open[key], params)

    def _budgeted(self, connector: Connector, params: dict[str, Any]) -> Connector:
        try:
            connector.budget = self.budgets.of(connector.source_identity, connector.describe(), params)
        except ValueError as error:
            raise ConnectorError(str(error)) from None
        return connector

    def close(self) -> None:
        for connector in self._open.values():
            connector.close()
        self._open.clear()


__all__ = ["Connector", "ConnectorError", "ConnectorPool", "SqlConnector", "check_kind", "streams_changes",
           "AVAILABLE_KINDS"]
