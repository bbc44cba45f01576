"""Strict decoding of TimeStampResp and time-stamp tokens (RFC 3161 §2.4.2, RFC 5652 §5) into plain values.

The relying party never sees asn1crypto: this module turns a reply into frozen dataclasses that keep the exact
octets the signature and the message digest cover (eContent, signedAttrs re-tagged as SET). Any malformed input,
whatever the cause, raises :class:`ParseError` and nothing else, so that a hostile reply cannot crash a verifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from asn1crypto import algos, cms, core, tsp, x509

from stampd.der.encoding import length
from stampd.errors import ParseError
from stampd.oids import ContentTypes

MAX_MESSAGE_BYTES = 1 << 20
"""A reply larger than this is not a time-stamp (a token with a long chain is a few KiB); bound before parsing."""

MAX_DEPTH = 40
"""Deepest nesting accepted; certificates reach about 10, so more is an attack on the recursion."""

MAX_ELEMENTS = 64
"""Most certificates, SignerInfos, attributes or extensions accepted in one token."""

_GENERALIZED_TIME = re.compile(r"^(\d{14})(?:\.(\d*[1-9]))?Z$")
_CONSTRUCTED_OK = (0x10, 0x11)  # universal SEQUENCE and SET; every other constructed universal tag is BER


@dataclass(frozen=True, slots=True)
class StatusInfo:
    """PKIStatusInfo (RFC 3161 §2.4.2): status, the numbers of the failInfo bits set, and the statusString."""

    status: int
    fail_bits: tuple[int, ...]
    status_strings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class TokenExtension:
    oid: str
    critical: bool


@dataclass(frozen=True, slots=True)
class TSTInfo:
    """TSTInfo (RFC 3161 §2.4.2); ``hash_params`` is the DER of the parameters, None when absent."""

    version: int
    policy: str
    hash_oid: str
    hash_params: bytes | None
    digest: bytes
    serial: int
    gen_time: datetime
    gen_time_fraction: str
    """The fraction digits exactly as encoded ('' for whole seconds); ``gen_time`` keeps at most six."""
    accuracy_us: int | None
    ordering: bool
    nonce: int | None
    tsa: bytes | None
    """DER of the tsa GeneralName, without the [0] EXPLICIT wrapper."""
    tsa_directory_name: bytes | None
    """DER of the Name when tsa is a directoryName (RFC 3161 §2.4.2, SPEC TST-06)."""
    extensions: tuple[TokenExtension, ...]


@dataclass(frozen=True, slots=True)
class SignerId:
    """SignerIdentifier (RFC 5652 §5.3): issuerAndSerialNumber, or subjectKeyIdentifier."""

    issuer: bytes | None
    """DER of the issuer Name."""
    serial: int | None
    subject_key_identifier: bytes | None


@dataclass(frozen=True, slots=True)
class Attribute:
    oid: str
    values: tuple[bytes, ...]
    """DER of each AttributeValue."""


@dataclass(frozen=True, slots=True)
class SignerInfo:
    """SignerInfo (RFC 5652 §5.3) with the bytes the signature covers."""

    version: int
    sid: SignerId
    digest_algorithm: str
    signed_attrs: tuple[Attribute, ...]
    signed_attrs_der: bytes
    """signedAttrs re-tagged as SET OF (0x31): what the signature is computed over (RFC 5652 §5.4)."""
    signature_algorithm: str
    signature_params: bytes | None
    signature: bytes

    def attribute_values(self, oid: str) -> list[tuple[bytes, ...]]:
        """Values of every signed attribute of type ``oid`` (RFC 5652 §11 wants exactly one, single-valued)."""
        return [a.values for a in self.signed_attrs if a.oid == oid]


@dataclass(frozen=True, slots=True)
class TimeStampToken:
    """A ContentInfo carrying SignedData with TSTInfo (RFC 3161 §2.4.2, RFC 5652 §3, §5.1)."""

    signed_data_version: int
    digest_algorithms: tuple[str, ...]
    econtent_type: str
    econtent: bytes
    """The eContent octets: the DER TSTInfo that the message-digest attribute covers."""
    tst_info: TSTInfo
    certificates: tuple[bytes, ...]
    """DER of every X.509 certificate in SignedData.certificates, in order."""
    other_certificate_choices: int
    """How many non-X.509 CertificateChoices (attribute or other certificates) were skipped."""
    signer_infos: tuple[SignerInfo, ...]


@dataclass(frozen=True, slots=True)
class TimeStampResponse:
    """TimeStampResp (RFC 3161 §2.4.2); ``token`` is None when the TSA did not send one."""

    status: StatusInfo
    token: TimeStampToken | None
    token_der: bytes | None


@dataclass(frozen=True, slots=True)
class EssCertId:
    """ESSCertID (RFC 2634 §5.4.1, SHA-1) or ESSCertIDv2 (RFC 5035 §5.4.1).

    ``issuer_names`` holds the DER of each directoryName of issuerSerial; ``other_issuer_names`` counts the
    GeneralNames of other kinds, which RFC 5035 §5.4.1.1 forbids (SPEC ESS-04).
    """

    hash_oid: str
    cert_hash: bytes
    issuer_names: tuple[bytes, ...] | None
    other_issuer_names: int
    serial: int | None


@dataclass(frozen=True, slots=True)
class PssParams:
    """RSASSA-PSS-params (RFC 4056 §3, RFC 8017 A.2.3), defaults applied."""

    hash_oid: str
    mgf_oid: str
    mgf_hash_oid: str | None
    salt_length: int
    trailer_field: int


class _TimeStampResp(core.Sequence):  # type: ignore[misc]
    """TimeStampResp with timeStampToken OPTIONAL, as RFC 3161 §2.4.2 has it (asn1crypto makes it mandatory)."""

    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("status", tsp.PKIStatusInfo),
        ("time_stamp_token", cms.ContentInfo, {"optional": True}),
    ]


# --- entry points --------------------------------------------------------------------------------------------


def read_response(data: bytes) -> TimeStampResponse:
    """Decode a DER TimeStampResp; a token, if any, is decoded too (RFC 3161 §2.4.2)."""
    _check_encoding(data)
    try:
        resp = _TimeStampResp.load(data, strict=True)
        status = _status(resp["status"])
        token_obj = resp["time_stamp_token"]
        token_der = None if isinstance(token_obj, core.Void) else token_obj.dump()
    except ParseError:
        raise
    except Exception as e:  # asn1crypto raises ValueError, TypeError, KeyError... on malformed input
        raise ParseError(f"not a TimeStampResp: {e}") from e
    token = None if token_der is None else read_token(token_der)
    return TimeStampResponse(status=status, token=token, token_der=token_der)


def read_token(data: bytes) -> TimeStampToken:
    """Decode a bare time-stamp token: ContentInfo with SignedData encapsulating TSTInfo (RFC 3161 §2.4.2)."""
    _check_encoding(data)
    try:
        return _token(data)
    except ParseError:
        raise
    except Exception as e:
        raise ParseError(f"not a time-stamp token: {e}") from e


def is_bare_token(data: bytes) -> bool:
    """Tell a ContentInfo (SEQUENCE starting with an OID) from a TimeStampResp (starting with PKIStatusInfo)."""
    try:
        outer = core.Sequence.load(data)
        first = bytes(outer.contents[:1])
    except Exception as e:
        raise ParseError(f"not DER: {e}") from e
    return first == b"\x06"


def read_signing_certificate(value: bytes, *, v2: bool) -> tuple[EssCertId, ...]:
    """Decode a SigningCertificate (v1, RFC 2634 §5.4) or SigningCertificateV2 (RFC 5035 §5.4) value."""
    try:
        spec = tsp.SigningCertificateV2 if v2 else tsp.SigningCertificate
        attr = spec.load(value, strict=True)
        out = []
        for cid in _bounded(attr["certs"]):
            hash_oid = cid["hash_algorithm"]["algorithm"].dotted if v2 else "1.3.14.3.2.26"
            issuer_serial = cid["issuer_serial"]
            names: tuple[bytes, ...] | None = None
            others = 0
            serial = None
            if not isinstance(issuer_serial, core.Void):
                dir_names = []
                for gn in issuer_serial["issuer"]:
                    if gn.name == "directory_name":
                        dir_names.append(gn.chosen.untag().dump())
                    else:
                        others += 1
                names = tuple(dir_names)
                serial = _int(issuer_serial["serial_number"])
            out.append(
                EssCertId(
                    hash_oid=hash_oid,
                    cert_hash=_octets(cid["cert_hash"]),
                    issuer_names=names,
                    other_issuer_names=others,
                    serial=serial,
                )
            )
        return tuple(out)
    except ParseError:
        raise
    except Exception as e:
        raise ParseError(f"not a SigningCertificate{'V2' if v2 else ''}: {e}") from e


def read_object_identifier(value: bytes) -> str:
    """An attribute value that is an OBJECT IDENTIFIER (content-type, RFC 5652 §11.1)."""
    try:
        return str(core.ObjectIdentifier.load(value, strict=True).dotted)
    except Exception as e:
        raise ParseError(f"not an OBJECT IDENTIFIER: {e}") from e


def read_octet_string(value: bytes) -> bytes:
    """An attribute value that is an OCTET STRING (message-digest, RFC 5652 §11.2)."""
    try:
        obj = core.OctetString.load(value, strict=True)
        return _octets(obj)
    except ParseError:
        raise
    except Exception as e:
        raise ParseError(f"not an OCTET STRING: {e}") from e


def read_pss_params(params: bytes | None) -> PssParams:
    """RSASSA-PSS-params with the RFC 4056 §3 defaults (SHA-1, MGF1 with SHA-1, salt 20, trailer 1)."""
    try:
        if params is None:
            raise ParseError("id-RSASSA-PSS without parameters (RFC 4056 §3 wants them explicit)")
        p = algos.RSASSAPSSParams.load(params, strict=True)
        mgf = p["mask_gen_algorithm"]
        mgf_params = mgf["parameters"]
        mgf_hash = None
        if not isinstance(mgf_params, core.Void) and mgf_params is not None:
            mgf_hash = mgf_params["algorithm"].dotted
        return PssParams(
            hash_oid=p["hash_algorithm"]["algorithm"].dotted,
            mgf_oid=mgf["algorithm"].dotted,
            mgf_hash_oid=mgf_hash,
            salt_length=_int(p["salt_length"]),
            trailer_field=_int(p["trailer_field"]),
        )
    except ParseError:
        raise
    except Exception as e:
        raise ParseError(f"bad RSASSA-PSS parameters: {e}") from e


def names_equal(a: bytes, b: bytes) -> bool:
    """Compare two DER Names as RFC 5280 §7.1 says (case- and space-insensitive); False if either is malformed."""
    try:
        same: bool = x509.Name.load(a, strict=True) == x509.Name.load(b, strict=True)
        return same
    except Exception:
        return False


def describe_name(name: bytes) -> str:
    """A human-readable Name, for reports; never raises."""
    try:
        return str(x509.Name.load(name).human_friendly)
    except Exception:
        return f"<undecodable name {name.hex()}>"


# --- structure -------------------------------------------------------------------------------------------------


def _token(data: bytes) -> TimeStampToken:
    info = cms.ContentInfo.load(data, strict=True)
    if info["content_type"].dotted != ContentTypes.SIGNED_DATA:
        raise ParseError(f"ContentInfo type {info['content_type'].dotted} is not id-signedData (RFC 3161 §2.4.2)")
    sd = info["content"]
    if not isinstance(sd, cms.SignedData):
        raise ParseError("ContentInfo without SignedData content")
    encap = sd["encap_content_info"]
    econtent_type = encap["content_type"].dotted
    econtent_obj = encap["content"]
    if isinstance(econtent_obj, core.Void) or econtent_obj is None:
        raise ParseError("SignedData without eContent (a time-stamp token encapsulates its TSTInfo)")
    if econtent_obj.method != 0:
        raise ParseError("eContent is a constructed OCTET STRING (SPEC CMS-03)")
    econtent = bytes(econtent_obj.contents)
    if econtent_type != ContentTypes.TST_INFO:
        raise ParseError(f"eContentType {econtent_type} is not id-ct-TSTInfo (RFC 3161 §2.4.2)")
    _check_encoding(econtent)

    certificates: list[bytes] = []
    others = 0
    cert_set = sd["certificates"]
    if not isinstance(cert_set, core.Void):
        for choice in _bounded(cert_set):
            if choice.name == "certificate":
                certificates.append(choice.chosen.dump())
            else:
                others += 1

    return TimeStampToken(
        signed_data_version=_int(sd["version"]),
        digest_algorithms=tuple(a["algorithm"].dotted for a in _bounded(sd["digest_algorithms"])),
        econtent_type=econtent_type,
        econtent=econtent,
        tst_info=_tst_info(econtent),
        certificates=tuple(certificates),
        other_certificate_choices=others,
        signer_infos=tuple(_signer_info(si) for si in _bounded(sd["signer_infos"])),
    )


def _tst_info(econtent: bytes) -> TSTInfo:
    tst = tsp.TSTInfo.load(econtent, strict=True)
    imprint = tst["message_imprint"]
    alg = imprint["hash_algorithm"]
    params = alg["parameters"]
    gen_time, fraction = _generalized_time(tst["gen_time"])
    accuracy = tst["accuracy"]
    nonce = tst["nonce"]
    tsa = tst["tsa"]
    tsa_der = None
    tsa_dir = None
    if not isinstance(tsa, core.Void):
        tsa_der = tsa.untag().dump()
        if tsa.name == "directory_name":
            tsa_dir = tsa.chosen.untag().dump()
    extensions = tst["extensions"]
    return TSTInfo(
        version=_int(tst["version"]),
        policy=tst["policy"].dotted,
        hash_oid=alg["algorithm"].dotted,
        hash_params=None if isinstance(params, core.Void) else params.dump(),
        digest=_octets(imprint["hashed_message"]),
        serial=_int(tst["serial_number"]),
        gen_time=gen_time,
        gen_time_fraction=fraction,
        accuracy_us=None if isinstance(accuracy, core.Void) else _accuracy_us(accuracy),
        ordering=bool(tst["ordering"].native),
        nonce=None if isinstance(nonce, core.Void) else _int(nonce, MAX_NONCE_OCTETS),
        tsa=tsa_der,
        tsa_directory_name=tsa_dir,
        extensions=()
        if isinstance(extensions, core.Void)
        else tuple(
            TokenExtension(oid=e["extn_id"].dotted, critical=bool(e["critical"].native)) for e in _bounded(extensions)
        ),
    )


def _signer_info(si: Any) -> SignerInfo:
    sid = si["sid"]
    if sid.name == "issuer_and_serial_number":
        ias = sid.chosen
        signer_id = SignerId(
            issuer=ias["issuer"].dump(), serial=_int(ias["serial_number"]), subject_key_identifier=None
        )
    else:
        signer_id = SignerId(issuer=None, serial=None, subject_key_identifier=_octets(sid.chosen))
    attrs_obj = si["signed_attrs"]
    if isinstance(attrs_obj, core.Void):
        attrs: tuple[Attribute, ...] = ()
        attrs_der = b""
    else:
        attrs = tuple(
            Attribute(oid=a["type"].dotted, values=tuple(v.dump() for v in _bounded(a["values"])))
            for a in _bounded(attrs_obj)
        )
        contents = bytes(attrs_obj.contents)
        attrs_der = b"\x31" + length(len(contents)) + contents
    sig_alg = si["signature_algorithm"]
    sig_params = sig_alg["parameters"]
    return SignerInfo(
        version=_int(si["version"]),
        sid=signer_id,
        digest_algorithm=si["digest_algorithm"]["algorithm"].dotted,
        signed_attrs=attrs,
        signed_attrs_der=attrs_der,
        signature_algorithm=sig_alg["algorithm"].dotted,
        signature_params=None if isinstance(sig_params, core.Void) else sig_params.dump(),
        signature=_octets(si["signature"]),
    )


def _status(info: Any) -> StatusInfo:
    strings = info["status_string"]
    fail = info["fail_info"]
    return StatusInfo(
        status=_int(info["status"]),
        fail_bits=() if isinstance(fail, core.Void) else _bits(bytes(fail.contents)),
        status_strings=() if isinstance(strings, core.Void) else tuple(str(s.native) for s in _bounded(strings)),
    )


# --- primitives ----------------------------------------------------------------------------------------------


MAX_INTEGER_OCTETS = 32
"""Serials (at most 21 octets in TSTInfo, 20 in certificates), versions and the like; anything longer is hostile."""
MAX_NONCE_OCTETS = 65


def _int(obj: Any, max_octets: int = MAX_INTEGER_OCTETS) -> int:
    """INTEGER value from its octets (X.690 §8.3), whatever named values the schema gives it; minimal only."""
    raw = bytes(obj.contents)
    if not raw:
        raise ParseError("empty INTEGER")
    if len(raw) > max_octets:
        raise ParseError(f"INTEGER longer than {max_octets} octets")
    if len(raw) > 1 and ((raw[0] == 0 and raw[1] < 0x80) or (raw[0] == 0xFF and raw[1] >= 0x80)):
        raise ParseError("INTEGER not minimally encoded (X.690 §8.3.2)")
    return int.from_bytes(raw, "big", signed=True)


def _octets(obj: Any) -> bytes:
    if obj.method != 0:
        raise ParseError("constructed OCTET STRING (BER, not DER)")
    return bytes(obj.contents)


def _bits(contents: bytes) -> tuple[int, ...]:
    """Numbers of the bits set in a BIT STRING (X.690 §8.6), bit 0 being the first."""
    if not contents or contents[0] > 7 or (len(contents) == 1 and contents[0]):
        raise ParseError("malformed BIT STRING")
    return tuple(i * 8 + j for i, byte in enumerate(contents[1:]) for j in range(8) if byte & (0x80 >> j))


def _generalized_time(obj: Any) -> tuple[datetime, str]:
    """genTime as `YYYYMMDDhhmmss[.f*]Z`, no trailing zero in the fraction (RFC 3161 §2.4.2, SPEC TIM-01/02)."""
    text = bytes(obj.contents).decode("ascii")
    m = _GENERALIZED_TIME.match(text)
    if m is None:
        raise ParseError(f"genTime {text!r} is not YYYYMMDDhhmmss[.f*]Z")
    fraction = m.group(2) or ""
    base = datetime.strptime(m.group(1), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
    return base.replace(microsecond=int(fraction[:6].ljust(6, "0"))), fraction


def _accuracy_us(acc: Any) -> int:
    """Accuracy in microseconds; millis and micros are 1..999 when present (RFC 3161 §2.4.2)."""
    total = 0
    for name, scale, limit in (("seconds", 1_000_000, None), ("millis", 1000, 999), ("micros", 1, 999)):
        field = acc[name]
        if isinstance(field, core.Void):
            continue
        value = _int(field)
        if value < 0 or (limit is not None and not 1 <= value <= limit):
            raise ParseError(f"accuracy {name} {value} out of range")
        total += value * scale
    return total


def _bounded(seq: Any) -> Any:
    """A SET OF / SEQUENCE OF, refused when longer than :data:`MAX_ELEMENTS`."""
    if len(seq) > MAX_ELEMENTS:
        raise ParseError(f"more than {MAX_ELEMENTS} elements in one collection")
    return seq


def _check_encoding(data: bytes) -> None:
    """Refuse what asn1crypto would accept but DER forbids: indefinite or non-minimal lengths, constructed strings,
    trailing bytes (X.690 §10.1-10.2, SPEC CMS-11), and anything too big or too deep to be a token."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ParseError("expected bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise ParseError(f"larger than {MAX_MESSAGE_BYTES} bytes")
    end = _walk(bytes(data), 0, len(data), 0)
    if end != len(data):
        raise ParseError("trailing bytes after the DER value")


