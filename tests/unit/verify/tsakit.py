"""A deterministic test PKI and a hand-built time-stamp token, independent of stampd's own token encoder.

Tokens are assembled with asn1crypto so that the verifier is tested against an encoder it does not share code
with. Validity windows are fixed; nothing depends on the wall clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from asn1crypto import algos, cms, core, tsp
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

NOT_BEFORE = datetime(2024, 1, 1, tzinfo=UTC)
NOT_AFTER = datetime(2030, 1, 1, tzinfo=UTC)
GEN_TIME = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
POLICY = "1.3.6.1.4.1.99999.1"


def name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example TSA"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def new_key(kind: str) -> Any:
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind in ("rsa", "rsa-pss"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(kind)


def make_cert(
    subject: x509.Name,
    public_key: Any,
    issuer: x509.Name,
    issuer_key: Any,
    *,
    serial: int,
    ca: bool,
    not_before: datetime = NOT_BEFORE,
    not_after: datetime = NOT_AFTER,
    eku: list[x509.ObjectIdentifier] | None = None,
    eku_critical: bool = True,
    key_usage_critical: bool | None = True,
    private_key_usage_period: tuple[datetime | None, datetime | None] | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    if key_usage_critical is not None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=key_usage_critical,
        )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=eku_critical)
    if private_key_usage_period is not None:
        builder = builder.add_extension(
            x509.PrivateKeyUsagePeriod(not_before=private_key_usage_period[0], not_after=private_key_usage_period[1]),
            critical=False,
        )
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


@dataclass
class Pki:
    """Root -> issuing CA -> TSU, the TSU key of the given kind."""

    kind: str
    root_key: Any
    root: x509.Certificate
    ca_key: Any
    ca: x509.Certificate
    tsu_key: Any
    tsu: x509.Certificate

    def tsu_variant(self, **kwargs: Any) -> x509.Certificate:
        """Another TSU certificate for the same key, issued by the same CA, with different extensions."""
        args: dict[str, Any] = {"serial": 1000, "ca": False, "eku": [ExtendedKeyUsageOID.TIME_STAMPING]}
        args.update(kwargs)
        return make_cert(name("TSU"), self.tsu_key.public_key(), self.ca.subject, self.ca_key, **args)


def make_pki(kind: str = "ec") -> Pki:
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = make_cert(name("Root"), root_key.public_key(), name("Root"), root_key, serial=1, ca=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = make_cert(name("Issuing CA"), ca_key.public_key(), root.subject, root_key, serial=2, ca=True)
    tsu_key = new_key(kind)
    tsu = make_cert(
        name("TSU"),
        tsu_key.public_key(),
        ca.subject,
        ca_key,
        serial=3,
        ca=False,
        eku=[ExtendedKeyUsageOID.TIME_STAMPING],
    )
    return Pki(kind, root_key, root, ca_key, ca, tsu_key, tsu)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


_SIG_HASH = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}


@dataclass
class TokenSpec:
    """What to put into a hand-built token; the defaults give a valid ECDSA/SHA-256 token for b'hello'."""

    data: bytes = b"hello"
    imprint_hash: str = "sha256"
    gen_time: str = "20250601120000Z"
    nonce: int | None = 0x1234567890ABCDEF
    policy: str = POLICY
    serial: int = 0x0123456789
    accuracy: dict[str, int] | None = field(default_factory=lambda: {"seconds": 1})
    tsa: bool = True
    embed: list[x509.Certificate] | None = None
    """Certificates to embed; None embeds the TSU certificate only."""
    sid: str = "issuer"
    ess: str = "v2"
    """'v2', 'v1', 'none', 'wrong-hash' or 'wrong-serial'."""
    content_type: str = "1.2.840.113549.1.9.16.1.4"
    digest_alg: str | None = None
    """The SignerInfo digestAlgorithm; None chooses sha512 for Ed25519, sha256 otherwise."""
    tamper_econtent: bool = False
    tamper_signature: bool = False
    signer_cert: x509.Certificate | None = None
    """The certificate the sid and ESS name; None is the PKI's TSU certificate."""


