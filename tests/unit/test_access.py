"""stampd.access: identifying subscribers, admitting them to TSUs, and the windows of their quotas (issue 6).

The token never identifies the requester (SPEC REQ-14): none of this reaches the token, only the decision to issue
it. Times are injected (GUIDE habit 10).
"""

from __future__ import annotations

import base64
import hashlib
import re
from datetime import UTC, datetime
from ipaddress import ip_network

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stampd.access import (
    TOTAL_RETRY_AFTER_S,
    AccessRule,
    Credentials,
    Quota,
    Subscriber,
    SubscriberDirectory,
    authorize,
    hash_password,
    hash_token,
    over_limit,
    parse_rate,
    rate_window,
    usage_limits,
    verify_password,
)
from stampd.errors import Forbidden, TooManyRequests, Unauthorized

SALT = bytes(range(16))
CERT_A = b"0\x82\x01\x00 certificate of a"
CERT_B = b"0\x82\x01\x00 certificate of b"
TOKEN_A = "stampd_" + "A" * 43
TOKEN_B = "stampd_" + "B" * 43
PASSWORD = "correct horse battery staple"


def us(text: str) -> int:
    moment = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


def basic_header(user: str, password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD, SALT)


@pytest.fixture
def directory(password_hash: str) -> SubscriberDirectory:
    return SubscriberDirectory(
        [
            Subscriber("wide", networks=(ip_network("10.0.0.0/8"), ip_network("2001:db8::/32"))),
            Subscriber("narrow", networks=(ip_network("10.1.0.0/16"), ip_network("2001:db8:1::/48"))),
            Subscriber("host", networks=(ip_network("10.1.2.3/32"), ip_network("::1/128"))),
            Subscriber("tokened", token_sha256=hash_token(TOKEN_A), networks=(ip_network("192.0.2.0/24"),)),
            Subscriber("basic", basic_user="carol", basic_hash=password_hash),
            Subscriber("certified", cert_sha256=(hashlib.sha256(CERT_A).digest(),)),
            Subscriber("off", enabled=False, token_sha256=hash_token(TOKEN_B)),
        ]
    )


def name(subscriber: Subscriber | None) -> str | None:
    return None if subscriber is None else subscriber.name


# --- quotas and windows ---


