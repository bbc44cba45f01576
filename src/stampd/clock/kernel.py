"""The kernel's own clock discipline, read with adjtimex(2) (RFC 5905 §7.3 flags, kernel model of RFC 1589).

``adjtimex`` with ``modes = 0`` only reads, so it needs no privileges. It reports whether the kernel considers the
clock synchronised (``STA_UNSYNC`` clear, return value not ``TIME_ERROR``), the maximum and estimated error the NTP
daemon last told it, and a pending leap second (``STA_INS``/``STA_DEL``). The layout of ``struct timex`` is Linux's
(``<sys/timex.h>``, ``__syscall_slong_t`` = C ``long``); elsewhere :func:`read_kernel_clock` returns None.
"""

from __future__ import annotations

import ctypes
import sys
from dataclasses import dataclass
from typing import Literal

# Status bits (struct timex.status) of <sys/timex.h>.
STA_PLL = 0x0001
STA_INS = 0x0010
STA_DEL = 0x0020
STA_UNSYNC = 0x0040
STA_NANO = 0x2000

# Clock states, the return value of adjtimex(2).
TIME_OK = 0
TIME_INS = 1
TIME_DEL = 2
TIME_OOP = 3
TIME_WAIT = 4
TIME_ERROR = 5

_US_PER_S = 1_000_000


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class Timex(ctypes.Structure):
    """``struct timex`` of Linux (glibc/musl ``<sys/timex.h>``); 208 bytes on LP64 (x86_64, aarch64)."""

    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    )


@dataclass(frozen=True, slots=True)
class KernelClock:
    """What the kernel says of its clock: synchronised or not, its error bounds, and a pending leap second."""

    synchronised: bool
    max_error_s: float
    est_error_s: float
    leap: Literal["none", "insert", "delete"]
    state: int


def kernel_clock_from_timex(state: int, timex: Timex | bytes) -> KernelClock:
    """Decode adjtimex's return value and ``struct timex`` (raw bytes or the ctypes structure)."""
    tx = Timex.from_buffer_copy(timex) if isinstance(timex, bytes) else timex
    status = int(tx.status)
    leap: Literal["none", "insert", "delete"] = "none"
    if status & STA_INS:  # the kernel tests STA_INS before STA_DEL (kernel/time/ntp.c)
        leap = "insert"
    elif status & STA_DEL:
        leap = "delete"
    return KernelClock(
        synchronised=not status & STA_UNSYNC and state != TIME_ERROR,
        max_error_s=int(tx.maxerror) / _US_PER_S,  # maxerror and esterror are in µs even with STA_NANO
        est_error_s=int(tx.esterror) / _US_PER_S,
        leap=leap,
        state=state,
    )


def read_kernel_clock() -> KernelClock | None:
    """Read the kernel's discipline with ``adjtimex(modes=0)``; None where there is no such call or it is refused.

    None means "the kernel says nothing", not "synchronised": it happens off Linux, or where a sandbox blocks the
    call (seccomp answering EPERM or ENOSYS).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    call = getattr(libc, "adjtimex", None) or getattr(libc, "ntp_adjtime", None)
    if call is None:
        return None
    call.argtypes = (ctypes.POINTER(Timex),)
    call.restype = ctypes.c_int
    tx = Timex()  # modes = 0: read only
    state = int(call(ctypes.byref(tx)))
    if state < 0:
        return None
    return kernel_clock_from_timex(state, tx)
