"""The verifier against tokens built here with asn1crypto under a test PKI, one defect at a time.

Covers SPEC ALG-01..04 (RSA, RSA-PSS, ECDSA, Ed25519), CMS-04/05/08/09, ESS-01..04, CRT-01/03/06, TST-06,
REQ-08, STS-01, INT-04, INT-11.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import tsakit as k
from cryptography.x509.oid import ExtendedKeyUsageOID

from stampd.errors import VerificationError
from stampd.verify import Check, Outcome, VerificationReport, verify_timestamp


@pytest.fixture(scope="module")
def ec_pki() -> k.Pki:
    return k.make_pki("ec")


def verify(pki: k.Pki, blob: bytes, **kwargs: object) -> VerificationReport:
    args: dict[str, object] = {"data": b"hello", "anchors": [pki.root], "extra_certs": [pki.ca]}
    args.update(kwargs)
    return verify_timestamp(blob, **args)  # type: ignore[arg-type]


def failed(report: VerificationReport) -> list[str]:
    return [c.name for c in report.failures]


@pytest.mark.parametrize(
    ("kind", "detail"),
    [
        ("ec", "ECDSA (secp256r1) with SHA256 verifies"),
        ("rsa", "RSA PKCS#1 v1.5 with SHA256 verifies"),
        ("rsa-pss", "RSASSA-PSS with SHA256, salt 32 verifies"),
        ("ed25519", "Ed25519 verifies"),
    ],
)
def test_each_signature_algorithm_verifies_alg_01_to_04(kind: str, detail: str) -> None:
    pki = k.make_pki(kind)
    report = verify(pki, k.build_response(k.build_token(pki)), nonce=0x1234567890ABCDEF, policy=k.POLICY)
    assert report.ok, report.failures
    assert report.check(Check.SIGNATURE).detail == detail
    assert report.tsu == "CN=TSU,O=Example TSA,C=DE"
    assert report.serial == 0x0123456789
    assert report.gen_time == k.GEN_TIME
    assert report.nonce == 0x1234567890ABCDEF
    assert report.check(Check.TSA_NAME).outcome is Outcome.OK


@pytest.mark.parametrize("kind", ["ec", "rsa", "rsa-pss", "ed25519"])
def test_each_algorithm_detects_a_tampered_signature_cms_09(kind: str) -> None:
    pki = k.make_pki(kind)
    report = verify(pki, k.build_token(pki, k.TokenSpec(tamper_signature=True)))
    assert failed(report) == [Check.SIGNATURE]


def test_ed25519_requires_sha512_digest_algorithm_alg_04() -> None:
    pki = k.make_pki("ed25519")
    report = verify(pki, k.build_token(pki, k.TokenSpec(digest_alg="sha256")))
    assert failed(report) == [Check.SIGNATURE]
    assert "id-sha512" in report.check(Check.SIGNATURE).detail


def test_tampered_tstinfo_fails_message_digest_cms_08(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(tamper_econtent=True)))
    assert Check.MESSAGE_DIGEST in failed(report)
    assert report.check(Check.SIGNATURE).outcome is Outcome.OK  # signedAttrs themselves are intact


def test_wrong_content_type_attribute_cms_08(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(content_type="1.2.840.113549.1.7.1")))
    assert failed(report) == [Check.CONTENT_TYPE]
    assert "1.2.840.113549.1.7.1" in report.check(Check.CONTENT_TYPE).detail


def test_signer_by_subject_key_identifier_cms_05(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(sid="ski")))
    assert report.ok
    assert "subjectKeyIdentifier" in report.check(Check.SIGNER).detail


def test_ess_v1_accepted_with_warning_ess_02(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(ess="v1")))
    assert report.ok
    assert report.check(Check.SIGNING_CERTIFICATE).warnings


@pytest.mark.parametrize(("ess", "needle"), [("none", "ESS-01"), ("wrong-hash", "ESS-03"), ("wrong-serial", "ESS-04")])
def test_ess_defects_fail_signing_certificate(ec_pki: k.Pki, ess: str, needle: str) -> None:
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(ess=ess)))
    assert failed(report) == [Check.SIGNING_CERTIFICATE]
    assert needle in report.check(Check.SIGNING_CERTIFICATE).detail


def test_signer_is_found_by_sid_not_position_int_04(ec_pki: k.Pki) -> None:
    """An impostor with the TSU's subject and key, but another serial, is embedded first."""
    impostor = ec_pki.tsu_variant(serial=4242)
    blob = k.build_token(ec_pki, k.TokenSpec(embed=[impostor, ec_pki.tsu]))
    report = verify(ec_pki, blob)
    assert report.ok
    assert f"serial {ec_pki.tsu.serial_number})" in report.check(Check.SIGNER).detail


