"""Message buses as append-only tables: JSON messages decoded into Arrow, shared by every bus.

A bus connector (kafka, nats, mqtt) only says how to read its messages from a position and what
metadata each carries; this module turns payloads into rows (declared columns, or columns
inferred from the first messages; nested objects flattened into ``parent_child`` columns as the
other document connectors do), skips a message it cannot read with a reason instead of stopping,
and offers the result both as a scan (every retained message) and as a change stream.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.json as pa_json

from federation import expr as fx
from federation.changes import ChangeBatch, ChangeSource, fitting_rows
from federation.connectors.base import Connector, ConnectorError, first_rows
from federation.connectors.typing import (JSON_TYPES, MAX_JSON_DEPTH, flatten_document, json_nests_too_deep,
                                         json_value)

log = logging.getLogger("flightdeck.messages")
SAMPLE_SIZE = 100             # messages read to infer the columns when none are declared
BATCH_MESSAGES = 5_000        # most messages in one change batch
BATCH_WAIT_SECONDS = 0.2      # how long a batch waits for more messages once one arrived
TIMESTAMP = pa.timestamp("ms", tz="UTC")


@dataclass(frozen=True)
class Message:
    payload: bytes
    metadata: dict[str, Any]   # the bus's own columns (offset, subject, ...), by column name
    time: dt.datetime | None   # when the bus received it (the batch's commit time)


@dataclass(frozen=True)
class Delivery:
    """Messages read together, and where the bus stands once they are applied."""
    messages: list[Message]
    position: dict[str, Any]


class MessageDecoder:
    """Payloads to rows: ``params.columns`` ({name: type}, dotted names read nested fields) or
    columns inferred from sample payloads; the bus's metadata columns come first."""

    def __init__(self, params: dict[str, Any], metadata: pa.Schema, describe: str):
        self.metadata = metadata
        self.describe = describe
        declared = params.get("columns")
        try:
            self.declared = None if not declared else pa.schema(
                [(str(name).replace(".", "_"), JSON_TYPES[str(kind)]) for name, kind in dict(declared).items()])
        except KeyError as error:
            raise ConnectorError(f"{describe}: unknown column type {error} (use {', '.join(JSON_TYPES)})") from None
        clash = set(self.metadata.names) & set(self.declared.names if self.declared else ())
        if clash:
            raise ConnectorError(f"{describe}: columns {sorted(clash)} are the bus's metadata columns; "
                                 "name them otherwise")

    def decode(self, payload: bytes) -> dict[str, Any] | str:
        """The message's flattened fields, or the reason it cannot be read."""
        if json_nests_too_deep(payload):
            return f"nests deeper than {MAX_JSON_DEPTH} levels"
        try:
            document = json.loads(payload)
        except (UnicodeDecodeError, ValueError, RecursionError) as error:
            return f"not JSON: {error}"
        if not isinstance(document, dict):
            return f"not a JSON object: {type(document).__name__}"
        return {"_".join(path): value for path, value in flatten_document(document).items()}

    def infer(self, payloads: list[bytes]) -> pa.Schema:
        """The table's schema: metadata columns, then the declared or inferred payload columns."""
        if self.declared is not None:
            return pa.schema(list(self.metadata) + list(self.declared))
        rows = [row for row in map(self.decode, payloads) if isinstance(row, dict)]
        if not rows:
            raise ConnectorError(f"{self.describe}: no JSON messages to infer columns from; "
                                 "declare params.columns")
        seen: dict[str, set[pa.DataType]] = {}
        for row in rows:
            for name, value in row.items():
                if name not in self.metadata.names:
                    kinds = seen.setdefault(name, set())
                    if value is not None:
                        kinds.add(_inferred_type(value))
        return pa.schema(list(self.metadata) + [(n, _merged(kinds)) for n, kinds in seen.items()])

    def rows(self, messages: list[Message], schema: pa.Schema) -> tuple[pa.Table, list[str]]:
        """``messages`` as rows of ``schema``; one reason per message skipped."""
        fast = _parsed_together(messages, schema, self.metadata)
        if fast is not None:
            return fast, []
        rows, skipped = [], []
        payload_fields = [f for f in schema if f.name not in self.metadata.names]
        for message in messages:
            fields = self.decode(message.payload)
            if isinstance(fields, str):
                skipped.append(f"{_where(message)}: {fields}")
                continue
            try:
                row = {f.name: _column_value(fields.get(f.name), f) for f in payload_fields}
            except ValueError as error:  # a timestamp's text that is no timestamp, a fraction for an int
                skipped.append(f"{_where(message)}: does not fit the columns: {error}")
                continue
            row.update(message.metadata)
            rows.append((message, row))
        table, unfit = fitting_rows([row for _, row in rows], schema)
        skipped += [f"{_where(rows[position][0])}: does not fit the columns: {reason}" for position, reason in unfit]
        return table, skipped


