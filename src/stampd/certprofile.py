"""The TSU certificate profile (RFC 3161 §2.3, EN 319 422 §6, SPEC CRT-01..06), shared by the server's start-up
check and the relying party.

Each problem names its SPEC requirement and whether it breaks a MUST (``fatal``: a verifier rejects the token) or
a SHOULD (the server refuses to start with it, a verifier only warns).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID


@dataclass(frozen=True, slots=True)
class ProfileProblem:
    requirement: str
    message: str
    fatal: bool

    def __str__(self) -> str:
        return f"{self.requirement}: {self.message}"


def tsu_certificate_problems(cert: x509.Certificate, at: datetime) -> list[str]:
    """Every way ``cert`` departs from the TSU profile when used at ``at`` (empty when it conforms)."""
    return [str(p) for p in profile_problems(cert, at)]


def profile_problems(cert: x509.Certificate, at: datetime) -> list[ProfileProblem]:
    """The problems of :func:`tsu_certificate_problems`, with their requirement and severity."""
    try:
        extensions = cert.extensions
    except x509.DuplicateExtension as e:
        what = "extendedKeyUsage" if e.oid == ExtensionOID.EXTENDED_KEY_USAGE else e.oid.dotted_string
        return [ProfileProblem("CRT-01", f"more than one {what} extension", fatal=True)]
    except ValueError as e:
        return [ProfileProblem("CRT-01", f"extensions cannot be decoded: {e}", fatal=True)]
    return [
        *_eku(extensions),
        *_key_usage(extensions),
        *_basic_constraints(extensions),
        *_subject(cert),
        *_validity(cert, extensions, at),
    ]


def key_matches_certificate(public_key: PublicKeyTypes, cert: x509.Certificate) -> bool:
    """True when ``public_key`` is the certificate's subject public key (SPEC CRT-07)."""
    try:
        return bool(public_key == cert.public_key())
    except (ValueError, TypeError):  # an unsupported or malformed key in the certificate
        return False


def _eku(extensions: x509.Extensions) -> list[ProfileProblem]:
    """Exactly one EKU, critical, holding id-kp-timeStamping alone (RFC 3161 §2.3, SPEC CRT-01)."""
    try:
        ext = extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    except x509.ExtensionNotFound:
        return [ProfileProblem("CRT-01", "no extendedKeyUsage extension (timeStamping required)", fatal=True)]
    problems = []
    if not ext.critical:
        problems.append(ProfileProblem("CRT-01", "extendedKeyUsage is not critical", fatal=True))
    usages = list(ext.value)
    if ExtendedKeyUsageOID.TIME_STAMPING not in usages:
        problems.append(ProfileProblem("CRT-01", "extendedKeyUsage lacks id-kp-timeStamping", fatal=True))
    others = [u.dotted_string for u in usages if u != ExtendedKeyUsageOID.TIME_STAMPING]
    if others:
        problems.append(
            ProfileProblem("CRT-01", f"extendedKeyUsage holds more than timeStamping: {', '.join(others)}", True)
        )
    return problems


def _key_usage(extensions: x509.Extensions) -> list[ProfileProblem]:
    """Critical keyUsage with digitalSignature, optionally nonRepudiation, nothing else (SPEC CRT-03).

    Real TSU certificates sometimes omit keyUsage or leave it non-critical, so only a keyUsage that forbids
    signing altogether (neither digitalSignature nor nonRepudiation, RFC 5280 §4.2.1.3) is fatal.
    """
    try:
        ext = extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        return [ProfileProblem("CRT-03", "no keyUsage extension", fatal=False)]
    ku = ext.value
    problems = []
    if not ext.critical:
        problems.append(ProfileProblem("CRT-03", "keyUsage is not critical", fatal=False))
    if not ku.digital_signature:
        problems.append(ProfileProblem("CRT-03", "keyUsage lacks digitalSignature", fatal=not ku.content_commitment))
    extra = _extra_key_usages(ku)
    if extra:
        problems.append(ProfileProblem("CRT-03", f"keyUsage also allows {', '.join(extra)}", fatal=False))
    return problems


