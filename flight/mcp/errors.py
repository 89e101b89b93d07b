"""The core's errors as MCP tool errors: the one place a ServiceError kind gets its words here.

Only a ToolError's message reaches the agent (anything else the SDK reports as a bare "Error
executing tool"), so every failure of a tool becomes one, with the core's message, which is
already safe to show.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator

from mcp.server.mcpserver.exceptions import ResourceError, ToolError

from flightdeck.errors import (CANCELLED, INVALID, LIMIT_EXCEEDED, NOT_FOUND, REFUSED, TIMED_OUT, UNAUTHENTICATED,
                               UNAVAILABLE, ServiceError)

log = logging.getLogger("flightdeck.mcp")

# What each kind of failure means to an agent deciding its next call.
LABELS = {
    INVALID: "invalid request",
    NOT_FOUND: "not found",
    REFUSED: "refused (flightdeck is read-only)",
    UNAVAILABLE: "unavailable (a retry may work)",
    LIMIT_EXCEEDED: "limit exceeded",
    UNAUTHENTICATED: "unauthenticated",
    CANCELLED: "cancelled",
    TIMED_OUT: "timed out",
}


def agent_message(error: ServiceError) -> str:
    return f"{LABELS[error.kind]}: {error.message}"


@contextmanager
def tool_errors(tool: str) -> Iterator[None]:
    """Run a tool's work; its failures become ToolErrors with a message for the agent."""
    try:
        yield
    except ToolError:
        raise
    except ServiceError as error:
        raise ToolError(agent_message(error)) from None
    except Exception as error:  # a bug: the details stay in the server's log
        log.exception("MCP tool %s failed", tool)
        raise ToolError(f"internal error in {tool} ({type(error).__name__}); the server log has the details") from None


@contextmanager
def resource_errors() -> Iterator[None]:
    """The same for reading a resource."""
    try:
        yield
    except ServiceError as error:
        raise ResourceError(agent_message(error)) from None
