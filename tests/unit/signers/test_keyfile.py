"""Encrypted key files and FileSigner (SPEC ALG-01..04; keys encrypted at rest, files 0600)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest
from asn1crypto import algos
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from stampd.errors import PKIError, SigningError
from stampd.ports import Signer
from stampd.signers import (
    FileSigner,
    KeyType,
    PrivateKey,
    PublicKey,
    default_signature_hash,
    generate_private_key,
    load_encrypted_key,
    new_passphrase,
    read_passphrase_file,
    write_encrypted_key,
    write_passphrase_file,
)

PASSPHRASE = b"correct horse battery staple"
MESSAGE = b"DER of the signed attributes"
_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@pytest.fixture(scope="module")
def keys() -> dict[KeyType, PrivateKey]:
    """One key per type, generated once: RSA-4096 generation is slow."""
    return {key_type: generate_private_key(key_type) for key_type in KeyType}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def verify_per_identifier(public_key: PublicKey, identifier: bytes, signature: bytes, data: bytes) -> None:
    """Verify ``signature`` using only what the DER AlgorithmIdentifier says, as a relying party would."""
    algorithm = algos.SignedDigestAlgorithm.load(identifier, strict=True)
    name = algorithm["algorithm"].native
    if name == "ed25519":
        assert isinstance(public_key, ed25519.Ed25519PublicKey)
        assert algorithm["parameters"].native is None
        public_key.verify(signature, data)
    elif name == "rsassa_pss":
        params = algorithm["parameters"]
        hash_name = params["hash_algorithm"]["algorithm"].native
        assert params["mask_gen_algorithm"]["algorithm"].native == "mgf1"
        assert params["mask_gen_algorithm"]["parameters"]["algorithm"].native == hash_name
        assert isinstance(public_key, rsa.RSAPublicKey)
        h = _HASHES[hash_name]()
        pss = padding.PSS(mgf=padding.MGF1(h), salt_length=params["salt_length"].native)
        public_key.verify(signature, data, pss, h)
    elif name.endswith("_rsa"):
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(signature, data, padding.PKCS1v15(), _HASHES[algorithm.hash_algo]())
    elif name.endswith("_ecdsa"):
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        algos.DSASignature.load(signature, strict=True)  # a DER Ecdsa-Sig-Value (ALG-03)
        public_key.verify(signature, data, ec.ECDSA(_HASHES[algorithm.hash_algo]()))
    else:
        pytest.fail(f"unexpected signature algorithm {name}")


@pytest.mark.parametrize("key_type", list(KeyType))
def test_every_key_type_round_trips_and_signs_alg_01_03_04(
    key_type: KeyType, keys: dict[KeyType, PrivateKey], tmp_path: Path
) -> None:
    """Write encrypted, load, sign, verify against the AlgorithmIdentifier (ALG-01, ALG-03, ALG-04)."""
    path = tmp_path / "key.pem"
    write_encrypted_key(path, keys[key_type], PASSPHRASE)
    assert mode(path) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")

    loaded = load_encrypted_key(path, PASSPHRASE)
    assert loaded.public_key() == keys[key_type].public_key()
    signer = FileSigner(loaded, default_signature_hash(loaded))
    signature = signer.sign(MESSAGE)
    verify_per_identifier(signer.public_key, signer.signature_algorithm, signature, MESSAGE)


@pytest.mark.parametrize("key_type", [KeyType.RSA_2048, KeyType.RSA_4096])
@pytest.mark.parametrize("hash_name", ["sha256", "sha384", "sha512"])
def test_rsa_pss_explicit_params_match_the_hash_alg_02(
    key_type: KeyType, hash_name: str, keys: dict[KeyType, PrivateKey]
) -> None:
    """ALG-02: id-RSASSA-PSS with explicit params; hash = MGF1 hash = signing hash, salt = hash length."""
    signer = FileSigner(keys[key_type], hash_name, rsa_pss=True)
    params = algos.SignedDigestAlgorithm.load(signer.signature_algorithm, strict=True)["parameters"]
    assert params["hash_algorithm"]["algorithm"].native == hash_name
    assert params["mask_gen_algorithm"]["parameters"]["algorithm"].native == hash_name
    assert params["salt_length"].native == hashlib.new(hash_name).digest_size
    assert signer.digest_algorithm == hash_name
    verify_per_identifier(signer.public_key, signer.signature_algorithm, signer.sign(MESSAGE), MESSAGE)


def test_identifier_bytes_alg_01_03_04(keys: dict[KeyType, PrivateKey]) -> None:
    """The exact DER the SPEC lists: RSA with NULL params, ECDSA and Ed25519 with absent params."""
    rsa_signer = FileSigner(keys[KeyType.RSA_2048], "sha256")
    assert rsa_signer.signature_algorithm == bytes.fromhex("300D06092A864886F70D01010B0500")
    ec_signer = FileSigner(keys[KeyType.EC_P256], "sha256")
    assert ec_signer.signature_algorithm == bytes.fromhex("300A06082A8648CE3D040302")
    ed_signer = FileSigner(keys[KeyType.ED25519], "sha512")
    assert ed_signer.signature_algorithm == bytes.fromhex("300506032B6570")
    assert ed_signer.digest_algorithm == "sha512"


@pytest.mark.parametrize(
    ("key_type", "expected"),
    [
        (KeyType.EC_P256, "sha256"),
        (KeyType.EC_P384, "sha384"),
        (KeyType.RSA_2048, "sha256"),
        (KeyType.RSA_4096, "sha256"),
        (KeyType.ED25519, "sha512"),
    ],
)
def test_default_signature_hash_alg_04_05(key_type: KeyType, expected: str, keys: dict[KeyType, PrivateKey]) -> None:
    """The hash matches the key's strength; Ed25519 requires SHA-512 (RFC 8419, ALG-04)."""
    assert default_signature_hash(keys[key_type]) == expected
    assert default_signature_hash(keys[key_type].public_key()) == expected


