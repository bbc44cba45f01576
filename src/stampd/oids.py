"""Object identifiers, by the name their RFC gives them."""

from __future__ import annotations

from dataclasses import dataclass


class ContentTypes:
    DATA = "1.2.840.113549.1.7.1"
    SIGNED_DATA = "1.2.840.113549.1.7.2"
    TST_INFO = "1.2.840.113549.1.9.16.1.4"


class Attributes:
    CONTENT_TYPE = "1.2.840.113549.1.9.3"
    MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
    SIGNING_TIME = "1.2.840.113549.1.9.5"
    SIGNING_CERTIFICATE = "1.2.840.113549.1.9.16.2.12"
    SIGNING_CERTIFICATE_V2 = "1.2.840.113549.1.9.16.2.47"


class SignatureAlgorithms:
    RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
    SHA256_WITH_RSA = "1.2.840.113549.1.1.11"
    SHA384_WITH_RSA = "1.2.840.113549.1.1.12"
    SHA512_WITH_RSA = "1.2.840.113549.1.1.13"
    RSASSA_PSS = "1.2.840.113549.1.1.10"
    MGF1 = "1.2.840.113549.1.1.8"
    ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2"
    ECDSA_WITH_SHA384 = "1.2.840.10045.4.3.3"
    ECDSA_WITH_SHA512 = "1.2.840.10045.4.3.4"
    ED25519 = "1.3.101.112"


class ExtendedKeyUsages:
    TIME_STAMPING = "1.3.6.1.5.5.7.3.8"


class Extensions:
    PRIVATE_KEY_USAGE_PERIOD = "2.5.29.16"


class Policies:
    ETSI_BASELINE = "0.4.0.2023.1.1"
    """ETSI EN 319 421 best-practices time-stamp policy (BTSP)."""


@dataclass(frozen=True, slots=True)
class HashAlgorithm:
    """A digest algorithm a request's messageImprint may use (RFC 5754, FIPS 202)."""

    name: str
    oid: str
    digest_size: int


SHA1 = HashAlgorithm("sha1", "1.3.14.3.2.26", 20)
SHA224 = HashAlgorithm("sha224", "2.16.840.1.101.3.4.2.4", 28)
SHA256 = HashAlgorithm("sha256", "2.16.840.1.101.3.4.2.1", 32)
SHA384 = HashAlgorithm("sha384", "2.16.840.1.101.3.4.2.2", 48)
SHA512 = HashAlgorithm("sha512", "2.16.840.1.101.3.4.2.3", 64)
SHA3_256 = HashAlgorithm("sha3-256", "2.16.840.1.101.3.4.2.8", 32)
SHA3_384 = HashAlgorithm("sha3-384", "2.16.840.1.101.3.4.2.9", 48)
SHA3_512 = HashAlgorithm("sha3-512", "2.16.840.1.101.3.4.2.10", 64)

HASH_ALGORITHMS: tuple[HashAlgorithm, ...] = (SHA1, SHA224, SHA256, SHA384, SHA512, SHA3_256, SHA3_384, SHA3_512)
HASH_BY_OID: dict[str, HashAlgorithm] = {h.oid: h for h in HASH_ALGORITHMS}
HASH_BY_NAME: dict[str, HashAlgorithm] = {h.name: h for h in HASH_ALGORITHMS}

DEFAULT_IMPRINT_HASHES: tuple[str, ...] = ("sha256", "sha384", "sha512")
"""Imprint hashes accepted when the configuration does not say (SHA-1 only when enabled, SPEC REQ-03)."""
