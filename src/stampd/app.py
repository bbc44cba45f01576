"""Composition root: configuration -> adapters -> core -> server. The only module that wires them together.

Start-up fails closed (SPEC CRT-07, OPS-06): no TSU serves before its key, certificate profile and chain are
checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampd.access import AccessRule, SubscriberDirectory, UsageLedger
from stampd.certprofile import key_fingerprint, key_matches_certificate, signing_window, tsu_refusals
from stampd.clock.kernel import read_kernel_clock
from stampd.clock.leapseconds import load_leap_table
from stampd.clock.monitor import ClockMonitor
from stampd.clock.ntp import NtpSource
from stampd.clock.system import GatedClock
from stampd.clockgate import ClockGate, ClockPolicy, LeapPolicy
from stampd.config import CONFIG_ENV, ClockConfig, Config, TsuConfig, config_path, load_config
from stampd.der.request import encode_message_imprint
from stampd.der.token import QUALIFIED_TOKEN_EXTENSIONS, GenTimeFormatter, TokenFields, TokenTemplate
from stampd.errors import ConfigError, PKIError, RecordingError, StampdError
from stampd.issuance import SigningKey, StoppedUnit, TimeStampingUnit
from stampd.metrics import READINESS, TSU_ACTIVE, TSU_CERTIFICATE_DAYS_LEFT, TSU_DAYS_LEFT, exposition, observe_clock
from stampd.model import MessageImprint
from stampd.oids import SHA256
from stampd.policy import IssuancePolicy
from stampd.records.checkpoint import CheckpointSigner
from stampd.records.store import RecordStore
from stampd.records.subscribers import SubscriberStore
from stampd.records.usage import open_usage_ledger
from stampd.serials import RandomSerialSource
from stampd.server.asgi import Route, TimeStampApp
from stampd.signers.backends import KeySigner, open_signer
from stampd.signers.keyfile import load_encrypted_key, read_passphrase_file
from stampd.verify import verify_timestamp
from stampd.verify.chain import validate_chain

log = logging.getLogger("stampd")

GC_THRESHOLD = 50_000
"""Allocations between young-generation collections: a request allocates few cycles, so collecting every 700
allocations (the default) only spends CPU that signatures could use (measured with benchmarks/run.py)."""

TSU_STATE_POLL_S = 1.0
"""How often a serving process reads the TSU states; the database refuses stopped TSUs' records at once anyway."""

KEY_CHECK_INTERVAL_S = 10.0
"""How often each TSU's key signs a test token for /readyz (an HSM that stopped answering shows within this)."""

RECORDS_PROBE_IDLE_S = 10.0
"""After this long without a token committed, /readyz relies on a write probe of the records instead."""

RELOAD_EVENT_ATTEMPTS = 5
"""Tries to record a reload's event (each waits for the records' busy timeout)."""

SUBSCRIBERS_POLL_S = 5.0
"""How often a serving process re-reads the subscribers (when a TSU serves subscribers): `stampd subscribers
disable` takes effect on every node within this time, without a signal."""


@dataclass(frozen=True, slots=True)
class LoadedTsu:
    config: TsuConfig
    signer: KeySigner
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


def load_tsu(tsu: TsuConfig, now: datetime, *, successor: bool = False) -> LoadedTsu:
    """Load one TSU's key and certificates and refuse anything a relying party would reject (SPEC CRT-01..07).

    With ``successor``, the [tsu.NAME.next] key and certificate, checked as of their activation instant.
    """
    if successor:
        assert tsu.next is not None
        field, certificate_path, chain_paths, key = (
            f"tsu.{tsu.name}.next",
            tsu.next.certificate,
            tsu.next.chain or tsu.chain,  # as `stampd tsu install-cert --next` checks it
            tsu.next.key,
        )
        at = tsu.next.activate_at.astimezone(UTC)
    else:
        field, certificate_path, chain_paths, key, at = f"tsu.{tsu.name}", tsu.certificate, tsu.chain, tsu.key, now
    (certificate, *_) = _read_certificates(certificate_path, f"{field}.certificate")
    chain = [c for p in chain_paths for c in _read_certificates(p, f"{field}.chain")]
    (anchor, *_) = _read_certificates(tsu.trust_anchor, f"tsu.{tsu.name}.trust_anchor")
    signer = open_signer(key, hash_name=tsu.signature_hash, rsa_pss=tsu.rsa_pss, field=f"{field}.key")
    item = LoadedTsu(tsu, signer, certificate, tuple(chain), anchor)
    try:
        _check(item, field=field, certificate_path=certificate_path, at=at)
    except BaseException:
        signer.close()
        raise
    return item


