"""`stampd tsu`: the key and certificate lifecycle of each Time-Stamping Unit (SPEC CRT-01..07, OPS-05..08).

`list` shows every TSU and how long its key may still sign; `keygen` makes a key in the configured backend;
`csr` has that key sign a PKCS#10 request; `install-cert` checks a certificate as the server's start-up would and
installs it atomically. Every change is recorded as an event in the records (SPEC OPS-08); secrets never appear
in output or events.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from stampd.certprofile import key_matches_certificate, profile_problems, signing_window, tsu_refusals
from stampd.cli.options import config_option
from stampd.config import Config, KeyConfig, TsuConfig, load_config
from stampd.der.csr import certification_request, certification_request_info
from stampd.errors import ConfigError, PKIError, StampdError
from stampd.records.store import RecordStore, TsuState
from stampd.signers.backends import open_signer, secret
from stampd.signers.keyfile import (
    DEFAULT_KEY_TYPE,
    SECRET_DIR_MODE,
    KeyType,
    generate_private_key,
    new_passphrase,
    write_encrypted_key,
    write_passphrase_file,
)
from stampd.verify.chain import validate_chain

command = click.Group("tsu", help="Keys and certificates of the Time-Stamping Units.")

MAX_NAME_LENGTH = 64
"""ub-common-name and ub-organization-name (RFC 5280 Appendix A)."""

RELOAD_HINT = "Reload the server to use it: `stampd reload`, or send the server process SIGHUP."

_DAY = timedelta(days=1)


# --- shared helpers ---


@dataclass(frozen=True, slots=True)
class _Target:
    """The key and certificate files a command works on: the TSU's current ones, or its next ones (--next)."""

    tsu: TsuConfig
    key: KeyConfig
    certificate: Path
    chain: tuple[Path, ...]
    """The chain files read to check a certificate (the next certificate falls back to the current chain)."""
    chain_files: tuple[Path, ...]
    """The chain files this target itself configures: where --chain is written."""
    field: str
    activate_at: datetime | None

    @property
    def is_next(self) -> bool:
        return self.activate_at is not None


def _tsu(config: Config, name: str) -> TsuConfig:
    for tsu in config.tsus:
        if tsu.name == name:
            return tsu
    known = ", ".join(t.name for t in config.tsus)
    raise ConfigError(f"{config.source}: no [tsu.{name}] table (configured TSUs: {known})")


def _target(config: Config, name: str, use_next: bool) -> _Target:
    tsu = _tsu(config, name)
    if not use_next:
        return _Target(tsu, tsu.key, tsu.certificate, tsu.chain, tsu.chain, f"tsu.{name}", None)
    if tsu.next is None:
        raise ConfigError(
            f"{config.source}: tsu.{name}.next: --next needs a [tsu.{name}.next] table "
            "(certificate, activate_at and a [key] table)"
        )
    nxt = tsu.next
    chain = nxt.chain or tsu.chain
    return _Target(tsu, nxt.key, nxt.certificate, chain, nxt.chain, f"tsu.{name}.next", nxt.activate_at)


def _read_certificates(path: Path, field: str) -> list[x509.Certificate]:
    """Every certificate in a PEM (or single DER) file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PKIError(f"{field}: cannot read {path}: {e.strerror}") from None
    try:
        certificates = (
            x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data else [x509.load_der_x509_certificate(data)]
        )
    except ValueError as e:
        raise PKIError(f"{field}: {path} holds no readable certificate: {e}") from None
    if not certificates:
        raise PKIError(f"{field}: {path} holds no certificate")
    return certificates


def _fingerprint(public_key: PublicKeyTypes) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, in hexadecimal."""
    spki = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def _colons(hex_digest: str) -> str:
    return ":".join(hex_digest[i : i + 2] for i in range(0, len(hex_digest), 2))


def _key_location(key: KeyConfig) -> str:
    """The key file, or a PKCS#11 URI naming the token and object (RFC 7512)."""
    if key.backend == "pkcs11":
        return f"pkcs11:token={quote(key.token_label or '', safe='')};object={quote(key.key_label or '', safe='')}"
    return str(key.path)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat()


