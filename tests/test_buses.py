"""Message buses as append-only accelerated datasets (refresh_mode changes), against real
brokers: a Kafka-protocol broker (Tansu) started here, the machine's NATS JetStream and
Mosquitto. Each test publishes with the bus's own client and reads through flightdeck."""
from __future__ import annotations

import datetime as dt
import json
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import adbc_driver_flightsql.dbapi as flightsql
import pyarrow as pa
import pytest
from confluent_kafka import Consumer, TopicPartition

from federation.catalog_view import HIDDEN_ERROR
from federation.connectors.base import ConnectorError
from federation.connectors.mqtt import MqttConnector
from federation.connectors.nats import NatsConnector
from flightdeck.auth import Credentials

from buses import events, jetstream, kafka, mosquitto  # noqa: F401  (fixtures)
from conftest import ServerProcess, serving, write_config

KINDS = ["kafka", "nats", "mqtt"]
VISIBLE_WITHIN_SECONDS = 2.0
OPERATOR_KEY, RESTRICTED_KEY = "operator-key-0123456789", "restricted-key-0123456789"
MQTT_COLUMNS = {"id": "int", "user.name": "string", "user.address.city": "string", "amount": "float"}


@dataclass
class Bus:
    """One fresh topic (stream, filter) of one bus, and how to publish to it."""
    kind: str
    name: str
    source: str
    params: dict
    publish: Callable[[list[bytes]], None]


@pytest.fixture(params=KINDS)
def bus(request) -> Bus:
    name = f"fd{uuid.uuid4().hex[:10]}"
    if request.param == "kafka":
        broker = request.getfixturevalue("kafka")
        broker.create_topic(name, partitions=2)
        yield Bus("kafka", name, f"kafka:{name}", {"bootstrap_servers": broker.servers},
                  lambda payloads: broker.publish(name, payloads, [f"k{i}" for i in range(len(payloads))],
                                                  [i % 2 for i in range(len(payloads))]))
    elif request.param == "nats":
        streams = request.getfixturevalue("jetstream")
        with streams.fresh_stream() as stream:
            yield Bus("nats", stream, f"nats:{stream}", {},
                      lambda payloads: streams.publish(f"{stream}.orders", payloads))
    else:
        publisher = request.getfixturevalue("mosquitto")
        params = {"columns": MQTT_COLUMNS, "client_id": f"flightdeck-test-{name}"}
        yield Bus("mqtt", name, f"mqtt:{name}/#", params,
                  lambda payloads: publisher.publish(f"{name}/orders", payloads))
        MqttConnector(params, Path(".")).cleanup(f"{name}/#")


def _config(tmp_path: Path, bus: Bus, mode: str = "memory", params: dict | None = None,
            **acceleration) -> dict:
    return {"runtime": {"data_dir": str(tmp_path / "data")},
            "datasets": [{"from": bus.source, "name": "events", "params": {**bus.params, **(params or {})},
                          "time_column": "_timestamp" if bus.kind != "mqtt" else "_received",
                          "acceleration": {"engine": "duckdb", "mode": mode, "refresh_mode": "changes",
                                           **acceleration}}]}


def _rows(runtime, sql: str) -> list[dict]:
    return runtime.engine.query(sql).read_all().to_pylist()


def _status(runtime) -> dict:
    return _rows(runtime, "SELECT * FROM flightdeck.runtime.datasets WHERE name = 'public.events'")[0]


def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g} s: {what}"
        time.sleep(0.02)


def _ready(runtime) -> None:
    refresher = runtime.accelerator.refresher("public.events")
    assert refresher.loaded.wait(60), refresher.status.last_error
    _until(lambda: _status(runtime)["position"] is not None, 30, "the stream position is known")


def _ids(runtime) -> list[int]:
    return [row["id"] for row in _rows(runtime, "SELECT id FROM events ORDER BY id")]


