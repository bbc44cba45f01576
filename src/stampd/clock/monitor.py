"""The clock monitor: checks the time sources every interval and watches for steps in between.

It runs beside the server in its event loop; the NTP queries run in threads, so a slow source never blocks
issuance. Every verdict goes to the gate, which decides and emits the events (SPEC OPS-01..04).
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import time
from collections.abc import Callable, Sequence

from stampd.clock.kernel import KernelClock
from stampd.clock.leapseconds import LeapTable
from stampd.clock.ntp import NtpSource, SourceSample
from stampd.clockgate import ClockGate, ClockStatus

log = logging.getLogger(__name__)

STEP_WATCH_S = 0.25
"""How often the wall clock is compared with the monotonic clock between checks: a step is seen within a second."""


class ClockMonitor:
    def __init__(
        self,
        gate: ClockGate,
        sources: Sequence[NtpSource],
        *,
        interval_s: float,
        kernel: Callable[[], KernelClock | None],
        leap_table: LeapTable | None,
        observe: Callable[[ClockStatus], None] = lambda _: None,
    ) -> None:
        self._gate = gate
        self._sources = list(sources)
        self._interval_s = interval_s
        self._kernel = kernel
        self._leap_table = leap_table
        self._observe = observe
        self._expiry_reported = False

    async def run(self, *, checked: bool = False) -> None:
        """Check every interval (starting now unless ``checked``); between checks, look for steps. Runs until
        cancelled; any failure of a check is logged and the gate, left without a fresh check, fails closed."""
        next_check = time.monotonic() + self._interval_s if checked else 0.0
        while True:
            if time.monotonic() >= next_check:
                try:
                    await self.check()
                except Exception:  # the monitor must outlive any one check; the gate fails closed meanwhile
                    log.exception("clock: the check failed")
                next_check = time.monotonic() + self._interval_s
            else:
                self._gate.detect_step(time.time_ns(), time.monotonic_ns())
            await asyncio.sleep(max(0.0, min(STEP_WATCH_S, next_check - time.monotonic())))

    async def check(self) -> ClockStatus:
        started = (time.time_ns(), time.monotonic_ns())
        results = await asyncio.gather(*(asyncio.to_thread(s.query) for s in self._sources), return_exceptions=True)
        measurements: list[SourceSample] = []
        unreachable: dict[str, str] = {}
        for source, result in zip(self._sources, results, strict=True):
            if isinstance(result, SourceSample):
                measurements.append(result)
            else:
                unreachable[source.address] = str(result) or type(result).__name__
        kernel = self._kernel()
        wall_ns, mono_ns = time.time_ns(), time.monotonic_ns()
        status = self._gate.update(
            measurements,
            unreachable=unreachable,
            kernel=kernel,
            wall_ns=wall_ns,
            mono_ns=mono_ns,
            next_leap=self._next_leap(wall_ns, kernel, measurements),
            started=started,
        )
        self._observe(status)
        return status

    def _next_leap(
        self, wall_ns: int, kernel: KernelClock | None, measurements: Sequence[SourceSample]
    ) -> tuple[int, int] | None:
        """The next leap second: from the table while it is current, else from the kernel's flag or the leap
        indicator most sources announce (RFC 5905 §7.3), at the coming UTC midnight."""
        now_s = wall_ns / 1e9
        table = self._leap_table
        if table is not None and not table.expired(now_s):
            return table.next_leap(now_s)
        if table is not None and not self._expiry_reported:
            self._expiry_reported = True
            log.warning("clock: the leap-second table has expired; relying on the kernel and the time sources")
        day = time.gmtime(now_s)
        midnight = calendar.timegm((day.tm_year, day.tm_mon, day.tm_mday, 0, 0, 0)) + 86_400
        if kernel is not None and kernel.leap != "none":
            return midnight, (1 if kernel.leap == "insert" else -1)
        announced = [m.leap for m in measurements if m.leap in (1, 2)]
        if measurements and len(announced) * 2 > len(measurements):
            return midnight, (1 if max(set(announced), key=announced.count) == 1 else -1)
        return None
