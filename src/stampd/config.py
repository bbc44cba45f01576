"""stampd.toml: read, validated and resolved once; every error names the file and the field."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, is_dataclass
from datetime import datetime
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any

from stampd.der.encoding import oid as der_oid
from stampd.errors import ConfigError
from stampd.logs import LOG_FORMATS
from stampd.oids import DEFAULT_IMPRINT_HASHES, HASH_BY_NAME

DEFAULT_CONFIG = "stampd.toml"
CONFIG_ENV = "STAMPD_CONFIG"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|µs|ms|s|m|h|d|y)\s*$")
_DURATION_UNITS_US = {
    "us": 1,
    "µs": 1,
    "ms": 1000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
    "d": 86_400_000_000,
    "y": 366 * 86_400_000_000,  # the longest calendar year: "5y" is never shorter than 5 calendar years
}
_PRECISION_DIGITS = {"s": 0, "ms": 3, "us": 6}
_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")
RESERVED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
MAX_ACCURACY_US = 60_000_000
MAX_TIMEOUT_US = 600_000_000
MIN_RETENTION_US = 86_400_000_000
_TSU_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str
    port: int
    max_request_bytes: int
    request_timeout_s: float
    workers: int
    tls: TlsConfig | None = None
    trusted_proxies: tuple[IPv4Network | IPv6Network, ...] = ()
    """Only from these addresses are ``X-Forwarded-For`` and ``X-Client-Certificate`` believed."""
    log_format: str = "json"
    """``json`` (one object per line, for log collectors) or ``text`` (for humans)."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """Native HTTPS; with ``client_ca``, client certificates are requested (not required) and verified."""

    certificate: Path
    key: Path
    key_passphrase_file: Path | None = None
    client_ca: Path | None = None


ACCESS_MODES = ("public", "subscribers")
_SUBSCRIBER_NAME = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")
"""As `stampd subscribers add` accepts them."""


@dataclass(frozen=True, slots=True)
class AccessConfig:
    ledger: str = "records"
    """Where quotas and rates are counted: ``records`` (the records database) or a ``redis://`` URL."""


@dataclass(frozen=True, slots=True)
class RecordsConfig:
    url: str
    checkpoint_key: Path | None = None
    """An encrypted PKCS#8 key (Ed25519 recommended) that signs the chain heads (stampd.records.checkpoint)."""
    checkpoint_passphrase_file: Path | None = None
    checkpoint_interval_us: int = 300_000_000
    retention_us: int = 5 * 366 * 86_400_000_000
    """How long tokens and events are kept before `stampd records purge` may remove them (default 5y)."""


DEFAULT_LEAP_SECONDS_FILE = Path("/usr/share/zoneinfo/leap-seconds.list")
"""The tz database's copy of the IERS leap-second table, as Debian installs it."""


@dataclass(frozen=True, slots=True)
class ClockConfig:
    accuracy_us: int
    ntp_servers: tuple[str, ...] = ()
    check_interval_us: int = 16_000_000
    query_timeout_us: int = 1_000_000
    min_agree: int = 1
    safety_margin_us: int = 100_000
    max_age_us: int = 60_000_000
    leap_second: str = "pause"
    smear_window_us: int = 86_400_000_000
    leap_seconds_file: Path | None = DEFAULT_LEAP_SECONDS_FILE
    kernel_discipline: bool = True
    required: bool = False


@dataclass(frozen=True, slots=True)
class KeyConfig:
    """Where a TSU's private key lives. ``file``: an encrypted PKCS#8 file and its passphrase. ``pkcs11``: an
    object in a PKCS#11 token (an HSM), found by token and key label, opened with a PIN."""

    backend: str
    path: Path | None = None
    passphrase_file: Path | None = None
    passphrase_env: str | None = None
    module: Path | None = None
    token_label: str | None = None
    key_label: str | None = None
    pin_file: Path | None = None
    pin_env: str | None = None
    sessions: int = 4


