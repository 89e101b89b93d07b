"""Real servers the document and search connectors are tested against, as processes on loopback:
an OpenSearch-compatible server (osmem-server) behind a recording proxy, and a MongoDB
wire-protocol server (nx-27017)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from osmem_server import OsmemServer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def missing_peer(message: str) -> None:
    """Skip the test without its peer; under CI, fail loudly instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class Recorded:
    method: str
    path: str
    body: dict | list | None
    authorization: str | None


@dataclass
class SearchPeer:
    """osmem-server, and a proxy in front of it that records each request the connector sends,
    can demand credentials, and can refuse paths (a server without point-in-time, say)."""
    server: OsmemServer
    requests: list[Recorded] = field(default_factory=list)
    required_authorization: set[str] = field(default_factory=set)
    refused_paths: tuple[str, ...] = ()
    url: str = ""

    @property
    def direct_url(self) -> str:
        return self.server.url

    def call(self, method: str, path: str, body=None, ndjson: str | None = None):
        """Set up data on the server itself (not through the proxy)."""
        data = ndjson.encode() if ndjson is not None else (None if body is None else json.dumps(body).encode())
        kind = "application/x-ndjson" if ndjson is not None else "application/json"
        request = urllib.request.Request(self.server.url + path, data=data, method=method,
                                         headers={"Content-Type": kind})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read() or b"{}")

    def load(self, index: str, mapping: dict, documents: list[dict], aliases: tuple[str, ...] = ()) -> None:
        self.call("PUT", f"/{index}", {"mappings": mapping, "aliases": {a: {} for a in aliases}})
        for start in range(0, len(documents), 5_000):
            lines = []
            for number, document in enumerate(documents[start:start + 5_000], start):
                lines.append(json.dumps({"index": {"_index": index, "_id": str(document.get("_id", number))}}))
                lines.append(json.dumps({k: v for k, v in document.items() if k != "_id"}))
            answer = self.call("POST", "/_bulk", ndjson="\n".join(lines) + "\n")
            assert not answer.get("errors"), answer
        self.call("POST", f"/{index}/_refresh")

    def searches(self) -> list[Recorded]:
        return [r for r in self.requests if "_search" in r.path]

    def close(self) -> None:
        self.server.close()


def _proxy_handler(peer: SearchPeer) -> type[BaseHTTPRequestHandler]:
    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else None
            authorization = self.headers.get("Authorization")
            peer.requests.append(Recorded(self.command, self.path, json.loads(raw) if raw else None, authorization))
            if peer.required_authorization and authorization not in peer.required_authorization:
                return self._answer(401, {"error": {"root_cause": [{
                    "type": "security_exception",
                    "reason": f"unable to authenticate user for REST request [{self.path}]"}],
                    "type": "security_exception"}, "status": 401})
            if any(part in self.path for part in peer.refused_paths):
                return self._answer(400, {"error": f"no handler found for uri [{self.path}] and method [{self.command}]"})
            request = urllib.request.Request(peer.server.url + self.path, data=raw, method=self.command,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    status, body = response.status, response.read()
            except urllib.error.HTTPError as error:
                status, body = error.code, error.read()
            self._answer(status, body)

        def _answer(self, status: int, body) -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

    return Proxy


@contextmanager
def start_search_peer() -> Iterator[SearchPeer]:
    """osmem-server on a free port (it exits with this process) and the recording proxy."""
    try:
        server = OsmemServer.start(japanese=False, addr="127.0.0.1:0")
    except Exception as error:  # the binary is missing or did not start
        missing_peer(f"osmem-server did not start: {error}")
    peer = SearchPeer(server)
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(peer))
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    peer.url = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        yield peer
    finally:
        proxy.shutdown()
        peer.close()


@dataclass
class MongoServer:
    process: subprocess.Popen
    uri: str

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@contextmanager
def start_mongo_peer() -> Iterator[MongoServer]:
    """nx-27017 (a MongoDB wire-protocol server on SQLite), in memory, on a free port."""
    executable = shutil.which("nx-27017") or str(Path(sys.executable).parent / "nx-27017")
    if not Path(executable).exists():
        missing_peer("nx-27017 is not installed (the test extra): run `make test`")
    port = free_port()
    own = Path(tempfile.mkdtemp(prefix="nx-27017-"))  # its log and pid files default to fixed /tmp paths
    process = subprocess.Popen([executable, "--db", "memory", "--host", "127.0.0.1", "-p", str(port),
                                "--log-file", str(own / "server.log"), "--pid-file", str(own / "server.pid")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if process.poll() is not None:
                missing_peer(f"nx-27017 exited with {process.returncode}")
            time.sleep(0.05)
    server = MongoServer(process, f"mongodb://127.0.0.1:{port}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(own, ignore_errors=True)


FAKESNOW = Path(__file__).resolve().parent.parent / ".venv-fakesnow" / "bin" / "fakesnow"


@contextmanager
def start_fakesnow() -> Iterator[int]:
    """fakesnow's Snowflake HTTP server (from its own virtualenv) on a free port; yields the port."""
    if not FAKESNOW.exists():
        missing_peer("fakesnow is not installed (.venv-fakesnow): run `make test`")
    port = free_port()
    process = subprocess.Popen([str(FAKESNOW), "-s", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    try:
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def fakesnow_admin(port: int, **options: Any):
    """A connection to fakesnow that sets up test data (the connector under test only reads)."""
    import snowflake.connector
    return snowflake.connector.connect(user="admin", password="x", account="fakesnow", host="localhost",
                                       port=port, protocol="http", **options)


def fakesnow_params(port: int, database: str, password: str) -> dict:
    """The snowflake: connector's params for a database on the fakesnow server."""
    return {"snowflake_account": "fakesnow", "snowflake_username": "agent", "snowflake_password": password,
            "snowflake_host": "localhost", "snowflake_port": port, "snowflake_protocol": "http",
            "snowflake_database": database}
