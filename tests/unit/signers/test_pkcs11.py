"""Pkcs11Signer, generate_key and destroy_key against a private SoftHSM2 (SPEC OPS-07, ALG-01..04, STS-06).

Every key is generated inside the token; signatures are verified with cryptography using only what the DER
AlgorithmIdentifier says, and the identifiers are compared byte for byte with FileSigner's.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import algos
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pkcs11 import Attribute, ObjectClass

from stampd.der.request import encode_message_imprint
from stampd.der.token import GenTimeFormatter, TokenFields, TokenTemplate
from stampd.errors import PKIError, SigningError
from stampd.model import MessageImprint
from stampd.oids import SHA256
from stampd.ports import Signer
from stampd.signers import FileSigner, KeyType, generate_private_key
from stampd.signers.backends import KeySigner
from stampd.signers.pkcs11 import Pkcs11Signer, destroy_key, generate_key, user_session
from stampd.verify import verify_timestamp

sys.path.insert(0, str(Path(__file__).parents[2]))
from hsm import TOKEN_KEYS, TOKEN_LABELS, TOKEN_LOGIN, TOKEN_SCRATCH, SoftHsm, softhsm

__all__ = ["softhsm"]  # the session fixture, re-exported so pytest finds it here

SignerFactory = Callable[..., Pkcs11Signer]
"""``signer_for(key_type, hash_name=..., rsa_pss=..., sessions=...)``: an open signer, closed after the test."""

MESSAGE = b"DER of the signed attributes"
_HASHES: dict[str, type[hashes.SHA256 | hashes.SHA384 | hashes.SHA512]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def label_of(key_type: KeyType) -> str:
    return f"tsu-{key_type.value}"


@pytest.fixture(scope="module")
def hsm_keys(softhsm: SoftHsm) -> Iterator[dict[KeyType, PublicKeyTypes]]:
    """One key pair per type generated in the token (RSA-4096 takes a second or two), destroyed afterwards."""
    keys = {
        key_type: generate_key(
            module=softhsm.module,
            token_label=TOKEN_KEYS,
            key_label=label_of(key_type),
            pin=softhsm.pin(TOKEN_KEYS),
            key_type=key_type,
        )
        for key_type in KeyType
    }
    yield keys
    for key_type in KeyType:
        destroy_key(
            module=softhsm.module, token_label=TOKEN_KEYS, key_label=label_of(key_type), pin=softhsm.pin(TOKEN_KEYS)
        )


def open_signer(
    softhsm: SoftHsm,
    key_type: KeyType,
    *,
    hash_name: str | None = None,
    rsa_pss: bool = False,
    sessions: int = 2,
    token: str = TOKEN_KEYS,
    key_label: str | None = None,
    pin: bytes | None = None,
) -> Pkcs11Signer:
    return Pkcs11Signer.open(
        module=softhsm.module,
        token_label=token,
        key_label=key_label or label_of(key_type),
        pin=softhsm.pin(token) if pin is None else pin,
        hash_name=hash_name,
        rsa_pss=rsa_pss,
        sessions=sessions,
    )


@pytest.fixture
def signer_for(softhsm: SoftHsm, hsm_keys: dict[KeyType, PublicKeyTypes]) -> Iterator[SignerFactory]:
    """``signer_for(key_type, **open_signer kwargs)``; every signer it opened is closed after the test."""
    opened: list[Pkcs11Signer] = []

    def make(key_type: KeyType, **kwargs: Any) -> Pkcs11Signer:
        signer = open_signer(softhsm, key_type, **kwargs)
        opened.append(signer)
        return signer

    yield make
    for signer in opened:
        signer.close()


def verify_per_identifier(public_key: PublicKeyTypes, identifier: bytes, signature: bytes, data: bytes) -> None:
    """Verify ``signature`` using only what the DER AlgorithmIdentifier says, as a relying party would."""
    algorithm = algos.SignedDigestAlgorithm.load(identifier, strict=True)
    name = algorithm["algorithm"].native
    if name == "ed25519":
        assert isinstance(public_key, ed25519.Ed25519PublicKey)
        public_key.verify(signature, data)
    elif name == "rsassa_pss":
        params = algorithm["parameters"]
        h = _HASHES[params["hash_algorithm"]["algorithm"].native]()
        assert params["mask_gen_algorithm"]["parameters"]["algorithm"].native == h.name
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(signature, data, padding.PSS(padding.MGF1(h), params["salt_length"].native), h)
    elif name.endswith("_rsa"):
        assert isinstance(public_key, rsa.RSAPublicKey)
        public_key.verify(signature, data, padding.PKCS1v15(), _HASHES[algorithm.hash_algo]())
    elif name.endswith("_ecdsa"):
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        algos.DSASignature.load(signature, strict=True)  # a DER Ecdsa-Sig-Value (ALG-03)
        public_key.verify(signature, data, ec.ECDSA(_HASHES[algorithm.hash_algo]()))
    else:
        pytest.fail(f"unexpected signature algorithm {name}")


SIGNING_CASES = [(key_type, False) for key_type in KeyType] + [
    (key_type, True) for key_type in KeyType if key_type.is_rsa
]


@pytest.mark.parametrize(("key_type", "rsa_pss"), SIGNING_CASES)
def test_every_key_type_signs_in_the_token_alg_01_to_04(
    key_type: KeyType, rsa_pss: bool, signer_for: SignerFactory, hsm_keys: dict[KeyType, PublicKeyTypes]
) -> None:
    signer = signer_for(key_type, rsa_pss=rsa_pss)
    assert signer.public_key == hsm_keys[key_type]
    signature = signer.sign(MESSAGE)
    verify_per_identifier(signer.public_key, signer.signature_algorithm, signature, MESSAGE)
    as_key_signer: KeySigner = signer  # what open_signer returns
    as_port: Signer = signer  # what the core sees
    assert as_key_signer.digest_algorithm == as_port.digest_algorithm == signer.digest_algorithm


@pytest.mark.parametrize(
    ("key_type", "hash_name", "rsa_pss"),
    [
        (KeyType.EC_P256, None, False),
        (KeyType.EC_P256, "sha384", False),
        (KeyType.EC_P256, "sha512", False),
        (KeyType.EC_P384, None, False),
        (KeyType.EC_P384, "sha512", False),
        (KeyType.RSA_2048, None, False),
        (KeyType.RSA_2048, "sha384", False),
        (KeyType.RSA_3072, "sha512", False),
        (KeyType.RSA_2048, "sha256", True),
        (KeyType.RSA_3072, "sha384", True),
        (KeyType.RSA_4096, "sha512", True),
        (KeyType.ED25519, None, False),
    ],
)
def test_identifiers_equal_file_signer_alg_01_to_04(
    key_type: KeyType, hash_name: str | None, rsa_pss: bool, signer_for: SignerFactory
) -> None:
    """Same key type, hash and padding: byte-identical AlgorithmIdentifier and digest algorithm as FileSigner."""
    signer = signer_for(key_type, hash_name=hash_name, rsa_pss=rsa_pss)
    file_key_type = KeyType.RSA_2048 if key_type.is_rsa else key_type  # the identifier does not depend on size
    file_signer = FileSigner(generate_private_key(file_key_type), signer.digest_algorithm, rsa_pss=rsa_pss)
    assert signer.signature_algorithm == file_signer.signature_algorithm
    assert signer.digest_algorithm == file_signer.digest_algorithm == (hash_name or signer.digest_algorithm)
    verify_per_identifier(signer.public_key, signer.signature_algorithm, signer.sign(MESSAGE), MESSAGE)


def test_default_hashes_and_spec_bytes(signer_for: SignerFactory) -> None:
    """The exact DER the SPEC lists (ALG-01, ALG-03, ALG-04)."""
    assert signer_for(KeyType.RSA_2048).signature_algorithm == bytes.fromhex("300D06092A864886F70D01010B0500")
    assert signer_for(KeyType.EC_P256).signature_algorithm == bytes.fromhex("300A06082A8648CE3D040302")
    ed = signer_for(KeyType.ED25519)
    assert ed.signature_algorithm == bytes.fromhex("300506032B6570")
    assert ed.digest_algorithm == "sha512"
    assert signer_for(KeyType.EC_P384).digest_algorithm == "sha384"


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
@pytest.mark.usefixtures("hsm_keys")
def test_invalid_combinations_are_refused_like_file_signer(
    key_type: KeyType, hash_name: str, rsa_pss: bool, message: str, softhsm: SoftHsm
) -> None:
    with pytest.raises(PKIError, match=message):
        open_signer(softhsm, key_type, hash_name=hash_name, rsa_pss=rsa_pss).close()
    with pytest.raises(PKIError, match=message):
        FileSigner(generate_private_key(KeyType.RSA_2048 if key_type.is_rsa else key_type), hash_name, rsa_pss=rsa_pss)
    # the failed opens gave their login back: a wrong PIN is refused by the token again
    with pytest.raises(PKIError, match="CKR_PIN_INCORRECT"):
        open_signer(softhsm, key_type, pin=b"not the pin")


def test_wrong_pin_is_pki_error_without_the_pin(softhsm: SoftHsm) -> None:
    wrong = b"wrong-pin-31337"
    with pytest.raises(PKIError, match=r"wrong PIN for token 'stampd-login' \(CKR_PIN_INCORRECT\)") as excinfo:
        open_signer(softhsm, KeyType.EC_P256, token=TOKEN_LOGIN, pin=wrong)
    assert wrong.decode() not in str(excinfo.value)
    assert softhsm.pin(TOKEN_LOGIN).decode() not in str(excinfo.value)


def test_wrong_pin_while_logged_in_is_refused_too(signer_for: SignerFactory, softhsm: SoftHsm) -> None:
    """The token answers CKR_USER_ALREADY_LOGGED_IN to any PIN once logged in: stampd compares the PIN itself."""
    signer_for(KeyType.EC_P256)
    wrong = b"wrong-pin-31337"
    with pytest.raises(PKIError, match="wrong PIN") as excinfo:
        open_signer(softhsm, KeyType.EC_P256, pin=wrong)
    assert wrong.decode() not in str(excinfo.value)
    second = signer_for(KeyType.EC_P384)  # the right PIN joins the login
    verify_per_identifier(second.public_key, second.signature_algorithm, second.sign(MESSAGE), MESSAGE)


def test_unknown_token_lists_the_labels(softhsm: SoftHsm) -> None:
    with pytest.raises(PKIError, match="no token labelled 'no-such-token'") as excinfo:
        Pkcs11Signer.open(
            module=softhsm.module,
            token_label="no-such-token",
            key_label="x",
            pin=softhsm.pin(TOKEN_KEYS),
            hash_name=None,
            rsa_pss=False,
            sessions=1,
        )
    for label in TOKEN_LABELS:
        assert repr(label) in str(excinfo.value)


def test_unknown_key_label_is_pki_error(softhsm: SoftHsm, hsm_keys: dict[KeyType, PublicKeyTypes]) -> None:
    with pytest.raises(PKIError, match="no private key labelled 'no-such-key' in token 'stampd-keys'"):
        open_signer(softhsm, KeyType.EC_P256, key_label="no-such-key")


def test_missing_module_is_pki_error(tmp_path: Path) -> None:
    with pytest.raises(PKIError, match="not found"):
        Pkcs11Signer.open(
            module=tmp_path / "absent.so",
            token_label="t",
            key_label="k",
            pin=b"1234",
            hash_name=None,
            rsa_pss=False,
            sessions=1,
        )


def test_unloadable_module_is_pki_error(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not a shared object")
    with pytest.raises(PKIError, match="cannot load the PKCS#11 module"):
        Pkcs11Signer.open(
            module=bogus, token_label="t", key_label="k", pin=b"1234", hash_name=None, rsa_pss=False, sessions=1
        )


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.RSA_2048, KeyType.ED25519])
def test_concurrent_signing_from_8_threads_with_4_sessions(key_type: KeyType, signer_for: SignerFactory) -> None:
    signer = signer_for(key_type, sessions=4)
    results: dict[int, list[tuple[bytes, bytes]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(n: int) -> None:
        try:
            start.wait()
            out = []
            for i in range(20):
                data = f"thread {n} message {i}".encode()
                out.append((data, signer.sign(data)))
            results[n] = out
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(results) == 8
    for out in results.values():
        for data, signature in out:
            verify_per_identifier(signer.public_key, signer.signature_algorithm, signature, data)


@pytest.mark.parametrize("key_type", list(KeyType))
def test_private_key_is_sensitive_and_not_extractable_ops_07(
    key_type: KeyType, softhsm: SoftHsm, hsm_keys: dict[KeyType, PublicKeyTypes]
) -> None:
    with user_session(softhsm.module, TOKEN_KEYS, softhsm.pin(TOKEN_KEYS), rw=False) as session:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label_of(key_type))
        assert private[Attribute.TOKEN] is True
        assert private[Attribute.PRIVATE] is True
        assert private[Attribute.SENSITIVE] is True
        assert private[Attribute.EXTRACTABLE] is False
        assert private[Attribute.NEVER_EXTRACTABLE] is True
        assert private[Attribute.ALWAYS_SENSITIVE] is True
        assert private[Attribute.SIGN] is True
        assert private[Attribute.DECRYPT] is False
        public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label_of(key_type))
        assert public[Attribute.ID] == private[Attribute.ID]


def test_generate_refuses_an_existing_label(softhsm: SoftHsm, hsm_keys: dict[KeyType, PublicKeyTypes]) -> None:
    with pytest.raises(PKIError, match="already holds objects labelled"):
        generate_key(
            module=softhsm.module,
            token_label=TOKEN_KEYS,
            key_label=label_of(KeyType.EC_P256),
            pin=softhsm.pin(TOKEN_KEYS),
            key_type=KeyType.EC_P256,
        )


def test_destroy_key_removes_both_objects(softhsm: SoftHsm) -> None:
    args: dict[str, Any] = {"module": softhsm.module, "token_label": TOKEN_SCRATCH, "pin": softhsm.pin(TOKEN_SCRATCH)}
    generate_key(key_label="doomed", key_type=KeyType.EC_P256, **args)
    signer = open_signer(softhsm, KeyType.EC_P256, token=TOKEN_SCRATCH, key_label="doomed")
    signer.close()
    assert destroy_key(key_label="doomed", **args) == 2
    with pytest.raises(PKIError, match="no private key labelled 'doomed'"):
        open_signer(softhsm, KeyType.EC_P256, token=TOKEN_SCRATCH, key_label="doomed")
    assert destroy_key(key_label="doomed", **args) == 0


def test_mismatched_key_pair_is_refused(softhsm: SoftHsm) -> None:
    """A private and a public object with one label that are not one pair: the self-test signature fails."""
    args: dict[str, Any] = {"module": softhsm.module, "token_label": TOKEN_SCRATCH, "pin": softhsm.pin(TOKEN_SCRATCH)}
    generate_key(key_label="pair-a", key_type=KeyType.EC_P256, **args)
    generate_key(key_label="pair-b", key_type=KeyType.EC_P256, **args)
    try:
        with user_session(softhsm.module, TOKEN_SCRATCH, softhsm.pin(TOKEN_SCRATCH), rw=True) as session:
            session.get_key(object_class=ObjectClass.PUBLIC_KEY, label="pair-b")[Attribute.LABEL] = "pair-a-wrong"
            session.get_key(object_class=ObjectClass.PUBLIC_KEY, label="pair-a")[Attribute.LABEL] = "pair-b"
            session.get_key(object_class=ObjectClass.PUBLIC_KEY, label="pair-a-wrong")[Attribute.LABEL] = "pair-a"
        with pytest.raises(PKIError, match="do not form a pair"):
            open_signer(softhsm, KeyType.EC_P256, token=TOKEN_SCRATCH, key_label="pair-a")
    finally:
        destroy_key(key_label="pair-a", **args)
        destroy_key(key_label="pair-b", **args)


def test_sign_after_close_is_signing_error_sts_06(signer_for: SignerFactory) -> None:
    signer = signer_for(KeyType.EC_P256)
    signer.sign(MESSAGE)
    signer.close()
    with pytest.raises(SigningError, match="closed"):
        signer.sign(MESSAGE)
    signer.close()  # idempotent


def test_lost_sessions_give_signing_error_sts_06(signer_for: SignerFactory) -> None:
    """An HSM that dropped its sessions (unplugged, restarted): every sign is a SigningError, never a crash."""
    signer = signer_for(KeyType.EC_P256, sessions=2)
    slots = [signer._pool.get_nowait() for _ in range(2)]
    for slot in slots:
        assert slot is not None
        slot.session.close()  # behind the signer's back, as a device reset would
        signer._pool.put(slot)
    for _ in range(3):
        with pytest.raises(SigningError, match="could not sign"):
            signer.sign(MESSAGE)


def test_sessions_must_be_positive(softhsm: SoftHsm) -> None:
    with pytest.raises(PKIError, match="at least 1"):
        open_signer(softhsm, KeyType.EC_P256, sessions=0)


# --- a whole token signed in the HSM, checked by stampd's verifier and by OpenSSL ---

GEN_TIME = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
POLICY = "1.3.6.1.4.1.99999.1"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn), x509.NameAttribute(NameOID.COUNTRY_NAME, "DE")])


def tiny_pki(tsu_key: PublicKeyTypes) -> tuple[x509.Certificate, x509.Certificate]:
    """A root CA (software key) and a TSU certificate for the HSM key: EKU timeStamping only and critical."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = GEN_TIME - timedelta(days=365), GEN_TIME + timedelta(days=365)
    root = (
        x509.CertificateBuilder()
        .subject_name(_name("HSM Test Root"))
        .issuer_name(_name("HSM Test Root"))
        .public_key(root_key.public_key())
        .serial_number(1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    assert isinstance(tsu_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
    tsu = (
        x509.CertificateBuilder()
        .subject_name(_name("HSM TSU"))
        .issuer_name(root.subject)
        .public_key(tsu_key)
        .serial_number(2)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(tsu_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()),
            critical=False,
        )
        .sign(root_key, hashes.SHA256())
    )
    return root, tsu


@pytest.mark.parametrize(("key_type", "rsa_pss"), SIGNING_CASES)
def test_full_token_signed_in_the_hsm_verifies(
    key_type: KeyType, rsa_pss: bool, signer_for: SignerFactory, tmp_path: Path
) -> None:
    signer = signer_for(key_type, rsa_pss=rsa_pss)
    root, tsu = tiny_pki(signer.public_key)
    template = TokenTemplate(
        signer_certificate=tsu.public_bytes(Encoding.DER),
        chain=[],
        digest_algorithm=signer.digest_algorithm,
        signature_algorithm=signer.signature_algorithm,
        accuracy_us=1_000_000,
        sign=signer.sign,
    )
    data = b"hello, HSM"
    gen_ns = int(GEN_TIME.timestamp()) * 1_000_000_000
    fields = TokenFields(
        policy=POLICY,
        message_imprint=encode_message_imprint(MessageImprint(SHA256.oid, True, hashlib.sha256(data).digest())),
        serial=0x0123456789ABCDEF,
        gen_time=GenTimeFormatter(3).encode(gen_ns),
        nonce=0x1234,
    )
    reply = template.response(fields, with_certificates=True)

    report = verify_timestamp(reply, data=data, anchors=[root], policy=POLICY, nonce=0x1234)
    assert report.ok, report.failures

    if key_type == KeyType.ED25519 or rsa_pss:
        return  # `openssl ts -verify` (PKCS7 API) checks neither Ed25519 nor RSASSA-PSS
    openssl = shutil.which("openssl")
    assert openssl is not None, "the openssl command is required: install openssl"
    (tmp_path / "reply.tsr").write_bytes(reply)
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "root.pem").write_bytes(root.public_bytes(Encoding.PEM))
    result = subprocess.run(
        [
            openssl,
            "ts",
            "-verify",
            "-in",
            str(tmp_path / "reply.tsr"),
            "-data",
            str(tmp_path / "data"),
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-attime",
            str(int(GEN_TIME.timestamp())),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0 and "Verification: OK" in result.stdout, result.stdout + result.stderr
