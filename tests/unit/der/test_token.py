"""The hand-assembled token against strict decoding, golden bytes and the signature it carries.

Covers SPEC TST-01..05, TIM-01/02/05/06, CMS-01..09, CMS-11, ESS-01..07, ALG-04, STS-04/05.
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import ClassVar

import pytest
from asn1crypto import cms, core, parser, tsp
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding

from stampd.der.encoding import octet_string, oid, sequence, sorted_set_elements, tlv
from stampd.der.response import rejection
from stampd.der.token import QUALIFIED_TOKEN_EXTENSIONS, GenTimeFormatter, accuracy
from stampd.der.token_reader import read_response
from stampd.errors import FailureInfo, ParseError

VECTORS = Path(__file__).parents[2] / "vectors" / "stampd"
sys.path.insert(0, str(VECTORS))

from golden import (  # noqa: E402
    GOLDEN_NONCE,
    GOLDEN_POLICY,
    GOLDEN_SERIAL,
    REJECTION_TEXTS,
    SHA256_REQUEST,
    build_golden_responses,
    golden_fields,
    golden_requests,
    golden_template,
)

PKI = VECTORS / "pki"


class RejectionResp(core.Sequence):
    """TimeStampResp with the token optional, as RFC 3161 has it (asn1crypto's model requires the token)."""

    _fields: ClassVar = [("status", tsp.PKIStatusInfo), ("time_stamp_token", cms.ContentInfo, {"optional": True})]


def top_level_tags(der: bytes) -> list[int]:
    contents = core.Sequence.load(der).contents
    tags = []
    while contents:
        tags.append(contents[0])
        contents = contents[parser.peek(contents) :]
    return tags


def strict_der(der: bytes, spec: type = tsp.TimeStampResp) -> object:
    """Decode, re-encode from the parsed values, and demand the same bytes (SPEC 'DER check')."""
    parsed = spec.load(der, strict=True)
    parsed_copy = spec.load(der, strict=True)
    _ = parsed_copy.native  # parse everything
    assert parsed_copy.dump(force=True) == der
    return parsed


@pytest.fixture(scope="module")
def golden() -> dict[str, bytes]:
    return build_golden_responses(PKI)


def test_golden_vectors_are_reproduced_byte_for_byte(golden: dict[str, bytes]) -> None:
    """Deterministic Ed25519 makes whole tokens golden: any change in the layout shows here."""
    for name, der in {**golden, **golden_requests()}.items():
        assert (VECTORS / name).read_bytes() == der, name


def test_granted_response_is_der_throughout_cms_11(golden: dict[str, bytes]) -> None:
    for name in ("response-granted-ed25519-certs.tsr", "response-granted-ed25519-nocerts.tsr"):
        resp = strict_der(golden[name])
        token = resp["time_stamp_token"]
        signed_data = token["content"]
        tst_der = signed_data["encap_content_info"]["content"].contents
        strict_der(tst_der, tsp.TSTInfo)
        attrs = signed_data["signer_infos"][0]["signed_attrs"]
        assert attrs.dump(force=True) == attrs.dump()


def test_tst_info_fields_tst_01_to_05(golden: dict[str, bytes]) -> None:
    resp = tsp.TimeStampResp.load(golden["response-granted-ed25519-certs.tsr"])
    assert resp["status"]["status"].native == "granted"
    assert resp["status"]["fail_info"].native is None  # STS-05
    assert resp["status"].dump() == bytes.fromhex("3003020100")
    tst = resp["time_stamp_token"]["content"]["encap_content_info"]["content"].parsed
    assert tst["version"].native == "v1"
    assert tst["policy"].dotted == GOLDEN_POLICY
    request = tsp.TimeStampReq.load(golden_requests()["request-sha256-nonce-certreq.tsq"])
    assert tst["message_imprint"].dump() == request["message_imprint"].dump()  # TST-03: byte for byte
    assert tst["message_imprint"]["hashed_message"].native == SHA256_REQUEST.imprint.digest
    assert tst["serial_number"].native == GOLDEN_SERIAL
    assert tst["nonce"].native == GOLDEN_NONCE
    assert tst["accuracy"].dump() == bytes.fromhex("3003020101")  # TIM-05, ETS-02
    assert top_level_tags(tst.dump()) == [0x02, 0x06, 0x30, 0x02, 0x18, 0x30, 0x02]  # TIM-06: no ordering BOOLEAN
    assert tst["gen_time"].contents == b"20260301120000.123Z"


def test_signed_data_shape_cms_01_to_08(golden: dict[str, bytes]) -> None:
    der = golden["response-granted-ed25519-certs.tsr"]
    token = tsp.TimeStampResp.load(der)["time_stamp_token"]
    assert token["content_type"].dotted == "1.2.840.113549.1.7.2"  # CMS-01
    sd = token["content"]
    assert sd["version"].native == "v3"  # CMS-02
    assert sd["encap_content_info"]["content_type"].dotted == "1.2.840.113549.1.9.16.1.4"  # CMS-03
    assert sd["encap_content_info"]["content"].contents[:1] == b"\x30"
    assert len(sd["signer_infos"]) == 1  # CMS-04
    si = sd["signer_infos"][0]
    assert si["version"].native == "v1" and si["sid"].name == "issuer_and_serial_number"  # CMS-05
    assert [a["algorithm"].dotted for a in sd["digest_algorithms"]] == ["2.16.840.1.101.3.4.2.3"]  # CMS-06, ALG-04
    assert sd["digest_algorithms"][0]["parameters"].native is None
    assert si["signature_algorithm"].dump() == bytes.fromhex("300506032b6570")  # ALG-04: id-Ed25519, no params
    attrs = {a["type"].dotted: a["values"] for a in si["signed_attrs"]}
    assert set(attrs) == {"1.2.840.113549.1.9.3", "1.2.840.113549.1.9.4", "1.2.840.113549.1.9.16.2.47"}
    assert all(len(v) == 1 for v in attrs.values())  # CMS-08, ESS-06
    e_content = sd["encap_content_info"]["content"].contents
    assert attrs["1.2.840.113549.1.9.4"][0].native == hashlib.sha512(e_content).digest()  # CMS-08, ALG-04
    encoded = [a.dump() for a in si["signed_attrs"]]
    assert encoded == sorted_set_elements(encoded)  # CMS-07


def test_certificates_follow_cert_req_req_09_req_10(golden: dict[str, bytes]) -> None:
    with_certs = tsp.TimeStampResp.load(golden["response-granted-ed25519-certs.tsr"])
    certs = with_certs["time_stamp_token"]["content"]["certificates"]
    tsu_der = x509.load_pem_x509_certificate((PKI / "pki" / "tsu.pem").read_bytes()).public_bytes(Encoding.DER)
    dumped = [c.dump() for c in certs]
    assert tsu_der in dumped and len(dumped) == 2
    assert dumped == sorted_set_elements(dumped)  # DER SET OF order
    without = golden["response-granted-ed25519-nocerts.tsr"]
    assert tsp.TimeStampResp.load(without)["time_stamp_token"]["content"]["certificates"].native is None


def test_ess_cert_id_v2_names_the_signer_ess_03_to_05(golden: dict[str, bytes]) -> None:
    resp = tsp.TimeStampResp.load(golden["response-granted-ed25519-certs.tsr"])
    si = resp["time_stamp_token"]["content"]["signer_infos"][0]
    value = next(a["values"][0] for a in si["signed_attrs"] if a["type"].dotted == "1.2.840.113549.1.9.16.2.47")
    tsu = x509.load_pem_x509_certificate((PKI / "pki" / "tsu.pem").read_bytes())
    cert_ids = value["certs"]
    assert len(cert_ids) == 1  # ESS-07
    cert_id = cert_ids[0]
    assert cert_id["cert_hash"].native == hashlib.sha256(tsu.public_bytes(Encoding.DER)).digest()  # ESS-03
    assert cert_id.contents.startswith(b"\x04\x20")  # ESS-05: the SHA-256 DEFAULT is omitted
    issuer_serial = cert_id["issuer_serial"]
    assert issuer_serial["serial_number"].native == tsu.serial_number  # ESS-04
    issuer = tsu.issuer.public_bytes()
    assert issuer_serial["issuer"].contents == bytes((0xA4, len(issuer))) + issuer  # directoryName [4] EXPLICIT


def test_signature_covers_signed_attrs_as_set_cms_09(golden: dict[str, bytes]) -> None:
    resp = tsp.TimeStampResp.load(golden["response-granted-ed25519-certs.tsr"])
    si = resp["time_stamp_token"]["content"]["signer_infos"][0]
    signed = b"\x31" + si["signed_attrs"].dump()[1:]
    tsu = x509.load_pem_x509_certificate((PKI / "pki" / "tsu.pem").read_bytes())
    key = tsu.public_key()
    assert isinstance(key, ed25519.Ed25519PublicKey)
    key.verify(si["signature"].native, signed)
    with pytest.raises(InvalidSignature):
        key.verify(si["signature"].native, si["signed_attrs"].dump())


@pytest.mark.parametrize(
    ("fail_info", "bits"),
    [
        (FailureInfo.BAD_ALG, "03020780"),
        (FailureInfo.BAD_REQUEST, "03020520"),
        (FailureInfo.BAD_DATA_FORMAT, "03020204"),
        (FailureInfo.TIME_NOT_AVAILABLE, "0303010002"),
        (FailureInfo.UNACCEPTED_POLICY, "0303000001"),
        (FailureInfo.UNACCEPTED_EXTENSION, "030407000080"),
        (FailureInfo.ADD_INFO_NOT_AVAILABLE, "030406000040"),
        (FailureInfo.SYSTEM_FAILURE, "03050600000040"),
    ],
)
def test_rejection_fail_info_bits_sts_04(fail_info: FailureInfo, bits: str) -> None:
    der = rejection(fail_info, "why")
    resp = strict_der(der, RejectionResp)
    assert resp["status"]["status"].native == "rejection"
    assert resp["status"]["status_string"].native == ["why"]  # STS-07
    assert resp["status"]["fail_info"].dump().hex() == bits
    assert resp["time_stamp_token"].native is None  # STS-01
    assert der.endswith(bytes.fromhex(bits))


def test_golden_rejections_are_the_committed_bytes(golden: dict[str, bytes]) -> None:
    assert len([n for n in golden if n.startswith("rejection-")]) == len(REJECTION_TEXTS)


@pytest.mark.parametrize(
    ("ns", "digits", "text"),
    [
        (1772366400_000_000_000, 3, "20260301120000Z"),
        (1772366400_100_000_000, 3, "20260301120000.1Z"),
        (1772366400_010_000_000, 3, "20260301120000.01Z"),
        (1772366400_001_000_000, 3, "20260301120000.001Z"),
        (1772366400_500_999_999, 3, "20260301120000.5Z"),
        (1772366400_999_999_999, 0, "20260301120000Z"),
        (1772366400_000_120_000, 6, "20260301120000.00012Z"),
        (1772409599_999_000_000, 3, "20260301235959.999Z"),
        (1772409600_000_000_000, 3, "20260302000000Z"),
    ],
)
def test_gen_time_never_has_trailing_zeros_tim_01_02_08(ns: int, digits: int, text: str) -> None:
    formatter = GenTimeFormatter(digits)
    assert formatter.text(ns) == text
    assert re.fullmatch(r"\d{14}(\.\d*[1-9])?Z", formatter.text(ns))
    assert formatter.encode(ns) == bytes((0x18, len(text))) + text.encode()


def test_gen_time_truncates_to_the_declared_precision() -> None:
    assert GenTimeFormatter(3).truncate(1772366400_123_456_789) == 1772366400_123_000_000
    assert GenTimeFormatter(0).truncate(1772366400_123_456_789) == 1772366400_000_000_000


@pytest.mark.parametrize(
    ("us", "der"),
    [
        (1_000_000, "3003020101"),
        (500_000, "3004800201f4"),
        (1_500_000, "3007020101800201f4"),
        (1, "3003810101"),
        (2_000_250, "300702010281020" + "0fa"),
    ],
)
def test_accuracy_omits_zero_parts_tim_05(us: int, der: str) -> None:
    assert accuracy(us).hex() == der
    strict_der(accuracy(us), tsp.Accuracy)


def test_golden_tokens_parse_as_cms(golden: dict[str, bytes]) -> None:
    token = tsp.TimeStampResp.load(golden["response-granted-ed25519-certs.tsr"])["time_stamp_token"]
    assert isinstance(token, cms.ContentInfo)


@pytest.mark.parametrize("field", ["serial", "nonce"])
def test_reader_refuses_hostile_integers_instead_of_crashing(field: str) -> None:
    """A 2**15000 serial or nonce would overflow int-to-text conversion in every report; it is a ParseError."""
    fields = replace(golden_fields(SHA256_REQUEST), **{field: 2**15000})
    der = golden_template(PKI).response(fields, with_certificates=True)
    with pytest.raises(ParseError, match="INTEGER longer than"):
        read_response(der)


def test_qualified_extension_is_byte_exact_ets_05() -> None:
    """One non-critical qcStatements extension holding exactly esi4-qtstStatement-1, built from its parts."""
    statement = sequence(sequence(oid("0.4.0.19422.1.1")))
    extension = sequence(oid("1.3.6.1.5.5.7.1.3"), octet_string(statement))
    assert tlv(0xA1, extension) == QUALIFIED_TOKEN_EXTENSIONS
    template = golden_template(PKI)
    template._extensions = QUALIFIED_TOKEN_EXTENSIONS
    der = template.response(golden_fields(SHA256_REQUEST), with_certificates=True)
    resp = strict_der(der)
    tst = resp["time_stamp_token"]["content"]["encap_content_info"]["content"].parsed
    assert tst.dump().endswith(QUALIFIED_TOKEN_EXTENSIONS)
    (ext,) = tst["extensions"]
    assert ext["extn_id"].dotted == "1.3.6.1.5.5.7.1.3" and ext["critical"].native is False  # ETS-03
    strict_der(tst.dump(), tsp.TSTInfo)
    token = read_response(der).token
    assert token is not None and [(e.oid, e.critical) for e in token.tst_info.extensions] == [
        ("1.3.6.1.5.5.7.1.3", False)
    ]
