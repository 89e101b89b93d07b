"""The core's error kinds as HTTP statuses, in one table, and the JSON error body.

Every error body has OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, so
the embeddings routes keep OpenAI's contract and every other route answers alike. A bug
becomes a 500 whose message says only that details are in the server log.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from starlette.responses import Response

from flightdeck.errors import (CANCELLED, INVALID, LIMIT_EXCEEDED, NOT_FOUND, REFUSED, TIMED_OUT,
                               UNAUTHENTICATED, UNAVAILABLE, ServiceError)

log = logging.getLogger("flightdeck.http")

TOO_MANY_REQUESTS = 429
CLIENT_CLOSED_REQUEST = 499  # the client went away (nginx's code); nobody reads this answer


@dataclass(frozen=True)
class HttpError:
    status: int
    type: str   # OpenAI's error "type" words


HTTP_ERRORS: dict[str, HttpError] = {
    INVALID: HttpError(400, "invalid_request_error"),
    NOT_FOUND: HttpError(404, "not_found_error"),
    REFUSED: HttpError(403, "permission_error"),
    UNAVAILABLE: HttpError(503, "service_unavailable_error"),
    LIMIT_EXCEEDED: HttpError(400, "invalid_request_error"),
    UNAUTHENTICATED: HttpError(401, "authentication_error"),
    CANCELLED: HttpError(CLIENT_CLOSED_REQUEST, "cancelled"),
    TIMED_OUT: HttpError(504, "timeout_error"),
}
INTERNAL = HttpError(500, "server_error")


class RequestError(ServiceError):
    """A ServiceError raised by the door itself, with the OpenAI ``param`` and ``code`` it names."""

    def __init__(self, kind: str, message: str, param: str | None = None, code: str | None = None,
                 status: int | None = None):
        super().__init__(kind, message)
        self.param, self.code, self.status = param, code, status


def error_body(message: str, type_: str, param: str | None, code: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def error_response(error: Exception, headers: dict[str, str] | None = None) -> Response:
    """Any failure as the JSON answer a client sees: a clean message, never a traceback."""
    if not isinstance(error, ServiceError):
        log.error("internal error", exc_info=error)
        body = error_body(f"internal error ({type(error).__name__}); details are in the server log",
                          INTERNAL.type, None, "internal_error")
        return Response(body, INTERNAL.status, headers, media_type="application/json")
    mapped = HTTP_ERRORS[error.kind]
    param = getattr(error, "param", None)
    code = getattr(error, "code", None) or error.kind
    status = getattr(error, "status", None) or mapped.status
    if error.retry_after is not None:  # busy, not wrong: the same request may work in a moment
        status, headers = TOO_MANY_REQUESTS, {**(headers or {}), "Retry-After": f"{error.retry_after:.0f}"}
    return Response(error_body(error.message, mapped.type, param, code), status, headers,
                    media_type="application/json")
