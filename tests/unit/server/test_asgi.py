"""The ASGI application driven directly: request ids, per-request metrics, and access control on a subscribers-only
TSU (identify and authorise before the body is read, reserve before issuing, release unless granted).

SPEC TRN-01..03; issue 6 (subscribers, quotas, observability).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from ipaddress import ip_network
from typing import Any

import pytest

from stampd import access
from stampd.access import (
    AccessRule,
    Quota,
    Reservation,
    Subscriber,
    SubscriberDirectory,
    cert_sha256,
    hash_password,
    hash_token,
)
from stampd.der.request import encode_request
from stampd.errors import FailureInfo, TooManyRequests
from stampd.logs import REQUEST_ID
from stampd.metrics import REGISTRY
from stampd.model import MessageImprint, Reply, TimeStampRequest
from stampd.oids import SHA256
from stampd.server.asgi import SLOW_CHECKS_AT_ONCE, Responder, Route, TimeStampApp

REQUEST = TimeStampRequest(1, MessageImprint(SHA256.oid, True, bytes(32)), None, 7, True, ())
BODY = encode_request(REQUEST)
GRANTED = Reply(b"granted-token")
BAD_ALG = Reply(b"rejection", FailureInfo.BAD_ALG)
TOKEN = "t" * 43
CERT_DER = b"\x30\x03\x02\x01\x01"  # stands in for a certificate: only its SHA-256 is compared
PEM = ssl.DER_cert_to_PEM_cert(CERT_DER)


@dataclass
class FakeUnit:
    """Answers with a fixed reply, and notes what it was asked and the request id in effect."""

    reply: Reply = GRANTED
    fails: bool = False
    calls: list[tuple[str | None, str | None, str | None]] = field(default_factory=list)

    async def respond(self, request: TimeStampRequest, requester: str | None, subscriber: str | None = None) -> Reply:
        self.calls.append((requester, subscriber, REQUEST_ID.get()))
        if self.fails:
            raise RuntimeError("the unit broke")
        return self.reply


@dataclass
class FakeLedger:
    full: TooManyRequests | None = None
    reserved: list[str] = field(default_factory=list)
    released: list[Reservation] = field(default_factory=list)

    async def reserve(self, subscriber: Subscriber, now_us: int) -> Reservation:
        if self.full is not None:
            raise self.full
        self.reserved.append(subscriber.name)
        return Reservation(subscriber.name, ("day:x",))

    async def release(self, reservation: Reservation) -> None:
        self.released.append(reservation)


SUBSCRIBERS = SubscriberDirectory(
    [
        Subscriber("acme", networks=(ip_network("192.0.2.0/24"),), token_sha256=hash_token(TOKEN)),
        Subscriber("off", enabled=False, networks=(ip_network("198.51.100.7/32"),)),
        Subscriber("other", networks=(ip_network("203.0.113.0/24"),)),
        Subscriber("certified", cert_sha256=(cert_sha256(CERT_DER),)),
        Subscriber("basic", basic_user="bob", basic_hash=hash_password("secret", b"s" * 16), quotas=(Quota(5, "day"),)),
    ]
)


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    body_read: bool


def make_app(
    unit: Responder, ledger: FakeLedger | None = None, *, rule: AccessRule | None = None, proxies: tuple[str, ...] = ()
) -> TimeStampApp:
    async def nothing() -> None:
        return None

    return TimeStampApp(
        {"/tsa": Route(unit, rule)},
        {},
        max_request_bytes=4096,
        on_startup=nothing,
        on_shutdown=nothing,
        readiness=lambda: (True, "ok"),
        metrics=lambda: (b"", b"text/plain"),
        subscribers=SUBSCRIBERS,
        ledger=ledger or FakeLedger(),
        trusted_proxies=[ip_network(p) for p in proxies],
    )


def call(
    app: TimeStampApp,
    *,
    method: str = "POST",
    path: str = "/tsa",
    client: str = "192.0.2.9",
    headers: dict[str, str] | None = None,
    body: bytes = BODY,
    extensions: dict[str, Any] | None = None,
    repeated: tuple[tuple[str, str], ...] = (),
) -> Answer:
    """One request to ``app``; ``repeated`` adds header lines after ``headers`` (a name may repeat)."""
    sent: list[dict[str, Any]] = []
    read = False

    async def receive() -> dict[str, Any]:
        nonlocal read
        read = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    head = {"content-type": "application/timestamp-query", "content-length": str(len(body)), **(headers or {})}
    scope: dict[str, Any] = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "client": (client, 50000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in (*head.items(), *repeated)],
    }
    if extensions is not None:
        scope["extensions"] = extensions
    run: Callable[[], Awaitable[None]] = lambda: app(scope, receive, send)  # noqa: E731
    asyncio.run(run())
    start, content = sent
    return Answer(start["status"], dict(start["headers"]), content["body"], read)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


SUBSCRIBERS_ONLY = AccessRule(False, None, "tsa")


# --- request ids ---


def test_a_request_id_is_made_per_request_and_echoed() -> None:
    unit = FakeUnit()
    app = make_app(unit)
    first, second = call(app), call(app)
    ids = [first.headers[b"x-request-id"], second.headers[b"x-request-id"]]
    assert ids[0] != ids[1] and all(len(i) <= 64 for i in ids)
    assert [c[2] for c in unit.calls] == [i.decode() for i in ids]  # the id is in effect while the TSU answers
    assert REQUEST_ID.get() is None  # and only then


@pytest.mark.parametrize(
    ("given", "kept"), [("abc-123_X.y", True), ("x" * 64, True), ("x" * 65, False), ("a b", False)]
)
def test_a_sane_client_request_id_is_kept(given: str, kept: bool) -> None:
    answer = call(make_app(FakeUnit()), headers={"X-Request-Id": given})
    assert (answer.headers[b"x-request-id"] == given.encode()) is kept
    health = call(make_app(FakeUnit()), method="GET", path="/healthz", headers={"X-Request-Id": "h-1"})
    assert health.status == 200 and health.headers[b"x-request-id"] == b"h-1"


# --- metrics ---


def test_requests_are_counted_by_status_and_fail_info() -> None:
    """Granted, rejected (badAlg), malformed (400) and wrong-method (405) requests each count under their labels;
    the histogram counts them all."""
    path = "/tsa"
    before = {
        key: sample("stampd_requests_total", tsu=path, status=status, fail_info=fail)
        for key, (status, fail) in {
            "granted": ("200", ""),
            "bad_alg": ("200", "badAlg"),
            "malformed": ("400", ""),
            "method": ("405", ""),
        }.items()
    }
    timed = sample("stampd_request_duration_seconds_count", tsu=path)
    call(make_app(FakeUnit()))
    call(make_app(FakeUnit()))
    call(make_app(FakeUnit(BAD_ALG)))
    assert call(make_app(FakeUnit()), body=b"\x30\x00").status == 400
    assert call(make_app(FakeUnit()), method="GET").status == 405
    after = {
        "granted": sample("stampd_requests_total", tsu=path, status="200", fail_info=""),
        "bad_alg": sample("stampd_requests_total", tsu=path, status="200", fail_info="badAlg"),
        "malformed": sample("stampd_requests_total", tsu=path, status="400", fail_info=""),
        "method": sample("stampd_requests_total", tsu=path, status="405", fail_info=""),
    }
    assert {k: after[k] - before[k] for k in after} == {"granted": 2, "bad_alg": 1, "malformed": 1, "method": 1}
    assert sample("stampd_request_duration_seconds_count", tsu=path) - timed == 5


def test_an_internal_error_is_a_counted_500() -> None:
    before = sample("stampd_requests_total", tsu="/tsa", status="500", fail_info="")
    assert call(make_app(FakeUnit(fails=True))).status == 500
    assert sample("stampd_requests_total", tsu="/tsa", status="500", fail_info="") - before == 1


# --- access control ---


def test_public_tsu_ignores_credentials_and_records_the_address() -> None:
    unit = FakeUnit()
    answer = call(make_app(unit), client="10.9.9.9", headers={"Authorization": "Bearer nonsense"})
    assert answer.status == 200 and unit.calls[0][:2] == ("10.9.9.9", None)


def test_unknown_caller_gets_401_with_a_challenge_before_its_body_is_read() -> None:
    unit, ledger = FakeUnit(), FakeLedger()
    before = sample("stampd_subscriber_refusals_total", tsu="/tsa", reason="unauthorized")
    answer = call(make_app(unit, ledger, rule=SUBSCRIBERS_ONLY), client="10.0.0.1")
    assert answer.status == 401
    assert answer.headers[b"www-authenticate"] == b'Bearer realm="stampd", Basic realm="stampd"'
    assert not answer.body_read and unit.calls == [] and ledger.reserved == []
    assert sample("stampd_subscriber_refusals_total", tsu="/tsa", reason="unauthorized") - before == 1


@pytest.mark.parametrize(
    "headers",
    [{"Authorization": "Bearer wrong"}, {"Authorization": basic("bob", "wrong")}, {"Authorization": "Digest x"}],
)
def test_wrong_credentials_are_401_even_from_a_listed_address(headers: dict[str, str]) -> None:
    unit = FakeUnit()
    answer = call(make_app(unit, rule=SUBSCRIBERS_ONLY), client="192.0.2.9", headers=headers)
    assert answer.status == 401 and unit.calls == []


@pytest.mark.parametrize(
    ("client", "rule"),
    [("198.51.100.7", SUBSCRIBERS_ONLY), ("203.0.113.5", AccessRule(False, frozenset({"acme"}), "tsa"))],
    ids=["disabled", "not-listed"],
)
def test_identified_but_not_allowed_is_403(client: str, rule: AccessRule) -> None:
    unit, ledger = FakeUnit(), FakeLedger()
    before = sample("stampd_subscriber_refusals_total", tsu="/tsa", reason="forbidden")
    answer = call(make_app(unit, ledger, rule=rule), client=client)
    assert answer.status == 403 and not answer.body_read and unit.calls == [] and ledger.reserved == []
    assert sample("stampd_subscriber_refusals_total", tsu="/tsa", reason="forbidden") - before == 1


@pytest.mark.parametrize(
    ("client", "headers", "extensions", "name"),
    [
        ("192.0.2.200", {}, None, "acme"),
        ("10.1.1.1", {"Authorization": f"Bearer {TOKEN}"}, None, "acme"),
        ("10.1.1.1", {"Authorization": basic("bob", "secret")}, None, "basic"),
        ("10.1.1.1", {}, {"tls": {"client_cert_der": CERT_DER}}, "certified"),
    ],
    ids=["address", "bearer", "basic", "client-certificate"],
)
def test_identified_subscriber_is_granted_and_named(
    client: str, headers: dict[str, str], extensions: dict[str, Any] | None, name: str
) -> None:
    unit, ledger = FakeUnit(), FakeLedger()
    answer = call(make_app(unit, ledger, rule=SUBSCRIBERS_ONLY), client=client, headers=headers, extensions=extensions)
    assert answer.status == 200 and answer.body == GRANTED.body
    assert unit.calls[0][:2] == (client, name)
    assert ledger.reserved == [name] and ledger.released == []


def test_over_quota_is_429_with_retry_after_and_nothing_issued() -> None:
    unit = FakeUnit()
    rate = TooManyRequests("subscriber acme: rate limit 5/s reached; it resets at X", retry_after_s=1, limit="rate")
    ledger = FakeLedger(full=rate)
    before = sample("stampd_subscriber_refusals_total", tsu="/tsa", reason="rate")
    answer = call(make_app(unit, ledger, rule=SUBSCRIBERS_ONLY), client="192.0.2.1")
    assert answer.status == 429 and answer.headers[b"retry-after"] == b"1" and unit.calls == []
    assert sample("stampd_subscriber_refusals_total", tsu="/tsa", reason="rate") - before == 1
    ledger.full = TooManyRequests("subscriber acme: total quota spent (5 tokens)", retry_after_s=86400)
    before = sample("stampd_subscriber_refusals_total", tsu="/tsa", reason="quota")
    answer = call(make_app(unit, ledger, rule=SUBSCRIBERS_ONLY), client="192.0.2.1")
    assert answer.status == 429 and answer.headers[b"retry-after"] == b"86400"
    assert sample("stampd_subscriber_refusals_total", tsu="/tsa", reason="quota") - before == 1


def test_malformed_body_reserves_nothing() -> None:
    ledger = FakeLedger()
    answer = call(make_app(FakeUnit(), ledger, rule=SUBSCRIBERS_ONLY), client="192.0.2.1", body=b"junk")
    assert answer.status == 400 and ledger.reserved == []


@pytest.mark.parametrize("unit", [FakeUnit(BAD_ALG), FakeUnit(fails=True)], ids=["rejected", "error"])
def test_a_reservation_is_released_unless_a_token_is_granted(unit: FakeUnit) -> None:
    ledger = FakeLedger()
    call(make_app(unit, ledger, rule=SUBSCRIBERS_ONLY), client="192.0.2.1")
    assert ledger.reserved == ["acme"] and ledger.released == [Reservation("acme", ("day:x",))]


# --- trusted proxies ---


def test_forwarded_address_and_certificate_are_believed_only_from_a_trusted_proxy() -> None:
    proxied = {"X-Forwarded-For": "198.51.100.1, 192.0.2.44", "X-Client-Certificate": urllib.parse.quote(PEM)}
    unit = FakeUnit()
    app = make_app(unit, rule=SUBSCRIBERS_ONLY, proxies=("127.0.0.1/32",))
    assert call(app, client="127.0.0.1", headers={"X-Forwarded-For": "198.51.100.1, 192.0.2.44"}).status == 200
    assert unit.calls[-1][:2] == ("192.0.2.44", "acme")  # the rightmost entry the proxy wrote, not the client's
    assert call(app, client="127.0.0.1", headers=proxied).status == 200
    assert unit.calls[-1][:2] == ("192.0.2.44", "certified")
    assert call(app, client="::ffff:127.0.0.1", headers=proxied).status == 200  # a dual-stack socket's view
    listed_mapped = make_app(FakeUnit(), rule=SUBSCRIBERS_ONLY, proxies=("::ffff:127.0.0.1/128",))
    assert call(listed_mapped, client="127.0.0.1", headers=proxied).status == 200
    assert call(app, client="10.2.2.2", headers=proxied).status == 401  # not a proxy: its headers are ignored
    garbled = {"X-Client-Certificate": "not-a-certificate"}
    assert call(app, client="127.0.0.1", headers=garbled).status == 401
    # From a trusted proxy, the certificate of the proxy's own TLS connection identifies nobody.
    own = {"tls": {"client_cert_der": CERT_DER}}
    assert call(app, client="127.0.0.1", extensions=own).status == 401


def test_a_forwarded_for_line_of_the_proxy_after_the_clients_own_is_the_one_believed() -> None:
    """A proxy may add its X-Forwarded-For as a header line of its own after one the client sent (HAProxy's
    ``option forwardfor``): the lines form one list (RFC 9110 §5.3), and its rightmost untrusted entry is the
    client's address, not the client's forged first line."""
    unit = FakeUnit()
    app = make_app(unit, rule=SUBSCRIBERS_ONLY, proxies=("127.0.0.1/32",))
    forged_then_real = (("X-Forwarded-For", "192.0.2.44"), ("X-Forwarded-For", "203.0.113.5"))
    assert call(app, client="127.0.0.1", repeated=forged_then_real).status == 200
    assert unit.calls[-1][:2] == ("203.0.113.5", "other")
    unlisted = (("X-Forwarded-For", "192.0.2.44"), ("X-Forwarded-For", "10.20.30.40"))
    assert call(app, client="127.0.0.1", repeated=unlisted).status == 401
    not_an_address = (("X-Forwarded-For", "192.0.2.44"), ("X-Forwarded-For", "unknown"))
    assert call(app, client="127.0.0.1", repeated=not_an_address).status == 401  # never the forged one instead


def test_public_tsu_records_the_forwarded_address_from_a_trusted_proxy() -> None:
    unit = FakeUnit()
    app = make_app(unit, proxies=("::1/128", "127.0.0.1/32"))
    call(app, client="::1", headers={"X-Forwarded-For": "2001:db8::1"})
    call(app, client="10.3.3.3", headers={"X-Forwarded-For": "2001:db8::1"})
    assert [c[0] for c in unit.calls] == ["2001:db8::1", "10.3.3.3"]


def test_reloaded_subscribers_take_effect_for_the_next_request() -> None:
    unit, ledger = FakeUnit(), FakeLedger()
    app = make_app(unit, ledger, rule=SUBSCRIBERS_ONLY)
    assert call(app, client="192.0.2.1").status == 200
    disabled = SubscriberDirectory([Subscriber("acme", enabled=False, networks=(ip_network("192.0.2.0/24"),))])
    app.replace_subscribers(disabled, ledger)
    assert call(app, client="192.0.2.1").status == 403


# --- cancelled requests and slow password checks ---


@dataclass
class GatedUnit:
    """Answers ``reply`` once ``gate`` is set: a token being signed and recorded while the request is cancelled."""

    reply: Reply
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def respond(self, request: TimeStampRequest, requester: str | None, subscriber: str | None = None) -> Reply:
        self.started.set()
        await self.gate.wait()
        return self.reply


@dataclass
class GatedLedger(FakeLedger):
    """Reserves once ``gate`` is set: a reservation under way in the database while the request is cancelled."""

    gate: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)

    async def reserve(self, subscriber: Subscriber, now_us: int) -> Reservation:
        self.started.set()
        await self.gate.wait()
        return await super().reserve(subscriber, now_us)


def _cancel_midway(app: TimeStampApp, started: asyncio.Event, gate: asyncio.Event) -> list[dict[str, Any]]:
    """Start a request from 192.0.2.1, cancel it once ``started`` is set, then let the work under way finish
    (``gate``) and the event loop settle; returns what was sent (nothing)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "POST",
        "path": "/tsa",
        "client": ("192.0.2.1", 50000),
        "headers": [(b"content-type", b"application/timestamp-query"), (b"content-length", str(len(BODY)).encode())],
    }

    async def scenario() -> None:
        request = asyncio.ensure_future(app(scope, receive, send))
        await started.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        gate.set()
        for _ in range(20):
            await asyncio.sleep(0)

    asyncio.run(scenario())
    return sent


