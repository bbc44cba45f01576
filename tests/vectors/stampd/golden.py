"""The fixed inputs of stampd's golden vectors, shared by generate.py and the tests that compare against them."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampd.der.request import encode_message_imprint, encode_request
from stampd.der.response import rejection
from stampd.der.token import GenTimeFormatter, TokenFields, TokenTemplate
from stampd.errors import FailureInfo
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256, SHA512
from stampd.signers.keyfile import FileSigner, load_encrypted_key, read_passphrase_file

GOLDEN_NOW = datetime(2026, 3, 1, 12, 0, 0, 123000, tzinfo=UTC)
GOLDEN_NS = 1772366400_123_000_000
GOLDEN_SERIAL = 0x0123456789ABCDEF0123456789ABCDEF
GOLDEN_POLICY = "2.25.329800735698586629295641978511506172918"
GOLDEN_NONCE = 0x00FEDCBA9876543210

assert int(GOLDEN_NOW.timestamp() * 1000) * 1_000_000 == GOLDEN_NS

SHA256_REQUEST = TimeStampRequest(
    version=1,
    imprint=MessageImprint(SHA256.oid, True, hashlib.sha256(b"hello").digest()),
    policy=None,
    nonce=GOLDEN_NONCE,
    cert_req=True,
    extension_oids=(),
)
SHA512_REQUEST = TimeStampRequest(
    version=1,
    imprint=MessageImprint(SHA512.oid, False, hashlib.sha512(b"hello").digest()),
    policy=GOLDEN_POLICY,
    nonce=None,
    cert_req=False,
    extension_oids=(),
)

REJECTION_TEXTS = {
    FailureInfo.BAD_ALG: "hash algorithm 1.2.840.113549.2.5 is not accepted",
    FailureInfo.BAD_DATA_FORMAT: "a sha256 digest has 32 octets, not 31",
    FailureInfo.UNACCEPTED_POLICY: "policy 1.2.3.4.5 is not accepted",
    FailureInfo.UNACCEPTED_EXTENSION: "request extensions are not supported",
    FailureInfo.TIME_NOT_AVAILABLE: "time is not available",
    FailureInfo.SYSTEM_FAILURE: "the TSA could not issue a token; try again later",
}


def golden_requests() -> dict[str, bytes]:
    return {
        "request-sha256-nonce-certreq.tsq": encode_request(SHA256_REQUEST),
        "request-sha512-policy-no-nonce.tsq": encode_request(SHA512_REQUEST),
    }


def golden_template(pki_dir: Path) -> TokenTemplate:
    key = load_encrypted_key(pki_dir / "pki" / "tsu-key.pem", read_passphrase_file(pki_dir / "secrets" / "tsu.pass"))
    signer = FileSigner(key, "sha512")
    tsu = x509.load_pem_x509_certificate((pki_dir / "pki" / "tsu.pem").read_bytes())
    issuing = x509.load_pem_x509_certificate((pki_dir / "pki" / "issuing-ca.pem").read_bytes())
    return TokenTemplate(
        signer_certificate=tsu.public_bytes(Encoding.DER),
        chain=[issuing.public_bytes(Encoding.DER)],
        digest_algorithm=signer.digest_algorithm,
        signature_algorithm=signer.signature_algorithm,
        accuracy_us=1_000_000,
        sign=signer.sign,
    )


def golden_fields(request: TimeStampRequest) -> TokenFields:
    return TokenFields(
        policy=request.policy or GOLDEN_POLICY,
        message_imprint=encode_message_imprint(request.imprint),
        serial=GOLDEN_SERIAL,
        gen_time=GenTimeFormatter(3).encode(GOLDEN_NS),
        nonce=request.nonce,
    )


def build_golden_responses(pki_dir: Path) -> dict[str, bytes]:
    template = golden_template(pki_dir)
    responses = {
        "response-granted-ed25519-certs.tsr": template.response(golden_fields(SHA256_REQUEST), with_certificates=True),
        "response-granted-ed25519-nocerts.tsr": template.response(
            golden_fields(SHA512_REQUEST), with_certificates=False
        ),
    }
    for fail_info, text in REJECTION_TEXTS.items():
        responses[f"rejection-{fail_info.name.lower().replace('_', '-')}.tsr"] = rejection(fail_info, text)
    return responses
