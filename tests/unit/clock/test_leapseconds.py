"""The leap-second table: the real tzdata file, synthetic future leaps, corrupt and expired tables.

SPEC TIM-07 (pause around a leap second needs to know when it is), OPS-04 (leap-second changes are logged).
No test reads the wall clock: every "now" is a fixed instant.
"""

from __future__ import annotations

import calendar
import hashlib
from pathlib import Path

import pytest

from stampd.clock.leapseconds import (
    DEFAULT_LEAP_TABLE,
    NTP_UNIX_DELTA,
    LeapTable,
    load_leap_table,
    parse_leap_table,
)
from stampd.errors import ConfigError

VECTOR = Path(__file__).parents[2] / "vectors" / "leap-seconds" / "leap-seconds.list"

JAN_2017 = calendar.timegm((2017, 1, 1, 0, 0, 0))
JUL_2012 = calendar.timegm((2012, 7, 1, 0, 0, 0))
JUL_2015 = calendar.timegm((2015, 7, 1, 0, 0, 0))
JAN_2030 = calendar.timegm((2030, 1, 1, 0, 0, 0))
JUL_2030 = calendar.timegm((2030, 7, 1, 0, 0, 0))


def ntp(unix: int) -> int:
    return unix + NTP_UNIX_DELTA


def make_table(
    entries: list[tuple[int, int]], *, expires_unix: int, updated_unix: int = JAN_2017, words: list[str] | None = None
) -> str:
    """A leap-seconds.list text with its #h hash computed as the format defines it (unless ``words`` is given)."""
    numbers = [str(ntp(updated_unix)), str(ntp(expires_unix))]
    for at, dtai in entries:
        numbers += [str(ntp(at)), str(dtai)]
    digest = hashlib.sha1("".join(numbers).encode()).hexdigest()
    words = words if words is not None else [digest[i : i + 8] for i in range(0, 40, 8)]
    lines = ["#\tsynthetic table for stampd tests", f"#$\t {ntp(updated_unix)}", f"#@\t {ntp(expires_unix)}", "#"]
    lines += [f"{ntp(at)}\t{dtai}\t# entry" for at, dtai in entries]
    lines += ["#", "#h\t" + " ".join(words), ""]
    return "\n".join(lines)


BASE = [(JUL_2012, 35), (JUL_2015, 36), (JAN_2017, 37)]  # a table may start at any leap


def test_real_tzdata_table_verifies_and_has_the_2016_leap() -> None:
    table = load_leap_table(VECTOR)
    assert len(table.leaps) == 28
    assert table.leaps[0] == (calendar.timegm((1972, 1, 1, 0, 0, 0)), 10)
    assert table.leaps[-1] == (JAN_2017, 37)
    assert table.expires_unix == calendar.timegm((2026, 6, 28, 0, 0, 0))
    # The last leap second was inserted as 2016-12-31T23:59:60Z, so TAI-UTC became 37 at 2017-01-01T00:00:00Z.
    assert table.next_leap(JAN_2017 - 86_400) == (JAN_2017, +1)
    assert table.next_leap(JAN_2017 - 0.5) == (JAN_2017, +1)
    assert table.next_leap(JAN_2017) is None
    assert table.next_leap(calendar.timegm((2020, 1, 1, 0, 0, 0))) is None
    # Before 1972-07-01 the next leap is the first one; 1972-01-01 itself (TAI-UTC = 10) is not a leap.
    assert table.next_leap(0) == (calendar.timegm((1972, 7, 1, 0, 0, 0)), +1)


def test_real_table_expiry() -> None:
    table = load_leap_table(VECTOR)
    assert not table.expired(calendar.timegm((2026, 6, 27, 23, 59, 59)))
    assert table.expired(calendar.timegm((2026, 6, 28, 0, 0, 0)))


def test_default_path_is_the_tzdata_copy() -> None:
    assert Path("/usr/share/zoneinfo/leap-seconds.list") == DEFAULT_LEAP_TABLE


