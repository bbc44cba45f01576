"""Private keys held in encrypted PKCS#8 files, and the signer that uses them.

Keys never touch the disk unencrypted, and every file that holds a key or a passphrase is created with mode
0600 (never narrowed afterwards), so that there is no moment when another user could read it.
"""

from __future__ import annotations

import enum
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from stampd.der.algorithms import (
    ecdsa_identifier,
    ed25519_identifier,
    rsa_pkcs1_identifier,
    rsa_pss_identifier,
)
from stampd.errors import PKIError, SigningError

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

SECRET_FILE_MODE = 0o600
SECRET_DIR_MODE = 0o700
MIN_RSA_BITS = 2048

_ENCRYPTED_PEM_LABEL = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"

SIGNATURE_HASHES: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
"""Hashes a signature over the signed attributes may use (RFC 5754 §3); weaker ones are not offered."""

_CURVE_HASH = {"secp256r1": "sha256", "secp384r1": "sha384"}
"""The hash each supported curve is paired with (RFC 5480 §4, NIST SP 800-57 security strengths)."""


class KeyType(enum.StrEnum):
    """Key types `stampd init` can generate; the value is what the command line and configuration spell."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"
    ED25519 = "ed25519"

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa-")


DEFAULT_KEY_TYPE = KeyType.EC_P256


def generate_private_key(key_type: KeyType) -> PrivateKey:
    """A fresh key of ``key_type`` (RSA with public exponent 65537, the only one every verifier accepts)."""
    match key_type:
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.ED25519:
            return ed25519.Ed25519PrivateKey.generate()
        case KeyType.RSA_2048 | KeyType.RSA_3072 | KeyType.RSA_4096:
            return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type.value[4:]))
    raise PKIError(f"unsupported key type: {key_type!r}")


def default_signature_hash(key: PrivateKey | CertificatePublicKeyTypes) -> str:
    """The hash matching the key's strength; Ed25519 needs SHA-512 with signed attributes (RFC 8419 §3.1)."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "sha512"
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "sha256"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        try:
            return _CURVE_HASH[key.curve.name]
        except KeyError:
            raise PKIError(f"unsupported elliptic curve {key.curve.name}; use P-256 or P-384") from None
    raise PKIError(f"unsupported key type {type(key).__name__}")


def _create_exclusive(path: Path, mode: int, *, overwrite: bool) -> int:
    """A new file created with ``mode`` from the start; an existing one is removed first only if allowed."""
    try:
        if overwrite:
            path.unlink(missing_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), mode)
    except FileExistsError:
        raise PKIError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise PKIError(f"cannot create {path}: {e.strerror}") from e


def write_new_file(path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = False) -> None:
    """Write ``data`` to a file created with ``mode``, so it has its permissions before it holds anything."""
    fd = _create_exclusive(path, mode, overwrite=overwrite)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_encrypted_key(path: Path, key: PrivateKey, passphrase: bytes, *, overwrite: bool = False) -> None:
    """Store ``key`` as encrypted PKCS#8 PEM in a file that is 0600 from its creation."""
    if not passphrase:
        raise PKIError("refusing to write a private key without a passphrase")
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    write_new_file(path, pem, mode=SECRET_FILE_MODE, overwrite=overwrite)


def load_encrypted_key(path: Path, passphrase: bytes) -> PrivateKey:
    """Load an encrypted PKCS#8 PEM key; unencrypted and legacy-encrypted keys are refused (never at rest)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"private key file {path} not found") from None
    except OSError as e:
        raise PKIError(f"cannot read private key file {path}: {e.strerror}") from e
    if _ENCRYPTED_PEM_LABEL not in data:
        if b"PRIVATE KEY-----" in data:
            raise PKIError(
                f"{path} is not an encrypted PKCS#8 key; stampd refuses unencrypted and legacy-encrypted "
                "keys (convert it with `openssl pkcs8 -topk8 -v2 aes-256-cbc`)"
            )
        raise PKIError(f"{path} does not hold a PEM private key")
    if not passphrase:
        raise PKIError(f"no passphrase given for the encrypted key {path}")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError) as e:
        raise PKIError(f"cannot decrypt {path}: wrong passphrase or damaged key file") from e
    except Exception as e:
        raise PKIError(f"cannot load the private key {path}: {type(e).__name__}") from e
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise PKIError(f"{path} holds a {type(key).__name__}; stampd signs with RSA, ECDSA or Ed25519 keys")
    return key


def read_passphrase_file(path: Path) -> bytes:
    """The passphrase in ``path`` without the one trailing newline an editor or `echo` adds."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"passphrase file {path} not found") from None
    except OSError as e:
        raise PKIError(f"cannot read passphrase file {path}: {e.strerror}") from e
    if data.endswith(b"\r\n"):
        data = data[:-2]
    elif data.endswith(b"\n"):
        data = data[:-1]
    if not data:
        raise PKIError(f"passphrase file {path} is empty")
    return data


