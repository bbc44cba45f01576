"""DER AlgorithmIdentifiers for signatures and digests (RFC 5754, RFC 4056, RFC 8419)."""

from __future__ import annotations

from stampd.der.encoding import NULL_VALUE, algorithm_identifier, integer, sequence, tlv
from stampd.oids import HASH_BY_NAME, SignatureAlgorithms

_RSA_PKCS1 = {
    "sha256": SignatureAlgorithms.SHA256_WITH_RSA,
    "sha384": SignatureAlgorithms.SHA384_WITH_RSA,
    "sha512": SignatureAlgorithms.SHA512_WITH_RSA,
}
_ECDSA = {
    "sha256": SignatureAlgorithms.ECDSA_WITH_SHA256,
    "sha384": SignatureAlgorithms.ECDSA_WITH_SHA384,
    "sha512": SignatureAlgorithms.ECDSA_WITH_SHA512,
}


def digest_algorithm_identifier(hash_name: str) -> bytes:
    """SHA-2/SHA-3 identifier with absent parameters (RFC 5754 §2, SPEC CMS-06)."""
    return algorithm_identifier(HASH_BY_NAME[hash_name].oid)


def rsa_pkcs1_identifier(hash_name: str) -> bytes:
    """shaNNNWithRSAEncryption with NULL parameters (RFC 5754 §3.2, SPEC ALG-01)."""
    return algorithm_identifier(_RSA_PKCS1[hash_name], NULL_VALUE)


def ecdsa_identifier(hash_name: str) -> bytes:
    """ecdsa-with-SHAnnn with absent parameters (RFC 5754 §3.3, SPEC ALG-03)."""
    return algorithm_identifier(_ECDSA[hash_name])


def ed25519_identifier() -> bytes:
    """id-Ed25519 without parameters (RFC 8419 §2.3, SPEC ALG-04)."""
    return algorithm_identifier(SignatureAlgorithms.ED25519)


def rsa_pss_identifier(hash_name: str) -> bytes:
    """id-RSASSA-PSS with explicit parameters: hash, MGF1 with the same hash, salt = hash length (RFC 4056 §3)."""
    hash_id = digest_algorithm_identifier(hash_name)
    params = sequence(
        tlv(0xA0, hash_id),
        tlv(0xA1, algorithm_identifier(SignatureAlgorithms.MGF1, hash_id)),
        tlv(0xA2, integer(HASH_BY_NAME[hash_name].digest_size)),
    )
    return algorithm_identifier(SignatureAlgorithms.RSASSA_PSS, params)