def _key_usage_period(cert: x509.Certificate) -> dict[str, str | None] | None:
    """privateKeyUsagePeriod (SPEC CRT-06), or None when the certificate has none."""
    try:
        period = cert.extensions.get_extension_for_class(x509.PrivateKeyUsagePeriod).value
    except (x509.ExtensionNotFound, ValueError):
        return None

    def aware(value: datetime | None) -> str | None:
        return _iso(value if value is None or value.tzinfo else value.replace(tzinfo=UTC))

    return {"not_before": aware(period.not_before), "not_after": aware(period.not_after)}


@contextlib.contextmanager
def _records(config: Config) -> Iterator[RecordStore]:
    """The records, opened before anything changes so that no change goes unrecorded (SPEC OPS-08)."""
    store = RecordStore(config.records.url)
    try:
        yield store
    finally:
        store.close()


# --- list ---


def _parse_at(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter(f"expected an ISO 8601 time such as 2027-01-01T00:00:00Z, not {value!r}") from None
    if moment.tzinfo is None:
        raise click.BadParameter("the time must name its time zone (e.g. end in Z)")
    return moment.astimezone(UTC)


def _availability_problems(key: KeyConfig, field: str) -> list[str]:
    """What would stop the key from opening, found without opening it (no passphrase or PIN is read)."""
    problems = []
    if key.backend == "file":
        if key.path is not None and not key.path.exists():
            problems.append(f"{field}.path: key file {key.path} not found")
        if key.passphrase_file is not None and not key.passphrase_file.exists():
            problems.append(f"{field}.passphrase_file: {key.passphrase_file} not found")
    elif key.module is not None and not key.module.exists():
        problems.append(f"{field}.module: PKCS#11 module {key.module} not found")
    if key.pin_file is not None and not key.pin_file.exists():
        problems.append(f"{field}.pin_file: {key.pin_file} not found")
    env = key.passphrase_env or key.pin_env
    if env is not None and not os.environ.get(env):
        problems.append(f"{field}: the variable {env} is not set")
    return problems


def _next_status(tsu: TsuConfig, at: datetime) -> dict[str, Any] | None:
    nxt = tsu.next
    if nxt is None:
        return None
    status: dict[str, Any] = {
        "activate_at": _iso(nxt.activate_at),
        "activated": at >= nxt.activate_at,
        "certificate": str(nxt.certificate),
        "certificate_installed": False,
        "key_backend": nxt.key.backend,
        "key_location": _key_location(nxt.key),
        "subject": None,
        "serial": None,
    }
    try:
        certificate = _read_certificates(nxt.certificate, f"tsu.{tsu.name}.next.certificate")[0]
    except PKIError:
        return status
    status.update(
        certificate_installed=True,
        subject=certificate.subject.rfc4514_string(),
        serial=f"0x{certificate.serial_number:x}",
    )
    return status


def _describe(tsu: TsuConfig, stopped: TsuState | None, at: datetime) -> dict[str, Any]:
    """One TSU as `tsu list` shows it: configuration, certificate, signing window and state (SPEC OPS-05)."""
    field = f"tsu.{tsu.name}"
    problems = _availability_problems(tsu.key, f"{field}.key")
    info: dict[str, Any] = {
        "name": tsu.name,
        "path": tsu.path,
        "key_backend": tsu.key.backend,
        "key_location": _key_location(tsu.key),
        "qualified": tsu.qualified,
        "certificate": str(tsu.certificate),
        "subject": None,
        "serial": None,
        "not_before": None,
        "not_after": None,
        "private_key_usage_period": None,
        "signing_window_end": None,
        "days_left": None,
        "renew_before_days": tsu.renew_before_us / 86_400_000_000,
        "next": _next_status(tsu, at),
        "state": "problem",
        "state_since": None,
        "state_reason": None,
        "problems": problems,
    }
    try:
        certificate = _read_certificates(tsu.certificate, f"{field}.certificate")[0]
    except PKIError as e:
        problems.append(str(e))
        certificate = None
    if certificate is not None:
        start, end = signing_window(certificate)
        info.update(
            subject=certificate.subject.rfc4514_string(),
            serial=f"0x{certificate.serial_number:x}",
            not_before=_iso(certificate.not_valid_before_utc),
            not_after=_iso(certificate.not_valid_after_utc),
            private_key_usage_period=_key_usage_period(certificate),
            signing_window_end=_iso(end),
            days_left=max(0, (end - at) // _DAY),
        )
        problems.extend(str(p) for p in profile_problems(certificate, at) if p.fatal and p.requirement != "CRT-06")
        info["state"] = _state(tsu, info["next"], start, end, at)
    if stopped is not None:
        info.update(
            state=stopped.state,
            state_since=_iso(datetime.fromtimestamp(stopped.since_us / 1e6, UTC)) if stopped.since_us else None,
            state_reason=stopped.reason,
        )
    return info


def _state(tsu: TsuConfig, next_status: dict[str, Any] | None, start: datetime, end: datetime, at: datetime) -> str:
    """``not yet valid``, ``expired``, ``renew soon`` (less than renew_before left and no rollover ready before
    the window ends) or ``active``."""
    if at < start:
        return "not yet valid"
    if at > end:
        return "expired"
    rollover_ready = (
        next_status is not None
        and next_status["certificate_installed"]
        and tsu.next is not None
        and tsu.next.activate_at <= end
    )
    if end - at < timedelta(microseconds=tsu.renew_before_us) and not rollover_ready:
        return "renew soon"
    return "active"


def _tsu_states(config: Config) -> tuple[dict[str, TsuState], str | None]:
    """Compromised and terminated TSUs from the records; a missing database (nothing issued yet) has none."""
    try:
        store = RecordStore(config.records.url, create=False)
    except StampdError as e:
        url = config.records.url
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
            return {}, None
        return {}, f"records: {e}"
    try:
        return store.tsu_states(), None
    except Exception as e:  # an old or damaged database: list must still show the configuration
        return {}, f"records: cannot read the TSU states: {type(e).__name__}"
    finally:
        store.close()


def _print_text(infos: list[dict[str, Any]]) -> None:
    for i, info in enumerate(infos):
        if i:
            click.echo()
        click.echo(f"{info['name']}: {info['state']}")
        rows: list[tuple[str, Any]] = [
            ("path", info["path"]),
            ("key", f"{info['key_backend']} {info['key_location']}"),
            ("qualified", "yes" if info["qualified"] else "no"),
            ("certificate", info["certificate"]),
            ("subject", info["subject"]),
            ("serial", info["serial"]),
            ("not before", info["not_before"]),
            ("not after", info["not_after"]),
        ]
        period = info["private_key_usage_period"]
        if period is not None:
            rows.append(("key usage period", f"{period['not_before'] or '-'} to {period['not_after'] or '-'}"))
        if info["days_left"] is not None:
            rows.append(("days left", f"{info['days_left']} (signing ends {info['signing_window_end']})"))
        nxt = info["next"]
        if nxt is None:
            rows.append(("next key", "none"))
        else:
            installed = f"certificate {nxt['serial']}" if nxt["certificate_installed"] else "no certificate yet"
            rows.append(("next key", f"{nxt['key_backend']} {nxt['key_location']}, {installed}"))
            rows.append(("next activates", nxt["activate_at"]))
        if info["state_since"] or info["state_reason"]:
            rows.append(("state", f"{info['state']} since {info['state_since'] or '-'}: {info['state_reason'] or ''}"))
        rows.extend(("problem", p) for p in info["problems"])
        for label, value in rows:
            if value is not None:
                click.echo(f"  {label + ':':<18}{value}")


@command.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@click.option(
    "--at", callback=_parse_at, metavar="TIME", help="Evaluate the states at this ISO 8601 time instead of now."
)
def list_command(config_file: str, as_json: bool, at: datetime | None) -> None:
    """Show every TSU: key, certificate, signing window and state (active, renew soon, expired, not yet valid,
    compromised, terminated). No key is opened."""
    config = load_config(config_file)
    moment = at or datetime.now(UTC)
    states, warning = _tsu_states(config)
    infos = [_describe(tsu, states.get(tsu.name), moment) for tsu in config.tsus]
    if warning:
        click.echo(f"warning: {warning}; compromised or terminated states are not shown", err=True)
    if as_json:
        click.echo(json.dumps(infos, indent=2))
    else:
        _print_text(infos)


# --- keygen ---


def _key_type_of(public_key: PublicKeyTypes) -> KeyType | None:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return KeyType.ED25519
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return {"secp256r1": KeyType.EC_P256, "secp384r1": KeyType.EC_P384}.get(public_key.curve.name)
    if isinstance(public_key, rsa.RSAPublicKey):
        return {2048: KeyType.RSA_2048, 3072: KeyType.RSA_3072, 4096: KeyType.RSA_4096}.get(public_key.key_size)
    return None


def _default_key_type(tsu: TsuConfig) -> KeyType:
    """The type of the TSU's current certificate key, so that a renewal keeps the configured algorithms."""
    try:
        certificate = _read_certificates(tsu.certificate, f"tsu.{tsu.name}.certificate")[0]
        return _key_type_of(certificate.public_key()) or DEFAULT_KEY_TYPE
    except (PKIError, ValueError, TypeError):
        return DEFAULT_KEY_TYPE


def _fit_problem(key_type: KeyType, tsu: TsuConfig) -> str | None:
    """Why the TSU's signature settings could not sign with a ``key_type`` key (SPEC ALG-01..04), or None."""
    if tsu.rsa_pss and not key_type.is_rsa:
        return f"tsu.{tsu.name}.rsa_pss is set, which needs an RSA key, not {key_type}"
    if key_type is KeyType.ED25519 and tsu.signature_hash not in (None, "sha512"):
        return f"an Ed25519 key needs tsu.{tsu.name}.signature_hash = sha512 (RFC 8419), not {tsu.signature_hash}"
    if key_type is KeyType.EC_P384 and tsu.signature_hash == "sha256":
        return f"tsu.{tsu.name}.signature_hash sha256 is weaker than a P-384 key; set sha384"
    return None


def _file_passphrase(key: KeyConfig, field: str) -> bytes:
    """The configured passphrase; a missing passphrase file is created with a new random passphrase."""
    if key.passphrase_file is not None and not key.passphrase_file.exists():
        try:
            key.passphrase_file.parent.mkdir(mode=SECRET_DIR_MODE, parents=True, exist_ok=True)
        except OSError as e:
            raise PKIError(f"cannot create {key.passphrase_file.parent}: {e.strerror}") from e
        passphrase = new_passphrase()
        write_passphrase_file(key.passphrase_file, passphrase)
        click.echo(f"Created the passphrase file {key.passphrase_file} (keep it private)", err=True)
        return passphrase
    return secret(key.passphrase_file, key.passphrase_env, f"{field}.passphrase_env")


def _generate_file_key(key: KeyConfig, key_type: KeyType, field: str) -> PublicKeyTypes:
    assert key.path is not None
    if key.path.exists():
        raise PKIError(f"{field}.path: {key.path} already exists; refusing to replace a key (move it away first)")
    passphrase = _file_passphrase(key, field)
    private_key = generate_private_key(key_type)
    write_encrypted_key(key.path, private_key, passphrase)
    return private_key.public_key()


def _generate_pkcs11_key(key: KeyConfig, key_type: KeyType, field: str) -> PublicKeyTypes:
    """A key pair made inside the token; the token refuses a label that is already taken (SPEC OPS-07)."""
    from stampd.signers.pkcs11 import generate_key  # noqa: PLC0415  (python-pkcs11 only for HSM keys)

    assert key.module is not None and key.token_label is not None and key.key_label is not None
    return generate_key(
        module=key.module,
        token_label=key.token_label,
        key_label=key.key_label,
        pin=secret(key.pin_file, key.pin_env, f"{field}.pin_env"),
        key_type=key_type,
    )


@command.command("keygen")
@config_option
@click.argument("name")
@click.option(
    "--key-type",
    type=click.Choice([k.value for k in KeyType]),
    help="Key type (default: that of the current certificate, else ec-p256).",
)
@click.option("--next", "use_next", is_flag=True, help="Generate the key of [tsu.NAME.next.key] (rollover).")
def keygen(config_file: str, name: str, key_type: str | None, use_next: bool) -> None:
    """Generate a new key pair for TSU NAME in its configured key backend (a file, or a PKCS#11 token).

    An existing key is never replaced. Prints the SHA-256 fingerprint of the public key.
    """
    config = load_config(config_file)
    target = _target(config, name, use_next)
    kind = KeyType(key_type) if key_type else _default_key_type(target.tsu)
    problem = _fit_problem(kind, target.tsu)
    if problem is not None:
        raise ConfigError(f"{config.source}: {problem}")
    field = f"{target.field}.key"
    with _records(config) as store:
        if target.key.backend == "pkcs11":
            public_key = _generate_pkcs11_key(target.key, kind, field)
        else:
            public_key = _generate_file_key(target.key, kind, field)
        fingerprint = _fingerprint(public_key)
        location = _key_location(target.key)
        store.record_event(
            "key.generated",
            {
                "backend": target.key.backend,
                "location": location,
                "key_type": kind.value,
                "next": target.is_next,
                "public_key_sha256": fingerprint,
            },
            tsu=name,
        )
    click.echo(f"Generated a {kind} key for TSU {name} ({target.key.backend}: {location})")
    click.echo(f"Public key SHA-256: {_colons(fingerprint)}")
    click.echo(f"Next: stampd tsu csr {name}{' --next' if use_next else ''} -o {name}.csr")


# --- csr ---


def _validate_country(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Two-letter ISO 3166 code, as countryName requires (RFC 5280 Appendix A)."""
    if value is not None and not re.fullmatch(r"[A-Za-z]{2}", value):
        raise click.BadParameter(f"expected a two-letter ISO 3166 country code, got {value!r}")
    return None if value is None else value.upper()


def _subject(tsu: TsuConfig, country: str | None, organization: str | None, common_name: str | None) -> x509.Name:
    """C, O and a CN naming the TSU (SPEC CRT-05), defaulting to the current certificate's subject."""
    current: x509.Name | None = None
    with contextlib.suppress(PKIError):
        current = _read_certificates(tsu.certificate, f"tsu.{tsu.name}.certificate")[0].subject

    def from_current(oid: x509.ObjectIdentifier) -> str | None:
        values = current.get_attributes_for_oid(oid) if current is not None else []
        return str(values[0].value) if values else None

    country = country or from_current(NameOID.COUNTRY_NAME)
    organization = organization or from_current(NameOID.ORGANIZATION_NAME)
    if not country or not organization:
        raise ConfigError(
            f"tsu.{tsu.name}: no readable current certificate to take the subject from; "
            "give --country and --organization (the TSA's registered name, SPEC CRT-05)"
        )
    common_name = common_name or from_current(NameOID.COMMON_NAME) or f"{organization} TSU {tsu.name}"
    for label, value in (("--organization", organization), ("--common-name", common_name)):
        if not value.strip() or len(value) > MAX_NAME_LENGTH:
            raise ConfigError(f"{label} must be 1-{MAX_NAME_LENGTH} characters, not {value!r}")
    try:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, country),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
    except ValueError as e:
        raise ConfigError(f"invalid subject: {e}") from None


def make_csr(target: _Target, subject: x509.Name) -> x509.CertificateSigningRequest:
    """A PKCS#10 request signed by the TSU key through its signer, so that HSM keys work (RFC 2986)."""
    tsu = target.tsu
    signer = open_signer(target.key, hash_name=tsu.signature_hash, rsa_pss=tsu.rsa_pss, field=f"{target.field}.key")
    try:
        spki = signer.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        info = certification_request_info(subject=subject.public_bytes(), public_key_info=spki)
        der = certification_request(info, signer.signature_algorithm, signer.sign(info))
    finally:
        signer.close()
    try:
        request = x509.load_der_x509_csr(der)
        valid = request.is_signature_valid
    except ValueError as e:
        raise PKIError(f"{target.field}: the certification request does not decode: {e}") from e
    if not valid:
        raise PKIError(f"{target.field}: the certification request's signature does not verify")
    return request


@command.command("csr")
@config_option
@click.argument("name")
@click.option("--next", "use_next", is_flag=True, help="For the key of [tsu.NAME.next.key] (rollover).")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write the PEM here instead of stdout."
)
@click.option("--organization", help="The TSA's full registered name (O; default: from the current certificate).")
@click.option(
    "--country", callback=_validate_country, help="ISO 3166 country code (C; default: from the current certificate)."
)
@click.option("--common-name", help="CN naming the TSU (default: from the current certificate).")
def csr(
    *,
    config_file: str,
    name: str,
    use_next: bool,
    output: Path | None,
    organization: str | None,
    country: str | None,
    common_name: str | None,
) -> None:
    """Make a PKCS#10 certification request for TSU NAME's key, asking for the TSU profile: critical
    extendedKeyUsage timeStamping only and critical keyUsage digitalSignature (SPEC CRT-01, CRT-03, CRT-05)."""
    config = load_config(config_file)
    target = _target(config, name, use_next)
    subject = _subject(target.tsu, country, organization, common_name)
    with _records(config) as store:
        request = make_csr(target, subject)
        pem = request.public_bytes(serialization.Encoding.PEM)
        if output is not None:
            try:
                output.write_bytes(pem)
            except OSError as e:
                raise PKIError(f"cannot write {output}: {e.strerror}") from e
        store.record_event(
            "key.csr_made",
            {
                "subject": subject.rfc4514_string(),
                "next": target.is_next,
                "key_location": _key_location(target.key),
                "public_key_sha256": _fingerprint(request.public_key()),
                "csr_sha256": hashlib.sha256(request.public_bytes(serialization.Encoding.DER)).hexdigest(),
            },
            tsu=name,
        )
    if output is None:
        click.echo(pem.decode("ascii"), nl=False)
    else:
        click.echo(f"Wrote the certification request for {subject.rfc4514_string()} to {output}", err=True)


# --- install-cert ---


def _check_certificate(
    target: _Target, certificate: x509.Certificate, chain: list[x509.Certificate], at: datetime
) -> list[str]:
    """Refuse what the server's start-up would refuse (SPEC CRT-01..07, OPS-06); returns the warnings."""
    field = target.field
    tsu = target.tsu
    signer = open_signer(target.key, hash_name=tsu.signature_hash, rsa_pss=tsu.rsa_pss, field=f"{field}.key")
    try:
        matches = key_matches_certificate(signer.public_key, certificate)
    finally:
        signer.close()
    if not matches:
        raise PKIError(
            f"{field}: refused: the certificate's public key is not the TSU key ({_key_location(target.key)})"
        )
    refused, warnings = tsu_refusals(certificate, at)
    if refused:
        raise PKIError(f"{field}: refused: the certificate does not fit the TSU profile: " + "; ".join(refused))
    (anchor, *_) = _read_certificates(tsu.trust_anchor, f"tsu.{tsu.name}.trust_anchor")
    path = validate_chain(certificate, intermediates=chain, anchors=[anchor], at=at)
    if not path.ok:
        raise PKIError(
            f"{field}: refused: no valid chain to the trust anchor {tsu.trust_anchor} at {at.isoformat()}: "
            + "; ".join(path.problems)
        )
    return warnings


def _backup_name(path: Path, now: datetime) -> Path:
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    candidate = path.with_name(f"{path.name}.replaced-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.replaced-{stamp}-{n}")
        n += 1
    return candidate


def _replace_file(path: Path, data: bytes, now: datetime) -> Path | None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename), keeping the previous file as
    ``<name>.replaced-<UTC time>``; returns where the previous file went."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    backup: Path | None = None
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if path.exists():
                backup = _backup_name(path, now)
                os.link(path, backup)
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
    except OSError as e:
        raise PKIError(f"cannot write {path}: {e.strerror}") from e
    return backup


