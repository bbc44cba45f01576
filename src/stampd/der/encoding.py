"""Primitive DER encoders (X.690 §8, §10, §11) for the hot path, where a general ASN.1 library costs more
than the signature. Every structure built from these is checked against strict decoding in the tests."""

from __future__ import annotations

from functools import lru_cache

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
NULL = 0x05
OID = 0x06
UTF8_STRING = 0x0C
GENERALIZED_TIME = 0x18
BOOLEAN = 0x01


def length(n: int) -> bytes:
    """Definite-length octets in the shortest form (X.690 §10.1)."""
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    return bytes((tag,)) + length(n) + content


def sequence(*parts: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(parts))


def integer(value: int) -> bytes:
    """Minimal two's-complement INTEGER (X.690 §8.3.2): no redundant leading 00 or FF octet."""
    if value >= 0:
        content = value.to_bytes(value.bit_length() // 8 + 1, "big")
    else:
        content = value.to_bytes((value + 1).bit_length() // 8 + 1, "big", signed=True)
    return tlv(INTEGER, content)


def octet_string(value: bytes) -> bytes:
    return tlv(OCTET_STRING, value)


@lru_cache(maxsize=256)
def oid(dotted: str) -> bytes:
    """OBJECT IDENTIFIER (X.690 §8.19); cached since the same few identifiers recur in every token."""
    arcs = [int(a) for a in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise ValueError(f"not an object identifier: {dotted!r}")
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        rest = arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out.extend(reversed(chunk))
    return tlv(OID, bytes(out))


def set_of(elements: list[bytes]) -> bytes:
    """DER SET OF: elements sorted as octet strings, the shorter padded with zero octets (X.690 §11.6)."""
    return tlv(SET, b"".join(sorted_set_elements(elements)))


def sorted_set_elements(elements: list[bytes]) -> list[bytes]:
    width = max((len(e) for e in elements), default=0)
    return sorted(elements, key=lambda e: e.ljust(width, b"\x00"))


def algorithm_identifier(dotted: str, params: bytes | None = None) -> bytes:
    """AlgorithmIdentifier; ``params`` is the DER of the parameters, or None for absent."""
    return sequence(oid(dotted), params or b"")


NULL_VALUE = b"\x05\x00"


def utf8_string(text: str) -> bytes:
    return tlv(UTF8_STRING, text.encode("utf-8"))


def named_bit_list(bit: int) -> bytes:
    """BIT STRING with one named bit set, trailing zero bits removed (X.690 §11.2.2, SPEC STS-04)."""
    nbytes = bit // 8 + 1
    unused = 7 - bit % 8
    content = bytearray(nbytes)
    content[-1] = 0x80 >> (bit % 8)
    return tlv(BIT_STRING, bytes((unused,)) + bytes(content))
