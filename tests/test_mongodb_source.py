"""mongodb: real pymongo against a real MongoDB wire-protocol server on loopback (nx-27017); the
commands the connector sends are seen through pymongo's own command monitoring."""
from __future__ import annotations

import datetime as dt
import json
import time

import pyarrow as pa
import pymongo
import pytest
from bson import ObjectId
from pymongo import monitoring

from federation import expr as fx
from federation.catalog import Catalog, DatasetSpec
from federation.engine import QueryEngine

from conftest import serving

UTC = dt.timezone.utc
READS = ("find", "getMore", "aggregate", "listCollections", "listDatabases", "count", "killCursors", "endSessions")


class Commands(monitoring.CommandListener):
    """Every command a client created after ``register`` sends, as the server received it."""

    def __init__(self):
        self.sent: list[dict] = []

    def started(self, event):
        self.sent.append(dict(event.command))

    def succeeded(self, event):
        pass

    def failed(self, event):
        pass

    def clear(self):
        self.sent.clear()

    def __iter__(self):
        return iter(self.sent)


COMMANDS = Commands()
monitoring.register(COMMANDS)


class Mongo:
    def __init__(self, uri: str):
        self.uri = uri
        self.commands = COMMANDS


@pytest.fixture(scope="module")
def mongo(mongo_server):
    admin = pymongo.MongoClient(mongo_server.uri, tz_aware=True)
    tickets = admin["support"]["tickets"]
    tickets.drop()
    tickets.insert_many([
        {"_id": ObjectId(f"{i:024x}"), "number": i, "status": "open" if i % 2 else "closed",
         "customer": {"id": 100 + i, "tier": "pro" if i < 5 else "free"}, "score": i * 0.5,
         "opened": dt.datetime(2026, 11, 20, 14, i, tzinfo=UTC), "tags": ["db", "pool"] if i % 3 == 0 else [],
         "extra": i if i % 2 else f"x{i}"}
        for i in range(1, 11)])
    yield Mongo(mongo_server.uri)
    tickets.drop()
    admin.close()


def _engine(mongo, tmp_path, **params):
    spec = DatasetSpec("tickets", "mongodb:support.tickets", {"mongo_uri": mongo.uri, **params})
    return QueryEngine(Catalog([spec], tmp_path))


def test_sampled_schema_with_flattened_documents(mongo, tmp_path):
    engine = _engine(mongo, tmp_path)
    schema = engine.catalog.datasets["public.tickets"].arrow_schema
    assert dict(zip(schema.names, schema.types)) == {
        "_id": pa.string(), "number": pa.int64(), "status": pa.string(), "customer_id": pa.int64(),
        "customer_tier": pa.string(), "score": pa.float64(), "opened": pa.timestamp("ms", tz="UTC"),
        "tags": pa.list_(pa.string()), "extra": pa.string()}
    assert engine.catalog.datasets["public.tickets"].primary_key == ["_id"]
    row = engine.query("SELECT * FROM tickets WHERE number = 3").read_all().to_pylist()[0]
    assert row["_id"] == f"{3:024x}" and row["customer_tier"] == "pro" and row["tags"] == ["db", "pool"]
    assert row["extra"] == "3"  # mixed types become JSON text


def test_filters_and_projection_become_the_find_command(mongo, tmp_path):
    engine = _engine(mongo, tmp_path)
    mongo.commands.clear()
    result = engine.query("SELECT number, customer_id FROM tickets WHERE status = 'open' "
                          "AND customer_tier = 'pro' AND opened >= TIMESTAMP '2026-11-20T14:02:00Z' "
                          "ORDER BY number").read_all()
    assert result.to_pylist() == [{"number": 3, "customer_id": 103}]
    [find] = [c for c in mongo.commands if "find" in c]
    assert find["filter"]["$and"][0] == {"status": "open"} and {"customer.tier": "pro"} in find["filter"]["$and"]
    assert find["projection"] == {"number": 1, "customer.id": 1, "status": 1, "customer.tier": 1,
                                  "opened": 1, "_id": 0}
    assert engine.catalog.datasets["public.tickets"].connector.stats.rows == 1
    by_id = engine.query(f"SELECT number FROM tickets WHERE _id = '{7:024x}'").read_all()
    assert by_id.column("number").to_pylist() == [7]