def test_ecdsa_p384_signs_with_sha384_identifier_alg_03(keys: dict[KeyType, PrivateKey]) -> None:
    signer = FileSigner(keys[KeyType.EC_P384], "sha384")
    assert signer.signature_algorithm == bytes.fromhex("300A06082A8648CE3D040303")
    verify_per_identifier(signer.public_key, signer.signature_algorithm, signer.sign(MESSAGE), MESSAGE)


@pytest.mark.parametrize(
    ("key_type", "hash_name", "rsa_pss", "message"),
    [
        (KeyType.EC_P256, "sha256", True, "rsa_pss"),
        (KeyType.ED25519, "sha512", True, "rsa_pss"),
        (KeyType.ED25519, "sha256", False, "sha512"),
        (KeyType.EC_P384, "sha256", False, "weaker"),
        (KeyType.EC_P256, "sha1", False, "unsupported signature hash"),
        (KeyType.RSA_2048, "md5", False, "unsupported signature hash"),
        (KeyType.RSA_2048, "sha3-256", True, "unsupported signature hash"),
    ],
)
def test_invalid_combinations_are_refused_alg_02_04(
    key_type: KeyType, hash_name: str, rsa_pss: bool, message: str, keys: dict[KeyType, PrivateKey]
) -> None:
    with pytest.raises(PKIError, match=message):
        FileSigner(keys[key_type], hash_name, rsa_pss=rsa_pss)


def test_short_rsa_key_is_refused() -> None:
    with pytest.raises(PKIError, match="too short"):
        FileSigner(rsa.generate_private_key(65537, 1024), "sha256")


def test_file_signer_is_a_signer(keys: dict[KeyType, PrivateKey]) -> None:
    signer: Signer = FileSigner(keys[KeyType.EC_P256], "sha256")
    assert signer.digest_algorithm == "sha256"


