"""HTTP transport and `stampd stamp` against a loopback TSA stub (SPEC TRN-01/02/03/07, RFC 3161 §3.4)."""

from __future__ import annotations

import hashlib
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.serialization import Encoding

from stampd.cli.main import cli
from stampd.client import build_request, post_request
from stampd.der.request import decode_request
from stampd.der.token_reader import read_response
from stampd.errors import StampdError

sys.path.insert(0, str(Path(__file__).parents[1] / "verify"))
import tsakit as k

PKI = k.make_pki("ec")
SEEN: list[tuple[str, str, bytes]] = []


class Stub(BaseHTTPRequestHandler):
    """/tsa answers like a TSA (token for the posted nonce); the other paths misbehave one way each."""

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        SEEN.append((self.path, self.headers["Content-Type"], body))
        if self.path == "/tsa":
            request = decode_request(body)
            spec = k.TokenSpec(nonce=request.nonce, gen_time="20250601120000Z")
            self._send(200, "application/timestamp-reply", k.build_response(k.build_token(PKI, spec)))
        elif self.path == "/wrong-nonce":
            self._send(200, "application/timestamp-reply", k.build_response(k.build_token(PKI, k.TokenSpec(nonce=1))))
        elif self.path == "/html":
            self._send(200, "text/html", b"<html>oops</html>")
        else:
            self._send(503, "text/plain", b"down")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_post_request_sends_the_query_type_and_returns_the_der_reply_trn_01(base_url: str) -> None:
    _, body = build_request(hashlib.sha256(b"hello").digest(), "sha256", 42)
    reply = post_request(base_url + "/tsa", body)
    assert SEEN[-1] == ("/tsa", "application/timestamp-query", body)
    token = read_response(reply).token
    assert token is not None and token.tst_info.nonce == 42


@pytest.mark.parametrize(("path", "needle"), [("/html", "Content-Type 'text/html'"), ("/down", "HTTP 503")])
def test_post_request_refuses_non_timestamp_replies_trn_02_trn_03(base_url: str, path: str, needle: str) -> None:
    with pytest.raises(StampdError, match=needle):
        post_request(base_url + path, b"\x30\x00")


def test_post_request_connection_failure_is_a_stampd_error() -> None:
    with pytest.raises(StampdError, match="request failed"):
        post_request("http://127.0.0.1:9/", b"", timeout=2)
    with pytest.raises(StampdError, match="not an http"):
        post_request("ftp://example.org/", b"")


def test_stamp_writes_the_reply_and_verifies_it(base_url: str, tmp_path: Path) -> None:
    data = tmp_path / "doc.txt"
    data.write_bytes(b"hello")
    anchors = tmp_path / "root.pem"
    anchors.write_bytes(PKI.root.public_bytes(Encoding.PEM) + PKI.ca.public_bytes(Encoding.PEM))
    result = CliRunner().invoke(cli, ["stamp", str(data), "--url", base_url + "/tsa", "--ca", str(anchors)])
    assert result.exit_code == 0, result.output
    written = (tmp_path / "doc.txt.tsr").read_bytes()
    sent = decode_request(SEEN[-1][2])
    assert sent.cert_req is True and sent.nonce is not None and sent.nonce >= 2**63
    token = read_response(written).token
    assert token is not None and token.tst_info.nonce == sent.nonce  # exactly the DER reply was written
    assert "Verification: OK" in result.output
    assert "TSU:     CN=TSU,O=Example TSA,C=DE" in result.output


def test_stamp_refuses_a_reply_with_another_nonce(base_url: str, tmp_path: Path) -> None:
    data = tmp_path / "doc.txt"
    data.write_bytes(b"hello")
    out = tmp_path / "out.tsr"
    result = CliRunner().invoke(cli, ["stamp", str(data), "--url", base_url + "/wrong-nonce", "-o", str(out)])
    assert result.exit_code != 0
    assert "nonce" in str(result.exception)
    assert not out.exists()
