"""Strict decoding of TimeStampResp and tokens: values from real replies, DER violations refused, and random or
mutated bytes raising only ParseError (SPEC REQ-12, CMS-01/03/11, TIM-01/02/05, STS-04, INT-07/09)."""

from __future__ import annotations

import contextlib
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stampd.der.token_reader import (
    is_bare_token,
    names_equal,
    read_octet_string,
    read_pss_params,
    read_response,
    read_signing_certificate,
    read_token,
)
from stampd.errors import ParseError
from stampd.oids import SHA256, Attributes, ContentTypes

VECTORS = Path(__file__).parents[2] / "vectors" / "third_party" / "rfc3161-client"
sys.path.insert(0, str(Path(__file__).parents[1] / "verify"))

import tsakit as k  # noqa: E402

SIGSTAGE = (VECTORS / "sigstage" / "response-sha256.tsr").read_bytes()
IDENTRUST = (VECTORS / "identrust" / "issue-104.tsr").read_bytes()
ALL_VECTORS = sorted(VECTORS.glob("*/*.tsr"))


def test_sigstage_reply_fields() -> None:
    reply = read_response(SIGSTAGE)
    assert reply.status.status == 0 and reply.status.fail_bits == () and reply.status.status_strings == ()
    token = reply.token
    assert token is not None
    assert reply.token_der is not None and SIGSTAGE.endswith(reply.token_der)
    tst = token.tst_info
    assert tst.version == 1
    assert tst.policy == "1.3.6.1.4.1.57264.2"
    assert tst.hash_oid == SHA256.oid and tst.hash_params == b"\x05\x00"  # NULL, as the request sent it
    assert tst.digest.hex() == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert tst.serial == 0x784B4C5E57AAA63B570F15CBA4DF95251668AE9E
    assert tst.gen_time == datetime(2025, 5, 9, 11, 58, 55, tzinfo=UTC) and tst.gen_time_fraction == ""
    assert tst.accuracy_us == 1_000_000
    assert tst.ordering is False
    assert tst.nonce == 0x051708B19A1D2E209C2236FFC3238BF24DCECC40
    assert tst.tsa is not None and tst.tsa[:1] == b"\xa4"  # directoryName
    assert tst.tsa_directory_name is not None and tst.tsa_directory_name[:1] == b"\x30"
    assert tst.extensions == ()
    assert token.signed_data_version == 3
    assert token.digest_algorithms == (SHA256.oid,)
    assert token.econtent_type == ContentTypes.TST_INFO
    assert token.econtent[:1] == b"\x30" and token.econtent in SIGSTAGE
    assert len(token.certificates) == 1 and token.other_certificate_choices == 0
    (si,) = token.signer_infos
    assert si.version == 1 and si.sid.serial is not None and si.sid.subject_key_identifier is None
    assert si.digest_algorithm == SHA256.oid
    assert si.signature_algorithm == "1.2.840.10045.4.3.2" and si.signature_params is None
    assert [a.oid for a in si.signed_attrs] == [
        Attributes.CONTENT_TYPE,
        Attributes.SIGNING_TIME,
        Attributes.MESSAGE_DIGEST,
        Attributes.SIGNING_CERTIFICATE_V2,
    ]
    # CMS-09: the block the signature covers is the [0] IMPLICIT SET re-tagged as SET (0x31), same contents
    assert si.signed_attrs_der[:1] == b"\x31"
    assert b"\xa0" + si.signed_attrs_der[1:] in SIGSTAGE


def test_identrust_ess_v1_and_rsa_params() -> None:
    token = read_response(IDENTRUST).token
    assert token is not None
    (si,) = token.signer_infos
    assert si.signature_algorithm == "1.2.840.113549.1.1.1" and si.signature_params == b"\x05\x00"
    (value,) = si.attribute_values(Attributes.SIGNING_CERTIFICATE)[0]
    (cid,) = read_signing_certificate(value, v2=False)
    assert cid.hash_oid == "1.3.14.3.2.26" and len(cid.cert_hash) == 20 and cid.issuer_names is None
    (md,) = si.attribute_values(Attributes.MESSAGE_DIGEST)[0]
    assert len(read_octet_string(md)) == 32


def test_sigstore_mock_negative_serial_is_read_int_07() -> None:
    token = read_response((VECTORS / "sigstore.mock" / "response-expired.tsr").read_bytes()).token
    assert token is not None and token.tst_info.serial == -0x21524111 and token.certificates == ()


