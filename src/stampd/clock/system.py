"""The host's clock, read as it is: the embedded demo's time source until a monitor disciplines it."""

from __future__ import annotations

import time


class SystemClock:
    """Wall-clock time of this host, unmonitored: nothing here proves it is within the declared accuracy."""

    monitored = False

    def now_ns(self) -> int:
        return time.time_ns()
