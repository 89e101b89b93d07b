"""POST /v1/search: the search table functions of one or more datasets, as Spice AI's
``{matches: [{value, score, dataset, primary_key, metadata}], duration_ms}``."""
from __future__ import annotations

import time
from dataclasses import dataclass

from flight.http.bodies import field
from flight.http.errors import RequestError
from flightdeck.auth import Principal
from flightdeck.errors import INVALID
from flightdeck.service import Service, Truncation

MODES = ("vector", "text", "hybrid")
DEFAULT_LIMIT = 10
MAX_LIMIT = 1000


@dataclass(frozen=True)
class SearchRequest:
    text: str
    datasets: list[str] | None
    limit: int
    where: str | None
    additional_columns: list[str]
    mode: str


def parse_request(body: dict) -> SearchRequest:
    text = field(body, "text", str, required=True)
    datasets = field(body, "datasets", list)
    if datasets is not None and (not datasets or not all(isinstance(d, str) for d in datasets)):
        raise RequestError(INVALID, "'datasets' must be a non-empty list of dataset names", param="datasets")
    limit = field(body, "limit", int, default=DEFAULT_LIMIT)
    if not 1 <= limit <= MAX_LIMIT:
        raise RequestError(INVALID, f"'limit' must be from 1 to {MAX_LIMIT}", param="limit")
    columns = field(body, "additional_columns", list, default=[])
    if not all(isinstance(c, str) for c in columns):
        raise RequestError(INVALID, "'additional_columns' must be a list of column names",
                           param="additional_columns")
    mode = field(body, "mode", str, default="hybrid")
    if mode not in MODES:
        raise RequestError(INVALID, f"'mode' must be one of {', '.join(MODES)}", param="mode")
    return SearchRequest(text, datasets, limit, field(body, "where", str), columns, mode)


def search(service: Service, principal: Principal, request: SearchRequest, door: str) -> tuple[dict, list[str]]:
    """The answer, and the qualified names of the datasets searched (blocking)."""
    started = time.perf_counter()
    listing = {d["name"]: d for d in service.datasets(principal)}
    names = ([service.qualified_name(principal, name) for name in request.datasets] if request.datasets
             else [name for name, d in listing.items() if d.get("searchable_columns")])
    matches = []
    notices = []
    for name in names:
        truncation = Truncation()
        table = service.search(principal, name, request.text, request.limit, request.mode, request.where,
                               door=door, truncation=truncation).read_all()
        notices += [truncation.notice] if truncation.notice else []
        missing = [c for c in request.additional_columns if c not in table.column_names]
        if missing:
            raise RequestError(INVALID, f"dataset {name} has no column {missing[0]!r}", param="additional_columns")
        key = listing[name].get("primary_key") or []
        for row in table.to_pylist():
            matches.append({"value": row.get("chunk"), "score": row.get("score"), "dataset": name,
                            "primary_key": {column: row.get(column) for column in key},
                            "metadata": {column: row.get(column) for column in request.additional_columns}})
    matches.sort(key=lambda match: -(match["score"] or 0.0))
    answer = {"matches": matches[:request.limit], "duration_ms": round((time.perf_counter() - started) * 1000, 3)}
    if notices:
        answer["truncated"] = notices[0]
    return answer, names
