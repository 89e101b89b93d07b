"""The simulated operations plane on one local HTTP port: Grafana's alert list, and the channel
through which the agent's recommendations reach the simulated cluster.

- ``GET /api/alertmanager/grafana/api/v2/alerts``: the firing alerts, shaped like Grafana's
  Alertmanager API (read by flightdeck's ``http:`` connector).
- ``POST /api/recommendations``: ``{"action": "scale_out", "replicas": 3}`` or
  ``{"action": "set_pool_mode", "mode": "transaction"}``; the simulator rolls it out over the
  next simulated minutes (flightdeck itself stays read-only: an operator, here the simulator, acts).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

ALERTS_PATH = "/api/alertmanager/grafana/api/v2/alerts"
RECOMMENDATIONS_PATH = "/api/recommendations"


class ControlServer:
    """Serves ``alerts()`` and hands each recommendation to ``recommend(body) -> answer``."""

    def __init__(self, alerts: Callable[[], list[dict]], recommend: Callable[[dict], dict]):
        handler = _handler(alerts, recommend)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="incident-control", daemon=True)
        self.thread.start()

    @property
    def alerts_url(self) -> str:
        return self.url + ALERTS_PATH

    @property
    def recommendations_url(self) -> str:
        return self.url + RECOMMENDATIONS_PATH

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def _handler(alerts: Callable[[], list[dict]], recommend: Callable[[dict], dict]) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if self.path.split("?")[0] != ALERTS_PATH:
                return self._send(404, {"error": f"no such path: {self.path}"})
            self._send(200, alerts())

        def do_POST(self) -> None:  # noqa: N802
            if self.path != RECOMMENDATIONS_PATH:
                return self._send(404, {"error": f"no such path: {self.path}"})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
            except json.JSONDecodeError:
                return self._send(400, {"error": "the body is not JSON"})
            if not isinstance(body, dict):
                return self._send(400, {"error": "the body must be a JSON object"})
            answer = recommend(body)
            self._send(400 if "error" in answer else 202, answer)

        def _send(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:  # the agent polls often: no line per request
            pass

    return Handler
