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
    name: str                    # "anonymous", "api-key", a key's name or the username
    token: str | None = None     # issued by a username/password login: the bearer to use from now on
    may_refresh: bool = True     # may refresh accelerated datasets on demand


@dataclass(frozen=True)
class Key:
    name: str
    secret: str
    may_refresh: bool


OPERATOR = Principal("operator")  # the process itself: startup listings, status


class Authenticator:
    """The configured API keys and users; with neither, every caller is anonymous."""

    def __init__(self, api_keys: list[Key], users: dict[str, tuple[str, bool]]):
        """``users``: username -> (password, may refresh)."""
        self.api_keys = [k for k in api_keys if k.secret]
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
            return self._bearer(credentials.bearer)
        if self.enabled:
            raise ServiceError(UNAUTHENTICATED,
                               "authentication required: send a bearer API key or username and password")
        return Principal(ANONYMOUS)

    def _login(self, username: str, password: str) -> Principal:
        may_refresh = True
        if self.enabled:
            expected, may_refresh = self.users.get(username, (None, False))
            if expected is None or not hmac.compare_digest(expected.encode(), password.encode()):
                raise ServiceError(UNAUTHENTICATED, "invalid username or password")
        principal = Principal(username, None, may_refresh)
        return Principal(username, self._issue(principal), may_refresh)

    def _bearer(self, token: str) -> Principal:
        # Every key is compared (in constant time each), so timing does not tell which matched.
        matches = [key for key in self.api_keys if hmac.compare_digest(token.encode(), key.secret.encode())]
        if matches:
            return Principal(matches[0].name, None, matches[0].may_refresh)
        with self._lock:
            entry = self._tokens.get(token)
            if entry and entry[1] > time.monotonic():
                return entry[0]
        if self.enabled:
            raise ServiceError(UNAUTHENTICATED, "invalid or expired bearer token")
        return Principal(ANONYMOUS)

    def _issue(self, principal: Principal) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            self._tokens = {t: e for t, e in self._tokens.items() if e[1] > now}
            self._tokens[token] = (principal, now + TOKEN_TTL_SECONDS)
        return token
