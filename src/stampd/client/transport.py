"""HTTP transport for time-stamp requests (RFC 3161 §3.4): the client's only I/O."""

from __future__ import annotations

import http.client
import ssl
from urllib.parse import urlsplit

from stampd.errors import StampdError

QUERY_TYPE = "application/timestamp-query"
REPLY_TYPES = ("application/timestamp-reply", "application/timestamp-response")
"""RFC 3161 §3.4 names the reply type -reply (Errata 1879); some older TSAs still send -response."""

MAX_REPLY_BYTES = 1 << 20
"""A reply larger than this is not a time-stamp; read no further."""


def post_request(url: str, body: bytes, *, timeout: float = 10.0) -> bytes:
    """POST a DER TimeStampReq and return the DER reply; raises StampdError on any HTTP-level failure.

    Redirects are not followed (SPEC TRN-07): a TSA that moves should be reconfigured, not trusted blindly.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StampdError(f"{url}: not an http or https URL")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": QUERY_TYPE, "Accept": REPLY_TYPES[0]})
        response = conn.getresponse()
        data = response.read(MAX_REPLY_BYTES + 1)
        content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
    except (OSError, http.client.HTTPException) as e:
        raise StampdError(f"{url}: request failed: {e}") from e
    finally:
        conn.close()
    if response.status != 200:
        raise StampdError(f"{url}: HTTP {response.status} {response.reason}")
    if content_type not in REPLY_TYPES:
        raise StampdError(f"{url}: reply Content-Type {content_type or 'missing'!r}, not {REPLY_TYPES[0]}")
    if len(data) > MAX_REPLY_BYTES:
        raise StampdError(f"{url}: reply larger than {MAX_REPLY_BYTES} bytes")
    return data
