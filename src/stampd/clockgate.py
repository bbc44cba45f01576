"""When the clock may be trusted for a genTime, decided from measurements alone.

RFC 3628 §7.3.1-7.3.2 and EN 319 421 §7.7 (SPEC OPS-01..04, STS-06, TIM-04, TIM-07): issue only while the
worst-case error of the clock, proven by agreeing time sources, is within the declared accuracy; detect steps;
never let genTime go backwards; pause (or account for a smear) around leap seconds; record every transition.
Pure: wall and monotonic readings, measurements, the kernel's view and the leap schedule arrive as arguments,
and the caller records the events this gate emits.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from stampd.errors import TimeNotAvailable

SECOND_NS = 1_000_000_000


class Measurement(Protocol):
    """One time source's offset from the local clock and the worst-case error of that offset."""

    @property
    def source(self) -> str: ...

    @property
    def offset_s(self) -> float: ...

    @property
    def error_s(self) -> float: ...


class KernelView(Protocol):
    """The kernel's own discipline of the clock (adjtimex)."""

    @property
    def synchronised(self) -> bool: ...

    @property
    def max_error_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Agreement:
    """The largest set of sources whose offset intervals share a region, and that region (Marzullo)."""

    agreeing: tuple[str, ...]
    outliers: tuple[str, ...]
    low_s: float
    high_s: float
    tied: bool = False
    """Another, disjoint region is shared by as many sources: the sources do not say which time is right."""

    @property
    def offset_s(self) -> float:
        return (self.low_s + self.high_s) / 2

    @property
    def error_bound_s(self) -> float:
        """How far the local clock may be from UTC, if the agreeing sources are right."""
        return max(abs(self.low_s), abs(self.high_s))


def agree(measurements: Sequence[Measurement]) -> Agreement | None:
    """Marzullo's algorithm over [offset - error, offset + error]: the region most sources share."""
    if not measurements:
        return None
    edges: list[tuple[float, int]] = []
    for m in measurements:
        edges.append((m.offset_s - m.error_s, -1))
        edges.append((m.offset_s + m.error_s, +1))
    edges.sort()
    best = count = 0
    low = high = 0.0
    tied = False
    for i, (value, kind) in enumerate(edges):
        count -= kind
        if count > best:
            best, tied = count, False
            low, high = value, edges[i + 1][0]
        elif count == best and kind < 0 and value > high:
            tied = True
    agreeing = tuple(m.source for m in measurements if m.offset_s - m.error_s <= low and m.offset_s + m.error_s >= high)
    outliers = tuple(m.source for m in measurements if m.source not in agreeing)
    return Agreement(agreeing, outliers, low, high, tied)


class LeapPolicy(enum.StrEnum):
    PAUSE = "pause"
    SMEAR = "smear"


@dataclass(frozen=True, slots=True)
class ClockPolicy:
    """The operator's promises, as configured."""

    accuracy_ns: int
    margin_ns: int
    max_age_ns: int
    min_agree: int
    leap_policy: LeapPolicy = LeapPolicy.PAUSE
    smear_window_ns: int = 86_400 * SECOND_NS
    kernel_required: bool = True

    @property
    def limit_ns(self) -> int:
        """The largest error bound under which tokens are issued: the declared accuracy minus the margin."""
        return self.accuracy_ns - self.margin_ns


class ClockState(enum.StrEnum):
    UNMONITORED = "unmonitored"
    STARTING = "starting"
    SYNCHRONISED = "synchronised"
    UNSYNCHRONISED = "unsynchronised"
    STEPPED = "stepped"


@dataclass(frozen=True, slots=True)
class ClockStatus:
    """The latest verdict on the clock, as /readyz, the metrics and the events report it."""

    state: ClockState
    reason: str
    offset_s: float | None = None
    error_bound_s: float | None = None
    agreeing: tuple[str, ...] = ()
    outliers: tuple[str, ...] = ()
    unreachable: tuple[str, ...] = ()
    checked_at_ns: int | None = None
    next_leap_ns: int | None = None

    def as_detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"state": self.state.value, "reason": self.reason}
        for key in ("offset_s", "error_bound_s", "checked_at_ns", "next_leap_ns"):
            value = getattr(self, key)
            if value is not None:
                detail[key] = value
        for key in ("agreeing", "outliers", "unreachable"):
            if getattr(self, key):
                detail[key] = list(getattr(self, key))
        return detail


