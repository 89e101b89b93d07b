"""github: against a local server that answers with GitHub's documented response shapes."""
from __future__ import annotations

import time
import urllib.parse

import pytest

from federation.catalog import Catalog, DatasetSpec
from federation.engine import QueryEngine

from json_api import JsonHandler, serving_api

ISSUES = [{"number": n, "title": f"Issue {n}", "state": "open" if n % 2 else "closed",
           "user": {"login": "ada"}, "labels": [{"id": 1, "name": "incident"}] if n < 3 else [],
           "comments": n, "created_at": f"2026-11-{n:02d}T10:00:00Z", "updated_at": f"2026-11-{n + 10:02d}T10:00:00Z",
           "closed_at": None if n % 2 else f"2026-11-{n + 1:02d}T10:00:00Z", "body": "text",
           "html_url": f"https://github.example/o/r/issues/{n}", **({"pull_request": {"url": "x"}} if n == 5 else {})}
          for n in range(1, 6)]
COMMITS = [{"sha": f"{i:040x}", "html_url": "u", "author": {"login": "ada"},
            "commit": {"message": f"fix {i}", "author": {"name": "Ada", "email": "ada@example.com", "date": "2026-11-20T14:40:00Z"},
                       "committer": {"name": "Ada", "email": "ada@example.com", "date": "2026-11-20T14:41:00Z"}}}
           for i in range(3)]
TREE = {"sha": "t", "truncated": False, "tree": [
    {"path": "docs", "mode": "040000", "type": "tree", "sha": "d1"},
    {"path": "docs/pooling.md", "mode": "100644", "type": "blob", "sha": "b1", "size": 120},
    {"path": "README.md", "mode": "100644", "type": "blob", "sha": "b2", "size": 40}]}


class GitHub(JsonHandler):
    extra_headers = {"X-RateLimit-Remaining": "4999"}
    seen: list[str] = []
    rate_limited = {"left": 1}

    def do_GET(self):
        GitHub.seen.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        if self.headers.get("Authorization") != "Bearer ghp_test":
            return self.send_json(401, {"message": "Bad credentials"})
        if url.path == "/api/v3/repos/acme/shop/issues":
            if GitHub.rate_limited["left"]:
                GitHub.rate_limited["left"] -= 1
                return self.send_json(403, {"message": "API rate limit exceeded"}, {
                    "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(int(time.time()) + 1)})
            rows = [i for i in ISSUES if query.get("state", "all") in ("all", i["state"])]
            if "since" in query:
                rows = [i for i in rows if i["updated_at"] >= query["since"]]
            page = int(query.get("page", 1))
            headers = {}
            if page * 2 < len(rows):
                nxt = urllib.parse.urlencode({**query, "page": page + 1})
                headers["Link"] = f'<http://{self.headers["Host"]}{url.path}?{nxt}>; rel="next"'
            return self.send_json(200, rows[(page - 1) * 2:page * 2], headers)
        if url.path == "/api/v3/repos/acme/shop/commits":
            return self.send_json(200, COMMITS)
        if url.path == "/api/v3/repos/acme/shop/git/trees/main":
            return self.send_json(200, TREE)
        return self.send_json(404, {"message": "Not Found"})


@pytest.fixture(scope="module")
def github():
    with serving_api(GitHub) as url:
        yield f"{url}/api/v3"


def _engine(github, tmp_path):
    params = {"github_api_base": github, "github_token": "ghp_test", "github_ref": "main", "timeout": 5}
    return QueryEngine(Catalog([DatasetSpec(f"gh_{r}", f"github:acme/shop/{r}", params)
                                for r in ("issues", "commits", "files")], tmp_path))


def test_issues_with_pagination_rate_limit_and_pushed_parameters(github, tmp_path):
    engine = _engine(github, tmp_path)
    rows = engine.query("SELECT number, state, labels, is_pull_request FROM gh_issues ORDER BY number").read_all()
    assert rows.column("number").to_pylist() == [1, 2, 3, 4, 5]  # three pages, after one rate-limit wait
    assert rows.column("labels").to_pylist()[0] == ["incident"]
    assert rows.column("is_pull_request").to_pylist() == [False, False, False, False, True]
    GitHub.seen.clear()
    recent_open = engine.query("SELECT number FROM gh_issues WHERE state = 'open' "
                               "AND updated_at >= TIMESTAMP '2026-11-13T00:00:00Z' ORDER BY number").read_all()
    assert recent_open.column("number").to_pylist() == [3, 5]
    assert all("state=open" in p and "since=2026-11-13T00%3A00%3A00Z" in p for p in GitHub.seen)


def test_commits_and_files(github, tmp_path):
    engine = _engine(github, tmp_path)
    commits = engine.query("SELECT message, author_login, committed_at FROM gh_commits").read_all().to_pylist()
    assert [c["message"] for c in commits] == ["fix 0", "fix 1", "fix 2"]
    files = engine.query("SELECT path, size FROM gh_files ORDER BY path").read_all().to_pylist()
    assert files == [{"path": "README.md", "size": 40}, {"path": "docs/pooling.md", "size": 120}]


def test_bad_token_is_a_clear_error(github, tmp_path):
    catalog = Catalog([DatasetSpec("gh", "github:acme/shop/issues",
                                   {"github_api_base": github, "github_token": "wrong"})], tmp_path)
    dataset = catalog.datasets["public.gh"]
    assert dataset.state == "ready"  # a declared schema: no request at startup
    engine = QueryEngine(catalog)
    with pytest.raises(Exception, match="HTTP 401") as raised:
        engine.query("SELECT * FROM gh").read_all()
    assert "wrong" not in str(raised.value)
