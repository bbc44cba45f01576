"""Several stampd nodes on one PostgreSQL behind nginx, one of them killed mid-load.

SPEC TST-04 (serials unique across nodes with no coordination), OPS-09 (every token a client received is in the
records), GUIDE habit 13; issue "Evidence that scales" (every node's events and tokens are in hash chains that
`stampd audit verify` checks on the shared database, a killed node's included). nginx is Debian's, started by the
test on loopback.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import LiveTsa, free_loopback_port, run_stampd
from cryptography import x509
from test_postgres import pg_url  # noqa: F401  (the fixture: a fresh database per test)

from stampd.der.request import encode_request
from stampd.der.token_reader import read_response
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256
from stampd.verify import verify_timestamp

pytestmark = pytest.mark.integration

NODES = 3
LOAD_S = 3.0
KILL_AT_S = 1.2
OPENSSL_SAMPLE = 20
"""Tokens checked with `openssl ts -verify` too (one subprocess each); stampd's verifier checks every token."""


@dataclass(frozen=True)
class Stamp:
    """A query a client sent and the reply it got."""

    query: bytes
    digest: bytes
    nonce: int
    reply: bytes


def make_stamp_query() -> tuple[bytes, bytes, int]:
    """(DER TimeStampReq with certReq and a random nonce, its SHA-256 digest, the nonce)."""
    digest = hashlib.sha256(secrets.token_bytes(16)).digest()
    nonce = secrets.randbits(63)
    request = TimeStampRequest(1, MessageImprint(SHA256.oid, True, digest), None, nonce, True, ())
    return encode_request(request), digest, nonce


