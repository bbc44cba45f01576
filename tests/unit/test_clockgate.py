"""The clock gate with injected readings: no test here depends on this machine's clock.

SPEC OPS-01..04, STS-06, TIM-04, TIM-07.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from stampd.clockgate import (
    SECOND_NS,
    ClockGate,
    ClockPolicy,
    ClockState,
    LeapPolicy,
    agree,
    majority,
)
from stampd.errors import TimeNotAvailable

MS = 1_000_000
T0 = 1_800_000_000 * SECOND_NS  # wall time of the first check
M0 = 5_000 * SECOND_NS  # monotonic time of the first check


@dataclass(frozen=True)
class M:
    source: str
    offset_s: float
    error_s: float


@dataclass(frozen=True)
class Kernel:
    synchronised: bool
    max_error_s: float = 0.01


POLICY = ClockPolicy(accuracy_ns=SECOND_NS, margin_ns=100 * MS, max_age_ns=60 * SECOND_NS, min_agree=2)
GOOD = [M("a:123", 0.002, 0.010), M("b:123", -0.001, 0.012), M("c:123", 0.004, 0.020)]


class Events(list[tuple[str, dict[str, Any]]]):
    def __call__(self, kind: str, detail: dict[str, Any]) -> None:
        self.append((kind, detail))

    @property
    def kinds(self) -> list[str]:
        return [k for k, _ in self]


def gate(policy: ClockPolicy = POLICY) -> tuple[ClockGate, Events]:
    events = Events()
    return ClockGate(policy, events), events


def check(g: ClockGate, measurements: list[M], t: int = 0, **kw: Any) -> ClockState:
    kw.setdefault("unreachable", {})
    kw.setdefault("kernel", None)
    return g.update(measurements, wall_ns=T0 + t, mono_ns=M0 + t, **kw).state


def test_marzullo_names_the_outlier() -> None:
    found = agree([*GOOD, M("liar:123", 2.0, 0.01)])
    assert found is not None
    assert set(found.agreeing) == {"a:123", "b:123", "c:123"} and found.outliers == ("liar:123",)
    assert -0.016 < found.low_s <= found.high_s < 0.013
    assert found.error_bound_s == max(abs(found.low_s), abs(found.high_s))


def test_no_region_shared_means_one_source_agrees() -> None:
    found = agree([M("a", 0.0, 0.001), M("b", 1.0, 0.001)])
    assert found is not None and len(found.agreeing) == 1


def test_majority() -> None:
    assert [majority(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 2, 3, 3]


def test_starts_refusing_until_the_first_good_check_ops_03() -> None:
    g, events = gate()
    with pytest.raises(TimeNotAvailable, match="no check"):
        g.admit(T0, M0)
    assert check(g, GOOD) is ClockState.SYNCHRONISED
    g.admit(T0 + 1, M0 + 1)
    assert events.kinds == ["clock.synchronised"]
    assert events[0][1]["agreeing"] == ["a:123", "b:123", "c:123"] and events[0][1]["at_ns"] == T0


def test_offset_beyond_accuracy_stops_and_recovers_with_one_event_each_ops_02() -> None:
    g, events = gate()
    check(g, GOOD)
    moved = [M(m.source, m.offset_s + 2.0, m.error_s) for m in GOOD]
    assert check(g, moved, SECOND_NS) is ClockState.UNSYNCHRONISED
    assert check(g, moved, 2 * SECOND_NS) is ClockState.UNSYNCHRONISED
    with pytest.raises(TimeNotAvailable, match="exceeds the accuracy limit"):
        g.admit(T0 + 2 * SECOND_NS, M0 + 2 * SECOND_NS)
    assert check(g, GOOD, 3 * SECOND_NS) is ClockState.SYNCHRONISED
    g.admit(T0 + 3 * SECOND_NS, M0 + 3 * SECOND_NS)
    assert events.kinds == ["clock.synchronised", "clock.lost_synchronisation", "clock.synchronised"]
    assert events[1][1]["error_bound_s"] > 1.9


def test_error_bound_must_stay_under_accuracy_minus_margin() -> None:
    g, _ = gate()
    loose = [M(m.source, 0.0, 0.95) for m in GOOD]  # 0.95 s > 1 s - 100 ms
    assert check(g, loose) is ClockState.UNSYNCHRONISED
    tight = [M(m.source, 0.0, 0.85) for m in GOOD]
    assert check(g, tight) is ClockState.SYNCHRONISED


def test_quorum_lost_names_the_unreachable_sources() -> None:
    g, events = gate()
    check(g, GOOD)
    assert check(g, GOOD[:1], SECOND_NS, unreachable={"b:123": "timeout", "c:123": "timeout"}) is (
        ClockState.UNSYNCHRONISED
    )
    check(g, GOOD, 2 * SECOND_NS)
    assert events.kinds == [
        "clock.synchronised",
        "clock.source_unreachable",
        "clock.source_unreachable",
        "clock.quorum_lost",
        "clock.source_back",
        "clock.source_back",
        "clock.synchronised",
    ]
    assert events[3][1]["unreachable"] == ["b:123", "c:123"]


def test_kernel_unsynchronised_counts_against_issuance() -> None:
    g, _ = gate()
    assert check(g, GOOD, kernel=Kernel(synchronised=False)) is ClockState.UNSYNCHRONISED
    assert "kernel" in g.status.reason
    g2, _ = gate(ClockPolicy(SECOND_NS, 100 * MS, 60 * SECOND_NS, 2, kernel_required=False))
    assert check(g2, GOOD, kernel=Kernel(synchronised=False)) is ClockState.SYNCHRONISED


def test_stale_check_stops_issuance_once() -> None:
    g, events = gate()
    check(g, GOOD)
    g.admit(T0 + 59 * SECOND_NS, M0 + 59 * SECOND_NS)
    for _ in range(3):
        with pytest.raises(TimeNotAvailable, match="old"):
            g.admit(T0 + 61 * SECOND_NS, M0 + 61 * SECOND_NS)
    assert events.kinds == ["clock.synchronised", "clock.lost_synchronisation"]


@pytest.mark.parametrize("step_ns", [-2 * SECOND_NS, 150 * MS])
def test_step_detected_stops_until_next_good_check(step_ns: int) -> None:
    g, events = gate()
    check(g, GOOD)
    g.admit(T0 + 50 * MS, M0 + 50 * MS + 40 * MS)  # a 40 ms slew is within the margin
    with pytest.raises(TimeNotAvailable, match="stepped"):
        g.admit(T0 + SECOND_NS + step_ns, M0 + SECOND_NS)
    with pytest.raises(TimeNotAvailable, match="stepped"):
        g.admit(T0 + 2 * SECOND_NS + step_ns, M0 + 2 * SECOND_NS)
    assert events.kinds == ["clock.synchronised", "clock.step_detected"]
    g.update(GOOD, unreachable={}, kernel=None, wall_ns=T0 + 3 * SECOND_NS + step_ns, mono_ns=M0 + 3 * SECOND_NS)
    g.last_issued_ns = 0
    g.admit(T0 + 4 * SECOND_NS + step_ns, M0 + 4 * SECOND_NS)
    assert events.kinds[-1] == "clock.synchronised"


def test_detect_step_without_a_request() -> None:
    g, events = gate()
    check(g, GOOD)
    g.detect_step(T0 + 3 * SECOND_NS, M0 + SECOND_NS)
    assert g.status.state is ClockState.STEPPED and events.kinds[-1] == "clock.step_detected"


def test_gen_time_never_goes_backwards() -> None:
    g, _ = gate()
    check(g, GOOD)
    g.admit(T0 + 500 * MS, M0 + 500 * MS)
    with pytest.raises(TimeNotAvailable, match="behind the last issued"):
        g.admit(T0 + 450 * MS, M0 + 550 * MS)  # stepped back 100 ms: within the margin, still refused
    g.admit(T0 + 500 * MS, M0 + 600 * MS)


def test_unmonitored_issues_but_says_so() -> None:
    events = Events()
    g = ClockGate(POLICY, events, monitored=False)
    g.admit(T0, M0)
    assert g.status.state is ClockState.UNMONITORED and "not monitored" in g.status.reason
    with pytest.raises(TimeNotAvailable):
        g.admit(T0 - 1, M0 + 1)
    assert events == []


LEAP_S = 1_800_000_000 + 3600  # one hour after the first check


def test_leap_second_pauses_for_exactly_the_window_tim_07() -> None:
    g, events = gate(ClockPolicy(SECOND_NS, 100 * MS, 10_000 * SECOND_NS, 2))
    check(g, GOOD, next_leap=(LEAP_S, +1))
    leap_ns = LEAP_S * SECOND_NS

    def admitted(wall_ns: int) -> bool:
        g.last_issued_ns = 0
        try:
            g.admit(wall_ns, wall_ns - T0 + M0)
        except TimeNotAvailable:
            return False
        return True

    assert admitted(leap_ns - SECOND_NS - 1)  # an inserted 23:59:60 repeats unix second T-1: 23:59:59 is T-1
    assert not admitted(leap_ns - SECOND_NS)
    assert not admitted(leap_ns)
    assert not admitted(leap_ns + SECOND_NS - 1)
    assert admitted(leap_ns + SECOND_NS)
    assert events.kinds == ["clock.leap_scheduled", "clock.synchronised"]
    check(g, GOOD, leap_ns - T0 + SECOND_NS, next_leap=None)
    assert events.kinds[-1] == "clock.leap_applied"


def test_leap_smear_widens_the_error_bound() -> None:
    policy = ClockPolicy(
        SECOND_NS, 100 * MS, 10**6 * SECOND_NS, 2, leap_policy=LeapPolicy.SMEAR, smear_window_ns=2 * 3600 * SECOND_NS
    )
    g, _ = gate(policy)
    check(g, GOOD, next_leap=(LEAP_S, +1))
    leap_ns = LEAP_S * SECOND_NS
    assert g.smear_error_ns(leap_ns - 2 * 3600 * SECOND_NS) == 0
    assert g.smear_error_ns(leap_ns) == 500 * MS
    assert g.smear_error_ns(leap_ns - 1800 * SECOND_NS) == 250 * MS
    g.admit(leap_ns, leap_ns - T0 + M0)  # 0.5 s + the measured bound < 0.9 s: still issued, error declared wider
    strict = ClockPolicy(200 * MS, 50 * MS, 10**6 * SECOND_NS, 2, leap_policy=LeapPolicy.SMEAR)
    g2, _ = gate(strict)
    check(g2, GOOD, next_leap=(LEAP_S, +1))
    with pytest.raises(TimeNotAvailable, match="smear"):
        g2.admit(leap_ns, leap_ns - T0 + M0)


def test_deleted_leap_second_pauses_from_23_59_58_tim_07() -> None:
    g, _ = gate(ClockPolicy(SECOND_NS, 100 * MS, 10_000 * SECOND_NS, 2))
    check(g, GOOD, next_leap=(LEAP_S, -1))
    leap_ns = LEAP_S * SECOND_NS
    for wall, expected in (
        (leap_ns - 2 * SECOND_NS - 1, True),
        (leap_ns - 2 * SECOND_NS, False),
        (leap_ns + SECOND_NS, True),
    ):
        g.last_issued_ns = 0
        try:
            g.admit(wall, wall - T0 + M0)
            admitted = True
        except TimeNotAvailable:
            admitted = False
        assert admitted is expected, wall - leap_ns


def test_the_kernel_repeating_the_leap_second_is_not_a_step() -> None:
    g, events = gate(ClockPolicy(SECOND_NS, 100 * MS, 10_000 * SECOND_NS, 2))
    check(g, GOOD, next_leap=(LEAP_S, +1))
    leap_ns = LEAP_S * SECOND_NS
    mono_at_leap = leap_ns - T0 + M0
    g.detect_step(leap_ns - SECOND_NS, mono_at_leap)  # wall back by 1 s against monotonic, at the leap
    assert g.status.state is ClockState.SYNCHRONISED
    g.last_issued_ns = 0
    g.admit(leap_ns + SECOND_NS, mono_at_leap + 2 * SECOND_NS)
    assert "clock.step_detected" not in events.kinds


def test_a_step_during_a_check_discards_the_check() -> None:
    """The check began before the wall clock was stepped +5 s and ended after: its offsets are meaningless."""
    g, events = gate()
    check(g, GOOD)
    state = g.update(
        GOOD,
        unreachable={},
        kernel=None,
        wall_ns=T0 + 6 * SECOND_NS,
        mono_ns=M0 + SECOND_NS,
        started=(T0 + 500 * MS, M0 + 500 * MS),
    ).state
    assert state is ClockState.STEPPED and "during a check" in g.status.reason
    with pytest.raises(TimeNotAvailable, match="stepped"):
        g.admit(T0 + 6 * SECOND_NS, M0 + SECOND_NS)
    assert events.kinds == ["clock.synchronised", "clock.step_detected"]


def test_sources_too_imprecise_cannot_make_the_quorum() -> None:
    """A source whose own error exceeds the accuracy limit agrees with everything; it must not count (MAXDIST)."""
    g, _ = gate()
    wide = [M("a", 0.0, 0.01), M("b", 2.0, 0.01), M("wide", 1.0, 3.0)]
    assert check(g, wide) is ClockState.UNSYNCHRONISED


def test_two_equal_groups_disagreeing_is_not_agreement() -> None:
    g, _ = gate()
    split = [M("a", 0.0, 0.01), M("b", 0.001, 0.01), M("c", 2.0, 0.01), M("d", 2.001, 0.01)]
    assert check(g, split) is ClockState.UNSYNCHRONISED and "disagree" in g.status.reason


def test_kernel_maximum_error_counts() -> None:
    g, _ = gate()
    assert check(g, GOOD, kernel=Kernel(synchronised=True, max_error_s=16.0)) is ClockState.UNSYNCHRONISED
    assert "maximum error" in g.status.reason


def test_a_new_outlier_and_a_changed_cause_are_events() -> None:
    g, events = gate()
    check(g, GOOD)
    check(g, [*GOOD[:2], M("c:123", 5.0, 0.01)], SECOND_NS)
    assert events.kinds[-1] == "clock.synchronised" and events[-1][1]["outliers"] == ["c:123"]
    check(g, GOOD[:1], 2 * SECOND_NS)
    check(g, GOOD, 3 * SECOND_NS, kernel=Kernel(synchronised=False))
    check(g, [M(m.source, 3.0, 0.01) for m in GOOD], 4 * SECOND_NS)
    assert events.kinds[-3:] == ["clock.quorum_lost", "clock.lost_synchronisation", "clock.lost_synchronisation"]
    assert "kernel" in events[-2][1]["reason"] and "error bound" in events[-1][1]["reason"]


def test_readiness_agrees_with_admission_on_monotonicity() -> None:
    g, _ = gate()
    check(g, GOOD)
    g.admit(T0 + 500 * MS, M0 + 500 * MS)
    ready, reason = g.readiness(T0 + 450 * MS, M0 + 550 * MS)
    assert not ready and "behind the last issued" in reason
