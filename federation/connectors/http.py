"""`http:` / `https:` — records from a JSON HTTP API.

The dataset's `from:` is the URL. Records are found at ``json_path`` in each response;
pages are followed by a ``Link: rel="next"`` header or a next-link field, a cursor, or a
page number; equality filters on columns listed in ``filter_params`` become query-string
parameters (the exact filter is still applied to what comes back). Only GET requests are
ever sent, and only to the configured URL's origin: a redirect or next page elsewhere is not
followed.
"""
from __future__ import annotations

import email.utils
import http.client
import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from federation import expr as fx
from federation.connectors.base import Connector, ConnectorError, shown_url
from federation.connectors.same_origin import open_same_origin, read_within, same_origin
from federation.connectors.typing import (JSON_TYPES, MAX_JSON_DEPTH, flatten_document, json_nests_too_deep,
                                         json_value)

DEFAULT_MAX_PAGES = 100
LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


def lookup(document: Any, path: str | None) -> Any:
    """The value at a dotted path (``data.items``) of a JSON document; None if absent."""
    if not path:
        return document
    for part in path.split("."):
        if not isinstance(document, dict):
            return None
        document = document.get(part)
    return document


class HttpConnector(Connector):
    kind = "http"
    secret_params = ("auth_header",)

    def __init__(self, params: dict[str, Any], base_dir: Path, location: str):
        super().__init__(params, base_dir)
        self.url = location
        if not self.url.startswith(("http://", "https://")):
            raise ConnectorError(f"http: '{location}' is not an http(s) URL")
        self.json_path = params.get("json_path")
        self.headers = {"Accept": "application/json", "User-Agent": "flightdeck",
                        **{str(k): str(v) for k, v in (params.get("http_headers") or {}).items()}}
        if params.get("auth_header"):
            self.headers["Authorization"] = str(params["auth_header"])
        self.pagination = dict(params.get("pagination") or {})
        self.filter_params: dict[str, str] = dict(params.get("filter_params") or {})
        self.query: dict[str, str] = {str(k): str(v) for k, v in (params.get("query") or {}).items()}
        # Query parameters only a pushed filter sets (not the configured ones, which may be tokens).
        configured = set(self.query) | {name for name, _ in urllib.parse.parse_qsl(urllib.parse.urlsplit(self.url).query)}
        self._pushed_parameters = set(self.filter_params.values()) - configured
        self.timeout = float(params.get("timeout", 30))
        self.max_pages = int(self.pagination.get("max_pages", DEFAULT_MAX_PAGES))
        self.declared = self._declared_schema(params.get("columns"))
        self._schema: pa.Schema | None = None

    def describe(self) -> str:
        return f"{self.kind} ({shown_url(self.url).partition('://')[2]})"

    def _recorded(self, url: str) -> str:
        """A request as the system tables show it: the values of the parameters a pushed filter
        set, and every other value (the configured ones may be tokens) as ***."""
        shown = [(name, value if name in self._pushed_parameters else "***")
                 for name, value in urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query)]
        return shown_url(url) + (f"?{urllib.parse.urlencode(shown, safe='*')}" if shown else "")

    @staticmethod
    def _declared_schema(columns: Any) -> pa.Schema | None:
        if not columns:
            return None
        try:
            return pa.schema([(name, JSON_TYPES[str(kind)]) for name, kind in dict(columns).items()])
        except KeyError as error:
            raise ConnectorError(f"http: unknown column type {error} (use {', '.join(JSON_TYPES)})") from None

    def tables(self) -> list[str]:
        return [self.url]

    # ---- requests ----

    def get_json(self, url: str) -> tuple[Any, dict[str, str]]:
        """GET ``url``: its JSON body and headers; waits out a rate limit the server announces."""
        request = urllib.request.Request(url, headers=self.headers, method="GET")
        for attempt in range(3):
            try:
                with open_same_origin(request, self.timeout) as response:
                    headers = {k.lower(): v for k, v in response.headers.items()}
                    body = read_within(response, self.timeout) or b"null"
                if json_nests_too_deep(body):
                    raise ConnectorError(f"{self.describe()}: the response nests deeper than {MAX_JSON_DEPTH} levels")
                return json.loads(body), headers
            except urllib.error.HTTPError as error:
                headers = {k.lower(): v for k, v in error.headers.items()}
                try:
                    wait = self._rate_limit_wait(error.code, headers)
                except ValueError:  # a header it cannot read: no wait is announced
                    wait = None
                if wait is not None and attempt < 2 and wait <= self.timeout:
                    time.sleep(wait)
                    continue
                self.stats.record_error()
                raise ConnectorError(f"{self.describe()}: HTTP {error.code} {self.mask_secrets(str(error.reason))}") \
                    from None
            except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as error:
                self.stats.record_error()
                reason = getattr(error, "reason", None) or f"{type(error).__name__}: {error}"
                raise ConnectorError(f"{self.describe()}: cannot reach the API: {self.clean_error(reason)}") from None
            except ValueError:  # not JSON, or not even text
                self.stats.record_error()
                raise ConnectorError(f"{self.describe()}: the response is not JSON") from None
        raise ConnectorError(f"{self.describe()}: rate limited")

    @staticmethod
    def _rate_limit_wait(status: int, headers: dict[str, str]) -> float | None:
        if status not in (403, 429):
            return None
        if "retry-after" in headers:
            value = headers["retry-after"]
            if value.isdigit():
                return float(value)
            moment = email.utils.parsedate_to_datetime(value)
            return max(0.0, moment.timestamp() - time.time())
        if headers.get("x-ratelimit-remaining") == "0" and "x-ratelimit-reset" in headers:
            return max(0.0, float(headers["x-ratelimit-reset"]) - time.time())
        return None

    def _first_url(self, filters: list[fx.Expr]) -> str:
        query = dict(self.query)
        for part in filters:
            pushed = self._as_parameter(part)
            if pushed:
                query[pushed[0]] = pushed[1]
        parsed = urllib.parse.urlsplit(self.url)
        merged = dict(urllib.parse.parse_qsl(parsed.query))
        merged.update(query)
        page = self.pagination
        if page.get("type") == "page" and page.get("page_size_param"):
            merged[page["page_size_param"]] = str(page.get("page_size", 100))
        return urllib.parse.urlunsplit(parsed._replace(query=urllib.parse.urlencode(merged)))

    def _as_parameter(self, part: fx.Expr) -> tuple[str, str] | None:
        if (isinstance(part, fx.Compare) and part.op == "=" and isinstance(part.left, fx.Column)
                and isinstance(part.right, fx.Literal) and part.left.name in self.filter_params):
            value = part.right.value
            if isinstance(value, bool):
                value = str(value).lower()
            return self.filter_params[part.left.name], str(value)
        return None

    def pages(self, filters: list[fx.Expr]) -> Iterator[list[dict]]:
        url: str | None = self._first_url(filters)
        kind = self.pagination.get("type")
        number = int(self.pagination.get("first_page", 1))
        for _ in range(self.max_pages):
            self.stats.record_request(f"GET {self._recorded(url)}")
            body, headers = self.get_json(url)
            records = lookup(body, self.json_path)
            if records is None:
                records = []
            if not isinstance(records, list):
                raise ConnectorError(f"{self.describe()}: no list of records at json_path "
                                     f"'{self.json_path or '(root)'}'")
            yield records
            url = self._next_url(kind, url, body, headers, records, number)
            if url and not same_origin(url, self.url):
                elsewhere = urllib.parse.urlsplit(url)
                raise ConnectorError(f"{self.describe()}: the next page is on another origin "
                                     f"({elsewhere.scheme}://{elsewhere.netloc}): not followed")
            number += 1
            if not url or not records:
                return

    def _next_url(self, kind: str | None, url: str, body: Any, headers: dict[str, str],
                  records: list, number: int) -> str | None:
        if kind in (None, "next_link"):
            field = self.pagination.get("next_field")
            if field:
                target = lookup(body, field)
                return urllib.parse.urljoin(url, target) if target else None
            match = LINK_NEXT.search(headers.get("link", ""))
            return match.group(1) if match else None
        if kind == "cursor":
            cursor = lookup(body, self.pagination.get("cursor_field", "next_cursor"))
            return self._with_param(url, self.pagination.get("cursor_param", "cursor"), cursor) if cursor else None
        if kind == "page":
            size = int(self.pagination.get("page_size", 100))
            if len(records) < size:
                return None
            return self._with_param(url, self.pagination.get("page_param", "page"), number + 1)
        raise ConnectorError(f"http: pagination type must be next_link, cursor or page, not {kind!r}")

    @staticmethod
    def _with_param(url: str, name: str, value: Any) -> str:
        parsed = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        query[name] = str(value)
        return urllib.parse.urlunsplit(parsed._replace(query=urllib.parse.urlencode(query)))

    # ---- schema and scans ----

    def schema(self, table: str) -> pa.Schema:
        if self.declared is not None:
            return self.declared
        if self._schema is None:
            first = next(self.pages([]), [])
            if not first:
                raise ConnectorError(f"{self.describe()}: no records to infer columns from; "
                                     "declare params.columns")
            self._schema = self.to_table(first).schema
        return self._schema

    def to_table(self, records: list[dict], schema: pa.Schema | None = None) -> pa.Table:
        flat_rows = [self.flatten(r) for r in records]
        try:
            if schema is None:
                return pa.Table.from_pylist(flat_rows)
            # A declared column takes the record's own field (a nested object as JSON), else a
            # flattened one (``parent_child``).
            return pa.Table.from_pylist([
                {n: json_value(record.get(n, flat.get(n)) if isinstance(record, dict) else flat.get(n),
                               schema.field(n).type) for n in schema.names}
                for record, flat in zip(records, flat_rows)], schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
            raise ConnectorError(f"{self.describe()}: records do not fit the columns: {error}") from None

    def flatten(self, record: Any) -> dict:
        """Nested objects become ``parent_child`` columns; lists stay lists."""
        if not isinstance(record, dict):
            return {"value": record}
        return {"_".join(path): value for path, value in flatten_document(record).items()}

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
             limit: int | None) -> pa.RecordBatchReader:
        schema = self.schema(table)
        columns = schema.names if columns is None else (columns or schema.names[:1])
        target = pa.schema([schema.field(c) for c in columns])

        def batches():
            remaining = None if filters else limit  # filters run after: a limit first would lose rows
            for records in self.pages(filters):
                batch = self.to_table(records, schema).select(columns)
                if remaining is not None:
                    batch = batch.slice(0, remaining)
                    remaining -= batch.num_rows
                for piece in batch.to_batches():
                    self.stats.record_batch(piece, 0.0)
                    yield piece
                if remaining is not None and remaining <= 0:
                    return

        return pa.RecordBatchReader.from_batches(target, batches())

