"""`nats:stream` — a NATS JetStream stream as an append-only table.

Each JSON message is a row after the metadata columns ``_subject``, ``_sequence`` (the stream
sequence) and ``_timestamp``. Messages are read by an ephemeral pull consumer that acknowledges
nothing (ack policy none), from an explicit stream sequence: the position is the last sequence
read. Streams whose retention deletes acknowledged messages (work queue, interest) are refused,
since a consumer there would remove messages other readers wait for.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Iterator

import nats
import pyarrow as pa
from nats.errors import Error as NatsError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy
from nats.js.errors import NotFoundError

from federation.changes import SourceReset
from federation.connectors.base import ConnectorError
from federation.messages import BATCH_MESSAGES, BATCH_WAIT_SECONDS, TIMESTAMP, BusConnector, Delivery, Message

log = logging.getLogger("flightdeck.nats")

METADATA = pa.schema([("_subject", pa.string()), ("_sequence", pa.int64()), ("_timestamp", TIMESTAMP)])
IDLE_CONSUMER_SECONDS = 60.0  # the server drops a consumer left behind (a killed flightdeck) after this


class NatsConnector(BusConnector):
    kind = "nats"
    metadata = METADATA
    secret_params = ("password", "token")

    def __init__(self, params: dict[str, Any], base_dir):
        self.servers = str(params.get("servers", "nats://127.0.0.1:4222"))
        super().__init__(params, base_dir)

    def describe(self) -> str:
        return f"nats ({self.servers.rpartition('@')[2]})"

    async def _connect(self) -> nats.NATS:
        # No reconnecting inside the client: a dropped stream fails, and the copy's consumer
        # starts it again from its committed position (with backoff).
        # (max_reconnect_attempts 1: the client's first connect otherwise tries forever.)
        options: dict[str, Any] = {"connect_timeout": self.timeout, "allow_reconnect": False,
                                   "max_reconnect_attempts": 1, "reconnect_time_wait": 0.2,
                                   "name": "flightdeck"}
        for name in ("user", "password", "token"):
            if name in self.params:
                options[name] = str(self.params[name])

        async def quiet(_error: Exception) -> None:  # errors reach the caller, not stderr
            pass

        try:
            return await nats.connect(self.servers, error_cb=quiet, **options)
        except (NatsError, OSError) as error:
            raise self._failed(error) from None

    def _failed(self, error: Exception) -> ConnectorError:
        self.stats.record_error()
        return ConnectorError(f"{self.describe()}: {self.clean_error(error) or type(error).__name__}")

    def _run(self, work) -> Any:
        """One request to the server on a connection of its own (the caller's thread has no loop)."""
        async def once():
            connection = await self._connect()
            try:
                return await work(connection.jetstream())
            except (NatsError, OSError, asyncio.TimeoutError) as error:
                raise self._failed(error) from None
            finally:
                await connection.close()
        return asyncio.run(once())

    def tables(self) -> list[str]:
        async def names(js):
            return sorted(info.config.name for info in await js.streams_info())
        return self._run(names)

    async def _stream(self, js, table: str):
        try:
            info = await js.stream_info(table)
        except NotFoundError:
            raise ConnectorError(f"{self.describe()}: stream {table!r} does not exist") from None
        retention = str(getattr(info.config.retention, "value", info.config.retention))
        if retention not in ("None", RetentionPolicy.LIMITS.value):
            raise ConnectorError(f"{self.describe()}: stream {table!r} has {retention} "
                                 "retention: reading it would delete messages; use a limits stream")
        return info

    def start_position(self, table: str) -> dict[str, Any]:
        async def first(js):
            return {"sequence": max(0, (await self._stream(js, table)).state.first_seq - 1)}
        return self._run(first)

    def end_position(self, table: str) -> dict[str, Any]:
        async def last(js):
            return {"sequence": (await self._stream(js, table)).state.last_seq}
        return self._run(last)

    def deliveries(self, table: str, since: dict[str, Any], stop: threading.Event,
                   until: dict[str, Any] | None = None) -> Iterator[Delivery]:
        loop = asyncio.new_event_loop()
        connection = subscription = None
        try:
            connection = loop.run_until_complete(self._connect())
            subscription = loop.run_until_complete(self._subscribe(connection.jetstream(), table, since))
            sequence = int(since.get("sequence", 0))
            end = None if until is None else int(until["sequence"])
            while not stop.is_set() and (end is None or sequence < end):
                messages = loop.run_until_complete(self._fetch(subscription, end))
                if messages:
                    sequence = messages[-1].metadata["_sequence"]
                elif end is not None and loop.run_until_complete(self._drained(subscription)):
                    return  # the snapshot's last messages were deleted (limits) before being read
                yield Delivery(messages, {"sequence": sequence})
        finally:
            if subscription is not None:
                loop.run_until_complete(self._delete_consumer(connection.jetstream(), subscription))
            if connection is not None:
                loop.run_until_complete(connection.close())
            loop.close()

    async def _delete_consumer(self, js, subscription) -> None:
        """The read's consumer goes with it: left to expire, each query's would hold one of the
        stream's consumers (a stream may allow few) for IDLE_CONSUMER_SECONDS."""
        try:
            info = await subscription.consumer_info()
            await js.delete_consumer(info.stream_name, info.name)
        except (NatsError, OSError, asyncio.TimeoutError) as error:
            log.info("%s: could not delete a read's consumer (it expires by itself): %s", self.describe(), error)

    async def _subscribe(self, js, table: str, since: dict[str, Any]):
        info = await self._stream(js, table)
        start = int(since.get("sequence", 0)) + 1
        if start - 1 > info.state.last_seq:
            raise SourceReset(f"{self.describe()}: stream {table!r} ends at sequence {info.state.last_seq}, "
                              f"before the copy's position {start - 1}: the stream was made again")
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=IDLE_CONSUMER_SECONDS,
                                deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start,
                                max_ack_pending=-1)
        subject = self.params.get("subject") or ">"
        try:
            return await js.pull_subscribe(subject, stream=info.config.name, config=config)
        except (NatsError, OSError) as error:
            raise self._failed(error) from None

    async def _drained(self, subscription) -> bool:
        try:
            return (await subscription.consumer_info()).num_pending == 0
        except (NatsError, OSError, asyncio.TimeoutError) as error:
            raise self._failed(error) from None

    async def _fetch(self, subscription, end: int | None) -> list[Message]:
        try:
            received = await subscription.fetch(BATCH_MESSAGES, timeout=BATCH_WAIT_SECONDS)
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            return []
        except (NatsError, OSError) as error:
            raise self._failed(error) from None
        messages = []
        for record in received:
            meta = record.metadata
            if end is not None and meta.sequence.stream > end:
                break  # past the snapshot's end: the change stream reads it
            messages.append(Message(record.data, {"_subject": record.subject, "_sequence": meta.sequence.stream,
                                                  "_timestamp": meta.timestamp}, meta.timestamp))
        return messages
