"""elasticsearch: the connector against a real OpenSearch-compatible server (osmem-server) on
loopback, with a recording proxy in front so tests see exactly what was asked of it."""
from __future__ import annotations

import datetime as dt
import re
import time

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from federation.catalog import Catalog, DatasetSpec
from federation.connectors import ConnectorError
from federation.connectors.elasticsearch import ElasticsearchConnector
from federation.engine import QueryEngine

from json_api import JsonHandler, serving_api

UTC = dt.timezone.utc
MAPPING = {"properties": {
    "msg": {"type": "text", "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}},
    "note": {"type": "text"},
    "level": {"type": "keyword"},
    "code": {"type": "integer"},
    "latency": {"type": "double"},
    "ratio": {"type": "float"},
    "seen": {"type": "date"},
    "day": {"type": "date", "format": "yyyy-MM-dd"},
    "ok": {"type": "boolean"},
    "svc": {"properties": {"name": {"type": "keyword"}, "port": {"type": "long"}}},
    "tags": {"type": "keyword"},
}}
SCHEMA = pa.schema([  # the server lists mapped fields by name
    ("_id", pa.string()), ("code", pa.int32()), ("day", pa.timestamp("ms", tz="UTC")),
    ("latency", pa.float64()), ("level", pa.string()), ("msg", pa.string()), ("note", pa.string()),
    ("ok", pa.bool_()), ("ratio", pa.float32()), ("seen", pa.timestamp("ms", tz="UTC")),
    ("svc_name", pa.string()), ("svc_port", pa.int64()), ("tags", pa.list_(pa.string()))])
BIG_ROWS = 12_000


def _document(i: int) -> dict:
    """One log document, with fields missing, null or in another date form on some."""
    seen = dt.datetime(2026, 11, 20, 10, i, tzinfo=UTC)
    document = {
        "_id": f"e{i:03d}", "msg": f"Disk {i % 5} is Full", "note": f"note {i}",
        "level": None if i % 13 == 0 else ["info", "warn", "error"][i % 3],
        "code": 200 + (i % 4) * 100, "latency": None if i % 9 == 0 else i * 1.25, "ratio": i / 8,
        "seen": int(seen.timestamp() * 1000) if i % 10 == 5 else seen.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "day": f"2026-11-{1 + i % 28:02d}", "ok": i % 2 == 0,
        "svc": {"name": ["api", "db", "web"][i % 3], "port": 8000 + i}, "tags": ["a", "b"][: i % 3]}
    for key, every in (("msg", 11), ("code", 7), ("ok", 17), ("svc", 19)):
        if i % every == 0:
            del document[key]
    return document


def _row(document: dict) -> dict:
    """The document as the dataset's row (what DuckDB gets for the comparison)."""
    at = document["seen"]
    return {"_id": document["_id"], "msg": document.get("msg"), "note": document["note"],
            "level": document["level"], "code": document.get("code"), "latency": document["latency"],
            "ratio": document["ratio"],
            "seen": dt.datetime.fromtimestamp(at / 1000, UTC) if isinstance(at, int)
            else dt.datetime.fromisoformat(at.replace("Z", "+00:00")),
            "day": dt.datetime.fromisoformat(document["day"]).replace(tzinfo=UTC), "ok": document.get("ok"),
            "svc_name": document.get("svc", {}).get("name"), "svc_port": document.get("svc", {}).get("port"),
            "tags": document["tags"]}


DOCUMENTS = [_document(i) for i in range(60)]


@pytest.fixture(scope="module")
def peer(search_peer):
    search_peer.load("logs", MAPPING, DOCUMENTS, aliases=("logs_all",))
    search_peer.load("big", {"properties": {"n": {"type": "long"}, "grp": {"type": "keyword"}}},
                     [{"n": i, "grp": f"g{i % 7}"} for i in range(BIG_ROWS)])
    yield search_peer
    search_peer.call("DELETE", "/logs")
    search_peer.call("DELETE", "/big")


@pytest.fixture
def fresh(peer):
    peer.requests.clear()
    yield peer
    peer.required_authorization, peer.refused_paths = set(), ()


def _scans(peer) -> list:
    """The scans' search requests (not the schema's sample of documents)."""
    return [r for r in peer.searches() if r.body and ("query" in r.body or "scroll_id" in r.body)]


def _engine(peer, tmp_path, extra: list[DatasetSpec] = (), **params) -> QueryEngine:
    params = {"elasticsearch_endpoint": peer.url, **params}
    specs = [DatasetSpec("logs", "elasticsearch:logs", params), DatasetSpec("big", "elasticsearch:big", params),
             *extra]
    return QueryEngine(Catalog(specs, tmp_path))


def test_discovery_and_types(fresh, tmp_path):
    engine = _engine(fresh, tmp_path)
    connector = engine.catalog.datasets["public.logs"].connector
    assert {"logs", "logs_all", "big"} <= set(connector.tables())  # indices and their aliases
    assert engine.catalog.datasets["public.logs"].arrow_schema.equals(SCHEMA)
    assert connector.schema("logs_all").equals(SCHEMA)
    assert engine.catalog.datasets["public.logs"].primary_key == ["_id"]
    row = engine.query("SELECT * FROM logs WHERE _id = 'e005'").read_all().to_pylist()[0]
    assert row == _row(DOCUMENTS[5])  # a date given as epoch milliseconds reads like the others
    assert row["tags"] == ["a", "b"] and row["svc_port"] == 8005
    assert [r.method for r in fresh.requests] and all(r.method in ("GET", "POST", "DELETE") for r in fresh.requests)


def test_filters_projection_and_limit_reach_the_server(fresh, tmp_path):
    engine = _engine(fresh, tmp_path)
    result = engine.query("SELECT _id, code FROM logs WHERE level = 'error' AND code >= 400 "
                          "AND svc_name IN ('web', 'db') ORDER BY _id").read_all()
    expected = [{"_id": d["_id"], "code": d["code"]} for d in DOCUMENTS
                if d["level"] == "error" and d.get("code", 0) >= 400 and d.get("svc", {}).get("name") in ("web", "db")]
    assert result.to_pylist() == expected and expected
    [search] = _scans(fresh)
    clauses = search.body["query"]["bool"]["filter"]
    assert {"term": {"level": "error"}} in clauses and {"range": {"code": {"gte": 400}}} in clauses
    assert {"terms": {"svc.name": ["web", "db"]}} in clauses
    assert sorted(search.body["_source"]["includes"]) == ["code", "level", "svc.name"]
    # Every filter went down exactly: the server sent back only the matching documents.
    assert engine.catalog.datasets["public.logs"].connector.stats.rows == len(expected)

    fresh.requests.clear()
    assert engine.query("SELECT n FROM big LIMIT 7").read_all().num_rows == 7
    [limited] = _scans(fresh)
    assert limited.body["size"] == 7 and limited.body["_source"] == {"includes": ["n"]}


def test_text_equality_goes_down_only_through_an_exact_keyword(fresh, tmp_path):
    engine = _engine(fresh, tmp_path)
    rows = engine.query("SELECT _id FROM logs WHERE msg = 'Disk 2 is Full' ORDER BY _id").read_all()
    assert rows.column("_id").to_pylist() == [d["_id"] for d in DOCUMENTS if d.get("msg") == "Disk 2 is Full"]
    assert _scans(fresh)[-1].body["query"]["bool"]["filter"] == [{"term": {"msg.keyword": "Disk 2 is Full"}}]
    fresh.requests.clear()
    # `note` is analyzed text with no keyword: a term would match a token, so it stays local.
    rows = engine.query("SELECT _id FROM logs WHERE note = 'note 5'").read_all()
    assert rows.column("_id").to_pylist() == ["e005"]
    assert _scans(fresh)[-1].body["query"] == {"match_all": {}}
    fresh.requests.clear()
    long_value = "x" * 300  # longer than ignore_above: not indexed, so never asked as a term
    engine.query(f"SELECT _id FROM logs WHERE msg = '{long_value}'").read_all()
    assert "msg.keyword" not in str(_scans(fresh)[-1].body)
    astral = "\U0001F525" * 200  # 200 characters, 400 UTF-16 code units: over ignore_above as well
    engine.query(f"SELECT _id FROM logs WHERE msg = '{astral}'").read_all()
    assert "msg.keyword" not in str(_scans(fresh)[-1].body)


def test_nulls_and_negations_mean_what_sql_means(fresh, tmp_path):
    engine = _engine(fresh, tmp_path)
    missing = engine.query("SELECT _id FROM logs WHERE code IS NULL ORDER BY _id").read_all()
    assert missing.column("_id").to_pylist() == [d["_id"] for d in DOCUMENTS if "code" not in d]
    assert _scans(fresh)[-1].body["query"]["bool"]["filter"] == [
        {"bool": {"must_not": [{"exists": {"field": "code"}}]}}]
    other = engine.query("SELECT _id FROM logs WHERE code <> 300 ORDER BY _id").read_all()
    assert other.column("_id").to_pylist() == [d["_id"] for d in DOCUMENTS if d.get("code") not in (None, 300)]
    fresh.requests.clear()
    negated = engine.query("SELECT _id FROM logs WHERE NOT ok ORDER BY _id").read_all()
    assert negated.column("_id").to_pylist() == [d["_id"] for d in DOCUMENTS if d.get("ok") is False]
    assert _scans(fresh)[-1].body["query"]["bool"]["filter"] == [{"term": {"ok": False}}]


def test_pagination_past_ten_thousand_documents(fresh, tmp_path):
    engine = _engine(fresh, tmp_path)
    total = engine.query("SELECT count(*) AS c, sum(n) AS s, count(DISTINCT n) AS d FROM big").read_all()
    assert total.to_pylist() == [{"c": BIG_ROWS, "s": BIG_ROWS * (BIG_ROWS - 1) // 2, "d": BIG_ROWS}]
    paths = [r.path for r in fresh.requests]
    assert any("/big/_search/point_in_time" in p for p in paths)  # OpenSearch's point in time
    pages = [r.body for r in _scans(fresh) if r.body and "pit" in r.body]
    assert len(pages) >= 3 and all(p["size"] <= 10_000 for p in pages)
    assert sum("search_after" in p for p in pages) == len(pages) - 1
    assert any(r.method == "DELETE" and "point_in_time" in r.path for r in fresh.requests)

    fresh.requests.clear()
    fresh.refused_paths = ("point_in_time", "/_pit")  # a server without point in time: scroll
    filtered = engine.query("SELECT count(*) AS c FROM big WHERE grp = 'g3'").read_all()
    assert filtered.to_pylist() == [{"c": len([i for i in range(BIG_ROWS) if i % 7 == 3])}]
    assert any("scroll=" in r.path for r in fresh.requests)
    assert any(r.path == "/_search/scroll" and r.method == "POST" for r in fresh.requests)


DUCKDB_QUERIES = [
    "SELECT _id, level, code FROM logs WHERE level = 'error' AND code >= 300 ORDER BY _id",
    "SELECT _id FROM logs WHERE level IS NULL ORDER BY _id",
    "SELECT _id, msg FROM logs WHERE msg = 'Disk 2 is Full' OR msg IS NULL ORDER BY _id",
    "SELECT _id FROM logs WHERE seen >= '2026-11-20T10:30:00Z' AND seen < '2026-11-20T10:45:00Z' ORDER BY _id",
    "SELECT _id, day FROM logs WHERE day > '2026-11-20' ORDER BY _id",
    "SELECT level, count(*) AS n, min(code) AS lo, max(latency) AS hi, sum(code) AS total, "
    "count(latency) AS timed FROM logs GROUP BY level ORDER BY level",
    "SELECT _id FROM logs WHERE svc_name IN ('api', 'web') AND ok ORDER BY _id",
    "SELECT _id, tags FROM logs WHERE latency > 30 OR level = 'warn' ORDER BY _id",
    "SELECT count(*) AS n FROM logs WHERE ratio > 2",
    "SELECT _id FROM logs WHERE ok IS NOT NULL AND NOT ok AND svc_port <= 8030 ORDER BY _id",
    "SELECT o.team, count(*) AS n, sum(l.code) AS codes FROM logs l JOIN owners o ON l.svc_name = o.service "
    "GROUP BY o.team ORDER BY o.team",
]


@pytest.mark.parametrize("sql", DUCKDB_QUERIES)
def test_results_equal_duckdb_on_the_same_data(fresh, tmp_path, sql):
    owners = pa.table({"service": ["api", "db", "web"], "team": ["edge", "storage", "edge"]})
    pq.write_table(owners, tmp_path / "owners.parquet")
    engine = _engine(fresh, tmp_path, [DatasetSpec("owners", f"file:{tmp_path / 'owners.parquet'}", {})])
    ours = engine.query(sql).read_all().to_pylist()
    local = duckdb.connect()
    local.execute("SET TimeZone = 'UTC'")
    local.register("logs", pa.Table.from_pylist([_row(d) for d in DOCUMENTS], schema=SCHEMA))
    local.register("owners", owners)
    theirs = local.sql(sql).to_arrow_table().to_pylist()
    assert ours == theirs and ours


def test_auth_headers_and_errors_without_secrets(fresh, tmp_path):
    fresh.required_authorization = {"ApiKey key-secret-7"}
    engine = _engine(fresh, tmp_path, elasticsearch_api_key="key-secret-7")
    assert engine.query("SELECT count(*) AS n FROM logs").read_all().to_pylist() == [{"n": 60}]
    assert {r.authorization for r in fresh.requests} == {"ApiKey key-secret-7"}

    wrong = _engine(fresh, tmp_path, elasticsearch_username="agent", elasticsearch_password="pw-secret-9")
    error = wrong.catalog.datasets["public.logs"].error
    assert "HTTP 401" in error and "security_exception" in error
    assert "pw-secret-9" not in error and "YWdlbnQ6cHctc2VjcmV0LTk" not in error  # nor its base64


def test_unknown_index_and_unreachable_server_are_clear(fresh, tmp_path):
    engine = QueryEngine(Catalog([
        DatasetSpec("gone", "elasticsearch:no_such_index", {"elasticsearch_endpoint": fresh.url}),
        DatasetSpec("down", "elasticsearch:logs", {"elasticsearch_endpoint": "http://127.0.0.1:1",
                                                   "elasticsearch_api_key": "key-secret-8",
                                                   "connect_timeout": 2})], tmp_path))
    gone = engine.catalog.datasets["public.gone"].error
    assert "index_not_found_exception" in gone and "no_such_index" in gone
    down = engine.catalog.datasets["public.down"].error
    assert re.search(r"elasticsearch \(127\.0\.0\.1:1\): cannot reach the server", down)
    assert "key-secret-8" not in down


def test_only_reads_and_searches_are_sent(fresh, tmp_path):
    engine = _engine(fresh, tmp_path)
    engine.query("SELECT count(*) FROM big WHERE n > 100").read_all()
    engine.query("SELECT * FROM logs WHERE level = 'info' LIMIT 3").read_all()
    for request in fresh.requests:
        if request.method == "GET":
            continue
        if request.method == "DELETE":  # closing the point in time or scroll the read opened
            assert request.path in ("/_search/point_in_time", "/_pit", "/_search/scroll")
        else:
            assert request.method == "POST" and re.search(r"/_search(/point_in_time|/scroll)?(\?|$)|/_pit\?",
                                                          request.path), request.path


class _RedirectsAway(JsonHandler):
    """An endpoint answering every call with a redirect to another server."""
    target = ""

    def do_GET(self):
        return self.send_json(302, {}, {"Location": f"{_RedirectsAway.target}/exfil{self.path}"})

    do_POST = do_GET


class _Elsewhere(JsonHandler):
    requests: list[tuple[str, str | None]] = []

    def do_GET(self):
        _Elsewhere.requests.append((self.path, self.headers.get("Authorization")))
        return self.send_json(200, {"idx": {"mappings": {"properties": {"x": {"type": "keyword"}}}}})

    do_POST = do_GET


def test_a_redirect_to_another_origin_is_not_followed_with_the_api_key():
    with serving_api(_Elsewhere) as elsewhere, serving_api(_RedirectsAway) as endpoint:
        _RedirectsAway.target, _Elsewhere.requests = elsewhere, []
        connector = ElasticsearchConnector({"elasticsearch_endpoint": endpoint, "elasticsearch_api_key": "SECRET-KEY",
                                            "schema_sample_size": 0}, None)
        with pytest.raises(ConnectorError, match="another origin") as raised:
            connector.schema("idx")
        assert _Elsewhere.requests == [] and "SECRET-KEY" not in str(raised.value)


class _Unreadable(JsonHandler):
    """Answers a _count the connector cannot decode: an error page not in UTF-8, an error body
    cut short, a success body not in UTF-8, an error body sent a byte at a time."""
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        index = self.path.split("/")[1]
        if index == "latin":
            return self.send_raw(502, "Passerelle défaillante".encode("latin-1"), {"Content-Type": "text/html"})
        if index == "binary":
            return self.send_raw(200, b"\xff\xfe\x00\x01")
        self.send_response(500)
        self.send_header("Content-Length", "100")
        self.end_headers()
        for byte in b'{"error": "x' if index == "cut" else b'{"error": "' + b" " * 80:
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(0.1 if index == "drip" else 0)  # 8 s in all
        self.close_connection = True


@pytest.mark.parametrize("index", ["latin", "binary", "cut", "drip"])
def test_an_answer_that_cannot_be_decoded_is_the_sources_error_within_its_timeout(tmp_path, index):
    """A UnicodeDecodeError or an IncompleteRead escaped the connector: a Flight SQL client asking
    for such an index's rows got an internal error; an error body read a byte at a time held the
    request past the source's timeout."""
    with serving_api(_Unreadable) as endpoint:
        connector = ElasticsearchConnector({"elasticsearch_endpoint": endpoint, "query_timeout": 1}, tmp_path)
        started = time.monotonic()
        with pytest.raises(ConnectorError, match=r"elasticsearch \(127\.0\.0\.1:\d+\): "):
            connector.row_count(index)
        assert time.monotonic() - started < 6
