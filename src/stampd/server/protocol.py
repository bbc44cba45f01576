"""uvicorn's httptools protocol with two additions a TSA needs.

- HTTP/1.0 keep-alive: uvicorn closes every HTTP/1.0 connection, but Java and Windows time-stamp clients send
  ``Connection: keep-alive`` over HTTP/1.0 and reuse the socket.
- A deadline on each request: a client that connects and trickles its headers or its body is cut off when the
  whole request has not arrived within the keep-alive timeout (stampd sets it to ``server.request_timeout``),
  instead of holding the connection forever (SPEC TRN-07). Enforced here, per connection, so that the
  application pays nothing for it per request.

And over native TLS, the client certificate the handshake verified (``server.tls_client_ca``) is read once per
connection and handed to the application in each request's scope, as ``scope["extensions"]["tls"]
["client_cert_der"]``, for access control.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class TimeStampHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._request_deadline: asyncio.TimerHandle | None = None
        self._extensions: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._extensions = _tls_extensions(transport)
        self._arm_request_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_request_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._extensions is not None:
            self.scope["extensions"] = self._extensions
        self._arm_request_deadline()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope["http_version"] == "1.0" and self.parser.should_keep_alive():
            cycle.keep_alive = True

    def on_message_complete(self) -> None:
        self._cancel_request_deadline()
        super().on_message_complete()

    def _arm_request_deadline(self) -> None:
        self._cancel_request_deadline()
        self._request_deadline = self.loop.call_later(self.timeout_keep_alive, self._request_timed_out)

    def _cancel_request_deadline(self) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
            self._request_deadline = None

    def _request_timed_out(self) -> None:
        self._request_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def _tls_extensions(transport: asyncio.Transport) -> dict[str, Any] | None:
    """The verified client certificate of a TLS connection (asyncio and uvloop call ``connection_made`` after the
    handshake); None over plain TCP or when the client sent none."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return {"tls": {"client_cert_der": der}} if der else None