def _check(item: LoadedTsu, *, field: str, certificate_path: Path, at: datetime) -> None:
    """The checks of SPEC CRT-01..07 that a key and certificate pass before they sign anything."""
    tsu, signer, certificate, chain, anchor = item.config, item.signer, item.certificate, list(item.chain), item.anchor
    if not key_matches_certificate(signer.public_key, certificate):
        raise PKIError(f"{field}: the key does not match the certificate {certificate_path}")
    # Validity is checked per token (the signing window); everything else a relying party would reject is fatal,
    # with the same rules as `stampd tsu install-cert` (a CA certificate or extra key usages are refused).
    window_start, window_end = signing_window(certificate)
    at = min(max(at, window_start), window_end)
    refused, warnings = tsu_refusals(certificate, at)
    if refused:
        raise PKIError(f"{field}: the certificate {certificate_path} cannot be used: " + "; ".join(refused))
    for warning in warnings:
        log.warning("%s: certificate %s: %s", field, certificate_path, warning)
    path = validate_chain(certificate, intermediates=chain, anchors=[anchor], at=at)
    if not path.ok:
        raise PKIError(f"{field}: no valid chain to {tsu.trust_anchor}: " + "; ".join(path.problems))


def _ns(moment: datetime) -> int:
    """Exact nanoseconds since the epoch (no float rounding: a rollover instant must be exact)."""
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def _signing_key(item: LoadedTsu, accuracy_us: int, at_ns: int) -> SigningKey:
    """The token template of one key, proven by a self-test token dated ``at_ns``, and its signing window."""
    tsu = item.config
    template = TokenTemplate(
        signer_certificate=item.certificate.public_bytes(Encoding.DER),
        chain=[c.public_bytes(Encoding.DER) for c in item.chain],
        digest_algorithm=item.signer.digest_algorithm,
        signature_algorithm=item.signer.signature_algorithm,
        accuracy_us=tsu.accuracy_us or accuracy_us,
        sign=item.signer.sign,
        extensions=QUALIFIED_TOKEN_EXTENSIONS if tsu.qualified else b"",
    )
    start, end = signing_window(item.certificate)
    _self_test(tsu, template, item, min(max(at_ns, _ns(start)), _ns(end)))  # an expired key is tested in its window
    return SigningKey(template, _ns(start), _ns(end), item.certificate.serial_number)


def _self_test(tsu: TsuConfig, template: TokenTemplate, item: LoadedTsu, at_ns: int) -> None:
    """Fail closed: sign one token with the assembled template and check it as a relying party would."""
    digest = hashlib.sha256(b"stampd self-test").digest()
    try:
        response = template.response(
            TokenFields(
                policy=tsu.default_policy,
                message_imprint=encode_message_imprint(MessageImprint(SHA256.oid, False, digest)),
                serial=1,
                gen_time=GenTimeFormatter(0).encode(at_ns),
                nonce=None,
            ),
            with_certificates=True,
        )
    except Exception as e:
        raise PKIError(f"tsu.{tsu.name}: cannot sign a token: {e}") from e
    report = verify_timestamp(response, digest=digest, anchors=[item.anchor], extra_certs=list(item.chain))
    if not report.ok:
        failed = "; ".join(f"{c.name}: {c.detail}" for c in report.failures)
        raise PKIError(f"tsu.{tsu.name}: the self-test token does not verify: {failed}")


