"""Two stampd nodes on one PostgreSQL, each with a TSU of its own (key file) and one TSU shared by both whose key
is in an HSM (SoftHSM2: one token, one key, used by both processes at once).

SPEC TST-04 (serials unique across nodes with no coordination), OPS-07 (HSM keys), OPS-09 (every token a client
received is in the records); issue "Evidence that scales" (several nodes share one PostgreSQL and serve their own
TSUs or share one whose key is in an HSM; every node's events are in chains that `stampd audit verify` checks).
Each node has a directory of its own, as on another host: its configuration names only its TSUs, and it holds only
their keys.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import secrets
import shutil
import sys
import threading
import time
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from conftest import TIMESTAMP_QUERY, LiveTsa, free_loopback_port, run_stampd
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_multinode import (
    OPENSSL_SAMPLE,
    Stamp,
    assert_all_verify,
    audit_shared_records,
    chains_of_pid,
    make_stamp_query,
)
from test_postgres import pg_url  # noqa: F401  (the fixture: a fresh database per test)
from test_tsus import ess_cert_id, issue_tsu_certificate, signer_serial

from stampd.der.token_reader import read_response

sys.path.insert(0, str(Path(__file__).parents[1]))

from hsm import TOKEN_KEYS, SoftHsm, softhsm

__all__ = ["softhsm"]  # the session fixture, re-exported so pytest finds it here

pytestmark = pytest.mark.integration

LOAD_S = 1.2
CLIENTS_PER_NODE = 3
OWN_TSU = {"a": "alpha", "b": "beta"}
"""Each node's TSU of its own (file key); both serve "shared" (PKCS#11 key)."""


@dataclass(frozen=True)
class Exchange:
    node: str
    path: str
    status: int | None
    stamp: Stamp | None
    error: str | None = None


def drop_tsu(text: str, tsu: str) -> str:
    """The configuration without the [tsu.NAME] and [tsu.NAME.key] tables."""
    edited, count = re.subn(rf"(?ms)^\[tsu\.{tsu}(\.key)?\]\n.*?(?=^\[|\Z)", "", text)
    assert count == 2, f"[tsu.{tsu}] and its key table: {count} tables found"
    return edited


def pkcs11_shared_key(text: str, hsm: SoftHsm, key_label: str) -> str:
    """Replace [tsu.shared.key] (the last table `stampd init --tsu ... --tsu shared` writes) with a PKCS#11 key."""
    table = (
        "[tsu.shared.key]\n"
        'backend = "pkcs11"\n'
        f"module = {json.dumps(str(hsm.module))}\n"
        f'token_label = "{TOKEN_KEYS}"\n'
        f'key_label = "{key_label}"\n'
        'pin_file = "secrets/hsm.pin"\n'
    )
    edited, count = re.subn(r"(?ms)^\[tsu\.shared\.key\]\n.*\Z", table, text)
    assert count == 1
    return edited


def prepare_base(base: Path, pg_url: str, hsm: SoftHsm) -> LiveTsa:  # noqa: F811
    """One demo PKI with TSUs alpha, beta and shared; shared's key generated in the HSM with `stampd tsu keygen`,
    certified by the demo issuing CA and installed with `install-cert`; records on the shared PostgreSQL."""
    run_stampd("init", base, "--key-type", "ec-p256", "--tsu", "alpha", "--tsu", "beta", "--tsu", "shared")
    tsa = LiveTsa(name="base", key_type="ec-p256", rsa_pss=False, dir=base, host="127.0.0.1", port=0)
    text = re.sub(r'(?m)^url = "sqlite:///records.sqlite3"', f'url = "{pg_url}"', tsa.config.read_text())
    tsa.config.write_text(pkcs11_shared_key(text, hsm, f"multinode-{secrets.token_hex(4)}"))
    pin = base / "secrets" / "hsm.pin"
    pin.write_text(hsm.tokens[TOKEN_KEYS] + "\n")
    pin.chmod(0o600)
    (base / "records.sqlite3").unlink()
    tsa.stampd("db", "upgrade")
    tsa.stampd("tsu", "keygen", "shared", "--key-type", "ec-p256")
    tsa.stampd("tsu", "csr", "shared", "-o", base / "shared.csr")
    issue_tsu_certificate(tsa, base / "shared.csr", base / "shared-cert.pem")
    tsa.stampd("tsu", "install-cert", "shared", base / "shared-cert.pem")
    return tsa


