"""HTTP(S) requests that stay on the origin they were configured for.

The connectors of web APIs (``http:``, ``github:``, ``elasticsearch:``) send credentials with
every request, and what an API answers is not trusted: a redirect or a next-page link must not
take flightdeck's reads, or those credentials, to another host, port or scheme (``file:`` would
read the machine's own files), whatever the API says.
"""
from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port filled in for HTTP(S)."""
    parsed = urllib.parse.urlsplit(url)
    scheme = parsed.scheme.lower()
    try:
        port = parsed.port
    except ValueError:  # a port that is not a number: no origin anything shares
        return scheme, "", -1
    return scheme, (parsed.hostname or "").lower(), port if port is not None else DEFAULT_PORTS.get(scheme)


def same_origin(url: str, configured: str) -> bool:
    return origin(url) == origin(configured) and origin(url)[0] in DEFAULT_PORTS


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """Follows a redirect on the request's own origin only; any other is an HTTP error."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> urllib.request.Request | None:
        if not same_origin(newurl, req.full_url):
            raise urllib.error.HTTPError(req.full_url, code, "a redirect to another origin, not followed",
                                         headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener() -> urllib.request.OpenerDirector:
    """urllib's opener with HTTP and HTTPS only (no file:, ftp: or data: handler) and the
    redirect rule above."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    _SameOriginRedirects(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


_OPENER = _opener()


def open_same_origin(request: urllib.request.Request, timeout: float) -> Any:
    """``urlopen`` for a request to a configured web API: HTTP(S) only, redirects kept on its origin."""
    if urllib.parse.urlsplit(request.full_url).scheme.lower() not in DEFAULT_PORTS:
        raise urllib.error.URLError(f"only http and https URLs are read, not {request.full_url[:40]!r}")
    return _OPENER.open(request, timeout=timeout)


def read_within(response: Any, seconds: float) -> bytes:
    """A response's whole body, or TimeoutError once ``seconds`` have passed. The socket's own
    timeout bounds each wait for the next bytes, not the whole answer: a server sending a byte
    now and then would otherwise hold the read, and the query, without end."""
    deadline = time.monotonic() + seconds
    chunks = []
    while chunk := response.read1(65536):
        chunks.append(chunk)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the answer took longer than {seconds:g} s")
    body = b"".join(chunks)
    if response.length:  # read1, unlike read, says nothing of an answer cut short
        raise http.client.IncompleteRead(body, response.length)
    return body
