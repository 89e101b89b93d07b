"""The MCP door: flightdeck's tools for agents, over stdio and streamable HTTP."""
from flight.mcp.server import HTTP_PATH, http_app, http_route, http_server, stdio_server

__all__ = ["HTTP_PATH", "http_app", "http_route", "http_server", "stdio_server"]