def _walk(data: bytes, pos: int, limit: int, depth: int) -> int:
    """Check one TLV at ``pos`` and everything nested in it; return the offset just past it."""
    if depth > MAX_DEPTH:
        raise ParseError("nesting too deep")
    if pos >= limit:
        raise ParseError("truncated: missing tag")
    ident = data[pos]
    pos += 1
    tag_number = ident & 0x1F
    if tag_number == 0x1F:
        tag_number = 0
        while True:
            if pos >= limit:
                raise ParseError("truncated tag")
            b = data[pos]
            pos += 1
            tag_number = (tag_number << 7) | (b & 0x7F)
            if not b & 0x80:
                break
            if tag_number > 0xFFFF:
                raise ParseError("tag number too large")
    if pos >= limit:
        raise ParseError("truncated: missing length")
    first = data[pos]
    pos += 1
    if first == 0x80:
        raise ParseError("indefinite length (BER, not DER; SPEC CMS-11)")
    if first < 0x80:
        size = first
    else:
        count = first & 0x7F
        if count > 4 or pos + count > limit:
            raise ParseError("bad length")
        raw = data[pos : pos + count]
        pos += count
        size = int.from_bytes(raw, "big")
        if raw[0] == 0 or size < 0x80:
            raise ParseError("length not minimally encoded (X.690 §10.1)")
    end = pos + size
    if end > limit:
        raise ParseError("truncated: value longer than its container")
    constructed = bool(ident & 0x20)
    if constructed:
        if ident & 0xC0 == 0 and tag_number not in _CONSTRUCTED_OK:
            raise ParseError("constructed string (BER, not DER)")
        while pos < end:
            pos = _walk(data, pos, end, depth + 1)
    return end
