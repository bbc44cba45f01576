"""The TSU certificate profile shared by start-up and the verifier (SPEC CRT-01..07)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stampd.certprofile import key_matches_certificate, profile_problems, signing_window, tsu_certificate_problems

sys.path.insert(0, str(Path(__file__).parent / "verify"))
import tsakit as k

PKI = k.make_pki("ec")
AT = k.GEN_TIME


def test_conforming_tsu_certificate_has_no_problems() -> None:
    assert tsu_certificate_problems(PKI.tsu, AT) == []


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"eku": None}, "CRT-01: no extendedKeyUsage extension (timeStamping required)"),
        ({"eku_critical": False}, "CRT-01: extendedKeyUsage is not critical"),
        ({"eku": [ExtendedKeyUsageOID.CODE_SIGNING]}, "CRT-01: extendedKeyUsage lacks id-kp-timeStamping"),
        ({"key_usage_critical": None}, "CRT-03: no keyUsage extension"),
        ({"key_usage_critical": False}, "CRT-03: keyUsage is not critical"),
    ],
)
def test_each_profile_defect_is_named(kwargs: dict[str, object], expected: str) -> None:
    problems = tsu_certificate_problems(PKI.tsu_variant(**kwargs), AT)
    assert expected in problems


def test_extra_eku_is_fatal_crt_01() -> None:
    cert = PKI.tsu_variant(eku=[ExtendedKeyUsageOID.TIME_STAMPING, ExtendedKeyUsageOID.CLIENT_AUTH])
    (problem,) = profile_problems(cert, AT)
    assert problem.requirement == "CRT-01" and problem.fatal
    assert "1.3.6.1.5.5.7.3.2" in problem.message


def test_ca_tsu_crt_03_crt_04() -> None:
    """A CA certificate (kit: keyUsage keyCertSign+cRLSign only): being a CA and the extra bits are SHOULDs, but a
    keyUsage without digitalSignature or nonRepudiation forbids signing tokens at all (RFC 5280 §4.2.1.3)."""
    cert = PKI.tsu_variant(ca=True)
    problems = {(p.requirement, p.message, p.fatal) for p in profile_problems(cert, AT)}
    assert problems == {
        ("CRT-03", "keyUsage lacks digitalSignature", True),
        ("CRT-03", "keyUsage also allows keyCertSign, cRLSign", False),
        ("CRT-04", "the certificate is a CA certificate", False),
    }


def test_subject_without_country_and_organization_crt_05() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "TSU")])
    cert = k.make_cert(
        subject,
        key.public_key(),
        PKI.ca.subject,
        PKI.ca_key,
        serial=9,
        ca=False,
        eku=[ExtendedKeyUsageOID.TIME_STAMPING],
    )
    assert tsu_certificate_problems(cert, AT) == ["CRT-05: subject lacks countryName, organizationName"]


@pytest.mark.parametrize(
    ("when", "needle"),
    [(datetime(2023, 12, 31, tzinfo=UTC), "not at 2023-12-31"), (datetime(2030, 1, 2, tzinfo=UTC), "not at 2030")],
)
def test_validity_must_cover_the_time_crt_06(when: datetime, needle: str) -> None:
    (problem,) = profile_problems(PKI.tsu, when)
    assert problem.requirement == "CRT-06" and problem.fatal and needle in problem.message


def test_private_key_usage_period_crt_06() -> None:
    cert = PKI.tsu_variant(private_key_usage_period=(k.at(1), None))
    (problem,) = profile_problems(cert, AT)
    assert problem.requirement == "CRT-06" and "privateKeyUsagePeriod" in problem.message
    assert tsu_certificate_problems(cert, k.at(2)) == []
    bounded = PKI.tsu_variant(private_key_usage_period=(None, k.at(-1)))
    assert any("excludes" in p for p in tsu_certificate_problems(bounded, AT))


def test_key_matches_certificate_crt_07() -> None:
    assert key_matches_certificate(PKI.tsu_key.public_key(), PKI.tsu)
    assert not key_matches_certificate(PKI.ca_key.public_key(), PKI.tsu)


def test_signing_window_is_validity_narrowed_by_key_usage_period_crt_06() -> None:
    """The server refuses to sign outside this window (stampd.issuance); without a period it is the validity."""
    assert signing_window(PKI.tsu) == (PKI.tsu.not_valid_before_utc, PKI.tsu.not_valid_after_utc)
    narrowed = PKI.tsu_variant(private_key_usage_period=(k.at(1), k.at(2)))
    assert signing_window(narrowed) == (k.at(1).replace(microsecond=0), k.at(2).replace(microsecond=0))
    open_ended = PKI.tsu_variant(private_key_usage_period=(None, k.at(2)))
    assert signing_window(open_ended) == (PKI.tsu.not_valid_before_utc, k.at(2).replace(microsecond=0))
