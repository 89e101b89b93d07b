"""`mqtt:topic/filter` — the messages an MQTT broker delivers for a topic filter, as an
append-only table.

Each JSON message is a row after the metadata columns ``_topic``, ``_qos``, ``_retain`` and
``_received`` (when flightdeck received it: MQTT carries no broker timestamp). MQTT keeps no
history to read back: the table holds what arrived since the dataset's session first
subscribed (and the topics' retained messages). The session is persistent (a fixed client id,
clean start off, QoS 1), so messages published while flightdeck is down wait at the broker,
within the broker's queue limit (Mosquitto: ``max_queued_messages``, 1000 by default).
A message is acknowledged only once its batch is in the copy, so a crash loses nothing; QoS 1
is at-least-once, though: a message applied but not yet acknowledged when flightdeck dies is
delivered again. ``dedupe_key`` (a payload field that identifies a message) makes the copy
exactly-once; without one such a message may appear twice.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
import queue
import threading
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pyarrow as pa
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from federation import expr as fx
from federation.connectors.base import ConnectorError
from federation.messages import BATCH_MESSAGES, BATCH_WAIT_SECONDS, BusConnector, Delivery, Message

log = logging.getLogger("flightdeck.mqtt")
METADATA = pa.schema([("_topic", pa.string()), ("_qos", pa.int8()), ("_retain", pa.bool_()),
                      ("_received", pa.timestamp("ms", tz="UTC"))])
SESSION_EXPIRY_SECONDS = 7 * 24 * 3600  # how long the broker keeps queueing for a stopped flightdeck


class MqttConnector(BusConnector):
    kind = "mqtt"
    metadata = METADATA
    secret_params = ("password",)

    def __init__(self, params: dict[str, Any], base_dir):
        self.host = str(params.get("host", "127.0.0.1"))
        self.port = int(params.get("port", 1883))
        super().__init__(params, base_dir)

    def describe(self) -> str:
        return f"mqtt ({self.host}:{self.port})"

    def client_id(self, table: str) -> str:
        """Fixed per configuration directory and topic filter, so a restart resumes the session."""
        if self.params.get("client_id"):
            return str(self.params["client_id"])
        digest = hashlib.sha256(f"{self.base_dir}\0{table}".encode()).hexdigest()[:16]
        return f"flightdeck-{digest}"

    def tables(self) -> list[str]:
        return []  # a broker cannot list its topics: name the filter in `from:`

    def schema(self, table: str) -> pa.Schema:
        if self.decoder.declared is None:
            raise ConnectorError(f"{self.describe()}: MQTT keeps no messages to infer columns from; "
                                 "declare params.columns")
        return self.decoder.infer([])

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
                  limit: int | None) -> pa.RecordBatchReader:
        schema = self.schema(table)
        columns = schema.names if columns is None else (columns or schema.names[:1])
        return pa.schema([schema.field(c) for c in columns]).empty_table().to_reader()

    def snapshot(self, table: str) -> tuple[pa.RecordBatchReader, dict[str, Any]]:
        """Nothing (MQTT keeps no history), but the session starts here: from now on the
        broker keeps the filter's messages for the copy, even before the stream first reads."""
        session = _Session(self, table)
        try:
            session.open(resuming=False)
        finally:
            session.close()
        return self.schema(table).empty_table().to_reader(), {"client_id": session.client_id, "received": 0}

    def cleanup(self, table: str) -> None:
        """End the dataset's session at the broker (it stops keeping messages for it)."""
        session = _Session(self, table)
        session.open(resuming=False, clean=True)
        session.close()

    def start_position(self, table: str) -> dict[str, Any]:
        return {}

    def end_position(self, table: str) -> dict[str, Any]:
        return {}

    def deliveries(self, table: str, since: dict[str, Any], stop: threading.Event,
                   until: dict[str, Any] | None = None) -> Iterator[Delivery]:
        if until is not None:
            return  # no history: a snapshot is empty, the session delivers from now on
        session = _Session(self, table)
        try:
            session.open(resuming=bool(since.get("client_id")))
            received = int(since.get("received", 0))
            while not stop.is_set():
                session.check()
                messages = session.take()
                received += len(messages)
                yield Delivery([m for m, _ in messages], {"client_id": session.client_id, "received": received})
                session.acknowledge(messages)  # resumed: the batch is in the copy
        finally:
            session.close()


