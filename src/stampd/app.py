"""Composition root: configuration -> adapters -> core -> server. The only module that wires them together.

Start-up fails closed (SPEC CRT-07, OPS-06): no TSU serves before its key, certificate profile and chain are
checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampd.certprofile import key_matches_certificate, profile_problems, signing_window
from stampd.clock.kernel import read_kernel_clock
from stampd.clock.leapseconds import load_leap_table
from stampd.clock.monitor import ClockMonitor
from stampd.clock.ntp import NtpSource
from stampd.clock.system import GatedClock
from stampd.clockgate import ClockGate, ClockPolicy, LeapPolicy
from stampd.config import CONFIG_ENV, ClockConfig, Config, TsuConfig, config_path, load_config
from stampd.der.request import encode_message_imprint
from stampd.der.token import GenTimeFormatter, TokenFields, TokenTemplate
from stampd.errors import ConfigError, PKIError
from stampd.issuance import TimeStampingUnit
from stampd.metrics import exposition, observe_clock
from stampd.model import MessageImprint
from stampd.oids import SHA256
from stampd.policy import IssuancePolicy
from stampd.records.store import RecordStore
from stampd.serials import RandomSerialSource
from stampd.server.asgi import TimeStampApp
from stampd.signers.keyfile import FileSigner, default_signature_hash, load_encrypted_key, read_passphrase_file
from stampd.verify import verify_timestamp
from stampd.verify.chain import validate_chain

log = logging.getLogger("stampd")


@dataclass(frozen=True, slots=True)
class LoadedTsu:
    config: TsuConfig
    signer: FileSigner
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    anchor: x509.Certificate


def _read_certificates(path: Path, field: str) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{field}: cannot read {path}: {e.strerror}") from None
    try:
        return (
            x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(data)]
        )
    except ValueError as e:
        raise PKIError(f"{field}: {path} holds no readable certificate: {e}") from None


def _passphrase(tsu: TsuConfig) -> bytes:
    if tsu.key.passphrase_file is not None:
        return read_passphrase_file(tsu.key.passphrase_file)
    assert tsu.key.passphrase_env is not None
    value = os.environ.get(tsu.key.passphrase_env)
    if not value:
        raise ConfigError(f"tsu.{tsu.name}.key.passphrase_env: the variable {tsu.key.passphrase_env} is not set")
    return value.encode()


def load_tsu(tsu: TsuConfig, now: datetime) -> LoadedTsu:
    """Load one TSU's key and certificates and refuse anything a relying party would reject (SPEC CRT-01..07)."""
    (certificate, *_) = _read_certificates(tsu.certificate, f"tsu.{tsu.name}.certificate")
    chain = [c for p in tsu.chain for c in _read_certificates(p, f"tsu.{tsu.name}.chain")]
    (anchor, *_) = _read_certificates(tsu.trust_anchor, f"tsu.{tsu.name}.trust_anchor")
    key = load_encrypted_key(tsu.key.path, _passphrase(tsu))
    signer = FileSigner(key, tsu.signature_hash or default_signature_hash(key), rsa_pss=tsu.rsa_pss)
    if not key_matches_certificate(signer.public_key, certificate):
        raise PKIError(f"tsu.{tsu.name}: the key {tsu.key.path} does not match the certificate {tsu.certificate}")
    problems = profile_problems(certificate, now)
    fatal = [str(p) for p in problems if p.fatal]
    if fatal:
        raise PKIError(f"tsu.{tsu.name}: the certificate {tsu.certificate} cannot be used: " + "; ".join(fatal))
    for problem in problems:
        log.warning("tsu.%s: certificate %s: %s", tsu.name, tsu.certificate, problem)
    path = validate_chain(certificate, intermediates=chain, anchors=[anchor], at=now)
    if not path.ok:
        raise PKIError(f"tsu.{tsu.name}: no valid chain to {tsu.trust_anchor}: " + "; ".join(path.problems))
    return LoadedTsu(tsu, signer, certificate, tuple(chain), anchor)


def _self_test(tsu: TsuConfig, template: TokenTemplate, item: LoadedTsu) -> None:
    """Fail closed: sign one token with the assembled template and check it as a relying party would."""
    digest = hashlib.sha256(b"stampd start-up self-test").digest()
    try:
        response = template.response(
            TokenFields(
                policy=tsu.default_policy,
                message_imprint=encode_message_imprint(MessageImprint(SHA256.oid, False, digest)),
                serial=1,
                gen_time=GenTimeFormatter(0).encode(time.time_ns()),
                nonce=None,
            ),
            with_certificates=True,
        )
    except Exception as e:
        raise PKIError(f"tsu.{tsu.name}: cannot sign a token: {e}") from e
    report = verify_timestamp(response, digest=digest, anchors=[item.anchor], extra_certs=list(item.chain))
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failures)
        raise PKIError(f"tsu.{tsu.name}: the start-up self-test token does not verify: {failed}")


def _window_ns(certificate: x509.Certificate) -> tuple[int, int]:
    start, end = signing_window(certificate)
    return int(start.timestamp()) * 1_000_000_000, int(end.timestamp()) * 1_000_000_000 + 999_999_999