def assert_all_verify(stamps: list[Stamp], root_pem: Path, issuing_pem: Path, tmp: Path) -> None:
    """Every stamp with stampd's verifier (digest and nonce included) against the trust anchor; the first
    OPENSSL_SAMPLE also with `openssl ts -verify -queryfile` (an independent implementation)."""
    anchors = [x509.load_pem_x509_certificate(root_pem.read_bytes())]
    extra = [x509.load_pem_x509_certificate(issuing_pem.read_bytes())]
    bad = []
    for stamp in stamps:
        report = verify_timestamp(
            stamp.reply, digest=stamp.digest, anchors=anchors, extra_certs=extra, nonce=stamp.nonce
        )
        if not report.ok:
            bad.append([f"{c.name}: {c.detail}" for c in report.failures])
    assert bad == [], f"{len(bad)} of {len(stamps)} tokens do not verify: {bad[:3]}"
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.fail("the openssl command is not installed (Debian: `apt-get install -y openssl`)")
    for i, stamp in enumerate(stamps[:OPENSSL_SAMPLE]):
        query_file, reply_file = tmp / f"sample-{i}.tsq", tmp / f"sample-{i}.tsr"
        query_file.write_bytes(stamp.query)
        reply_file.write_bytes(stamp.reply)
        result = subprocess.run(
            [
                *(openssl, "ts", "-verify", "-queryfile", query_file, "-in", reply_file),
                *("-CAfile", root_pem, "-untrusted", issuing_pem),
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        assert result.returncode == 0 and "Verification: OK" in result.stdout, result.stdout + result.stderr


def audit_shared_records(config: Path) -> dict[tuple[str, str], Any]:
    """`stampd audit verify` on the shared database must pass (exit 0, "Audit: OK", no problem); returns the
    chains of its --json report by (table, chain id)."""
    text = run_stampd("audit", "verify", "-c", config, check=False)
    assert text.returncode == 0 and text.stdout.rstrip().endswith("Audit: OK"), text.stdout + text.stderr
    assert "FAILED" not in text.stdout, text.stdout
    report = json.loads(run_stampd("audit", "verify", "-c", config, "--json").stdout)
    assert report["ok"] is True and report["problems"] == [], report["problems"]
    assert not any(report["unchained"].values()), report["unchained"]
    return {(c["table"], c["chain"]): c for c in report["chains"]}


def chains_of_pid(chains: dict[tuple[str, str], Any], table: str, pid: int) -> list[dict[str, Any]]:
    """The chains of ``table`` written by the process ``pid`` (chain ids are ``<host>-<pid>-<random>``)."""
    return [c for (t, chain), c in chains.items() if t == table and re.fullmatch(rf".+-{pid}-[0-9a-f]{{8}}", chain)]


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        pytest.fail("nginx is not installed (Debian: `apt-get install -y nginx-light`); CI installs it")
    return found


def start_nginx(directory: Path, ports: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    port = free_loopback_port()
    servers = "\n".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=5s;" for p in ports)
    (directory / "logs").mkdir()
    conf = directory / "nginx.conf"
    conf.write_text(
        f"""daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/logs/error.log;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    upstream stampd {{
{servers}
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64k;
        location / {{
            proxy_pass http://stampd;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout non_idempotent;
        }}
    }}
}}
"""
    )
    process = subprocess.Popen([nginx_binary(), "-c", str(conf), "-p", str(directory)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/healthz")
            if c.getresponse().status == 200:
                c.close()
                return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    pytest.fail(f"nginx did not start: {process.stderr.read().decode() if process.stderr else ''}")


def test_three_nodes_behind_nginx_survive_a_kill_9(pg_url: str, tmp_path: Path) -> None:  # noqa: F811
    """Load through nginx on three nodes sharing one PostgreSQL; `kill -9` of one node mid-load: the others keep
    serving, every token a client received is in the records byte for byte and verifies (stampd's verifier on
    all, `openssl ts -verify` on a sample), no serial appears twice, and `stampd audit verify` passes on the shared
    database with every node's token and event chains in it, the killed node's included (its token chain holds
    exactly its rows; the others' heads are signed at their clean stop)."""
    directory = tmp_path / "tsa"
    run_stampd("init", directory)
    config = directory / "stampd.toml"
    config.write_text(re.sub(r'(?m)^url = "sqlite:///records.sqlite3"', f'url = "{pg_url}"', config.read_text()))
    run_stampd("db", "upgrade", "-c", config)
    nodes = [
        LiveTsa(name=f"node{i}", key_type="ec-p256", rsa_pss=False, dir=directory, host="127.0.0.1", port=port)
        for i, port in enumerate(free_loopback_port() for _ in range(NODES))
    ]
    for node in nodes:
        node.start()
    nginx, port = start_nginx(tmp_path, [n.port for n in nodes])
    granted: dict[int, Stamp] = {}
    serials: list[int] = []
    failures: list[int] = []
    after_kill: list[int] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + LOAD_S

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop_at:
            body, digest, nonce = make_stamp_query()
            try:
                conn.request("POST", "/", body=body, headers={"Content-Type": "application/timestamp-query"})
                response = conn.getresponse()
                reply = response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                with lock:
                    failures.append(0)
                continue
            token = read_response(reply).token if response.status == 200 else None
            with lock:
                if token is None:
                    failures.append(response.status)
                else:
                    serials.append(token.tst_info.serial)
                    granted[token.tst_info.serial] = Stamp(body, digest, nonce, reply)
                    if time.monotonic() > start + KILL_AT_S + 0.5:
                        after_kill.append(token.tst_info.serial)
        conn.close()

    victim = nodes[1].process
    assert victim is not None
    pids = [n.process.pid for n in nodes if n.process is not None]
    try:
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(KILL_AT_S)
        victim.kill()  # kill -9, mid-load
        for t in threads:
            t.join()
    finally:
        nginx.terminate()
        nginx.wait(10)
        for node in nodes:
            node.stop(check=False)

    assert len(granted) > 300 and len(after_kill) > 100, (len(granted), len(after_kill), failures[:20])
    assert len(serials) == len(granted), "a client received two tokens with the same serial"  # TST-04
    with psycopg.connect(pg_url) as db:
        rows = db.execute("SELECT serial, token, chain FROM tokens").fetchall()
    recorded = {int(serial, 16): bytes(token) for serial, token, _ in rows}
    assert len(recorded) == len(rows)  # TST-04: the primary key holds; no serial twice across the nodes
    missing = [s for s in granted if recorded.get(s) != granted[s].reply]
    assert missing == [], f"{len(missing)} tokens a client received are not in the records"
    assert len(failures) < len(granted) / 20, failures[:20]
    assert_all_verify(list(granted.values()), nodes[0].root_pem, nodes[0].issuing_pem, tmp_path)

    # every node's tokens and events are chained, the killed node's included, and the chains verify
    chains = audit_shared_records(config)
    per_chain = Counter(chain for _, _, chain in rows)
    victim_tokens = chains_of_pid(chains, "tokens", victim.pid)
    assert len(victim_tokens) == 1 and victim_tokens[0]["count"] == per_chain[victim_tokens[0]["chain"]] > 0
    for pid in pids:
        assert chains_of_pid(chains, "events", pid), f"the events of node pid {pid} (service.started) are not chained"
        (token_chain,) = chains_of_pid(chains, "tokens", pid)
        if pid != victim.pid:  # stopped cleanly: the chain heads were signed at stop
            assert token_chain["checkpointed_seq"] == token_chain["head"][0] > 0, token_chain
    token_chains = [c for (table, _), c in chains.items() if table == "tokens"]
    assert len(token_chains) == NODES and sum(c["count"] for c in token_chains) == len(rows)
