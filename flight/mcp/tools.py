"""The MCP tools: each one a call to the Service, its result sized for a model's context.

Every tool is read-only toward the data sources; ``refresh_dataset`` rewrites flightdeck's own
local copy of a dataset, so it alone is not marked read-only.
"""
from __future__ import annotations

import functools
import json
from typing import Annotated, Any, Callable, Literal

from typing_extensions import TypedDict

import anyio.to_thread
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import Resource, ToolAnnotations
from pydantic import Field

from flight.mcp.errors import resource_errors, tool_errors
from flight.mcp.results import (Column, DataAsOf, Rows, columns, cut_at_limit, data_as_of, json_value, read_sized,
                                rows_result, sized)
from flightdeck.auth import Principal
from flightdeck.runtime_config import Mcp as Caps
from flightdeck.service import Planned, Service, Truncation

READ_ONLY = ToolAnnotations(read_only_hint=True, destructive_hint=False, idempotent_hint=True)
REFRESHES = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True)
SCHEMA_URI = "flightdeck://datasets/{name}/schema"

DatasetName = Annotated[str, Field(description="a dataset name from list_datasets, e.g. 'orders' or 'crm.customers'")]
Limit = Annotated[int, Field(ge=1, le=10_000, description="how many rows at most (the server also caps results)")]
Parameters = Annotated[list[str | int | float | bool | None] | None,
                       Field(description="values for the statement's placeholders ($1, $2, ... or ?), in order; "
                                         "bound as values, never pasted into the SQL")]


class DatasetInfo(TypedDict):
    name: str
    kind: str
    state: str                       # ready or unavailable
    description: str | None
    error: str | None
    primary_key: list[str]
    accelerated: bool                # served from a local copy refreshed from its source
    refresh_state: str | None
    data_as_of: str | None           # when the local copy was read from the source
    searchable_columns: list[str]


class DatasetList(TypedDict):
    datasets: list[DatasetInfo]


class TableSchema(TypedDict):
    dataset: str
    description: str | None
    columns: list[Column]
    primary_key: list[str]


class Match(TypedDict):
    dataset: str
    score: float
    chunk: str | None                # the part of the text that matched
    primary_key: dict[str, Any] | None
    row: dict[str, Any]              # the matched row's other columns


class SearchResult(TypedDict):
    matches: list[Match]
    truncated: bool
    notice: str | None
    data_as_of: DataAsOf | None


class DistinctValues(TypedDict):
    dataset: str
    columns: dict[str, list[str]]    # column -> distinct non-NULL values, as text
    truncated: bool
    notice: str | None
    data_as_of: DataAsOf | None


class RefreshResult(TypedDict):
    dataset: str
    state: str
    rows: int | None                 # rows in the local copy now
    last_refresh_rows: int | None    # rows the refresh read from the source
    data_as_of: str | None


