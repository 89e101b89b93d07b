"""Streaming a query's result to an HTTP client, and stopping the query when the client goes.

The Service's reader is pulled one batch at a time in a worker thread, where the batch is also
encoded (and compressed), so the event loop only moves bytes and at most one batch is held.
While the request waits on the engine or streams, a watcher reads the ASGI channel: when the
client disconnects it cancels the query (the Service's ``cancelled`` event and the backend
statements registered with its ``Cancellation``) and the reader is closed as soon as the batch
being pulled, if any, comes back.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import anyio
import pyarrow as pa
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from flight.http.formats import Encoder, compressor
from flightdeck.errors import CANCELLED, ServiceError
from flightdeck.service import Cancellation, Truncation

log = logging.getLogger("flightdeck.http")
Result = TypeVar("Result")


@dataclass
class QueryControl:
    """What stops one request's query: the Service checks ``cancelled`` between batches, and
    ``backend`` stops the backend statements under way."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    backend: Cancellation = field(default_factory=Cancellation)

    def cancel(self) -> None:
        self.cancelled.set()
        self.backend.cancel()


_CLOSED = pa.RecordBatchReader.from_batches(pa.schema([]), [])


class ResultStream:
    """A reader, its encoder and optional compression; pulled from worker threads one piece at a
    time. ``close`` may come from any thread: it waits for a pull under way."""

    def __init__(self, reader: pa.RecordBatchReader, encoder: Encoder, coding: str | None,
                 control: QueryControl, truncation: Truncation):
        self._reader = reader
        self._truncation = truncation
        self._encoder = encoder
        self._compressor = compressor(coding) if coding else None
        self.control = control
        self._lock = threading.Lock()
        self._finished = False

    def _out(self, data: bytes) -> bytes:
        return self._compressor.piece(data) if self._compressor else data

    def prime(self, whole: bool = False) -> bytes:
        """The start of the body and the first batch (or, if ``whole``, the whole body): errors
        before any row surface here, while the response can still carry their status."""
        pieces = [self._out(self._encoder.start())]
        while (piece := self.next()) is not None:
            pieces.append(piece)
            if not whole:
                break
        return b"".join(pieces)

    def next(self) -> bytes | None:
        """The next piece of the body (possibly empty); None once everything was sent."""
        with self._lock:
            if self._finished:
                return None
            try:
                batch = self._reader.read_next_batch()
            except StopIteration:
                batch = None
            except BaseException:
                self._close_locked()
                raise
            if batch is not None:
                return self._out(self._encoder.batch(batch))
            tail = self._out(self._encoder.end(self._truncation.notice))
            if self._compressor is not None:
                tail += self._compressor.end()
            self._close_locked()
            return tail

    def _close_locked(self) -> None:
        self._finished = True
        self._reader.close()
        # Drop the reader now: the Service's stream ends (and records its outcome) when it is
        # freed, not whenever a reference cycle around this object is collected.
        self._reader = _CLOSED

    def close(self) -> None:
        with self._lock:
            if not self._finished:
                self._close_locked()

    def abort(self) -> None:
        """The client is gone: cancel the query, then close the reader without waiting here."""
        self.control.cancel()
        threading.Thread(target=self.close, name="flightdeck-http-close", daemon=True).start()


class ClientGone(Exception):
    """The client disconnected before the answer started."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_watched(request: Request, work: Callable[[], Result], on_disconnect: Callable[[], None]) -> Result:
    """``work()`` in a worker thread; if the client disconnects meanwhile, ``on_disconnect()`` runs
    and ClientGone is raised (the thread finishes on its own: ``work`` must clean up after
    itself once it sees the query cancelled)."""
    outcome: dict[str, object] = {}

    async def watch(scope: anyio.CancelScope) -> None:
        await _wait_for_disconnect(request.receive)
        outcome["gone"] = True
        on_disconnect()
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        try:
            outcome["result"] = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except Exception as error:
            outcome["error"] = error
        group.cancel_scope.cancel()
    if "gone" in outcome and "result" not in outcome:
        raise ClientGone()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


class StreamedResponse(Response):
    """A response whose body is ``head`` and then the stream's pieces, sent as they are pulled;
    a client that disconnects aborts the stream. A failure after the first bytes cannot change
    the status any more: the connection is cut, so the client sees an incomplete body."""

    def __init__(self, stream: ResultStream, head: bytes, media_type: str, headers: dict[str, str]):
        self.stream = stream
        self.head = head
        self.status_code = 200
        self.media_type = media_type
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        failure: BaseException | None = None

        async def watch(cancel_scope: anyio.CancelScope) -> None:
            await _wait_for_disconnect(receive)
            self.stream.abort()
            cancel_scope.cancel()

        async with anyio.create_task_group() as group:
            group.start_soon(watch, group.cancel_scope)
            try:
                await self._send_body(send)
            except Exception as error:
                failure = error
            group.cancel_scope.cancel()
        if failure is None:
            return
        self.stream.abort()
        if isinstance(failure, OSError):  # the server reports a client that went away this way
            return
        if isinstance(failure, ServiceError):
            if failure.kind != CANCELLED:
                log.warning("query failed after its first rows were sent: %s", failure.message)
            raise RuntimeError("the result stream failed; the connection is cut") from None
        raise failure

    async def _send_body(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.head, "more_body": True})
        while True:
            piece = await anyio.to_thread.run_sync(self.stream.next, abandon_on_cancel=True)
            if piece is None:
                break
            if piece:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