def test_ambiguous_signer_fails(ec_pki: k.Pki) -> None:
    """Two different certificates with the signer's issuer and serial: one is forged, refuse to choose."""
    twin = ec_pki.tsu_variant(serial=ec_pki.tsu.serial_number, key_usage_critical=False)
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(embed=[ec_pki.tsu, twin])))
    assert failed(report) == [Check.SIGNER]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"eku_critical": False}, "not critical"),
        ({"eku": [ExtendedKeyUsageOID.TIME_STAMPING, ExtendedKeyUsageOID.CODE_SIGNING]}, "more than timeStamping"),
        ({"eku": None}, "no extendedKeyUsage"),
    ],
)
def test_tsu_eku_defects_fail_crt_01(ec_pki: k.Pki, kwargs: dict[str, object], needle: str) -> None:
    cert = ec_pki.tsu_variant(**kwargs)
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(signer_cert=cert, embed=[cert])))
    assert failed(report) == [Check.TSU_PROFILE]
    assert needle in report.check(Check.TSU_PROFILE).detail
    assert "CRT-01" in report.check(Check.TSU_PROFILE).detail


def test_non_critical_key_usage_is_a_warning_crt_03(ec_pki: k.Pki) -> None:
    cert = ec_pki.tsu_variant(key_usage_critical=False)
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(signer_cert=cert, embed=[cert])))
    assert report.ok
    assert report.check(Check.TSU_PROFILE).warnings == ("CRT-03: keyUsage is not critical",)


def test_private_key_usage_period_excluding_gentime_fails_crt_06(ec_pki: k.Pki) -> None:
    cert = ec_pki.tsu_variant(private_key_usage_period=(k.at(-100), k.at(-1)))
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(signer_cert=cert, embed=[cert])))
    assert failed(report) == [Check.TSU_PROFILE]
    assert "privateKeyUsagePeriod" in report.check(Check.TSU_PROFILE).detail


def test_gentime_after_tsu_expiry_fails_chain_int_11(ec_pki: k.Pki) -> None:
    cert = ec_pki.tsu_variant(not_after=datetime(2025, 1, 1, tzinfo=UTC))
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(signer_cert=cert, embed=[cert])))
    assert set(failed(report)) == {Check.CHAIN, Check.TSU_PROFILE}


def test_missing_intermediate_fails_chain(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_token(ec_pki), extra_certs=[])
    assert failed(report) == [Check.CHAIN]
    assert "no issuer certificate" in report.check(Check.CHAIN).detail


def test_fractional_gentime_is_read_exactly_tim_01(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(gen_time="20250601120000.5Z")))
    assert report.ok
    assert report.gen_time == datetime(2025, 6, 1, 12, 0, 0, 500000, tzinfo=UTC)


def test_missing_nonce_when_one_was_sent_fails_req_08(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_token(ec_pki, k.TokenSpec(nonce=None)), nonce=7)
    assert failed(report) == [Check.NONCE]


def test_rejection_fails_status_and_skips_the_rest_sts_01(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_response(None, status=2, fail_info={"bad_alg"}))
    assert failed(report) == [Check.STATUS]
    assert "rejection" in report.check(Check.STATUS).detail and "[0]" in report.check(Check.STATUS).detail
    assert all(c.outcome is Outcome.SKIPPED for c in report.checks[1:])
    assert not report.ok
    assert report.to_dict()["ok"] is False


def test_granted_without_token_fails_status_sts_01(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_response(None, status=0))
    assert "no token" in report.check(Check.STATUS).detail


def test_report_to_dict_is_json_ready(ec_pki: k.Pki) -> None:
    report = verify(ec_pki, k.build_response(k.build_token(ec_pki)))
    d = report.to_dict()
    assert d["ok"] is True
    assert d["serial"] == str(0x0123456789)
    assert d["gen_time"] == "2025-06-01T12:00:00+00:00"
    assert {"name": "status", "outcome": "ok", "detail": "granted", "warnings": []} in d["checks"]  # type: ignore[operator]


def test_garbage_and_argument_errors_raise_verification_error(ec_pki: k.Pki) -> None:
    with pytest.raises(VerificationError, match="not a time-stamp"):
        verify(ec_pki, b"\x30\x03\x02\x01\x00")
    with pytest.raises(VerificationError, match="either"):
        verify_timestamp(k.build_token(ec_pki), anchors=[ec_pki.root])
    with pytest.raises(VerificationError, match="either"):
        verify_timestamp(k.build_token(ec_pki), data=b"x", digest=b"y", anchors=[ec_pki.root])
