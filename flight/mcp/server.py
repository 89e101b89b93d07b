"""The MCP door: one MCPServer over the Service, served over stdio or streamable HTTP.

stdio (``flightdeck mcp``) is for desktop agents that start their tools as subprocesses: the
caller is whoever started the process, authenticated once with the API key it was given.
Over HTTP every request carries a bearer API key (when auth is on), checked by the SDK's
TokenVerifier against the same keys as the other doors.

The HTTP door serves it at ``/v1/mcp`` as one of its routes (``http_route``); that app's
lifespan runs ``server.session_manager.run()``, since a routed app's own lifespan does not run.
"""
from __future__ import annotations

from typing import Any, Callable

from mcp.server import MCPServer
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import Resource
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from flight.mcp.tools import Tools
from flightdeck import __version__
from flightdeck.auth import Credentials, Principal
from flightdeck.errors import ServiceError
from flightdeck.runtime_config import RuntimeConfig
from flightdeck.service import Service

INSTRUCTIONS = """\
flightdeck: read-only SQL over the datasets provisioned for you, joined across sources in one
query, plus search over their text. Start with list_datasets and table_schema (or the schema
resources); sample_distinct_columns shows what values look like before you filter. Pass values
as `parameters` ($1, $2, ...), never pasted into SQL. Results are capped for your context: when
a result says `truncated`, aggregate or filter instead of paging. `data_as_of` tells how fresh
the local copies a result read are."""


class ApiKeyVerifier:
    """The SDK's TokenVerifier over the Service: a bearer token is one of the configured API keys
    (or a token a username/password login issued)."""

    def __init__(self, service: Service):
        self.service = service

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            principal = self.service.authenticate(Credentials(bearer=token))
        except ServiceError:
            return None
        return AccessToken(token=token, client_id=principal.name, scopes=[])


def stdio_server(service: Service, runtime: RuntimeConfig, api_key: str | None = None) -> MCPServer:
    """The server for one local agent; raises ServiceError (unauthenticated) when auth is on and
    ``api_key`` is not one of its keys."""
    principal = service.authenticate(Credentials(bearer=api_key))
    return _server(service, runtime, lambda: principal)


def http_server(service: Service, runtime: RuntimeConfig) -> MCPServer:
    """The server behind the streamable-HTTP endpoint; with auth on, each request's bearer key
    names its caller."""
    if not service.authenticator.enabled:
        anonymous = service.authenticate(Credentials())
        return _server(service, runtime, lambda: anonymous)
    endpoint = runtime.http
    auth = AuthSettings(issuer_url=f"http://{_url_host(endpoint.host)}:{endpoint.port}", resource_server_url=None)
    return _server(service, runtime, _caller_of(service), token_verifier=ApiKeyVerifier(service), auth=auth)


HTTP_PATH = "/v1/mcp"
SESSIONS_PER_CALLER = 100    # open MCP sessions one key may hold (the newer protocol era needs none)
SESSION_IDLE_SECONDS = 600   # an MCP session unused this long is closed (the SDK's default: 30 min)


def http_route(server: MCPServer, runtime: RuntimeConfig, path: str = HTTP_PATH) -> Route:
    """The streamable-HTTP endpoint as a route of another Starlette app, at exactly ``path``."""
    return Route(path, endpoint=http_app(server, runtime, path))


def http_app(server: MCPServer, runtime: RuntimeConfig, path: str = "/mcp") -> ASGIApp:
    """The streamable-HTTP ASGI app answering at ``path`` (both protocol eras). Requests whose
    Host header is not loopback are refused unless listed in ``runtime.mcp.allowed_hosts``
    (DNS rebinding protection) when the HTTP door listens on loopback."""
    security = None
    if runtime.mcp.allowed_hosts:
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[*runtime.mcp.allowed_hosts, "127.0.0.1:*", "localhost:*", "[::1]:*"],
            allowed_origins=[f"{scheme}://{allowed}" for allowed in runtime.mcp.allowed_hosts
                             for scheme in ("http", "https")])
    app = server.streamable_http_app(streamable_http_path=path, transport_security=security, host=runtime.http.host,
                                     session_idle_timeout=SESSION_IDLE_SECONDS)
    _cap_sessions_per_caller(server.session_manager, SESSIONS_PER_CALLER)
    return ApiKeyHeader(app)


def _cap_sessions_per_caller(manager: Any, cap: int) -> None:
    """The SDK caps open sessions for all callers together (10,000): one key opening sessions in
    a loop would lock every other key out for as long as they idle. Each caller (the SDK's
    requestor, one per key) may hold ``cap``; past it, its new session is refused (503) like
    one past the SDK's own cap. Wraps the pinned SDK's session admission."""
    admit = manager._admit_session

    def admit_within_cap(requestor: Any) -> Any:
        if requestor is not None and sum(owner == requestor for owner in manager._session_owners.values()) >= cap:
            return None
        return admit(requestor)
    manager._admit_session = admit_within_cap


class ApiKeyHeader:
    """Lets MCP clients send their key as ``X-API-Key``, as on the other HTTP routes: the SDK's
    authentication reads only ``Authorization: Bearer``."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope["headers"]
            key = next((value for name, value in headers if name == b"x-api-key"), None)
            if key is not None and not any(name == b"authorization" for name, _ in headers):
                scope = {**scope, "headers": [*headers, (b"authorization", b"Bearer " + key)]}
        await self.app(scope, receive, send)


class GrantedServer(MCPServer):
    """Lists the schema resources of the datasets the caller may see (the SDK lists one fixed set)."""

    def __init__(self, tools: Tools, **settings):
        super().__init__(**settings)
        self.tools = tools
        tools.install(self)

    async def list_resources(self) -> list[Resource]:
        return await self.tools.schema_resources()


def _server(service: Service, runtime: RuntimeConfig, principal: Callable[[], Principal], **auth) -> MCPServer:
    return GrantedServer(Tools(service, runtime.mcp, principal), name="flightdeck", version=__version__,
                         instructions=INSTRUCTIONS, **auth)


def _caller_of(service: Service) -> Callable[[], Principal]:
    def caller() -> Principal:
        token = get_access_token()
        if token is None:  # the SDK's middleware answers 401 before a tool runs; this is a second lock
            raise ToolError("unauthenticated: send a bearer API key")
        return service.authenticate(Credentials(bearer=token.token))
    return caller


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
