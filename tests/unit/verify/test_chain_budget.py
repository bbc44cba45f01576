"""Path building under hostile input: look-alike CA certificates cannot make verification explode (SPEC INT-04)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stampd.verify.chain import MAX_LINK_CHECKS, validate_chain

NOW = datetime(2026, 3, 1, tzinfo=UTC)
X = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "X")])


def cert(subject: x509.Name, key: ec.EllipticCurvePrivateKey, serial: int, ca: bool) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(X)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def test_look_alike_issuers_are_searched_within_a_budget() -> None:
    """30 self-issued CA certificates named X, all with one key, and a leaf issued by X but no anchor: the search
    used to try every ordering (minutes); now it gives up after a bounded number of checks."""
    key = ec.generate_private_key(ec.SECP256R1())
    bombs = [cert(X, key, 100 + i, ca=True) for i in range(30)]
    leaf = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]), key, 1, ca=False)
    unrelated_anchor = cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other")]), key, 2, ca=True)
    start = time.monotonic()
    result = validate_chain(leaf, intermediates=bombs, anchors=[unrelated_anchor], at=NOW)
    assert time.monotonic() - start < 5
    assert not result.ok
    assert any("abandoned" in p for p in result.problems), result.problems
    assert MAX_LINK_CHECKS <= 64