@dataclass(frozen=True, slots=True)
class _Tsus:
    """The TSUs of one configuration, as the server routes to them."""

    routes: dict[str, TimeStampingUnit | StoppedUnit]
    certificates_pem: dict[str, bytes]
    renew_before_ns: dict[str, int]
    signers: list[KeySigner]
    rules: dict[str, AccessRule] = field(default_factory=dict)
    """The access rule of each path served to subscribers only (a path without one is public)."""
    keys: dict[str, list[tuple[SigningKey, LoadedTsu]]] = field(default_factory=dict)
    """Each TSU's keys (current, next) with what they were loaded from: the watcher's test signatures use them."""

    def close(self) -> None:
        """Release the keys (HSM sessions); signing is synchronous on the loop, so none is in use now."""
        for signer in self.signers:
            signer.close()

    @property
    def units(self) -> list[TimeStampingUnit]:
        """The TSUs that hold a key (a stopped TSU's stand-in holds none)."""
        return [u for u in dict.fromkeys(self.routes.values()) if isinstance(u, TimeStampingUnit)]

    @property
    def stopped(self) -> list[StoppedUnit]:
        return [u for u in dict.fromkeys(self.routes.values()) if isinstance(u, StoppedUnit)]


def _stopped_key_fingerprints(store: RecordStore) -> dict[str, str]:
    """Keys of compromised or terminated TSUs (fingerprint -> state): refused under any TSU name."""
    found: dict[str, str] = {}
    for event in store.events():
        if event["kind"] in ("tsu.compromised", "tsu.terminated"):
            for fingerprint in event["detail"].get("key_fingerprints", []):
                found[fingerprint] = event["kind"].removeprefix("tsu.")
    return found


def _build_tsus(config: Config, store: RecordStore, clock: GatedClock, serials: RandomSerialSource) -> _Tsus:
    """Load and check every TSU of ``config`` (fail closed: any problem raises before anything is served, and
    the keys opened so far are closed again)."""
    loader = _TsuLoader(config, store, clock, serials)
    try:
        for tsu in config.tsus:
            loader.add(tsu)
    except BaseException:
        for signer in loader.signers:
            signer.close()
        raise
    routes, certificates_pem = loader.routes, loader.certificates_pem
    if "/" not in routes:
        routes["/"] = routes[config.tsus[0].path]
        certificates_pem.setdefault("/", certificates_pem.get(config.tsus[0].path, b""))
    for tsu in config.tsus:
        log.info("TSU %s serving at %s, default policy %s", tsu.name, tsu.path, tsu.default_policy)
    renew_before = {t.name: t.renew_before_us * 1000 for t in config.tsus}
    rule_of = {t.name: AccessRule(False, t.subscribers, t.name) for t in config.tsus if t.access == "subscribers"}
    rules = {path: rule_of[unit.name] for path, unit in routes.items() if unit.name in rule_of}
    return _Tsus(routes, certificates_pem, renew_before, loader.signers, rules, keys=loader.keys)


def _served(tsus: _Tsus) -> dict[str, Route]:
    """What the server routes each path to: the unit, and its access rule (none: public)."""
    return {path: Route(unit, tsus.rules.get(path)) for path, unit in tsus.routes.items()}


