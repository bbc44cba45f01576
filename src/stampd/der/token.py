"""TimeStampResp assembly (RFC 3161 §2.4.2, RFC 5652 §5, RFC 5035, RFC 5816).

Everything that is the same for every token of a TSU (certificates, the signer's identifiers, the
SigningCertificateV2 attribute, algorithm identifiers, accuracy) is encoded once in :class:`TokenTemplate`; per
request only TSTInfo, the message digest and the signature are encoded. The tests decode every shape this module
emits with asn1crypto and re-encode it to prove it is DER (SPEC CMS-11).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from asn1crypto import x509

from stampd.der.algorithms import digest_algorithm_identifier
from stampd.der.encoding import (
    GENERALIZED_TIME,
    integer,
    octet_string,
    oid,
    sequence,
    set_of,
    sorted_set_elements,
    tlv,
)
from stampd.oids import HASH_BY_NAME, Attributes, ContentTypes

QUALIFIED_TOKEN_EXTENSIONS = bytes.fromhex(
    "A1 1B 30 19 06 08 2B 06 01 05 05 07 01 03 04 0D 30 0B 30 09 06 07 04 00 81 97 5E 01 01"
)
"""TSTInfo.extensions [1] holding one non-critical qcStatements extension (1.3.6.1.5.5.7.1.3) with exactly one
esi4-qtstStatement-1 (id-etsi-tsts-EuQCompliance, 0.4.0.19422.1.1) and no info: ETSI EN 319 422 §9.1, SPEC ETS-05."""

GRANTED_STATUS = sequence(integer(0))
"""PKIStatusInfo for granted(0), no failInfo (SPEC STS-02, STS-05)."""

_VERSION_1 = integer(1)
_VERSION_3 = integer(3)
_TST_INFO_OID = oid(ContentTypes.TST_INFO)
_SIGNED_DATA_OID = oid(ContentTypes.SIGNED_DATA)


@dataclass(frozen=True, slots=True)
class TokenFields:
    """The per-request values of a TSTInfo; ``message_imprint`` is the DER MessageImprint."""

    policy: str
    message_imprint: bytes
    serial: int
    gen_time: bytes
    nonce: int | None


def accuracy(microseconds: int) -> bytes:
    """Accuracy ::= SEQUENCE {seconds INTEGER OPT, millis [0] OPT, micros [1] OPT}; zero parts omitted (TIM-05)."""
    if microseconds <= 0:
        raise ValueError("accuracy must be positive")
    seconds, rest = divmod(microseconds, 1_000_000)
    millis, micros = divmod(rest, 1000)
    parts = b""
    if seconds:
        parts += integer(seconds)
    if millis:
        parts += tlv(0x80, integer(millis)[2:])
    if micros:
        parts += tlv(0x81, integer(micros)[2:])
    return sequence(parts)


class GenTimeFormatter:
    """GeneralizedTime ``YYYYMMDDhhmmss[.f]Z`` with at most ``digits`` fraction digits, trailing zeros removed
    and the point dropped for a zero fraction (RFC 3161 §2.4.2, SPEC TIM-01, TIM-02, TIM-08)."""

    def __init__(self, digits: int) -> None:
        if digits not in (0, 3, 6):
            raise ValueError("genTime precision must be 0, 3 or 6 fraction digits")
        self.digits = digits
        self._unit: int = 10 ** (9 - digits)
        self._second = -1
        self._prefix = ""

    def truncate(self, time_ns: int) -> int:
        """The instant the encoded genTime denotes: time_ns cut to the precision."""
        return time_ns - time_ns % self._unit

    def text(self, time_ns: int) -> str:
        second, rest = divmod(time_ns, 1_000_000_000)
        if second != self._second:
            t = time.gmtime(second)
            self._prefix = f"{t.tm_year:04d}{t.tm_mon:02d}{t.tm_mday:02d}{t.tm_hour:02d}{t.tm_min:02d}{t.tm_sec:02d}"
            self._second = second
        if self.digits:
            fraction = f"{rest // self._unit:0{self.digits}d}".rstrip("0")
            if fraction:
                return f"{self._prefix}.{fraction}Z"
        return f"{self._prefix}Z"

    def encode(self, time_ns: int) -> bytes:
        return tlv(GENERALIZED_TIME, self.text(time_ns).encode("ascii"))


def _attribute(attr_oid: str, value: bytes) -> bytes:
    return sequence(oid(attr_oid), set_of([value]))


def _issuer_and_serial(cert: x509.Certificate) -> tuple[bytes, bytes]:
    """(issuer Name DER, serial INTEGER DER) of a certificate."""
    tbs = cert["tbs_certificate"]
    return tbs["issuer"].dump(force=True), integer(tbs["serial_number"].native)


def signing_certificate_v2(cert_der: bytes) -> bytes:
    """SigningCertificateV2 with one ESSCertIDv2 for the signer (RFC 5035 §5.4.1, SPEC ESS-03..07).

    SHA-256 is the DEFAULT hashAlgorithm and is therefore omitted (SPEC ESS-05); issuerSerial names the issuer as a
    directoryName, [4] EXPLICIT since Name is a CHOICE (SPEC ESS-04).
    """
    issuer, serial = _issuer_and_serial(x509.Certificate.load(cert_der))
    issuer_serial = sequence(sequence(tlv(0xA4, issuer)), serial)
    ess_cert_id = sequence(octet_string(hashlib.sha256(cert_der).digest()), issuer_serial)
    return sequence(sequence(ess_cert_id))


class TokenTemplate:
    """The constant parts of one TSU's tokens, and the assembly of the variable parts around them."""

    def __init__(
        self,
        *,
        signer_certificate: bytes,
        chain: Sequence[bytes],
        digest_algorithm: str,
        signature_algorithm: bytes,
        accuracy_us: int,
        sign: Callable[[bytes], bytes],
        extensions: bytes = b"",
    ) -> None:
        cert = x509.Certificate.load(signer_certificate)
        issuer, serial = _issuer_and_serial(cert)
        self._sign = sign
        self._hash = getattr(hashlib, digest_algorithm.replace("-", "_"))
        digest_size = HASH_BY_NAME[digest_algorithm].digest_size
        self._accuracy = accuracy(accuracy_us)
        self._extensions = extensions
        digest_alg = digest_algorithm_identifier(digest_algorithm)

        content_type = _attribute(Attributes.CONTENT_TYPE, _TST_INFO_OID)
        signing_cert = _attribute(Attributes.SIGNING_CERTIFICATE_V2, signing_certificate_v2(signer_certificate))
        # The message-digest attribute's encoding differs per token only in its last digest_size octets, so the
        # DER SET OF order of the three attributes (SPEC CMS-07) is fixed: find it once with a placeholder digest.
        placeholder = _attribute(Attributes.MESSAGE_DIGEST, octet_string(bytes(digest_size)))
        ordered = sorted_set_elements([content_type, signing_cert, placeholder])
        at = ordered.index(placeholder)
        self._attrs_before = b"".join(ordered[:at])
        self._attrs_after = b"".join(ordered[at + 1 :])
        self._digest_attr_prefix = placeholder[:-digest_size]

        self._signer_info_head = _VERSION_1 + sequence(issuer, serial) + digest_alg
        self._signature_algorithm = signature_algorithm
        self._digest_algorithms = set_of([digest_alg])
        self._certificates = tlv(0xA0, b"".join(sorted_set_elements([signer_certificate, *chain])))

    def tst_info(self, fields: TokenFields) -> bytes:
        """DER TSTInfo: version 1, no ordering (DEFAULT FALSE omitted, SPEC TIM-06), accuracy always (ETS-02)."""
        parts = [
            _VERSION_1,
            oid(fields.policy),
            fields.message_imprint,
            integer(fields.serial),
            fields.gen_time,
            self._accuracy,
        ]
        if fields.nonce is not None:
            parts.append(integer(fields.nonce))
        if self._extensions:
            parts.append(self._extensions)
        return sequence(*parts)

    def response(self, fields: TokenFields, *, with_certificates: bool) -> bytes:
        """A granted TimeStampResp holding the signed token."""
        tst_info = self.tst_info(fields)
        attrs = self._attrs_before + self._digest_attr_prefix + self._hash(tst_info).digest() + self._attrs_after
        signature = self._sign(tlv(0x31, attrs))
        signer_info = sequence(
            self._signer_info_head,
            tlv(0xA0, attrs),
            self._signature_algorithm,
            octet_string(signature),
        )
        encap = sequence(_TST_INFO_OID, tlv(0xA0, octet_string(tst_info)))
        signed_data = sequence(
            _VERSION_3,
            self._digest_algorithms,
            encap,
            self._certificates if with_certificates else b"",
            tlv(0x31, signer_info),
        )
        content_info = sequence(_SIGNED_DATA_OID, tlv(0xA0, signed_data))
        return sequence(GRANTED_STATUS, content_info)
