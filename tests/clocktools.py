"""Time sources for the clock tests: a scriptable NTP server of our own, and chronyd serving its local clock.

:class:`FakeNtpServer` answers NTPv4 client requests (RFC 5905 §7.3 packet layout, §8 on-wire protocol) from a
thread on a loopback UDP port, with an offset, jitter, root delay/dispersion, stratum and leap indicator that tests
change while it runs, and it can fall silent. :func:`chrony_server` runs Debian's chronyd as a real NTP server on a
free loopback port, serving its local clock (``local stratum``) without ever touching this machine's clock (``-x``).
Neither depends on the wall clock being right: offsets are measured against the same host clock.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

NTP_UNIX_DELTA = 2_208_988_800
NTP_PACKET = struct.Struct("!BBbbII4sQQQQ")  # RFC 5905 §7.3: 48 bytes without extensions or MAC
MODE_CLIENT = 3
MODE_SERVER = 4
CHRONY_START_TIMEOUT_S = 10.0


def ntp_timestamp(unix_ns: int) -> int:
    """A 64-bit NTP timestamp (RFC 5905 §6: 32-bit seconds since 1900, era 0, and a 32-bit fraction)."""
    seconds, ns = divmod(unix_ns, 1_000_000_000)
    return (((seconds + NTP_UNIX_DELTA) & 0xFFFFFFFF) << 32) | ((ns << 32) // 1_000_000_000)


def ntp_short(seconds: float) -> int:
    """A 32-bit NTP short format value (RFC 5905 §6: 16.16 fixed point), as used for root delay and dispersion."""
    return max(0, min(0xFFFFFFFF, round(seconds * 65536)))


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nobody is bound to right now on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class FakeNtpServer:
    """An NTPv4 server on 127.0.0.1 whose answers the test chooses; every attribute may change at run time.

    ``offset_s`` is added to this host's clock for the receive and transmit timestamps; ``jitter_s`` adds a uniform
    random error in [-jitter, +jitter] to both (so the offset wanders, the round trip does not); ``reply_delay_s``
    holds each answer back after its transmit timestamp (so the measured round trip grows); ``silent`` drops every
    request. ``echo_origin = False`` and ``reply_mode`` make invalid replies.
    """

    def __init__(
        self,
        *,
        offset_s: float = 0.0,
        jitter_s: float = 0.0,
        root_delay_s: float = 0.0,
        root_dispersion_s: float = 0.0,
        stratum: int = 2,
        leap: int = 0,
        ref_id: bytes = b"\x7f\x00\x00\x01",
        seed: int = 0,
    ) -> None:
        self.offset_s = offset_s
        self.jitter_s = jitter_s
        self.root_delay_s = root_delay_s
        self.root_dispersion_s = root_dispersion_s
        self.stratum = stratum
        self.leap = leap
        self.ref_id = ref_id
        self.reply_delay_s = 0.0
        self.silent = False
        self.echo_origin = True
        self.reply_mode = MODE_SERVER
        self.requests = 0  # requests received, answered or not
        self.answered = 0
        self._random = random.Random(seed)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fake-ntp-server", daemon=True)
        self._started = False

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> FakeNtpServer:
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join(timeout=5)
        self._sock.close()

    def __enter__(self) -> FakeNtpServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _now_ns(self, error_ns: int) -> int:
        return time.time_ns() + round(self.offset_s * 1e9) + error_ns

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(1024)
            except TimeoutError:
                continue
            except OSError:
                return
            jitter = self.jitter_s
            error_ns = round(self._random.uniform(-jitter, jitter) * 1e9) if jitter else 0
            received = self._now_ns(error_ns)
            self.requests += 1
            if self.silent or len(data) < NTP_PACKET.size:
                continue
            first, *_, client_transmit = NTP_PACKET.unpack_from(data)
            version, mode = (first >> 3) & 0x7, first & 0x7
            if mode != MODE_CLIENT or version not in (1, 2, 3, 4):
                continue
            origin = client_transmit if self.echo_origin else client_transmit ^ 0x5A5A_5A5A_0000_0000
            transmit = self._now_ns(error_ns)
            reply = NTP_PACKET.pack(
                (self.leap & 0x3) << 6 | version << 3 | (self.reply_mode & 0x7),
                self.stratum,
                4,  # poll: 16 s, the monitor's default interval
                -20,  # precision: about 1 µs
                ntp_short(self.root_delay_s),
                ntp_short(self.root_dispersion_s),
                self.ref_id,
                ntp_timestamp(received - 16 * 1_000_000_000),  # reference: last "synchronised" 16 s ago
                origin,
                ntp_timestamp(received),
                ntp_timestamp(transmit),
            )
            if self.reply_delay_s:
                time.sleep(self.reply_delay_s)
            with contextlib.suppress(OSError):
                self._sock.sendto(reply, peer)
                self.answered += 1


def _ntp_answers(host: str, port: int, timeout_s: float) -> bool:
    """Whether a plain NTP client request to host:port gets a server reply."""
    request = NTP_PACKET.pack(4 << 3 | MODE_CLIENT, 0, 0, 0, 0, 0, b"\0\0\0\0", 0, 0, 0, ntp_timestamp(time.time_ns()))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        try:
            s.sendto(request, (host, port))
            data = s.recv(1024)
        except OSError:
            return False
    return len(data) >= NTP_PACKET.size and data[0] & 0x7 == MODE_SERVER


def chronyd_path() -> str:
    """The chronyd binary, or a failure telling how to install it (the CI installs chrony; no silent skip)."""
    for candidate in (shutil.which("chronyd"), "/usr/sbin/chronyd", "/sbin/chronyd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError(
        "chronyd not found: the clock integration tests run a real NTP server; install chrony "
        "(Debian/Ubuntu: apt-get install -y chrony)"
    )


def _chrony_user() -> tuple[list[str], int | None]:
    """The options that make chronyd run unprivileged, and the uid that must own its directory (if we are root)."""
    if os.geteuid() != 0:
        # -U: start without root; -u: "drop" to the user we already are (chronyd only switches users as root).
        return ["-U", "-u", pwd.getpwuid(os.geteuid()).pw_name], None
    for name in ("_chrony", "chrony", "nobody"):
        with contextlib.suppress(KeyError):
            return ["-u", name], pwd.getpwnam(name).pw_uid
    return ["-u", "root"], None


@contextlib.contextmanager
def chrony_server(*, stratum: int = 8, host: str = "127.0.0.1") -> Iterator[str]:
    """Run chronyd as an NTP server of its local clock on a free ``host`` port; yield its "host:port" address.

    chronyd runs in the foreground (``-d``), never adjusts this machine's clock (``-x``), has no command socket
    (``cmdport 0``, ``bindcmdaddress /``), keeps its pid and drift files in a private directory, and drops root
    privileges when started as root. It serves ``stratum`` (its ``local stratum``) to clients.
    """
    binary = chronyd_path()
    user_options, owner = _chrony_user()
    port = free_udp_port(host)
    with tempfile.TemporaryDirectory(prefix="stampd-chrony-") as tmp:
        workdir = Path(tmp)
        if owner is not None:
            os.chown(workdir, owner, -1)  # chronyd writes its drift file after dropping root
        config = workdir / "chrony.conf"
        config.write_text(
            "\n".join(
                (
                    f"port {port}",
                    f"bindaddress {host}",
                    f"allow {host}",
                    f"local stratum {stratum}",
                    "cmdport 0",
                    "bindcmdaddress /",
                    f"pidfile {workdir / 'chronyd.pid'}",
                    f"driftfile {workdir / 'chrony.drift'}",
                    "",
                )
            )
        )
        log_path = workdir / "chronyd.log"
        command = [binary, "-f", str(config), "-d", "-x", "-L", "0", *user_options]
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + CHRONY_START_TIMEOUT_S
            while not _ntp_answers(host, port, 0.2):
                if process.poll() is not None or time.monotonic() > deadline:
                    state = f"exited with status {process.returncode}" if process.poll() is not None else "is silent"
                    raise RuntimeError(
                        f"chronyd {state} ({' '.join(command)}):\n{log_path.read_text(errors='replace')}"
                    )
            yield f"{host}:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
