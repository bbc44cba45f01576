"""The clock monitor with stub sources and an injected clock: checks, leap schedules and steps between checks.

SPEC OPS-02 (steps detected within a second), OPS-04 (events), TIM-07 (leap seconds from the table or the kernel).
"""

from __future__ import annotations

import asyncio
import re
import time as real_time
from dataclasses import dataclass
from typing import Any

import pytest

from stampd.clock import monitor as monitor_module
from stampd.clock.kernel import KernelClock
from stampd.clock.leapseconds import LeapTable
from stampd.clock.monitor import ClockMonitor
from stampd.clock.ntp import SourceSample, SourceUnreachable
from stampd.clockgate import SECOND_NS, ClockGate, ClockPolicy, ClockState, ClockStatus
from stampd.errors import TimeNotAvailable

LEAP_S = 1_900_000_000 - 1_900_000_000 % 86_400  # a UTC midnight


class InjectedTime:
    """Monotonic time is real; the wall clock is the real monotonic clock plus ``wall_offset_ns``."""

    def __init__(self, wall_at_start_ns: int) -> None:
        self.wall_offset_ns = wall_at_start_ns - real_time.monotonic_ns()

    def time_ns(self) -> int:
        return real_time.monotonic_ns() + self.wall_offset_ns

    def monotonic_ns(self) -> int:
        return real_time.monotonic_ns()

    def monotonic(self) -> float:
        return real_time.monotonic()

    @staticmethod
    def gmtime(seconds: float) -> real_time.struct_time:
        return real_time.gmtime(seconds)


@dataclass
class StubSource:
    address: str
    offset_s: float = 0.0
    down: bool = False

    def query(self) -> SourceSample:
        if self.down:
            raise SourceUnreachable(f"{self.address}: timed out")
        return SourceSample(self.address, self.offset_s, 0.001, 0.0, 0.001, 2, 0, 0.0015)


class Events(list[tuple[str, dict[str, Any]]]):
    def __call__(self, kind: str, detail: dict[str, Any]) -> None:
        self.append((kind, detail))


def setup(
    monkeypatch: pytest.MonkeyPatch,
    wall_ns: int,
    *,
    leap_table: LeapTable | None = None,
    kernel: KernelClock | None = None,
    interval_s: float = 100.0,
) -> tuple[ClockMonitor, ClockGate, Events, InjectedTime, list[StubSource], list[ClockStatus]]:
    clock = InjectedTime(wall_ns)
    monkeypatch.setattr(monitor_module, "time", clock)
    events = Events()
    gate = ClockGate(ClockPolicy(SECOND_NS, 100_000_000, 600 * SECOND_NS, 2), events)
    sources = [StubSource("a:123"), StubSource("b:123"), StubSource("c:123")]
    observed: list[ClockStatus] = []
    monitor = ClockMonitor(
        gate, sources, interval_s=interval_s, kernel=lambda: kernel, leap_table=leap_table, observe=observed.append
    )
    return monitor, gate, events, clock, sources, observed


def test_a_check_feeds_the_gate_and_names_unreachable_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor, _, events, _, sources, observed = setup(monkeypatch, LEAP_S * SECOND_NS - 3600 * SECOND_NS)
    sources[2].down = True
    status = asyncio.run(monitor.check())
    assert status.state is ClockState.SYNCHRONISED and set(status.agreeing) == {"a:123", "b:123"}
    assert status.unreachable == ("c:123",) and observed == [status]
    assert [kind for kind, _ in events] == ["clock.source_unreachable", "clock.synchronised"]
    assert "timed out" in events[0][1]["reason"]


def test_leap_second_from_the_table_pauses_issuance_for_its_window_tim_07(monkeypatch: pytest.MonkeyPatch) -> None:
    table = LeapTable(leaps=((LEAP_S - 400 * 86_400, 36), (LEAP_S, 37)), expires_unix=LEAP_S + 86_400)
    monitor, gate, events, clock, _, _ = setup(monkeypatch, LEAP_S * SECOND_NS - 10 * SECOND_NS, leap_table=table)
    asyncio.run(monitor.check())
    assert events[0] == (
        "clock.leap_scheduled",
        {"at_ns": events[0][1]["at_ns"], "leap_ns": LEAP_S * SECOND_NS, "sign": 1, "policy": "pause"},
    )
    leap_ns = LEAP_S * SECOND_NS

    def admitted(wall_ns: int) -> bool:
        gate.last_issued_ns = 0
        try:
            gate.admit(wall_ns, wall_ns - clock.wall_offset_ns)  # as if that much time had passed
        except TimeNotAvailable:
            return False
        return True

    window = [admitted(leap_ns + ms * 1_000_000) for ms in (-1001, -1000, 0, 999, 1000)]
    assert window == [True, False, False, False, True]


def test_kernel_leap_flag_schedules_the_coming_midnight(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = KernelClock(synchronised=True, max_error_s=0.01, est_error_s=0.001, leap="insert", state=1)
    monitor, _, events, _, _, _ = setup(monkeypatch, (LEAP_S - 3600) * SECOND_NS, kernel=kernel)
    asyncio.run(monitor.check())
    assert ("clock.leap_scheduled", LEAP_S * SECOND_NS) in [(k, d.get("leap_ns")) for k, d in events]


def test_a_step_between_checks_is_seen_within_a_second_ops_02(monkeypatch: pytest.MonkeyPatch) -> None:
    monitor, gate, events, clock, _, _ = setup(monkeypatch, (LEAP_S - 86_400) * SECOND_NS)

    async def scenario() -> float:
        task = asyncio.create_task(monitor.run())
        await asyncio.sleep(0.3)
        assert gate.status.state is ClockState.SYNCHRONISED
        clock.wall_offset_ns += 2 * SECOND_NS  # the wall clock is stepped; the monotonic clock is not
        stepped_at = real_time.monotonic()
        while gate.status.state is not ClockState.STEPPED and real_time.monotonic() - stepped_at < 2:
            await asyncio.sleep(0.02)
        took = real_time.monotonic() - stepped_at
        task.cancel()
        return took

    took = asyncio.run(scenario())
    assert took < 1.0
    assert [kind for kind, _ in events] == ["clock.synchronised", "clock.step_detected"]
    assert re.search(r"stepped by \+(1\.99999\d|2\.00000\d) s", gate.status.reason)
