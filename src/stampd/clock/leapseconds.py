"""The leap-second table in the IERS/IANA ``leap-seconds.list`` format (RFC 5905 §7.3 leap indicator).

The format: data lines ``<NTP seconds> <TAI-UTC>`` (the NTP time, seconds since 1900-01-01, of the first instant
with the new TAI-UTC, i.e. the midnight right after a leap second), ``#$ <NTP seconds>`` the last update,
``#@ <NTP seconds>`` the expiry, and ``#h`` five 32-bit words in hexadecimal: the SHA-1 of the digits of the
update time, the expiry and every data line's two numbers, concatenated without whitespace or comments. Any other
line starting with ``#`` is a comment. A file whose hash does not match is refused.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from stampd.errors import ConfigError

DEFAULT_LEAP_TABLE = Path("/usr/share/zoneinfo/leap-seconds.list")  # Debian's tzdata copy
NTP_UNIX_DELTA = 2_208_988_800  # seconds from 1900-01-01 (NTP epoch, RFC 5905 §6) to 1970-01-01
_DAY = 86_400
_MAX_SIZE = 1 << 20
_NUMBER = re.compile(r"[0-9]+")
_HEX_WORD = re.compile(r"[0-9a-fA-F]{1,8}")


@dataclass(frozen=True, slots=True)
class LeapTable:
    """Leap seconds as (unix time of the first instant after the leap, TAI-UTC from then), and the table's expiry.

    The first entry (1 January 1972, TAI-UTC = 10 s) is the start of UTC as it is now, not a leap second.
    """

    leaps: tuple[tuple[int, int], ...]
    expires_unix: int

    def next_leap(self, now_unix: float) -> tuple[int, int] | None:
        """The first leap after ``now_unix``: (unix time of the midnight it takes effect, +1 inserted / -1 deleted)."""
        for (_, previous), (at, tai_utc) in zip(self.leaps, self.leaps[1:], strict=False):
            if at > now_unix:
                return at, tai_utc - previous
        return None

    def expired(self, now_unix: float) -> bool:
        """True from the expiry on: the table says nothing about leap seconds after that instant."""
        return now_unix >= self.expires_unix


def parse_leap_table(text: str, *, source: str = "leap-seconds.list") -> LeapTable:
    """Parse and verify the text of a ``leap-seconds.list`` file; ``source`` names it in errors (ConfigError)."""

    def corrupt(line_no: int | None, reason: str) -> ConfigError:
        where = f"{source}, line {line_no}" if line_no is not None else source
        return ConfigError(f"leap-second table {where}: {reason}")

    updated: str | None = None
    expires: str | None = None
    digest: str | None = None
    entries: list[tuple[str, str, int]] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line[:2] in ("#$", "#@", "#h") and (len(line) == 2 or line[2].isspace()):
            tag, fields = line[:2], line[2:].split()
            if tag == "#h":
                if digest is not None or len(fields) != 5 or not all(_HEX_WORD.fullmatch(w) for w in fields):
                    raise corrupt(line_no, "the #h line must appear once, with five hexadecimal words")
                # Words are printed without leading zeros in some published copies: each one is 32 bits.
                digest = "".join(f"{int(w, 16):08x}" for w in fields)
                continue
            if len(fields) != 1 or not _NUMBER.fullmatch(fields[0]):
                raise corrupt(line_no, f"the {tag} line must hold one NTP time in seconds")
            if (tag == "#$" and updated is not None) or (tag == "#@" and expires is not None):
                raise corrupt(line_no, f"a second {tag} line")
            if tag == "#$":
                updated = fields[0]
            else:
                expires = fields[0]
            continue
        data = line.split("#", 1)[0].split()
        if not data:
            continue
        if len(data) != 2 or not all(_NUMBER.fullmatch(f) for f in data):
            raise corrupt(line_no, "a data line must be '<NTP seconds> <TAI-UTC>'")
        entries.append((data[0], data[1], line_no))

    if updated is None or expires is None or digest is None:
        missing = [tag for tag, value in (("#$", updated), ("#@", expires), ("#h", digest)) if value is None]
        raise corrupt(None, f"no {' or '.join(missing)} line")
    if not entries:
        raise corrupt(None, "no leap-second entries")
    hashed = updated + expires + "".join(ntp + dtai for ntp, dtai, _ in entries)
    if hashlib.sha1(hashed.encode("ascii"), usedforsecurity=False).hexdigest() != digest:
        raise corrupt(None, "the #h hash does not match the contents (corrupt or edited file)")

    leaps: list[tuple[int, int]] = []
    for ntp, dtai, line_no in entries:
        at, tai_utc = int(ntp) - NTP_UNIX_DELTA, int(dtai)
        if at % _DAY:
            raise corrupt(line_no, "a leap second must take effect at 00:00:00 UTC")
        if leaps and at <= leaps[-1][0]:
            raise corrupt(line_no, "entries must be in increasing time order")
        if leaps and abs(tai_utc - leaps[-1][1]) != 1:
            raise corrupt(line_no, "TAI-UTC must change by exactly one second at each leap")
        leaps.append((at, tai_utc))
    return LeapTable(leaps=tuple(leaps), expires_unix=int(expires) - NTP_UNIX_DELTA)


def load_leap_table(path: Path) -> LeapTable:
    """Read and verify a ``leap-seconds.list`` file; a missing, unreadable or corrupt one is a ConfigError."""
    try:
        with path.open("rb") as f:
            raw = f.read(_MAX_SIZE + 1)
    except OSError as e:
        raise ConfigError(f"leap-second table {path}: cannot read: {e.strerror or e}") from e
    if len(raw) > _MAX_SIZE:
        raise ConfigError(f"leap-second table {path}: larger than {_MAX_SIZE} bytes")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError as e:
        raise ConfigError(f"leap-second table {path}: not ASCII text (byte {e.start})") from e
    return parse_leap_table(text, source=str(path))
