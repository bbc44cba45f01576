"""stampd throughput benchmark, measured the way the project's bar is stated.

For each key type: a fresh demo TSA (``stampd init``), ``stampd serve`` pinned to one core, the load generator
pinned to the other over keep-alive HTTP, then the raw signature rate of the same key in one Python process
on the server's core, so that the tokens/raw ratio says how much the server costs beyond the signature.

With ``--access subscribers`` the TSU serves subscribers only: the benchmark adds a subscriber with an API token
and a quota too large to run out (and ``--rate`` if given), and every request carries its ``Authorization: Bearer``,
so each token also costs a reservation in the usage ledger (``--ledger``). ``--access`` is repeatable: each key type
is then measured once per access mode, one after the other.

Usage: ``python benchmarks/run.py [--key-type ec-p256 --key-type rsa-3072] [--access public --access subscribers]
[--ledger records|redis://HOST:PORT/DB] [--records postgresql://...] [--json FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from loadgen import LoadConfig, format_result, run_load

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")
DEFAULT_KEY_TYPES = ("ec-p256", "rsa-3072")
ACCESS_MODES = ("public", "subscribers")
BENCH_QUOTA = "1000000000/month"
"""The benchmark subscriber's quota: counted on every request, never reached."""
EC_P256_TARGET_TOKENS_PER_S = 3000.0
RSA_3072_TARGET_RATIO = 0.80
SIGNED_MESSAGE = os.urandom(200)
"""About the size of a token's DER signed attributes, which is what the server signs."""

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


@dataclass
class KeyTypeResult:
    key_type: str
    access: str
    """``public``, or ``subscribers (<ledger>)``."""
    signature: str
    load: dict[str, Any]
    raw_signs_per_s: float
    ratio: float
    bar: str
    records: str
    records_rows: int | None
    server_exit: int | None
    server_core: float | None
    """Busy share of the server's core, whoever used it: above the server's own share means contention."""
    notes: list[str] = field(default_factory=list)


def stampd_command() -> list[str]:
    """The ``stampd`` console script of this interpreter's environment, else the entry point through it."""
    script = Path(sys.executable).with_name("stampd")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-c", "from stampd.cli.main import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_healthy(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 30.0) -> None:
    """Block until GET /healthz answers 200; fail early, with the server's log, if it exits."""
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{port}/healthz"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"stampd serve exited with {proc.returncode}:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"stampd serve not healthy after {timeout:g} s:\n{tail(log)}")


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGTERM, as an operator would, so the records are flushed; SIGKILL only if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def configure_records(cmd: list[str], config_path: Path, url: str) -> None:
    """Point the TSA at the records database ``url`` (an existing database, e.g. PostgreSQL) and migrate it."""
    text = config_path.read_text()
    old = 'url = "sqlite:///records.sqlite3"'
    if old not in text:
        raise RuntimeError(f"{config_path}: no default records url to replace")
    config_path.write_text(text.replace(old, f"url = {json.dumps(url)}", 1))
    subprocess.run([*cmd, "db", "upgrade", "-c", str(config_path)], check=True, stdout=subprocess.DEVNULL)


def configure_subscribers(
    cmd: list[str], config_path: Path, ledger: str, quota: str, rate: int | None
) -> tuple[str, str]:
    """Make the TSU serve subscribers only, counted in ``ledger``, and add one subscriber with an API token, a
    quota and optionally a rate; its name (unique, so runs can share a records database or a Redis) and token."""
    text = config_path.read_text()
    table = "[tsu.default]\n"
    if table not in text:
        raise RuntimeError(f"{config_path}: no [tsu.default] table")
    text = text.replace(table, f'{table}access = "subscribers"\n', 1)
    config_path.write_text(f"{text}\n[access]\nledger = {json.dumps(ledger)}\n")
    name = f"bench-{secrets.token_hex(4)}"
    limits = ["--quota", quota] + ([] if rate is None else ["--rate", f"{rate}/s"])
    added = subprocess.run(
        [*cmd, "subscribers", "add", name, "--token", *limits, "-c", str(config_path)],
        check=True,
        capture_output=True,
        text=True,
    )
    token = added.stdout.strip().splitlines()[-1]
    if not token.startswith("stampd_"):
        raise RuntimeError(f"stampd subscribers add printed no API token:\n{added.stdout}")
    return name, token


