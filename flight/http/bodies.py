"""Reading request bodies and writing JSON answers, with errors a client can act on."""
from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from flight.http.errors import RequestError
from flightdeck.errors import INVALID, LIMIT_EXCEEDED

MAX_BODY_BYTES = 16 * 2**20     # a request body; SQL, search and embedding requests are far smaller
PARSE_INLINE_BYTES = 64 * 1024  # a JSON body this small is parsed on the event loop
# Commas, lists and objects in one JSON body (a comma inside a text counts too): parsing holds the
# GIL, and 16 MB of empty lists took 1.5 s, every door of the process waiting; this many, 60 ms.
MAX_JSON_VALUES = 200_000
_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")  # an escaped surrogate half, paired or not


def _default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return str(value)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(content, default=_default, ensure_ascii=False, allow_nan=False).encode()
    return Response(body, status_code, headers, media_type="application/json")


async def read_body(request: Request) -> bytes:
    """The request's body, refused (413) as soon as it is known to pass MAX_BODY_BYTES: by its
    Content-Length, or while it arrives."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    parts, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        parts.append(chunk)
    return b"".join(parts)


def _too_large() -> RequestError:
    return RequestError(LIMIT_EXCEEDED, f"the request body is larger than {MAX_BODY_BYTES:,} bytes", status=413)


async def text_body(request: Request) -> str:
    try:
        return (await read_body(request)).decode()
    except UnicodeDecodeError:
        raise RequestError(INVALID, "the request body is not UTF-8") from None


async def json_object(request: Request, required: bool = True) -> dict:
    """The body as a JSON object (an empty body is ``{}`` unless ``required``). A large body is
    parsed on a worker thread: parsing megabytes on the event loop would stall every client."""
    raw = await read_body(request)
    if not raw.strip() and not required:
        return {}
    if raw.count(b",") + raw.count(b"[") + raw.count(b"{") > MAX_JSON_VALUES:
        raise RequestError(LIMIT_EXCEEDED, f"the request body holds more than {MAX_JSON_VALUES:,} JSON values "
                                           "(counting its commas, lists and objects)", status=413)
    body = _parsed(raw) if len(raw) < PARSE_INLINE_BYTES else await run_in_threadpool(_parsed, raw)
    if not isinstance(body, dict):
        raise RequestError(INVALID, "the request body must be a JSON object")
    return body


def _parsed(raw: bytes) -> Any:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RequestError(INVALID, "the request body is not valid JSON (or nests too deep)") from None
    if _LONE_SURROGATE.search(raw) and not _encodable(body):
        raise RequestError(INVALID, "the request body holds a lone surrogate (\\ud800-\\udfff), "
                                    "which is no character")
    return body


def _encodable(value: Any) -> bool:
    """Whether every text in a parsed JSON value is valid Unicode (JSON's \\u escapes can write
    half a surrogate pair, which no UTF-8 text, Arrow column or audit line can hold)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return True


def field(body: dict, name: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
    """``body[name]`` checked against ``kind`` (bools are not integers here)."""
    if name not in body or body[name] is None:
        if required:
            raise RequestError(INVALID, f"'{name}' is required", param=name)
        return default
    value = body[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise RequestError(INVALID, f"'{name}' must be {names}", param=name)
    return value


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object",
               bool: "true or false"}


def sql_parameters(value: Any) -> list[Any] | None:
    """JSON parameters for placeholders: a list of strings, numbers, booleans or nulls."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise RequestError(INVALID, "'parameters' must be a list of values, one per placeholder",
                           param="parameters")
    for index, item in enumerate(value):
        if item is not None and not isinstance(item, (str, int, float, bool)):
            raise RequestError(INVALID, f"parameters[{index}] must be a string, number, boolean or null",
                               param="parameters")
    return value
