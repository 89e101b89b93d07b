"""Reading request bodies and writing JSON answers, with errors a client can act on."""
from __future__ import annotations

import datetime as dt
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from flight.http.errors import RequestError
from flightdeck.errors import INVALID

INT64 = (-(2 ** 63), 2 ** 63 - 1)


def _default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return str(value)


def json_response(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(content, default=_default, ensure_ascii=False, allow_nan=False).encode()
    return Response(body, status_code, headers, media_type="application/json")


async def json_object(request: Request, required: bool = True) -> dict:
    """The body as a JSON object (an empty body is ``{}`` unless ``required``)."""
    raw = await request.body()
    if not raw.strip() and not required:
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(INVALID, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(INVALID, "the request body must be a JSON object")
    return body


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
        if isinstance(item, int) and not isinstance(item, bool) and not INT64[0] <= item <= INT64[1]:
            raise RequestError(INVALID, f"parameters[{index}] is outside the 64-bit integer range",
                               param="parameters")
    return value
