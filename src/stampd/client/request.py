"""Building a TimeStampReq (RFC 3161 §2.4.1) and checking that a reply answers it (RFC 3161 §2.4.2)."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from cryptography import x509

from stampd.der.request import encode_request
from stampd.der.token_reader import TimeStampResponse, names_equal, read_response
from stampd.errors import ParseError, StampdError, VerificationError
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import HASH_BY_NAME

NONCE_MIN_BITS = 64
NONCE_MAX_BITS = 128
"""RFC 3161 §2.4.1 suggests a 64-bit nonce; 128 bits stays well within what TSAs accept (SPEC REQ-07)."""


def random_nonce() -> int:
    """A uniformly random positive nonce of 64 to 128 bits."""
    low = 1 << (NONCE_MIN_BITS - 1)
    return low + secrets.randbelow((1 << NONCE_MAX_BITS) - low)


def hash_file(path: Path, hash_name: str) -> bytes:
    """The digest of a file, read in chunks so that large files do not fill memory."""
    if hash_name not in HASH_BY_NAME:
        raise StampdError(f"unknown hash {hash_name!r}")
    h = hashlib.new(hash_name.replace("-", "_"))
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def build_request(
    digest: bytes, hash_name: str, nonce: int | None, cert_req: bool = True, policy: str | None = None
) -> tuple[TimeStampRequest, bytes]:
    """A version 1 TimeStampReq and its DER; the hash identifier has absent parameters (RFC 5754 §2)."""
    algorithm = HASH_BY_NAME.get(hash_name)
    if algorithm is None:
        raise StampdError(f"unknown hash {hash_name!r}")
    if len(digest) != algorithm.digest_size:
        raise StampdError(f"a {hash_name} digest has {algorithm.digest_size} bytes, not {len(digest)}")
    if nonce is not None and nonce <= 0:
        raise StampdError("the nonce must be a positive integer")
    request = TimeStampRequest(
        version=1,
        imprint=MessageImprint(hash_oid=algorithm.oid, params_null=False, digest=digest),
        policy=policy,
        nonce=nonce,
        cert_req=cert_req,
        extension_oids=(),
    )
    return request, encode_request(request)


def check_reply(request: TimeStampRequest, response: bytes) -> TimeStampResponse:
    """Decode ``response`` and check it answers ``request`` (RFC 3161 §2.4.2); raise VerificationError if not.

    Checks the status is granted, the imprint and nonce are echoed, the policy is the requested one, and, when
    certReq was set, that the signer's certificate is embedded (SPEC REQ-08, REQ-09, TST-03). It does not check
    the signature: that is :func:`stampd.verify.verify_timestamp`'s job.
    """
    try:
        reply = read_response(response)
    except ParseError as e:
        raise VerificationError(f"the reply is not a TimeStampResp: {e}") from e
    status = reply.status
    if status.status not in (0, 1) or reply.token is None:
        text = "; ".join(status.status_strings)
        raise VerificationError(
            f"the TSA did not grant the request: status {status.status}, failInfo bits {list(status.fail_bits)}"
            + (f": {text}" if text else "")
        )
    token = reply.token
    tst = token.tst_info
    if tst.hash_oid != request.imprint.hash_oid or tst.digest != request.imprint.digest:
        raise VerificationError("the token's messageImprint is not the request's (RFC 3161 §2.4.2)")
    if tst.nonce != request.nonce:
        raise VerificationError(f"the token's nonce {tst.nonce} is not the request's {request.nonce} (SPEC REQ-08)")
    if request.policy is not None and tst.policy != request.policy:
        raise VerificationError(f"the token's policy {tst.policy} is not the requested {request.policy}")
    if request.cert_req and not _signer_embedded(reply):
        raise VerificationError("certReq was set but the token does not embed the signer certificate (SPEC REQ-09)")
    return reply


def _signer_embedded(reply: TimeStampResponse) -> bool:
    """Whether an embedded certificate matches the SignerIdentifier (RFC 5652 §5.3)."""
    token = reply.token
    if token is None or len(token.signer_infos) != 1:
        return False
    sid = token.signer_infos[0].sid
    for der in token.certificates:
        try:
            cert = x509.load_der_x509_certificate(der)
            if sid.issuer is not None:
                if cert.serial_number == sid.serial and names_equal(sid.issuer, cert.issuer.public_bytes()):
                    return True
            else:
                ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
                if ski == sid.subject_key_identifier:
                    return True
        except (ValueError, x509.ExtensionNotFound):
            continue
    return False