def write_passphrase_file(path: Path, passphrase: bytes, *, overwrite: bool = False) -> None:
    """Store a passphrase, newline-terminated, in a file that is 0600 from its creation."""
    write_new_file(path, passphrase + b"\n", mode=SECRET_FILE_MODE, overwrite=overwrite)


def new_passphrase() -> bytes:
    """256 random bits as printable URL-safe base64, so the file can be typed or pasted without escaping."""
    return secrets.token_urlsafe(32).encode("ascii")


class FileSigner:
    """A :class:`stampd.ports.Signer` over an in-memory private key.

    Every algorithm decision is made here, once, so that :meth:`sign` (called for every token) does no more
    than the signature itself. RSA uses PKCS#1 v1.5 unless ``rsa_pss`` (RFC 4056: salt = hash length, MGF1
    with the same hash); ECDSA uses the configured hash, at least as long as the curve's order; Ed25519 signs
    the message itself and requires SHA-512 for the message digest (RFC 8419 §3.1).
    """

    __slots__ = ("_hash_name", "_key", "_sign", "_signature_algorithm")

    def __init__(self, key: PrivateKey, hash_name: str, *, rsa_pss: bool = False) -> None:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            self._signature_algorithm, self._sign = _ed25519_signer(key, hash_name, rsa_pss)
        elif isinstance(key, rsa.RSAPrivateKey):
            self._signature_algorithm, self._sign = _rsa_signer(key, hash_name, rsa_pss)
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            self._signature_algorithm, self._sign = _ecdsa_signer(key, hash_name, rsa_pss)
        else:
            raise PKIError(f"unsupported private key type {type(key).__name__}")
        self._key = key
        self._hash_name = hash_name

    @property
    def digest_algorithm(self) -> str:
        """Hash name of the message digest and of the signature (SPEC ALG-02, ALG-04)."""
        return self._hash_name

    @property
    def signature_algorithm(self) -> bytes:
        """DER AlgorithmIdentifier for SignerInfo.signatureAlgorithm (SPEC ALG-01..04)."""
        return self._signature_algorithm

    @property
    def public_key(self) -> PublicKey:
        return self._key.public_key()

    def close(self) -> None:
        """Nothing to release: the key lives in this process's memory."""

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` (the DER of the signed attributes); any failure becomes a :class:`SigningError`."""
        try:
            return self._sign(data)
        except Exception as e:
            raise SigningError(f"signing failed: {type(e).__name__}") from e


_SignFunction = Callable[[bytes], bytes]


def _signature_hash(hash_name: str) -> hashes.HashAlgorithm:
    try:
        return SIGNATURE_HASHES[hash_name]()
    except KeyError:
        choices = ", ".join(SIGNATURE_HASHES)
        raise PKIError(f"unsupported signature hash {hash_name!r}; choose one of {choices}") from None


def _ed25519_signer(key: ed25519.Ed25519PrivateKey, hash_name: str, rsa_pss: bool) -> tuple[bytes, _SignFunction]:
    """PureEdDSA over the signed attributes, with SHA-512 as the digest algorithm (RFC 8419 §3.1, ALG-04)."""
    if rsa_pss:
        raise PKIError("rsa_pss is set but the key is Ed25519")
    if hash_name != "sha512":
        raise PKIError(f"an Ed25519 key requires signature_hash sha512 (RFC 8419), not {hash_name!r}")
    return ed25519_identifier(), key.sign


def _rsa_signer(key: rsa.RSAPrivateKey, hash_name: str, rsa_pss: bool) -> tuple[bytes, _SignFunction]:
    """PKCS#1 v1.5 (ALG-01) or RSASSA-PSS with salt = hash length and MGF1 of the same hash (ALG-02)."""
    if key.key_size < MIN_RSA_BITS:
        raise PKIError(f"an RSA key of {key.key_size} bits is too short; use {MIN_RSA_BITS} bits or more")
    algorithm = _signature_hash(hash_name)
    pad: padding.AsymmetricPadding
    if rsa_pss:
        pad = padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
        identifier = rsa_pss_identifier(hash_name)
    else:
        pad = padding.PKCS1v15()
        identifier = rsa_pkcs1_identifier(hash_name)
    return identifier, lambda data: key.sign(data, pad, algorithm)


def _ecdsa_signer(key: ec.EllipticCurvePrivateKey, hash_name: str, rsa_pss: bool) -> tuple[bytes, _SignFunction]:
    """ECDSA with a DER Ecdsa-Sig-Value; a hash shorter than the curve would waste its strength (ALG-03)."""
    if rsa_pss:
        raise PKIError("rsa_pss is set but the key is an elliptic-curve key")
    algorithm = _signature_hash(hash_name)
    curve_hash = default_signature_hash(key)
    if algorithm.digest_size < SIGNATURE_HASHES[curve_hash]().digest_size:
        raise PKIError(f"signature_hash {hash_name} is weaker than the {key.curve.name} key; use {curve_hash}")
    ecdsa = ec.ECDSA(algorithm)
    return ecdsa_identifier(hash_name), lambda data: key.sign(data, ecdsa)
