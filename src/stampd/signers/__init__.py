"""Signer adapters: each key backend implements :class:`stampd.ports.Signer`."""

from stampd.signers.keyfile import (
    DEFAULT_KEY_TYPE,
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

__all__ = [
    "DEFAULT_KEY_TYPE",
    "FileSigner",
    "KeyType",
    "PrivateKey",
    "PublicKey",
    "default_signature_hash",
    "generate_private_key",
    "load_encrypted_key",
    "new_passphrase",
    "read_passphrase_file",
    "write_encrypted_key",
    "write_passphrase_file",
]