class _TsuLoader:
    """Builds the units of one configuration; keeps every key it opened, so that all can be closed."""

    def __init__(self, config: Config, store: RecordStore, clock: GatedClock, serials: RandomSerialSource) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.serials = serials
        self.now = datetime.now(UTC)
        self.states = store.tsu_states()
        self.stopped_keys = _stopped_key_fingerprints(store)
        self.routes: dict[str, TimeStampingUnit | StoppedUnit] = {}
        self.certificates_pem: dict[str, bytes] = {}
        self.signers: list[KeySigner] = []
        self.keys: dict[str, list[tuple[SigningKey, LoadedTsu]]] = {}

    def activated(self, name: str, key: SigningKey) -> None:
        serial = f"{key.certificate_serial:x}"
        log.warning("TSU %s: the next key (certificate serial %s) is now the active key", name, serial)
        if not self.store.has_event("key.activated", name, certificate_serial=serial):
            self.store.record_event("key.activated", {"certificate_serial": serial}, tsu=name)

    def load(self, tsu: TsuConfig, *, successor: bool = False) -> LoadedTsu:
        item = load_tsu(tsu, self.now, successor=successor)
        self.signers.append(item.signer)
        reused = self.stopped_keys.get(key_fingerprint(item.certificate))
        if reused is not None:
            raise PKIError(f"tsu.{tsu.name}: its key belongs to a TSU that is {reused}; it may never sign again")
        return item

    def add(self, tsu: TsuConfig) -> None:
        if tsu.name in self.states:
            self.routes[tsu.path] = StoppedUnit(tsu.name, self.states[tsu.name].state)
            log.error("TSU %s is %s: it issues no more tokens", tsu.name, self.states[tsu.name].state)
            return
        accuracy_us = self.config.clock.accuracy_us
        successor = None
        activate_ns = _ns(tsu.next.activate_at) if tsu.next is not None else None
        if activate_ns is not None and activate_ns <= time.time_ns():
            # The next key has taken over: it alone signs; the retired key is not loaded at all.
            item = self.load(tsu, successor=True)
            key = _signing_key(item, accuracy_us, time.time_ns())
            self.activated(tsu.name, key)
        else:
            item = self.load(tsu)
            key = _signing_key(item, accuracy_us, time.time_ns())
            if activate_ns is not None:
                if key.not_after_ns < activate_ns:
                    raise PKIError(f"tsu.{tsu.name}.next.activate_at: the current key stops signing before it (a gap)")
                next_item = self.load(tsu, successor=True)
                successor = (activate_ns, _signing_key(next_item, accuracy_us, activate_ns))
                self.keys[tsu.name] = [(successor[1], next_item)]
        self.keys[tsu.name] = [(key, item), *self.keys.get(tsu.name, [])]
        unit = TimeStampingUnit(
            name=tsu.name,
            policy=IssuancePolicy(tsu.default_policy, tsu.accepted_policies, tsu.hash_algorithms),
            key=key,
            gen_time=GenTimeFormatter(tsu.gen_time_digits),
            clock=self.clock,
            serials=self.serials,
            records=self.store,
            successor=successor,
            on_activate=self.activated,
        )
        chain = [item.certificate, *item.chain]
        if item.anchor not in chain:
            chain.append(item.anchor)
        pem = b"".join(c.public_bytes(Encoding.PEM) for c in chain)
        paths = [tsu.path, *(["/default"] if tsu.name == "default" else [])]
        for path in paths:
            self.routes.setdefault(path, unit)
            self.certificates_pem.setdefault(path, pem)


def create_app(config: Config) -> TimeStampApp:
    store = RecordStore(config.records.url)
    try:
        store.check_schema(config.source)
    except StampdError:
        store.close()
        raise
    gate, monitor = _clock(config.clock, store)
    clock = GatedClock(gate)
    serials = RandomSerialSource()
    tsus = _build_tsus(config, store, clock, serials)
    service = _Service(store, gate, monitor, tsus, _checkpoints(config))
    app = TimeStampApp(
        _served(tsus),
        tsus.certificates_pem,
        max_request_bytes=config.server.max_request_bytes,
        on_startup=service.start,
        on_shutdown=service.stop,
        readiness=service.readiness,
        metrics=exposition,
        trusted_proxies=config.server.trusted_proxies,
    )
    access = _SubscriberAccess(config)
    if tsus.rules:
        access.open()
        access.install(app, access.load())

    def reload() -> None:
        """SIGHUP: load the TSUs again from the same file and switch to them; in-flight requests finish on the
        units they started with. The clock and records settings need a restart."""
        try:
            fresh = _build_tsus(load_config(config.source), store, clock, serials)
            try:
                if fresh.rules:
                    access.open()
                    access.install(app, access.load())
            except BaseException:
                fresh.close()
                raise
        except StampdError as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            _record_reload_event(store, "config.reload_failed", {"error": str(e)})
            return
        retired, service.tsus = service.tsus, fresh
        service.key_failures = {}  # the fresh keys have just signed their self-test tokens
        service.apply_tsu_states()
        app.replace_routes(_served(fresh), fresh.certificates_pem)
        retired.close()
        _record_reload_event(store, "config.reloaded", {"tsus": [u.name for u in fresh.units]})
        log.warning("configuration reloaded: TSUs %s", ", ".join(u.name for u in fresh.units))

    service.reload = reload
    service.watch_subscribers = lambda: access.watch(app)
    return app


