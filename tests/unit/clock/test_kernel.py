"""The kernel's clock discipline (adjtimex): decoding fake ``struct timex`` bytes, and a read of this machine.

SPEC OPS-03 (a kernel saying "unsynchronised" counts against issuance), TIM-07 (kernel leap flags).
"""

from __future__ import annotations

import ctypes
import struct
import sys

import pytest

from stampd.clock.kernel import (
    STA_DEL,
    STA_INS,
    STA_NANO,
    STA_PLL,
    STA_UNSYNC,
    TIME_DEL,
    TIME_ERROR,
    TIME_INS,
    TIME_OK,
    TIME_OOP,
    KernelClock,
    Timex,
    kernel_clock_from_timex,
    read_kernel_clock,
)

# struct timex of <sys/timex.h> on LP64 Linux, written out independently of the ctypes definition: modes (int +
# padding), offset, freq, maxerror, esterror, status (int + padding), constant, precision, tolerance,
# time (tv_sec, tv_usec), tick, ppsfreq, jitter, shift (int + padding), stabil, jitcnt, calcnt, errcnt, stbcnt,
# tai (int), 11 reserved ints.
TIMEX_LP64 = struct.Struct("=I4xqqqqi4xqqqqqqqqi4xqqqqqi44x")


def fake_timex(*, status: int, maxerror_us: int, esterror_us: int, tai: int = 37) -> bytes:
    return TIMEX_LP64.pack(
        0,  # modes
        1234,  # offset
        -5000,  # freq
        maxerror_us,
        esterror_us,
        status,
        2,  # constant
        1,  # precision
        32_768_000,  # tolerance
        1_800_000_000,  # time.tv_sec
        123_456,  # time.tv_usec
        10_000,  # tick
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        tai,
    )


lp64_only = pytest.mark.skipif(
    ctypes.sizeof(ctypes.c_long) != 8, reason="the fake struct is written for LP64 Linux (x86_64, aarch64)"
)


@lp64_only
def test_layout_matches_sys_timex_h() -> None:
    assert ctypes.sizeof(Timex) == TIMEX_LP64.size == 208
    assert (Timex.maxerror.offset, Timex.esterror.offset, Timex.status.offset) == (24, 32, 40)
    assert (Timex.time.offset, Timex.tai.offset) == (72, 160)


@lp64_only
def test_synchronised_clock() -> None:
    raw = fake_timex(status=STA_PLL | STA_NANO, maxerror_us=25_000, esterror_us=1_500)
    clock = kernel_clock_from_timex(TIME_OK, raw)
    assert clock == KernelClock(synchronised=True, max_error_s=0.025, est_error_s=0.0015, leap="none", state=TIME_OK)
    assert Timex.from_buffer_copy(raw).tai == 37


@lp64_only
def test_unsync_flag_means_unsynchronised() -> None:
    clock = kernel_clock_from_timex(TIME_OK, fake_timex(status=STA_UNSYNC, maxerror_us=16_000_000, esterror_us=0))
    assert not clock.synchronised
    assert clock.max_error_s == 16.0


@lp64_only
def test_time_error_state_means_unsynchronised() -> None:
    clock = kernel_clock_from_timex(TIME_ERROR, fake_timex(status=STA_PLL, maxerror_us=1000, esterror_us=10))
    assert not clock.synchronised
    assert clock.state == TIME_ERROR


@lp64_only
@pytest.mark.parametrize(
    ("status", "state", "leap"),
    [
        (STA_PLL | STA_INS, TIME_INS, "insert"),
        (STA_PLL | STA_DEL, TIME_DEL, "delete"),
        (STA_PLL | STA_INS, TIME_OOP, "insert"),
        (STA_PLL, TIME_OK, "none"),
    ],
)
def test_leap_flags(status: int, state: int, leap: str) -> None:
    clock = kernel_clock_from_timex(state, fake_timex(status=status, maxerror_us=1000, esterror_us=10))
    assert clock.leap == leap
    assert clock.state == state
    assert clock.synchronised


def test_decoding_the_ctypes_structure_directly() -> None:
    tx = Timex(status=STA_UNSYNC | STA_INS, maxerror=500_000, esterror=250_000)
    clock = kernel_clock_from_timex(TIME_INS, tx)
    assert clock == KernelClock(synchronised=False, max_error_s=0.5, est_error_s=0.25, leap="insert", state=TIME_INS)


def test_read_this_machine() -> None:
    """Whatever this machine's kernel says, it is a well-formed reading (or None off Linux); never a crash."""
    clock = read_kernel_clock()
    if not sys.platform.startswith("linux"):
        assert clock is None
        return
    if clock is None:
        pytest.skip("adjtimex is blocked here (sandbox); the kernel reading is None, which the monitor must handle")
    assert TIME_OK <= clock.state <= TIME_ERROR
    assert clock.max_error_s >= 0
    assert clock.est_error_s >= 0
    assert clock.leap in ("none", "insert", "delete")
    if clock.state == TIME_ERROR:
        assert not clock.synchronised


def test_not_linux_gives_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    assert read_kernel_clock() is None
