"""Keys held in a PKCS#11 token (an HSM), and the signer that uses them (SPEC OPS-07).

The private key never leaves the token: it is generated there (sensitive, non-extractable) and every signature
is a ``C_Sign`` call (PKCS#11 v2.40 §5.11). Each signing thread takes a session of its own from a pool; the calls
into the module are serialised (see :func:`module_lock`). The login is the token's, shared by every session of this
process (PKCS#11 v2.40 §5.6), so it is counted here and undone only when the last user of the token closes.

The signature algorithms and their AlgorithmIdentifiers are exactly those of
:class:`stampd.signers.keyfile.FileSigner` for the same key and hash (SPEC ALG-01..04). The PIN is never logged
nor put in a message.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pkcs11
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import MGF, Attribute, Mechanism, MechanismFlag, ObjectClass, TokenFlag
from pkcs11 import KeyType as P11KeyType
from pkcs11 import exceptions as p11e
from pkcs11.types import SignMixin

from stampd.der.algorithms import ecdsa_identifier, ed25519_identifier, rsa_pkcs1_identifier, rsa_pss_identifier
from stampd.der.encoding import oid as der_oid
from stampd.errors import PKIError, SigningError
from stampd.signers.keyfile import MIN_RSA_BITS, SIGNATURE_HASHES, KeyType, PublicKey, default_signature_hash

DEFAULT_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
"""Debian's SoftHSM2 module: the default for development; production configurations name their HSM's module."""

POOL_WAIT_S = 30.0
"""How long :meth:`Pkcs11Signer.sign` waits for a free session before giving up (a stuck HSM, SPEC STS-06)."""

_SELF_TEST_DATA = b"stampd PKCS#11 key self-test"


_RSA_MECHANISMS = {
    "sha256": (Mechanism.SHA256_RSA_PKCS, Mechanism.SHA256_RSA_PKCS_PSS, Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384_RSA_PKCS, Mechanism.SHA384_RSA_PKCS_PSS, Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512_RSA_PKCS, Mechanism.SHA512_RSA_PKCS_PSS, Mechanism.SHA512, MGF.SHA512),
}
"""hash -> (PKCS#1 v1.5 mechanism, PSS mechanism, PSS hashAlg, PSS MGF) (PKCS#11 v2.40 Current Mechanisms §2.1)."""

_CURVES: dict[bytes, ec.EllipticCurve] = {
    der_oid("1.2.840.10045.3.1.7"): ec.SECP256R1(),
    der_oid("1.3.132.0.34"): ec.SECP384R1(),
}
"""CKA_EC_PARAMS (a DER namedCurve OID, RFC 5480 §2.1.1.1) of the curves stampd signs with."""

_ED25519_OID = "1.3.101.112"
_ED25519_PARAMS = frozenset(
    {
        der_oid(_ED25519_OID),  # id-Ed25519 (RFC 8410 §3), what SoftHSM2 and most HSMs use
        b"\x13\x0cedwards25519",  # PrintableString curve name (PKCS#11 v3.0 §2.3.10)
        der_oid("1.3.6.1.4.1.11591.15.1"),  # the GnuPG curve OID some tokens report
    }
)
"""CKA_EC_PARAMS values that name Ed25519 for a CKK_EC_EDWARDS key."""

_KEY_TYPE_CURVES = {KeyType.EC_P256: "1.2.840.10045.3.1.7", KeyType.EC_P384: "1.3.132.0.34"}

# --- the module and the token's login, shared by the whole process ---

_libs: dict[str, Any] = {}
_call_locks: dict[str, threading.RLock] = {}
_libs_lock = threading.Lock()


def module_lock(module: Path) -> threading.RLock:
    """The lock every call into ``module`` is made under.

    python-pkcs11 calls ``C_Initialize(NULL_PTR)``, which tells the module that the application will not call it
    from several threads at once (PKCS#11 v2.40 §5.4); SoftHSM2 then runs without its own locks and fails with
    CKR_GENERAL_ERROR under concurrent ``C_Sign`` calls. So this process serialises its calls per module.
    """
    key = os.path.realpath(module)
    with _libs_lock:
        return _call_locks.setdefault(key, threading.RLock())


def load_module(module: Path) -> Any:
    """The loaded PKCS#11 module; each is loaded and ``C_Initialize``-d once per process (PKCS#11 v2.40 §5.4)."""
    key = os.path.realpath(module)
    with _libs_lock:
        lib = _libs.get(key)
        if lib is None:
            if not os.path.isfile(key):
                raise PKIError(f"PKCS#11 module {module} not found")
            try:
                lib = pkcs11.lib(key)
            except Exception as e:
                raise PKIError(f"cannot load the PKCS#11 module {module}: {e}") from e
            _libs[key] = lib
        return lib


def _find_token(lib: Any, module: Path, label: str) -> pkcs11.Token:
    """The one initialised token labelled ``label``; the error lists the labels that are there."""
    found: list[pkcs11.Token] = []
    labels: list[str] = []
    try:
        for slot in lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except p11e.TokenNotPresent:
                continue
            if not token.flags & TokenFlag.TOKEN_INITIALIZED:
                continue
            labels.append(token.label)
            if token.label == label:
                found.append(token)
    except p11e.PKCS11Error as e:
        raise PKIError(f"cannot list the tokens of {module}: {type(e).__name__}") from e
    if not found:
        shown = ", ".join(repr(x) for x in sorted(labels)) or "none"
        raise PKIError(f"no token labelled {label!r} in {module}; tokens found: {shown}")
    if len(found) > 1:
        raise PKIError(f"{len(found)} tokens are labelled {label!r} in {module}; labels must be unique")
    return found[0]


@dataclass
class _Login:
    """A user login to one token: the session that holds it, how many users share it, and a salted PIN digest."""

    session: pkcs11.Session
    salt: bytes
    pin_digest: bytes
    users: int = 1


_logins: dict[tuple[str, int], _Login] = {}
_logins_lock = threading.Lock()


def _pin_digest(salt: bytes, pin: bytes) -> bytes:
    return hashlib.sha256(salt + pin).digest()


def _login_key(module: Path, token: pkcs11.Token) -> tuple[str, int]:
    return os.path.realpath(module), token.slot.slot_id


def _acquire_login(module: Path, token: pkcs11.Token, pin: bytes) -> None:
    """Log the user in (``C_Login``, PKCS#11 v2.40 §5.6), or join this process's login with the same PIN.

    The token reports CKR_USER_ALREADY_LOGGED_IN whatever PIN a second ``C_Login`` carries, so a second user of
    the token is checked against a salted digest of the PIN that logged in.
    """
    try:
        text_pin = pin.decode("utf-8")
    except UnicodeDecodeError:
        raise PKIError(f"the PIN for token {token.label!r} is not valid UTF-8 (PKCS#11 PINs are UTF-8)") from None
    key = _login_key(module, token)
    with _logins_lock:
        login = _logins.get(key)
        if login is not None:
            if not hmac.compare_digest(login.pin_digest, _pin_digest(login.salt, pin)):
                raise PKIError(
                    f"wrong PIN for token {token.label!r}: it differs from the PIN this process is logged in with"
                )
            login.users += 1
            return
        try:
            session = token.open(user_pin=text_pin)
        except (p11e.PinIncorrect, p11e.PinLenRange, p11e.PinInvalid):
            raise PKIError(f"wrong PIN for token {token.label!r} (CKR_PIN_INCORRECT)") from None
        except p11e.PinLocked:
            raise PKIError(f"the user PIN of token {token.label!r} is locked (CKR_PIN_LOCKED)") from None
        except p11e.UserPinNotInitialized:
            raise PKIError(f"token {token.label!r} has no user PIN set (CKR_USER_PIN_NOT_INITIALIZED)") from None
        except p11e.UserAlreadyLoggedIn:
            raise PKIError(f"token {token.label!r} is already logged in by something else in this process") from None
        except p11e.PKCS11Error as e:
            raise PKIError(f"cannot log in to token {token.label!r}: {type(e).__name__}") from None
        salt = secrets.token_bytes(16)
        _logins[key] = _Login(session, salt, _pin_digest(salt, pin))


def _release_login(module: Path, token: pkcs11.Token) -> None:
    """One user fewer; the last one logs out and closes the login session (``C_Logout``, ``C_CloseSession``)."""
    key = _login_key(module, token)
    with _logins_lock:
        login = _logins.get(key)
        if login is None:
            return
        login.users -= 1
        if login.users > 0:
            return
        del _logins[key]
        with contextlib.suppress(p11e.PKCS11Error):
            login.session.close()


@contextlib.contextmanager
def user_session(module: Path, token_label: str, pin: bytes, *, rw: bool) -> Iterator[pkcs11.Session]:
    """A session on ``token_label`` with the user logged in (sharing this process's login), for key management."""
    with module_lock(module):  # held throughout: key management is rare, and the module is not thread-safe
        token = _find_token(load_module(module), module, token_label)
        _acquire_login(module, token, pin)
        try:
            try:
                session = token.open(rw=rw)
            except p11e.PKCS11Error as e:
                raise PKIError(f"cannot open a session on token {token_label!r}: {type(e).__name__}") from e
            try:
                yield session
            finally:
                with contextlib.suppress(p11e.PKCS11Error):
                    session.close()
        finally:
            _release_login(module, token)


# --- public keys from token attributes ---


def _unwrap_octet_string(value: bytes, size: int) -> bytes | None:
    """``value`` if it is the raw ``size`` bytes, else the content of a DER OCTET STRING of that size."""
    if len(value) == size:
        return value
    if len(value) < 2 or value[0] != 0x04:
        return None
    first = value[1]
    if first < 0x80:
        header = 2
        n = first
    else:
        count = first & 0x7F
        header = 2 + count
        n = int.from_bytes(value[2:header], "big")
    content = value[header:]
    return content if n == size == len(content) else None


def _public_key(private: pkcs11.PrivateKey, public: pkcs11.PublicKey | None) -> PublicKey:
    """The cryptography public key of a token key pair (PKCS#11 v2.40 Current Mechanisms §2.1.2, §2.3.3).

    CKA_EC_POINT is a DER OCTET STRING around the point in most tokens (SoftHSM2 included), the raw point in a
    few; both are accepted.
    """
    key_type = private.key_type
    label = private.label
    if key_type == P11KeyType.RSA:
        source: pkcs11.Key = public if public is not None else private  # private RSA objects carry n and e too
        n = int.from_bytes(source[Attribute.MODULUS], "big")
        e = int.from_bytes(source[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    if public is None:
        raise PKIError(f"no public key object labelled {label!r} next to the private key")
    if key_type == P11KeyType.EC:
        params = bytes(public[Attribute.EC_PARAMS])
        curve = _CURVES.get(params)
        if curve is None:
            raise PKIError(
                f"key {label!r} is on an unsupported curve (CKA_EC_PARAMS {params.hex()}); use P-256 or P-384"
            )
        point = _unwrap_octet_string(bytes(public[Attribute.EC_POINT]), 1 + 2 * ((curve.key_size + 7) // 8))
        if point is None or point[0] != 0x04:
            raise PKIError(f"key {label!r}: CKA_EC_POINT is not an uncompressed point")
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    if key_type == P11KeyType.EC_EDWARDS:
        params = bytes(public[Attribute.EC_PARAMS])
        if params not in _ED25519_PARAMS:
            raise PKIError(f"key {label!r} is an Edwards key but not Ed25519 (CKA_EC_PARAMS {params.hex()})")
        raw = _unwrap_octet_string(bytes(public[Attribute.EC_POINT]), 32)
        if raw is None:
            raise PKIError(f"key {label!r}: CKA_EC_POINT is not a 32-byte Ed25519 public key")
        return ed25519.Ed25519PublicKey.from_public_bytes(raw)
    raise PKIError(f"key {label!r} has the unsupported key type {key_type!r}; stampd signs with RSA, ECDSA or Ed25519")


def _signing_key(session: pkcs11.Session, token_label: str, key_label: str) -> SignMixin:
    """The private key labelled ``key_label`` as seen from ``session`` (CKA_CLASS, CKA_LABEL; PKCS#11 §4.4)."""
    try:
        private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label)
    except p11e.NoSuchKey:
        raise PKIError(f"no private key labelled {key_label!r} in token {token_label!r}") from None
    except p11e.MultipleObjectsReturned:
        raise PKIError(f"several private keys are labelled {key_label!r} in token {token_label!r}") from None
    if not isinstance(private, SignMixin):
        raise PKIError(f"the private key {key_label!r} in token {token_label!r} may not sign (CKA_SIGN is false)")
    return private


def _find_key_pair(session: pkcs11.Session, token_label: str, key_label: str) -> tuple[SignMixin, PublicKey]:
    """The private key that signs and the public key next to it (same CKA_LABEL), as a cryptography object."""
    private = _signing_key(session, token_label, key_label)
    assert isinstance(private, pkcs11.PrivateKey)
    try:
        public = session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=key_label)
    except p11e.NoSuchKey:
        public = None
    except p11e.MultipleObjectsReturned:
        raise PKIError(f"several public keys are labelled {key_label!r} in token {token_label!r}") from None
    assert public is None or isinstance(public, pkcs11.PublicKey)
    return private, _public_key(private, public)


# --- the signing method: mechanism, parameters and identifier, chosen once ---


@dataclass(frozen=True)
class _Method:
    """How to sign: ``C_Sign`` with ``mechanism`` over the data (or its ``prehash``), then ``post`` on the output."""

    identifier: bytes
    mechanism: Mechanism
    param: Any = None
    prehash: str | None = None
    post: Callable[[bytes], bytes] | None = None


def _signature_hash(hash_name: str) -> hashes.HashAlgorithm:
    try:
        return SIGNATURE_HASHES[hash_name]()
    except KeyError:
        choices = ", ".join(SIGNATURE_HASHES)
        raise PKIError(f"unsupported signature hash {hash_name!r}; choose one of {choices}") from None


def _raw_to_dss(raw: bytes) -> bytes:
    """PKCS#11 ECDSA output r||s (Current Mechanisms §2.3.1) as a DER Ecdsa-Sig-Value (RFC 5753 §2.1.1, ALG-03)."""
    half = len(raw) // 2
    if len(raw) != 2 * half or half == 0:
        raise ValueError(f"ECDSA signature of odd length {len(raw)}")
    return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))


def _method(public_key: PublicKey, hash_name: str, rsa_pss: bool) -> _Method:
    """The same choices and refusals as FileSigner (ALG-01..04), mapped to PKCS#11 mechanisms."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        if rsa_pss:
            raise PKIError("rsa_pss is set but the key is Ed25519")
        if hash_name != "sha512":
            raise PKIError(f"an Ed25519 key requires signature_hash sha512 (RFC 8419), not {hash_name!r}")
        return _Method(ed25519_identifier(), Mechanism.EDDSA)  # CKM_EDDSA without params: PureEdDSA
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < MIN_RSA_BITS:
            raise PKIError(f"an RSA key of {public_key.key_size} bits is too short; use {MIN_RSA_BITS} bits or more")
        algorithm = _signature_hash(hash_name)
        pkcs1, pss, hash_mechanism, mgf = _RSA_MECHANISMS[hash_name]
        if rsa_pss:
            # CK_RSA_PKCS_PSS_PARAMS: hashAlg, mgf = MGF1 with the same hash, sLen = hash length (RFC 4056 §3)
            return _Method(rsa_pss_identifier(hash_name), pss, (hash_mechanism, mgf, algorithm.digest_size))
        return _Method(rsa_pkcs1_identifier(hash_name), pkcs1)
    if rsa_pss:
        raise PKIError("rsa_pss is set but the key is an elliptic-curve key")
    algorithm = _signature_hash(hash_name)
    curve_hash = default_signature_hash(public_key)
    if algorithm.digest_size < SIGNATURE_HASHES[curve_hash]().digest_size:
        raise PKIError(f"signature_hash {hash_name} is weaker than the {public_key.curve.name} key; use {curve_hash}")
    return _Method(ecdsa_identifier(hash_name), Mechanism.ECDSA, prehash=hash_name, post=_raw_to_dss)


def _verify(public_key: PublicKey, hash_name: str, rsa_pss: bool, signature: bytes, data: bytes) -> None:
    """Raise InvalidSignature unless ``signature`` verifies as :func:`_method` says it was made."""
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, data)
    elif isinstance(public_key, rsa.RSAPublicKey):
        algorithm = SIGNATURE_HASHES[hash_name]()
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(algorithm), salt_length=algorithm.digest_size)
            if rsa_pss
            else padding.PKCS1v15()
        )
        public_key.verify(signature, data, pad, algorithm)
    else:
        public_key.verify(signature, data, ec.ECDSA(SIGNATURE_HASHES[hash_name]()))


# --- the signer ---


@dataclass
class _Slot:
    """One pooled session and the handle of the private key as seen from it."""

    session: pkcs11.Session
    key: SignMixin


class Pkcs11Signer:
    """A :class:`stampd.ports.Signer` whose private key stays in a PKCS#11 token.

    :meth:`open` checks everything before the first request (fail closed at start-up, SPEC CRT-07): the
    module, the token, the PIN, the key pair, the hash/key combination, and a self-test signature verified with
    the public key. :meth:`sign` takes a session from the pool (waiting at most :data:`POOL_WAIT_S`); every failure
    there is a :class:`SigningError` (systemFailure, SPEC STS-06).
    """

    __slots__ = (
        "_call_lock",
        "_closed",
        "_hash_name",
        "_lock",
        "_method",
        "_module",
        "_pool",
        "_public_key",
        "_token",
    )

    def __init__(
        self,
        *,
        module: Path,
        token: pkcs11.Token,
        slots: list[_Slot],
        public_key: PublicKey,
        hash_name: str,
        method: _Method,
    ) -> None:
        """Use :meth:`open`; this takes over ``slots`` and one login reference to ``token``."""
        self._module = module
        self._token = token
        self._public_key = public_key
        self._hash_name = hash_name
        self._method = method
        self._lock = threading.Lock()
        self._call_lock = module_lock(module)
        self._closed = False
        self._pool: queue.Queue[_Slot | None] = queue.Queue()
        for slot in slots:
            self._pool.put(slot)

    @classmethod
    def open(
        cls,
        *,
        module: Path,
        token_label: str,
        key_label: str,
        pin: bytes,
        hash_name: str | None,
        rsa_pss: bool,
        sessions: int,
    ) -> Pkcs11Signer:
        """Log in to ``token_label`` and open ``sessions`` sessions signing with the key pair ``key_label``.

        The key pair is found by CKA_LABEL and CKA_CLASS (PKCS#11 v2.40 §4.4); ``hash_name`` defaults to the
        key's (:func:`default_signature_hash`). Every problem is a :class:`PKIError` that never shows the PIN.
        """
        if sessions < 1:
            raise PKIError(f"sessions must be at least 1, not {sessions}")
        with module_lock(module):
            token = _find_token(load_module(module), module, token_label)
            _acquire_login(module, token, pin)
            opened: list[pkcs11.Session] = []
            try:
                for _ in range(sessions):
                    try:
                        opened.append(token.open())  # the token's login covers every session (PKCS#11 v2.40 §5.6)
                    except p11e.PKCS11Error as e:
                        raise PKIError(f"cannot open a session on token {token_label!r}: {type(e).__name__}") from e
                private, public_key = _find_key_pair(opened[0], token_label, key_label)
                slots = [_Slot(opened[0], private)]
                slots += [_Slot(s, _signing_key(s, token_label, key_label)) for s in opened[1:]]
                name = hash_name or default_signature_hash(public_key)
                method = _method(public_key, name, rsa_pss)
                signer = cls(
                    module=module, token=token, slots=slots, public_key=public_key, hash_name=name, method=method
                )
                signer._self_test(rsa_pss, key_label)
            except BaseException:
                for session in opened:
                    with contextlib.suppress(p11e.PKCS11Error):
                        session.close()
                _release_login(module, token)
                raise
        return signer

    def _self_test(self, rsa_pss: bool, key_label: str) -> None:
        """Sign once and verify with the public key: the mechanism works and the two objects are one pair."""
        try:
            signature = self.sign(_SELF_TEST_DATA)
        except SigningError as e:
            cause = e.__cause__
            if isinstance(cause, p11e.MechanismInvalid | p11e.MechanismParamInvalid):
                raise PKIError(
                    f"token {self._token.label!r} cannot sign with key {key_label!r} using "
                    f"{self._method.mechanism.name}: {type(cause).__name__}"
                ) from None
            raise PKIError(f"test signature with key {key_label!r} failed: {e}") from None
        try:
            _verify(self._public_key, self._hash_name, rsa_pss, signature, _SELF_TEST_DATA)
        except InvalidSignature:
            raise PKIError(
                f"the private and public key objects labelled {key_label!r} in token {self._token.label!r} "
                "do not form a pair: the test signature does not verify"
            ) from None

    @property
    def digest_algorithm(self) -> str:
        """Hash name of the message digest and of the signature (SPEC ALG-02, ALG-04)."""
        return self._hash_name

    @property
    def signature_algorithm(self) -> bytes:
        """DER AlgorithmIdentifier for SignerInfo.signatureAlgorithm, as FileSigner's (SPEC ALG-01..04)."""
        return self._method.identifier

    @property
    def public_key(self) -> PublicKey:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        """``C_Sign`` ``data`` in a pooled session; any failure (session lost, HSM gone) is a :class:`SigningError`."""
        if self._closed:
            raise SigningError("the PKCS#11 signer is closed")
        try:
            slot = self._pool.get(timeout=POOL_WAIT_S)
        except queue.Empty:
            raise SigningError(f"no PKCS#11 session became free within {POOL_WAIT_S:g} s") from None
        if slot is None:  # closed while waiting: pass the wake-up on to the next waiter
            self._pool.put(None)
            raise SigningError("the PKCS#11 signer is closed")
        method = self._method
        try:
            message = hashlib.new(method.prehash, data).digest() if method.prehash else data
            with self._call_lock:
                raw = slot.key.sign(message, mechanism=method.mechanism, mechanism_param=method.param)
            return method.post(raw) if method.post else raw
        except Exception as e:
            raise SigningError(f"the PKCS#11 token could not sign: {type(e).__name__}") from e
        finally:
            self._give_back(slot)

    def _give_back(self, slot: _Slot) -> None:
        with self._lock:
            if not self._closed:
                self._pool.put(slot)
                return
        with self._call_lock, contextlib.suppress(p11e.PKCS11Error):
            slot.session.close()

    def close(self) -> None:
        """Close every session (``C_CloseSession``) and give up this signer's share of the login; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            idle: list[_Slot] = []
            while True:
                try:
                    slot = self._pool.get_nowait()
                except queue.Empty:
                    break
                if slot is not None:
                    idle.append(slot)
            self._pool.put(None)
        with self._call_lock:
            for slot in idle:
                with contextlib.suppress(p11e.PKCS11Error):
                    slot.session.close()
            _release_login(self._module, self._token)


# --- key management for `stampd tsu keygen` ---


def generate_key(*, module: Path, token_label: str, key_label: str, pin: bytes, key_type: KeyType) -> PublicKeyTypes:
    """Generate a key pair in the token (``C_GenerateKeyPair``, PKCS#11 v2.40 §5.14) and return its public key.

    The private key is a token object, private, sensitive, never extractable and usable only to sign
    (PKCS#11 v2.40 §4.9); both objects get ``key_label`` and one random CKA_ID. An existing label is refused.
    """
    private_template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    public_template: dict[Attribute, Any] = {Attribute.TOKEN: True, Attribute.VERIFY: True}
    p11_type: P11KeyType
    key_length: int | None = None
    if key_type.is_rsa:
        p11_type, key_length = P11KeyType.RSA, int(key_type.value[4:])
    elif key_type in _KEY_TYPE_CURVES:
        p11_type = P11KeyType.EC
        public_template[Attribute.EC_PARAMS] = der_oid(_KEY_TYPE_CURVES[key_type])
    elif key_type == KeyType.ED25519:
        p11_type = P11KeyType.EC_EDWARDS
        public_template[Attribute.EC_PARAMS] = der_oid(_ED25519_OID)
    else:
        raise PKIError(f"unsupported key type: {key_type!r}")
    with user_session(module, token_label, pin, rw=True) as session:
        if next(session.get_objects({Attribute.LABEL: key_label}), None) is not None:
            raise PKIError(f"token {token_label!r} already holds objects labelled {key_label!r}; refusing to add a key")
        try:
            public, private = session.generate_keypair(
                p11_type,
                key_length,
                id=secrets.token_bytes(16),
                label=key_label,
                store=True,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template=public_template,
                private_template=private_template,
            )
        except (p11e.MechanismInvalid, p11e.TemplateInconsistent, p11e.AttributeValueInvalid) as e:
            raise PKIError(f"token {token_label!r} cannot generate a {key_type} key: {type(e).__name__}") from e
        except p11e.PKCS11Error as e:
            raise PKIError(f"generating a {key_type} key in token {token_label!r} failed: {type(e).__name__}") from e
        return _public_key(private, public)


def destroy_key(*, module: Path, token_label: str, key_label: str, pin: bytes) -> int:
    """Destroy the private and public key objects labelled ``key_label`` (``C_DestroyObject``, PKCS#11 §5.7).

    Returns how many objects were destroyed (0 if there were none).
    """
    with user_session(module, token_label, pin, rw=True) as session:
        objects = [
            obj
            for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
            for obj in session.get_objects({Attribute.CLASS: object_class, Attribute.LABEL: key_label})
        ]
        try:
            for obj in objects:
                obj.destroy()
        except p11e.PKCS11Error as e:
            raise PKIError(f"cannot destroy key {key_label!r} in token {token_label!r}: {type(e).__name__}") from e
        return len(objects)
