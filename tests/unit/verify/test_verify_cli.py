"""`stampd verify` on the third-party vectors: verdict lines, exit status, --json (README expected verdicts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from stampd.cli.main import cli

VECTORS = Path(__file__).parents[2] / "vectors" / "third_party" / "rfc3161-client"


@pytest.fixture
def sigstage(tmp_path: Path) -> tuple[Path, Path, Path]:
    chain = x509.load_pem_x509_certificates((VECTORS / "sigstage" / "ts_chain.pem").read_bytes())
    (tmp_path / "root.pem").write_bytes(chain[1].public_bytes(Encoding.PEM))
    (tmp_path / "tsu.pem").write_bytes(chain[0].public_bytes(Encoding.PEM))
    (tmp_path / "data").write_bytes(b"hello")
    return tmp_path / "root.pem", tmp_path / "tsu.pem", tmp_path / "data"


def run(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.output


def test_verify_ok_prints_each_check_and_the_tsu(sigstage: tuple[Path, Path, Path]) -> None:
    root, _, data = sigstage
    code, out = run("verify", VECTORS / "sigstage" / "response-sha256.tsr", "--data", data, "--ca", root)
    assert code == 0, out
    assert "[     ok] signature: ECDSA (secp384r1) with SHA256 verifies" in out
    assert "TSU:     CN=sigstore-tsa,O=sigstore.dev" in out
    assert "genTime: 2025-05-09T11:58:55+00:00" in out
    assert out.rstrip().endswith("Verification: OK")


def test_verify_invalid_signature_exits_1(sigstage: tuple[Path, Path, Path]) -> None:
    root, _, data = sigstage
    code, out = run("verify", VECTORS / "sigstage" / "response-invalid-signature.tsr", "--data", data, "--ca", root)
    assert code == 1
    assert "[ FAILED] signature" in out and "Verification: FAILED" in out


def test_verify_no_embedded_cert_with_certs_option_json(sigstage: tuple[Path, Path, Path]) -> None:
    root, tsu, data = sigstage
    tsr = VECTORS / "sigstage" / "response-no-embedded-cert.tsr"
    code, out = run("verify", tsr, "--data", data, "--ca", root, "--json")
    assert code == 1 and json.loads(out)["ok"] is False
    code, out = run("verify", tsr, "--data", data, "--ca", root, "--certs", tsu, "--json")
    report = json.loads(out)
    assert code == 0 and report["ok"] is True and report["tsu"] == "CN=sigstore-tsa,O=sigstore.dev"
    assert {c["name"]: c["outcome"] for c in report["checks"]}["signer"] == "ok"


def test_verify_identrust_with_der_anchor_and_digest() -> None:
    digest = "9b71d224bd62f3785d96d46ad3ea3d73319bfbc2890caadae2dff72519673ca7"
    digest += "2323c3d99ba5c11d7c7acc6e14b8c5da0c4663475c2e5c3adef46f73bcdec043"
    code, out = run(
        "verify",
        VECTORS / "identrust" / "issue-104.tsr",
        "--digest",
        digest,
        "--ca",
        VECTORS / "identrust" / "ts_chain.pem",
        "--nonce",
        "0x75C3B3214AC39FBB",
    )
    assert code == 0, out
    assert "TSU:     CN=TrustID Timestamp Authority,O=IdenTrust,C=US" in out


def test_verify_needs_exactly_one_of_data_and_digest(sigstage: tuple[Path, Path, Path]) -> None:
    root, _, _ = sigstage
    code, out = run("verify", VECTORS / "sigstage" / "response-sha256.tsr", "--ca", root)
    assert code == 2 and "exactly one of --data and --digest" in out
