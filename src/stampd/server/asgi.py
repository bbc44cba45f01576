"""The ASGI application: HTTP in, DER out (RFC 3161 §3.4, SPEC TRN-01..03, TRN-07).

A raw ASGI callable rather than a framework: on the issuance path every microsecond is a token per second.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, Protocol
from urllib.parse import unquote_to_bytes

from stampd.access import (
    AccessRule,
    Credentials,
    Reservation,
    Subscriber,
    SubscriberDirectory,
    UsageLedger,
    authorize,
    unmapped_network,
)
from stampd.der.request import decode_request
from stampd.errors import (
    FailureInfo,
    Forbidden,
    LengthRequired,
    MethodNotAllowed,
    NotFound,
    ParseError,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
    TransportError,
    Unauthorized,
    UnsupportedMediaType,
)
from stampd.logs import REQUEST_ID
from stampd.metrics import REQUEST_SECONDS, REQUESTS, SUBSCRIBER_REFUSALS
from stampd.model import Reply, TimeStampRequest

log = logging.getLogger(__name__)


class Responder(Protocol):
    """What serves a TSU's path: the core's TimeStampingUnit (or a stopped TSU's stand-in)."""

    async def respond(
        self, request: TimeStampRequest, requester: str | None, subscriber: str | None = None
    ) -> Reply: ...


Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Network = IPv4Network | IPv6Network

TIMESTAMP_QUERY = b"application/timestamp-query"
TIMESTAMP_REPLY = b"application/timestamp-reply"
"""Exactly this, no parameters: clients compare it as a string (RFC 3161 §3.4 + Errata 1879, SPEC TRN-02)."""
TEXT = b"text/plain; charset=utf-8"
CHALLENGE = (b"www-authenticate", b'Bearer realm="stampd", Basic realm="stampd"')
"""Sent with every 401: a subscriber may authenticate with an API token or with basic credentials."""

FAIL_INFO_NAMES = {
    FailureInfo.BAD_ALG: "badAlg",
    FailureInfo.BAD_REQUEST: "badRequest",
    FailureInfo.BAD_DATA_FORMAT: "badDataFormat",
    FailureInfo.TIME_NOT_AVAILABLE: "timeNotAvailable",
    FailureInfo.UNACCEPTED_POLICY: "unacceptedPolicy",
    FailureInfo.UNACCEPTED_EXTENSION: "unacceptedExtension",
    FailureInfo.ADD_INFO_NOT_AVAILABLE: "addInfoNotAvailable",
    FailureInfo.SYSTEM_FAILURE: "systemFailure",
}
"""PKIFailureInfo bits by their RFC 3161 names, as the ``fail_info`` label of ``stampd_requests_total``."""

_CLIENT_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,64}")

SLOW_CHECKS_AT_ONCE = 2
"""At most this many password hashes (scrypt) run at once per process: wrong passwords cannot take more CPU and
memory than that."""


@dataclass(frozen=True, slots=True)
class Route:
    """One TSU path: the unit that answers it, and who may call it (``rule`` None: anyone, the public)."""

    unit: Responder
    rule: AccessRule | None = None


@dataclass(frozen=True, slots=True)
class _Subscribers:
    """What identifies and meters subscribers, swapped whole when the subscribers are reloaded."""

    directory: SubscriberDirectory | None
    ledger: UsageLedger | None


