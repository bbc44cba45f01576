"""Path building and validation from the TSU certificate to a trust anchor at genTime (RFC 5280 §6.1, in part).

Built by hand rather than with ``cryptography.x509.verification``: that verifier applies the CA/B web-PKI profile
and a client/server EKU policy, and rejects real TSA chains (a critical timeStamping EKU, pyca/cryptography#12124;
TSU certificates without basicConstraints). What is checked, for each certificate on the path: validity at the
given time (genTime, never now: SPEC INT-11), the issuer's signature, the issuer being a CA allowed to sign
certificates (basicConstraints cA, keyUsage keyCertSign) and its pathLenConstraint. Not checked: revocation,
name constraints, certificate policies, unknown critical extensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

MAX_PATH_LENGTH = 8
"""Longest path searched; real TSA chains have two or three certificates."""
MAX_LINK_CHECKS = 64
"""Candidate issuer/subject pairs checked (a signature verification each) before the search gives up."""


@dataclass(frozen=True, slots=True)
class ChainResult:
    """The path found (leaf first, anchor last), or none with the reasons every attempt failed."""

    path: tuple[x509.Certificate, ...]
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return bool(self.path)


def validate_chain(
    leaf: x509.Certificate,
    *,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    at: datetime,
) -> ChainResult:
    """Find a path from ``leaf`` to one of ``anchors`` whose every certificate is valid at ``at``."""
    anchor_ders = {_der(a) for a in anchors}
    pool = list({_der(c): c for c in [*anchors, *intermediates]}.values())
    if not _valid_at(leaf, at):
        return ChainResult((), (_validity_problem(leaf, at),))
    search = _Search(pool, anchor_ders, at)
    path = search.path_from([leaf])
    if path is None:
        return ChainResult((), tuple(dict.fromkeys(search.problems)) or ("no path to a trust anchor",))
    return ChainResult(tuple(path), ())


class _Search:
    """Depth-first path search with a budget: a hostile token can embed dozens of look-alike CA certificates, and
    without one the search would try every ordering of them, a signature check each."""

    def __init__(self, pool: list[x509.Certificate], anchor_ders: set[bytes], at: datetime) -> None:
        self.pool = pool
        self.anchor_ders = anchor_ders
        self.at = at
        self.problems: list[str] = []
        self.links: dict[tuple[bytes, bytes], str | None] = {}
        self.budget = MAX_LINK_CHECKS
        self.visits = MAX_LINK_CHECKS * 4

    def path_from(self, path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        cert = path[-1]
        if _der(cert) in self.anchor_ders:
            return path
        self.visits -= 1
        if self.visits < 0:
            self.problems.append("path search abandoned: too many candidate paths")
            return None
        if len(path) > MAX_PATH_LENGTH:
            self.problems.append(f"no trust anchor within {MAX_PATH_LENGTH} certificates")
            return None
        on_path = {_der(c) for c in path}
        candidates = [c for c in self.pool if c.subject == cert.issuer and _der(c) not in on_path]
        if not candidates:
            self.problems.append(f"no issuer certificate for {_name(cert)} (issuer {cert.issuer.rfc4514_string()})")
        for issuer in candidates:
            problem = self.link_problem(issuer, cert, len(path) - 1)
            if problem is not None:
                self.problems.append(problem)
                continue
            found = self.path_from([*path, issuer])
            if found is not None:
                return found
        return None

    def link_problem(self, issuer: x509.Certificate, cert: x509.Certificate, cas_below: int) -> str | None:
        key = (_der(issuer), _der(cert))
        if key not in self.links:
            if self.budget <= 0:
                return f"path search abandoned after {MAX_LINK_CHECKS} candidate issuers"
            self.budget -= 1
            self.links[key] = _issuer_problem(issuer, cert, self.at, key[0] in self.anchor_ders)
        problem = self.links[key]
        if problem is None:
            return _path_length_problem(issuer, cas_below)
        return problem


def _path_length_problem(issuer: x509.Certificate, cas_below: int) -> str | None:
    try:
        bc = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    if bc.path_length is not None and cas_below > bc.path_length:
        return f"{_name(issuer)}: pathLenConstraint {bc.path_length} exceeded"
    return None


def _issuer_problem(issuer: x509.Certificate, cert: x509.Certificate, at: datetime, is_anchor: bool) -> str | None:
    """Why ``issuer`` cannot have issued ``cert`` at ``at``, or None (RFC 5280 §6.1.3, §6.1.4 (k), (n)); the
    depth-dependent pathLenConstraint (§6.1.4 (l)) is checked by the search."""
    if not _valid_at(issuer, at):
        return _validity_problem(issuer, at)
    try:
        bc: x509.BasicConstraints | None = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    except ValueError as e:
        return f"{_name(issuer)}: extensions cannot be decoded: {e}"
    if (bc is None and not is_anchor) or (bc is not None and not bc.ca):
        return f"{_name(issuer)} is not a CA certificate (basicConstraints cA)"
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            return f"{_name(issuer)}: keyUsage lacks keyCertSign"
    except x509.ExtensionNotFound:
        pass
    try:
        cert.verify_directly_issued_by(issuer)
    except InvalidSignature:
        return f"signature of {_name(issuer)} on {_name(cert)} does not verify"
    except (ValueError, TypeError) as e:
        return f"{_name(cert)} cannot be checked against {_name(issuer)}: {e}"
    return None


def _valid_at(cert: x509.Certificate, at: datetime) -> bool:
    return cert.not_valid_before_utc <= at <= cert.not_valid_after_utc


def _validity_problem(cert: x509.Certificate, at: datetime) -> str:
    return (
        f"{_name(cert)} is valid from {cert.not_valid_before_utc.isoformat()} to "
        f"{cert.not_valid_after_utc.isoformat()}, not at {at.isoformat()}"
    )


def _name(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "<empty subject>"


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)