def _record_reload_event(store: RecordStore, kind: str, detail: dict[str, Any]) -> None:
    """Record a reload's outcome, trying again while other processes hold the SQLite write lock (several workers
    reload at once while their group commits go on). The reload stands either way; a lost event is logged."""
    for attempt in range(1, RELOAD_EVENT_ATTEMPTS + 1):
        try:
            store.record_event(kind, detail)
            return
        except RecordingError as e:
            if attempt == RELOAD_EVENT_ATTEMPTS:
                log.error("%s: %s", kind, e)


class _ClosableLedger(UsageLedger, Protocol):
    async def close(self) -> None: ...


class _SubscriberAccess:
    """The subscribers and the usage ledger of a server with TSUs that serve subscribers only (opened when the
    first such TSU is loaded). The server gets immutable snapshots of the subscribers: a request in flight keeps
    the one it started with. They are re-read every :data:`SUBSCRIBERS_POLL_S` and on SIGHUP."""

    def __init__(self, config: Config) -> None:
        self._records_url = config.records.url
        self._ledger_spec = config.access.ledger
        self.store: SubscriberStore | None = None
        self.ledger: _ClosableLedger | None = None
        self.directory: SubscriberDirectory | None = None

    def open(self) -> None:
        """Open the subscribers and the usage ledger, once."""
        if self.store is None:
            self.store = SubscriberStore(self._records_url)
            self.ledger = open_usage_ledger(self._ledger_spec, self._records_url)

    def load(self) -> SubscriberDirectory:
        assert self.store is not None
        try:
            return self.store.load_directory()
        except ValueError as e:
            raise ConfigError(f"the subscribers in the records cannot be served: {e}") from None

    def install(self, app: TimeStampApp, fresh: SubscriberDirectory) -> None:
        """Serve ``fresh`` unless it holds the same subscribers (a snapshot kept keeps its verified passwords)."""
        if self.directory is not None and fresh.subscribers == self.directory.subscribers:
            return
        assert self.ledger is not None
        self.directory = fresh
        app.replace_subscribers(fresh, self.ledger)
        log.info("subscribers: %d loaded; quotas and rates counted in %s", len(fresh), _ledger_shown(self._ledger_spec))

    async def watch(self, app: TimeStampApp) -> None:
        """Re-read the subscribers now and then (in a thread: the event loop keeps serving). The service cancels
        this task at shutdown, after the last request: the ledger is closed then."""
        try:
            while True:
                await asyncio.sleep(SUBSCRIBERS_POLL_S)
                if self.store is None:
                    continue
                try:
                    fresh = await asyncio.to_thread(self.load)
                except Exception:  # a transient database error must not end the watch
                    log.exception("cannot read the subscribers; the previous ones stay in effect")
                    continue
                self.install(app, fresh)
        finally:
            if self.store is not None:
                self.store.close()
            if self.ledger is not None:
                await self.ledger.close()


def _ledger_shown(spec: str) -> str:
    """Where quotas and rates are counted, for the log: a Redis URL's host, never the password it may carry."""
    if spec == "records":
        return "the records database"
    scheme, _, rest = spec.partition("://")
    location = urlsplit(spec).path if scheme == "unix" else rest.split("/", 1)[0].rpartition("@")[2]
    return f"Redis at {location}"


def _checkpoints(config: Config) -> tuple[CheckpointSigner, float] | None:
    """The key that signs the records' chain heads, and how often (none without records.checkpoint_key)."""
    records = config.records
    if records.checkpoint_key is None or records.checkpoint_passphrase_file is None:
        return None
    key = load_encrypted_key(records.checkpoint_key, read_passphrase_file(records.checkpoint_passphrase_file))
    return CheckpointSigner(key), records.checkpoint_interval_us / 1e6


