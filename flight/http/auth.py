"""Who is calling over HTTP: the same API keys as Flight SQL, presented as
``Authorization: Bearer KEY`` or ``X-API-Key: KEY``. (Username/password logins issue bearer
tokens on Flight SQL's Handshake; HTTP takes the bearer tokens such a login issued.)"""
from __future__ import annotations

from starlette.datastructures import Headers

from flightdeck.auth import Credentials

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="flightdeck"'}


def credentials(headers: Headers) -> Credentials:
    """What the request's headers present (nothing: anonymous when auth is off, else a 401)."""
    scheme, _, credential = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return Credentials(bearer=credential.strip())
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        return Credentials(bearer=api_key)
    return Credentials()
