"""Several stampd nodes on one PostgreSQL behind nginx, one of them killed mid-load.

SPEC TST-04 (serials unique across nodes with no coordination), OPS-09 (every token a client received is in the
records), GUIDE habit 13. nginx is Debian's, started by the test on loopback.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import secrets
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest
from conftest import LiveTsa, free_loopback_port, run_stampd
from test_postgres import pg_url  # noqa: F401  (the fixture: a fresh database per test)

from stampd.der.request import encode_request
from stampd.der.token_reader import read_response
from stampd.model import MessageImprint, TimeStampRequest
from stampd.oids import SHA256

pytestmark = pytest.mark.integration

NODES = 3
LOAD_S = 3.0
KILL_AT_S = 1.2


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
    serving, every token a client received is in the records byte for byte, and no serial appears twice."""
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
    granted: dict[int, bytes] = {}
    failures: list[int] = []
    after_kill: list[int] = []
    lock = threading.Lock()
    start = time.monotonic()
    stop_at = start + LOAD_S

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop_at:
            digest = hashlib.sha256(secrets.token_bytes(16)).digest()
            body = encode_request(TimeStampRequest(1, MessageImprint(SHA256.oid, True, digest), None, 1, True, ()))
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
                    granted[token.tst_info.serial] = reply
                    if time.monotonic() > start + KILL_AT_S + 0.5:
                        after_kill.append(token.tst_info.serial)
        conn.close()

    try:
        threads = [threading.Thread(target=client) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(KILL_AT_S)
        victim = nodes[1].process
        assert victim is not None
        victim.kill()  # kill -9, mid-load
        for t in threads:
            t.join()
    finally:
        nginx.terminate()
        nginx.wait(10)
        for node in nodes:
            node.stop(check=False)

    assert len(granted) > 300 and len(after_kill) > 100, (len(granted), len(after_kill), failures[:20])
    with psycopg.connect(pg_url) as db:
        rows = db.execute("SELECT serial, token FROM tokens").fetchall()
    recorded = {int(serial, 16): bytes(token) for serial, token in rows}
    assert len(recorded) == len(rows)  # TST-04: the primary key holds; no serial twice across the nodes
    missing = [s for s in granted if recorded.get(s) != granted[s]]
    assert missing == [], f"{len(missing)} tokens a client received are not in the records"
    assert len(failures) < len(granted) / 20, failures[:20]
