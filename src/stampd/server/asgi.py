"""The ASGI application: HTTP in, DER out (RFC 3161 §3.4, SPEC TRN-01..03, TRN-07).

A raw ASGI callable rather than a framework: on the issuance path every microsecond is a token per second.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from stampd.der.request import decode_request
from stampd.errors import (
    LengthRequired,
    MethodNotAllowed,
    NotFound,
    ParseError,
    PayloadTooLarge,
    RequestTimeout,
    TransportError,
    UnsupportedMediaType,
)
from stampd.model import TimeStampRequest

log = logging.getLogger(__name__)


class Responder(Protocol):
    """What serves a TSU's path: the core's TimeStampingUnit (or a stopped TSU's stand-in)."""

    async def respond(self, request: TimeStampRequest, requester: str | None) -> bytes: ...


Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

TIMESTAMP_QUERY = b"application/timestamp-query"
TIMESTAMP_REPLY = b"application/timestamp-reply"
"""Exactly this, no parameters: clients compare it as a string (RFC 3161 §3.4 + Errata 1879, SPEC TRN-02)."""
TEXT = b"text/plain; charset=utf-8"


class TimeStampApp:
    """Routes ``POST <tsu path>`` to its TSU, and serves ``GET /healthz``, ``/readyz``, ``/metrics`` and
    ``<tsu path>/certs``."""

    def __init__(
        self,
        units: Mapping[str, Responder],
        certificates_pem: Mapping[str, bytes],
        *,
        max_request_bytes: int,
        on_startup: Callable[[], Awaitable[None]],
        on_shutdown: Callable[[], Awaitable[None]],
        readiness: Callable[[], tuple[bool, str]],
        metrics: Callable[[], tuple[bytes, bytes]],
    ) -> None:
        self._units = dict(units)
        self._certs = {_certs_path(path): pem for path, pem in certificates_pem.items()}
        self._max_request_bytes = max_request_bytes
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        self._readiness = readiness
        self._metrics = metrics

    def replace_routes(self, units: Mapping[str, Responder], certificates_pem: Mapping[str, bytes]) -> None:
        """Serve another set of TSUs from the next request on (a reload); each mapping is swapped whole."""
        self._units = dict(units)
        self._certs = {_certs_path(path): pem for path, pem in certificates_pem.items()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        keep_alive_10 = scope["http_version"] == "1.0" and _header(scope, b"connection").lower() == b"keep-alive"
        try:
            path = scope["path"]
            method = scope["method"]
            unit = self._units.get(path)
            if unit is not None:
                if method != "POST":
                    raise MethodNotAllowed(f"{path} takes POST", allow=b"POST")
                body = await self._read_body(scope, receive)
                request = decode_request(body)
                client = scope.get("client")
                reply = await unit.respond(request, client[0] if client else None)
                await _respond(send, 200, TIMESTAMP_REPLY, reply, keep_alive_10)
            elif path == "/healthz":
                _require_get(method, path)
                await _respond(send, 200, TEXT, b"ok\n", keep_alive_10)
            elif path == "/readyz":
                _require_get(method, path)
                ready, reason = self._readiness()
                await _respond(send, 200 if ready else 503, TEXT, f"{reason}\n".encode(), keep_alive_10)
            elif path == "/metrics":
                _require_get(method, path)
                body, content_type = self._metrics()
                await _respond(send, 200, content_type, body, keep_alive_10)
            elif path in self._certs:
                _require_get(method, path)
                await _respond(send, 200, b"application/pem-certificate-chain", self._certs[path], keep_alive_10)
            else:
                raise NotFound(f"nothing is served at {path}")
        except (TransportError, ParseError) as e:
            close = isinstance(e, PayloadTooLarge | RequestTimeout | LengthRequired)
            text = f"{e}\n".encode()
            extra = [(b"allow", e.allow)] if isinstance(e, MethodNotAllowed) else []
            await _respond(send, e.http_status, TEXT, text, keep_alive_10 and not close, close=close, extra=extra)
        except Exception:
            log.exception("internal error while serving %s %s", scope.get("method"), scope.get("path"))
            await _respond(send, 500, TEXT, b"internal error\n", False, close=True)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request body within the size limit, refused before reading when the declared size exceeds it."""
        content_type = _header(scope, b"content-type")
        if content_type and content_type.split(b";", 1)[0].strip().lower() != TIMESTAMP_QUERY:
            raise UnsupportedMediaType("expected Content-Type: application/timestamp-query")
        declared = _header(scope, b"content-length").strip(b" \t")
        if declared:
            if not declared.isdigit():
                raise ParseError("invalid Content-Length")
            if int(declared) > self._max_request_bytes:
                raise PayloadTooLarge(f"a time-stamp request is at most {self._max_request_bytes} bytes")
        elif b"chunked" not in _header(scope, b"transfer-encoding").lower():
            raise LengthRequired("Content-Length is required")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                # The protocol closes a connection whose request is not complete in time (TimeStampHttpProtocol).
                raise RequestTimeout("the request body did not arrive in time")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._max_request_bytes:
                raise PayloadTooLarge(f"a time-stamp request is at most {self._max_request_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self._on_startup()
                except Exception as e:
                    log.exception("start-up failed")
                    await send({"type": "lifespan.startup.failed", "message": str(e)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await self._on_shutdown()
                finally:
                    await send({"type": "lifespan.shutdown.complete"})
                return


def _require_get(method: str, path: str) -> None:
    if method not in ("GET", "HEAD"):
        raise MethodNotAllowed(f"{path} takes GET", allow=b"GET, HEAD")


def _certs_path(tsu_path: str) -> str:
    return tsu_path.rstrip("/") + "/certs"


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


async def _respond(
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    keep_alive_10: bool,
    *,
    close: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *(extra or ())]
    if close:
        headers.append((b"connection", b"close"))
    elif keep_alive_10:
        headers.append((b"connection", b"keep-alive"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
