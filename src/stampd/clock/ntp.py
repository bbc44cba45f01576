"""One NTP query to one server, as a measured offset with its worst-case error (RFC 5905).

The client is ntplib; this adapter adds what it leaves out: the packet sanity checks of RFC 5905 §8 (server mode,
a non-zero transmit timestamp, an originate timestamp echoing our request, a non-negative round-trip delay), the
"unusable" verdicts for an unsynchronised server (leap indicator 3, stratum 0 "kiss-o'-death" or 16 and above, no
reference time) and the error bound of the measured offset. Every failure is a :class:`SourceError`.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import ntplib  # type: ignore[import-untyped]

from stampd.errors import ConfigError, StampdError

NTP_PORT = 123
LEAP_ALARM = 3  # RFC 5905 §7.3: leap indicator 3 = "unknown (clock unsynchronized)"
STRATUM_UNSPECIFIED = 0  # RFC 5905 §7.3: stratum 0 = unspecified or invalid; a kiss-o'-death packet (§7.4)
STRATUM_UNSYNCHRONISED = 16  # RFC 5905 §7.3: 16 = unsynchronized, 17-255 reserved
MODE_SERVER = 4
# Slack for the float arithmetic of the origin and delay checks (NTP timestamps as doubles near 4e9 s: ~0.5 µs).
_FLOAT_SLACK_S = 1e-5


class SourceError(StampdError):
    """A time source gave no measurement that may be used; the message names the source and the reason."""


class SourceUnreachable(SourceError):
    """The source did not answer in time, could not be reached, or answered with an invalid packet."""


class SourceUnusable(SourceError):
    """The source answered, but says it is not synchronised (RFC 5905 §7.3: leap 3, stratum 0 or 16)."""


@dataclass(frozen=True, slots=True)
class SourceSample:
    """One measurement of a source (RFC 5905 §8 on-wire protocol): its clock minus ours, and how sure that is.

    ``error_s`` = root_delay/2 + root_dispersion + delay/2: the worst-case error of ``offset_s`` with respect to the
    source's reference clock (the root synchronization distance of RFC 5905 §11.2, without our own dispersion).
    ``leap`` is the source's leap indicator (0 none, 1 insert, 2 delete at the end of the UTC day).
    """

    source: str
    offset_s: float
    delay_s: float
    root_delay_s: float
    root_dispersion_s: float
    stratum: int
    leap: int
    error_s: float


def error_bound_s(*, delay_s: float, root_delay_s: float, root_dispersion_s: float) -> float:
    """The worst-case error of a measured offset (RFC 5905 §10-11 root distance, our dispersion left out)."""
    return root_delay_s / 2 + root_dispersion_s + delay_s / 2


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6; the port defaults to 123); a malformed one is a ConfigError."""
    text = address.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"clock.ntp_servers: {address!r}: expected [IPv6 address]:port")
        port_text = rest[1:] if rest else ""
    else:
        if text.count(":") > 1:
            raise ConfigError(f"clock.ntp_servers: {address!r}: write an IPv6 address in brackets, e.g. [::1]:123")
        host, _, port_text = text.partition(":")
    if not host:
        raise ConfigError(f"clock.ntp_servers: {address!r}: no host")
    if not port_text:
        return host, NTP_PORT
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigError(f"clock.ntp_servers: {address!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


class NtpSource:
    """An NTP server queried in client mode (RFC 5905 §8, NTPv4), one packet per :meth:`query`."""

    def __init__(self, address: str, timeout_s: float) -> None:
        if not timeout_s > 0:
            raise ConfigError(f"NTP server {address}: the timeout must be positive, not {timeout_s!r}")
        self._host, self._port = parse_address(address)
        self._address = address
        self._timeout_s = timeout_s

    @property
    def address(self) -> str:
        return self._address

    def __repr__(self) -> str:
        return f"NtpSource({self._address!r}, timeout_s={self._timeout_s!r})"

    def query(self) -> SourceSample:
        """Send one client request and turn the reply into a :class:`SourceSample`, or raise a SourceError."""
        sent_before = time.time()
        try:
            reply = ntplib.NTPClient().request(self._host, port=self._port, version=4, timeout=self._timeout_s)
        except socket.gaierror as e:
            raise SourceUnreachable(f"NTP server {self._address}: cannot resolve {self._host!r}: {e}") from e
        except ntplib.NTPException as e:
            raise SourceUnreachable(
                f"NTP server {self._address}: no valid reply within {self._timeout_s} s: {e}"
            ) from e
        except OSError as e:
            raise SourceUnreachable(f"NTP server {self._address}: {e.strerror or e}") from e
        return self._sample(reply, sent_before)

    def _sample(self, reply: ntplib.NTPStats, sent_before: float) -> SourceSample:
        """RFC 5905 §8 packet checks, then §7.3 synchronisation checks, then the sample."""
        name = f"NTP server {self._address}"
        mode = int(reply.mode)
        if mode != MODE_SERVER:
            raise SourceUnreachable(f"{name}: invalid reply: mode {mode}, expected {MODE_SERVER} (server)")
        if float(reply.tx_timestamp) == 0:
            raise SourceUnreachable(f"{name}: invalid reply: zero transmit timestamp")
        # ntplib does not match the reply to the request: the originate timestamp must echo our transmit time, so it
        # lies between the moment before we sent and the moment the reply arrived (RFC 5905 §8, "bogus" packet).
        origin = float(ntplib.ntp_to_system_time(reply.orig_timestamp))
        arrived = float(ntplib.ntp_to_system_time(reply.dest_timestamp))
        if not sent_before - _FLOAT_SLACK_S <= origin <= arrived + _FLOAT_SLACK_S:
            raise SourceUnreachable(f"{name}: invalid reply: the originate timestamp does not echo our request")
        delay = float(reply.delay)
        if delay < -_FLOAT_SLACK_S:
            raise SourceUnreachable(f"{name}: invalid reply: negative round-trip delay {delay:.6f} s")
        delay = max(delay, 0.0)

        leap = int(reply.leap)
        stratum = int(reply.stratum)
        if stratum == STRATUM_UNSPECIFIED:
            kiss = int(reply.ref_id).to_bytes(4, "big").decode("ascii", "replace").strip("\x00")
            raise SourceUnusable(f"{name}: unusable: stratum 0 (kiss-o'-death {kiss!r})")
        if stratum >= STRATUM_UNSYNCHRONISED:
            raise SourceUnusable(f"{name}: unusable: stratum {stratum} (unsynchronised)")
        if leap == LEAP_ALARM:
            raise SourceUnusable(f"{name}: unusable: leap indicator 3 (clock unsynchronised)")
        if float(reply.ref_timestamp) == 0:
            raise SourceUnusable(f"{name}: unusable: no reference time (never synchronised)")

        root_delay = float(reply.root_delay)
        root_dispersion = float(reply.root_dispersion)
        return SourceSample(
            source=self._address,
            offset_s=float(reply.offset),
            delay_s=delay,
            root_delay_s=root_delay,
            root_dispersion_s=root_dispersion,
            stratum=stratum,
            leap=leap,
            error_s=error_bound_s(delay_s=delay, root_delay_s=root_delay, root_dispersion_s=root_dispersion),
        )