EventSink = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class _Baseline:
    """Wall minus monotonic time at the last good check: a step moves the wall clock against it."""

    wall_ns: int
    mono_ns: int

    @property
    def difference_ns(self) -> int:
        return self.wall_ns - self.mono_ns


@dataclass(slots=True)
class _Leap:
    at_ns: int
    sign: int
    applied: bool = False


@dataclass(slots=True)
class ClockGate:
    """Admits or refuses each genTime; emits exactly one event per transition.

    ``update`` takes the result of each check of the time sources; ``admit`` is called for every token with
    the current wall and monotonic readings and returns normally only if that wall time may be a genTime.
    """

    policy: ClockPolicy
    emit: EventSink
    monitored: bool = True
    last_issued_ns: int = 0
    _status: ClockStatus = field(init=False)
    _baseline: _Baseline | None = field(default=None, init=False)
    _unreachable: frozenset[str] = field(default=frozenset(), init=False)
    _leap: _Leap | None = field(default=None, init=False)
    _last_cause: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.monitored:
            self._status = ClockStatus(ClockState.STARTING, "no check of the time sources yet")
        else:
            self._status = ClockStatus(ClockState.UNMONITORED, "time is not monitored: no time sources configured")

    @property
    def status(self) -> ClockStatus:
        return self._status

    # --- checks of the time sources ---

    def update(
        self,
        measurements: Sequence[Measurement],
        *,
        unreachable: dict[str, str],
        kernel: KernelView | None,
        wall_ns: int,
        mono_ns: int,
        next_leap: tuple[int, int] | None = None,
        started: tuple[int, int] | None = None,
    ) -> ClockStatus:
        """Take one check's results, read at (``wall_ns``, ``mono_ns``) after a check that began at ``started``
        (wall, mono); ``next_leap`` is (unix seconds of the instant after the leap, +1 or -1)."""
        self._sources_reachability(unreachable, wall_ns)
        self._leap_schedule(next_leap, wall_ns)
        if started is not None:
            self.detect_step(*started)
            moved_ns = (wall_ns - mono_ns) - (started[0] - started[1])
            if abs(moved_ns) > self.policy.margin_ns and not self._is_leap_step(started[0], moved_ns):
                status = ClockStatus(
                    ClockState.STEPPED,
                    f"the system clock stepped by {moved_ns / SECOND_NS:+.6f} s during a check",
                    checked_at_ns=wall_ns,
                )
                self._baseline = None
                return self._transition(status, "clock.step_detected", wall_ns)
        usable = [m for m in measurements if m.error_s * SECOND_NS <= self.policy.limit_ns]
        found = agree(usable)
        agreeing = len(found.agreeing) if found else 0

        def verdict(state: ClockState, reason: str) -> ClockStatus:
            return ClockStatus(
                state,
                reason,
                offset_s=found.offset_s if found else None,
                error_bound_s=found.error_bound_s if found else None,
                agreeing=found.agreeing if found else (),
                outliers=found.outliers if found else (),
                unreachable=tuple(sorted(unreachable)),
                checked_at_ns=wall_ns,
                next_leap_ns=self._leap.at_ns if self._leap else None,
            )

        if found is None or agreeing < self.policy.min_agree or found.tied:
            reason = f"only {agreeing} time sources agree, {self.policy.min_agree} required"
            if found is not None and found.tied:
                reason = "time sources disagree: two groups of equal size give different times"
            return self._transition(verdict(ClockState.UNSYNCHRONISED, reason), "clock.quorum_lost", wall_ns)
        if self.policy.kernel_required and kernel is not None and not kernel.synchronised:
            reason = "the kernel reports its clock unsynchronised"
            return self._transition(verdict(ClockState.UNSYNCHRONISED, reason), "clock.lost_synchronisation", wall_ns)
        if self.policy.kernel_required and kernel is not None and kernel.max_error_s * SECOND_NS > self.policy.limit_ns:
            reason = f"the kernel's maximum error {kernel.max_error_s:.6f} s exceeds the accuracy limit"
            return self._transition(verdict(ClockState.UNSYNCHRONISED, reason), "clock.lost_synchronisation", wall_ns)
        if round(found.error_bound_s * SECOND_NS) > self.policy.limit_ns:
            reason = (
                f"error bound {found.error_bound_s:.6f} s exceeds the accuracy limit "
                f"{self.policy.limit_ns / SECOND_NS:.6f} s"
            )
            return self._transition(verdict(ClockState.UNSYNCHRONISED, reason), "clock.lost_synchronisation", wall_ns)
        self._baseline = _Baseline(wall_ns, mono_ns)
        reason = "time sources agree within the declared accuracy"
        return self._transition(verdict(ClockState.SYNCHRONISED, reason), "clock.synchronised", wall_ns)

    def _transition(self, status: ClockStatus, kind: str, wall_ns: int) -> ClockStatus:
        """Record the verdict; emit an event when the state, its cause or the set of agreeing sources changes."""
        previous, self._status = self._status, status
        cause = f"{status.state.value}/{kind}/{' '.join(status.reason.split(' ')[:2])}"
        changed = cause != self._last_cause or (
            status.state is ClockState.SYNCHRONISED and status.agreeing != previous.agreeing
        )
        self._last_cause = cause
        if changed:
            self.emit(kind, {"at_ns": wall_ns, **status.as_detail()})
        return status

    def _sources_reachability(self, unreachable: dict[str, str], wall_ns: int) -> None:
        now = frozenset(unreachable)
        for source in sorted(now - self._unreachable):
            self.emit("clock.source_unreachable", {"at_ns": wall_ns, "source": source, "reason": unreachable[source]})
        for source in sorted(self._unreachable - now):
            self.emit("clock.source_back", {"at_ns": wall_ns, "source": source})
        self._unreachable = now

    def _leap_schedule(self, next_leap: tuple[int, int] | None, wall_ns: int) -> None:
        if self._leap is not None and not self._leap.applied and wall_ns >= self._leap.at_ns:
            self._leap.applied = True
            self.emit("clock.leap_applied", {"at_ns": wall_ns, "leap_ns": self._leap.at_ns, "sign": self._leap.sign})
        if next_leap is None:
            return
        at_ns = next_leap[0] * SECOND_NS
        current = self._leap
        if current is not None and (not current.applied or wall_ns < current.at_ns + 86_400 * SECOND_NS):
            return  # a leap is pending or just happened: a lingering kernel flag must not reschedule it
        if current is None or current.at_ns != at_ns:
            self._leap = _Leap(at_ns, next_leap[1])
            self.emit(
                "clock.leap_scheduled",
                {"at_ns": wall_ns, "leap_ns": at_ns, "sign": next_leap[1], "policy": self.policy.leap_policy.value},
            )

    # --- every token ---

    def admit(self, wall_ns: int, mono_ns: int) -> None:
        """Return only if ``wall_ns`` may be a genTime now; otherwise raise :class:`TimeNotAvailable`."""
        state = self._status.state
        if state is ClockState.SYNCHRONISED:
            self._check_synchronised(wall_ns, mono_ns)
        elif state is not ClockState.UNMONITORED:
            raise TimeNotAvailable(f"time is not available: {self._status.reason}")
        if wall_ns < self.last_issued_ns:
            raise TimeNotAvailable("time is not available: the clock is behind the last issued genTime")
        self.last_issued_ns = wall_ns

    def _check_synchronised(self, wall_ns: int, mono_ns: int) -> None:
        baseline = self._baseline
        assert baseline is not None
        if mono_ns - baseline.mono_ns > self.policy.max_age_ns:
            status = ClockStatus(
                ClockState.UNSYNCHRONISED,
                f"the last good check is {(mono_ns - baseline.mono_ns) / SECOND_NS:.1f} s old",
                offset_s=self._status.offset_s,
                error_bound_s=self._status.error_bound_s,
                checked_at_ns=self._status.checked_at_ns,
            )
            self._transition(status, "clock.lost_synchronisation", wall_ns)
            raise TimeNotAvailable(f"time is not available: {status.reason}")
        self.detect_step(wall_ns, mono_ns)
        if self._status.state is not ClockState.SYNCHRONISED:
            raise TimeNotAvailable(f"time is not available: {self._status.reason}")
        leap = self._leap
        if leap is None:
            return
        if self.policy.leap_policy is LeapPolicy.PAUSE:  # TIM-07: from 1 s before the leap second to 1 s after
            # An inserted 23:59:60 repeats unix second T-1, so 23:59:59 starts at T-1; a deleted 23:59:59 leaves
            # 23:59:58 (T-2) as the second before it.
            start = leap.at_ns - (SECOND_NS if leap.sign > 0 else 2 * SECOND_NS)
            if start <= wall_ns < leap.at_ns + SECOND_NS:
                raise TimeNotAvailable("time is not available: paused for a leap second")
            return
        smeared_ns = round((self._status.error_bound_s or 0.0) * SECOND_NS) + self.smear_error_ns(wall_ns)
        if smeared_ns > self.policy.limit_ns:
            raise TimeNotAvailable(
                f"time is not available: the leap-second smear widens the error bound to {smeared_ns / SECOND_NS:.3f} s"
            )

    def _is_leap_step(self, wall_ns: int, step_ns: int) -> bool:
        """The kernel applying a scheduled leap second moves the wall clock by one second against the monotonic
        clock, back for an inserted second and forward for a deleted one, at the leap instant."""
        leap = self._leap
        if leap is None or abs(wall_ns - leap.at_ns) > 3 * SECOND_NS:
            return False
        return abs(step_ns + leap.sign * SECOND_NS) <= self.policy.margin_ns

    def readiness(self, wall_ns: int, mono_ns: int) -> tuple[bool, str]:
        """Whether a token would be issued now, and why (for /readyz); records nothing as issued."""
        state = self._status.state
        if wall_ns < self.last_issued_ns:
            return False, "time is not available: the clock is behind the last issued genTime"
        if state is ClockState.UNMONITORED:
            return True, "time is NOT monitored (no time sources configured): tokens carry the host's clock unchecked"
        if state is not ClockState.SYNCHRONISED:
            return False, f"time is not available: {self._status.reason}"
        try:
            self._check_synchronised(wall_ns, mono_ns)
        except TimeNotAvailable as e:
            return False, str(e)
        status = self._status
        return True, (
            f"time synchronised: offset {status.offset_s:+.6f} s, error bound {status.error_bound_s:.6f} s, "
            f"{len(status.agreeing)} sources agree"
        )

    def detect_step(self, wall_ns: int, mono_ns: int) -> None:
        """A step of the wall clock against the monotonic clock stops issuance until the next good check."""
        baseline = self._baseline
        if baseline is None or self._status.state is not ClockState.SYNCHRONISED:
            return
        step_ns = (wall_ns - mono_ns) - baseline.difference_ns
        if abs(step_ns) > self.policy.margin_ns and self._is_leap_step(wall_ns, step_ns):
            baseline.wall_ns += step_ns  # the kernel repeated (or skipped) the leap second: expected, not a fault
            return
        if abs(step_ns) > self.policy.margin_ns:
            status = ClockStatus(
                ClockState.STEPPED,
                f"the system clock stepped by {step_ns / SECOND_NS:+.6f} s",
                offset_s=self._status.offset_s,
                error_bound_s=self._status.error_bound_s,
                checked_at_ns=self._status.checked_at_ns,
            )
            self._baseline = None
            self._transition(status, "clock.step_detected", wall_ns)

    def smear_error_ns(self, wall_ns: int) -> int:
        """How far a smeared clock is from UTC at ``wall_ns`` (zero outside the window or when pausing)."""
        leap = self._leap
        if leap is None or self.policy.leap_policy is not LeapPolicy.SMEAR:
            return 0
        half = self.policy.smear_window_ns // 2
        if not leap.at_ns - half <= wall_ns <= leap.at_ns + half:
            return 0
        done = (wall_ns - (leap.at_ns - half)) / self.policy.smear_window_ns
        return round(SECOND_NS * (done if wall_ns < leap.at_ns else 1 - done))


def majority(count: int) -> int:
    return count // 2 + 1