@dataclass(frozen=True, slots=True)
class NextKeyConfig:
    """The key and certificate a TSU switches to at ``activate_at`` (rollover with no gap and no overlap)."""

    certificate: Path
    chain: tuple[Path, ...]
    key: KeyConfig
    activate_at: datetime


@dataclass(frozen=True, slots=True)
class TsuConfig:
    name: str
    path: str
    certificate: Path
    chain: tuple[Path, ...]
    trust_anchor: Path
    default_policy: str
    accepted_policies: frozenset[str]
    hash_algorithms: frozenset[str]
    gen_time_digits: int
    signature_hash: str | None
    rsa_pss: bool
    key: KeyConfig
    qualified: bool = False
    accuracy_us: int | None = None
    renew_before_us: int = 30 * 86_400_000_000
    next: NextKeyConfig | None = None
    access: str = "public"
    subscribers: frozenset[str] | None = None
    """With ``access = "subscribers"``: the only subscribers served (None: every enabled subscriber)."""


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    server: ServerConfig
    records: RecordsConfig
    clock: ClockConfig
    tsus: tuple[TsuConfig, ...]
    access: AccessConfig = AccessConfig()


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """-c FILE, else $STAMPD_CONFIG, else ./stampd.toml."""
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def pid_file_for(config_file: Path) -> Path:
    """Where `stampd serve` with this configuration notes its process id, for `stampd reload`."""
    return config_file.resolve().with_suffix(".pid")