@pytest.mark.parametrize(
    ("text", "limit", "period"),
    [("1000/day", 1000, "day"), ("1/hour", 1, "hour"), (" 5000/month ", 5000, "month"), ("7/total", 7, "total")],
)
def test_quota_parse(text: str, limit: int, period: str) -> None:
    quota = Quota.parse(text)
    assert (quota.limit, quota.period) == (limit, period)
    assert Quota.parse(str(quota)) == quota


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1000", "expected N/PERIOD"),
        ("1000/week", "unknown quota period 'week'"),
        ("0/day", "between 1 and"),
        ("-5/day", "expected N/PERIOD"),
        ("1e3/day", "expected N/PERIOD"),
        ("١٢/day", "expected N/PERIOD"),  # Arabic-Indic digits: int() would accept them
        ("", "expected N/PERIOD"),
    ],
)
def test_quota_parse_refuses_with_a_clear_message(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Quota.parse(text)


@given(st.text(max_size=30))
def test_quota_parse_raises_only_value_error(text: str) -> None:
    try:
        quota = Quota.parse(text)
    except ValueError:
        return
    assert quota.limit >= 1
    assert Quota.parse(str(quota)) == quota


@given(st.integers(min_value=1, max_value=2**62), st.sampled_from(["hour", "day", "month", "total"]))
def test_quota_text_round_trips(limit: int, period: str) -> None:
    assert str(Quota.parse(f"{limit}/{period}")) == f"{limit}/{period}"


def test_parse_rate() -> None:
    assert parse_rate("10/s") == parse_rate("10") == 10
    for bad in ("10/min", "0/s", "ten"):
        with pytest.raises(ValueError):
            parse_rate(bad)


@pytest.mark.parametrize(
    ("period", "now", "window", "resets"),
    [
        ("hour", "2026-11-21 13:59:59.999999", "hour:2026-11-21T13", "2026-11-21 14:00:00"),
        ("hour", "2026-12-31 23:00:00", "hour:2026-12-31T23", "2027-01-01 00:00:00"),
        ("day", "2026-11-21 00:00:00", "day:2026-11-21", "2026-11-22 00:00:00"),
        ("day", "2028-02-28 23:59:59.999999", "day:2028-02-28", "2028-02-29 00:00:00"),  # leap year
        ("day", "2028-02-29 12:00:00", "day:2028-02-29", "2028-03-01 00:00:00"),
        ("month", "2026-11-30 23:59:59.999999", "month:2026-11", "2026-12-01 00:00:00"),
        ("month", "2026-12-01 00:00:00", "month:2026-12", "2027-01-01 00:00:00"),  # year boundary
        ("month", "2028-02-10 08:00:00", "month:2028-02", "2028-03-01 00:00:00"),  # 29 days
        ("month", "2027-02-10 08:00:00", "month:2027-02", "2027-03-01 00:00:00"),  # 28 days
        ("month", "2100-02-28 08:00:00", "month:2100-02", "2100-03-01 00:00:00"),  # not a leap year
        ("month", "1969-12-31 23:59:59", "month:1969-12", "1970-01-01 00:00:00"),  # before the epoch
    ],
)
def test_quota_windows_follow_the_utc_calendar(period: str, now: str, window: str, resets: str) -> None:
    assert Quota(5, period).window(us(now)) == (window, us(resets))  # type: ignore[arg-type]


def test_total_window_never_resets() -> None:
    assert Quota(5, "total").window(us("2026-11-21 13:00:00")) == ("total", None)


def test_a_subscriber_has_at_most_one_quota_per_period() -> None:
    Subscriber("ok", quotas=(Quota(100, "month"), Quota(5000, "total")))
    with pytest.raises(ValueError, match="at most one quota per period"):
        Subscriber("twice", quotas=(Quota(100, "day"), Quota(50, "day")))


def test_usage_limits_and_the_429_they_give() -> None:
    now = us("2026-11-21 23:59:30.250000")
    subscriber = Subscriber("s", quotas=(Quota(100, "day"), Quota(5000, "total")), rate_per_s=10)
    limits = usage_limits(subscriber, now)
    assert [(w.window, w.limit) for w in limits] == [("day:2026-11-21", 100), ("total", 5000), ("s:1795305570", 10)]
    assert rate_window(now) == ("s:1795305570", us("2026-11-21 23:59:31"))
    day = over_limit(subscriber, limits[0], now)
    assert isinstance(day, TooManyRequests)
    assert day.http_status == 429
    assert day.retry_after_s == 30  # 29.75 s until midnight, rounded up
    assert "quota 100/day reached" in str(day)
    total = over_limit(subscriber, limits[1], now)
    assert total.retry_after_s == TOTAL_RETRY_AFTER_S
    assert "total quota spent" in str(total)
    rate = over_limit(subscriber, limits[2], now)
    assert rate.retry_after_s == 1  # never 0
    assert [day.limit, total.limit, rate.limit] == ["quota", "quota", "rate"]
    assert usage_limits(Subscriber("free"), now) == ()


# --- credentials ---


def test_authorization_header_parsing() -> None:
    assert Credentials.from_authorization("::1", None) == Credentials("::1")
    assert Credentials.from_authorization("::1", b"") == Credentials("::1")
    assert Credentials.from_authorization(None, b"Bearer abc.DEF-1_~+/=").bearer == "abc.DEF-1_~+/="
    assert Credentials.from_authorization(None, b"bearer  tok ").bearer == "tok"
    basic = Credentials.from_authorization("1.2.3.4", basic_header("carol", "pa:ss word"), b"cert")
    assert basic == Credentials("1.2.3.4", None, ("carol", "pa:ss word"), b"cert")


@pytest.mark.parametrize(
    "header",
    [
        b"Bearer",
        b"Bearer ",
        b"Bearer a b",
        b"Digest username=x",
        b"Basic !!!!",
        b"Basic " + base64.b64encode(b"no colon"),
        b"Basic " + base64.b64encode(b":no user"),
        b"Basic " + base64.b64encode(b"\xff\xfe:x"),
        "Bearer t\u00f6ken".encode(),
        b"Bearer " + b"x" * 5000,
    ],
)
def test_malformed_authorization_is_unauthorized(header: bytes) -> None:
    with pytest.raises(Unauthorized) as refused:
        Credentials.from_authorization("127.0.0.1", header)
    assert refused.value.http_status == 401


@given(st.binary(max_size=200) | st.text(max_size=100).map(lambda t: ("Basic " + t).encode()))
def test_authorization_parsing_raises_only_unauthorized(header: bytes) -> None:
    try:
        credentials = Credentials.from_authorization("127.0.0.1", header)
    except Unauthorized:
        return
    assert credentials.bearer is not None or credentials.basic is not None or not header


@given(st.text(min_size=1, max_size=20).filter(lambda u: ":" not in u), st.text(max_size=20))
def test_basic_credentials_round_trip(user: str, password: str) -> None:
    credentials = Credentials.from_authorization(None, basic_header(user, password))
    assert credentials.basic == (user, password)


# --- identification ---


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("10.200.0.1", "wide"),
        ("10.1.9.9", "narrow"),
        ("10.1.2.3", "host"),  # /32 beats /16 beats /8
        ("10.1.2.4", "narrow"),
        ("::ffff:10.1.2.3", "host"),  # an IPv4 client seen through a dual-stack socket
        ("2001:db8:ffff::1", "wide"),
        ("2001:db8:1::5", "narrow"),
        ("::1", "host"),
        ("fe80::1%lo", None),
        ("11.0.0.1", None),
        ("2001:db9::1", None),
        ("unix:/run/stampd.sock", None),
    ],
)
def test_source_address_longest_prefix_wins(directory: SubscriberDirectory, address: str, expected: str) -> None:
    assert name(directory.identify(Credentials(address))) == expected


