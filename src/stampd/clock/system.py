"""The host's clock, admitted token by token through the clock gate."""

from __future__ import annotations

import time

from stampd.clockgate import ClockGate


class GatedClock:
    """:class:`stampd.ports.Clock` over the wall clock: every reading passes the gate, or the token is refused."""

    def __init__(self, gate: ClockGate) -> None:
        self._admit = gate.admit

    def now_ns(self) -> int:
        wall = time.time_ns()
        self._admit(wall, time.monotonic_ns())
        return wall
