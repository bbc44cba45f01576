"""TimeStampReq (RFC 3161 §2.4.1): decoding for the server, encoding for the client."""

from __future__ import annotations

from asn1crypto import core, tsp

from stampd.der.encoding import (
    BOOLEAN,
    NULL_VALUE,
    algorithm_identifier,
    integer,
    octet_string,
    oid,
    sequence,
    tlv,
)
from stampd.errors import ParseError
from stampd.model import MessageImprint, TimeStampRequest

MAX_NONCE_BITS = 512
"""Nonces wider than this are not a client's random number but an attack on the encoder (SPEC REQ-07: >= 256)."""


def decode_request(body: bytes) -> TimeStampRequest:
    """Decode a TimeStampReq, tolerating BER but not trailing bytes (SPEC REQ-12, REQ-13).

    Raises :class:`ParseError` for anything that is not a TimeStampReq; a well-formed request with values the TSA
    will not grant decodes here and is refused by the issuance policy.
    """
    try:
        req = tsp.TimeStampReq.load(body, strict=True)
        version = int(req["version"])
        imprint = req["message_imprint"]
        alg = imprint["hash_algorithm"]
        hash_oid = alg["algorithm"].dotted
        params = alg["parameters"]
        if isinstance(params, core.Void):
            params_null = False
        elif isinstance(params, core.Null) or params.dump() == NULL_VALUE:
            params_null = True
        else:
            raise ParseError("hash algorithm parameters must be absent or NULL")
        digest = imprint["hashed_message"].native
        policy = req["req_policy"].dotted if req["req_policy"].native is not None else None
        nonce = req["nonce"].native
        cert_req = bool(req["cert_req"].native)
        extensions = req["extensions"]
        extension_oids = tuple(ext["extn_id"].dotted for ext in extensions) if extensions.native is not None else ()
    except ParseError:
        raise
    except Exception as e:  # asn1crypto raises ValueError, TypeError, KeyError... for malformed input
        raise ParseError(f"not a TimeStampReq: {e}") from e
    if not isinstance(version, int) or not isinstance(digest, bytes):
        raise ParseError("not a TimeStampReq")
    if nonce is not None and abs(nonce).bit_length() > MAX_NONCE_BITS:
        raise ParseError(f"nonce wider than {MAX_NONCE_BITS} bits")
    return TimeStampRequest(
        version=version,
        imprint=MessageImprint(hash_oid=hash_oid, params_null=params_null, digest=digest),
        policy=policy,
        nonce=nonce,
        cert_req=cert_req,
        extension_oids=extension_oids,
    )


def encode_message_imprint(imprint: MessageImprint) -> bytes:
    """DER MessageImprint; for a DER request this is the request's own bytes (SPEC TST-03)."""
    return sequence(
        algorithm_identifier(imprint.hash_oid, NULL_VALUE if imprint.params_null else None),
        octet_string(imprint.digest),
    )


def encode_request(request: TimeStampRequest) -> bytes:
    """DER TimeStampReq, as a client sends it; extensions are not supported by this encoder."""
    if request.extension_oids:
        raise ValueError("request extensions cannot be encoded")
    parts = [integer(request.version), encode_message_imprint(request.imprint)]
    if request.policy is not None:
        parts.append(oid(request.policy))
    if request.nonce is not None:
        parts.append(integer(request.nonce))
    if request.cert_req:
        parts.append(tlv(BOOLEAN, b"\xff"))
    return sequence(*parts)
