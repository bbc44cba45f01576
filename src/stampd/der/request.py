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

    Definite-length encodings, which is what every client sends, take a direct reader that costs a fraction of
    the signature; the rare BER shapes it does not handle (indefinite lengths, constructed strings) go to
    asn1crypto. The property tests check that both readers agree.
    """
    try:
        return _read_request(body)
    except _NotDefiniteLength:
        if len(body) > MAX_BER_OCTETS:
            raise ParseError(f"an indefinite-length TimeStampReq is at most {MAX_BER_OCTETS} octets") from None
        return decode_request_asn1crypto(body)


def decode_request_asn1crypto(body: bytes) -> TimeStampRequest:
    """Decode a TimeStampReq with asn1crypto, tolerating BER but not trailing bytes (SPEC REQ-12, REQ-13).

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
    if version.bit_length() >= 8 * MAX_VERSION_OCTETS or any(
        len(o) > 4 * MAX_OID_OCTETS for o in (hash_oid, policy or "", *extension_oids)
    ):
        raise ParseError("a TimeStampReq field is out of range")
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


class _NotDefiniteLength(Exception):
    """A BER shape the direct reader leaves to asn1crypto."""


MAX_OID_OCTETS = 64
"""Longer identifiers occur in no real request; bounding them keeps decoding linear and error texts short."""
MAX_ARC_OCTETS = 20
"""An arc of at most 140 bits (20 base-128 octets): room for the 128-bit UUID arcs under 2.25 (X.667)."""
MAX_VERSION_OCTETS = 4
MAX_BER_OCTETS = 4096
"""The largest request the BER fallback decodes: a real one is about a hundred octets."""

_OID_CACHE: dict[bytes, str] = {}
_OID_CACHE_LIMIT = 256


def _header(data: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the TLV at ``pos``; low-tag-number form only, as TSP needs."""
    if end - pos < 2:
        raise ParseError("truncated")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise ParseError("high tag numbers do not occur in a TimeStampReq")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise _NotDefiniteLength
    else:
        count = first & 0x7F
        if count > 4 or end - pos < count:
            raise ParseError("bad length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if length > end - pos:
        raise ParseError("truncated")
    return tag, pos, pos + length


def _integer(data: bytes, start: int, stop: int, max_octets: int) -> int:
    if start == stop:
        raise ParseError("empty INTEGER")
    if stop - start > max_octets:
        raise ParseError(f"INTEGER longer than {max_octets} octets")
    return int.from_bytes(data[start:stop], "big", signed=True)


def _object_identifier(data: bytes, start: int, stop: int) -> str:
    raw = data[start:stop]
    cached = _OID_CACHE.get(raw)
    if cached is not None:
        return cached
    if not raw or raw[-1] & 0x80 or len(raw) > MAX_OID_OCTETS:
        raise ParseError("bad OBJECT IDENTIFIER")
    arcs: list[int] = []
    value = 0
    octets = 0
    for octet in raw:
        if octets == 0 and octet == 0x80:
            raise ParseError("bad OBJECT IDENTIFIER")
        value = (value << 7) | (octet & 0x7F)
        octets += 1
        if octets > MAX_ARC_OCTETS:
            raise ParseError("OBJECT IDENTIFIER arc too large")
        if not octet & 0x80:
            arcs.append(value)
            value = 0
            octets = 0
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    dotted = ".".join(map(str, head + arcs[1:]))
    if len(_OID_CACHE) < _OID_CACHE_LIMIT:
        _OID_CACHE[raw] = dotted
    return dotted


def _read_request(body: bytes) -> TimeStampRequest:
    """The direct reader: TimeStampReq per RFC 3161 §2.4.1 with definite lengths (DER, or BER with long-form or
    non-minimal lengths and any non-zero BOOLEAN)."""
    end = len(body)
    tag, pos, stop = _header(body, 0, end)
    if tag != 0x30 or stop != end:
        raise ParseError("not a TimeStampReq" if tag != 0x30 else "trailing bytes after the TimeStampReq")
    tag, start, pos = _header(body, pos, stop)
    if tag != 0x02:
        raise ParseError("TimeStampReq.version missing")
    version = _integer(body, start, pos, MAX_VERSION_OCTETS)

    tag, start, pos = _header(body, pos, stop)
    if tag != 0x30:
        raise ParseError("TimeStampReq.messageImprint missing")
    tag, alg_start, alg_stop = _header(body, start, pos)
    if tag != 0x30:
        raise ParseError("MessageImprint.hashAlgorithm missing")
    tag, oid_start, oid_stop = _header(body, alg_start, alg_stop)
    if tag != 0x06:
        raise ParseError("AlgorithmIdentifier.algorithm missing")
    hash_oid = _object_identifier(body, oid_start, oid_stop)
    if oid_stop == alg_stop:
        params_null = False
    elif body[oid_stop:alg_stop] == NULL_VALUE:
        params_null = True
    else:
        raise ParseError("hash algorithm parameters must be absent or NULL")
    tag, digest_start, digest_stop = _header(body, alg_stop, pos)
    if tag == 0x24:
        raise _NotDefiniteLength
    if tag != 0x04 or digest_stop != pos:
        raise ParseError("MessageImprint.hashedMessage must be one OCTET STRING")
    digest = body[digest_start:digest_stop]

    policy = nonce = None
    cert_req = False
    extension_oids: tuple[str, ...] = ()
    tag = 0
    if pos < stop:
        tag, start, next_pos = _header(body, pos, stop)
        if tag == 0x06:
            policy = _object_identifier(body, start, next_pos)
            pos = next_pos
            tag = _header(body, pos, stop)[0] if pos < stop else 0
    if tag == 0x02:
        tag, start, pos = _header(body, pos, stop)
        nonce = _integer(body, start, pos, MAX_NONCE_BITS // 8 + 1)
        tag = _header(body, pos, stop)[0] if pos < stop else 0
    if tag == 0x01:
        tag, start, pos = _header(body, pos, stop)
        if pos - start != 1:
            raise ParseError("bad BOOLEAN")
        cert_req = body[start] != 0
        tag = _header(body, pos, stop)[0] if pos < stop else 0
    if tag == 0xA0:
        tag, start, pos = _header(body, pos, stop)
        extension_oids = _extension_oids(body, start, pos)
    if pos != stop:
        raise ParseError("unexpected field in TimeStampReq")
    return TimeStampRequest(
        version, MessageImprint(hash_oid, params_null, digest), policy, nonce, cert_req, extension_oids
    )


def _extension_oids(body: bytes, pos: int, stop: int) -> tuple[str, ...]:
    """extnIDs of [0] IMPLICIT Extensions; each Extension must be well formed (RFC 5280 §4.1)."""
    oids = []
    while pos < stop:
        tag, start, pos = _header(body, pos, stop)
        if tag != 0x30:
            raise ParseError("bad Extension")
        tag, oid_start, inner = _header(body, start, pos)
        if tag != 0x06:
            raise ParseError("bad Extension")
        oids.append(_object_identifier(body, oid_start, inner))
        if inner < pos and body[inner] == 0x01:
            tag, bool_start, inner = _header(body, inner, pos)
            if inner - bool_start != 1:
                raise ParseError("bad BOOLEAN")
        if inner >= pos:
            raise ParseError("Extension.extnValue missing")
        tag, _, inner = _header(body, inner, pos)
        if tag == 0x24:
            raise _NotDefiniteLength
        if tag != 0x04 or inner != pos:
            raise ParseError("bad Extension")
    if not oids:
        raise ParseError("empty Extensions")
    return tuple(oids)


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