@pytest.mark.parametrize(
    ("reply", "released"), [(GRANTED, False), (BAD_ALG, True)], ids=["granted-anyway", "rejected-anyway"]
)
def test_a_request_cancelled_while_issuing_keeps_its_reservation_exactly_when_a_token_was_granted(
    reply: Reply, released: bool
) -> None:
    """Issue 6, quotas exact: a request cancelled while its token is signed and recorded (the records may commit it
    all the same) gives its reservation back only once the issuance is over and granted nothing; a token recorded
    after the cancellation stays counted, so the usage report never shows more tokens than the quota."""
    unit, ledger = GatedUnit(reply), FakeLedger()
    sent = _cancel_midway(make_app(unit, ledger, rule=SUBSCRIBERS_ONLY), unit.started, unit.gate)
    assert sent == [] and ledger.reserved == ["acme"]
    assert ledger.released == ([Reservation("acme", ("day:x",))] if released else [])


def test_a_request_cancelled_while_reserving_gives_the_reservation_back_once_it_is_made() -> None:
    """A request cancelled while the ledger reserves (the transaction or script completes regardless) issues
    nothing and gives the reservation back when it arrives, instead of leaking it (an over-count)."""
    unit, ledger = FakeUnit(), GatedLedger()
    sent = _cancel_midway(make_app(unit, ledger, rule=SUBSCRIBERS_ONLY), ledger.started, ledger.gate)
    assert sent == [] and unit.calls == []
    assert ledger.reserved == ["acme"] and ledger.released == [Reservation("acme", ("day:x",))]


def test_slow_password_checks_run_at_most_two_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wrong passwords for a known basic user each cost a slow hash (scrypt: tens of ms, 32 MiB): twelve at once
    run at most SLOW_CHECKS_AT_ONCE at a time, off the event loop, and each is refused with 401."""
    running, most = 0, 0
    lock = threading.Lock()

    def slow_verify(password: str, encoded: str) -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return False

    monkeypatch.setattr(access, "verify_password", slow_verify)
    unit = FakeUnit()
    app = make_app(unit, rule=SUBSCRIBERS_ONLY)
    statuses: list[int] = []

    async def one(index: int) -> None:
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": BODY, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        authorization = basic("bob", f"wrong {index}").encode()
        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "POST",
            "path": "/tsa",
            "client": ("10.1.1.1", 50000),
            "headers": [(b"content-length", str(len(BODY)).encode()), (b"authorization", authorization)],
        }
        await app(scope, receive, send)
        statuses.append(sent[0]["status"])

    async def scenario() -> None:
        await asyncio.gather(*(one(i) for i in range(12)))

    asyncio.run(scenario())
    assert statuses == [401] * 12 and unit.calls == []
    assert most == SLOW_CHECKS_AT_ONCE == 2