def tsu_settings(config_path: Path) -> dict[str, Any]:
    """What the server signs with and where it records, read from the stampd.toml that init wrote."""
    conf = tomllib.loads(config_path.read_text())
    base = config_path.parent
    tsu = conf.get("tsu", {}).get("default", {})
    key = tsu.get("key", {})
    url = str(conf.get("records", {}).get("url", "sqlite:///records.sqlite3"))
    records = base / url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    return {
        "key_path": base / key.get("path", "pki/tsu-key.pem"),
        "passphrase_path": base / key.get("passphrase_file", "secrets/tsu.pass"),
        "signature_hash": tsu.get("signature_hash"),
        "rsa_pss": bool(tsu.get("rsa_pss", False)),
        "records": records,
    }


def read_passphrase(path: Path) -> bytes:
    """The file's one line, without the trailing newline (as the server reads it)."""
    data = path.read_bytes()
    return data.removesuffix(b"\n").removesuffix(b"\r")


def raw_sign_rate(settings: dict[str, Any], key_type: str, seconds: float) -> tuple[float, str]:
    """Signatures per second of the TSU key, signing as the server does, in this one Python process."""
    key = serialization.load_pem_private_key(
        settings["key_path"].read_bytes(), password=read_passphrase(settings["passphrase_path"])
    )
    default_hash = "sha384" if key_type == "ec-p384" else "sha512" if key_type == "ed25519" else "sha256"
    hash_name = settings["signature_hash"] or default_hash
    msg = SIGNED_MESSAGE
    if isinstance(key, ed25519.Ed25519PrivateKey):
        name = "Ed25519"

        def sign() -> None:
            key.sign(msg)

    elif isinstance(key, rsa.RSAPrivateKey):
        algorithm = _HASHES[hash_name]()
        if settings["rsa_pss"]:
            pad: padding.AsymmetricPadding = padding.PSS(padding.MGF1(algorithm), algorithm.digest_size)
            name = f"RSASSA-PSS-{hash_name}"
        else:
            pad, name = padding.PKCS1v15(), f"RSA PKCS#1 v1.5 {hash_name}"

        def sign() -> None:
            key.sign(msg, pad, algorithm)

    elif isinstance(key, ec.EllipticCurvePrivateKey):
        ecdsa = ec.ECDSA(_HASHES[hash_name]())
        name = f"ECDSA {key.curve.name} {hash_name}"

        def sign() -> None:
            key.sign(msg, ecdsa)

    else:
        raise RuntimeError(f"unexpected TSU key {type(key).__name__}")
    for _ in range(20):  # warm caches and lazy initialisation
        sign()
    count, start = 0, time.perf_counter()
    deadline = start + seconds
    while (now := time.perf_counter()) < deadline:
        for _ in range(8):
            sign()
        count += 8
    return count / (now - start), name


def count_records(path: Path | str) -> tuple[str, int | None]:
    """The rows of the tokens table: of the SQLite file, or of the database at a URL (through SQLAlchemy)."""
    if isinstance(path, str):
        return count_records_at(path)
    if not path.is_file():
        return "not checked (no SQLite records file)", None
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
            if not db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='tokens'").fetchone():
                return "not checked (no tokens table)", None
            rows: int = db.execute("SELECT count(*) FROM tokens").fetchone()[0]
    except sqlite3.Error as e:
        return f"not checked ({e})", None
    return "counted", rows


def count_records_at(url: str) -> tuple[str, int | None]:
    from sqlalchemy import create_engine, text  # noqa: PLC0415  (only for a records URL)

    from stampd.records.engine import records_url  # noqa: PLC0415

    engine = create_engine(records_url(url))
    try:
        with engine.connect() as db:
            rows = int(db.execute(text("SELECT count(*) FROM tokens")).scalar_one())
    except Exception as e:  # a measurement, not a check: say why it was not counted
        return f"not checked ({type(e).__name__})", None
    finally:
        engine.dispose()
    return "counted", rows


