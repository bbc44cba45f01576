"""Calling the ASGI app in-process, without a server: one HTTP request in, its status and body out.

Import it as ``from asgitools import call_app`` with ``tests/`` on ``sys.path`` (as the clock tests do with clocktools).
"""

from __future__ import annotations

from typing import Any

from stampd.server.asgi import TimeStampApp


async def call_app(
    app: TimeStampApp,
    method: str,
    path: str,
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    client: tuple[str, int] = ("127.0.0.1", 50000),
) -> tuple[int, bytes]:
    """The status and body ``app`` answers; ``headers`` after a Content-Length for ``body``."""
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "headers": [(b"content-length", str(len(body)).encode()), *(headers or [])],
        "client": client,
        "scheme": "http",
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return int(sent[0]["status"]), b"".join(m.get("body", b"") for m in sent[1:])
