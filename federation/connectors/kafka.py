"""`kafka:topic` — a Kafka topic (any Kafka-protocol broker) as an append-only table.

Each JSON message is a row after the metadata columns ``_topic``, ``_partition``, ``_offset``,
``_timestamp`` and ``_key``. Partitions are read with ``assign()`` from explicit offsets, never
through a consumer group (a group join is slow, and the offsets belong with the copy, not the
broker): the position is the next offset of each partition. Nothing is committed or written to
the broker.
"""
from __future__ import annotations

import threading
import time
from typing import Any, Iterator

import pyarrow as pa
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from federation.changes import SourceReset
from federation.connectors.base import ConnectorError
from federation.messages import (BATCH_MESSAGES, BATCH_WAIT_SECONDS, TIMESTAMP, BusConnector, Delivery,
                                 Message, utc_from_millis)

METADATA = pa.schema([("_topic", pa.string()), ("_partition", pa.int32()), ("_offset", pa.int64()),
                      ("_timestamp", TIMESTAMP), ("_key", pa.string())])
# Client settings a dataset may pass through (authentication, TLS); the rest are flightdeck's.
PASSED_SETTINGS = ("security_protocol", "sasl_mechanism", "sasl_username", "sasl_password",
                   "ssl_ca_location")


class KafkaConnector(BusConnector):
    kind = "kafka"
    metadata = METADATA
    secret_params = ("sasl_password",)

    def __init__(self, params: dict[str, Any], base_dir):
        self.servers = str(params.get("bootstrap_servers", "127.0.0.1:9092"))
        super().__init__(params, base_dir)

    def describe(self) -> str:
        return f"kafka ({self.servers})"

    def _consumer(self) -> Consumer:
        settings = {"bootstrap.servers": self.servers, "group.id": "flightdeck",
                    "enable.auto.commit": False, "enable.auto.offset.store": False,
                    "enable.partition.eof": True, "auto.offset.reset": "earliest",
                    "socket.timeout.ms": int(self.timeout * 1000), "client.id": "flightdeck",
                    # a broker may hold a fetch this long waiting for data: bounds the latency
                    "fetch.wait.max.ms": 100}
        settings.update({k.replace("_", "."): str(self.params[k]) for k in PASSED_SETTINGS if k in self.params})
        return Consumer(settings, logger=_QUIET)

    def _failed(self, error: Exception) -> ConnectorError:
        self.stats.record_error()
        return ConnectorError(f"{self.describe()}: {self.clean_error(error)}")

    def tables(self) -> list[str]:
        consumer = self._consumer()
        try:
            return sorted(t for t in consumer.list_topics(timeout=self.timeout).topics if not t.startswith("__"))
        except KafkaException as error:
            raise self._failed(error) from None
        finally:
            consumer.close()

    def _partitions(self, consumer: Consumer, topic: str) -> list[int]:
        try:
            found = consumer.list_topics(topic, timeout=self.timeout).topics.get(topic)
        except KafkaException as error:
            raise self._failed(error) from None
        if found is None or found.error is not None or not found.partitions:
            raise ConnectorError(f"{self.describe()}: topic {topic!r} does not exist")
        return sorted(found.partitions)

    def _watermarks(self, consumer: Consumer, topic: str) -> dict[int, tuple[int, int]]:
        try:
            return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=self.timeout)
                    for p in self._partitions(consumer, topic)}
        except KafkaException as error:
            raise self._failed(error) from None

    def start_position(self, table: str) -> dict[str, Any]:
        consumer = self._consumer()
        try:
            return {"offsets": {str(p): low for p, (low, _) in self._watermarks(consumer, table).items()}}
        finally:
            consumer.close()

    def end_position(self, table: str) -> dict[str, Any]:
        """The high watermarks as fetching reports them: some Kafka-protocol brokers (Tansu)
        answer a list-offsets request with the last record batch's first offset + 1, so the
        last batch of each partition is fetched and its end read from the fetch response."""
        consumer = self._consumer()
        try:
            listed = self._watermarks(consumer, table)
            pending = {p for p, (low, high) in listed.items() if high > low}
            consumer.assign([TopicPartition(table, p, max(low, high - 1)) for p, (low, high) in listed.items()
                             if p in pending])
            deadline = time.monotonic() + self.timeout
            while pending and time.monotonic() < deadline:
                for record in consumer.consume(BATCH_MESSAGES, timeout=BATCH_WAIT_SECONDS):
                    error = record.error()
                    if error is not None and error.code() == KafkaError._PARTITION_EOF:
                        pending.discard(record.partition())
            if pending:
                raise ConnectorError(f"{self.describe()}: partitions {sorted(pending)} of {table} did not "
                                     f"answer within {self.timeout:g} s")
            return {"offsets": {str(p): max(high, consumer.get_watermark_offsets(
                TopicPartition(table, p), cached=True)[1] or 0) for p, (_, high) in listed.items()}}
        except KafkaException as error:
            raise self._failed(error) from None
        finally:
            consumer.close()

    def deliveries(self, table: str, since: dict[str, Any], stop: threading.Event,
                   until: dict[str, Any] | None = None) -> Iterator[Delivery]:
        if until is None:
            self._check_not_reset(table, since)
        consumer = self._consumer()
        try:
            partitions = self._partitions(consumer, table)
            offsets = {p: int(since.get("offsets", {}).get(str(p), OFFSET_BEGINNING)) for p in partitions}
            ends = None if until is None else {p: int(until["offsets"].get(str(p), 0)) for p in partitions}
            consumer.assign([TopicPartition(table, p, o) for p, o in offsets.items()])
            while not stop.is_set():
                if ends is not None and all(offsets[p] >= ends[p] or ends[p] <= 0 for p in partitions):
                    return
                messages = self._read(consumer, offsets, ends)
                yield Delivery(messages, {"offsets": {str(p): o for p, o in offsets.items()}})
        finally:
            consumer.close()

    def _check_not_reset(self, table: str, since: dict[str, Any]) -> None:
        """A stored offset past a partition's end: the topic was deleted and made again."""
        ends = self.end_position(table)["offsets"]
        for partition, offset in since.get("offsets", {}).items():
            if int(offset) > int(ends.get(partition, 0)):
                raise SourceReset(f"{self.describe()}: partition {partition} of {table} ends at offset "
                                  f"{ends.get(partition, 0)}, before the copy's position {offset}: the topic "
                                  "was made again")

    def _read(self, consumer: Consumer, offsets: dict[int, int], ends: dict[int, int] | None) -> list[Message]:
        """The next messages (at most a batch), advancing ``offsets`` past them."""
        messages: list[Message] = []
        try:
            polled = consumer.consume(BATCH_MESSAGES, timeout=BATCH_WAIT_SECONDS)
        except KafkaException as error:
            raise self._failed(error) from None
        for record in polled:
            error = record.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    if ends is not None:  # all there is: the snapshot's end may be gone (retention)
                        offsets[record.partition()] = max(offsets[record.partition()], ends[record.partition()])
                    continue
                if error.fatal():
                    raise self._failed(KafkaException(error))
                continue  # transient (a broker reconnecting): librdkafka retries by itself
            partition, offset = record.partition(), record.offset()
            if ends is not None and offset >= ends[partition]:
                continue  # past the snapshot's end: the change stream reads it
            offsets[partition] = offset + 1
            key, stamp = record.key(), utc_from_millis(record.timestamp()[1])
            messages.append(Message(record.value() or b"", {
                "_topic": record.topic(), "_partition": partition, "_offset": offset, "_timestamp": stamp,
                "_key": None if key is None else key.decode("utf-8", "replace")}, stamp))
        return messages


class _QuietLogger:
    """librdkafka's own log lines (a broker not up yet) stay out of the server's output: errors
    reach the dataset's status instead."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return self.log


_QUIET = _QuietLogger()
