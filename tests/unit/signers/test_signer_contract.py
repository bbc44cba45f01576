"""The contract every key backend keeps: what a KMS or another HSM backend must pass to stand beside the file and
PKCS#11 signers (stampd.signers.backends.KeySigner, stampd.ports.Signer).

1. ``signature_algorithm`` is the DER AlgorithmIdentifier of what ``sign`` produces, and ``digest_algorithm`` the
   hash of the message-digest attribute (RFC 5652 §5.3, RFC 5754, RFC 8419).
2. ``sign(data)`` returns a signature over ``data`` that verifies with ``public_key`` under that algorithm.
3. Any failure while signing is a :class:`stampd.errors.SigningError` (systemFailure, SPEC STS-06).
4. ``close`` releases the key and may be called twice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from asn1crypto import algos
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from stampd.errors import SigningError
from stampd.oids import HASH_BY_OID, SignatureAlgorithms
from stampd.signers.backends import KeySigner
from stampd.signers.keyfile import FileSigner, KeyType, default_signature_hash, generate_private_key
from stampd.signers.pkcs11 import Pkcs11Signer, destroy_key, generate_key

sys.path.insert(0, str(Path(__file__).parents[2]))

from hsm import TOKEN_SCRATCH, SoftHsm, softhsm  # noqa: F401

HASHES = {"sha256": hashes.SHA256, "sha384": hashes.SHA384, "sha512": hashes.SHA512}
KINDS = [KeyType.EC_P256, KeyType.RSA_2048, KeyType.ED25519]


def file_backend(kind: KeyType, rsa_pss: bool, _hsm: SoftHsm) -> Iterator[KeySigner]:
    key = generate_private_key(kind)
    yield FileSigner(key, default_signature_hash(key), rsa_pss=rsa_pss)


def pkcs11_backend(kind: KeyType, rsa_pss: bool, hsm: SoftHsm) -> Iterator[KeySigner]:
    label = f"contract-{kind.value}-{'pss' if rsa_pss else 'v15'}"
    pin = hsm.tokens[TOKEN_SCRATCH].encode()
    generate_key(module=hsm.module, token_label=TOKEN_SCRATCH, key_label=label, pin=pin, key_type=kind)
    signer = Pkcs11Signer.open(
        module=hsm.module, token_label=TOKEN_SCRATCH, key_label=label, pin=pin, hash_name=None, rsa_pss=rsa_pss,
        sessions=2,
    )  # fmt: skip
    try:
        yield signer
    finally:
        signer.close()
        destroy_key(module=hsm.module, token_label=TOKEN_SCRATCH, key_label=label, pin=pin)


BACKENDS: dict[str, Callable[[KeyType, bool, SoftHsm], Iterator[KeySigner]]] = {
    "file": file_backend,
    "pkcs11": pkcs11_backend,
}
CASES = [(b, k, False) for b in BACKENDS for k in KINDS] + [(b, KeyType.RSA_2048, True) for b in BACKENDS]


@pytest.fixture(params=CASES, ids=lambda c: f"{c[0]}-{c[1].value}{'-pss' if c[2] else ''}")
def signer(request: pytest.FixtureRequest, softhsm: SoftHsm) -> Iterator[KeySigner]:  # noqa: F811
    backend, kind, rsa_pss = request.param
    yield from BACKENDS[backend](kind, rsa_pss, softhsm)


def verify_as_named(signer: KeySigner, data: bytes, signature: bytes) -> None:
    """Verify ``signature`` using only what the AlgorithmIdentifier says (clause 1 and 2 of the contract)."""
    identifier = algos.SignedDigestAlgorithm.load(signer.signature_algorithm)
    oid = identifier["algorithm"].dotted
    key = signer.public_key
    if oid == SignatureAlgorithms.ED25519:
        assert isinstance(key, ed25519.Ed25519PublicKey) and signer.digest_algorithm == "sha512"
        key.verify(signature, data)
        return
    if oid == SignatureAlgorithms.RSASSA_PSS:
        params = identifier["parameters"]
        hash_name = HASH_BY_OID[params["hash_algorithm"]["algorithm"].dotted].name
        assert isinstance(key, rsa.RSAPublicKey)
        pss = padding.PSS(padding.MGF1(HASHES[hash_name]()), params["salt_length"].native)
        key.verify(signature, data, pss, HASHES[hash_name]())
        assert hash_name == signer.digest_algorithm
        return
    hash_name = identifier.hash_algo
    assert hash_name == signer.digest_algorithm
    if isinstance(key, rsa.RSAPublicKey):
        assert identifier["parameters"].native is None and identifier.dump().endswith(b"\x05\x00")  # ALG-01: NULL
        key.verify(signature, data, padding.PKCS1v15(), HASHES[hash_name]())
    else:
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert identifier.contents == identifier["algorithm"].dump()  # ALG-03: parameters absent, not NULL
        key.verify(signature, data, ec.ECDSA(HASHES[hash_name]()))


def test_signature_verifies_under_the_named_algorithm(signer: KeySigner) -> None:
    data = b"\x31\x03\x02\x01\x01" * 40
    verify_as_named(signer, data, signer.sign(data))


def test_failure_is_a_signing_error_and_close_is_idempotent(signer: KeySigner) -> None:
    signer.close()
    signer.close()
    if isinstance(signer, FileSigner):
        return  # an in-memory key stays usable: nothing to release
    with pytest.raises(SigningError):
        signer.sign(b"after close")
