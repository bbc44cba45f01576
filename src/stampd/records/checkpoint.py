"""Checkpoints: the heads of a serving process's chains, signed with a key kept for that purpose alone, so that a
chain rewritten from some entry onwards, or cut short, no longer reaches what was signed.

The signed bytes are the canonical JSON (sorted keys, no spaces) of
``{"at_us": ..., "heads": {"events": {CHAIN: [SEQ, HASH]}, "tokens": {...}}, "type": "stampd-checkpoint-v1"}``;
the ``checkpoints`` table keeps ``at_us``, the heads as that JSON, the signature and the SHA-256 of the signer's
SubjectPublicKeyInfo. Ed25519 is recommended; ECDSA (P-256 with SHA-256, P-384 with SHA-384) and RSA (PKCS#1 v1.5
with SHA-256) keys are accepted too.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

CHECKPOINT_TYPE = "stampd-checkpoint-v1"

Heads = dict[str, dict[str, list[Any]]]
"""table ("tokens", "events") -> chain id -> [seq, entry_hash hex]."""


def heads_json(heads: Heads) -> str:
    return json.dumps(heads, sort_keys=True, separators=(",", ":"))


def signed_bytes(at_us: int, heads: Heads) -> bytes:
    """What a checkpoint's signature covers."""
    document = {"at_us": at_us, "heads": heads, "type": CHECKPOINT_TYPE}
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode("ascii")


def spki_sha256(key: PublicKey) -> str:
    """Hex SHA-256 of the DER SubjectPublicKeyInfo: names the key that signed a checkpoint."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def _ec_hash(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()


class CheckpointSigner:
    """Signs checkpoints with a private key loaded (and decrypted) once at start-up."""

    def __init__(self, key: PrivateKey) -> None:
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise TypeError(f"unsupported checkpoint key {type(key).__name__}")
        self._key = key
        self.key_id = spki_sha256(key.public_key())

    def sign(self, data: bytes) -> bytes:
        key = self._key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key.sign(data)
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(_ec_hash(key)))
        return key.sign(data, padding.PKCS1v15(), hashes.SHA256())


def signature_valid(key: PublicKey, data: bytes, signature: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(_ec_hash(key)))
        else:
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def load_public_key(pem: bytes) -> PublicKey:
    """A PEM public key (SubjectPublicKeyInfo), or the public key of a PEM certificate; ValueError otherwise."""
    if b"-----BEGIN CERTIFICATE-----" in pem:
        key: Any = x509.load_pem_x509_certificate(pem).public_key()
    else:
        key = serialization.load_pem_public_key(pem)
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise ValueError(f"unsupported checkpoint key type {type(key).__name__}")
    return key


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One stored checkpoint, as read back."""

    id: int
    at_us: int
    heads: str
    signature: bytes
    signer: str

    def parsed_heads(self) -> Heads:
        value = json.loads(self.heads)
        if not isinstance(value, dict):
            raise ValueError("the heads are not a JSON object")
        return value
