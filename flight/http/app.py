"""The Starlette application of the HTTP door: every route calls the Service, in a worker thread.

Routes follow Spice AI's HTTP API where the feature is the same. Every route but /health and
/v1/ready authenticates with the same keys as Flight SQL; every failure is answered by
``errors.error_response`` (one table from the core's error kinds to HTTP statuses).
"""
from __future__ import annotations

import functools
from typing import Any, AsyncContextManager, Awaitable, Callable, Sequence

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from flight.http import embeddings as openai_embeddings
from flight.http import search as dataset_search
from flight.http.auth import CHALLENGE, credentials
from flight.http.bodies import field, json_object, json_response, sql_parameters, text_body
from flight.http.errors import RequestError, error_response
from flight.http.formats import ENCODERS, content_coding, negotiate
from flight.http.streaming import ClientGone, QueryControl, ResultStream, StreamedResponse, run_watched
from flightdeck.auth import Principal
from flightdeck.errors import INVALID, NOT_FOUND, UNAUTHENTICATED, UNAVAILABLE, ServiceError
from flightdeck.service import Freshness, Service, Truncation

DOOR = "http"  # this door's label in the metrics
DATA_AS_OF = "X-Flightdeck-Data-As-Of"                    # the oldest copy the answer read
DATA_AS_OF_DATASETS = "X-Flightdeck-Data-As-Of-Datasets"  # each copy: "name=time, name=time"
TRUNCATED = "X-Flightdeck-Truncated"  # the result was cut at a result limit: why, and how to ask for less
ACCELERATION_KEYS = ("acceleration", "refresh_state", "refresh_mode", "last_refresh_start", "last_refresh_end",
                     "last_refresh_rows", "rows_loaded", "rows", "bytes", "last_error", "data_as_of",
                     "refreshes", "failures", "embedded_last_refresh", "embedded_total", "changes_applied",
                     "lag_p50_ms", "lag_p99_ms", "skipped", "last_skip_reason", "position", "source_backlog_bytes")
AFTER_REFRESH = "after refresh:"  # an error of what is built from a good copy (a search index)
Handler = Callable[["HttpApi", Request], Awaitable[Response]]
Lifespan = Callable[[Starlette], AsyncContextManager[None]]


def freshness_headers(freshness: Freshness | None) -> dict[str, str]:
    """When the accelerated copies an answer read were taken from their sources."""
    if freshness is None:
        return {}
    return {DATA_AS_OF: freshness.oldest.isoformat(),
            DATA_AS_OF_DATASETS: ", ".join(f"{name}={when.isoformat()}"
                                           for name, when in sorted(freshness.datasets.items()))}


def answered(handler: Handler) -> Handler:
    """Failures of a route become JSON errors (401s with a challenge)."""
    @functools.wraps(handler)
    async def wrapper(api: "HttpApi", request: Request) -> Response:
        try:
            return await handler(api, request)
        except ClientGone:
            return Response(status_code=499)
        except Exception as error:
            unauthenticated = isinstance(error, ServiceError) and error.kind == UNAUTHENTICATED
            return error_response(error, CHALLENGE if unauthenticated else None)
    return wrapper


