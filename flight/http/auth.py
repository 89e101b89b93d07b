"""Who is calling over HTTP: the same API keys and users as Flight SQL, presented as
``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or ``Authorization: Basic``."""
from __future__ import annotations

import base64
import binascii

from starlette.datastructures import Headers

from flightdeck.auth import Credentials
from flightdeck.errors import UNAUTHENTICATED, ServiceError

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="flightdeck"'}


def credentials(headers: Headers) -> Credentials:
    """What the request's headers present (nothing: anonymous, when auth is off)."""
    scheme, _, credential = headers.get("authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        return Credentials(bearer=credential.strip())
    if scheme.lower() == "basic":
        try:
            username, _, password = base64.b64decode(credential.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise ServiceError(UNAUTHENTICATED, "malformed Basic credentials") from None
        return Credentials(username=username, password=password)
    api_key = headers.get("x-api-key")
    if api_key:
        return Credentials(bearer=api_key.strip())
    return Credentials()