def test_fields_named_like_operators_or_paths_are_not_columns(mongo, tmp_path):
    """A top-level '$where' field would become a filter {"$where": <the client's text>}, which
    MongoDB runs as JavaScript; an 'a.b' field a filter on the nested path a.b."""
    admin = pymongo.MongoClient(mongo.uri)
    events = admin["support"]["events"]
    events.drop()
    events.insert_many([{"n": 1, "$where": "note"}, {"n": 2, "a.b": "dotted"}, {"n": 3, "a": {"b": "nested"}}])
    try:
        spec = DatasetSpec("events", "mongodb:support.events", {"mongo_uri": mongo.uri})
        engine = QueryEngine(Catalog([spec], tmp_path))
        assert engine.catalog.datasets["public.events"].arrow_schema.names == ["_id", "n", "a_b"]
        mongo.commands.clear()
        rows = engine.query("SELECT n FROM events WHERE a_b = 'nested'").read_all().to_pylist()
        assert rows == [{"n": 3}]
        assert all("$where" not in json.dumps(c, default=str) for c in mongo.commands)
    finally:
        events.drop()
        admin.close()


def test_a_plain_limit_reaches_the_find_command(mongo, tmp_path):
    engine = _engine(mongo, tmp_path)
    mongo.commands.clear()
    result = engine.query("SELECT number, status FROM tickets LIMIT 3").read_all()
    assert result.num_rows == 3 and result.column_names == ["number", "status"]
    [find] = [c for c in mongo.commands if "find" in c]
    assert find["limit"] == 3  # the server was asked for 3 documents, not all of them
    assert engine.catalog.datasets["public.tickets"].connector.stats.rows == 3


def test_only_reads_are_sent(mongo, tmp_path):
    engine = _engine(mongo, tmp_path)
    mongo.commands.clear()
    engine.query("SELECT count(*) FROM tickets WHERE score > 2").read_all()
    engine.query("SELECT * FROM tickets WHERE extra = '4' LIMIT 2").read_all()
    sent = [next(iter(c)) for c in mongo.commands]
    assert "find" in sent and all(name in READS for name in sent), sent


def test_declared_columns_and_unreachable_servers(mongo, tmp_path):
    engine = _engine(mongo, tmp_path, columns={"number": "int", "customer.tier": "string", "tags": "json"})
    rows = engine.query("SELECT * FROM tickets WHERE number = 6").read_all().to_pylist()
    assert rows == [{"number": 6, "customer_tier": "free", "tags": '["db", "pool"]'}]
    down = Catalog([DatasetSpec("gone", "mongodb:x.y", {"mongo_uri": "mongodb://agent:mongo-pw-1@127.0.0.1:1",
                                                       "connect_timeout": 1})], tmp_path)
    error = down.datasets["public.gone"].error
    assert "127.0.0.1:1" in error and "mongo-pw-1" not in error


def _until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _live_config(mongo, tmp_path) -> dict:
    return {"runtime": {"data_dir": str(tmp_path / "data")},
            "datasets": [{"from": "mongodb:support.live", "name": "live", "params": {"mongo_uri": mongo.uri},
                          "acceleration": {"refresh_mode": "changes", "engine": "duckdb", "mode": "file"}}]}


def _status(runtime) -> dict:
    return runtime.engine.query("SELECT refresh_state, refreshes, changes_applied, last_error "
                                "FROM flightdeck.runtime.datasets WHERE name = 'public.live'").read_all().to_pylist()[0]


