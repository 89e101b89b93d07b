"""`github:owner/repo/issues|pulls|commits|files` — GitHub's REST API (or GitHub Enterprise).

Built on the HTTP connector: Link-header pagination, rate-limit headers honoured, token
auth. ``state = '...'`` and ``updated_at >= ...`` (issues) are sent as API parameters.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa

from federation import expr as fx
from federation.connectors.base import ConnectorError
from federation.connectors.http import HttpConnector

TIMESTAMP = pa.timestamp("s", tz="UTC")


def _when(value: str | None) -> dt.datetime | None:
    return None if not value else dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _login(user: dict | None) -> str | None:
    return (user or {}).get("login")


RESOURCES: dict[str, tuple[str, pa.Schema, Callable[[dict], dict]]] = {
    "issues": ("issues?state=all&per_page=100", pa.schema([
        ("number", pa.int64()), ("title", pa.string()), ("state", pa.string()), ("user_login", pa.string()),
        ("labels", pa.list_(pa.string())), ("comments", pa.int64()), ("created_at", TIMESTAMP),
        ("updated_at", TIMESTAMP), ("closed_at", TIMESTAMP), ("is_pull_request", pa.bool_()),
        ("body", pa.string()), ("html_url", pa.string())]),
        lambda r: {"number": r["number"], "title": r.get("title"), "state": r.get("state"),
                   "user_login": _login(r.get("user")), "labels": [l["name"] for l in r.get("labels") or []],
                   "comments": r.get("comments"), "created_at": _when(r.get("created_at")),
                   "updated_at": _when(r.get("updated_at")), "closed_at": _when(r.get("closed_at")),
                   "is_pull_request": "pull_request" in r, "body": r.get("body"), "html_url": r.get("html_url")}),
    "pulls": ("pulls?state=all&per_page=100", pa.schema([
        ("number", pa.int64()), ("title", pa.string()), ("state", pa.string()), ("user_login", pa.string()),
        ("draft", pa.bool_()), ("head_ref", pa.string()), ("base_ref", pa.string()),
        ("created_at", TIMESTAMP), ("updated_at", TIMESTAMP), ("closed_at", TIMESTAMP),
        ("merged_at", TIMESTAMP), ("body", pa.string()), ("html_url", pa.string())]),
        lambda r: {"number": r["number"], "title": r.get("title"), "state": r.get("state"),
                   "user_login": _login(r.get("user")), "draft": r.get("draft"),
                   "head_ref": (r.get("head") or {}).get("ref"), "base_ref": (r.get("base") or {}).get("ref"),
                   "created_at": _when(r.get("created_at")), "updated_at": _when(r.get("updated_at")),
                   "closed_at": _when(r.get("closed_at")), "merged_at": _when(r.get("merged_at")),
                   "body": r.get("body"), "html_url": r.get("html_url")}),
    "commits": ("commits?per_page=100", pa.schema([
        ("sha", pa.string()), ("message", pa.string()), ("author_name", pa.string()),
        ("author_email", pa.string()), ("author_login", pa.string()), ("authored_at", TIMESTAMP),
        ("committer_name", pa.string()), ("committed_at", TIMESTAMP), ("html_url", pa.string())]),
        lambda r: {"sha": r["sha"], "message": r["commit"]["message"],
                   "author_name": r["commit"]["author"]["name"], "author_email": r["commit"]["author"]["email"],
                   "author_login": _login(r.get("author")), "authored_at": _when(r["commit"]["author"]["date"]),
                   "committer_name": r["commit"]["committer"]["name"],
                   "committed_at": _when(r["commit"]["committer"]["date"]), "html_url": r.get("html_url")}),
    "files": ("git/trees/{ref}?recursive=1", pa.schema([
        ("path", pa.string()), ("size", pa.int64()), ("sha", pa.string()), ("mode", pa.string())]),
        lambda r: {"path": r["path"], "size": r.get("size"), "sha": r["sha"], "mode": r.get("mode")}),
}


class GitHubConnector(HttpConnector):
    kind = "github"

    def __init__(self, params: dict[str, Any], base_dir: Path, location: str):
        owner_repo, _, resource = location.strip("/").rpartition("/")
        if resource not in RESOURCES or owner_repo.count("/") != 1:
            raise ConnectorError(f"github: '{location}' must be owner/repo/ followed by one of "
                                 f"{', '.join(RESOURCES)}")
        self.resource = resource
        path, self.resource_schema, self.transform = RESOURCES[resource]
        api = str(params.get("github_api_base", "https://api.github.com")).rstrip("/")
        path = path.format(ref=params.get("github_ref", "HEAD"))
        http_params = {
            "json_path": "tree" if resource == "files" else None,
            "http_headers": {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"},
            "filter_params": {"state": "state"} if resource in ("issues", "pulls") else {},
            "timeout": params.get("timeout", 30),
            "pagination": {"type": "next_link", "max_pages": params.get("max_pages", 100)},
        }
        if params.get("github_token"):
            http_params["auth_header"] = f"Bearer {params['github_token']}"
        super().__init__(http_params, base_dir, f"{api}/repos/{owner_repo}/{path}")
        self.location = location

    def describe(self) -> str:
        return f"github ({self.location})"

    def schema(self, table: str) -> pa.Schema:
        return self.resource_schema

    def to_table(self, records: list[dict], schema: pa.Schema | None = None) -> pa.Table:
        if self.resource == "files":
            records = [r for r in records if r.get("type") == "blob"]
        try:
            rows = [self.transform(r) for r in records]
        except (KeyError, TypeError) as error:
            raise ConnectorError(f"{self.describe()}: unexpected response shape (missing {error})") from None
        return pa.Table.from_pylist(rows, schema=self.resource_schema)

    def _as_parameter(self, part: fx.Expr) -> tuple[str, str] | None:
        # GitHub's `since` returns issues updated at or after the given time.
        if (self.resource == "issues" and isinstance(part, fx.Compare) and part.op in (">=", ">")
                and part.left == fx.Column("updated_at") and isinstance(part.right, fx.Literal)
                and isinstance(part.right.value, dt.datetime)):
            moment = part.right.value
            moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)
            return "since", moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        return super()._as_parameter(part)
