"""Who may time-stamp, and how much: subscribers, their credentials, quotas and rate limits (issue 6).

Pure: no I/O, no clock, no randomness. Times arrive as arguments (microseconds since the epoch, UTC), salts from
the caller, and the counting itself is behind the :class:`UsageLedger` port (stampd.records.usage and
stampd.records.redis_usage implement it). The token never identifies the requester (SPEC REQ-14): what is decided
here only admits or refuses a request, and names the subscriber in the records.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Literal, Protocol, TypeVar, cast, get_args

from stampd.errors import Forbidden, TooManyRequests, Unauthorized

Period = Literal["hour", "day", "month", "total"]
PERIODS: tuple[Period, ...] = get_args(Period)

MAX_QUOTA = 2**62
"""Quotas and rates fit a signed 64-bit counter in every ledger."""

_US_PER_S = 1_000_000
_US_PER_HOUR = 3600 * _US_PER_S
_US_PER_DAY = 24 * _US_PER_HOUR
_EPOCH = date(1970, 1, 1)
TOTAL_RETRY_AFTER_S = 86400
"""A spent total quota never resets: the client is told to come back in a day (after the operator raised it)."""

_QUOTA = re.compile(r"([0-9]+)/([a-z]+)", re.ASCII)
_RATE = re.compile(r"([0-9]+)(?:/s)?", re.ASCII)


def _day(now_us: int) -> date:
    return _EPOCH + timedelta(days=now_us // _US_PER_DAY)


def _us(day: date) -> int:
    return (day - _EPOCH).days * _US_PER_DAY


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us // _US_PER_S, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _count(text: str, what: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_QUOTA:
        raise ValueError(f"{what} must be between 1 and {MAX_QUOTA}, not {value}")
    return value


@dataclass(frozen=True, slots=True)
class Quota:
    """At most ``limit`` granted tokens per UTC calendar hour, day or month, or in total."""

    limit: int
    period: Period

    @classmethod
    def parse(cls, text: str) -> Quota:
        """``N/PERIOD``, e.g. ``1000/day``; ValueError naming what is wrong."""
        match = _QUOTA.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"expected N/PERIOD with PERIOD one of {', '.join(PERIODS)} (e.g. 1000/day), not {text!r}")
        period = match.group(2)
        if period not in PERIODS:
            raise ValueError(f"unknown quota period {period!r}: expected one of {', '.join(PERIODS)}")
        return cls(_count(match.group(1), "a quota"), cast(Period, period))

    def __str__(self) -> str:
        return f"{self.limit}/{self.period}"

    def window(self, now_us: int) -> tuple[str, int | None]:
        """The key of the window ``now_us`` falls in (``hour:2026-11-21T13``, ``day:2026-11-21``, ``month:2026-11``,
        ``total``) and the instant it resets, in µs (None for ``total``): UTC calendar periods, so a month is
        28 to 31 days and billing lines up with calendar months."""
        if self.period == "total":
            return "total", None
        if self.period == "hour":
            start = now_us - now_us % _US_PER_HOUR
            return f"hour:{_iso(start)[:13]}", start + _US_PER_HOUR
        day = _day(now_us)
        if self.period == "day":
            return f"day:{day.isoformat()}", _us(day) + _US_PER_DAY
        following = date(day.year + 1, 1, 1) if day.month == 12 else date(day.year, day.month + 1, 1)
        return f"month:{day.year:04d}-{day.month:02d}", _us(following)


def parse_rate(text: str) -> int:
    """``N/s`` (or ``N``): requests per second; ValueError naming what is wrong."""
    match = _RATE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"expected N/s (requests per second, e.g. 10/s), not {text!r}")
    return _count(match.group(1), "a rate")


def rate_window(now_us: int) -> tuple[str, int]:
    """The one-second window of the rate limit (``s:<epoch second>``) and when it resets."""
    second = now_us // _US_PER_S
    return f"s:{second}", (second + 1) * _US_PER_S


Network = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True)
class Subscriber:
    """A contracted client: how it is recognised, whether it is enabled, and what it may use.

    ``tsus`` restricts it to the named TSUs (None: every TSU that serves subscribers). ``quotas`` holds at most one
    quota per period (e.g. one per month and one in total)."""

    name: str
    enabled: bool = True
    networks: tuple[Network, ...] = ()
    token_sha256: bytes | None = None
    basic_user: str | None = None
    basic_hash: str | None = None
    cert_sha256: tuple[bytes, ...] = ()
    quotas: tuple[Quota, ...] = ()
    rate_per_s: int | None = None
    tsus: frozenset[str] | None = None

    def __post_init__(self) -> None:
        periods = [q.period for q in self.quotas]
        if len(set(periods)) != len(periods):
            raise ValueError(f"subscriber {self.name}: at most one quota per period, not {', '.join(periods)}")
        if (self.basic_user is None) != (self.basic_hash is None):
            raise ValueError(f"subscriber {self.name}: a basic user needs a password hash, and only one")


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a request presented: its source address, an Authorization header's bearer token or basic user and
    password, and the verified client certificate (native TLS, or passed by a trusted proxy)."""

    address: str | None = None
    bearer: str | None = None
    basic: tuple[str, str] | None = None
    client_cert_der: bytes | None = None

    @classmethod
    def from_authorization(
        cls, address: str | None, header_value: bytes | None, client_cert_der: bytes | None = None
    ) -> Credentials:
        """Parse ``Authorization: Bearer <token>`` or ``Basic <base64(user:password)>`` (RFC 6750, RFC 7617);
        any other scheme or a malformed value raises Unauthorized (it never silently falls back to the address).
        The messages never repeat what was presented."""
        if not header_value:
            return cls(address, None, None, client_cert_der)
        if len(header_value) > 4096:
            raise Unauthorized("the Authorization header is too long")
        try:
            text = header_value.decode("ascii")
        except UnicodeDecodeError:
            raise Unauthorized("the Authorization header is not ASCII") from None
        scheme, _, value = text.strip().partition(" ")
        value = value.strip()
        if not value or any(c in value for c in " \t\r\n"):
            raise Unauthorized("malformed Authorization header: expected 'Bearer TOKEN' or 'Basic CREDENTIALS'")
        if scheme.lower() == "bearer":
            return cls(address, value, None, client_cert_der)
        if scheme.lower() == "basic":
            return cls(address, None, _basic(value), client_cert_der)
        raise Unauthorized("unsupported Authorization scheme: expected Bearer or Basic")