def _extra_key_usages(ku: x509.KeyUsage) -> list[str]:
    """Key usages beyond signing, which a TSU key must not have (SPEC CRT-02, CRT-03)."""
    usages = (
        ("keyEncipherment", ku.key_encipherment),
        ("dataEncipherment", ku.data_encipherment),
        ("keyAgreement", ku.key_agreement),
        ("keyCertSign", ku.key_cert_sign),
        ("cRLSign", ku.crl_sign),
    )
    return [name for name, present in usages if present]


def tsu_refusals(cert: x509.Certificate, at: datetime) -> tuple[list[str], list[str]]:
    """(reasons to refuse, warnings) for a certificate stampd itself would sign with: the fatal profile problems,
    a CA certificate (CRT-04) and key usages beyond signing (CRT-03) are refused; other SHOULDs are warnings.
    The server's start-up and `stampd tsu install-cert` apply exactly this."""
    refused: list[str] = []
    warnings: list[str] = []
    for problem in profile_problems(cert, at):
        extra_usage = problem.requirement == "CRT-03" and problem.message.startswith("keyUsage also allows")
        if problem.fatal or problem.requirement == "CRT-04" or extra_usage:
            refused.append(str(problem) + ("; a TSU key signs time-stamps only (CRT-02)" if extra_usage else ""))
        else:
            warnings.append(str(problem))
    return refused, warnings


def _basic_constraints(extensions: x509.Extensions) -> list[ProfileProblem]:
    """The TSU certificate SHOULD NOT be a CA (SPEC CRT-04)."""
    try:
        bc = extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return []
    return [ProfileProblem("CRT-04", "the certificate is a CA certificate", fatal=False)] if bc.ca else []


def _subject(cert: x509.Certificate) -> list[ProfileProblem]:
    """countryName and organizationName name the TSA (EN 319 422 §6.2, SPEC CRT-05)."""
    missing = [
        label
        for label, oid in (("countryName", NameOID.COUNTRY_NAME), ("organizationName", NameOID.ORGANIZATION_NAME))
        if not cert.subject.get_attributes_for_oid(oid)
    ]
    return [ProfileProblem("CRT-05", f"subject lacks {', '.join(missing)}", fatal=False)] if missing else []


def _validity(cert: x509.Certificate, extensions: x509.Extensions, at: datetime) -> list[ProfileProblem]:
    """Neither the certificate nor its privateKeyUsagePeriod may exclude ``at`` (RFC 3628 §7.2.5, SPEC CRT-06)."""
    problems = []
    if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
        problems.append(
            ProfileProblem(
                "CRT-06",
                f"certificate valid {cert.not_valid_before_utc.isoformat()} to "
                f"{cert.not_valid_after_utc.isoformat()}, not at {at.isoformat()}",
                fatal=True,
            )
        )
    try:
        period = extensions.get_extension_for_class(x509.PrivateKeyUsagePeriod).value
    except x509.ExtensionNotFound:
        return problems
    start = _aware(period.not_before)
    end = _aware(period.not_after)
    if (start is not None and at < start) or (end is not None and at > end):
        problems.append(
            ProfileProblem(
                "CRT-06",
                f"privateKeyUsagePeriod {start.isoformat() if start else '-'} to "
                f"{end.isoformat() if end else '-'} excludes {at.isoformat()}",
                fatal=True,
            )
        )
    return problems


def key_fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's SubjectPublicKeyInfo: names a key whatever TSU or certificate carries it."""
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).hexdigest()


def signing_window(cert: x509.Certificate) -> tuple[datetime, datetime]:
    """When the key may sign: the certificate's validity narrowed by its privateKeyUsagePeriod (SPEC CRT-06)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    try:
        period = cert.extensions.get_extension_for_class(x509.PrivateKeyUsagePeriod).value
    except x509.ExtensionNotFound:
        return start, end
    period_start, period_end = _aware(period.not_before), _aware(period.not_after)
    return max(start, period_start or start), min(end, period_end or end)


def _aware(value: datetime | None) -> datetime | None:
    """cryptography gives privateKeyUsagePeriod as naive UTC datetimes."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)
