"""Helpers for the usage-ledger tests: OS processes that reserve at the same moment.

Import it as ``from usagetools import run_together`` with ``tests/`` on ``sys.path`` (as the clock tests do with
clocktools).
"""

from __future__ import annotations

import subprocess
import sys


def run_together(script: str, *args: str, processes: int = 2, timeout: float = 120) -> list[int]:
    """Run ``processes`` copies of the Python ``script`` with ``args`` and start their work at the same moment;
    returns the number each printed last.

    The script connects, prints ``ready``, waits for a line on stdin (sent to all once all are ready), does its
    work and prints one integer (e.g. how many reservations it was granted)."""
    started = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(processes)
    ]
    for process in started:
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
    for process in started:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [p.communicate(timeout=timeout)[0] for p in started]
    assert [p.returncode for p in started] == [0] * processes
    return [int(output) for output in outputs]