def test_future_inserted_leap_second() -> None:
    table = parse_leap_table(make_table([*BASE, (JAN_2030, 38)], expires_unix=JUL_2030))
    assert table.next_leap(JAN_2030 - 3600) == (JAN_2030, +1)
    assert table.next_leap(JAN_2030 - 1.5) == (JAN_2030, +1)
    assert table.next_leap(JAN_2030) is None
    assert not table.expired(JAN_2030)


def test_future_deleted_leap_second() -> None:
    table = parse_leap_table(make_table([*BASE, (JAN_2030, 36)], expires_unix=JUL_2030))
    assert table.next_leap(JAN_2017 + 1) == (JAN_2030, -1)


def test_expired_table() -> None:
    table = parse_leap_table(make_table(BASE, expires_unix=JUL_2030))
    assert not table.expired(JUL_2030 - 1)
    assert table.expired(JUL_2030)
    assert table.expired(JUL_2030 + 86_400)


def test_hash_words_without_leading_zeros_are_accepted() -> None:
    # Some published copies print each 32-bit word of the hash without its leading zeros.
    text = make_table(BASE, expires_unix=JUL_2030)
    words = text.rsplit("#h\t", 1)[1].split()
    stripped = [w.lstrip("0") or "0" for w in words]
    table = parse_leap_table(make_table(BASE, expires_unix=JUL_2030, words=stripped))
    assert table == parse_leap_table(text)


def test_bad_hash_is_refused() -> None:
    text = make_table(BASE, expires_unix=JUL_2030, words=["0" * 8] * 5)
    with pytest.raises(ConfigError, match="hash does not match"):
        parse_leap_table(text)


def test_edited_entry_is_refused() -> None:
    text = make_table([*BASE, (JAN_2030, 38)], expires_unix=JUL_2030)
    edited = text.replace(f"{ntp(JAN_2030)}\t38", f"{ntp(JUL_2030)}\t38")
    with pytest.raises(ConfigError, match="hash does not match"):
        parse_leap_table(edited)


def test_edited_expiry_is_refused() -> None:
    text = make_table(BASE, expires_unix=JAN_2030).replace(f"#@\t {ntp(JAN_2030)}", f"#@\t {ntp(JUL_2030)}")
    with pytest.raises(ConfigError, match="hash does not match"):
        parse_leap_table(text)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.replace("#h\t", "#\t"), "no #h line"),
        (lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("#@")), "no #@ line"),
        (lambda t: "\n".join(x for x in t.splitlines() if not x.startswith("#$")), r"no #\$ line"),
        (lambda t: t.replace("\t# entry", " 99 # entry", 1), "data line"),
        (lambda t: t + "#h\t1 2 3 4 5\n", "#h line must appear once"),
        (lambda t: t.replace("#@\t ", "#@\t x"), "one NTP time"),
    ],
)
def test_malformed_tables_are_refused(mutate: object, message: str) -> None:
    text = make_table(BASE, expires_unix=JUL_2030)
    assert callable(mutate)
    with pytest.raises(ConfigError, match=message):
        parse_leap_table(mutate(text))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([*BASE, (JAN_2030 + 3600, 38)], "00:00:00 UTC"),
        ([*BASE, (JUL_2015, 38)], "increasing time order"),
        ([*BASE, (JAN_2030, 39)], "exactly one second"),
    ],
)
def test_inconsistent_tables_are_refused(entries: list[tuple[int, int]], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_leap_table(make_table(entries, expires_unix=JUL_2030))


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.list"
    with pytest.raises(ConfigError, match=str(missing)):
        load_leap_table(missing)


def test_corrupt_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "leap-seconds.list"
    path.write_text(VECTOR.read_text().replace("3692217600      37", "3692217600      38"))
    with pytest.raises(ConfigError, match=f"{path}.*hash does not match"):
        load_leap_table(path)


def test_binary_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "leap-seconds.list"
    path.write_bytes(b"\xff\xfe" + VECTOR.read_bytes())
    with pytest.raises(ConfigError, match=str(path)):
        load_leap_table(path)


def test_table_is_a_frozen_value() -> None:
    table = LeapTable(leaps=((0, 10),), expires_unix=1)
    with pytest.raises(AttributeError):
        table.expires_unix = 2  # type: ignore[misc]
    assert table.next_leap(-1) is None
