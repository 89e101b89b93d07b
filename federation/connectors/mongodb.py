"""`mongodb:db.collection` — MongoDB through pymongo, documents flattened into columns.

Nested documents become ``parent_child`` columns; the columns are declared
(``params.columns``) or sampled from the collection. Filters become the ``find`` filter,
projection its projection, LIMIT its limit (only when every filter went down). Only
``find`` and ``listCollections`` are ever sent, plus a change stream (``aggregate`` with
``$changeStream``) for a ``refresh_mode: changes`` copy; for a server-side guarantee, connect as a
user with the ``read`` role.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import urllib.parse
from typing import Any, Iterator

import pyarrow as pa
import pymongo
from bson import ObjectId
from pymongo.errors import PyMongoError

from federation import expr as fx
from federation.changes import ChangeBatch, ChangeSource, PendingChanges, SourceReset
from federation.connectors.base import Connector, ConnectorError, shown_url
from federation.connectors.typing import flatten_document

log = logging.getLogger("flightdeck.mongodb")

SAMPLE_SIZE = 200
BATCH_ROWS = 10_000
CHANGE_BATCH = 1_000    # change events collapsed into one batch at most
AWAIT_MS = 200          # how long one wait for the next change event blocks (stop is checked between)
ENDS_STREAM = ("drop", "dropDatabase", "rename", "invalidate")
TIMESTAMP = pa.timestamp("ms", tz="UTC")
DECLARED_TYPES = {"string": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(),
                  "timestamp": TIMESTAMP, "objectid": pa.string(), "json": pa.string()}
_OPERATORS = {"!=": "$ne", "<": "$lt", "<=": "$lte", ">": "$gt", ">=": "$gte"}


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dt.datetime):
        return "timestamp"
    if isinstance(value, ObjectId):
        return "objectid"
    if isinstance(value, list):
        kinds = {_kind(v) for v in value if v is not None}
        if not kinds:
            return "list:"  # empty: the element type comes from other documents
        return f"list:{kinds.pop()}" if len(kinds) == 1 and not any(k.startswith("list") for k in kinds) else "json"
    return "json"


def _arrow(kind: str) -> pa.DataType:
    if kind.startswith("list:"):
        return pa.list_(_arrow(kind[5:]))
    return DECLARED_TYPES[kind]


def _merge(kinds: set[str]) -> str:
    if "list:" in kinds and any(k.startswith("list:") and k != "list:" for k in kinds):
        kinds = kinds - {"list:"}
    if kinds == {"list:"}:
        return "list:string"
    if len(kinds) == 1:
        return kinds.pop()
    if kinds == {"int", "float"}:
        return "float"
    return "json"  # mixed: the values as JSON text


class MongoDBConnector(Connector, ChangeSource):
    kind = "mongodb"

    def __init__(self, params: dict[str, Any], base_dir):
        super().__init__(params, base_dir)
        self.uri = str(params.get("mongo_uri", "mongodb://127.0.0.1:27017"))
        self.timeout_ms = int(float(params.get("connect_timeout", 10)) * 1000)
        self.query_timeout_ms = int(float(params.get("query_timeout", 300)) * 1000)
        self.sample_size = int(params.get("schema_sample_size", SAMPLE_SIZE))
        self.declared = params.get("columns")
        self._client: pymongo.MongoClient | None = None
        self._described: dict[str, tuple[pa.Schema, dict[str, tuple], dict[str, str]]] = {}
        self._collations: dict[str, bool] = {}

    def describe(self) -> str:
        return f"mongodb ({urllib.parse.urlsplit(shown_url(self.uri)).netloc})"

    def client(self) -> pymongo.MongoClient:
        if self._client is None:
            self._client = pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=self.timeout_ms,
                                               connectTimeoutMS=self.timeout_ms, tz_aware=True,
                                               appname="flightdeck")
        return self._client

    def _collection(self, table: str):
        database, _, collection = table.partition(".")
        if not collection:
            raise ConnectorError(f"mongodb: name the collection as database.collection, not {table!r}")
        return self.client()[database][collection]

    def _failed(self, error: Exception) -> ConnectorError:
        self.stats.record_error()
        text = str(error).split(", full error")[0].split(" (configured timeouts")[0].split(", Timeout:")[0]
        return ConnectorError(f"{self.describe()}: {text}")

    def tables(self) -> list[str]:
        try:
            return sorted(f"{db}.{name}" for db in self.client().list_database_names()
                          if db not in ("admin", "local", "config")
                          for name in self.client()[db].list_collection_names())
        except PyMongoError as error:
            raise self._failed(error) from None

    # ---- schema ----

    def _describe_table(self, table: str) -> tuple[pa.Schema, dict[str, tuple], dict[str, str]]:
        """(schema, column -> document path, column -> kind)."""
        if table not in self._described:
            kinds = self._declared_kinds() if self.declared else self._sampled_kinds(table)
            if not kinds:
                raise ConnectorError(f"{self.describe()}: {table} has no documents to infer columns "
                                     "from; declare params.columns")
            columns = {"_".join(path): path for path in kinds}
            schema = pa.schema([(name, _arrow(kinds[path])) for name, path in columns.items()])
            self._described[table] = (schema, columns, {n: kinds[p] for n, p in columns.items()})
        return self._described[table]

    def _collated(self, table: str) -> bool:
        """Whether the collection compares text under a collation of its own (unknown: yes)."""
        if table not in self._collations:
            database, _, collection = table.partition(".")
            try:
                found = list(self.client()[database].list_collections(filter={"name": collection}))
            except PyMongoError:
                found = []
            self._collations[table] = not found or found[0].get("options", {}).get("collation") not in (
                None, {"locale": "simple"})
        return self._collations[table]

    def _declared_kinds(self) -> dict[tuple, str]:
        kinds = {}
        for name, kind in dict(self.declared).items():
            if str(kind) not in DECLARED_TYPES:
                raise ConnectorError(f"mongodb: unknown column type {kind!r} (use {', '.join(DECLARED_TYPES)})")
            kinds[tuple(str(name).split("."))] = str(kind)
        return kinds

    def _sampled_kinds(self, table: str) -> dict[tuple, str]:
        seen: dict[tuple, set[str]] = {}
        try:
            for document in self._collection(table).find({}, limit=self.sample_size,
                                                          max_time_ms=self.query_timeout_ms):
                for path, value in flatten_document(document).items():
                    kinds = seen.setdefault(path, set())
                    if value is not None:
                        kinds.add(_kind(value))
        except PyMongoError as error:
            raise self._failed(error) from None
        unaddressable = sorted(".".join(path) for path in seen if not _addressable(path))
        if unaddressable:
            log.warning("%s: %s: fields named with '$' or '.' are not columns (a filter on them would be "
                        "read as an operator or a nested path): %s", self.describe(), table, ", ".join(unaddressable))
        return {path: _merge(kinds) if kinds else "string" for path, kinds in seen.items() if _addressable(path)}

    def schema(self, table: str) -> pa.Schema:
        return self._describe_table(table)[0]

    def primary_key(self, table: str) -> list[str]:
        return ["_id"] if "_id" in self.schema(table).names else []

    # ---- filters ----

    def match(self, expression: fx.Expr, columns: dict[str, tuple], kinds: dict[str, str],
              collated: bool = False) -> dict | None:
        """A planner filter as a find filter, or None where Mongo's semantics could be stricter.
        To the planner NaN is above every number and equal to itself, to Mongo below every number:
        no float is compared by order there, nor with a NaN. Under a collection's collation, text
        is ordered as the collation says: no text is compared by order there either."""
        if isinstance(expression, fx.Compare):
            comparison = fx.column_comparison(expression)
            if comparison is None or comparison[0] not in columns:
                return None
            name, op, literal = comparison
            value = self._bson_value(literal, kinds.get(name))
            ordered = op in ("<", "<=", ">", ">=")
            if value is None or (isinstance(value, float) and value != value) \
                    or (ordered and (kinds.get(name) == "float" or (collated and kinds.get(name) == "string"))):
                return None
            path = ".".join(columns[name])
            return {path: value} if op == "=" else {path: {_OPERATORS[op]: value}}
        if isinstance(expression, (fx.And, fx.Or)):
            parts = [self.match(a, columns, kinds, collated) for a in expression.args]
            if any(p is None for p in parts):
                return None
            return {"$and" if isinstance(expression, fx.And) else "$or": parts}
        if isinstance(expression, fx.IsNull) and isinstance(expression.arg, fx.Column):
            if expression.arg.name in columns:  # null or missing, as a NULL column
                return {".".join(columns[expression.arg.name]): None}
        if isinstance(expression, fx.InList) and isinstance(expression.arg, fx.Column):
            values = [self._bson_value(v, kinds.get(expression.arg.name)) for v in expression.values]
            if expression.arg.name in columns and all(v is not None and v == v for v in values):
                return {".".join(columns[expression.arg.name]): {"$in": values}}
        return None

    @staticmethod
    def _bson_value(value: Any, kind: str | None) -> Any:
        """The literal as stored, for columns of one known kind; None when unsure."""
        if kind == "objectid":
            return ObjectId(value) if isinstance(value, str) and ObjectId.is_valid(value) else None
        if kind == "timestamp" and isinstance(value, dt.datetime):
            return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        if kind in ("int", "float") and isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if kind == "string" and isinstance(value, str):
            return value
        if kind == "bool" and isinstance(value, bool):
            return value
        return None  # mixed (JSON) columns, lists, decimals: applied locally

    # ---- scans ----

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
             limit: int | None) -> pa.RecordBatchReader:
        schema, paths, kinds = self._describe_table(table)
        columns = schema.names if columns is None else (columns or schema.names[:1])
        target = pa.schema([schema.field(c) for c in columns])
        collated = self._collated(table)
        pushed = [m for m in (self.match(f, paths, kinds, collated) for f in filters) if m is not None]
        query = {"$and": pushed} if len(pushed) > 1 else (pushed[0] if pushed else {})
        projection = {".".join(paths[c]): 1 for c in columns}
        if "_id" not in columns:
            projection["_id"] = 0
        exact = len(pushed) == len(filters)
        try:
            cursor = self._collection(table).find(query, projection, limit=(limit or 0) if exact else 0,
                                                  batch_size=BATCH_ROWS, max_time_ms=self.query_timeout_ms)
        except PyMongoError as error:
            raise self._failed(error) from None
        self.stats.record_request(f"find {table} {json.dumps(query, default=str)}")

        def batches():
            rows: list[dict] = []
            try:
                for document in cursor:
                    rows.append(document)
                    if len(rows) == BATCH_ROWS:
                        yield self._batch(rows, target, paths, kinds)
                        rows = []
            except PyMongoError as error:
                raise self._failed(error) from None
            finally:
                cursor.close()
            if rows:
                yield self._batch(rows, target, paths, kinds)

        return pa.RecordBatchReader.from_batches(target, batches())

    def _batch(self, documents: list[dict], target: pa.Schema, paths: dict[str, tuple],
               kinds: dict[str, str]) -> pa.RecordBatch:
        flat = [flatten_document(d) for d in documents]
        arrays = []
        for field in target:
            values = [_column_value(_at(row, paths[field.name]), kinds[field.name]) for row in flat]
            try:
                arrays.append(pa.array(values, type=field.type))
            except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
                raise ConnectorError(f"{self.describe()}: column {field.name}: values do not fit "
                                     f"{field.type} ({error}); declare it as json") from None
        batch = pa.RecordBatch.from_arrays(arrays, schema=target)
        self.stats.record_batch(batch, 0.0)
        return batch

    # ---- change streams (refresh_mode: changes) ----

    def change_key(self, table: str) -> tuple[str, ...]:
        if "_id" not in self.schema(table).names:
            raise ConnectorError(f"{self.describe()}: refresh_mode 'changes' needs the _id column")
        return ("_id",)

    def snapshot(self, table: str) -> tuple[pa.RecordBatchReader, dict[str, Any]]:
        """The stream's position is taken before the read: changes made while it runs are replayed
        after it, and replaying a whole document or a delete again leaves the same state."""
        try:
            with self._collection(table).watch(full_document="updateLookup") as stream:
                token = stream.resume_token
        except PyMongoError as error:
            raise self._failed(error) from None
        return self.scan(table, None, [], None), {"resume_token": dict(token) if token else None}

    def changes(self, table: str, since: dict[str, Any], stop: threading.Event) -> Iterator[ChangeBatch]:
        schema, paths, kinds = self._describe_table(table)
        try:
            with self._collection(table).watch(full_document="updateLookup", max_await_time_ms=AWAIT_MS,
                                               resume_after=since.get("resume_token")) as stream:
                while not stop.is_set():
                    pending, committed = PendingChanges(schema, ("_id",)), None
                    while len(pending) < CHANGE_BATCH and not stop.is_set():
                        event = stream.try_next()
                        if event is None:
                            break
                        self._take(event, pending, schema, paths, kinds)
                        committed = _event_time(event) or committed
                    if len(pending) or pending.skipped:
                        yield pending.batch({"resume_token": dict(stream.resume_token)}, committed)
        except PyMongoError as error:
            raise self._failed(error) from None

    def _take(self, event: dict, pending: PendingChanges, schema: pa.Schema, paths: dict[str, tuple],
              kinds: dict[str, str]) -> None:
        operation = event.get("operationType")
        if operation in ENDS_STREAM:
            raise SourceReset(f"{self.describe()}: the collection saw {operation}")
        if operation == "delete":
            pending.delete({"_id": _column_value(event["documentKey"]["_id"], kinds["_id"])})
        elif operation in ("insert", "update", "replace") and event.get("fullDocument") is not None:
            # The key is the event's documentKey: a server may encode _id inside fullDocument its own
            # way (nx-27017 does for ObjectIds).
            document = {**event["fullDocument"], "_id": event["documentKey"]["_id"]}
            try:
                pending.upsert(self._batch([document], schema, paths, kinds).to_pylist()[0])
            except ConnectorError as error:
                pending.skipped.append(str(error))
        # An update whose document is gone by now is followed by its delete; other events change no rows.

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _event_time(event: dict) -> dt.datetime | None:
    """When the change was committed: ``wallTime`` (MongoDB 6+), else the cluster time."""
    moment = event.get("wallTime") or event.get("clusterTime")
    if isinstance(moment, dt.datetime):
        return moment
    if moment is not None and hasattr(moment, "time"):  # a bson Timestamp: seconds since the epoch
        return dt.datetime.fromtimestamp(moment.time, dt.timezone.utc)
    return None


def _at(row: dict[tuple, Any], path: tuple) -> Any:
    """A flattened document's value at ``path``; some servers (nx-27017) answer a projected
    sub-field under its dotted name (``{"customer.id": 1}``) instead of nesting it."""
    value = row.get(path)
    if value is None and len(path) > 1:
        value = row.get((".".join(path),))
    return value


def _column_value(value: Any, kind: str) -> Any:
    if value is None:
        return None
    if kind == "json":
        return value if isinstance(value, str) else json.dumps(value, default=str)
    if kind == "objectid" or isinstance(value, ObjectId):
        return str(value)
    if kind.startswith("list:") and kind.endswith(("objectid", "json")):
        return [str(v) for v in value]
    return value


def _addressable(path: tuple) -> bool:
    """Whether a field can be named in a find filter and a projection as what it is: a name
    starting with '$' reads as an operator there ($where runs JavaScript), one with a '.' as a
    path into a nested document."""
    return all(isinstance(part, str) and not part.startswith("$") and "." not in part for part in path)