def test_messages_published_while_flightdeck_runs_are_queryable_within_2_s(tmp_path, bus):
    first = 0 if bus.kind == "mqtt" else 5  # MQTT keeps no history: the copy starts empty
    bus.publish(events(0, first))
    with serving(_config(tmp_path, bus), tmp_path) as runtime:
        _ready(runtime)
        assert _ids(runtime) == list(range(first))
        for burst in range(3):
            start = first + burst * 20
            bus.publish(events(start, 20))
            _until(lambda: len(_ids(runtime)) == start + 20, VISIBLE_WITHIN_SECONDS,
                   f"burst {burst} queryable")
        assert _ids(runtime) == list(range(first + 60))
        # the status is counted just after each batch commits
        _until(lambda: _status(runtime)["changes_applied"] == 60, 5, "the status counts every message")
        status = _status(runtime)
        assert status["state"] == "ready" and status["refresh_mode"] == "changes"
        assert status["changes_applied"] == 60 and status["lag_p99_ms"] is not None


def test_nested_json_is_flattened_and_metadata_columns_are_right(tmp_path, bus):
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    if bus.kind != "mqtt":
        bus.publish(events(0, 4))  # the columns are inferred from these
    with serving(_config(tmp_path, bus), tmp_path) as runtime:
        _ready(runtime)
        if bus.kind == "mqtt":
            bus.publish(events(0, 4))
        _until(lambda: len(_ids(runtime)) == 4, 10, "four messages copied")
        rows = _rows(runtime, "SELECT * FROM events ORDER BY id")
    after = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)
    assert [(r["user_name"], r["user_address_city"], r["amount"]) for r in rows] == \
        [(f"user{i}", f"c{i % 3}", i * 0.5) for i in range(4)]
    if bus.kind == "kafka":  # published round-robin to two partitions, keyed k0..k3
        assert [(r["_topic"], r["_partition"], r["_offset"], r["_key"]) for r in rows] == \
            [(bus.name, 0, 0, "k0"), (bus.name, 1, 0, "k1"), (bus.name, 0, 1, "k2"), (bus.name, 1, 1, "k3")]
    elif bus.kind == "nats":
        assert [(r["_subject"], r["_sequence"]) for r in rows] == [(f"{bus.name}.orders", i) for i in range(1, 5)]
    else:
        assert [(r["_topic"], r["_qos"], r["_retain"]) for r in rows] == [(f"{bus.name}/orders", 1, False)] * 4
    time_column = "_received" if bus.kind == "mqtt" else "_timestamp"
    assert all(before <= r[time_column] <= after for r in rows)


def test_malformed_messages_are_counted_and_skipped_with_a_reason(tmp_path, bus):
    config = _config(tmp_path, bus, params={"columns": MQTT_COLUMNS})
    config["runtime"]["auth"] = {"api_keys": [OPERATOR_KEY, {"name": "hidden-amounts", "key": RESTRICTED_KEY,
                                                             "columns": {"events": ["id"]}}]}
    with serving(config, tmp_path) as runtime:
        _ready(runtime)
        deep = b'{"id": 8, "x": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # overflowed Arrow's reader: the process ended
        bus.publish(events(0, 2) + [b"{not json", b"[1, 2]", json.dumps({"id": "seven"}).encode(), deep]
                    + events(2, 2))
        _until(lambda: len(_ids(runtime)) == 4, 10, "the good messages copied")
        _until(lambda: _status(runtime)["skipped"] == 4, 5, "four messages skipped")
        status = _status(runtime)
        assert status["state"] == "ready"
        reasons = ("not JSON", "not a JSON object: list", "does not fit the columns", "nests deeper than 64 levels")
        assert any(reason in status["last_skip_reason"] for reason in reasons), status["last_skip_reason"]
        # a reason may quote a message's values: only keys that see every column read it
        restricted = runtime.service.authenticate(Credentials(bearer=RESTRICTED_KEY))
        seen = runtime.service.query(restricted, "SELECT last_skip_reason FROM flightdeck.runtime.datasets")
        assert seen.read_all().to_pylist() == [{"last_skip_reason": HIDDEN_ERROR}]
        bus.publish(events(4, 1))  # the stream goes on
        _until(lambda: _ids(runtime) == [0, 1, 2, 3, 4], 10, "a later message copied")


def _server(config: Path) -> ServerProcess:
    return ServerProcess(["run", "-c", str(config), "--flight-port", "0"])