def _readiness(
    gate: ClockGate, tsus: _Tsus, key_failures: Mapping[str, str], records_error: str | None
) -> tuple[bool, str]:
    """/readyz: the clock's verdict, one line per TSU with its state and the days its key may still sign, and
    the records store; ready only if the clock is good, every loaded key signed its last test signature and the
    last write to the records worked (SPEC OPS-03, OPS-06, OPS-09). Also sets the readiness metrics."""
    now_ns = time.time_ns()
    clock_ready, reason = gate.readiness(now_ns, time.monotonic_ns())
    lines = [reason]
    active = 0
    for unit in tsus.units:
        line, is_active = _readiness_line(unit, now_ns, tsus, key_failures.get(unit.name))
        active += is_active
        lines.append(line)
    for stopped in tsus.stopped:
        TSU_ACTIVE.labels(tsu=stopped.name).set(0)
        lines.append(f"tsu {stopped.name}: {stopped.stopped}")
    if active == 0:
        lines.append("no TSU can issue tokens")
    keys_ready = not any(name in key_failures for name in (u.name for u in tsus.units))
    lines.append("records writable" if records_error is None else f"records not writable: {records_error}")
    checks = {"clock": clock_ready, "keys": keys_ready, "records": records_error is None, "tsus": active > 0}
    for check, ok in checks.items():
        READINESS.labels(check=check).set(1 if ok else 0)
    return all(checks.values()), "\n".join(lines)


def _readiness_line(unit: TimeStampingUnit, now_ns: int, tsus: _Tsus, key_failure: str | None) -> tuple[str, bool]:
    """One TSU's state for /readyz, also set in the metrics."""
    key = unit.key_at(now_ns)
    days_left = (key.not_after_ns - now_ns) / 86_400e9
    active = False
    if unit.stopped is not None:
        state = unit.stopped
    elif key_failure is not None:
        state = f"key not usable: {key_failure}"
    elif not key.not_before_ns <= now_ns <= key.not_after_ns:
        state = "outside its signing window (certificate validity or privateKeyUsagePeriod)"
    else:
        active = True
        renew_soon = key.not_after_ns - now_ns < tsus.renew_before_ns[unit.name]
        state = "active" + (", RENEW SOON" if renew_soon else "")
    TSU_DAYS_LEFT.labels(tsu=unit.name).set(days_left)
    loaded = _loaded(tsus, unit.name, key)
    if loaded is not None:
        certificate_end_ns = _ns(loaded.certificate.not_valid_after_utc)
        TSU_CERTIFICATE_DAYS_LEFT.labels(tsu=unit.name).set((certificate_end_ns - now_ns) / 86_400e9)
    TSU_ACTIVE.labels(tsu=unit.name).set(1 if active else 0)
    return f"tsu {unit.name}: {state}; the key may sign for {max(days_left, 0):.1f} more days", active


def _loaded(tsus: _Tsus, name: str, key: SigningKey) -> LoadedTsu | None:
    """What ``key`` of TSU ``name`` was loaded from (its certificate, chain and trust anchor)."""
    return next((item for candidate, item in tsus.keys.get(name, ()) if candidate is key), None)


