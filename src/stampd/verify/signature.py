"""The SignerInfo signature over the DER signedAttrs SET (RFC 5652 §5.4), per algorithm:
RSA PKCS#1 v1.5 (RFC 5754 §3.2), RSASSA-PSS (RFC 4056 §3), ECDSA (RFC 5753, RFC 5754 §3.3), Ed25519 (RFC 8419)."""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from stampd.der.token_reader import SignerInfo, read_pss_params
from stampd.errors import ParseError
from stampd.oids import HASH_BY_OID, SHA512, SignatureAlgorithms

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
    "sha3-256": hashes.SHA3_256,
    "sha3-384": hashes.SHA3_384,
    "sha3-512": hashes.SHA3_512,
}
_RSA_PKCS1 = {
    SignatureAlgorithms.SHA256_WITH_RSA: "sha256",
    SignatureAlgorithms.SHA384_WITH_RSA: "sha384",
    SignatureAlgorithms.SHA512_WITH_RSA: "sha512",
}
_ECDSA = {
    SignatureAlgorithms.ECDSA_WITH_SHA256: "sha256",
    SignatureAlgorithms.ECDSA_WITH_SHA384: "sha384",
    SignatureAlgorithms.ECDSA_WITH_SHA512: "sha512",
}
_NULL = b"\x05\x00"


def hash_for(oid: str) -> hashes.HashAlgorithm | None:
    """The cryptography hash for a digest OID, None when stampd does not know it."""
    known = HASH_BY_OID.get(oid)
    factory = _HASHES.get(known.name) if known else None
    return factory() if factory else None


def hash_data(oid: str, data: bytes) -> bytes | None:
    """``data`` hashed with the algorithm ``oid`` names, None when unknown."""
    algorithm = hash_for(oid)
    if algorithm is None:
        return None
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize()


def check_signature(cert: x509.Certificate, signer: SignerInfo) -> tuple[bool, str]:
    """Whether the signature verifies with ``cert``'s key, and a sentence saying what was checked or why not."""
    if not signer.signed_attrs_der:
        return False, "no signedAttrs: RFC 3161 §2.4.2 requires them (ESS signing-certificate)"
    try:
        key = cert.public_key()
        return _verify(key, signer)
    except InvalidSignature:
        return False, "the signature does not verify over the signedAttrs SET (RFC 5652 §5.4)"
    except ParseError as e:
        return False, str(e)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        return False, f"the signature cannot be checked: {e}"


def _verify(key: object, si: SignerInfo) -> tuple[bool, str]:
    alg = si.signature_algorithm
    message = si.signed_attrs_der
    if alg == SignatureAlgorithms.RSA_ENCRYPTION or alg in _RSA_PKCS1:
        name = _RSA_PKCS1.get(alg) or (
            HASH_BY_OID[si.digest_algorithm].name if si.digest_algorithm in HASH_BY_OID else ""
        )
        algorithm = _HASHES.get(name)
        if algorithm is None:
            return False, f"unsupported hash {si.digest_algorithm} for RSA"
        if si.signature_params not in (None, _NULL):
            return False, "RSA PKCS#1 v1.5 parameters must be NULL (SPEC ALG-01)"
        if not isinstance(key, rsa.RSAPublicKey):
            return False, "RSA signature but the certificate key is not RSA"
        key.verify(si.signature, message, padding.PKCS1v15(), algorithm())
        return True, f"RSA PKCS#1 v1.5 with {name.upper()} verifies"
    if alg == SignatureAlgorithms.RSASSA_PSS:
        return _verify_pss(key, si)
    if alg in _ECDSA:
        name = _ECDSA[alg]
        if si.signature_params is not None:
            return False, "ECDSA parameters must be absent (SPEC ALG-03)"
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False, "ECDSA signature but the certificate key is not EC"
        key.verify(si.signature, message, ec.ECDSA(_HASHES[name]()))
        return True, f"ECDSA ({key.curve.name}) with {name.upper()} verifies"
    if alg == SignatureAlgorithms.ED25519:
        if si.signature_params is not None:
            return False, "id-Ed25519 parameters must be absent (RFC 8419 §2.3)"
        if si.digest_algorithm != SHA512.oid:
            return False, "Ed25519 with signedAttrs needs digestAlgorithm id-sha512 (RFC 8419 §3.1, SPEC ALG-04)"
        if not isinstance(key, ed25519.Ed25519PublicKey):
            return False, "Ed25519 signature but the certificate key is not Ed25519"
        key.verify(si.signature, message)
        return True, "Ed25519 verifies"
    return False, f"unsupported signature algorithm {alg}"


def _verify_pss(key: object, si: SignerInfo) -> tuple[bool, str]:
    """RSASSA-PSS with explicit parameters whose hash is the signer's digest algorithm (RFC 4056 §3, ALG-02)."""
    params = read_pss_params(si.signature_params)
    algorithm = hash_for(params.hash_oid)
    mgf_hash = hash_for(params.mgf_hash_oid) if params.mgf_hash_oid else None
    if algorithm is None or mgf_hash is None or params.mgf_oid != SignatureAlgorithms.MGF1:
        return False, "unsupported RSASSA-PSS hash or mask generation function"
    if params.hash_oid != si.digest_algorithm:
        return False, "RSASSA-PSS hash differs from the SignerInfo digestAlgorithm (SPEC ALG-02)"
    if params.trailer_field != 1:
        return False, f"RSASSA-PSS trailerField {params.trailer_field} (RFC 4056 §3 allows only 1)"
    if not isinstance(key, rsa.RSAPublicKey):
        return False, "RSASSA-PSS signature but the certificate key is not RSA"
    pss = padding.PSS(mgf=padding.MGF1(mgf_hash), salt_length=params.salt_length)
    key.verify(si.signature, si.signed_attrs_der, pss, algorithm)
    return True, f"RSASSA-PSS with {algorithm.name.upper()}, salt {params.salt_length} verifies"
