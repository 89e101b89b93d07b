"""Result formats of POST /v1/sql, chosen by ``Accept``, and their optional compression,
chosen by ``Accept-Encoding``.

An encoder turns a result into bytes piece by piece: ``start()`` once, ``batch(b)`` per
record batch, ``end()`` once; nothing holds more than one batch. Compression wraps any
encoder's output the same way, flushed after each piece so a reader sees rows as they come.
"""
from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import zlib
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc

from flightdeck.errors import INVALID, ServiceError

JSON = "application/json"
SPICE_JSON = "application/vnd.spiceai.sql.v1+json"
NDJSON = "application/x-ndjson"
CSV = "text/csv"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
CODINGS = ("zstd", "gzip")  # in order of preference
GZIP_WBITS = 16 + zlib.MAX_WBITS  # a gzip header and trailer around the deflate stream


class _Drain:
    """A file-like sink whose bytes are taken after each write (for pyarrow writers)."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.closed = False

    def write(self, data) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    return str(value)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, ensure_ascii=False, separators=(",", ":"))


def json_rows(batch: pa.RecordBatch) -> list[dict]:
    """A batch as row objects for JSON: NaN and infinities (which JSON lacks) become null."""
    columns = [pc.if_else(pc.is_finite(column), column, pa.scalar(None, column.type))
               if pa.types.is_floating(column.type) else column for column in batch.columns]
    return pa.RecordBatch.from_arrays(columns, names=batch.schema.names).to_pylist()


def schema_json(schema: pa.Schema) -> dict:
    return {"fields": [{"name": f.name, "data_type": str(f.type), "nullable": f.nullable} for f in schema]}


class Encoder:
    media_type: str

    def __init__(self, schema: pa.Schema):
        self.schema = schema
        self.rows = 0

    def start(self) -> bytes:
        return b""

    def batch(self, batch: pa.RecordBatch) -> bytes:
        self.rows += batch.num_rows
        return self._encode(batch) if batch.num_rows else b""

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        raise NotImplementedError

    def end(self, truncated: str | None = None) -> bytes:
        """The end of the body; ``truncated``: why the result was cut at a limit, if it was."""
        return b""


class JsonArray(Encoder):
    """``[{"col": value, ...}, ...]``."""
    media_type = JSON

    def start(self) -> bytes:
        return b"["

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        text = _dumps(json_rows(batch))[1:-1]
        return (text if self.rows == batch.num_rows else "," + text).encode()

    def end(self, truncated: str | None = None) -> bytes:
        return b"]"


class SpiceJson(JsonArray):
    """``{"schema": ..., "data": [...], "row_count": N}`` (Spice AI's SQL result), with
    ``"truncated"`` (why the result was cut) when it was."""
    media_type = SPICE_JSON

    def start(self) -> bytes:
        return f'{{"schema":{_dumps(schema_json(self.schema))},"data":['.encode()

    def end(self, truncated: str | None = None) -> bytes:
        notice = f',"truncated":{_dumps(truncated)}' if truncated else ""
        return f'],"row_count":{self.rows}{notice}}}'.encode()


class NdJson(Encoder):
    """One JSON object per line."""
    media_type = NDJSON

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        return "".join(_dumps(row) + "\n" for row in json_rows(batch)).encode()


class _PyArrowWriter(Encoder):
    """An encoder over a pyarrow writer that writes into a drain."""

    def __init__(self, schema: pa.Schema):
        super().__init__(schema)
        self._drain = _Drain()
        self._writer = self._open(pa.PythonFile(self._drain, mode="w"))

    def _open(self, sink: pa.NativeFile):
        raise NotImplementedError

    def start(self) -> bytes:
        return self._drain.take()

    def _encode(self, batch: pa.RecordBatch) -> bytes:
        self._writer.write_batch(batch)
        return self._drain.take()

    def end(self, truncated: str | None = None) -> bytes:
        self._writer.close()
        return self._drain.take()


class Csv(_PyArrowWriter):
    """CSV with a header line."""
    media_type = CSV

    def _open(self, sink: pa.NativeFile):
        try:
            return pacsv.CSVWriter(sink, self.schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as error:
            raise ServiceError(INVALID, f"the result cannot be written as CSV ({error}); "
                                        f"ask for JSON or Arrow instead") from None


class ArrowStream(_PyArrowWriter):
    """The Arrow IPC stream format, one message per batch."""
    media_type = ARROW_STREAM

    def _open(self, sink: pa.NativeFile):
        return ipc.new_stream(sink, self.schema)


ENCODERS: dict[str, type[Encoder]] = {e.media_type: e for e in (JsonArray, SpiceJson, NdJson, Csv, ArrowStream)}
WILDCARDS = {"*/*": JsonArray, "application/*": JsonArray, "text/*": Csv}


def _preferences(header: str) -> list[tuple[str, float]]:
    """The items of an Accept or Accept-Encoding header, best first (q=0 dropped)."""
    items = []
    for position, part in enumerate(header.split(",")):
        name, *params = [p.strip() for p in part.split(";")]
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if name and quality > 0:
            items.append((name.lower(), quality, position))
    return [(name, quality) for name, quality, _ in sorted(items, key=lambda i: (-i[1], i[2]))]


def negotiate(accept: str | None) -> type[Encoder] | None:
    """The encoder an Accept header asks for (JSON when it says nothing); None: none fits."""
    if not accept or not accept.strip():
        return JsonArray
    for name, _ in _preferences(accept):
        found = ENCODERS.get(name) or WILDCARDS.get(name)
        if found is not None:
            return found
    return None


def content_coding(accept_encoding: str | None) -> str | None:
    """The compression an Accept-Encoding header allows (zstd, then gzip), or None."""
    allowed = {name for name, _ in _preferences(accept_encoding or "")}
    return next((coding for coding in CODINGS if coding in allowed), None)


class Compressor:
    """Compresses a stream of pieces with a pyarrow codec (zstd frames), flushing after each
    piece so the client can decode everything sent so far."""

    def __init__(self, coding: str):
        self._drain = _Drain()
        self._stream = pa.CompressedOutputStream(pa.PythonFile(self._drain, mode="w"), coding)

    def piece(self, data: bytes) -> bytes:
        if not data:
            return b""
        self._stream.write(data)
        self._stream.flush()
        return self._drain.take()

    def end(self) -> bytes:
        self._stream.close()
        return self._drain.take()


class GzipCompressor:
    """The same for gzip (one member), at zlib's default level: pyarrow's gzip stream takes no
    level and always uses 9, about ten times slower on Arrow data for an output 1% smaller."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, GZIP_WBITS)

    def piece(self, data: bytes) -> bytes:
        if not data:
            return b""
        return self._deflate.compress(data) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def end(self) -> bytes:
        return self._deflate.flush(zlib.Z_FINISH)


def compressor(coding: str) -> Compressor | GzipCompressor:
    """The compressor for a coding of ``CODINGS``."""
    return GzipCompressor() if coding == "gzip" else Compressor(coding)
