"""`elasticsearch:index` — an Elasticsearch or OpenSearch index (or alias) over its REST API.

The index mapping gives the columns: nested objects become ``parent_child`` columns like the
other document sources, fields that hold arrays (in ``array_fields`` or in a sample of the
documents) become lists. Projection becomes ``_source`` filtering, filters a bool query
(``term``, ``terms``, ``range``, ``exists``, ``ids``) where the index compares exactly as SQL
would, LIMIT the request's ``size``; large reads page with a point in time and
``search_after`` (a scroll where point-in-time is missing). Only GET requests and search
requests are ever sent (plus closing the point in time or scroll a read opened); for a
server-side guarantee, connect as a user whose role only reads.
"""
from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from federation import expr as fx
from federation.connectors.base import Connector, ConnectorError, shown_url
from federation.connectors.same_origin import open_same_origin, read_within

PAGE_ROWS = 5_000  # below the default index.max_result_window (10,000)
SAMPLE_SIZE = 100
KEEP_ALIVE = "2m"
TIMESTAMP = pa.timestamp("ms", tz="UTC")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
STRING_TYPES = {"keyword", "constant_keyword", "wildcard", "text", "match_only_text", "ip",
                "version", "binary", "search_as_you_type"}
ARROW_TYPES = {"long": pa.int64(), "integer": pa.int32(), "short": pa.int16(), "byte": pa.int8(),
               "unsigned_long": pa.uint64(), "double": pa.float64(), "float": pa.float32(),
               "half_float": pa.float32(), "scaled_float": pa.float64(), "boolean": pa.bool_(),
               "date": TIMESTAMP, "date_nanos": TIMESTAMP, "token_count": pa.int32()}
