"""Regenerate stampd's own golden vectors (run from the repository root: python tests/vectors/stampd/generate.py).

The TSU key is Ed25519, whose signatures are deterministic (RFC 8032), so a token made from the same key,
certificates, time, serial and nonce is the same bytes every time: tests rebuild it and compare.
Run this only when the token layout changes on purpose, and say why in the commit.
"""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from golden import GOLDEN_NOW, build_golden_responses, golden_requests  # noqa: E402

from stampd.pki.demo import create_demo_pki  # noqa: E402
from stampd.signers.keyfile import KeyType  # noqa: E402


def main() -> None:
    pki_dir = HERE / "pki"
    if not (pki_dir / "pki" / "tsu.pem").exists():
        create_demo_pki(
            pki_dir,
            key_type=KeyType.ED25519,
            rsa_pss=False,
            organization="stampd test vectors",
            country="XX",
            tsu_name="golden",
            now=datetime(2026, 1, 1, tzinfo=UTC),
        )
    for name, der in golden_requests().items():
        (HERE / name).write_bytes(der)
    for name, der in build_golden_responses(pki_dir).items():
        (HERE / name).write_bytes(der)
    print(f"wrote vectors for genTime {GOLDEN_NOW}")


if __name__ == "__main__":
    main()
