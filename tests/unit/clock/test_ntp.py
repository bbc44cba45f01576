"""NtpSource without a network: addresses, the error bound, and RFC 5905 §7.3/§8 checks on crafted replies.

SPEC OPS-01 (measured offset with its error), OPS-02 (an unusable source is detected), OPS-03 (no usable source,
no time). The replies are real NTP packets decoded by ntplib; only the UDP exchange is replaced.
"""

from __future__ import annotations

import struct
import sys
import time
from dataclasses import FrozenInstanceError
from pathlib import Path
from typing import Any

import ntplib  # type: ignore[import-untyped]
import pytest

from stampd.clock.ntp import (
    NtpSource,
    SourceError,
    SourceSample,
    SourceUnreachable,
    SourceUnusable,
    error_bound_s,
    parse_address,
)
from stampd.errors import ConfigError, StampdError

sys.path.insert(0, str(Path(__file__).parents[2]))

from clocktools import NTP_PACKET, ntp_short, ntp_timestamp


def reply_packet(
    *,
    origin: int,
    received_ns: int,
    transmit_ns: int,
    leap: int = 0,
    mode: int = 4,
    stratum: int = 2,
    root_delay_s: float = 0.010,
    root_dispersion_s: float = 0.020,
    ref_id: bytes = b"\x7f\x00\x00\x01",
    reference_ns: int | None = None,
) -> bytes:
    reference = ntp_timestamp(received_ns - 10**9) if reference_ns is None else reference_ns
    return NTP_PACKET.pack(
        leap << 6 | 4 << 3 | mode,
        stratum,
        4,
        -20,
        ntp_short(root_delay_s),
        ntp_short(root_dispersion_s),
        ref_id,
        reference,
        origin,
        ntp_timestamp(received_ns),
        ntp_timestamp(transmit_ns),
    )


class CraftedReply:
    """Replaces ntplib's UDP exchange: the server's clock is ours + ``offset_s``, the round trip ``delay_s``, and
    the server claims to have held the request ``residence_s`` between its receive and transmit timestamps."""

    def __init__(
        self,
        *,
        offset_s: float = 0.0,
        delay_s: float = 0.002,
        residence_s: float = 0.0,
        bogus_origin: bool = False,
        **fields: Any,
    ) -> None:
        self.offset_s = offset_s
        self.residence_s = residence_s
        self.delay_s = delay_s
        self.bogus_origin = bogus_origin
        self.fields = fields
        self.calls: list[tuple[str, int, int, float]] = []

    def request(self, host: str, version: int = 2, port: int = 123, timeout: float = 5) -> Any:
        self.calls.append((host, port, version, timeout))
        sent_ns = time.time_ns()
        origin = ntp_timestamp(sent_ns - (3600 * 10**9 if self.bogus_origin else 0))
        half = round(self.delay_s / 2 * 1e9)
        at_server = sent_ns + half + round(self.offset_s * 1e9)
        stats = ntplib.NTPStats()
        stats.from_data(
            reply_packet(
                origin=origin,
                received_ns=at_server,
                transmit_ns=at_server + round(self.residence_s * 1e9),
                **self.fields,
            )
        )
        dest_ns = sent_ns + 2 * half
        stats.dest_timestamp = ntplib.system_to_ntp_time(dest_ns / 1e9)
        return stats