def test_sign_failures_become_signing_error(keys: dict[KeyType, PrivateKey]) -> None:
    signer = FileSigner(keys[KeyType.EC_P256], "sha256")
    with pytest.raises(SigningError):
        signer.sign("not bytes")  # type: ignore[arg-type]


def test_wrong_passphrase_is_pki_error(keys: dict[KeyType, PrivateKey], tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    write_encrypted_key(path, keys[KeyType.EC_P256], PASSPHRASE)
    with pytest.raises(PKIError, match="wrong passphrase") as excinfo:
        load_encrypted_key(path, b"not the passphrase")
    assert "not the passphrase" not in str(excinfo.value)


def test_missing_key_file_is_pki_error(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="not found"):
        load_encrypted_key(tmp_path / "absent.pem", PASSPHRASE)


@pytest.mark.parametrize("fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL])
def test_unencrypted_key_is_refused(
    fmt: serialization.PrivateFormat, keys: dict[KeyType, PrivateKey], tmp_path: Path
) -> None:
    path = tmp_path / "plain.pem"
    key = keys[KeyType.EC_P256]
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption()))
    with pytest.raises(PKIError, match="not an encrypted PKCS#8 key"):
        load_encrypted_key(path, PASSPHRASE)


def test_not_a_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "junk.pem"
    path.write_bytes(b"hello")
    with pytest.raises(PKIError, match="does not hold a PEM private key"):
        load_encrypted_key(path, PASSPHRASE)


def test_refuses_to_overwrite_unless_told(keys: dict[KeyType, PrivateKey], tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(b"existing")
    path.chmod(0o644)
    with pytest.raises(PKIError, match="already exists"):
        write_encrypted_key(path, keys[KeyType.EC_P256], PASSPHRASE)
    assert path.read_bytes() == b"existing"

    write_encrypted_key(path, keys[KeyType.EC_P256], PASSPHRASE, overwrite=True)
    assert mode(path) == 0o600  # a new file, not the old one with its looser mode
    assert load_encrypted_key(path, PASSPHRASE).public_key() == keys[KeyType.EC_P256].public_key()


def test_mode_is_0600_even_with_a_permissive_umask(keys: dict[KeyType, PrivateKey], tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        write_encrypted_key(tmp_path / "key.pem", keys[KeyType.ED25519], PASSPHRASE)
        write_passphrase_file(tmp_path / "pass", PASSPHRASE)
    finally:
        os.umask(old)
    assert mode(tmp_path / "key.pem") == 0o600
    assert mode(tmp_path / "pass") == 0o600


def test_key_without_passphrase_is_refused(keys: dict[KeyType, PrivateKey], tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="without a passphrase"):
        write_encrypted_key(tmp_path / "key.pem", keys[KeyType.EC_P256], b"")
    assert not (tmp_path / "key.pem").exists()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"secret", b"secret"),
        (b"secret\n", b"secret"),
        (b"secret\r\n", b"secret"),
        (b"secret\n\n", b"secret\n"),
        (b" secret \n", b" secret "),
    ],
)
def test_read_passphrase_file_strips_one_newline(content: bytes, expected: bytes, tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_bytes(content)
    assert read_passphrase_file(path) == expected


@pytest.mark.parametrize("content", [b"", b"\n"])
def test_empty_passphrase_file_is_refused(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "pass"
    path.write_bytes(content)
    with pytest.raises(PKIError, match="empty"):
        read_passphrase_file(path)


def test_missing_passphrase_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="not found"):
        read_passphrase_file(tmp_path / "absent")


def test_passphrase_file_round_trip(tmp_path: Path) -> None:
    passphrase = new_passphrase()
    write_passphrase_file(tmp_path / "pass", passphrase)
    assert mode(tmp_path / "pass") == 0o600
    assert read_passphrase_file(tmp_path / "pass") == passphrase


def test_new_passphrase_is_random_and_printable() -> None:
    first, second = new_passphrase(), new_passphrase()
    assert first != second
    assert len(first) >= 32
    assert first.decode("ascii").isprintable()
    assert b"\n" not in first
