"""The MCP door: flightdeck's tools for agents, over stdio and streamable HTTP."""
from flight.mcp.server import http_app, http_server, stdio_server

__all__ = ["http_app", "http_server", "stdio_server"]