def _basic(value: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise Unauthorized("malformed Basic credentials: expected base64 of USER:PASSWORD in UTF-8") from None
    user, colon, password = decoded.partition(":")
    if not colon or not user:
        raise Unauthorized("malformed Basic credentials: expected base64 of USER:PASSWORD")
    return user, password


def hash_token(token: str) -> bytes:
    """SHA-256 of an API token: tokens are 256-bit random strings, so a fast hash is as safe as a slow one."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def cert_sha256(cert_der: bytes) -> bytes:
    """A client certificate's fingerprint, as subscribers list them."""
    return hashlib.sha256(cert_der).digest()


SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
SALT_BYTES = 16
_SCRYPT_MAX_N = 2**20
"""Bounds the work a stored hash may ask for, so that an edited row cannot stall a worker."""


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * r * n + 2**20, dklen=32)


def hash_password(password: str, salt: bytes) -> str:
    """A slow hash of a basic password (scrypt, n=2**15, r=8, p=1), as ``scrypt$n$r$p$salt_b64$hash_b64``; the
    caller draws ``salt`` (16 random bytes): the core has no randomness."""
    if len(salt) < SALT_BYTES:
        raise ValueError(f"the salt must be at least {SALT_BYTES} bytes")
    digest = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    b64 = base64.b64encode
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches ``encoded`` (from :func:`hash_password`); a malformed ``encoded`` is ValueError."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != "scrypt":
        raise ValueError("not a scrypt$n$r$p$salt$hash password hash")
    try:
        n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, expected = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except (ValueError, binascii.Error) as e:
        raise ValueError(f"malformed scrypt password hash: {e}") from None
    if not (2 <= n <= _SCRYPT_MAX_N and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16 and expected):
        raise ValueError("scrypt parameters out of range")
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), expected)