INTEGER_TYPES = {"long", "integer", "short", "byte", "unsigned_long", "token_count"}
OBJECT_TYPES = {"object", None}  # a mapping with ``properties`` and no type is an object
SKIPPED_TYPES = {"alias", "join", "percolator", "rank_feature", "rank_features"}  # nothing in _source to read
_RANGE = {"<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}


@dataclass(frozen=True)
class Field:
    """One column: where its values are in a document and how the index compares them."""
    name: str            # the column name (``parent_child``)
    path: str            # the dotted path in the document
    es_type: str         # the mapping type, or "json" for values kept as JSON text
    arrow: pa.DataType
    term_field: str | None = None   # the indexed field an exact term/range goes to (None: nothing pushed)
    ordered: bool = False           # ranges on ``term_field`` order as SQL does
    ignore_above: int | None = None # longer strings are not indexed: no exists, no long terms
    is_list: bool = False

    @property
    def from_doc_values(self) -> bool:
        """Dates are read as the index parsed them (epoch milliseconds), whatever their format."""
        return self.es_type in ("date", "date_nanos") and not self.is_list


class ElasticsearchConnector(Connector):
    kind = "elasticsearch"
    secret_params = ("elasticsearch_password", "elasticsearch_api_key")

    def __init__(self, params: dict[str, Any], base_dir: Path):
        super().__init__(params, base_dir)
        self.endpoint = str(params.get("elasticsearch_endpoint", "http://127.0.0.1:9200")).rstrip("/")
        if not self.endpoint.startswith(("http://", "https://")):
            raise ConnectorError("elasticsearch: params.elasticsearch_endpoint must be an http(s) URL")
        self.timeout = float(params.get("query_timeout", 300))
        self.connect_timeout = float(params.get("connect_timeout", 10))
        self.page_rows = min(int(params.get("page_size", PAGE_ROWS)), 10_000)
        self.sample_size = int(params.get("schema_sample_size", SAMPLE_SIZE))
        self.array_fields = {str(f) for f in params.get("array_fields") or []}
        self.headers = {"Content-Type": "application/json", "Accept": "application/json",
                        "User-Agent": "flightdeck"}
        self._basic_token = ""
        if params.get("elasticsearch_api_key"):
            self.headers["Authorization"] = f"ApiKey {params['elasticsearch_api_key']}"
        elif params.get("elasticsearch_username"):
            pair = f"{params['elasticsearch_username']}:{params.get('elasticsearch_password', '')}"
            self._basic_token = base64.b64encode(pair.encode()).decode()
            self.headers["Authorization"] = f"Basic {self._basic_token}"
        self._fields: dict[str, list[Field]] = {}
        self._distribution: str | None = None

    def describe(self) -> str:
        return f"elasticsearch ({urllib.parse.urlsplit(shown_url(self.endpoint)).netloc})"

    def mask_secrets(self, text: str) -> str:
        text = super().mask_secrets(text)
        return text.replace(self._basic_token, "***") if self._basic_token else text

    # ---- requests ----

    def request(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        """One REST call: its decoded JSON; a ConnectorError naming the server, never a secret."""
        data = None if body is None else json.dumps(body, default=str).encode()
        request = urllib.request.Request(self.endpoint + path, data=data, headers=self.headers, method=method)
        try:
            with open_same_origin(request, timeout or self.timeout) as response:
                text = read_within(response, timeout or self.timeout)
        except urllib.error.HTTPError as error:
            self.stats.record_error()
            raise ConnectorError(self.mask_secrets(f"{self.describe()}: HTTP {error.code} "
                                                   f"{_error_reason(error, timeout or self.timeout)}")) from None
        except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as error:
            self.stats.record_error()
            reason = getattr(error, "reason", error)
            raise ConnectorError(self.mask_secrets(f"{self.describe()}: cannot reach the server: {reason}")) from None
        try:
            return json.loads(text) if text else {}
        except ValueError:  # not JSON, or not even text
            self.stats.record_error()
            raise ConnectorError(f"{self.describe()}: the response is not JSON") from None

    def search(self, path: str, body: dict) -> dict:
        self.stats.record_request(f"POST {path} {json.dumps(body, default=str)}")
        return self.request("POST", path, body)

    def distribution(self) -> str:
        """"opensearch" or "elasticsearch": their point-in-time APIs differ."""
        if self._distribution is None:
            info = self.request("GET", "/", timeout=self.connect_timeout)
            self._distribution = str((info.get("version") or {}).get("distribution") or "elasticsearch")
        return self._distribution

    # ---- discovery and schema ----

    def tables(self) -> list[str]:
        listing = self.request("GET", "/_aliases", timeout=self.connect_timeout)
        names = set()
        for index, about in listing.items():
            names.add(index)
            names.update((about or {}).get("aliases") or {})
        return sorted(n for n in names if not n.startswith("."))  # dot-prefixed: system indices

    def fields(self, table: str) -> list[Field]:
        if table not in self._fields:
            mappings = self.request("GET", f"/{_quote(table)}/_mapping", timeout=self.connect_timeout)
            properties: dict[str, Any] = {}
            for about in mappings.values():  # an alias or pattern may span several indices
                mapping = about.get("mappings") or {}
                if "properties" not in mapping and len(mapping) == 1:
                    mapping = next(iter(mapping.values()))  # a 6.x mapping type
                _merge_properties(properties, mapping.get("properties") or {})
            lists = self.array_fields | self._sampled_arrays(table)
            fields = [Field("_id", "_id", "_id", pa.string(), "_id")]
            fields += _fields_of(properties, (), lists)
            self._fields[table] = fields
        return self._fields[table]

    def _sampled_arrays(self, table: str) -> set[str]:
        """Dotted paths that hold an array in any of the first documents."""
        if self.sample_size <= 0:
            return set()
        hits = self.search(f"/{_quote(table)}/_search", {"size": self.sample_size})["hits"]["hits"]
        found: set[str] = set()
        for hit in hits:
            _collect_arrays(hit.get("_source") or {}, (), found)
        return found

    def schema(self, table: str) -> pa.Schema:
        return pa.schema([(f.name, f.arrow) for f in self.fields(table)])

    def primary_key(self, table: str) -> list[str]:
        return ["_id"]

    def row_count(self, table: str) -> int | None:
        self.stats.record_request(f"GET /{table}/_count")
        return int(self.request("GET", f"/{_quote(table)}/_count").get("count", 0))

    # ---- filters ----

    def clause(self, expression: fx.Expr, fields: dict[str, Field]) -> dict | None:
        """A planner filter as a query clause matching exactly the same documents, else None."""
        if isinstance(expression, fx.Compare):
            comparison = fx.column_comparison(expression)
            field = fields.get(comparison[0]) if comparison else None
            if field is None or field.term_field is None:
                return None
            _, op, literal = comparison
            value = _indexed_value(field, literal)
            if value is None:
                return None
            if op == "=":
                return _term(field, value)
            if op == "!=":  # SQL's <> is never true for NULL: the field must exist
                return {"bool": {"filter": [{"exists": {"field": field.term_field}}],
                                 "must_not": [_term(field, value)]}} if _has_exists(field) else None
            if not field.ordered:
                return None
            bound = {_RANGE[op]: value}
            if field.from_doc_values:
                bound["format"] = "epoch_millis"
            return {"range": {field.term_field: bound}}
        if isinstance(expression, fx.InList) and isinstance(expression.arg, fx.Column):
            field = fields.get(expression.arg.name)
            if field is None or field.term_field is None or not expression.values:
                return None
            values = [_indexed_value(field, v) for v in expression.values]
            if any(v is None for v in values):
                return None
            if field.term_field == "_id":
                return {"ids": {"values": values}}
            return {"terms": {field.term_field: values}}
        if isinstance(expression, fx.IsNull) and isinstance(expression.arg, fx.Column):
            field = fields.get(expression.arg.name)
            if field is None or field.term_field is None or not _has_exists(field):
                return None
            return {"bool": {"must_not": [{"exists": {"field": field.term_field}}]}}
        if isinstance(expression, fx.Column) or (isinstance(expression, fx.Not)
                                                 and isinstance(expression.arg, fx.Column)):
            # A boolean column as the filter (``WHERE ok``, ``WHERE NOT ok``): NULL keeps neither.
            name = expression.name if isinstance(expression, fx.Column) else expression.arg.name
            field = fields.get(name)
            if field is None or field.es_type != "boolean" or field.term_field is None:
                return None
            return {"term": {field.term_field: isinstance(expression, fx.Column)}}
        if isinstance(expression, fx.Not) and isinstance(expression.arg, fx.IsNull):
            inner = self.clause(expression.arg, fields)
            return None if inner is None else inner["bool"]["must_not"][0]
        if isinstance(expression, (fx.And, fx.Or)):
            parts = [self.clause(a, fields) for a in expression.args]
            if any(p is None for p in parts):
                return None
            if isinstance(expression, fx.And):
                return {"bool": {"filter": parts}}
            return _as_terms(parts) or {"bool": {"should": parts, "minimum_should_match": 1}}
        return None

    def query(self, table: str, filters: list[fx.Expr]) -> tuple[dict, bool]:
        """(the bool query of the filters that go down, whether all of them did)."""
        fields = {f.name: f for f in self.fields(table)}
        clauses = [self.clause(f, fields) for f in filters]
        pushed = [c for c in clauses if c is not None]
        query = {"bool": {"filter": pushed}} if pushed else {"match_all": {}}
        return query, len(pushed) == len(filters)

    def filters_exact(self, table: str, filters: list[fx.Expr]) -> bool:
        return self.query(table, filters)[1]

    # ---- scans ----

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
                  limit: int | None) -> pa.RecordBatchReader:
        fields = {f.name: f for f in self.fields(table)}
        names = list(fields) if columns is None else (columns or ["_id"])
        target = pa.schema([(n, fields[n].arrow) for n in names])
        chosen = [fields[n] for n in names]
        query, exact = self.query(table, filters)
        body: dict[str, Any] = {"query": query, "track_total_hits": False}
        sources = [f.path for f in chosen if f.name != "_id" and not f.from_doc_values]
        body["_source"] = {"includes": sources} if sources else False
        dated = [{"field": f.path, "format": "epoch_millis"} for f in chosen if f.from_doc_values]
        if dated:
            body["docvalue_fields"] = dated
        wanted = limit if exact and limit is not None else None
        pages = self._pages(table, body, wanted)

        def batches() -> Iterator[pa.RecordBatch]:
            for hits in pages:
                if hits:
                    batch = self._batch(hits, chosen, target)
                    self.stats.record_batch(batch, 0.0)
                    yield batch

        return pa.RecordBatchReader.from_batches(target, batches())

    def _pages(self, table: str, body: dict, limit: int | None) -> Iterator[list[dict]]:
        """The hits, page by page: one request when the limit fits a page, else a point in
        time read with search_after (a scroll where the server has no point in time)."""
        path = f"/{_quote(table)}/_search"
        if limit is not None and limit <= self.page_rows:
            yield self.search(path, {**body, "size": limit})["hits"]["hits"]
            return
        try:
            pit = self._open_pit(table)
        except ConnectorError:
            pit = None
        if pit is None:
            yield from self._scrolled(path, body, limit)
        else:
            yield from self._after(pit, body, limit)

    def _open_pit(self, table: str) -> str:
        if self.distribution() == "opensearch":
            answer = self.request("POST", f"/{_quote(table)}/_search/point_in_time?keep_alive={KEEP_ALIVE}")
            return answer["pit_id"]
        return self.request("POST", f"/{_quote(table)}/_pit?keep_alive={KEEP_ALIVE}")["id"]

    def _after(self, pit: str, body: dict, limit: int | None) -> Iterator[list[dict]]:
        remaining = limit
        after = None
        try:
            while remaining is None or remaining > 0:
                size = self.page_rows if remaining is None else min(self.page_rows, remaining)
                page = {**body, "size": size, "pit": {"id": pit, "keep_alive": KEEP_ALIVE},
                        "sort": ["_shard_doc"]}
                if after is not None:
                    page["search_after"] = after
                answer = self.search("/_search", page)
                pit = answer.get("pit_id", pit)
                hits = answer["hits"]["hits"]
                yield hits
                if len(hits) < size:
                    return
                after = hits[-1]["sort"]
                remaining = None if remaining is None else remaining - len(hits)
        finally:
            self._close_quietly(*self._pit_closing(pit))

    def _pit_closing(self, pit: str) -> tuple[str, dict]:
        if self.distribution() == "opensearch":
            return "/_search/point_in_time", {"pit_id": [pit]}
        return "/_pit", {"id": pit}

    def _scrolled(self, path: str, body: dict, limit: int | None) -> Iterator[list[dict]]:
        remaining = limit
        first = {**body, "size": self.page_rows, "sort": ["_doc"]}
        first.pop("track_total_hits", None)  # a scroll refuses to have it turned off
        answer = self.search(f"{path}?scroll={KEEP_ALIVE}", first)
        scroll = answer.get("_scroll_id")
        try:
            while True:
                hits = answer["hits"]["hits"]
                if remaining is not None:
                    hits = hits[:remaining]
                    remaining -= len(hits)
                yield hits
                if not hits or (remaining is not None and remaining <= 0):
                    return
                answer = self.search("/_search/scroll", {"scroll": KEEP_ALIVE, "scroll_id": scroll})
                scroll = answer.get("_scroll_id", scroll)
        finally:
            if scroll:
                self._close_quietly("/_search/scroll", {"scroll_id": [scroll]})

    def _close_quietly(self, path: str, body: dict) -> None:
        """Free a search context early (it would expire on its own after KEEP_ALIVE)."""
        try:
            self.request("DELETE", path, body, timeout=self.connect_timeout)
        except ConnectorError:
            pass

    def _batch(self, hits: list[dict], chosen: list[Field], target: pa.Schema) -> pa.RecordBatch:
        arrays = []
        for field in chosen:
            values = [_value(hit, field) for hit in hits]
            try:
                arrays.append(pa.array(values, type=field.arrow))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as error:
                raise ConnectorError(f"{self.describe()}: column {field.name}: values do not fit "
                                     f"{field.arrow} ({error})") from None
        return pa.RecordBatch.from_arrays(arrays, schema=target)


# ---- mapping to columns ----


def _merge_properties(into: dict, properties: dict) -> None:
    """Several indices' mappings as one; a field typed differently in two becomes JSON text."""
    for name, spec in properties.items():
        if name not in into:
            into[name] = spec
        elif "properties" in spec and "properties" in into[name]:
            merged = dict(into[name]["properties"])
            _merge_properties(merged, spec["properties"])
            into[name] = {**into[name], "properties": merged}
        elif spec.get("type") != into[name].get("type"):
            into[name] = {"type": "json"}


def _fields_of(properties: dict, prefix: tuple[str, ...], lists: set[str]) -> list[Field]:
    fields: list[Field] = []
    for name, spec in properties.items():
        path = prefix + (name,)
        dotted = ".".join(path)
        es_type = spec.get("type")
        if es_type in SKIPPED_TYPES:
            continue
        if "properties" in spec and es_type in OBJECT_TYPES and dotted not in lists:
            fields += _fields_of(spec["properties"], path, lists)
            continue
        fields.append(_field("_".join(path), dotted, es_type, spec, dotted in lists))
    return fields


def _field(name: str, path: str, es_type: str | None, spec: dict, is_list: bool) -> Field:
    if es_type in STRING_TYPES:
        arrow = pa.string()
    elif es_type in ARROW_TYPES:
        arrow = ARROW_TYPES[es_type]
    else:  # objects held in arrays, nested, geo, flattened, vectors...: their JSON text
        return Field(name, path, "json", pa.string())
    if is_list:
        return Field(name, path, es_type, pa.list_(arrow), is_list=True)
    searchable = spec.get("index", True) is not False
    if es_type in ("keyword", "constant_keyword") and searchable and "normalizer" not in spec:
        return Field(name, path, es_type, arrow, path, True, spec.get("ignore_above"))
    if es_type in ("text", "match_only_text"):
        # Analyzed: only an exact keyword sub-field compares as SQL does.
        for sub_name, sub in (spec.get("fields") or {}).items():
            if sub.get("type") == "keyword" and "normalizer" not in sub and sub.get("index", True) is not False:
                return Field(name, path, es_type, arrow, f"{path}.{sub_name}", True, sub.get("ignore_above"))
        return Field(name, path, es_type, arrow)
    if searchable and (es_type in INTEGER_TYPES or es_type in ("double", "date", "date_nanos")):
        return Field(name, path, es_type, arrow, path, True)
    if searchable and es_type == "boolean":
        return Field(name, path, es_type, arrow, path, False)
    return Field(name, path, es_type, arrow)  # float/half_float/scaled_float: indexed rounded


def _collect_arrays(document: dict, prefix: tuple[str, ...], found: set[str]) -> None:
    for key, value in document.items():
        path = prefix + (key,)
        if isinstance(value, list):
            found.add(".".join(path))
        elif isinstance(value, dict):
            _collect_arrays(value, path, found)


def _as_terms(parts: list[dict]) -> dict | None:
    """``a = x OR a = y`` (how the planner hands over a short IN list) as one terms query."""
    fields = {next(iter(p["term"])) for p in parts if "term" in p}
    if len(fields) != 1 or not all("term" in p for p in parts):
        return None
    name = fields.pop()
    return {"terms": {name: [p["term"][name] for p in parts]}}


def _has_exists(field: Field) -> bool:
    """``exists`` means NOT NULL only where every value is indexed (no ignore_above)."""
    return field.ignore_above is None


def _term(field: Field, value: Any) -> dict:
    if field.term_field == "_id":
        return {"ids": {"values": [value]}}
    return {"term": {field.term_field: value}}


def _indexed_value(field: Field, literal: Any) -> Any:
    """The literal as the index holds it, when comparing it there means what SQL means; else None."""
    es_type = field.es_type
    if es_type == "_id" or pa.types.is_string(field.arrow):
        if not isinstance(literal, str):
            return None
        # Such values are not indexed: a term would miss them. Elasticsearch measures them as Java
        # does, in UTF-16 code units (a character beyond the BMP counts twice).
        if field.ignore_above is not None and len(literal.encode("utf-16-le")) // 2 > field.ignore_above:
            return None
        return literal
    if es_type in INTEGER_TYPES:
        return literal if isinstance(literal, int) and not isinstance(literal, bool) else None
    if es_type == "double":
        ok = isinstance(literal, (int, float)) and not isinstance(literal, bool) and literal == literal
        return literal if ok else None
    if es_type == "boolean":
        return literal if isinstance(literal, bool) else None
    if field.from_doc_values and isinstance(literal, dt.datetime):
        moment = literal if literal.tzinfo else literal.replace(tzinfo=dt.timezone.utc)
        if moment.microsecond % 1000:
            return None  # finer than the index's milliseconds
        return int((moment - EPOCH) // dt.timedelta(milliseconds=1))
    return None


# ---- documents to values ----


def _source_value(source: Any, path: str) -> Any:
    """The value at a dotted path; also finds a key written with dots (``{"a.b": 1}``)."""
    if not isinstance(source, dict):
        return None
    if path in source:
        return source[path]
    head, dot, rest = path.partition(".")
    while dot:
        if head in source:
            found = _source_value(source[head], rest)
            if found is not None:
                return found
        more, dot, rest = rest.partition(".")
        head = f"{head}.{more}"
    return None


def _value(hit: dict, field: Field) -> Any:
    if field.name == "_id":
        return hit.get("_id")
    if field.from_doc_values:
        values = (hit.get("fields") or {}).get(field.path) or []
        if not values:
            return None
        return EPOCH + dt.timedelta(milliseconds=int(float(values[0])))
    value = _source_value(hit.get("_source") or {}, field.path)
    if field.es_type == "json":
        return None if value is None else json.dumps(value, default=str)
    if field.is_list:
        if value is None:
            return None
        items = value if isinstance(value, list) else [value]
        return [_scalar(v, field) for v in items]
    if isinstance(value, list):  # the index treats [x] as x, and [] as missing
        if len(value) > 1:
            raise ConnectorError(f"elasticsearch: column {field.name} holds an array; "
                                 f"list it in params.array_fields")
        value = value[0] if value else None
    return _scalar(value, field)


def _scalar(value: Any, field: Field) -> Any:
    if value is None:
        return None
    arrow = field.arrow.value_type if field.is_list else field.arrow
    if pa.types.is_string(arrow):
        return value if isinstance(value, str) else json.dumps(value, default=str)
    if pa.types.is_boolean(arrow) and isinstance(value, str):
        return value == "true"
    if pa.types.is_integer(arrow) and isinstance(value, (str, float)):
        return int(float(value))
    if pa.types.is_floating(arrow) and isinstance(value, str):
        return float(value)
    if pa.types.is_timestamp(arrow) and not isinstance(value, dt.datetime):
        if isinstance(value, (int, float)):
            return EPOCH + dt.timedelta(milliseconds=value)
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return value


def _error_reason(error: urllib.error.HTTPError, seconds: float) -> str:
    """The server's own reason (``index_not_found_exception: no such index [x]``), its body read
    within ``seconds`` like any answer's; the HTTP reason when the body cannot say."""
    try:
        detail = json.loads(read_within(error, seconds) or b"{}").get("error")
    except (ValueError, AttributeError, OSError, http.client.HTTPException):
        detail = None
    if isinstance(detail, dict):
        root = (detail.get("root_cause") or [detail])[0]
        return f"{root.get('type', '')}: {root.get('reason', '')}".strip(": ")
    return str(detail or error.reason)


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe=",*")
