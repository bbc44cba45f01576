"""NtpSource against real NTP servers on loopback: the tests' own FakeNtpServer and Debian's chronyd.

SPEC OPS-01 (measured offset and its error bound), OPS-02 (a +2 s offset is seen; a silent source is detected),
OPS-03 (an unsynchronised source is unusable). Offsets are measured between two clocks of this host, so nothing
depends on the wall clock being right.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stampd.clock.ntp import NtpSource, SourceSample, SourceUnreachable, SourceUnusable

sys.path.insert(0, str(Path(__file__).parents[1]))

from clocktools import FakeNtpServer, chrony_server

TIMEOUT_S = 0.5
# A loopback round trip through Python threads: generous, but far below the 1 s accuracy that is at stake.
LOOPBACK_ERROR_S = 0.05


@pytest.fixture
def fake_server() -> Iterator[FakeNtpServer]:
    with FakeNtpServer() as server:
        yield server


def test_offset_of_two_seconds_is_measured(fake_server: FakeNtpServer) -> None:
    fake_server.offset_s = 2.0
    sample = NtpSource(fake_server.address, timeout_s=TIMEOUT_S).query()
    assert isinstance(sample, SourceSample)
    assert sample.source == fake_server.address
    assert sample.offset_s == pytest.approx(2.0, abs=LOOPBACK_ERROR_S)
    assert 0 <= sample.delay_s < LOOPBACK_ERROR_S
    assert sample.error_s < LOOPBACK_ERROR_S
    assert abs(sample.offset_s - 2.0) <= sample.error_s + 1e-6  # the truth lies within the error bound
    assert (sample.stratum, sample.leap) == (2, 0)


def test_offset_changes_at_run_time(fake_server: FakeNtpServer) -> None:
    source = NtpSource(fake_server.address, timeout_s=TIMEOUT_S)
    assert source.query().offset_s == pytest.approx(0.0, abs=LOOPBACK_ERROR_S)
    fake_server.offset_s = -1.5
    assert source.query().offset_s == pytest.approx(-1.5, abs=LOOPBACK_ERROR_S)


def test_root_delay_and_dispersion_widen_the_error_bound(fake_server: FakeNtpServer) -> None:
    fake_server.root_delay_s = 0.200
    fake_server.root_dispersion_s = 0.300
    sample = NtpSource(fake_server.address, timeout_s=TIMEOUT_S).query()
    assert sample.root_delay_s == pytest.approx(0.200, abs=1e-4)
    assert sample.root_dispersion_s == pytest.approx(0.300, abs=1e-4)
    assert sample.error_s == pytest.approx(0.100 + 0.300 + sample.delay_s / 2, abs=1e-4)


def test_a_slow_reply_widens_the_error_bound(fake_server: FakeNtpServer) -> None:
    fake_server.reply_delay_s = 0.1
    sample = NtpSource(fake_server.address, timeout_s=TIMEOUT_S).query()
    assert sample.delay_s >= 0.1
    assert sample.error_s >= 0.05


def test_jitter_moves_the_offset_within_its_range() -> None:
    with FakeNtpServer(offset_s=1.0, jitter_s=0.2, seed=7) as server:
        source = NtpSource(server.address, timeout_s=TIMEOUT_S)
        offsets = [source.query().offset_s for _ in range(20)]
    assert all(0.8 - LOOPBACK_ERROR_S <= o <= 1.2 + LOOPBACK_ERROR_S for o in offsets)
    assert max(offsets) - min(offsets) > 0.05


def test_silence_is_unreachable_within_the_timeout_and_recovers(fake_server: FakeNtpServer) -> None:
    source = NtpSource(fake_server.address, timeout_s=0.3)
    fake_server.silent = True
    started = time.monotonic()
    with pytest.raises(SourceUnreachable, match=f"{fake_server.address}: no valid reply within 0.3 s"):
        source.query()
    assert time.monotonic() - started < 0.3 + 0.5
    assert fake_server.requests >= 1
    fake_server.silent = False
    assert source.query().offset_s == pytest.approx(0.0, abs=LOOPBACK_ERROR_S)


def test_nobody_listening_is_unreachable() -> None:
    with FakeNtpServer() as server:
        address = server.address
    with pytest.raises(SourceUnreachable, match=address):
        NtpSource(address, timeout_s=0.2).query()


def test_leap_indicator_3_is_unusable(fake_server: FakeNtpServer) -> None:
    fake_server.leap = 3
    with pytest.raises(SourceUnusable, match="leap indicator 3"):
        NtpSource(fake_server.address, timeout_s=TIMEOUT_S).query()


@pytest.mark.parametrize("stratum", [0, 16])
def test_stratum_0_or_16_is_unusable(fake_server: FakeNtpServer, stratum: int) -> None:
    fake_server.stratum = stratum
    fake_server.ref_id = b"DENY"
    with pytest.raises(SourceUnusable, match=f"stratum {stratum}"):
        NtpSource(fake_server.address, timeout_s=TIMEOUT_S).query()


def test_announced_leap_second_is_passed_on(fake_server: FakeNtpServer) -> None:
    fake_server.leap = 1
    assert NtpSource(fake_server.address, timeout_s=TIMEOUT_S).query().leap == 1


def test_reply_not_echoing_the_request_is_refused(fake_server: FakeNtpServer) -> None:
    fake_server.echo_origin = False
    with pytest.raises(SourceUnreachable, match="originate timestamp"):
        NtpSource(fake_server.address, timeout_s=TIMEOUT_S).query()


@pytest.fixture(scope="module")
def chrony() -> Iterator[str]:
    with chrony_server(stratum=8) as address:
        yield address


@pytest.mark.integration
def test_chronyd_serving_its_local_clock(chrony: str) -> None:
    source = NtpSource(chrony, timeout_s=1.0)
    sample = source.query()
    assert sample.source == chrony
    # chronyd serves this host's own clock: the offset is only the loopback measurement noise.
    assert sample.offset_s == pytest.approx(0.0, abs=LOOPBACK_ERROR_S)
    assert sample.error_s < LOOPBACK_ERROR_S
    assert abs(sample.offset_s) <= sample.error_s + 1e-3
    # `local stratum 8`: chronyd announces stratum 8 itself (a client synchronised to it would be at stratum 9).
    assert sample.stratum == 8
    assert sample.leap == 0


@pytest.mark.integration
def test_chronyd_answers_repeated_queries(chrony: str) -> None:
    source = NtpSource(chrony, timeout_s=1.0)
    samples = [source.query() for _ in range(5)]
    assert all(abs(s.offset_s) < LOOPBACK_ERROR_S for s in samples)