def _parsed_together(messages: list[Message], schema: pa.Schema, metadata: pa.Schema) -> pa.Table | None:
    """The rows by Arrow's JSON reader in one call, or None unless every message is one line of a
    JSON object whose values fit the columns as they are (then ``rows`` reads each message by
    itself, with the same result and a reason for each one it skips)."""
    if not messages or any(b"\n" in m.payload or not m.payload.lstrip().startswith(b"{")
                           or json_nests_too_deep(m.payload) for m in messages):
        return None
    try:
        parsed = pa_json.read_json(pa.py_buffer(b"\n".join(m.payload for m in messages)),
                                   read_options=pa_json.ReadOptions(block_size=1 << 26))
        while any(pa.types.is_struct(f.type) for f in parsed.schema):
            parsed = parsed.flatten()
        parsed = parsed.rename_columns([name.replace(".", "_") for name in parsed.column_names])
        if parsed.num_rows != len(messages) or len(set(parsed.column_names)) != parsed.num_columns:
            return None
        columns = []
        for field in schema:
            if field.name in metadata.names:
                columns.append(pa.array([m.metadata[field.name] for m in messages], type=field.type))
            elif field.name in parsed.column_names:
                column = parsed.column(field.name)
                if not _plain(column.type, field.type):
                    return None  # e.g. a list or number in a text column: JSON text, row by row
                columns.append(column.cast(field.type))
            else:
                columns.append(pa.nulls(len(messages), field.type))
        return pa.Table.from_arrays(columns, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
        return None


def _plain(found: pa.DataType, wanted: pa.DataType) -> bool:
    """True when casting ``found`` to ``wanted`` gives what reading each value would."""
    if found == wanted or pa.types.is_null(found):
        return True
    if pa.types.is_integer(found) and (pa.types.is_floating(wanted) or pa.types.is_integer(wanted)):
        return True
    return pa.types.is_timestamp(found) and pa.types.is_timestamp(wanted)


def _column_value(value: Any, field: pa.Field) -> Any:
    """A payload value for its column; Arrow itself would cut 2.5 to 2 or take true as 1."""
    if pa.types.is_integer(field.type) and (isinstance(value, bool) or
                                            (isinstance(value, float) and not value.is_integer())):
        raise ValueError(f"column {field.name}: {value!r} is not an integer")
    return json_value(value, field.type)


def _merged(kinds: set[pa.DataType]) -> pa.DataType:
    """One column type for the values seen: integers and floats make a float column; any
    other mix (or none seen) a text column holding JSON text."""
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds == {pa.int64(), pa.float64()}:
        return pa.float64()
    return pa.string()


def _inferred_type(value: Any) -> pa.DataType:
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    return pa.string()  # text, and lists or mixed values as JSON text


def _where(message: Message) -> str:
    return ", ".join(f"{k} {v}" for k, v in message.metadata.items()
                     if k != "_key" and v is not None and not isinstance(v, dt.datetime))


class BusConnector(Connector, ChangeSource):
    """A message bus: one table per topic or stream; scans read what the bus retains, change
    streams follow it from a stored position. Never deletes or acknowledges-away a message."""

    metadata: pa.Schema  # the bus's own columns, first in every table

    def __init__(self, params: dict[str, Any], base_dir):
        super().__init__(params, base_dir)
        self.timeout = float(params.get("connect_timeout", 10))  # seconds, to connect or to answer
        self.decoder = MessageDecoder(params, self.metadata, self.describe())
        self.sample_size = int(params.get("schema_sample_size", SAMPLE_SIZE))
        key = params.get("dedupe_key") or ()
        # a payload field (or fields) that identifies a message: the copy upserts on it
        self.dedupe_key = tuple(str(c).replace(".", "_") for c in ([key] if isinstance(key, str) else key))

    # ---- what each bus does ------------------------------------------------

    @abstractmethod
    def start_position(self, table: str) -> dict[str, Any]:
        """Before the first message the bus retains."""

    @abstractmethod
    def end_position(self, table: str) -> dict[str, Any]:
        """After the last message the bus holds now."""

    @abstractmethod
    def deliveries(self, table: str, since: dict[str, Any], stop: threading.Event,
                   until: dict[str, Any] | None = None) -> Iterator[Delivery]:
        """Messages after ``since`` in bus order, until ``until`` is reached (then return) or
        ``stop`` is set; yields an empty delivery now and then while nothing arrives. Resuming
        the iterator means the previous delivery is applied (a bus may acknowledge it then)."""

    # ---- the connector -----------------------------------------------------

    def schema(self, table: str) -> pa.Schema:
        if self.decoder.declared is not None:
            return self.decoder.infer([])
        payloads: list[bytes] = []
        for delivery in self._retained(table):
            payloads.extend(m.payload for m in delivery.messages)
            if len(payloads) >= self.sample_size:
                break
        return self.decoder.infer(payloads[:self.sample_size])

    def primary_key(self, table: str) -> list[str]:
        return list(self.dedupe_key)

    def open_scan(self, table: str, columns: list[str] | None, filters: list[fx.Expr],
                  limit: int | None) -> pa.RecordBatchReader:
        reader, _ = self.snapshot(table)
        schema = reader.schema
        columns = schema.names if columns is None else (columns or schema.names[:1])
        return first_rows(pa.RecordBatchReader.from_batches(
            pa.schema([schema.field(c) for c in columns]), (b.select(columns) for b in reader)), limit)

    def _retained(self, table: str) -> Iterator[Delivery]:
        until = self.end_position(table)
        return self.deliveries(table, self.start_position(table), threading.Event(), until)

    # ---- the change source -------------------------------------------------

    def change_key(self, table: str) -> tuple[str, ...]:
        return self.dedupe_key

    def snapshot(self, table: str) -> tuple[pa.RecordBatchReader, dict[str, Any]]:
        """Every message the bus retains now, and the position after the last of them."""
        schema = self.cached_schema(table)
        until = self.end_position(table)
        self.stats.record_request(f"read {table} to {json.dumps(until)}")

        def decoded() -> Iterator[pa.Table]:
            skipped: list[str] = []
            for delivery in self.deliveries(table, self.start_position(table), threading.Event(), until):
                data, reasons = self.decoder.rows(delivery.messages, schema)
                skipped += reasons
                yield data
            if skipped:
                log.warning("%s: %s: skipped %d messages; the last: %s", self.describe(), table,
                            len(skipped), skipped[-1])

        def batches() -> Iterator[pa.RecordBatch]:
            tables = decoded()
            if self.dedupe_key:  # the copy holds one row per key from the start
                tables = iter([_last_per_key(pa.concat_tables(list(tables) or [schema.empty_table()]),
                                              self.dedupe_key)])
            for data in tables:
                for batch in data.to_batches():
                    self.stats.record_batch(batch, 0.0)
                    yield batch

        return pa.RecordBatchReader.from_batches(schema, batches()), until

    def changes(self, table: str, since: dict[str, Any], stop: threading.Event) -> Iterator[ChangeBatch]:
        schema = self.cached_schema(table)
        self.stats.record_request(f"follow {table} from {json.dumps(since)}")
        for delivery in self.deliveries(table, since, stop):
            if not delivery.messages:
                continue
            data, skipped = self.decoder.rows(delivery.messages, schema)
            if self.dedupe_key and data.num_rows:
                data = _last_per_key(data, self.dedupe_key)
            times = [m.time for m in delivery.messages if m.time is not None]
            for batch in data.to_batches():
                self.stats.record_batch(batch, 0.0)
            yield ChangeBatch(upserts=data if data.num_rows else None, deletes=None,
                              position=delivery.position, committed_at=max(times) if times else None,
                              skipped=tuple(skipped))


def _last_per_key(data: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """One row per key, the last message's (a batch is collapsed per key by the contract)."""
    last: dict[tuple, int] = {}
    columns = [data.column(k).to_pylist() for k in key]
    for index, values in enumerate(zip(*columns)):
        last[values] = index
    return data.take(sorted(last.values()))


def utc_from_millis(millis: int | float | None) -> dt.datetime | None:
    if millis is None or millis < 0:
        return None
    return dt.datetime.fromtimestamp(millis / 1000, tz=dt.timezone.utc)
