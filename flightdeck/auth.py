"""Who is calling: API keys, usernames and passwords, and the bearer tokens a login issues."""
from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from flightdeck.errors import UNAUTHENTICATED, ServiceError
from flightdeck.grants import FULL, Grant
from flightdeck.limits import QueryLimits

TOKEN_TTL_SECONDS = 24 * 3600
TOKENS_PER_USER = 100     # live bearer tokens one user keeps (a login per call would pile them up)
TOKENS_KEPT = 10_000      # live bearer tokens in all
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
    grant: Grant = FULL          # what it may read
    limits: QueryLimits = QueryLimits()

    def owns(self, other: "Principal") -> bool:
        """Whether ``other`` is the same caller (what one made, e.g. a query handle, is only its)."""
        return self.name == other.name and self.grant == other.grant


@dataclass(frozen=True)
class Key:
    """A configured API key: its secret, or the SHA-256 of it (hex) so the config holds none."""
    name: str
    secret: str | None
    may_refresh: bool
    grant: Grant = FULL
    secret_sha256: str | None = None
    limits: QueryLimits = QueryLimits()

    def matches(self, token: str) -> bool:
        """In constant time for a given length, whichever form the key is stored in."""
        if self.secret_sha256 is not None:
            digest = hashlib.sha256(token.encode()).hexdigest()
            return hmac.compare_digest(digest, self.secret_sha256.lower())
        return hmac.compare_digest(token.encode(), (self.secret or "").encode())


@dataclass(frozen=True)
class User:
    password: str
    may_refresh: bool
    grant: Grant = FULL
    limits: QueryLimits = QueryLimits()


OPERATOR = Principal("operator")  # the process itself: startup listings, status


class Authenticator:
    """The configured API keys and users; with neither, every caller is anonymous."""

    def __init__(self, api_keys: list[Key], users: dict[str, User], limits: QueryLimits = QueryLimits()):
        """``limits``: those of callers when auth is off."""
        self.api_keys = [k for k in api_keys if k.secret or k.secret_sha256]
        self.limits = limits
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
        return Principal(ANONYMOUS, limits=self.limits)

    def _login(self, username: str, password: str) -> Principal:
        user = User(password, True, limits=self.limits)
        if self.enabled:
            user = self.users.get(username)
            if user is None or not hmac.compare_digest(user.password.encode(), password.encode()):
                raise ServiceError(UNAUTHENTICATED, "invalid username or password")
        principal = Principal(username, None, user.may_refresh, user.grant, user.limits)
        return Principal(username, self._issue(principal), user.may_refresh, user.grant, user.limits)

    def _bearer(self, token: str) -> Principal:
        # Every key is compared (in constant time each), so timing does not tell which matched.
        matches = [key for key in self.api_keys if key.matches(token)]
        if matches:
            key = matches[0]
            return Principal(key.name, None, key.may_refresh, key.grant, key.limits)
        with self._lock:
            entry = self._tokens.get(token)
            if entry and entry[1] > time.monotonic():
                return entry[0]
        if self.enabled:
            raise ServiceError(UNAUTHENTICATED, "invalid or expired bearer token")
        return Principal(ANONYMOUS, limits=self.limits)

    def _issue(self, principal: Principal) -> str:
        """A new bearer token for ``principal``. A client logging in on every call must not fill
        the memory: past TOKENS_PER_USER live tokens of one user (TOKENS_KEPT in all) the ones
        closest to expiry are dropped."""
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.monotonic()
            live = sorted(((e[1], t) for t, e in self._tokens.items() if e[1] > now), reverse=True)
            dropped = set([t for _, t in live if self._tokens[t][0].name == principal.name][TOKENS_PER_USER - 1:])
            kept = [t for _, t in live if t not in dropped][:TOKENS_KEPT - 1]
            self._tokens = {t: self._tokens[t] for t in kept}
            self._tokens[token] = (principal, now + TOKEN_TTL_SECONDS)
        return token