class Tools:
    """The tools over one Service, for callers named by ``principal()``."""

    def __init__(self, service: Service, caps: Caps, principal: Callable[[], Principal]):
        self.service = service
        self.caps = caps
        self.principal = principal

    def install(self, server: MCPServer) -> MCPServer:
        for tool in (self.list_datasets, self.table_schema, self.sql, self.search, self.sample_distinct_columns,
                     self.random_sample, self.top_n_sample, self.explain):
            server.add_tool(tool, annotations=READ_ONLY, structured_output=True)
        server.add_tool(self.refresh_dataset, annotations=REFRESHES, structured_output=True)
        # A template, not one resource per dataset: which datasets exist depends on the caller
        # (GrantedServer lists the caller's own).
        server.resource(SCHEMA_URI, name="dataset schema", mime_type="application/json",
                        description="columns and primary key of a dataset")(self._read_schema)
        return server

    async def _run(self, tool: str, work: Callable[[Principal], Any]) -> Any:
        """``work(principal)`` in a worker thread (the Service blocks), its failures as tool errors."""
        with tool_errors(tool):
            principal = self.principal()
            return await anyio.to_thread.run_sync(functools.partial(work, principal))

    def _rows(self, planned: Planned) -> Rows:
        freshness = self.service.freshness(planned.accelerated)
        truncation = Truncation()
        return rows_result(self.service.execute(planned, truncation=truncation), truncation, self.caps, freshness)

    # ---- the catalog ----

    async def list_datasets(self) -> DatasetList:
        """The datasets you can query: name, source kind, state, description, primary key, whether
        it is accelerated (a local copy) and how fresh that copy is, and which columns `search` covers."""
        return await self._run("list_datasets", lambda principal: DatasetList(
            datasets=[_dataset_info(d) for d in self.service.datasets(principal)]))

    async def table_schema(self, dataset: DatasetName) -> TableSchema:
        """A dataset's columns (name, Arrow type, nullable) and primary key."""
        return await self._run("table_schema", lambda principal: self._table_schema(principal, dataset))

    def _table_schema(self, principal: Principal, name: str) -> TableSchema:
        schema = self.service.schema(principal, name)
        entry = self.service.dataset(principal, name)
        return TableSchema(dataset=entry["name"], description=entry.get("description"), columns=columns(schema),
                           primary_key=list(entry.get("primary_key") or []))

    async def _read_schema(self, name: str) -> str:
        with resource_errors():
            principal = self.principal()
            schema = await anyio.to_thread.run_sync(self._table_schema, principal, name)
        return json.dumps(schema)

    async def schema_resources(self) -> list[Resource]:
        """The schema resource of each dataset the caller may see."""
        with resource_errors():
            principal = self.principal()
            datasets = await anyio.to_thread.run_sync(self.service.datasets, principal)
        return [Resource(uri=SCHEMA_URI.format(name=d["name"]), name=f"{d['name']} schema",
                         mime_type="application/json",
                         description=f"columns and primary key of {d['name']}"
                                     + (f": {d['description']}" if d.get("description") else ""))
                for d in datasets]

    # ---- SQL ----

    async def sql(self, query: Annotated[str, Field(description="one read-only SQL statement (SELECT, WITH, "
                                                                "SHOW, DESCRIBE); PostgreSQL-like dialect")],
                  parameters: Parameters = None) -> Rows:
        """Run a read-only SQL query across every dataset (joins across sources work). Results are
        capped for your context: when `truncated` is true, aggregate or filter instead of paging.
        `data_as_of` says how fresh the accelerated copies it read are."""
        return await self._run("sql", lambda principal: self._rows(self.service.plan(principal, query, parameters)))

    async def explain(self, query: Annotated[str, Field(description="the SQL statement to explain")],
                      parameters: Parameters = None) -> Rows:
        """How a query would run: the plan, and the statement or request each backend would receive."""
        statement = query if query.lstrip().lower().startswith("explain") else f"EXPLAIN {query}"
        return await self._run("explain", lambda principal: self._rows(
            self.service.plan(principal, statement, parameters)))

    # ---- samples ----

    async def random_sample(self, dataset: DatasetName, limit: Limit = 10) -> Rows:
        """A random sample of a dataset's rows."""
        return await self._run("random_sample", lambda principal: self._rows(
            self.service.plan_sample(principal, dataset, limit, "random")))

    async def top_n_sample(self, dataset: DatasetName,
                           order_by: Annotated[str, Field(description="the column to rank rows by")],
                           limit: Limit = 10,
                           descending: Annotated[bool, Field(description="largest first (true) or smallest "
                                                                         "first")] = True) -> Rows:
        """The rows of a dataset with the largest (or smallest) values of one column; NULLs last."""
        return await self._run("top_n_sample", lambda principal: self._rows(
            self.service.plan_top(principal, dataset, order_by, limit, descending)))

    async def sample_distinct_columns(
            self, dataset: DatasetName,
            columns: Annotated[list[str] | None, Field(description="the columns (default: all)")] = None,
            limit: Annotated[int, Field(ge=1, le=1000, description="distinct values per column at most")] = 10,
    ) -> DistinctValues:
        """Up to `limit` distinct non-NULL values of each column, as text: what the values look
        like before you write a filter."""
        return await self._run("sample_distinct_columns", lambda principal: self._distinct(
            principal, dataset, columns, limit))

    def _distinct(self, principal: Principal, dataset: str, names: list[str] | None, limit: int) -> DistinctValues:
        planned = self.service.plan_distinct_values(principal, dataset, names, limit)
        freshness = self.service.freshness(planned.accelerated)
        truncation = Truncation()
        result = read_sized(self.service.execute(planned, truncation=truncation), truncation, self.caps, "values")
        by_column: dict[str, list[str]] = {}
        for row in result.rows:
            by_column.setdefault(row["column_name"], []).append(row["value"])
        return DistinctValues(dataset=dataset, columns=by_column, truncated=result.truncated,
                              notice=result.notice, data_as_of=data_as_of(freshness))

    # ---- search ----

    async def search(
            self, text: Annotated[str, Field(description="what to look for, in plain words")],
            datasets: Annotated[list[str] | None, Field(description="datasets to search (default: every "
                                                                    "searchable one)")] = None,
            mode: Annotated[Literal["hybrid", "vector", "text"], Field(
                description="hybrid (vector + full text, the default), vector (meaning) or text (BM25 words)")]
            = "hybrid",
            where: Annotated[str | None, Field(description="a SQL condition on the dataset's columns, "
                                                           "applied before ranking")] = None,
            limit: Annotated[int, Field(ge=1, le=100, description="how many matches")] = 10,
    ) -> SearchResult:
        """Search the searchable text columns of the datasets (list_datasets names them); the best
        matches first, each with its score, the matching chunk and its row."""
        return await self._run("search", lambda principal: self._search(principal, text, datasets, mode, where,
                                                                         limit))

    def _search(self, principal: Principal, text: str, names: list[str] | None, mode: str, where: str | None,
                limit: int) -> SearchResult:
        if names is None:
            names = [d["name"] for d in self.service.datasets(principal) if d["searchable_columns"]]
        matches: list[dict] = []
        searched = []
        notices = []
        for name in names:
            planned = self.service.plan_search(principal, name, text, limit, mode, where)
            entry = self.service.dataset(principal, name)
            qualified, key = entry["name"], entry.get("primary_key") or []
            searched.extend(planned.accelerated)
            truncation = Truncation()
            for row in self.service.execute(planned, truncation=truncation).read_all().to_pylist():
                matches.append(Match(dataset=qualified, score=row.pop("score"), chunk=row.pop("chunk", None),
                                     primary_key={k: json_value(row[k]) for k in key} if key else None, row=row))
            notices += [truncation.notice] if truncation.notice else []
        matches.sort(key=lambda m: m["score"], reverse=True)
        result = cut_at_limit(sized(matches[:limit], self.caps, "matches"), next(iter(notices), None))
        return SearchResult(matches=result.rows, truncated=result.truncated, notice=result.notice,
                            data_as_of=data_as_of(self.service.freshness(searched)))

    # ---- acceleration ----

    async def refresh_dataset(self, dataset: DatasetName,
                              refresh_sql: Annotated[str | None, Field(
                                  description="a one-off working set for this refresh only: SELECT * FROM "
                                              "<dataset> WHERE ...")] = None) -> RefreshResult:
        """Refresh an accelerated dataset's local copy from its source now, and wait for it. Reads
        the source; writes only flightdeck's own copy."""
        return await self._run("refresh_dataset", lambda principal: self._refresh(principal, dataset, refresh_sql))

    def _refresh(self, principal: Principal, dataset: str, refresh_sql: str | None) -> RefreshResult:
        status = self.service.refresh(principal, dataset, refresh_sql)
        if status.get("last_error"):
            raise ToolError(f"refresh failed: {status['last_error']} (the copy as of "
                            f"{json_value(status.get('data_as_of'))} keeps serving)")
        return RefreshResult(dataset=self.service.dataset(principal, dataset)["name"], state=status["state"],
                             rows=status.get("rows"), last_refresh_rows=status.get("last_refresh_rows"),
                             data_as_of=json_value(status.get("data_as_of")))


def _dataset_info(entry: dict) -> DatasetInfo:
    return DatasetInfo(name=entry["name"], kind=entry["kind"], state=entry["state"],
                       description=entry.get("description"), error=entry.get("error"),
                       primary_key=list(entry.get("primary_key") or []), accelerated="acceleration" in entry,
                       refresh_state=entry.get("refresh_state"), data_as_of=json_value(entry.get("data_as_of")),
                       searchable_columns=list(entry.get("searchable_columns") or []))