class TimeStampApp:
    """Routes ``POST <tsu path>`` to its TSU, and serves ``GET /healthz``, ``/readyz``, ``/metrics`` and
    ``<tsu path>/certs``.

    A TSU path with an access rule serves subscribers only: the caller is identified and authorised before its
    body is read, one unit of its quota and rate is reserved before anything is signed, and the reservation is
    released when no token is granted (SPEC: issue 6, subscribers and quotas).
    """

    def __init__(
        self,
        units: Mapping[str, Responder | Route],
        certificates_pem: Mapping[str, bytes],
        *,
        max_request_bytes: int,
        on_startup: Callable[[], Awaitable[None]],
        on_shutdown: Callable[[], Awaitable[None]],
        readiness: Callable[[], tuple[bool, str]],
        metrics: Callable[[], tuple[bytes, bytes]],
        subscribers: SubscriberDirectory | None = None,
        ledger: UsageLedger | None = None,
        trusted_proxies: Iterable[Network] = (),
    ) -> None:
        self._routes = _routes(units)
        self._certs = {_certs_path(path): pem for path, pem in certificates_pem.items()}
        self._max_request_bytes = max_request_bytes
        self._on_startup = on_startup
        self._on_shutdown = on_shutdown
        self._readiness = readiness
        self._metrics = metrics
        self._subscribers = _Subscribers(subscribers, ledger)
        proxies = tuple(trusted_proxies)
        self._is_trusted_proxy: Callable[[str], bool] | None = _address_matcher(proxies) if proxies else None
        self._request_ids = _RequestIds()
        self._counters: dict[tuple[str, int, str], Any] = {}
        self._timers: dict[str, Any] = {}
        self._releasing: set[asyncio.Task[None]] = set()
        self._slow_checks = asyncio.Semaphore(SLOW_CHECKS_AT_ONCE)

    @property
    def _units(self) -> dict[str, Responder]:
        """Each TSU path's unit (for tests and observers)."""
        return {path: route.unit for path, route in self._routes.items()}

    def replace_routes(self, units: Mapping[str, Responder | Route], certificates_pem: Mapping[str, bytes]) -> None:
        """Serve another set of TSUs from the next request on (a reload); each mapping is swapped whole, so a
        request in flight finishes on the unit and rule it started with."""
        self._routes = _routes(units)
        self._certs = {_certs_path(path): pem for path, pem in certificates_pem.items()}

    def replace_subscribers(self, directory: SubscriberDirectory, ledger: UsageLedger) -> None:
        """Identify callers with another snapshot of the subscribers from the next request on."""
        self._subscribers = _Subscribers(directory, ledger)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            request_id = self._request_ids.of(scope)
            context = REQUEST_ID.set(request_id)
            try:
                await self._http(scope, receive, send, request_id.encode())
            finally:
                REQUEST_ID.reset(context)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send, request_id: bytes) -> None:
        keep_alive_10 = scope["http_version"] == "1.0" and _header(scope, b"connection").lower() == b"keep-alive"
        path = scope["path"]
        route = self._routes.get(path)
        if route is not None:
            await self._timestamp(path, route, scope, receive, send, request_id=request_id, keep_alive_10=keep_alive_10)
            return
        try:
            method = scope["method"]
            if path == "/healthz":
                _require_get(method, path)
                await _respond(send, 200, TEXT, b"ok\n", keep_alive_10, request_id=request_id)
            elif path == "/readyz":
                _require_get(method, path)
                ready, reason = self._readiness()
                await _respond(
                    send, 200 if ready else 503, TEXT, f"{reason}\n".encode(), keep_alive_10, request_id=request_id
                )
            elif path == "/metrics":
                _require_get(method, path)
                body, content_type = self._metrics()
                await _respond(send, 200, content_type, body, keep_alive_10, request_id=request_id)
            elif path in self._certs:
                _require_get(method, path)
                pem = self._certs[path]
                await _respond(
                    send, 200, b"application/pem-certificate-chain", pem, keep_alive_10, request_id=request_id
                )
            else:
                raise NotFound(f"nothing is served at {path}")
        except (TransportError, ParseError) as e:
            await _refuse(send, e, keep_alive_10, request_id=request_id)
        except Exception:
            log.exception("internal error while serving %s %s", scope.get("method"), path)
            await _respond(send, 500, TEXT, b"internal error\n", False, request_id=request_id, close=True)

    async def _timestamp(
        self,
        path: str,
        route: Route,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        request_id: bytes,
        keep_alive_10: bool,
    ) -> None:
        """One time-stamp request on a TSU path, counted by HTTP status and failInfo and timed."""
        started = time.perf_counter()
        status = 500
        fail_info = ""
        try:
            if scope["method"] != "POST":
                raise MethodNotAllowed(f"{path} takes POST", allow=b"POST")
            if route.rule is None:
                request = decode_request(await self._read_body(scope, receive))
                if self._is_trusted_proxy is None:
                    client = scope.get("client")
                    reply = await route.unit.respond(request, client[0] if client else None)
                else:
                    reply = await route.unit.respond(request, self._requester(scope))
            else:
                reply = await self._subscriber_timestamp(path, route.unit, route.rule, scope, receive)
            status = 200
            if reply.fail_info is not None:
                fail_info = FAIL_INFO_NAMES[reply.fail_info]
            await _respond(send, 200, TIMESTAMP_REPLY, reply.body, keep_alive_10, request_id=request_id)
        except (TransportError, ParseError) as e:
            status = e.http_status
            await _refuse(send, e, keep_alive_10, request_id=request_id)
        except Exception:
            log.exception("internal error while serving %s %s", scope.get("method"), path)
            await _respond(send, 500, TEXT, b"internal error\n", False, request_id=request_id, close=True)
        finally:
            self._observe(path, status, fail_info, time.perf_counter() - started)

    async def _subscriber_timestamp(
        self, path: str, unit: Responder, rule: AccessRule, scope: Scope, receive: Receive
    ) -> Reply:
        """Identify and authorise (before the body is read), decode, reserve quota and rate, issue; release the
        reservation unless a token was granted. A refused caller gets nothing signed and nothing recorded."""
        subscribers = self._subscribers
        try:
            address, client_cert = self._caller(scope)
            authorization = _header(scope, b"authorization")
            subscriber = await self._identify(subscribers.directory, address, authorization, client_cert)
            authorize(rule, subscriber)
        except Unauthorized:
            SUBSCRIBER_REFUSALS.labels(tsu=path, reason="unauthorized").inc()
            raise
        except Forbidden:
            SUBSCRIBER_REFUSALS.labels(tsu=path, reason="forbidden").inc()
            raise
        assert subscriber is not None  # authorize refuses an unidentified caller
        request = decode_request(await self._read_body(scope, receive))
        ledger = subscribers.ledger
        if ledger is None:
            raise RuntimeError("a subscribers-only TSU is served without a usage ledger")
        # The reservation and the issuance run as tasks of their own, shielded: a request cancelled while they
        # are under way (a server that cancels on disconnect, a shutdown past its grace period) leaves them to
        # finish, and their outcome alone decides whether the reservation is given back. Released on
        # cancellation, a token recorded anyway would go uncounted; kept, a request that got nothing would count.
        reserving = asyncio.ensure_future(ledger.reserve(subscriber, time.time_ns() // 1000))
        try:
            reservation = await asyncio.shield(reserving)
        except TooManyRequests as e:
            SUBSCRIBER_REFUSALS.labels(tsu=path, reason=e.limit).inc()
            raise
        except asyncio.CancelledError:
            reserving.add_done_callback(lambda done: self._settle(ledger, done, None))
            raise
        issuing = asyncio.ensure_future(unit.respond(request, address, subscriber.name))
        try:
            reply = await asyncio.shield(issuing)
        except asyncio.CancelledError:
            issuing.add_done_callback(lambda done: self._settle(ledger, reservation, done))
            raise
        except BaseException:
            await asyncio.shield(_release(ledger, reservation))
            raise
        if not reply.granted:
            await asyncio.shield(_release(ledger, reservation))
        return reply

    def _settle(
        self,
        ledger: UsageLedger,
        reserved: Reservation | asyncio.Future[Reservation],
        issued: asyncio.Future[Reply] | None,
    ) -> None:
        """After a cancelled request: give back its reservation (once it is known) unless a token was granted."""
        if isinstance(reserved, asyncio.Future):
            if reserved.cancelled() or reserved.exception() is not None:
                return  # nothing was reserved
            reserved = reserved.result()
        if issued is not None and not issued.cancelled() and issued.exception() is None and issued.result().granted:
            return
        releasing = asyncio.ensure_future(_release(ledger, reserved))
        self._releasing.add(releasing)  # the loop keeps only a weak reference to a task
        releasing.add_done_callback(self._releasing.discard)

    async def _identify(
        self,
        directory: SubscriberDirectory | None,
        address: str | None,
        authorization: bytes,
        client_cert_der: bytes | None,
    ) -> Subscriber | None:
        """The subscriber these credentials name. A slow password hash runs in a thread, off the event loop, and
        at most :data:`SLOW_CHECKS_AT_ONCE` at a time: each takes tens of ms of CPU and 32 MiB, and anyone who
        knows a basic user's name can ask for one per request with wrong passwords."""
        credentials = Credentials.from_authorization(address, authorization, client_cert_der)
        if directory is None:
            return None
        if directory.needs_slow_check(credentials):
            async with self._slow_checks:
                return await asyncio.to_thread(directory.identify, credentials)
        return directory.identify(credentials)

    def _requester(self, scope: Scope) -> str | None:
        """The client's address, as recorded with its token: from a trusted proxy, the one it forwarded."""
        client = scope.get("client")
        address: str | None = client[0] if client else None
        trusted = self._is_trusted_proxy
        if trusted is not None and address is not None and trusted(address):
            forwarded = _joined_header(scope, b"x-forwarded-for")
            if forwarded:
                return _forwarded_client(forwarded, trusted)
        return address

    def _caller(self, scope: Scope) -> tuple[str | None, bytes | None]:
        """The caller's address and verified client certificate (DER).

        From a trusted proxy, both come from its headers (``X-Forwarded-For``, ``X-Client-Certificate``); from
        anyone else those headers are ignored, and the certificate is the one this server's TLS handshake verified.
        """
        client = scope.get("client")
        trusted = self._is_trusted_proxy
        if trusted is not None and client and trusted(client[0]):
            return self._requester(scope), _proxied_certificate(_header(scope, b"x-client-certificate"))
        extensions = scope.get("extensions")
        tls = extensions.get("tls") if extensions else None
        return (client[0] if client else None), (tls.get("client_cert_der") if tls else None)

    def _observe(self, path: str, status: int, fail_info: str, seconds: float) -> None:
        """Count and time one request; the labelled children are looked up once and kept."""
        key = (path, status, fail_info)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = REQUESTS.labels(tsu=path, status=str(status), fail_info=fail_info)
        counter.inc()
        timer = self._timers.get(path)
        if timer is None:
            timer = self._timers[path] = REQUEST_SECONDS.labels(tsu=path)
        timer.observe(seconds)

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


def _routes(units: Mapping[str, Responder | Route]) -> dict[str, Route]:
    return {path: unit if isinstance(unit, Route) else Route(unit) for path, unit in units.items()}


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


def _joined_header(scope: Scope, name: bytes) -> bytes:
    """Every ``name`` header line, joined in order with commas, as RFC 9110 §5.3 defines a repeated list header:
    a proxy may add its own ``X-Forwarded-For`` line after the client's (HAProxy's ``option forwardfor``)."""
    return b",".join(bytes(value) for key, value in scope["headers"] if key == name)


class _RequestIds:
    """Request ids: a sane ``X-Request-Id`` from the client (at most 64 of ``[A-Za-z0-9._-]``), else this
    process's random prefix and a counter (unique across processes and restarts without coordination)."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(4)
        self._counter = itertools.count(1)

    def of(self, scope: Scope) -> str:
        given = _header(scope, b"x-request-id")
        if given and _CLIENT_REQUEST_ID.fullmatch(given):
            return given.decode("ascii")
        return f"{self._prefix}-{next(self._counter):x}"


async def _release(ledger: UsageLedger, reservation: Reservation) -> None:
    """Give back the unit of quota of a request that got no token; a failure here only over-counts (never lets
    a subscriber past its quota), so it is logged rather than raised."""
    try:
        await ledger.release(reservation)
    except Exception:
        log.exception("could not release a quota reservation; the subscriber is charged for a refused request")


def _address_matcher(networks: tuple[Network, ...]) -> Callable[[str], bool]:
    """Whether an address lies in one of ``networks`` (cached: the peers of a server are few); IPv4 clients match
    whether their network is listed as IPv4 or as IPv4-mapped IPv6."""
    unmapped = tuple(unmapped_network(network) for network in networks)

    @lru_cache(maxsize=4096)
    def matches(address: str) -> bool:
        try:
            parsed = ip_address(address)
        except ValueError:
            return False
        if isinstance(parsed, IPv6Address) and parsed.ipv4_mapped is not None:
            parsed = parsed.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
        return any(parsed in network for network in unmapped)

    return matches


def _forwarded_client(forwarded: bytes, is_trusted_proxy: Callable[[str], bool]) -> str | None:
    """The client address in ``X-Forwarded-For``: the rightmost entry that is not itself a trusted proxy (the
    entries to its left were written by the client, and prove nothing). None when that entry is not an address."""
    entries = [e.strip() for e in forwarded.decode("latin-1").split(",")]
    for entry in reversed(entries):
        if not is_trusted_proxy(entry):
            try:
                return str(ip_address(entry))
            except ValueError:
                return None
    return str(ip_address(entries[0]))


def _proxied_certificate(header: bytes) -> bytes | None:
    """The DER of a client certificate a trusted proxy verified and passed URL-encoded (nginx's
    ``$ssl_client_escaped_cert``); none when the header is absent or empty."""
    if not header.strip():
        return None
    try:
        return ssl.PEM_cert_to_DER_cert(unquote_to_bytes(header).decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise Unauthorized("the proxy's X-Client-Certificate is not a PEM certificate") from None


async def _refuse(send: Send, e: TransportError | ParseError, keep_alive_10: bool, *, request_id: bytes) -> None:
    """The HTTP refusal of ``e``: its status, its message, and the headers its status calls for."""
    close = isinstance(e, PayloadTooLarge | RequestTimeout | LengthRequired)
    extra: list[tuple[bytes, bytes]] = []
    if isinstance(e, MethodNotAllowed):
        extra.append((b"allow", e.allow))
    elif isinstance(e, Unauthorized):
        extra.append(CHALLENGE)
    elif isinstance(e, TooManyRequests):
        extra.append((b"retry-after", str(max(1, e.retry_after_s)).encode()))
    text = f"{e}\n".encode()
    keep_alive = keep_alive_10 and not close
    await _respond(send, e.http_status, TEXT, text, keep_alive, request_id=request_id, close=close, extra=extra)


async def _respond(
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    keep_alive_10: bool,
    *,
    request_id: bytes,
    close: bool = False,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id),
        *(extra or ()),
    ]
    if close:
        headers.append((b"connection", b"close"))
    elif keep_alive_10:
        headers.append((b"connection", b"keep-alive"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