def _query(url: str, sql: str) -> list[tuple]:
    with flightsql.connect(url, autocommit=True) as conn, conn.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def test_a_killed_flightdeck_resumes_from_its_stored_position(tmp_path, bus):
    if bus.kind != "mqtt":
        bus.publish(events(0, 50))
    else:
        bus.params["dedupe_key"] = "id"  # QoS 1 is at-least-once: exactly-once needs a key
    config = write_config(tmp_path / "flightdeck.yaml", _config(tmp_path, bus, mode="file"))
    server = _server(config)
    publisher = None
    try:
        _until(lambda: _query(server.url, "SELECT position FROM flightdeck.runtime.datasets")[0][0] is not None,
               60, "following the stream")
        if bus.kind == "mqtt":
            bus.publish(events(0, 50))
        _until(lambda: _query(server.url, "SELECT count(*) FROM events")[0][0] == 50, 20, "50 copied")
        # Killed while messages keep arriving: some batches applied, some not, one perhaps half read.
        publisher = threading.Thread(target=lambda: [bus.publish(events(50 + i * 10, 10)) for i in range(20)])
        publisher.start()
        _until(lambda: _query(server.url, "SELECT count(*) FROM events")[0][0] > 60, 20, "more copied")
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        if publisher is not None:
            publisher.join(60)
    bus.publish(events(250, 50))  # while flightdeck is down
    restarted = _server(config)
    try:
        bus.publish(events(300, 50))  # after the restart
        _until(lambda: _query(restarted.url, "SELECT count(*) FROM events")[0][0] >= 350, 20, "all copied")
        time.sleep(0.5)  # anything duplicated would arrive with the rest
        ids = [row[0] for row in _query(restarted.url, "SELECT id FROM events ORDER BY id")]
        assert ids == list(range(350)), "no message lost, none twice"
        snapshots = _query(restarted.url, "SELECT refreshes FROM flightdeck.runtime.datasets")[0][0]
        assert snapshots == 0, "the kept copy resumed from its position; it was not read again"
    finally:
        restarted.stop()


def test_retention_deletes_old_messages_from_the_copy_only(tmp_path, kafka):
    topic = f"fd{uuid.uuid4().hex[:10]}"
    kafka.create_topic(topic)
    old = int((time.time() - 3 * 86400) * 1000)
    for index, payload in enumerate(events(0, 10)):
        kafka.producer.produce(topic, payload, timestamp=old if index < 4 else 0)
    kafka.producer.flush(30)
    bus = Bus("kafka", topic, f"kafka:{topic}", {"bootstrap_servers": kafka.servers}, lambda p: None)
    config = _config(tmp_path, bus, retention_period="1d", retention_check_interval="1s")
    with serving(config, tmp_path) as runtime:
        _ready(runtime)
        _until(lambda: _ids(runtime) == list(range(4, 10)), 20, "messages older than a day deleted")
    consumer = Consumer({"bootstrap.servers": kafka.servers, "group.id": "probe"})
    try:
        low, _ = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        assert low == 0, "the topic still holds every message"
        committed = consumer.committed([TopicPartition(topic, 0)], timeout=10)[0].offset
        assert committed < 0, "flightdeck committed no offset to the broker"
    finally:
        consumer.close()


def test_nats_copy_never_removes_messages_from_the_stream(tmp_path, jetstream):
    with jetstream.fresh_stream() as name:
        jetstream.publish(f"{name}.a", events(0, 30))
        bus = Bus("nats", name, f"nats:{name}", {}, lambda p: None)
        with serving(_config(tmp_path, bus), tmp_path) as runtime:
            _ready(runtime)
            _until(lambda: len(_ids(runtime)) == 30, 10, "copied")
            assert jetstream.message_count(name) == 30


def test_a_work_queue_stream_is_refused_since_reading_would_delete(jetstream):
    from nats.js.api import RetentionPolicy
    with jetstream.fresh_stream(retention=RetentionPolicy.WORK_QUEUE) as name:
        with pytest.raises(ConnectorError, match="workqueue retention: reading it would delete messages"):
            NatsConnector({"columns": {"id": "int"}}, Path(".")).snapshot(name)