def _pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


@command.command("install-cert")
@config_option
@click.argument("name")
@click.argument("certificate_file", metavar="CERT.pem", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--chain",
    "chain_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Intermediate CA certificates (PEM); default: the configured chain files.",
)
@click.option("--next", "use_next", is_flag=True, help="Install as [tsu.NAME.next] (checked at its activate_at).")
def install_cert(config_file: str, name: str, certificate_file: Path, chain_file: Path | None, use_next: bool) -> None:
    """Check a certificate for TSU NAME as the server's start-up would (key match, TSU profile, chain to the
    trust anchor, validity now or at activate_at with --next) and install it at the configured path,
    atomically, keeping the previous file (SPEC CRT-01..07, OPS-05, OPS-06)."""
    config = load_config(config_file)
    target = _target(config, name, use_next)
    now = datetime.now(UTC)
    at = target.activate_at.astimezone(UTC) if target.activate_at is not None else now
    certificates = _read_certificates(certificate_file, str(certificate_file))
    if len(certificates) != 1:
        raise PKIError(
            f"{certificate_file} holds {len(certificates)} certificates; give the CA certificates with --chain"
        )
    certificate = certificates[0]
    if chain_file is not None:
        chain = _read_certificates(chain_file, str(chain_file))
        if not target.chain_files:
            raise ConfigError(f"{config.source}: {target.field}.chain names no file to write the chain to")
    else:
        chain = [c for p in target.chain for c in _read_certificates(p, f"{target.field}.chain")]
    with _records(config) as store:
        warnings = _check_certificate(target, certificate, chain, at)
        for warning in warnings:
            click.echo(f"warning: {warning}", err=True)
        chain_backup = _replace_file(target.chain_files[0], _pem(chain), now) if chain_file is not None else None
        backup = _replace_file(target.certificate, _pem([certificate]), now)
        der = certificate.public_bytes(serialization.Encoding.DER)
        store.record_event(
            "certificate.installed",
            {
                "path": str(target.certificate),
                "previous": None if backup is None else str(backup),
                "chain_path": str(target.chain_files[0]) if chain_file is not None else None,
                "chain_previous": None if chain_backup is None else str(chain_backup),
                "next": target.is_next,
                "activate_at": _iso(target.activate_at),
                "subject": certificate.subject.rfc4514_string(),
                "issuer": certificate.issuer.rfc4514_string(),
                "serial": f"0x{certificate.serial_number:x}",
                "not_before": _iso(certificate.not_valid_before_utc),
                "not_after": _iso(certificate.not_valid_after_utc),
                "private_key_usage_period": _key_usage_period(certificate),
                "sha256": hashlib.sha256(der).hexdigest(),
                "warnings": warnings,
            },
            tsu=name,
        )
    click.echo(f"Installed {certificate.subject.rfc4514_string()} (serial 0x{certificate.serial_number:x})")
    click.echo(f"  at {target.certificate}" + (f" (previous kept as {backup.name})" if backup else ""))
    if chain_file is not None:
        click.echo(
            f"  chain at {target.chain_files[0]}" + (f" (previous kept as {chain_backup.name})" if chain_backup else "")
        )
    if target.activate_at is not None:
        click.echo(f"  it becomes the signing certificate at {_iso(target.activate_at)}")
    click.echo(RELOAD_HINT)