def parse_duration_us(text: str) -> int:
    """ "16s", "500ms", "2m", "250us" -> microseconds."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected a duration with a unit such as '1s', '500ms' or '2m', not {text!r}")
    return round(float(match.group(1)) * _DURATION_UNITS_US[match.group(2)])


class _Table:
    """A TOML table being read: typed getters whose errors name the field; unknown keys are refused."""

    def __init__(self, source: Path, prefix: str, data: Mapping[str, Any]) -> None:
        self.source = source
        self.prefix = prefix
        self.data = data
        self.read: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.read.add(key)
        value = self.data.get(key, default)
        if value is _REQUIRED:
            raise self.error(key, "is required")
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is int)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(key, f"expected {names}, got {type(value).__name__} {value!r}")
        return value

    def table(self, key: str) -> _Table:
        value = self.get(key, dict, {})
        return _Table(self.source, f"{self.prefix}{key}.", value)

    def path(self, key: str, default: Any = None) -> Path | None:
        value = self.get(key, str, default)
        if value is None:
            return None
        resolved = Path(value)
        return resolved if resolved.is_absolute() else self.source.parent / resolved

    def duration_us(self, key: str, default: str) -> int:
        try:
            value = parse_duration_us(self.get(key, str, default))
        except ValueError as e:
            raise self.error(key, str(e)) from None
        if value <= 0:
            raise self.error(key, "must be positive")
        return value

    def oid(self, key: str, value: object) -> str:
        """A dotted OID that also encodes (X.660: the second arc is below 40 under arcs 0 and 1)."""
        try:
            if not isinstance(value, str) or not _OID.match(value):
                raise ValueError
            der_oid(value)
        except ValueError:
            raise self.error(key, f"{value!r} is not an object identifier") from None
        return value

    def strings(self, key: str, default: list[str]) -> list[str]:
        values = self.get(key, list, default)
        if not all(isinstance(v, str) for v in values):
            raise self.error(key, "expected a list of strings")
        return list(values)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise self.error(unknown[0], "unknown setting")


_REQUIRED = object()


def load_config(path: str | os.PathLike[str]) -> Config:
    source = Path(path)
    try:
        with source.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such configuration file (create one with `stampd init DIR`)") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: not UTF-8 text ({e.reason} at byte {e.start})") from None
    root = _Table(source, "", data)
    config = Config(
        source=source,
        server=_server(root.table("server")),
        records=_records(root.table("records")),
        clock=_clock(root.table("clock")),
        tsus=_tsus(root.table("tsu")),
        access=_access(root.table("access")),
    )
    root.finish()
    for tsu in config.tsus:
        if tsu.accuracy_us is not None and tsu.accuracy_us < config.clock.accuracy_us:
            raise ConfigError(
                f"{source}: tsu.{tsu.name}.accuracy: cannot be better than clock.accuracy (a TSU never declares "
                "better than the clock is kept)"
            )
    return config


def _server(t: _Table) -> ServerConfig:
    listen = t.get("listen", str, "127.0.0.1:3180")
    try:
        host, port = split_listen(listen)
    except ValueError as e:
        raise t.error("listen", str(e)) from None
    max_bytes = t.get("max_request_bytes", int, 65536)
    if not 64 <= max_bytes <= 16 * 1024 * 1024:
        raise t.error("max_request_bytes", "must be between 64 and 16777216")
    workers = t.get("workers", int, 1)
    if not 1 <= workers <= 256:
        raise t.error("workers", "must be between 1 and 256")
    timeout_us = t.duration_us("request_timeout", "10s")
    if timeout_us > MAX_TIMEOUT_US:
        raise t.error("request_timeout", "must be at most 10m")
    tls = _tls(t)
    trusted_proxies = tuple(_network(t, "trusted_proxies", v) for v in t.strings("trusted_proxies", []))
    log_format = t.get("log_format", str, "json")
    if log_format not in LOG_FORMATS:
        raise t.error("log_format", f"expected 'json' or 'text', not {log_format!r}")
    t.finish()
    return ServerConfig(host, port, max_bytes, timeout_us / 1e6, workers, tls, trusted_proxies, log_format=log_format)


def _tls(t: _Table) -> TlsConfig | None:
    """[server] tls_certificate, tls_key (both or neither), tls_key_passphrase_file, tls_client_ca."""
    certificate = t.path("tls_certificate")
    key = t.path("tls_key")
    passphrase_file = t.path("tls_key_passphrase_file")
    client_ca = t.path("tls_client_ca")
    if certificate is None or key is None:
        for field, value in (("tls_certificate", certificate), ("tls_key", key)):
            if value is not None:
                raise t.error(field, "set both tls_certificate and tls_key, or neither")
        for field, value in (("tls_key_passphrase_file", passphrase_file), ("tls_client_ca", client_ca)):
            if value is not None:
                raise t.error(field, "needs tls_certificate and tls_key")
        return None
    for field, value in (
        ("tls_certificate", certificate),
        ("tls_key", key),
        ("tls_key_passphrase_file", passphrase_file),
        ("tls_client_ca", client_ca),
    ):
        if value is not None and not value.is_file():
            raise t.error(field, f"no such file {value}")
    return TlsConfig(certificate, key, passphrase_file, client_ca)


def _network(t: _Table, key: str, text: str) -> IPv4Network | IPv6Network:
    try:
        return ip_network(text)
    except ValueError:
        raise t.error(key, f"expected an address or CIDR range such as 127.0.0.1/32 or ::1/128, not {text!r}") from None


def _access(t: _Table) -> AccessConfig:
    ledger = t.get("ledger", str, "records")
    if ledger != "records" and not ledger.startswith(("redis://", "rediss://", "unix://")):
        # Not repeated whole: a mistyped URL may still carry a password, and this message reaches logs and events.
        shown = ledger.split(":", 1)[0][:20]
        raise t.error("ledger", f"expected 'records' or a redis://, rediss:// or unix:// URL, not {shown!r}...")
    t.finish()
    return AccessConfig(ledger)


def split_listen(listen: str) -> tuple[str, int]:
    """ "HOST:PORT" or "[v6]:PORT" -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, not {listen!r}")
    return host.strip("[]"), int(port)


def _records(t: _Table) -> RecordsConfig:
    url = t.get("url", str, "sqlite:///records.sqlite3")
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        relative = url.removeprefix("sqlite:///")
        url = f"sqlite:///{(t.source.parent / relative).resolve()}"
    elif not url.startswith(("sqlite:", "postgresql")):
        raise t.error("url", f"expected sqlite:///PATH or postgresql://..., not {url!r}")
    checkpoint_key = t.path("checkpoint_key")
    passphrase_file = t.path("checkpoint_passphrase_file")
    interval = t.duration_us("checkpoint_interval", "5m")
    if (checkpoint_key is None) != (passphrase_file is None):
        raise t.error("checkpoint_key", "set both checkpoint_key and checkpoint_passphrase_file, or neither")
    retention = t.duration_us("retention", "5y")
    if retention < MIN_RETENTION_US:
        raise t.error("retention", "must be at least 1d (records younger than a day are never purged)")
    t.finish()
    return RecordsConfig(url, checkpoint_key, passphrase_file, interval, retention)