def test_declared_columns_read_nested_fields_and_unreachable_brokers_fail_precisely(kafka):
    topic = f"fd{uuid.uuid4().hex[:10]}"
    kafka.create_topic(topic)
    kafka.publish(topic, events(0, 3))
    from federation.connectors.kafka import KafkaConnector
    connector = KafkaConnector({"bootstrap_servers": kafka.servers,
                                "columns": {"id": "int", "user.address.city": "string"}}, Path("."))
    table = connector.snapshot(topic)[0].read_all()
    assert table.column_names == ["_topic", "_partition", "_offset", "_timestamp", "_key", "id", "user_address_city"]
    assert table.column("user_address_city").to_pylist() == ["c0", "c1", "c2"]
    kafka.publish(topic, events(1, 1))  # id 1 again: with a dedupe key the copy keeps it once
    keyed = KafkaConnector({"bootstrap_servers": kafka.servers, "dedupe_key": "id"}, Path("."))
    assert keyed.change_key(topic) == ("id",)
    assert keyed.snapshot(topic)[0].read_all().column("_offset").to_pylist() == [0, 2, 3]
    gone = KafkaConnector({"bootstrap_servers": "127.0.0.1:9", "connect_timeout": 1}, Path("."))
    with pytest.raises(ConnectorError, match=r"^kafka \(127.0.0.1:9\): "):
        gone.tables()
    with pytest.raises(ConnectorError, match=r"^nats \(nats://127.0.0.1:9\): "):
        NatsConnector({"servers": "nats://127.0.0.1:9", "connect_timeout": 1}, Path(".")).tables()
    with pytest.raises(ConnectorError, match=r"^mqtt \(127.0.0.1:9\): "):
        MqttConnector({"port": 9, "columns": {"id": "int"}, "connect_timeout": 1}, Path(".")).snapshot("x/#")


def test_decoding_a_batch_at_once_or_message_by_message_gives_the_same_rows():
    from federation.messages import Message, MessageDecoder
    from federation.connectors.kafka import METADATA
    decoder = MessageDecoder({}, METADATA, "kafka (test)")
    payloads = [b'{"id": 1, "user": {"name": "x", "address": {"city": "c"}}, "amount": 2}',
                b'{"id": 2, "tags": ["a", "b"], "amount": 2.5, "extra": true}',
                b'{"id": 3}']
    schema = decoder.infer(payloads[:2])
    assert schema.names[5:] == ["id", "user_name", "user_address_city", "amount", "tags", "extra"]

    def message(index: int, payload: bytes) -> Message:
        return Message(payload, {"_topic": "t", "_partition": 0, "_offset": index, "_timestamp": None,
                                 "_key": None}, None)
    whole, skipped = decoder.rows([message(i, p) for i, p in enumerate(payloads)], schema)
    alone = [decoder.rows([message(i, p)], schema)[0] for i, p in enumerate(payloads)]
    assert skipped == [] and whole.equals(pa.concat_tables(alone))
    assert whole.select(["id", "user_name", "user_address_city", "amount", "tags", "extra"]).to_pylist() == [
        {"id": 1, "user_name": "x", "user_address_city": "c", "amount": 2.0, "tags": None, "extra": None},
        {"id": 2, "user_name": None, "user_address_city": None, "amount": 2.5, "tags": '["a", "b"]', "extra": True},
        {"id": 3, "user_name": None, "user_address_city": None, "amount": None, "tags": None, "extra": None}]


def test_a_value_arrow_would_silently_change_is_skipped_instead():
    from federation.messages import Message, MessageDecoder
    from federation.connectors.nats import METADATA
    decoder = MessageDecoder({"columns": {"id": "int"}}, METADATA, "nats (test)")
    messages = [Message(p, {"_subject": "s", "_sequence": i, "_timestamp": None}, None)
                for i, p in enumerate([b'{"id": 2.5}', b'{"id": true}', b'{"id": 4.0}', b'{"id": 5}'])]
    table, skipped = decoder.rows(messages, decoder.infer([]))
    assert table.column("id").to_pylist() == [4, 5]
    assert skipped == ["_subject s, _sequence 0: does not fit the columns: column id: 2.5 is not an integer",
                       "_subject s, _sequence 1: does not fit the columns: column id: True is not an integer"]


