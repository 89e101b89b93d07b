"""http: against a local JSON API: pagination styles, auth, filter parameters, rate limits."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
import urllib.parse
from typing import Callable, Iterator

import pytest

from federation.catalog import Catalog, DatasetSpec
from federation.connectors import ConnectorError
from federation.engine import QueryEngine

from json_api import JsonHandler, serving_api

INCIDENTS = [{"id": i, "status": "open" if i % 2 else "resolved", "title": f"incident {i}",
              "service": {"name": "checkout" if i < 4 else "payments", "tier": 1},
              "tags": ["db"] if i % 3 == 0 else []} for i in range(1, 8)]


class Api(JsonHandler):
    requests: list[str] = []
    limited_once = {"done": False}

    def do_GET(self):
        Api.requests.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if self.headers.get("Authorization") != "Bearer t0k":
            return self.send_json(401, {"message": "Requires authentication"})
        if url.path == "/incidents":  # Link header pagination, 3 per page, ?status= filter
            rows = [r for r in INCIDENTS if "status" not in query or r["status"] == query["status"]]
            start = int(query.get("offset", 0))
            headers = {}
            if start + 3 < len(rows):
                nxt = urllib.parse.urlencode({**query, "offset": start + 3})
                headers["Link"] = f'<http://{self.headers["Host"]}/incidents?{nxt}>; rel="next"'
            return self.send_json(200, rows[start:start + 3], headers)
        if url.path == "/alerts":  # cursor pagination, records at data.items
            page = int(query.get("cursor", 0))
            items = INCIDENTS[page * 4:(page + 1) * 4]
            meta = {"next_cursor": str(page + 1)} if (page + 1) * 4 < len(INCIDENTS) else {}
            return self.send_json(200, {"data": {"items": items}, "meta": meta})
        if url.path == "/metrics":  # page numbers
            page, size = int(query.get("page", 1)), int(query["per_page"])
            return self.send_json(200, INCIDENTS[(page - 1) * size:page * size])
        if url.path == "/deep":  # an answer nesting deeper than any reader of it should recurse
            return self.send_raw(200, b"[" * 1_500 + b"]" * 1_500)
        if url.path.startswith("/astray/"):  # an API answering with a way off its origin
            return self._astray(url.path.removeprefix("/astray/"))
        if url.path == "/limited":
            if not Api.limited_once["done"]:
                Api.limited_once["done"] = True
                return self.send_json(429, {"message": "slow down"}, {"Retry-After": "1"})
            return self.send_json(200, INCIDENTS[:2])
        return self.send_json(404, {"message": "Not Found"})

    def _astray(self, how: str) -> None:
        page = INCIDENTS[:2]
        if how == "link-file":
            return self.send_json(200, page, {"Link": f'<file://{SECRET_FILE}>; rel="next"'})
        if how == "link-other":
            return self.send_json(200, page, {"Link": f'<{Elsewhere.url}/next>; rel="next"'})
        if how == "field-other":
            return self.send_json(200, {"items": page, "next": f"{Elsewhere.url}/next"})
        if how == "redirect-other":
            return self.send_json(302, {}, {"Location": f"{Elsewhere.url}/moved"})
        return self.send_json(302, {}, {"Location": "/incidents"})  # on its own origin: followed


class Elsewhere(JsonHandler):
    """Another server on another port, never configured: it must never be asked anything."""
    url = ""
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):
        Elsewhere.requests.append((self.path, self.headers.get("Authorization")))
        return self.send_json(200, [{"id": 99, "title": "from elsewhere"}])


SECRET_FILE = "/etc/hostname"


@pytest.fixture(scope="module")
def api():
    with serving_api(Api) as url:
        yield url


AUTH = {"auth_header": "Bearer t0k"}


def _engine(api, tmp_path, path, params):
    return QueryEngine(Catalog([DatasetSpec("api", f"{api}{path}", {**AUTH, **params})], tmp_path))


def test_link_header_pagination_and_flattening(api, tmp_path):
    engine = _engine(api, tmp_path, "/incidents", {})
    rows = engine.query("SELECT id, service_name, tags FROM api ORDER BY id").read_all().to_pylist()
    assert [r["id"] for r in rows] == list(range(1, 8))
    assert rows[0]["service_name"] == "checkout" and rows[2]["tags"] == ["db"]


def test_equality_filters_become_query_parameters(api, tmp_path):
    Api.requests.clear()
    engine = _engine(api, tmp_path, "/incidents", {"filter_params": {"status": "status"}})
    engine.catalog.datasets["public.api"].connector.schema("")  # discovery request
    Api.requests.clear()
    rows = engine.query("SELECT id FROM api WHERE status = 'open' AND id > 2 ORDER BY id").read_all()
    assert rows.column("id").to_pylist() == [3, 5, 7]
    assert Api.requests and all("status=open" in r for r in Api.requests)


def test_cursor_and_page_pagination(api, tmp_path):
    cursor = _engine(api, tmp_path, "/alerts", {"json_path": "data.items",
                                                "pagination": {"type": "cursor", "cursor_field": "meta.next_cursor"}})
    assert cursor.query("SELECT count(*) AS n FROM api").read_all().to_pylist() == [{"n": 7}]
    pages = _engine(api, tmp_path, "/metrics", {"pagination": {"type": "page", "page_param": "page",
                                                               "page_size_param": "per_page", "page_size": 3}})
    assert pages.query("SELECT max(id) AS m, count(*) AS n FROM api").read_all().to_pylist() == [{"m": 7, "n": 7}]


def test_declared_columns(api, tmp_path):
    engine = _engine(api, tmp_path, "/incidents", {"columns": {"id": "int", "title": "string", "service": "json"}})
    row = engine.query("SELECT * FROM api WHERE id = 1").read_all().to_pylist()[0]
    assert row == {"id": 1, "title": "incident 1", "service": '{"name": "checkout", "tier": 1}'}


def test_rate_limit_is_waited_out(api, tmp_path):
    engine = _engine(api, tmp_path, "/limited", {"timeout": 5})
    assert engine.query("SELECT count(*) AS n FROM api").read_all().to_pylist() == [{"n": 2}]


def test_errors_are_clear_and_never_show_the_token(api, tmp_path):
    catalog = Catalog([DatasetSpec("noauth", f"{api}/incidents", {}),
                       DatasetSpec("missing", f"{api}/nope", AUTH),
                       DatasetSpec("down", "http://127.0.0.1:1/x", {**AUTH, "timeout": 2})], tmp_path)
    errors = {name.split(".")[1]: d.error for name, d in catalog.datasets.items()}
    assert "HTTP 401" in errors["noauth"]
    assert "HTTP 404" in errors["missing"]
    assert "cannot reach the API" in errors["down"] and "t0k" not in errors["down"]
    deep = Catalog([DatasetSpec("deep", f"{api}/deep", AUTH)], tmp_path).datasets["public.deep"]
    assert "nests deeper than 64 levels" in deep.error  # a RecursionError had stopped the server's start
    with pytest.raises(ConnectorError, match="not an http"):
        from federation.connectors.http import HttpConnector
        HttpConnector({}, tmp_path, "ftp://example")


def test_tokens_in_the_url_never_show_in_what_the_stack_tells(api, tmp_path):
    """A token may be written in the URL (a user and password, or ?api_key=) or in params.query:
    descriptions, metrics labels and the last request in the system tables show none of it,
    while the values a pushed filter sent stay readable."""
    from federation.connectors.http import HttpConnector
    host = api.partition("://")[2]
    assert HttpConnector({}, tmp_path, f"http://agent:s3cr3t@{host}/x?k=s3cr3t").describe() == f"http ({host}/x)"
    engine = QueryEngine(Catalog([DatasetSpec("api", f"http://{host}/incidents?sig=s3cr3t-sig",
                                              {**AUTH, "query": {"api_key": "s3cr3t/key+1="},
                                               "filter_params": {"status": "status"}})], tmp_path))
    assert engine.query("SELECT id FROM api WHERE status = 'open'").read_all().num_rows == 4
    connector = engine.catalog.datasets["public.api"].connector
    told = [connector.describe(), *map(str, engine.query(
        "SELECT source, last_request FROM flightdeck.runtime.source_stats").read_all().to_pylist()),
            str(engine.query("EXPLAIN SELECT id FROM api WHERE status = 'open'").read_all().to_pylist())]
    assert "s3cr3t" not in " ".join(told) and "s3cr3t".replace("3", "%33") not in " ".join(told)
    assert connector.describe() == f"http ({host}/incidents)"
    assert "status=open" in told[1] and "api_key=***" in told[1] and "sig=***" in told[1]


@pytest.mark.parametrize("how, params", [
    ("link-file", {}), ("link-other", {}), ("field-other", {"json_path": "items", "pagination": {"next_field": "next"}}),
    ("redirect-other", {}),
])
def test_a_redirect_or_next_page_off_the_configured_origin_is_not_followed(api, tmp_path, how, params):
    with serving_api(Elsewhere) as elsewhere:
        Elsewhere.url, Elsewhere.requests = elsewhere, []
        engine = _engine(api, tmp_path, f"/astray/{how}", params)
        with pytest.raises(Exception, match="another origin") as raised:
            engine.query("SELECT id FROM api").read_all()
        assert Elsewhere.requests == [] and "t0k" not in str(raised.value)


def test_a_redirect_on_the_configured_origin_is_followed(api, tmp_path):
    engine = _engine(api, tmp_path, "/astray/redirect-here", {})
    assert engine.query("SELECT count(*) AS n FROM api").read_all().to_pylist() == [{"n": 7}]


@contextlib.contextmanager
def _tcp_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A TCP server on loopback that hands each connection to ``answer``, on a thread of its own."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(connection,), daemon=True).start()
    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        listener.close()


def _answering(reply: bytes) -> contextlib.AbstractContextManager[str]:
    """A TCP server that answers every connection with ``reply`` and hangs up: not HTTP."""
    def answer(connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            connection.sendall(reply)
    return _tcp_server(answer)


@pytest.mark.parametrize("reply", [b"\x00\xffTHIS IS NOT HTTP\r\n\r\n",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n[{\"id\": 1}",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n\xff\xfe\x00\x01"],
                         ids=["not HTTP", "cut short", "not text"])
def test_an_answer_that_cannot_be_read_is_the_sources_failure(tmp_path, reply):
    """http.client's own errors escaped the connector: such an answer at startup stopped the
    server from starting (IncompleteRead), and later it reached the client as an internal error."""
    with _answering(reply) as url:
        catalog = Catalog([DatasetSpec("inferred", f"{url}/items", AUTH),
                           DatasetSpec("declared", f"{url}/items", {**AUTH, "columns": {"id": "int"}})], tmp_path)
        assert catalog.datasets["public.inferred"].state == "unavailable"
        with pytest.raises(Exception) as raised:  # the source's error, as DataFusion's scan of it reports it
            QueryEngine(catalog).query("SELECT id FROM declared").read_all()
    assert "ConnectorError: http (127.0.0.1:" in str(raised.value), raised.value


def _dripping(seconds_per_byte: float) -> contextlib.AbstractContextManager[str]:
    """An HTTP server whose answer comes one byte at a time: each wait is short (well within a
    socket timeout), the whole answer would take minutes."""
    body = b'[{"id": 1}' + b" " * 2000 + b"]"

    def answer(connection: socket.socket) -> None:
        with connection:
            try:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                for byte in body:
                    connection.sendall(bytes([byte]))
                    time.sleep(seconds_per_byte)
            except OSError:
                return
    return _tcp_server(answer)


def test_an_answer_that_drips_ends_at_the_sources_timeout(tmp_path):
    """The socket timeout bounds each wait for a byte, not the whole answer: a server sending a
    byte now and then held the scan, and the query past its deadline, for as long as it liked."""
    with _dripping(0.05) as url:
        catalog = Catalog([DatasetSpec("api", f"{url}/items", {**AUTH, "columns": {"id": "int"}, "timeout": 1})],
                          tmp_path)
        outcome: list = []

        def query() -> None:
            try:
                QueryEngine(catalog).query("SELECT id FROM api").read_all()
            except Exception as error:
                outcome.append(error)

        running = threading.Thread(target=query, daemon=True)
        running.start()
        running.join(30)
        assert not running.is_alive(), "the answer was read for over 30 s"
    assert outcome and "the answer took longer than 1 s" in str(outcome[0]), outcome