def test_bare_token_and_response_are_told_apart() -> None:
    reply = read_response(SIGSTAGE)
    assert reply.token_der is not None
    assert is_bare_token(reply.token_der) and not is_bare_token(SIGSTAGE)
    assert read_token(reply.token_der) == reply.token


def test_rejection_without_token_sts_04() -> None:
    reply = read_response(k.build_response(None, status=2, fail_info={"time_not_available"}))
    assert reply.token is None and reply.status.status == 2 and reply.status.fail_bits == (14,)


def test_fraction_and_accuracy_tim_01_tim_05() -> None:
    pki = k.make_pki("ec")
    spec = k.TokenSpec(gen_time="20250601120000.0125Z", accuracy={"seconds": 1, "millis": 500, "micros": 7})
    tst = read_token(k.build_token(pki, spec)).tst_info
    assert tst.gen_time_fraction == "0125"
    assert tst.gen_time == datetime(2025, 6, 1, 12, 0, 0, 12500, tzinfo=UTC)
    assert tst.accuracy_us == 1_500_007


@pytest.mark.parametrize("gen_time", ["20250601120000.50Z", "20250601120000.Z", "202506011200Z", "20250601120000+0100"])
def test_non_der_gentime_is_refused_tim_02(gen_time: str) -> None:
    with pytest.raises(ParseError, match="genTime"):
        read_token(k.build_token(k.make_pki("ec"), k.TokenSpec(gen_time=gen_time)))


def test_accuracy_millis_out_of_range_is_refused_tim_05() -> None:
    with pytest.raises(ParseError, match="millis"):
        read_token(k.build_token(k.make_pki("ec"), k.TokenSpec(accuracy={"millis": 1000})))


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (SIGSTAGE + b"\x00", "trailing"),
        (b"\x30\x80" + SIGSTAGE[4:] + b"\x00\x00", "indefinite"),
        (b"\x30\x83\x00" + SIGSTAGE[2:], "minimally"),
        (SIGSTAGE[:-1], "truncated"),
        (b"", "truncated"),
        (b"\x24\x03\x04\x01\x00", "constructed"),
        (b"\x30" * 3, "truncated"),
    ],
)
def test_ber_and_broken_encodings_are_refused_cms_11(blob: bytes, message: str) -> None:
    with pytest.raises(ParseError, match=message):
        read_response(blob)


def test_deep_nesting_is_refused_before_parsing() -> None:
    nested = b"\x30\x00"
    for _ in range(60):
        nested = b"\x30" + (bytes([len(nested)]) if len(nested) < 0x80 else b"\x81" + bytes([len(nested)])) + nested
    with pytest.raises(ParseError, match="deep"):
        read_response(nested)


def test_pss_params_defaults_and_absence() -> None:
    params = read_pss_params(b"\x30\x00")
    assert (params.hash_oid, params.salt_length, params.trailer_field) == ("1.3.14.3.2.26", 20, 1)
    with pytest.raises(ParseError, match="RFC 4056"):
        read_pss_params(None)


def test_names_equal_is_rfc5280_insensitive_and_safe() -> None:
    pki = k.make_pki("ec")
    subject = pki.tsu.subject.public_bytes()
    assert names_equal(subject, subject)
    assert not names_equal(subject, pki.ca.subject.public_bytes())
    assert not names_equal(subject, b"\x01\x02")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_random_bytes_raise_only_parse_error_req_12(blob: bytes) -> None:
    try:
        read_response(blob)
    except ParseError:
        return
    # the only random inputs that decode are TimeStampResp-shaped: say so, never half-parsed
    assert blob[:1] == b"\x30"


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([p.name for p in ALL_VECTORS]),
    st.data(),
)
def test_mutated_real_replies_raise_only_parse_error(name: str, data: st.DataObject) -> None:
    path = next(p for p in ALL_VECTORS if p.name == name)
    blob = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    try:
        reply = read_response(bytes(blob))
    except ParseError:
        return
    assert reply.status.status >= 0 or reply.status.status < 0  # decoded to plain values
    if reply.token is not None:
        assert isinstance(reply.token.econtent, bytes)


@settings(max_examples=200)
@given(st.binary(max_size=300))
def test_attribute_value_readers_raise_only_parse_error(blob: bytes) -> None:
    for reader in (
        lambda b: read_signing_certificate(b, v2=True),
        lambda b: read_signing_certificate(b, v2=False),
        read_octet_string,
        read_pss_params,
        read_token,
    ):
        with contextlib.suppress(ParseError):
            reader(blob)