def test_change_streams_keep_a_copy_equal_and_resume_after_a_restart(mongo, tmp_path):
    live = pymongo.MongoClient(mongo.uri, tz_aware=True)["support"]["live"]
    live.drop()
    live.insert_many([{"_id": ObjectId(f"{i:024x}"), "number": i, "status": "new"} for i in range(1, 21)])

    def source() -> list[dict]:
        return [{"_id": str(d["_id"]), "number": d["number"], "status": d["status"]}
                for d in live.find({}, sort=[("_id", 1)])]

    def copy(runtime) -> list[dict]:
        return runtime.engine.query("SELECT _id, number, status FROM live ORDER BY _id").read_all().to_pylist()

    with serving(_live_config(mongo, tmp_path), tmp_path) as runtime:
        _until(lambda: _status(runtime)["refresh_state"] == "ready")
        assert copy(runtime) == source()
        live.insert_many([{"_id": ObjectId(f"{i:024x}"), "number": i, "status": "new"} for i in range(21, 31)])
        live.update_many({"number": {"$lte": 5}}, {"$set": {"status": "done"}})
        live.delete_many({"number": {"$in": [7, 8, 22]}})
        live.replace_one({"number": 9}, {"_id": ObjectId(f"{9:024x}"), "number": 9, "status": "replaced"})
        _until(lambda: copy(runtime) == source())
        status = _status(runtime)
        assert status["refreshes"] == 1 and status["changes_applied"] >= 15 and status["last_error"] is None
    # Changes made while flightdeck is down are picked up from the kept copy's stream position.
    live.update_one({"number": 10}, {"$set": {"status": "while down"}})
    live.delete_one({"number": 11})
    with serving(_live_config(mongo, tmp_path), tmp_path) as runtime:
        _until(lambda: _status(runtime)["refresh_state"] == "ready" and copy(runtime) == source())
        assert _status(runtime)["refreshes"] == 0, "resumed from the stream position, not re-snapshotted"
    live.drop()


def test_floats_are_not_compared_by_order_at_the_server_nor_text_under_a_collation(mongo, tmp_path):
    """To the planner NaN is above every number, to MongoDB below every number: a float's order is
    decided here, and so is any comparison with a NaN. So is text's order in a collection with a
    collation of its own. (The wire-protocol peer stores no NaN: the rule is seen in what is sent.)"""
    admin = pymongo.MongoClient(mongo.uri)
    readings = admin["support"]["readings"]
    readings.drop()
    readings.insert_many([{"n": 1, "x": 1.0, "s": "abc"}, {"n": 2, "x": 2.5, "s": "ABC"}, {"n": 3, "x": 0.0, "s": "b"}])
    spec = DatasetSpec("readings", "mongodb:support.readings", {"mongo_uri": mongo.uri})
    engine = QueryEngine(Catalog([spec], tmp_path))
    mongo.commands.clear()
    rows = engine.query("SELECT n FROM readings WHERE x > 0.5 AND n >= 1 ORDER BY n").read_all()
    assert rows.column("n").to_pylist() == [1, 2]
    [found] = [c["filter"] for c in mongo.commands if c.get("find") == "readings"]
    assert found == {"n": {"$gte": 1}}  # the integer's order goes down, the float's stays here
    connector = engine.catalog.datasets["public.readings"].connector
    columns, kinds = {"x": ("x",), "s": ("s",)}, {"x": "float", "s": "string"}

    def sent(op: str, column: str, value, collated: bool = False):
        return connector.match(fx.Compare(op, fx.Column(column), fx.Literal(value)), columns, kinds, collated)
    assert sent("=", "x", 2.5) == {"x": 2.5} and sent("=", "x", float("nan")) is None
    assert connector.match(fx.InList(fx.Column("x"), (float("nan"), 1.0)), columns, kinds) is None
    assert sent("<", "s", "b") == {"s": {"$lt": "b"}} and sent("<", "s", "b", collated=True) is None
    assert sent("=", "s", "b", collated=True) == {"s": "b"}  # looser at most: checked again here
    assert connector._collated("support.readings") is False
    readings.drop()
    admin.close()