def create_app(config: Config) -> TimeStampApp:
    now = datetime.now(UTC)
    loaded = [load_tsu(tsu, now) for tsu in config.tsus]
    store = RecordStore(config.records.url)
    gate, monitor = _clock(config.clock, store)
    clock = GatedClock(gate)
    serials = RandomSerialSource()
    units: dict[str, TimeStampingUnit] = {}
    certificates_pem: dict[str, bytes] = {}
    for item in loaded:
        tsu = item.config
        template = TokenTemplate(
            signer_certificate=item.certificate.public_bytes(Encoding.DER),
            chain=[c.public_bytes(Encoding.DER) for c in item.chain],
            digest_algorithm=item.signer.digest_algorithm,
            signature_algorithm=item.signer.signature_algorithm,
            accuracy_us=config.clock.accuracy_us,
            sign=item.signer.sign,
        )
        _self_test(tsu, template, item)
        unit = TimeStampingUnit(
            name=tsu.name,
            policy=IssuancePolicy(tsu.default_policy, tsu.accepted_policies, tsu.hash_algorithms),
            template=template,
            gen_time=GenTimeFormatter(tsu.gen_time_digits),
            clock=clock,
            serials=serials,
            records=store,
            signing_window_ns=_window_ns(item.certificate),
        )
        units[tsu.path] = unit
        if tsu.name == "default" and tsu.path != "/default":
            units.setdefault("/default", unit)
        chain = [item.certificate, *item.chain]
        if item.anchor not in chain:
            chain.append(item.anchor)
        certificates_pem[tsu.path] = b"".join(c.public_bytes(Encoding.PEM) for c in chain)

    service = _Service(store, gate, monitor, [t.name for t in config.tsus])
    for tsu in config.tsus:
        log.info("TSU %s serving at %s, default policy %s", tsu.name, tsu.path, tsu.default_policy)
    return TimeStampApp(
        units,
        certificates_pem,
        max_request_bytes=config.server.max_request_bytes,
        on_startup=service.start,
        on_shutdown=service.stop,
        readiness=lambda: gate.readiness(time.time_ns(), time.monotonic_ns()),
        metrics=exposition,
    )


def _clock(clock: ClockConfig, store: RecordStore) -> tuple[ClockGate, ClockMonitor | None]:
    """The gate every genTime passes, and the monitor that feeds it (none in the unmonitored demo profile)."""

    def record(kind: str, detail: dict[str, Any]) -> None:
        log.log(logging.INFO if kind == "clock.synchronised" else logging.WARNING, "%s: %s", kind, detail)
        store.record_event(kind, detail)

    policy = ClockPolicy(
        accuracy_ns=clock.accuracy_us * 1000,
        margin_ns=clock.safety_margin_us * 1000,
        max_age_ns=clock.max_age_us * 1000,
        min_agree=clock.min_agree,
        leap_policy=LeapPolicy(clock.leap_second),
        smear_window_ns=clock.smear_window_us * 1000,
        kernel_required=clock.kernel_discipline,
    )
    gate = ClockGate(policy, record, monitored=bool(clock.ntp_servers), last_issued_ns=store.last_gen_time_ns())
    if not clock.ntp_servers:
        return gate, None
    leap_table = load_leap_table(clock.leap_seconds_file) if clock.leap_seconds_file else None
    if leap_table is not None and leap_table.expired(time.time()):
        detail = {"path": str(clock.leap_seconds_file), "expired_at": leap_table.expires_unix}
        log.warning("clock: the leap-second table %s has expired: update the tz database", clock.leap_seconds_file)
        store.record_event("clock.leap_table_expired", detail)
    sources = [NtpSource(address, clock.query_timeout_us / 1e6) for address in clock.ntp_servers]
    monitor = ClockMonitor(
        gate,
        sources,
        interval_s=clock.check_interval_us / 1e6,
        kernel=read_kernel_clock if clock.kernel_discipline else lambda: None,
        leap_table=leap_table,
        observe=observe_clock,
    )
    return gate, monitor


class _Service:
    """Start and stop: the monitor's task, and the events that say when the service ran and in what clock state."""

    def __init__(self, store: RecordStore, gate: ClockGate, monitor: ClockMonitor | None, tsus: list[str]) -> None:
        self._store = store
        self._gate = gate
        self._monitor = monitor
        self._tsus = tsus
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._monitor is None:
            log.warning("clock: NOT MONITORED: no clock.ntp_servers, tokens carry the host's time unchecked (demo)")
        else:
            await self._monitor.check()
            self._task = asyncio.create_task(self._monitor.run(), name="stampd-clock-monitor")
        observe_clock(self._gate.status)
        self._store.record_event(
            "service.started", {"pid": os.getpid(), "tsus": self._tsus, "clock": self._gate.status.as_detail()}
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            self._store.record_event("service.stopped", {"pid": os.getpid(), "clock": self._gate.status.as_detail()})
        finally:
            self._store.close()


def create_app_from_environment() -> TimeStampApp:
    """Factory for worker processes: each loads the configuration named by $STAMPD_CONFIG itself."""
    return create_app(load_config(config_path(os.environ.get(CONFIG_ENV))))