def _clock(clock: ClockConfig, store: RecordStore) -> tuple[ClockGate, ClockMonitor | None]:
    """The gate every genTime passes, and the monitor that feeds it (none in the unmonitored demo profile)."""

    unrecorded: list[tuple[str, dict[str, Any]]] = []

    def record(kind: str, detail: dict[str, Any]) -> None:
        """Events never unwind the gate: one that cannot be written now waits, in order, for the next one."""
        log.log(logging.INFO if kind == "clock.synchronised" else logging.WARNING, "%s: %s", kind, detail)
        unrecorded.append((kind, {**detail, "pid": os.getpid()}))
        try:
            while unrecorded:
                store.record_event(*unrecorded[0])
                unrecorded.pop(0)
        except StampdError as e:
            log.error("clock: %d events wait to be recorded: %s", len(unrecorded), e)
        observe_clock(gate.status)

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

    def __init__(
        self,
        store: RecordStore,
        gate: ClockGate,
        monitor: ClockMonitor | None,
        tsus: _Tsus,
        checkpoints: tuple[CheckpointSigner, float] | None = None,
    ) -> None:
        self._store = store
        self._checkpoints = checkpoints
        self._gate = gate
        self._monitor = monitor
        self.tsus = tsus
        self.reload: Callable[[], None] = lambda: None
        self.watch_subscribers: Callable[[], Coroutine[Any, Any, None]] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._key_events: set[tuple[str, str, str]] = set()
        self.key_failures: dict[str, str] = {}
        """TSU name -> why its last test signature failed (see :meth:`check_keys`)."""
        self._keys_checked_at = time.monotonic()  # start-up has just signed a self-test token with every key

    def apply_tsu_states(self) -> None:
        """Stop every TSU the records say is compromised or terminated (set by `stampd tsu compromise` or
        `stampd terminate` from any process). The database refuses their records anyway; this refuses early."""
        states = self._store.tsu_states()
        for unit in self.tsus.units:
            state = states.get(unit.name)
            if state is not None and unit.stopped is None:
                unit.stop(state.state)
                log.error("TSU %s is %s: it issues no more tokens", unit.name, state.state)

    def readiness(self) -> tuple[bool, str]:
        """/readyz (see :func:`_readiness`); it reads what the watcher found and does no I/O of its own."""
        return _readiness(self._gate, self.tsus, self.key_failures, self._store.write_error)

    def check_keys(self) -> None:
        """Every :data:`KEY_CHECK_INTERVAL_S`, sign a token with the key each TSU uses now and verify it as a
        relying party would. A key that stopped working (an HSM unreachable, a session lost) makes /readyz fail,
        naming the TSU and the error, until a later test works. On the event loop, like every signature, so that
        a reload never closes a key in use; never on a /readyz request, which must stay fast."""
        if time.monotonic() - self._keys_checked_at < KEY_CHECK_INTERVAL_S:
            return
        self._keys_checked_at = time.monotonic()
        now_ns = time.time_ns()
        failures: dict[str, str] = {}
        for unit in self.tsus.units:
            key = unit.key_at(now_ns)
            loaded = _loaded(self.tsus, unit.name, key)
            if unit.stopped is not None or loaded is None:
                continue
            try:
                _self_test(loaded.config, key.template, loaded, min(max(now_ns, key.not_before_ns), key.not_after_ns))
            except Exception as e:
                failures[unit.name] = str(e).removeprefix(f"tsu.{unit.name}: ")
        for name, error in failures.items():
            if self.key_failures.get(name) != error:
                log.error("TSU %s: the key failed its test signature: %s", name, error)
        for name in self.key_failures.keys() - failures.keys():
            log.warning("TSU %s: the key signs again", name)
        self.key_failures = failures

    async def check_records(self) -> None:
        """Probe the records with a write that changes nothing when no token was committed for
        :data:`RECORDS_PROBE_IDLE_S`, or the last write failed (then every second, so that /readyz recovers as soon
        as the database does). In a thread: a database that hangs must not stop the event loop."""
        store = self._store
        if store.write_error is None and time.monotonic() - store.last_write_at < RECORDS_PROBE_IDLE_S:
            return
        before = store.write_error
        error = await asyncio.to_thread(store.probe_writable)
        if error is not None and error != before:
            log.error("records not writable: %s", error)
        elif error is None and before is not None:
            log.warning("records writable again")

    def record_key_life(self, now_ns: int) -> None:
        """Record, once per key, that it entered its renewal horizon (``key.expiring``) and that its signing
        window closed (``key.expired``) (SPEC OPS-05, OPS-08)."""
        for unit in self.tsus.units:
            key = unit.key_at(now_ns)
            serial = f"{key.certificate_serial:x}"
            horizon = self.tsus.renew_before_ns[unit.name]
            due = []
            if now_ns > key.not_after_ns:
                due.append("key.expired")
            elif key.not_after_ns - now_ns < horizon:
                due.append("key.expiring")
            for kind in due:
                if (unit.name, serial, kind) in self._key_events:
                    continue
                if not self._store.has_event(kind, unit.name, certificate_serial=serial):
                    days = (key.not_after_ns - now_ns) / 86_400e9
                    detail = {"certificate_serial": serial, "signing_ends_ns": key.not_after_ns, "days_left": days}
                    self._store.record_event(kind, detail, tsu=unit.name)
                    log.warning("TSU %s: %s (certificate %s, %.1f days left)", unit.name, kind, serial, days)
                self._key_events.add((unit.name, serial, kind))

    async def _watch_tsu_states(self) -> None:
        """Every second: the TSU states and key life events from the records, the keys' test signatures and the
        records probe when due, and the readiness metrics."""
        while True:
            try:
                self.apply_tsu_states()
                self.record_key_life(time.time_ns())
            except Exception:  # a transient database error must not end the watch
                log.exception("cannot read or record the TSU states")
            try:
                self.check_keys()
                await self.check_records()
                self.readiness()
            except Exception:
                log.exception("cannot check the keys or the records")
            await asyncio.sleep(TSU_STATE_POLL_S)

    async def _write_checkpoints(self, signer: CheckpointSigner, interval_s: float) -> None:
        """Sign this process's chain heads every interval (and once more at stop)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                self._store.write_checkpoint(signer)
            except Exception:  # a transient database error must not end the checkpoints
                log.exception("cannot record a checkpoint of the records' chains")

    async def start(self) -> None:
        self.apply_tsu_states()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signals off the main thread
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload)
        self._tasks.append(asyncio.create_task(self._watch_tsu_states(), name="stampd-tsu-states"))
        if self.watch_subscribers is not None:
            self._tasks.append(asyncio.create_task(self.watch_subscribers(), name="stampd-subscribers"))
        if self._checkpoints is not None:
            task = asyncio.create_task(self._write_checkpoints(*self._checkpoints), name="stampd-checkpoints")
            self._tasks.append(task)
        if self._monitor is None:
            log.warning("clock: NOT MONITORED: no clock.ntp_servers, tokens carry the host's time unchecked (demo)")
        else:
            await self._monitor.check()
            self._tasks.append(asyncio.create_task(self._monitor.run(checked=True), name="stampd-clock-monitor"))
        observe_clock(self._gate.status)
        gc.collect()
        gc.freeze()  # the start-up objects (keys, templates, modules) need no tracing by every later collection
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
        self._store.record_event(
            "service.started",
            {"pid": os.getpid(), "tsus": [u.name for u in self.tsus.units], "clock": self._gate.status.as_detail()},
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            self._store.record_event("service.stopped", {"pid": os.getpid(), "clock": self._gate.status.as_detail()})
            if self._checkpoints is not None:
                self._store.write_checkpoint(self._checkpoints[0])
        finally:
            self._store.close()
            self.tsus.close()


def create_app_from_environment() -> TimeStampApp:
    """Factory for worker processes: each loads the configuration named by $STAMPD_CONFIG itself."""
    return create_app(load_config(config_path(os.environ.get(CONFIG_ENV))))


def check_tsu(tsu: TsuConfig, accuracy_us: int) -> None:
    """Start-up's checks of one TSU, without serving it (`stampd config check`): the key in effect (and the next
    key, until it takes over) opens, matches its certificate, passes the profile and chain checks, and signs a
    self-test token that verifies. The keys are closed again; nothing is recorded."""
    now = datetime.now(UTC)
    activate_ns = _ns(tsu.next.activate_at) if tsu.next is not None else None
    taken_over = activate_ns is not None and activate_ns <= time.time_ns()
    item = load_tsu(tsu, now, successor=taken_over)
    try:
        _signing_key(item, accuracy_us, time.time_ns())
    finally:
        item.signer.close()
    if activate_ns is not None and not taken_over:
        successor = load_tsu(tsu, now, successor=True)
        try:
            _signing_key(successor, accuracy_us, activate_ns)
        finally:
            successor.signer.close()