@pytest.fixture
def crafted(monkeypatch: pytest.MonkeyPatch) -> Any:
    def install(**kwargs: Any) -> CraftedReply:
        fake = CraftedReply(**kwargs)
        monkeypatch.setattr(ntplib.NTPClient, "request", lambda client, host, **kw: fake.request(host, **kw))
        return fake

    return install


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:1234", ("127.0.0.1", 1234)),
        ("ntp.example:123", ("ntp.example", 123)),
        ("ntp.example", ("ntp.example", 123)),
        ("[::1]:4123", ("::1", 4123)),
        ("[2001:db8::1]", ("2001:db8::1", 123)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected


@pytest.mark.parametrize("address", ["::1", "::1:123", "[::1", "[::1]x", ":123", "host:0", "host:65536", "host:x"])
def test_bad_address_is_a_config_error(address: str) -> None:
    with pytest.raises(ConfigError, match=r"clock\.ntp_servers"):
        NtpSource(address, timeout_s=1.0)


def test_timeout_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        NtpSource("127.0.0.1:123", timeout_s=0)


def test_errors_are_stampd_errors() -> None:
    assert issubclass(SourceUnreachable, SourceError)
    assert issubclass(SourceUnusable, SourceError)
    assert issubclass(SourceError, StampdError)


def test_error_bound_is_half_delays_plus_dispersion() -> None:
    assert error_bound_s(delay_s=0.004, root_delay_s=0.010, root_dispersion_s=0.020) == pytest.approx(0.027)


def test_sample_from_a_good_reply(crafted: Any) -> None:
    fake = crafted(offset_s=2.0, delay_s=0.004, stratum=3, root_delay_s=0.010, root_dispersion_s=0.020)
    sample = NtpSource("[::1]:4123", timeout_s=0.5).query()
    assert fake.calls == [("::1", 4123, 4, 0.5)]
    assert sample.source == "[::1]:4123"
    assert sample.offset_s == pytest.approx(2.0, abs=1e-5)
    assert sample.delay_s == pytest.approx(0.004, abs=1e-5)
    assert sample.root_delay_s == pytest.approx(0.010, abs=1e-4)
    assert sample.root_dispersion_s == pytest.approx(0.020, abs=1e-4)
    assert (sample.stratum, sample.leap) == (3, 0)
    expected = error_bound_s(
        delay_s=sample.delay_s, root_delay_s=sample.root_delay_s, root_dispersion_s=sample.root_dispersion_s
    )
    assert sample.error_s == expected == pytest.approx(0.027, abs=1e-4)


def test_sample_is_frozen(crafted: Any) -> None:
    crafted()
    sample = NtpSource("127.0.0.1:123", timeout_s=0.5).query()
    assert isinstance(sample, SourceSample)
    with pytest.raises(FrozenInstanceError):
        sample.offset_s = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("leap", [1, 2])
def test_pending_leap_second_is_reported_not_refused(crafted: Any, leap: int) -> None:
    crafted(leap=leap)
    assert NtpSource("127.0.0.1:123", timeout_s=0.5).query().leap == leap


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"leap": 3}, "leap indicator 3"),
        ({"stratum": 16}, "stratum 16"),
        ({"stratum": 200}, "stratum 200"),
        ({"stratum": 0, "ref_id": b"RATE"}, "kiss-o'-death 'RATE'"),
        ({"reference_ns": 0}, "no reference time"),
    ],
)
def test_unsynchronised_source_is_unusable(crafted: Any, fields: dict[str, Any], message: str) -> None:
    crafted(**fields)
    with pytest.raises(SourceUnusable, match=message):
        NtpSource("127.0.0.1:123", timeout_s=0.5).query()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": 3}, "mode 3"),
        ({"bogus_origin": True}, "originate timestamp"),
        ({"residence_s": 0.5}, "negative round-trip delay"),
    ],
)
def test_invalid_reply_is_unreachable(crafted: Any, kwargs: dict[str, Any], message: str) -> None:
    crafted(**kwargs)
    with pytest.raises(SourceUnreachable, match=message):
        NtpSource("127.0.0.1:123", timeout_s=0.5).query()


def test_zero_transmit_timestamp_is_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    def request(client: object, host: str, **_: Any) -> Any:
        now = time.time_ns()
        stats = ntplib.NTPStats()
        data = bytearray(reply_packet(origin=ntp_timestamp(now), received_ns=now, transmit_ns=now))
        data[40:48] = struct.pack("!Q", 0)
        stats.from_data(bytes(data))
        stats.dest_timestamp = ntplib.system_to_ntp_time(time.time())
        return stats

    monkeypatch.setattr(ntplib.NTPClient, "request", request)
    with pytest.raises(SourceUnreachable, match="zero transmit timestamp"):
        NtpSource("127.0.0.1:123", timeout_s=0.5).query()


def test_ntplib_timeout_becomes_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def request(client: object, host: str, **_: Any) -> Any:
        raise ntplib.NTPException(f"No response received from {host}.")

    monkeypatch.setattr(ntplib.NTPClient, "request", request)
    with pytest.raises(SourceUnreachable, match=r"127.0.0.1:9: no valid reply within 0.25 s") as info:
        NtpSource("127.0.0.1:9", timeout_s=0.25).query()
    assert isinstance(info.value.__cause__, ntplib.NTPException)


def test_unresolvable_host_is_unreachable() -> None:
    with pytest.raises(SourceUnreachable, match="cannot resolve"):
        NtpSource("does-not-exist.invalid:123", timeout_s=0.25).query()