def test_precedence_certificate_token_basic_address(directory: SubscriberDirectory) -> None:
    everything = Credentials("10.1.2.3", TOKEN_A, None, CERT_A)
    assert name(directory.identify(everything)) == "certified"
    assert name(directory.identify(Credentials("10.1.2.3", TOKEN_A))) == "tokened"
    assert name(directory.identify(Credentials("10.1.2.3", None, ("carol", PASSWORD)))) == "basic"
    assert name(directory.identify(Credentials("10.1.2.3"))) == "host"
    assert directory.identify(Credentials(None)) is None


@pytest.mark.parametrize(
    "credentials",
    [
        Credentials("10.1.2.3", "stampd_wrong"),  # a listed address does not excuse a wrong token
        Credentials("192.0.2.1", TOKEN_A[:-1]),
        Credentials("10.1.2.3", None, ("carol", "wrong password")),
        Credentials("10.1.2.3", None, ("mallory", PASSWORD)),
        Credentials("10.1.2.3", TOKEN_A, None, CERT_B),  # an unknown certificate is not excused by a good token
    ],
)
def test_presented_credentials_that_match_nobody_are_unauthorized(
    directory: SubscriberDirectory, credentials: Credentials
) -> None:
    with pytest.raises(Unauthorized) as refused:
        directory.identify(credentials)
    message = str(refused.value)  # it is sent to the client: it never repeats what was presented
    assert PASSWORD not in message
    assert credentials.bearer is None or credentials.bearer not in message


def test_the_slow_hash_runs_once_per_credential(directory: SubscriberDirectory) -> None:
    good = Credentials("10.1.2.3", None, ("carol", PASSWORD))
    bad = Credentials("10.1.2.3", None, ("carol", "not the password"))
    assert directory.needs_slow_check(good)
    assert name(directory.identify(good)) == "basic"
    assert not directory.needs_slow_check(good)  # cached: identify may run on the event loop
    assert directory.needs_slow_check(bad)
    with pytest.raises(Unauthorized):
        directory.identify(bad)
    assert directory.needs_slow_check(bad)  # failures are never cached
    assert not directory.needs_slow_check(Credentials(None, None, ("mallory", PASSWORD)))  # refused at once
    assert not directory.needs_slow_check(Credentials(None, TOKEN_A, None))


def test_a_network_listed_as_ipv4_mapped_ipv6_matches_its_ipv4_clients() -> None:
    """A dual-stack socket shows an IPv4 client as ::ffff:a.b.c.d, and addresses are matched unmapped: a network
    listed in that form is matched as the IPv4 network it is, whichever form the address arrives in."""
    mapped = SubscriberDirectory([Subscriber("mapped", networks=(ip_network("::ffff:192.0.2.0/120"),))])
    for address in ("192.0.2.77", "::ffff:192.0.2.77"):
        assert name(mapped.identify(Credentials(address))) == "mapped"
    assert mapped.identify(Credentials("192.0.3.1")) is None
    with pytest.raises(ValueError, match="already used by subscriber mapped"):
        SubscriberDirectory([*mapped.subscribers, Subscriber("plain", networks=(ip_network("192.0.2.0/24"),))])


