"""The verifier against real tokens from other TSAs (tests/vectors/third_party/rfc3161-client, Apache-2.0).

Every expected verdict of the vectors' README is a test here. SPEC INT-04 (signer by sid, not position),
INT-11 (chain at genTime), CMS-08/09, ESS-01..04, ALG-01/03.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from asn1crypto import core, tsp
from cryptography import x509

from stampd.verify import Check, Outcome, validate_chain, verify_timestamp

VECTORS = Path(__file__).parents[2] / "vectors" / "third_party" / "rfc3161-client"


def read(rel: str) -> bytes:
    return (VECTORS / rel).read_bytes()


def certs(rel: str) -> list[x509.Certificate]:
    blob = read(rel)
    if b"-----BEGIN" in blob:
        return x509.load_pem_x509_certificates(blob)
    return [x509.load_der_x509_certificate(blob)]


SIGSTAGE = certs("sigstage/ts_chain.pem")  # [TSU, self-signed root]
TEST_TSA = certs("test_tsa/ts_chain.pem")  # [TSU, intermediate, root]
MOCK = certs("sigstore.mock/ts_chain.pem")  # [TSU, root]


@pytest.mark.parametrize(("name", "hash_name"), [("sha256", "SHA256"), ("sha384", "SHA384"), ("sha512", "SHA512")])
def test_sigstage_tokens_verify_for_hello(name: str, hash_name: str) -> None:
    """Sigstage ECDSA P-384 tokens verify against their root for the data 'hello' (CMS-09, ESS-03, ALG-03)."""
    report = verify_timestamp(read(f"sigstage/response-{name}.tsr"), data=b"hello", anchors=SIGSTAGE[1:])
    assert report.ok, report.failures
    assert report.tsu == "CN=sigstore-tsa,O=sigstore.dev"
    assert report.policy == "1.3.6.1.4.1.57264.2"
    assert report.gen_time is not None and report.gen_time.date().isoformat() == "2025-05-09"
    assert report.check(Check.IMPRINT).detail.startswith(hash_name)
    assert report.check(Check.SIGNATURE).detail == "ECDSA (secp384r1) with SHA256 verifies"


def test_sigstage_token_for_other_data_fails_only_on_imprint() -> None:
    report = verify_timestamp(read("sigstage/response-sha256.tsr"), data=b"hellO", anchors=SIGSTAGE[1:])
    assert not report.ok
    assert [c.name for c in report.failures] == [Check.IMPRINT]


def test_sigstage_digest_instead_of_data() -> None:
    digest = bytes.fromhex("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
    report = verify_timestamp(read("sigstage/response-sha256.tsr"), digest=digest, anchors=SIGSTAGE[1:])
    assert report.ok


def test_invalid_signature_fails_on_the_signature_step_cms_09() -> None:
    report = verify_timestamp(read("sigstage/response-invalid-signature.tsr"), data=b"hello", anchors=SIGSTAGE[1:])
    assert not report.ok
    assert [c.name for c in report.failures] == [Check.SIGNATURE]
    assert "does not verify" in report.check(Check.SIGNATURE).detail
    assert report.check(Check.MESSAGE_DIGEST).outcome is Outcome.OK


def test_no_embedded_cert_fails_without_the_tsu_certificate_int_03() -> None:
    report = verify_timestamp(read("sigstage/response-no-embedded-cert.tsr"), data=b"hello", anchors=SIGSTAGE[1:])
    assert not report.ok
    assert report.check(Check.SIGNER).outcome is Outcome.FAILED
    assert "embeds none" in report.check(Check.SIGNER).detail
    assert report.check(Check.SIGNATURE).outcome is Outcome.SKIPPED
    assert report.tsu is None


def test_no_embedded_cert_passes_with_the_tsu_certificate_out_of_band() -> None:
    report = verify_timestamp(
        read("sigstage/response-no-embedded-cert.tsr"), data=b"hello", anchors=SIGSTAGE[1:], extra_certs=SIGSTAGE[:1]
    )
    assert report.ok, report.failures
    assert report.tsu == "CN=sigstore-tsa,O=sigstore.dev"


def test_injected_certs_verify_and_name_the_real_tsu_int_04() -> None:
    """A spoofed 'Test TSA Timestamping' certificate sits first; the signer is found by issuerAndSerialNumber."""
    blob = read("test_tsa/response-injected-certs.tsr")
    embedded = tsp.TimeStampResp.load(blob)["time_stamp_token"]["content"]["certificates"]
    subjects = [c.chosen.subject.native.get("common_name") for c in embedded]
    assert subjects[0] == "Spoofed TSA"  # the fixture really puts impostors before the signer
    report = verify_timestamp(blob, data=b"hello", anchors=TEST_TSA[2:], extra_certs=TEST_TSA[1:2])
    assert report.ok, report.failures
    assert report.tsu == "CN=Test TSA Timestamping,O=local"
    assert "Spoofed" not in (report.tsu or "")
    assert str(TEST_TSA[0].serial_number) in report.check(Check.SIGNER).detail


def test_test_tsa_response_with_three_level_chain() -> None:
    report = verify_timestamp(
        read("test_tsa/response.tsr"), data=b"hello", anchors=TEST_TSA[2:], extra_certs=TEST_TSA[1:2]
    )
    assert report.ok
    assert report.check(Check.CHAIN).detail.count("<-") == 2


def test_same_named_intermediate_with_another_key_does_not_chain() -> None:
    """other_response.tsr was issued under another 'Test TSA Intermediate': names alone must not chain it."""
    report = verify_timestamp(
        read("test_tsa/other_response.tsr"), data=b"hello", anchors=TEST_TSA[2:], extra_certs=TEST_TSA[1:2]
    )
    assert [c.name for c in report.failures] == [Check.CHAIN]
    assert "does not verify" in report.check(Check.CHAIN).detail


def test_identrust_verifies_at_gentime_though_its_tsu_has_expired() -> None:
    """RSA PKCS#1 v1.5, ESSCertID v1 (SHA-1), chain embedded; TSU expired Jan 2026, genTime March 2025 (INT-11)."""
    report = verify_timestamp(read("identrust/issue-104.tsr"), data=b"hello", anchors=certs("identrust/root.pem"))
    assert report.ok, report.failures
    assert report.tsu == "CN=TrustID Timestamp Authority,O=IdenTrust,C=US"
    assert report.gen_time == datetime(2025, 3, 11, 8, 52, 8, tzinfo=UTC)
    assert report.check(Check.SIGNATURE).detail == "RSA PKCS#1 v1.5 with SHA256 verifies"
    assert any("SHA-1" in w for w in report.check(Check.SIGNING_CERTIFICATE).warnings)
    # ts_chain.pem is, despite its name, the same root in DER
    assert certs("identrust/ts_chain.pem") == certs("identrust/root.pem")