class HttpApi:
    def __init__(self, service: Service):
        self.service = service

    def principal(self, request: Request) -> Principal:
        return self.service.authenticate(credentials(request.headers))

    async def blocking(self, work: Callable[..., Any], *args: Any) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(work, *args))

    # ---- SQL ----

    @answered
    async def sql(self, request: Request) -> Response:
        principal = self.principal(request)
        encoder = negotiate(request.headers.get("accept"))
        if encoder is None:
            raise RequestError(INVALID, f"cannot answer in {request.headers.get('accept')}; available: "
                                        f"{', '.join(ENCODERS)}", param="Accept", code="not_acceptable", status=406)
        sql, parameters = await self._statement(request)
        coding = content_coding(request.headers.get("accept-encoding"))
        control = QueryControl()

        truncation = Truncation()

        def start() -> tuple[ResultStream, bytes, Freshness | None]:
            planned = self.service.plan(principal, sql, parameters, door=DOOR)
            freshness = self.service.freshness(planned.accelerated)
            reader = self.service.execute(planned, control.cancelled, control.backend, truncation)
            stream = ResultStream(reader, encoder(reader.schema), coding, control, truncation)
            try:
                # A result that may be cut is read to its end (at most the limit) before the
                # head goes out, so that every format can say it was cut, in a header.
                head = stream.prime(whole=principal.limits.bounds_results)
            except BaseException:
                stream.close()
                raise
            if control.cancelled.is_set():  # the client left while the first rows came
                stream.close()
            return stream, head, freshness

        stream, head, freshness = await run_watched(request, start, control.cancel)
        headers = {"Vary": "Accept, Accept-Encoding", **freshness_headers(freshness)}
        if truncation.notice:
            headers[TRUNCATED] = truncation.notice
        if coding:
            headers["Content-Encoding"] = coding
        return StreamedResponse(stream, head, encoder.media_type, headers)

    async def _statement(self, request: Request) -> tuple[str, list[Any] | None]:
        """SQL from a text body, or {"sql": ..., "parameters": [...]} from a JSON one."""
        if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            body = await json_object(request)
            sql = field(body, "sql", str, required=True)
            parameters = sql_parameters(body.get("parameters"))
        else:
            sql, parameters = await text_body(request), None
        if not sql.strip():
            raise RequestError(INVALID, "the request has no SQL statement", param="sql")
        return sql, parameters

    # ---- search ----

    @answered
    async def search(self, request: Request) -> Response:
        principal = self.principal(request)
        parsed = dataset_search.parse_request(await json_object(request))
        answer, names = await self.blocking(dataset_search.search, self.service, principal, parsed, DOOR)
        freshness = await self.blocking(self.service.freshness, names)
        return json_response(answer, headers=freshness_headers(freshness))

    # ---- datasets and acceleration ----

    @answered
    async def datasets(self, request: Request) -> Response:
        rows = await self.blocking(self.service.datasets, self.principal(request))
        return json_response([_dataset_entry(row) for row in rows])

    @answered
    async def dataset(self, request: Request) -> Response:
        principal = self.principal(request)
        name = request.path_params["name"]
        schema = await self.blocking(self.service.schema, principal, name)
        qualified = self.service.qualified_name(principal, name)
        return json_response({"name": qualified, "schema": _schema_entry(schema)})

    @answered
    async def refresh(self, request: Request) -> Response:
        principal = self.principal(request)
        body = await json_object(request, required=False)
        refresh_sql = field(body, "refresh_sql", str)
        name = self.service.qualified_name(principal, request.path_params["name"])
        status = await self.blocking(self.service.refresh, principal, name, refresh_sql)
        error = status.get("last_error")
        if error and not error.startswith(AFTER_REFRESH):
            raise RequestError(UNAVAILABLE, f"refresh of {name} failed: {error} (the copy as of "
                                            f"{status.get('data_as_of')} keeps serving)")
        return json_response(status)

    # ---- embeddings (OpenAI) ----

    @answered
    async def embeddings(self, request: Request) -> Response:
        principal = self.principal(request)
        parsed = openai_embeddings.parse_request(await json_object(request))
        return json_response(await self.blocking(openai_embeddings.create_embeddings, self.service, principal, parsed))

    @answered
    async def models(self, request: Request) -> Response:
        return json_response(openai_embeddings.list_models(self.service, self.principal(request)))

    @answered
    async def model(self, request: Request) -> Response:
        principal = self.principal(request)
        return json_response(openai_embeddings.get_model(self.service, principal, request.path_params["name"]))

    # ---- the process ----

    @answered
    async def health(self, request: Request) -> Response:
        return json_response(self.service.health())

    @answered
    async def ready(self, request: Request) -> Response:
        ready = self.service.ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    @answered
    async def status(self, request: Request) -> Response:
        principal = self.principal(request)
        return json_response(await self.blocking(self.service.status, principal))

    @answered
    async def metrics(self, request: Request) -> Response:
        body, media_type = await self.blocking(self.service.metrics, self.principal(request))
        return Response(body, media_type=media_type)

    async def not_found(self, request: Request, error: Exception) -> Response:
        return error_response(RequestError(NOT_FOUND, f"no route {request.method} {request.url.path}"))


def _schema_entry(schema) -> dict:
    return {"fields": [{"name": f.name, "data_type": str(f.type), "nullable": f.nullable} for f in schema]}


def _dataset_entry(row: dict) -> dict:
    """A dataset's listing, its acceleration status grouped (null when not accelerated)."""
    entry = {key: value for key, value in row.items() if key not in ACCELERATION_KEYS}
    entry["acceleration"] = ({key: row[key] for key in ACCELERATION_KEYS if key in row}
                             if "acceleration" in row else None)
    return entry


def build_app(service: Service, mounted: Sequence[BaseRoute] = (), lifespan: Lifespan | None = None) -> Starlette:
    """The HTTP door's routes, then ``mounted`` ones (another door served on this port, which
    may need ``lifespan`` to run around the server's life)."""
    api = HttpApi(service)

    def route(path: str, handler: Handler, method: str) -> Route:
        return Route(path, functools.partial(handler, api), methods=[method])

    routes = [
        route("/v1/sql", HttpApi.sql, "POST"),
        route("/v1/search", HttpApi.search, "POST"),
        route("/v1/embeddings", HttpApi.embeddings, "POST"),
        route("/v1/models", HttpApi.models, "GET"),
        route("/v1/models/{name:path}", HttpApi.model, "GET"),
        route("/v1/datasets", HttpApi.datasets, "GET"),
        route("/v1/datasets/{name}", HttpApi.dataset, "GET"),
        route("/v1/datasets/{name}/acceleration/refresh", HttpApi.refresh, "POST"),
        route("/health", HttpApi.health, "GET"),
        route("/v1/ready", HttpApi.ready, "GET"),
        route("/v1/status", HttpApi.status, "GET"),
        route("/metrics", HttpApi.metrics, "GET"),
        *mounted,
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={404: api.not_found, 405: _method_not_allowed})
    # Starlette answers "/v1/datasets/" with a redirect built from the request's Host header,
    # which would send a client wherever that header says: a path is found as written or not at all.
    app.router.redirect_slashes = False
    return app


async def _method_not_allowed(request: Request, error: Exception) -> Response:
    return error_response(RequestError(INVALID, f"{request.method} is not allowed on {request.url.path}",
                                       code="method_not_allowed", status=405))