class _Session:
    """One persistent MQTT session: messages queue up here until taken, acknowledged later."""

    def __init__(self, connector: MqttConnector, table: str):
        self.connector = connector
        self.table = table
        self.client_id = connector.client_id(table)
        self.inbox: queue.Queue = queue.Queue()
        self.connected = threading.Event()
        self.failure: str | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                  protocol=mqtt.MQTTv5, manual_ack=True)
        params = connector.params
        if params.get("username"):
            self.client.username_pw_set(str(params["username"]), str(params.get("password") or "") or None)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def open(self, resuming: bool, clean: bool = False) -> None:
        """Connect to the dataset's session (``clean``: to end it) and subscribe."""
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = 0 if clean else int(
            self.connector.params.get("session_expiry", SESSION_EXPIRY_SECONDS))
        properties.ReceiveMaximum = BATCH_MESSAGES  # unacknowledged messages the broker may send
        self.resuming = resuming
        try:
            self.client.connect(self.connector.host, self.connector.port, clean_start=clean,
                                properties=properties)
        except OSError as error:
            raise self._failed(str(error)) from None
        self.client.loop_start()
        if not self.connected.wait(self.connector.timeout):
            raise self._failed(self.failure or f"no answer within {self.connector.timeout:g} s")

    def _failed(self, reason: str) -> ConnectorError:
        self.connector.stats.record_error()
        return ConnectorError(f"{self.connector.describe()}: {self.connector.mask_secrets(reason)}")

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.failure = f"connection refused: {reason_code}"
            return
        if self.resuming and not flags.session_present:
            log.warning("%s: the broker had no session for %s: messages published since it ended are lost",
                        self.connector.describe(), self.client_id)
        self.failure = None
        client.subscribe(self.table, qos=1)  # idempotent; creates the session's subscription

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        refused = [code for code in reason_codes if code.is_failure]
        if refused:
            self.failure = f"subscription to {self.table!r} refused: {refused[0]}"
            return
        self.connected.set()  # subscribed: from here on the broker keeps the filter's messages

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        self.failure = f"disconnected: {reason_code}"

    def _on_message(self, client, userdata, message: mqtt.MQTTMessage) -> None:
        received = dt.datetime.now(dt.timezone.utc)
        self.inbox.put((Message(message.payload, {
            "_topic": message.topic, "_qos": message.qos, "_retain": bool(message.retain),
            "_received": received}, received), (message.mid, message.qos)))

    def check(self) -> None:
        """Raise when the broker has been gone too long (paho reconnects by itself meanwhile)."""
        if not self.connected.is_set() and not self.connected.wait(self.connector.timeout):
            raise self._failed(self.failure or "disconnected")

    def take(self) -> list[tuple[Message, tuple[int, int]]]:
        """What arrived: waits a little for the first message, then takes what is there."""
        taken = []
        try:
            taken.append(self.inbox.get(timeout=BATCH_WAIT_SECONDS))
            while len(taken) < BATCH_MESSAGES:
                taken.append(self.inbox.get_nowait())
        except queue.Empty:
            pass
        return taken

    def acknowledge(self, messages: list[tuple[Message, tuple[int, int]]]) -> None:
        for _, (mid, qos) in messages:
            if qos > 0:
                self.client.ack(mid, qos)

    def close(self) -> None:
        self.client.disconnect()  # the session stays at the broker: unacknowledged messages come again
        self.client.loop_stop()