@dataclass(frozen=True, slots=True)
class AccessRule:
    """A TSU's access: public (anyone), or subscribers only (``subscribers``: the names it serves, None for every
    subscriber). ``tsu`` names the TSU, for subscribers restricted to some TSUs."""

    public: bool
    subscribers: frozenset[str] | None = None
    tsu: str | None = None


def authorize(rule: AccessRule, subscriber: Subscriber | None) -> None:
    """Admit the request or raise: Unauthorized (401) when nobody was identified, Forbidden (403) when the
    subscriber is disabled, not one this TSU serves, or restricted to other TSUs (also when the rule does not say
    which TSU it is: restricted subscribers fail closed)."""
    if rule.public:
        return
    if subscriber is None:
        raise Unauthorized("this time-stamping unit serves subscribers only: present your credentials")
    if not subscriber.enabled:
        raise Forbidden(f"subscriber {subscriber.name} is disabled")
    if rule.subscribers is not None and subscriber.name not in rule.subscribers:
        raise Forbidden(f"subscriber {subscriber.name} is not served by this time-stamping unit")
    if subscriber.tsus is not None and (rule.tsu is None or rule.tsu not in subscriber.tsus):
        raise Forbidden(f"subscriber {subscriber.name} may not use this time-stamping unit")


def _unmapped(address: IPv4Address | IPv6Address) -> IPv4Address | IPv6Address:
    """An IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 client) as the IPv4 address it is."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_IPV4_MAPPED = IPv6Network("::ffff:0:0/96")


def unmapped_network(network: Network) -> Network:
    """A network of IPv4-mapped IPv6 addresses (``::ffff:192.0.2.0/120``) as the IPv4 network it is
    (``192.0.2.0/24``): addresses are matched unmapped, so listed as mapped it would otherwise match nobody."""
    if isinstance(network, IPv6Network) and network.prefixlen >= 96 and network.subnet_of(_IPV4_MAPPED):
        mapped = network.network_address.ipv4_mapped
        assert mapped is not None
        return IPv4Network((mapped, network.prefixlen - 96))
    return network


CACHE_SIZE = 4096
"""Basic credentials whose slow hash was checked, remembered per directory (a reload starts afresh)."""


@dataclass(slots=True)
class _VerifiedCache:
    """The keys (:func:`_credential_key`) of credentials whose slow hash matched, oldest first: the slow hash runs
    once per credential. Only successes enter, so wrong passwords cannot evict the subscribers' entries."""

    size: int
    entries: dict[bytes, None] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __contains__(self, key: bytes) -> bool:
        with self.lock:
            return key in self.entries

    def add(self, key: bytes) -> None:
        with self.lock:
            if len(self.entries) >= self.size:
                self.entries.pop(next(iter(self.entries)))
            self.entries[key] = None


def _credential_key(basic_hash: str, user: str, password: str) -> bytes:
    """HMAC-SHA256 of user and password keyed with the stored scrypt string: salted per subscriber, so what the
    cache holds is no unsalted fast hash of a password to crack against precomputed tables, and a new password
    hash (a password changed, even to the same text) never matches a check made against the old one."""
    user_bytes = user.encode("utf-8")
    message = len(user_bytes).to_bytes(4, "big") + user_bytes + password.encode("utf-8")
    return hmac.new(basic_hash.encode("ascii", "replace"), message, hashlib.sha256).digest()


_Key = TypeVar("_Key", bytes, str)


