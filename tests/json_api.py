"""A local JSON API for connector tests: a handler base and a server in a background thread."""
from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator


class JsonHandler(BaseHTTPRequestHandler):
    extra_headers: dict[str, str] = {}  # sent with every response

    def log_message(self, *args):
        pass

    def send_json(self, status: int, body, headers: dict | None = None) -> None:
        self.send_raw(status, json.dumps(body).encode(), headers)

    def send_raw(self, status: int, data: bytes, headers: dict | None = None) -> None:
        """``data`` as the body, JSON or not (an answer json.dumps could not even write)."""
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **self.extra_headers, **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@contextmanager
def serving_api(handler: type[JsonHandler]) -> Iterator[str]:
    """The handler served on loopback; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
