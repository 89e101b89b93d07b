"""One error taxonomy for every door: what went wrong, in words a client may see.

A door maps each kind to its protocol once (a Flight status, an HTTP status, an MCP tool
error); the message is already safe to show: no traceback, no secret.
"""
from __future__ import annotations

INVALID = "invalid"                  # the request is wrong: bad SQL, bad arguments
NOT_FOUND = "not_found"              # an unknown dataset, model or handle
REFUSED = "refused"                  # understood and not allowed: a write, a transaction
UNAVAILABLE = "unavailable"          # a backend failed or is down; a retry may work
LIMIT_EXCEEDED = "limit_exceeded"    # over a configured limit
UNAUTHENTICATED = "unauthenticated"  # no or wrong credentials
CANCELLED = "cancelled"              # the caller stopped it
TIMED_OUT = "timed_out"              # it ran out of time

KINDS = (INVALID, NOT_FOUND, REFUSED, UNAVAILABLE, LIMIT_EXCEEDED, UNAUTHENTICATED, CANCELLED, TIMED_OUT)


# The longest message a client (and the audit) gets.
MAX_MESSAGE_CHARS = 2000


class ServiceError(Exception):
    """A request failed in a way the caller should hear about; ``kind`` is one of KINDS."""

    def __init__(self, kind: str, message: str, retry_after: float | None = None):
        """``retry_after``: the request may work if sent again after so many seconds (a place
        among running queries, a load budget): doors that can say so (HTTP 429) do."""
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}")
        if len(message) > MAX_MESSAGE_CHARS:  # an error may quote a value of any size (a bound text, say)
            message = f"{message[:MAX_MESSAGE_CHARS]}... ({len(message):,} characters)"
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"ServiceError({self.kind!r}, {self.message!r})"