def build_token(pki: Pki, spec: TokenSpec | None = None) -> bytes:
    """A DER ContentInfo(SignedData(TSTInfo)) signed with the PKI's TSU key (RFC 3161 §2.4.2, RFC 5652 §5)."""
    spec = spec or TokenSpec()
    cert = spec.signer_cert or pki.tsu
    imprint = hashlib.new(spec.imprint_hash, spec.data).digest()
    tst: dict[str, Any] = {
        "version": "v1",
        "policy": spec.policy,
        "message_imprint": {"hash_algorithm": {"algorithm": spec.imprint_hash}, "hashed_message": imprint},
        "serial_number": spec.serial,
        "gen_time": core.GeneralizedTime(contents=spec.gen_time.encode()),  # exactly as written
    }
    if spec.accuracy is not None:
        tst["accuracy"] = spec.accuracy
    if spec.nonce is not None:
        tst["nonce"] = spec.nonce
    if spec.tsa:
        tst["tsa"] = ax509.GeneralName(name="directory_name", value=ax509.Name.load(cert.subject.public_bytes()))
    econtent = tsp.TSTInfo(tst).dump()

    digest_alg = spec.digest_alg or ("sha512" if pki.kind == "ed25519" else "sha256")
    cert_der = der(cert)
    issuer_name = ax509.Name.load(cert.issuer.public_bytes())
    attrs: list[dict[str, Any]] = [
        {"type": "content_type", "values": [spec.content_type]},
        {"type": "message_digest", "values": [hashlib.new(digest_alg, econtent).digest()]},
    ]
    issuer_serial = {
        "issuer": [ax509.GeneralName(name="directory_name", value=issuer_name)],
        "serial_number": cert.serial_number + (1 if spec.ess == "wrong-serial" else 0),
    }
    if spec.ess in ("v2", "wrong-hash", "wrong-serial"):
        cert_hash = hashlib.sha256(cert_der).digest()
        if spec.ess == "wrong-hash":
            cert_hash = hashlib.sha256(cert_der + b"x").digest()
        attrs.append(
            {
                "type": "signing_certificate_v2",
                "values": [{"certs": [{"cert_hash": cert_hash, "issuer_serial": issuer_serial}]}],
            }
        )
    elif spec.ess == "v1":
        attrs.append(
            {
                "type": "signing_certificate",
                "values": [{"certs": [{"cert_hash": hashlib.sha1(cert_der).digest(), "issuer_serial": issuer_serial}]}],
            }
        )
    signed_attrs = cms.CMSAttributes(attrs)
    to_sign = signed_attrs.dump()
    signature, sig_alg = _sign(pki, to_sign, digest_alg)
    if spec.tamper_signature:
        signature = signature[:-1] + bytes([signature[-1] ^ 1])

    if spec.sid == "issuer":
        sid = cms.SignerIdentifier(
            name="issuer_and_serial_number",
            value={"issuer": issuer_name, "serial_number": cert.serial_number},
        )
        version = "v1"
    else:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        sid = cms.SignerIdentifier(name="subject_key_identifier", value=ski)
        version = "v3"
    signer_info = cms.SignerInfo(
        {
            "version": version,
            "sid": sid,
            "digest_algorithm": {"algorithm": digest_alg},
            "signed_attrs": signed_attrs,
            "signature_algorithm": sig_alg,
            "signature": signature,
        }
    )
    if spec.tamper_econtent:  # after the message digest was computed
        econtent = econtent[:-1] + bytes([econtent[-1] ^ 1])
    embed = [cert] if spec.embed is None else spec.embed
    signed_data: dict[str, Any] = {
        "version": "v3",
        "digest_algorithms": [{"algorithm": digest_alg}],
        "encap_content_info": {
            "content_type": "1.2.840.113549.1.9.16.1.4",
            "content": core.ParsableOctetString(econtent),
        },
        "signer_infos": [signer_info],
    }
    if embed:
        signed_data["certificates"] = [ax509.Certificate.load(der(c)) for c in embed]
    return cms.ContentInfo({"content_type": "signed_data", "content": cms.SignedData(signed_data)}).dump()


def build_response(token: bytes | None, status: int = 0, fail_info: set[str] | None = None) -> bytes:
    """A TimeStampResp around ``token`` (RFC 3161 §2.4.2)."""
    status_info: dict[str, Any] = {"status": status}
    if fail_info:
        status_info["fail_info"] = fail_info
    parts = tsp.PKIStatusInfo(status_info).dump()
    if token is not None:
        parts += token
    return b"\x30" + _length(len(parts)) + parts


def _sign(pki: Pki, message: bytes, digest_alg: str) -> tuple[bytes, dict[str, Any]]:
    key = pki.tsu_key
    h = _SIG_HASH[digest_alg]()
    if pki.kind == "ec":
        return key.sign(message, ec.ECDSA(h)), {"algorithm": f"{digest_alg}_ecdsa"}
    if pki.kind == "rsa":
        return key.sign(message, padding.PKCS1v15(), h), {"algorithm": f"{digest_alg}_rsa", "parameters": core.Null()}
    if pki.kind == "rsa-pss":
        salt = h.digest_size
        pss = padding.PSS(mgf=padding.MGF1(h), salt_length=salt)
        params = algos.RSASSAPSSParams(
            {
                "hash_algorithm": {"algorithm": digest_alg},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": digest_alg}},
                "salt_length": salt,
            }
        )
        return key.sign(message, pss, h), {"algorithm": "rsassa_pss", "parameters": params}
    return key.sign(message), {"algorithm": "ed25519"}


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def at(days: int) -> datetime:
    """GEN_TIME shifted by ``days``."""
    return GEN_TIME + timedelta(days=days)
