"""uvicorn's httptools protocol with two additions a TSA needs.

- HTTP/1.0 keep-alive: uvicorn closes every HTTP/1.0 connection, but Java and Windows time-stamp clients send
  ``Connection: keep-alive`` over HTTP/1.0 and reuse the socket.
- A deadline on the request head: a client that connects and trickles its headers is cut off after the
  keep-alive timeout (stampd sets it to ``server.request_timeout``) instead of holding the connection forever
  (SPEC TRN-07).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class TimeStampHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm_head_deadline()

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.scope["http_version"] == "1.0" and self.parser.should_keep_alive():
            cycle.keep_alive = True

    def _arm_head_deadline(self) -> None:
        self._cancel_head_deadline()
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._head_timed_out)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()
