"""Authentication on Flight: Basic (answered with a bearer token) and bearer API keys.

pyarrow answers Handshake with UNIMPLEMENTED unless an auth handler is set, so a no-op
handler is installed and the real check happens in a middleware that sees every call's
headers, Handshake included; the Service decides who the caller is.
"""
from __future__ import annotations

import base64
from typing import Callable

import pyarrow.flight as flight

from flightdeck.auth import Credentials, Principal
from flightdeck.errors import UNAUTHENTICATED, ServiceError
from flightdeck.service import Service


def credentials(headers: dict[str, list]) -> Credentials:
    """What the call's `authorization` header presents."""
    values = headers.get("authorization") or headers.get("Authorization") or []
    header = values[0] if values else ""
    header = header.decode() if isinstance(header, bytes) else header
    scheme, _, credential = header.partition(" ")
    if scheme.lower() == "basic":
        try:
            # Go's Flight client sends base64 without padding.
            padded = credential.strip() + "=" * (-len(credential.strip()) % 4)
            username, _, password = base64.b64decode(padded).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise ServiceError(UNAUTHENTICATED, "malformed Basic credentials") from None
        return Credentials(username=username, password=password)
    if scheme.lower() == "bearer":
        return Credentials(bearer=credential.strip())
    return Credentials()


class NoOpAuthHandler(flight.ServerAuthHandler):
    def authenticate(self, outgoing, incoming):
        pass

    def is_valid(self, token):
        return b""


class AuthMiddleware(flight.ServerMiddleware):
    def __init__(self, principal: Principal):
        self.principal = principal

    def sending_headers(self):
        return {"authorization": f"Bearer {self.principal.token}"} if self.principal.token else {}


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    def __init__(self, service: Service, flight_error: Callable[[Exception], flight.FlightError]):
        self.service = service
        self.flight_error = flight_error

    def start_call(self, info, headers):
        try:
            return AuthMiddleware(self.service.authenticate(credentials(headers)))
        except Exception as error:
            raise self.flight_error(error) from None
