"""Who is calling: API keys, usernames and passwords, and the bearer tokens a login issues."""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from flightdeck.errors import UNAUTHENTICATED, ServiceError

TOKEN_TTL_SECONDS = 24 * 3600
ANONYMOUS = "anonymous"
API_KEY = "api-key"


@dataclass(frozen=True)
class Credentials:
    """What a caller presented; a door fills in what its protocol carries."""
    bearer: str | None = None    # an API key, or a token issued by a username/password login
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""
    name: str                    # "anonymous", "api-key" or the username
    token: str | None = None     # issued by a username/password login: the bearer to use from now on


OPERATOR = Principal("operator")  # the process itself: startup listings, status


class Authenticator:
    """The configured API keys and users; with neither, every caller is anonymous."""

    def __init__(self, api_keys: list[str], users: dict[str, str]):
        self.api_keys = [k for k in api_keys if k]
        self.users = users
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self.api_keys or self.users)

    def authenticate(self, credentials: Credentials) -> Principal:
        if credentials.username is not None:
            return self._login(credentials.username, credentials.password or "")
        if credentials.bearer is not None:
            return Principal(self._bearer(credentials.bearer))
        if self.enabled:
            raise ServiceError(UNAUTHENTICATED,
                               "authentication required: send a bearer API key or username and password")
        return Principal(ANONYMOUS)

    def _login(self, username: str, password: str) -> Principal:
        if self.enabled:
            expected = self.users.get(username)
            if expected is None or not hmac.compare_digest(expected, password):
                raise ServiceError(UNAUTHENTICATED, "invalid username or password")
        return Principal(username, self._issue(username))

    def _bearer(self, token: str) -> str:
        if any(hmac.compare_digest(token, key) for key in self.api_keys):
            return API_KEY
        with self._lock:
            entry = self._tokens.get(token)
            if entry and entry[1] > time.monotonic():
                return entry[0]
        if self.enabled:
            raise ServiceError(UNAUTHENTICATED, "invalid or expired bearer token")
        return ANONYMOUS

    def _issue(self, username: str) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: e for t, e in self._tokens.items() if e[1] > now}
            self._tokens[token] = (username, now + TOKEN_TTL_SECONDS)
        return token