def bar_verdict(key_type: str, tokens_per_s: float, ratio: float) -> str:
    if key_type == "ec-p256":
        ok = tokens_per_s >= EC_P256_TARGET_TOKENS_PER_S
        return f"{'PASS' if ok else 'FAIL'} (>= {EC_P256_TARGET_TOKENS_PER_S:,.0f} tokens/s)"
    if key_type == "rsa-3072":
        return f"{'PASS' if ratio >= RSA_3072_TARGET_RATIO else 'FAIL'} (>= {RSA_3072_TARGET_RATIO:.0%} of raw)"
    return "-"


def bench_key_type(
    args: argparse.Namespace, key_type: str, access: str, server_cpu: int | None, client_cpu: int | None
) -> KeyTypeResult:
    """One fresh TSA, one load run, one raw-signature run; the TSA directory is removed unless --keep."""
    home = Path(tempfile.mkdtemp(prefix=f"stampd-bench-{key_type}-{access}-"))
    tsa = home / "tsa"
    port = free_port()
    cmd = stampd_command()
    subprocess.run(
        [*cmd, "init", str(tsa), "--key-type", key_type, "--listen", f"127.0.0.1:{port}"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    config_path = tsa / "stampd.toml"
    if args.records:
        configure_records(cmd, config_path, args.records)
    headers: tuple[str, ...] = ()
    label = "public"
    if access == "subscribers":
        name, token = configure_subscribers(cmd, config_path, args.ledger, args.quota, args.rate)
        headers = (f"Authorization: Bearer {token}",)
        label = f"subscribers ({args.ledger.split('://')[0]})"
        print(f"[{key_type}] subscriber {name}: quota {args.quota}" + (f", rate {args.rate}/s" if args.rate else ""))
    settings = tsu_settings(config_path)
    rows_before = count_records(settings["records"])[1] if isinstance(settings["records"], str) else 0
    log = home / "serve.log"
    notes: list[str] = []

    if server_cpu is not None:  # the server inherits this affinity, its workers and threads too
        os.sched_setaffinity(0, {server_cpu})
    with log.open("wb") as log_file:
        proc = subprocess.Popen(
            [*cmd, "serve", "-c", str(config_path), "--listen", f"127.0.0.1:{port}"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_healthy(proc, port, log)
        if client_cpu is not None:
            os.sched_setaffinity(0, {client_cpu})
        load = run_load(
            LoadConfig(
                host="127.0.0.1",
                port=port,
                connections=args.connections,
                pipeline=args.pipeline,
                duration=args.duration,
                warmup=args.warmup,
                use_uvloop=not args.no_uvloop,
                server_pid=proc.pid,
                server_cpus=() if server_cpu is None else (server_cpu,),
                headers=headers,
            )
        )
    finally:
        server_exit = stop(proc)
    if server_exit not in (0, -signal.SIGTERM):
        notes.append(f"stampd serve exited with {server_exit}:\n{tail(log)}")
    print(f"\n[{key_type}, {label}] {format_result(load)}")

    records, rows = count_records(settings["records"])
    if rows is not None and rows_before is not None:
        rows -= rows_before  # a shared database: only this run's
        received = load.tokens_received_total
        records = f"{rows} rows / {received} received: " + (
            "match" if rows == received else "MORE recorded than received" if rows > received else "MISSING RECORDS"
        )

    if server_cpu is not None:
        os.sched_setaffinity(0, {server_cpu})
    raw, signature = raw_sign_rate(settings, key_type, args.sign_seconds)
    ratio = load.tokens_per_s / raw if raw else 0.0
    print(f"[{key_type}] raw {signature}: {raw:,.0f} signatures/s; tokens/raw = {ratio:.2f}; records: {records}")

    if args.keep:
        print(f"[{key_type}] kept {home}")
    else:
        shutil.rmtree(home, ignore_errors=True)
    return KeyTypeResult(
        key_type=key_type,
        access=label,
        signature=signature,
        load=load.to_dict(),
        raw_signs_per_s=raw,
        ratio=ratio,
        bar=bar_verdict(key_type, load.tokens_per_s, ratio),
        records=records,
        records_rows=rows,
        server_exit=server_exit,
        server_core=load.cores[str(server_cpu)]["busy"] if str(server_cpu) in load.cores else None,
        notes=notes + load.notes,
    )


def format_table(results: list[KeyTypeResult]) -> str:
    header = (
        "key type",
        "access",
        "tokens/s",
        "p50 ms",
        "p99 ms",
        "errors",
        "raw sign/s",
        "tokens/raw",
        "bar",
        "saturation",
    )
    rows = [header]
    for r in results:
        load = r.load
        srv = load["server_cpu"]
        saturation = "server ?" if srv is None else f"server {srv:.0%}" + ("" if srv >= 0.9 else " (NOT saturated)")
        if r.server_core is not None:
            saturation += f", its core {r.server_core:.0%}"
        saturation += f", generator {load['generator_cpu']:.0%}"
        rows.append(
            (
                r.key_type,
                r.access,
                f"{load['tokens_per_s']:,.0f}",
                f"{load['latency_ms']['p50']:.1f}",
                f"{load['latency_ms']['p99']:.1f}",
                str(load["error_count"]),
                f"{r.raw_signs_per_s:,.0f}",
                f"{r.ratio:.2f}",
                r.bar,
                saturation,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def pick_cpus(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """Server and generator each on a core of their own; unpinned (with a warning) on a one-core machine."""
    allowed = sorted(os.sched_getaffinity(0))
    server = args.server_cpu if args.server_cpu is not None else allowed[0]
    client = args.client_cpu if args.client_cpu is not None else next((c for c in allowed if c != server), None)
    if client is None or client == server:
        print("warning: fewer than two usable CPUs: server and generator share a core; numbers are not comparable")
        return None, None
    return server, client


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key-type", action="append", choices=KEY_TYPES, help="repeatable; default ec-p256 and rsa-3072")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per key type")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before")
    p.add_argument("--connections", type=int, default=64, help="concurrent keep-alive connections")
    p.add_argument("--pipeline", type=int, default=1, help="requests in flight per connection")
    p.add_argument("--no-uvloop", action="store_true", help="run the generator on the stock asyncio loop")
    p.add_argument("--sign-seconds", type=float, default=3.0, help="length of the raw signature run")
    p.add_argument("--server-cpu", type=int, help="CPU for the server and the raw signatures (default: first)")
    p.add_argument("--client-cpu", type=int, help="CPU for the load generator (default: second)")
    p.add_argument("--keep", action="store_true", help="keep each temporary TSA directory (records, logs)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument(
        "--access", action="append", choices=ACCESS_MODES, help="public or subscribers, repeatable (default public)"
    )
    p.add_argument(
        "--ledger", default="records", help="usage ledger of --access subscribers: records or redis://HOST:PORT/DB"
    )
    p.add_argument("--quota", default=BENCH_QUOTA, help=f"the subscriber's quota (default {BENCH_QUOTA})")
    p.add_argument("--rate", type=int, help="the subscriber's rate limit per second (default none)")
    p.add_argument("--records", metavar="URL", help="records database (an existing one, e.g. postgresql://...)")
    args = p.parse_args(argv)

    server_cpu, client_cpu = pick_cpus(args)
    original_affinity = os.sched_getaffinity(0)
    results = []
    try:
        for key_type in args.key_type or DEFAULT_KEY_TYPES:
            for access in args.access or ("public",):
                results.append(bench_key_type(args, key_type, access, server_cpu, client_cpu))
    finally:
        os.sched_setaffinity(0, original_affinity)

    print()
    print(format_table(results))
    for r in results:
        for note in r.notes:
            print(f"note [{r.key_type}, {r.access}]: {note}")
    if args.json:
        doc = {
            "command": ["benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)],
            "machine": {
                "cpus": os.cpu_count(),
                "server_cpu": server_cpu,
                "client_cpu": client_cpu,
                "python": platform.python_version(),
                "platform": platform.platform(),
            },
            "results": [vars(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    failed = any(r.load["error_count"] or r.load["check_failures"] or not r.load["tokens"] for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
