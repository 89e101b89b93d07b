"""The HTTP door as the composition root runs it: uvicorn serving an app (``build_app``'s) from
its own thread on a socket bound up front (so port 0 is known at once); ``shutdown`` stops it
and waits."""
from __future__ import annotations

import logging
import socket
import ssl
import threading
import time

import h11
import uvicorn
from starlette.applications import Starlette

from flightdeck.runtime_config import TlsFiles

log = logging.getLogger("flightdeck.http")
START_TIMEOUT_SECONDS = 30
GRACEFUL_SHUTDOWN_SECONDS = 5
HEAD_SECONDS = 10     # to send a request's head, from the connection or the previous answer
BODY_SECONDS = 60     # to send a request's body
MAX_CONNECTIONS = 1000


class StalledConnections:
    """Closes connections that take too long to send a request: uvicorn has no deadline for a
    request's head or body, so connections opened and left silent, or fed a byte at a time,
    would each hold a file descriptor until the process has none left for any door. A
    connection waiting for its next request's head (h11's IDLE) may stay HEAD_SECONDS, one
    sending a body BODY_SECONDS; while the app answers (a long stream included) nothing applies.
    Past MAX_CONNECTIONS, waiting ones are closed at once, the longest waiting first."""

    def __init__(self) -> None:
        self._since: dict[int, tuple[object, float]] = {}  # connection -> (its state, since when)

    def close(self, connections: set) -> None:
        now = time.monotonic()
        since = {id(c): self._state_since(c, now) for c in connections}
        self._since = since
        waiting = sorted((since[id(c)][1], id(c), c) for c in connections
                         if _waiting_for(c) is not None)
        excess = max(0, len(connections) - MAX_CONNECTIONS)
        for position, (started, _, connection) in enumerate(waiting):
            if position < excess or now - started > _waiting_for(connection):
                connection.transport.close()

    def _state_since(self, connection, now: float) -> tuple[object, float]:
        state = _state_of(connection)
        known = self._since.get(id(connection))
        return known if known is not None and known[0] == state else (state, now)


def _state_of(connection) -> object:
    conn = getattr(connection, "conn", None)  # h11's view of the other side
    return None if conn is None else conn.their_state


def _waiting_for(connection) -> float | None:
    """How long a connection may stay in its state, or None where no deadline applies."""
    state = _state_of(connection)
    if state is h11.IDLE:
        return HEAD_SECONDS
    return BODY_SECONDS if state is h11.SEND_BODY else None


def ssl_options(tls: TlsFiles | None) -> dict:
    """uvicorn's TLS settings: the certificate, and with mutual TLS the CA every client
    certificate must chain to (a client without one is refused in the handshake)."""
    if tls is None:
        return {}
    options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
    if tls.client_ca is not None:
        options.update(ssl_ca_certs=str(tls.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class HttpServer:
    def __init__(self, app: Starlette, host: str, port: int, tls: TlsFiles | None = None):
        self.app = app
        self.tls = tls
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # asyncio turns Nagle off (TCP_NODELAY) only on sockets whose protocol says TCP; without
        # it a keep-alive client's next response waits ~40 ms for the client's delayed ACK.
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit it: without, each small response waited ~40 ms for the
        # client's delayed ACK (Nagle), which an agent's loop of small queries pays every call.
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self._socket.bind((host, port))
        except OSError as error:
            self._socket.close()
            raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
        self.host, self.port = host, self._socket.getsockname()[1]
        self._stalled = StalledConnections()
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="on", http="h11",
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
                                limit_concurrency=MAX_CONNECTIONS, callback_notify=self._close_stalled,
                                timeout_notify=1, **ssl_options(tls))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name="flightdeck-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.shutdown()
                raise RuntimeError(f"the HTTP server did not start on {host}:{self.port}")
            time.sleep(0.01)

    async def _close_stalled(self) -> None:
        """Runs on the server's event loop once a second."""
        self._stalled.close(self._server.server_state.connections)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def shutdown(self) -> None:
        """Stop accepting, let requests in flight finish (streams are cut after a grace period)."""
        self._server.should_exit = True
        self._thread.join(GRACEFUL_SHUTDOWN_SECONDS + 5)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(5)
        self._socket.close()
