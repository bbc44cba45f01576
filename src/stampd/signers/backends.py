"""Opening a TSU's key from its configuration, whatever the backend: the one place that chooses one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from stampd.config import KeyConfig
from stampd.errors import ConfigError
from stampd.signers.keyfile import FileSigner, default_signature_hash, load_encrypted_key, read_passphrase_file
from stampd.signers.pkcs11 import Pkcs11Signer


class KeySigner(Protocol):
    """A :class:`stampd.ports.Signer` that also shows its public key (to match the certificate) and can close."""

    @property
    def digest_algorithm(self) -> str: ...

    @property
    def signature_algorithm(self) -> bytes: ...

    @property
    def public_key(self) -> PublicKeyTypes: ...

    def sign(self, data: bytes) -> bytes: ...

    def close(self) -> None: ...


def secret(file: Path | None, env: str | None, field: str) -> bytes:
    """A passphrase or PIN from its file (first line) or environment variable; never logged."""
    if file is not None:
        return read_passphrase_file(file)
    assert env is not None
    value = os.environ.get(env)
    if not value:
        raise ConfigError(f"{field}: the variable {env} is not set")
    return value.encode()


def open_signer(key: KeyConfig, *, hash_name: str | None, rsa_pss: bool, field: str) -> KeySigner:
    """The signer for ``key``; ``field`` names the configuration table in errors (e.g. ``tsu.default.key``)."""
    if key.backend == "pkcs11":
        assert key.module is not None and key.token_label is not None and key.key_label is not None
        return Pkcs11Signer.open(
            module=key.module,
            token_label=key.token_label,
            key_label=key.key_label,
            pin=secret(key.pin_file, key.pin_env, f"{field}.pin_env"),
            hash_name=hash_name,
            rsa_pss=rsa_pss,
            sessions=key.sessions,
        )
    assert key.path is not None
    private_key = load_encrypted_key(
        key.path, secret(key.passphrase_file, key.passphrase_env, f"{field}.passphrase_env")
    )
    return FileSigner(private_key, hash_name or default_signature_hash(private_key), rsa_pss=rsa_pss)