def _clock(t: _Table) -> ClockConfig:
    """The time sources and the promises made about time (RFC 3628 §7.3; SPEC OPS-01..04)."""
    accuracy = t.duration_us("accuracy", "1s")
    if accuracy > MAX_ACCURACY_US:
        raise t.error("accuracy", "must be at most 60s (ETSI EN 319 422 expects 1s or better)")
    servers = t.strings("ntp_servers", [])
    for server in servers:
        try:
            split_listen(server)
        except ValueError:
            raise t.error("ntp_servers", f'expected "host:port" entries, not {server!r}') from None
    if len(set(servers)) != len(servers):
        raise t.error("ntp_servers", "lists a server twice (one server must not make a quorum on its own)")
    min_agree = t.get("min_agree", int, len(servers) // 2 + 1 if servers else 1)
    if servers and not 1 <= min_agree <= len(servers):
        raise t.error("min_agree", f"must be between 1 and the {len(servers)} configured ntp_servers")
    margin = t.duration_us("safety_margin", "100ms")
    if margin >= accuracy:
        raise t.error("safety_margin", "must be smaller than clock.accuracy")
    leap_second = t.get("leap_second", str, "pause")
    if leap_second not in ("pause", "smear"):
        raise t.error("leap_second", f"expected 'pause' or 'smear', not {leap_second!r}")
    leap_file = t.get("leap_seconds_file", str, str(DEFAULT_LEAP_SECONDS_FILE))
    required = t.get("required", bool, False)
    if required and not servers:
        raise t.error("required", "a production clock (required = true) needs clock.ntp_servers")
    check_interval = t.duration_us("check_interval", "16s")
    max_age = t.duration_us("max_age", "60s")
    if servers and max_age < check_interval:
        raise t.error("max_age", "must be at least clock.check_interval, or every check would go stale")
    config = ClockConfig(
        accuracy_us=accuracy,
        ntp_servers=tuple(servers),
        check_interval_us=check_interval,
        query_timeout_us=t.duration_us("query_timeout", "1s"),
        min_agree=min_agree,
        safety_margin_us=margin,
        max_age_us=max_age,
        leap_second=leap_second,
        smear_window_us=t.duration_us("smear_window", "24h"),
        leap_seconds_file=(t.source.parent / leap_file) if leap_file else None,
        kernel_discipline=t.get("kernel_discipline", bool, True),
        required=required,
    )
    t.finish()
    return config


def _tsus(t: _Table) -> tuple[TsuConfig, ...]:
    if not t.data:
        raise ConfigError(f"{t.source}: tsu: at least one [tsu.NAME] table is required")
    tsus = tuple(_tsu(name, t.table(name)) for name in t.data)
    paths = [tsu.path for tsu in tsus]
    duplicate = next((p for p in paths if paths.count(p) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"{t.source}: tsu: two TSUs are served at the same path {duplicate!r}")
    t.finish()
    return tsus


def _tsu(name: str, t: _Table) -> TsuConfig:
    if not _TSU_NAME.match(name):
        raise ConfigError(f"{t.source}: tsu.{name}: a TSU name is letters, digits, '-' and '_'")
    path = t.get("path", str, "/" if name == "default" else f"/{name}")
    if not path.startswith("/"):
        raise t.error("path", "must start with '/'")
    if path in RESERVED_PATHS or path.endswith("/certs"):
        raise t.error("path", f"{path!r} is reserved for the server's own endpoints")
    default_policy = t.oid("default_policy", t.get("default_policy", str, _REQUIRED))
    accepted = frozenset(t.oid("accepted_policies", p) for p in t.get("accepted_policies", list, []))
    hashes = t.strings("hash_algorithms", list(DEFAULT_IMPRINT_HASHES))
    if not hashes:
        raise t.error("hash_algorithms", "must name at least one hash")
    for h in hashes:
        if h not in HASH_BY_NAME:
            raise t.error("hash_algorithms", f"unknown hash {h!r} (known: {', '.join(HASH_BY_NAME)})")
    precision = t.get("gen_time_precision", str, "ms")
    if precision not in _PRECISION_DIGITS:
        raise t.error("gen_time_precision", f"expected 's', 'ms' or 'us', not {precision!r}")
    signature_hash = t.get("signature_hash", str, None)
    if signature_hash is not None and signature_hash not in ("sha256", "sha384", "sha512"):
        raise t.error("signature_hash", f"expected sha256, sha384 or sha512, not {signature_hash!r}")
    chain = tuple(_path_list(t, "chain"))
    certificate = t.path("certificate", _REQUIRED)
    trust_anchor = t.path("trust_anchor", _REQUIRED)
    rsa_pss = t.get("rsa_pss", bool, False)
    key = _key(t.table("key"))
    qualified = t.get("qualified", bool, False)
    accuracy = t.duration_us("accuracy", "1h") if "accuracy" in t.data else None
    if accuracy is not None and accuracy > MAX_ACCURACY_US:
        raise t.error("accuracy", "must be at most 60s")
    renew_before = t.duration_us("renew_before", "30d")
    next_key = _next_key(t.table("next"))
    access = t.get("access", str, "public")
    if access not in ACCESS_MODES:
        raise t.error("access", f"expected 'public' or 'subscribers', not {access!r}")
    subscribers = None
    if "subscribers" in t.data:
        names = t.strings("subscribers", [])
        if access != "subscribers":
            raise t.error("subscribers", 'lists subscribers, but the TSU is access = "public"')
        bad = next((n for n in names if not _SUBSCRIBER_NAME.match(n)), None)
        if bad is not None:
            raise t.error("subscribers", f"{bad!r} is not a subscriber name (1 to 64 of A-Z a-z 0-9 - _ . @)")
        subscribers = frozenset(names)
    t.finish()
    assert certificate is not None and trust_anchor is not None
    return TsuConfig(
        name=name,
        path=path,
        certificate=certificate,
        chain=chain,
        trust_anchor=trust_anchor,
        default_policy=default_policy,
        accepted_policies=accepted,
        hash_algorithms=frozenset(hashes),
        gen_time_digits=_PRECISION_DIGITS[precision],
        signature_hash=signature_hash,
        rsa_pss=rsa_pss,
        key=key,
        qualified=qualified,
        accuracy_us=accuracy,
        renew_before_us=renew_before,
        next=next_key,
        access=access,
        subscribers=subscribers,
    )


def _path_list(t: _Table, key: str) -> list[Path]:
    values = t.strings(key, [])
    return [Path(v) if Path(v).is_absolute() else t.source.parent / v for v in values]


KEY_BACKENDS = ("file", "pkcs11")


def _key(t: _Table) -> KeyConfig:
    backend = t.get("backend", str, "file")
    if backend == "file":
        passphrase_file = t.path("passphrase_file")
        passphrase_env = t.get("passphrase_env", str, None)
        if (passphrase_file is None) == (passphrase_env is None):
            raise t.error("passphrase_file", "set exactly one of passphrase_file and passphrase_env")
        key = KeyConfig(backend, t.path("path", _REQUIRED), passphrase_file, passphrase_env)
    elif backend == "pkcs11":
        pin_file = t.path("pin_file")
        pin_env = t.get("pin_env", str, None)
        if (pin_file is None) == (pin_env is None):
            raise t.error("pin_file", "set exactly one of pin_file and pin_env")
        sessions = t.get("sessions", int, 4)
        if not 1 <= sessions <= 64:
            raise t.error("sessions", "must be between 1 and 64")
        key = KeyConfig(
            backend,
            module=t.path("module", _REQUIRED),
            token_label=t.get("token_label", str, _REQUIRED),
            key_label=t.get("key_label", str, _REQUIRED),
            pin_file=pin_file,
            pin_env=pin_env,
            sessions=sessions,
        )
    else:
        raise t.error("backend", f"unknown key backend {backend!r} (known: {', '.join(KEY_BACKENDS)})")
    t.finish()
    return key


def _next_key(t: _Table) -> NextKeyConfig | None:
    if not t.data:
        return None
    text = t.get("activate_at", str, _REQUIRED)
    try:
        activate_at = datetime.fromisoformat(text)
    except ValueError:
        raise t.error("activate_at", f"expected an ISO 8601 time such as 2027-01-01T00:00:00Z, not {text!r}") from None
    if activate_at.tzinfo is None:
        raise t.error("activate_at", "must name its time zone (e.g. end in Z)")
    certificate = t.path("certificate", _REQUIRED)
    assert certificate is not None
    next_key = NextKeyConfig(certificate, tuple(_path_list(t, "chain")), _key(t.table("key")), activate_at)
    t.finish()
    return next_key


def format_duration_us(value: int) -> str:
    """Microseconds as the duration text the loader reads, in the largest unit that keeps it exact ("16s")."""
    for unit in ("y", "d", "h", "m", "s", "ms"):
        size = _DURATION_UNITS_US[unit]
        if value and value % size == 0:
            return f"{value // size}{unit}"
    return f"{value}us"


def to_mapping(config: Config) -> dict[str, Any]:
    """The effective configuration as TOML-shaped data: every setting with its default filled in and paths
    resolved. The inverse of :func:`load_config` (loading it again gives an equal Config, which a test checks).

    Passphrases and PINs are only referenced (a file or a variable); a URL may embed a password, which the
    caller masks before showing it (`stampd config show`).
    """
    mapping: dict[str, Any] = {}
    for item in fields(config):
        value = getattr(config, item.name)
        if item.name == "tsus":
            mapping["tsu"] = {tsu.name: _settings(tsu) for tsu in value}
        elif is_dataclass(value):
            mapping[item.name] = _settings(value)
    return mapping


def _settings(table: Any) -> dict[str, Any]:
    """One configuration dataclass as its TOML table: ``X_us`` and ``X_s`` fields become durations named ``X``,
    paths and networks text, sets sorted lists, None (a default of None) left out."""
    settings: dict[str, Any] = {}
    if isinstance(table, ServerConfig):
        settings["listen"] = f"[{table.host}]:{table.port}" if ":" in table.host else f"{table.host}:{table.port}"
    for item in fields(table):
        name, value = item.name, getattr(table, item.name)
        if isinstance(table, ServerConfig) and name in ("host", "port"):
            continue
        if isinstance(table, TsuConfig) and name == "name":
            continue
        if isinstance(table, KeyConfig) and table.backend != "pkcs11" and name == "sessions":
            continue
        if isinstance(table, ClockConfig) and name == "leap_seconds_file" and value is None:
            settings[name] = ""  # "" turns the leap-second table off
        elif isinstance(value, TlsConfig):
            settings.update({f"tls_{key}": text for key, text in _settings(value).items()})
        elif name == "gen_time_digits":
            settings["gen_time_precision"] = {digits: unit for unit, digits in _PRECISION_DIGITS.items()}[value]
        elif name.endswith("_us") and isinstance(value, int):
            settings[name.removesuffix("_us")] = format_duration_us(value)
        elif name.endswith("_s") and isinstance(value, float):
            settings[name.removesuffix("_s")] = format_duration_us(round(value * 1_000_000))
        elif value is not None:
            settings[name] = _setting(value)
    return settings


def _setting(value: Any) -> Any:
    if is_dataclass(value):
        return _settings(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, frozenset):
        return sorted(_setting(v) for v in value)
    if isinstance(value, tuple | list):
        return [_setting(v) for v in value]
    if isinstance(value, Path | IPv4Network | IPv6Network):
        return str(value)
    return value