def node_directory(base: LiveTsa, directory: Path, node: str) -> LiveTsa:
    """A copy of the base directory for ``node``: without the other node's TSU in the configuration or its key and
    passphrase files on disk."""
    shutil.copytree(base.dir, directory)
    tsa = LiveTsa(
        name=f"node-{node}",
        key_type="ec-p256",
        rsa_pss=False,
        dir=directory,
        host="127.0.0.1",
        port=free_loopback_port(),
    )
    (other,) = [t for n, t in OWN_TSU.items() if n != node]
    key = tomllib.loads(base.config.read_text())["tsu"][other]["key"]
    (directory / key["path"]).unlink()
    (directory / key["passphrase_file"]).unlink()
    tsa.config.write_text(drop_tsu(tsa.config.read_text(), other))
    return tsa


def certificate_of(tsa: LiveTsa, tsu: str) -> x509.Certificate:
    path = tomllib.loads(tsa.config.read_text())["tsu"][tsu]["certificate"]
    return x509.load_pem_x509_certificate((tsa.dir / path).read_bytes())


def post(path: str, body: bytes, conn: http.client.HTTPConnection) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={"Content-Type": TIMESTAMP_QUERY})
    response = conn.getresponse()
    return response.status, response.read()


def test_two_nodes_own_tsus_and_a_shared_hsm_tsu(pg_url: str, softhsm: SoftHsm, tmp_path: Path) -> None:  # noqa: F811
    """TST-04, OPS-07, OPS-09: nodes a and b on one PostgreSQL; a serves alpha (key file) and shared, b serves beta
    (key file) and shared, shared's key being one SoftHSM2 key both processes sign with. Concurrent clients on both
    nodes and all their paths: every request is granted; shared tokens from both nodes are signed by the one HSM
    certificate (SignerInfo sid, ESSCertIDv2), alpha's and beta's by their own; a node answers 404 for the other's
    TSU; no serial appears twice; every token verifies (stampd's verifier on all, OpenSSL on a sample) and is in the
    records byte for byte, under its TSU, in the chain of the node that issued it; `stampd audit verify` passes
    with both nodes' chains."""
    base = prepare_base(tmp_path / "base", pg_url, softhsm)
    nodes = {name: node_directory(base, tmp_path / f"node-{name}", name) for name in OWN_TSU}
    certificates = {tsu: certificate_of(base, tsu) for tsu in ("alpha", "beta", "shared")}
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert len({c.public_key().public_bytes(*spki) for c in certificates.values()}) == 3  # three keys

    exchanges: list[Exchange] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(node: str, index: int) -> None:
        tsa = nodes[node]
        paths = [f"/{OWN_TSU[node]}", "/shared"]
        conn = tsa.connection(timeout=10)
        i = index
        while not stop.is_set():
            path = paths[i % 2]
            i += 1
            body, digest, nonce = make_stamp_query()
            try:
                status, reply = post(path, body, conn)
                exchange = Exchange(node, path, status, Stamp(body, digest, nonce, reply))
            except (OSError, http.client.HTTPException) as e:
                exchange = Exchange(node, path, None, None, f"{type(e).__name__}: {e}")
                conn.close()
                conn = tsa.connection(timeout=10)
            with lock:
                exchanges.append(exchange)
        conn.close()

    try:
        for tsa in nodes.values():
            tsa.start()
        pids = {name: tsa.process.pid for name, tsa in nodes.items() if tsa.process is not None}
        threads = [threading.Thread(target=client, args=(node, i)) for node in nodes for i in range(CLIENTS_PER_NODE)]
        for t in threads:
            t.start()
        time.sleep(LOAD_S / 2)
        # under load: a node does not serve the other node's TSU
        for node, other in (("a", "beta"), ("b", "alpha")):
            conn = nodes[node].connection()
            status, _ = post(f"/{other}", make_stamp_query()[0], conn)
            conn.close()
            assert status == 404, f"node {node} answered {status} for /{other}"
        time.sleep(LOAD_S / 2)
        stop.set()
        for t in threads:
            t.join(30)
        for tsa in nodes.values():
            tsa.check_records = False  # its records are on PostgreSQL: checked below
            tsa.stop()  # clean exit, graceful shutdown, no traceback in the log
    finally:
        stop.set()
        for tsa in nodes.values():
            tsa.stop(check=False)

    failed = [(e.node, e.path, e.status, e.error) for e in exchanges if e.status != 200]
    assert failed == [], f"{len(failed)} of {len(exchanges)} requests failed: {failed[:5]}"
    by_path = Counter((e.node, e.path) for e in exchanges)
    assert set(by_path) == {("a", "/alpha"), ("a", "/shared"), ("b", "/beta"), ("b", "/shared")}
    assert min(by_path.values()) > 20, by_path

    serials: list[int] = []
    issued: dict[int, tuple[str, str, Stamp]] = {}
    for e in exchanges:
        assert e.stamp is not None
        response = read_response(e.stamp.reply)
        assert response.token is not None, (e.node, e.path, response.status)
        tsu = e.path.removeprefix("/")
        certificate = certificates[tsu]
        assert signer_serial(e.stamp.reply) == certificate.serial_number, (e.node, e.path)
        cert_hash, _ = ess_cert_id(e.stamp.reply)
        assert cert_hash == hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()
        serial = response.token.tst_info.serial
        serials.append(serial)
        issued[serial] = (e.node, tsu, e.stamp)
    assert len(set(serials)) == len(serials), "two tokens with the same serial"  # TST-04
    groups: dict[tuple[str, str], list[Stamp]] = {}
    for node, tsu, stamp in issued.values():
        groups.setdefault((node, tsu), []).append(stamp)
    per_group = OPENSSL_SAMPLE // len(groups)  # the OpenSSL sample covers every node and TSU
    sample_first = [s for g in groups.values() for s in g[:per_group]] + [
        s for g in groups.values() for s in g[per_group:]
    ]
    assert_all_verify(sample_first, base.root_pem, base.issuing_pem, tmp_path)

    chains = audit_shared_records(base.config)
    chain_of = {node: chains_of_pid(chains, "tokens", pid)[0]["chain"] for node, pid in pids.items()}
    for node, pid in pids.items():
        assert chains_of_pid(chains, "events", pid), f"node {node}'s events are not chained"
        (token_chain,) = chains_of_pid(chains, "tokens", pid)
        assert token_chain["checkpointed_seq"] == token_chain["head"][0] > 0, token_chain  # signed at stop
    with psycopg.connect(pg_url) as db:
        rows = db.execute("SELECT serial, token, tsu, chain FROM tokens").fetchall()
    recorded = {int(serial, 16): (bytes(token), tsu, chain) for serial, token, tsu, chain in rows}
    assert len(recorded) == len(rows) == len(issued)
    wrong = [
        hex(serial)
        for serial, (node, tsu, stamp) in issued.items()
        if recorded.get(serial) != (stamp.reply, tsu, chain_of[node])
    ]
    assert wrong == [], f"{len(wrong)} tokens are not in the records as issued (bytes, TSU, node's chain)"
    with psycopg.connect(pg_url) as db:
        stopped = [
            json.loads(d)["pid"] for (d,) in db.execute("SELECT detail FROM events WHERE kind = 'service.stopped'")
        ]
    assert sorted(stopped) == sorted(pids.values())
