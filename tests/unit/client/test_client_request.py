"""Building requests and checking replies against them (SPEC REQ-07..10, TST-03, STS-01, INT-01/02)."""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from asn1crypto import tsp

from stampd.client import build_request, check_reply, hash_file, random_nonce
from stampd.der.request import decode_request
from stampd.errors import StampdError, VerificationError

sys.path.insert(0, str(Path(__file__).parents[1] / "verify"))
import tsakit as k

PKI = k.make_pki("ec")
DIGEST = hashlib.sha256(b"hello").digest()
NONCE = 0x1234567890ABCDEF


def test_build_request_encodes_what_it_returns() -> None:
    request, body = build_request(DIGEST, "sha256", NONCE, cert_req=True, policy=k.POLICY)
    assert decode_request(body) == request
    parsed = tsp.TimeStampReq.load(body)
    assert parsed["version"].native == "v1"
    assert parsed["message_imprint"]["hash_algorithm"]["parameters"].native is None  # absent, RFC 5754 §2
    assert parsed["nonce"].native == NONCE and parsed["cert_req"].native is True
    assert parsed["req_policy"].dotted == k.POLICY


def test_build_request_without_optional_fields() -> None:
    request, body = build_request(hashlib.sha512(b"x").digest(), "sha512", None, cert_req=False)
    parsed = tsp.TimeStampReq.load(body)
    assert request.nonce is None and parsed["nonce"].native is None and parsed["cert_req"].native is False


@pytest.mark.parametrize(
    ("digest", "hash_name", "nonce", "needle"),
    [(DIGEST[:31], "sha256", 1, "32 bytes"), (DIGEST, "md5", 1, "unknown hash"), (DIGEST, "sha256", -5, "positive")],
)
def test_build_request_refuses_bad_input_req_02(digest: bytes, hash_name: str, nonce: int, needle: str) -> None:
    with pytest.raises(StampdError, match=needle):
        build_request(digest, hash_name, nonce)


def test_random_nonce_is_64_to_128_bits_and_varies_req_07() -> None:
    nonces = {random_nonce() for _ in range(200)}
    assert len(nonces) == 200
    assert all(2**63 <= n < 2**128 for n in nonces)


def test_hash_file_streams(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello" * 300_000)
    assert hash_file(path, "sha384") == hashlib.sha384(b"hello" * 300_000).digest()


def reply(**spec: object) -> bytes:
    return k.build_response(k.build_token(PKI, k.TokenSpec(**spec)))  # type: ignore[arg-type]


def test_check_reply_accepts_a_matching_reply() -> None:
    request, _ = build_request(DIGEST, "sha256", NONCE, policy=k.POLICY)
    decoded = check_reply(request, reply())
    assert decoded.token is not None and decoded.token.tst_info.nonce == NONCE


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"data": b"other"}, "messageImprint"),
        ({"nonce": 99}, "nonce"),
        ({"nonce": None}, "nonce"),
        ({"policy": "1.2.3.4"}, "policy"),
        ({"embed": []}, "certReq"),
    ],
)
def test_check_reply_refuses_a_reply_that_does_not_echo_the_request(spec: dict[str, object], needle: str) -> None:
    request, _ = build_request(DIGEST, "sha256", NONCE, policy=k.POLICY)
    with pytest.raises(VerificationError, match=needle):
        check_reply(request, reply(**spec))


def test_check_reply_without_cert_req_accepts_no_certificates() -> None:
    request, _ = build_request(DIGEST, "sha256", NONCE, cert_req=False)
    assert check_reply(request, reply(embed=[])).token is not None


def test_check_reply_nonce_absent_on_both_sides() -> None:
    request, _ = build_request(DIGEST, "sha256", None)
    assert check_reply(request, reply(nonce=None)).token is not None
    with pytest.raises(VerificationError, match="nonce"):
        check_reply(replace(request, nonce=None), reply())


def test_check_reply_reports_rejection_and_garbage_sts_01() -> None:
    request, _ = build_request(DIGEST, "sha256", NONCE)
    with pytest.raises(VerificationError, match=r"status 2, failInfo bits \[15\]"):
        check_reply(request, k.build_response(None, status=2, fail_info={"unaccepted_policy"}))
    with pytest.raises(VerificationError, match="not a TimeStampResp"):
        check_reply(request, b"<html>")