def _claim(index: dict[_Key, Subscriber], key: _Key, subscriber: Subscriber, what: str) -> None:
    other = index.get(key)
    if other is not None and other.name != subscriber.name:
        raise ValueError(f"{what} is already used by subscriber {other.name}, so not by {subscriber.name}")
    index[key] = subscriber


class SubscriberDirectory:
    """An immutable snapshot of the subscribers, indexed for :meth:`identify`. Building it refuses identifiers
    claimed by two subscribers (a network, a token, a basic user, a certificate): ValueError naming both."""

    def __init__(self, subscribers: Iterable[Subscriber], *, cache_size: int = CACHE_SIZE) -> None:
        self._by_name: dict[str, Subscriber] = {}
        self._by_token: dict[bytes, Subscriber] = {}
        self._by_user: dict[str, Subscriber] = {}
        self._by_cert: dict[bytes, Subscriber] = {}
        self._by_network: dict[tuple[int, int], dict[int, Subscriber]] = {}
        for subscriber in subscribers:
            self._add(subscriber)
        self._prefixes = {
            version: sorted((plen for v, plen in self._by_network if v == version), reverse=True) for version in (4, 6)
        }
        self._cache = _VerifiedCache(cache_size)

    def _add(self, subscriber: Subscriber) -> None:
        if subscriber.name in self._by_name:
            raise ValueError(f"subscriber {subscriber.name} is listed twice")
        self._by_name[subscriber.name] = subscriber
        if subscriber.token_sha256 is not None:
            _claim(self._by_token, subscriber.token_sha256, subscriber, "the API token")
        if subscriber.basic_user is not None:
            _claim(self._by_user, subscriber.basic_user, subscriber, f"the basic user {subscriber.basic_user!r}")
        for fingerprint in subscriber.cert_sha256:
            _claim(self._by_cert, fingerprint, subscriber, f"the certificate with SHA-256 {fingerprint.hex()}")
        for listed in subscriber.networks:
            network = unmapped_network(listed)
            table = self._by_network.setdefault((network.version, network.prefixlen), {})
            other = table.get(int(network.network_address))
            if other is not None and other.name != subscriber.name:
                raise ValueError(f"the network {network} is already used by subscriber {other.name}")
            table[int(network.network_address)] = subscriber

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Subscriber | None:
        return self._by_name.get(name)

    @property
    def subscribers(self) -> tuple[Subscriber, ...]:
        return tuple(self._by_name.values())

    def needs_slow_check(self, credentials: Credentials) -> bool:
        """Whether :meth:`identify` will run the slow password hash (tens of ms): the server then calls it in a
        thread, off the event loop."""
        if credentials.client_cert_der is not None or credentials.bearer is not None or credentials.basic is None:
            return False
        user, password = credentials.basic
        subscriber = self._by_user.get(user)
        if subscriber is None or subscriber.basic_hash is None:
            return False
        return _credential_key(subscriber.basic_hash, user, password) not in self._cache

    def identify(self, credentials: Credentials) -> Subscriber | None:
        """The subscriber these credentials identify, or None when none were presented and the address is in no
        subscriber's networks. Precedence: client certificate, bearer token, basic credentials, source address
        (the longest prefix wins). Credentials presented that match nobody raise Unauthorized: a wrong token is
        never excused by a listed address. A disabled subscriber is returned (authorize refuses it with 403)."""
        if credentials.client_cert_der is not None:
            return self._certificate(credentials.client_cert_der)
        if credentials.bearer is not None:
            return self._token(credentials.bearer)
        if credentials.basic is not None:
            return self._basic(*credentials.basic)
        if credentials.address is None:
            return None
        return self._by_address(credentials.address)

    # Secrets are looked up by SHA-256 and then compared with the subscriber's own value in constant time: the
    # dict lookup's timing depends on the digest only, and learning a digest's prefix does not reveal a token.

    def _certificate(self, cert_der: bytes) -> Subscriber:
        digest = cert_sha256(cert_der)
        subscriber = self._by_cert.get(digest)
        if subscriber is None or not any(hmac.compare_digest(f, digest) for f in subscriber.cert_sha256):
            raise Unauthorized("unknown client certificate")
        return subscriber

    def _token(self, token: str) -> Subscriber:
        digest = hash_token(token)
        subscriber = self._by_token.get(digest)
        stored = None if subscriber is None else subscriber.token_sha256
        if subscriber is None or stored is None or not hmac.compare_digest(stored, digest):
            raise Unauthorized("unknown API token")
        return subscriber

    def _basic(self, user: str, password: str) -> Subscriber:
        subscriber = self._by_user.get(user)
        if subscriber is None or subscriber.basic_hash is None:
            raise Unauthorized("unknown user or wrong password")
        key = _credential_key(subscriber.basic_hash, user, password)
        if key in self._cache:
            return subscriber
        try:
            verified = verify_password(password, subscriber.basic_hash)
        except ValueError:
            verified = False
        if not verified:
            raise Unauthorized("unknown user or wrong password")
        self._cache.add(key)
        return subscriber

    def _by_address(self, text: str) -> Subscriber | None:
        try:
            address = _unmapped(ip_address(text.split("%", 1)[0]))
        except ValueError:
            return None  # a Unix socket or a proxy's placeholder: no address to match
        bits = 32 if address.version == 4 else 128
        value = int(address)
        for prefixlen in self._prefixes[address.version]:
            mask = ((1 << prefixlen) - 1) << (bits - prefixlen)
            found = self._by_network[(address.version, prefixlen)].get(value & mask)
            if found is not None:
                return found
        return None