def test_identrust_chain_fails_when_checked_now() -> None:
    report = verify_timestamp(read("identrust/issue-104.tsr"), data=b"hello", anchors=certs("identrust/root.pem"))
    leaf = next(c for c in _embedded("identrust/issue-104.tsr") if "Timestamp Authority" in c.subject.rfc4514_string())
    assert report.tsu == leaf.subject.rfc4514_string()
    later = validate_chain(
        leaf,
        intermediates=_embedded("identrust/issue-104.tsr"),
        anchors=certs("identrust/root.pem"),
        at=datetime(2026, 6, 1, tzinfo=UTC),
    )
    assert not later.ok
    assert "not at 2026-06-01" in later.problems[0]


def test_sigstore_mock_expired_verifies_at_gentime_int_11() -> None:
    report = verify_timestamp(
        read("sigstore.mock/response-expired.tsr"),
        data=read("sigstore.mock/payload"),
        anchors=MOCK[1:],
        extra_certs=MOCK[:1],
        nonce=1234567890,
    )
    assert report.ok, report.failures
    assert report.tsu == "O=sigstore.mock,CN=tsa signing"
    assert report.gen_time == datetime(2023, 2, 1, tzinfo=UTC)
    assert report.check(Check.NONCE).outcome is Outcome.OK
    assert any("TST-05" in w for w in report.check(Check.STRUCTURE).warnings)  # its serial is negative


def test_sigstore_mock_with_gentime_moved_outside_2023_fails_the_chain() -> None:
    """Re-encode the TSTInfo with genTime 2024-06-01 (we cannot re-sign): the chain step fails on validity,
    and the signature steps fail because the content changed."""
    moved = _with_gen_time(read("sigstore.mock/response-expired.tsr"), "20240601000000Z")
    report = verify_timestamp(moved, data=read("sigstore.mock/payload"), anchors=MOCK[1:], extra_certs=MOCK[:1])
    assert not report.ok
    assert report.gen_time == datetime(2024, 6, 1, tzinfo=UTC)
    chain = report.check(Check.CHAIN)
    assert chain.outcome is Outcome.FAILED
    assert "not at 2024-06-01" in chain.detail
    assert report.check(Check.MESSAGE_DIGEST).outcome is Outcome.FAILED


@pytest.mark.parametrize(
    ("when", "ok"),
    [
        (datetime(2023, 2, 1, tzinfo=UTC), True),
        (datetime(2022, 12, 31, tzinfo=UTC), False),
        (datetime(2024, 1, 2, tzinfo=UTC), False),
    ],
)
def test_sigstore_mock_chain_step_directly(when: datetime, ok: bool) -> None:
    result = validate_chain(MOCK[0], intermediates=[], anchors=MOCK[1:], at=when)
    assert result.ok is ok
    if ok:
        assert result.path == (MOCK[0], MOCK[1])
    else:
        assert "sigstore.mock" in result.problems[0]


def test_policy_and_nonce_mismatch_are_reported() -> None:
    report = verify_timestamp(
        read("sigstage/response-sha256.tsr"), data=b"hello", anchors=SIGSTAGE[1:], policy="1.2.3", nonce=5
    )
    assert {c.name for c in report.failures} == {Check.POLICY, Check.NONCE}
    assert "required 1.2.3" in report.check(Check.POLICY).detail


def test_wrong_anchor_fails_the_chain_only() -> None:
    report = verify_timestamp(read("sigstage/response-sha256.tsr"), data=b"hello", anchors=TEST_TSA[2:])
    assert [c.name for c in report.failures] == [Check.CHAIN]


def _embedded(rel: str) -> list[x509.Certificate]:
    sd = tsp.TimeStampResp.load(read(rel))["time_stamp_token"]["content"]
    return [x509.load_der_x509_certificate(c.chosen.dump()) for c in sd["certificates"]]


def _with_gen_time(response: bytes, gen_time: str) -> bytes:
    resp = tsp.TimeStampResp.load(response)
    token = resp["time_stamp_token"]
    sd = token["content"]
    tst = sd["encap_content_info"]["content"].parsed
    tst["gen_time"] = core.GeneralizedTime(contents=gen_time.encode())
    new_tst = tsp.TSTInfo.load(tst.dump(force=True))
    sd["encap_content_info"]["content"] = core.ParsableOctetString(new_tst.dump())
    parts = resp["status"].dump() + token.dump(force=True)
    return b"\x30" + bytes([0x82, len(parts) >> 8, len(parts) & 0xFF]) + parts
