"""Authentication: username/password (Basic, answered with a bearer token) and API keys.

pyarrow answers Handshake with UNIMPLEMENTED unless an auth handler is set, so a
no-op handler is installed and the real checks happen in a middleware that sees
every call's headers, Handshake included (NOTES.md).
"""
from __future__ import annotations

import base64
import hmac
import secrets
import threading
import time

import pyarrow.flight as flight

TOKEN_TTL_SECONDS = 24 * 3600


class AuthPolicy:
    def __init__(self, api_keys: list[str], users: dict[str, str]):
        self.api_keys = [k for k in api_keys if k]
        self.users = users
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.users)

    def check(self, headers: dict[str, list]) -> tuple[str, str | None]:
        """(who is calling, a new bearer token to send back or None); raises if refused."""
        values = headers.get("authorization") or headers.get("Authorization") or []
        header = values[0] if values else ""
        header = header.decode() if isinstance(header, bytes) else header
        scheme, _, credential = header.partition(" ")
        if scheme.lower() == "basic":
            return self._basic(credential.strip())
        if scheme.lower() == "bearer":
            return self._bearer(credential.strip()), None
        if self.enabled:
            raise flight.FlightUnauthenticatedError(
                "authentication required: send a bearer API key or username and password")
        return "anonymous", None

    def _basic(self, credential: str) -> tuple[str, str]:
        try:
            # Go's Flight client sends base64 without padding.
            padded = credential + "=" * (-len(credential) % 4)
            username, _, password = base64.b64decode(padded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise flight.FlightUnauthenticatedError("malformed Basic credentials") from None
        if self.enabled:
            expected = self.users.get(username)
            if expected is None or not hmac.compare_digest(expected, password):
                raise flight.FlightUnauthenticatedError("invalid username or password")
        return username, self._issue(username)

    def _bearer(self, token: str) -> str:
        if any(hmac.compare_digest(token, key) for key in self.api_keys):
            return "api-key"
        with self._lock:
            entry = self._tokens.get(token)
            if entry and entry[1] > time.monotonic():
                return entry[0]
        if self.enabled:
            raise flight.FlightUnauthenticatedError("invalid or expired bearer token")
        return "anonymous"

    def _issue(self, username: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: e for t, e in self._tokens.items() if e[1] > now}
            self._tokens[token] = (username, now + TOKEN_TTL_SECONDS)
        return token


class NoOpAuthHandler(flight.ServerAuthHandler):
    def authenticate(self, outgoing, incoming):
        pass

    def is_valid(self, token):
        return b""


class AuthMiddleware(flight.ServerMiddleware):
    def __init__(self, identity: str, token: str | None):
        self.identity = identity
        self.token = token

    def sending_headers(self):
        return {"authorization": f"Bearer {self.token}"} if self.token else {}


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    def __init__(self, policy: AuthPolicy):
        self.policy = policy

    def start_call(self, info, headers):
        identity, token = self.policy.check(headers)
        return AuthMiddleware(identity, token)