def test_cdc_cleanup_ends_the_mqtt_session(tmp_path, mosquitto):
    from flightdeck.config import load_config
    from flightdeck.sources import cleanup_changes
    name = f"fd{uuid.uuid4().hex[:10]}"
    bus = Bus("mqtt", name, f"mqtt:{name}/#", {"columns": MQTT_COLUMNS, "client_id": f"flightdeck-test-{name}"},
              lambda p: None)
    config = write_config(tmp_path / "flightdeck.yaml", _config(tmp_path, bus))
    connector = MqttConnector(bus.params, tmp_path)
    connector.snapshot(f"{name}/#")  # the session starts
    assert _session_present(bus.params["client_id"], keep=True)
    assert cleanup_changes(load_config(config)) == ["public.events"]
    assert not _session_present(bus.params["client_id"], keep=False)


def _session_present(client_id: str, keep: bool) -> bool:
    """Whether the broker keeps a session for ``client_id``; ``keep``: leave it as it was
    (else the probe ends whatever session it found, and leaves none behind)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    answered, present = threading.Event(), []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_connect = lambda c, u, flags, rc, p: (present.append(flags.session_present), answered.set())
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600 if keep else 0
    client.connect("127.0.0.1", 1883, clean_start=False, properties=properties)
    client.loop_start()
    try:
        assert answered.wait(10)
        return present[0]
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_bus_dataset_without_acceleration_reads_what_the_bus_retains(tmp_path, jetstream):
    with jetstream.fresh_stream() as name:
        jetstream.publish(f"{name}.a", events(0, 12))
        config = {"datasets": [{"from": f"nats:{name}", "name": "events"}]}
        with serving(config, tmp_path) as runtime:
            assert _rows(runtime, "SELECT count(*) AS n, max(_sequence) AS last FROM events "
                                  "WHERE user_address_city = 'c0'") == [{"n": 4, "last": 10}]
            jetstream.publish(f"{name}.a", events(12, 3))  # each query reads the stream anew
            assert _rows(runtime, "SELECT count(*) AS n FROM events") == [{"n": 15}]
            # and leaves no consumer behind: a stream may allow few, its own applications need them
            assert jetstream.consumer_count(name) == 0


@pytest.mark.parametrize("kind", ["kafka", "nats"])
def test_a_topic_made_again_is_a_source_reset_and_resnapshotted_when_configured(tmp_path, request, kind):
    if kind == "kafka":
        broker = request.getfixturevalue("kafka")
        name = f"fd{uuid.uuid4().hex[:10]}"
        broker.create_topic(name)
        bus = Bus(kind, name, f"kafka:{name}", {"bootstrap_servers": broker.servers},
                  lambda payloads: broker.publish(name, payloads))
        from confluent_kafka.admin import AdminClient
        admin = AdminClient({"bootstrap.servers": broker.servers})

        def make_again() -> None:
            admin.delete_topics([name])[name].result(30)
            _until(lambda: name not in admin.list_topics(timeout=10).topics, 20, "topic deleted")
            broker.create_topic(name)
    else:
        streams = request.getfixturevalue("jetstream")
        name = f"fd{uuid.uuid4().hex[:10]}"
        streams.create_stream(name, [f"{name}.>"])
        request.addfinalizer(lambda: streams.delete_stream(name))
        bus = Bus(kind, name, f"nats:{name}", {}, lambda payloads: streams.publish(f"{name}.a", payloads))

        def make_again() -> None:
            streams.create_stream(name, [f"{name}.>"])
    bus.publish(events(0, 10))
    config = write_config(tmp_path / "flightdeck.yaml", _config(tmp_path, bus, mode="file",
                                                                refresh_on_source_reset="resnapshot"))
    server = _server(config)
    try:
        _until(lambda: _query(server.url, "SELECT count(*) FROM events")[0][0] == 10, 20, "copied")
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
    make_again()
    bus.publish(events(100, 3))
    restarted = _server(config)
    try:
        _until(lambda: [r[0] for r in _query(restarted.url, "SELECT id FROM events ORDER BY id")] == [100, 101, 102],
               30, "a new snapshot of the new topic")
        assert _query(restarted.url, "SELECT refreshes FROM flightdeck.runtime.datasets")[0][0] == 1
    finally:
        restarted.stop()