@dataclass(frozen=True, slots=True)
class UsageLimit:
    """One counter a grant must fit in: a quota's window or the rate's second."""

    window: str
    limit: int
    resets_at_us: int | None
    what: str
    kind: Literal["quota", "rate"] = "quota"


def usage_limits(subscriber: Subscriber, now_us: int) -> tuple[UsageLimit, ...]:
    """The counters one more token of ``subscriber`` at ``now_us`` must fit in, quotas first, then the rate: every
    ledger takes them in this order, so that concurrent reservations lock them in the same order."""
    limits = []
    for quota in subscriber.quotas:
        window, resets = quota.window(now_us)
        limits.append(UsageLimit(window, quota.limit, resets, f"quota {quota}"))
    if subscriber.rate_per_s is not None:
        window, second_ends = rate_window(now_us)
        rate = subscriber.rate_per_s
        limits.append(UsageLimit(window, rate, second_ends, f"rate limit {rate}/s", "rate"))
    return tuple(limits)


def over_limit(subscriber: Subscriber, limit: UsageLimit, now_us: int) -> TooManyRequests:
    """The 429 for a full counter, with Retry-After: the seconds until that window resets (at least 1)."""
    if limit.resets_at_us is None:
        return TooManyRequests(
            f"subscriber {subscriber.name}: total quota spent ({limit.limit} tokens)", retry_after_s=TOTAL_RETRY_AFTER_S
        )
    retry_after_s = max(1, -(-(limit.resets_at_us - now_us) // _US_PER_S))
    return TooManyRequests(
        f"subscriber {subscriber.name}: {limit.what} reached; it resets at {_iso(limit.resets_at_us)}",
        retry_after_s=retry_after_s,
        limit=limit.kind,
    )


@dataclass(frozen=True, slots=True)
class Reservation:
    """The counters one request incremented: released (decremented) if the request is not granted after all."""

    subscriber: str
    windows: tuple[str, ...] = ()


class UsageLedger(Protocol):
    """Counts granted tokens per subscriber and window, exactly, across processes and nodes."""

    async def reserve(self, subscriber: Subscriber, now_us: int) -> Reservation:
        """Count one more token of ``subscriber`` in every window it is limited in, all or none; raises
        TooManyRequests (with Retry-After) when one is full."""
        ...

    async def release(self, reservation: Reservation) -> None:
        """Undo a reservation whose request was not granted (a TSP rejection, an error): only granted tokens
        count."""
        ...