def test_the_password_cache_holds_only_salted_keys_tied_to_the_stored_hash(password_hash: str) -> None:
    """What the cache keeps of a verified password is keyed with the subscriber's stored scrypt string: never an
    unsalted fast hash of user and password (crackable against precomputed tables from a memory dump), and a new
    hash of the same password (a reset, new salt) misses the entry made for the old one."""
    good = Credentials(None, None, ("carol", PASSWORD))
    first = SubscriberDirectory([Subscriber("basic", basic_user="carol", basic_hash=password_hash)])
    first.identify(good)
    (kept,) = first._cache.entries
    user = b"carol"
    unsalted = {
        hashlib.sha256(PASSWORD.encode()).digest(),
        hashlib.sha256(user + PASSWORD.encode()).digest(),
        hashlib.sha256(len(user).to_bytes(4, "big") + user + PASSWORD.encode()).digest(),
    }
    assert kept not in unsalted
    reset = SubscriberDirectory(
        [Subscriber("basic", basic_user="carol", basic_hash=hash_password(PASSWORD, SALT[::-1]))]
    )
    assert reset.needs_slow_check(good)
    reset.identify(good)
    assert set(reset._cache.entries).isdisjoint({kept})


def test_a_directory_refuses_an_identifier_claimed_twice() -> None:
    net = ip_network("10.0.0.0/8")
    with pytest.raises(ValueError, match=re.escape("the network 10.0.0.0/8 is already used by subscriber a")):
        SubscriberDirectory([Subscriber("a", networks=(net,)), Subscriber("b", networks=(net,))])
    with pytest.raises(ValueError, match="the API token is already used by subscriber a"):
        SubscriberDirectory([Subscriber("a", token_sha256=b"1" * 32), Subscriber("b", token_sha256=b"1" * 32)])
    with pytest.raises(ValueError, match="listed twice"):
        SubscriberDirectory([Subscriber("a"), Subscriber("a")])


# --- passwords ---


def test_password_hash_round_trip(password_hash: str) -> None:
    assert password_hash.startswith("scrypt$32768$8$1$")
    assert PASSWORD not in password_hash
    assert verify_password(PASSWORD, password_hash)
    assert not verify_password(PASSWORD + " ", password_hash)
    assert not verify_password("", password_hash)
    assert hash_password(PASSWORD, b"\x01" * 16) != password_hash  # the salt matters
    with pytest.raises(ValueError, match="at least 16 bytes"):
        hash_password(PASSWORD, b"short")
    for malformed in ("bcrypt$x", "scrypt$1$8$1$AAAA$AAAA", "scrypt$32768$8$1$!!$AAAA", f"{password_hash}$extra"):
        with pytest.raises(ValueError):
            verify_password(PASSWORD, malformed)


# --- authorization ---


def test_authorize() -> None:
    alice = Subscriber("alice")
    rule = AccessRule(public=False, subscribers=None, tsu="default")
    authorize(rule, alice)
    authorize(AccessRule(public=True), None)  # a public TSU serves anyone
    with pytest.raises(Unauthorized):
        authorize(rule, None)
    with pytest.raises(Forbidden, match="disabled") as disabled:
        authorize(rule, Subscriber("alice", enabled=False))
    assert disabled.value.http_status == 403
    with pytest.raises(Forbidden, match="not served"):
        authorize(AccessRule(public=False, subscribers=frozenset({"bob"})), alice)
    authorize(AccessRule(public=False, subscribers=frozenset({"alice"})), alice)


def test_a_subscriber_restricted_to_some_tsus() -> None:
    restricted = Subscriber("r", tsus=frozenset({"gold"}))
    authorize(AccessRule(public=False, tsu="gold"), restricted)
    with pytest.raises(Forbidden, match="may not use"):
        authorize(AccessRule(public=False, tsu="silver"), restricted)
    with pytest.raises(Forbidden, match="may not use"):
        authorize(AccessRule(public=False), restricted)  # a rule that does not name its TSU fails closed
