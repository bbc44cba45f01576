"""Closed-loop load generator for an RFC 3161 TSA over keep-alive HTTP/1.1.

Raw asyncio streams rather than an HTTP library, so that on its own core the generator costs far less per
request than the server it measures; whether it did is measured too (its own CPU share, and the server's
when ``--server-pid`` is given), because a generator-bound number says nothing about the server.

Usage: ``python benchmarks/loadgen.py http://127.0.0.1:8318/ --connections 64 --duration 10 --warmup 2``
(``--header "Authorization: Bearer ..."`` for a TSU that serves subscribers only)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from asn1crypto import tsp

try:
    import uvloop
except ImportError:  # optional: the stock loop works, it only costs the generator more CPU per request
    uvloop = None

# A DER TimeStampReq (RFC 3161 §2.4.1) built from a fixed template, so that every request has the same
# length and its varying parts sit at fixed offsets:
#   SEQUENCE { version 1, MessageImprint { sha256 (NULL params), OCTET STRING[32] }, nonce INTEGER[8],
#              certReq TRUE }
_SHA256_ALG_ID = bytes.fromhex("300d06096086480165030402010500")
_REQ_HEAD = bytes.fromhex("30430201013031") + _SHA256_ALG_ID + bytes.fromhex("0420")
_REQ_MID = bytes.fromhex("0208")
_REQ_TAIL = bytes.fromhex("0101ff")
REQUEST_LENGTH = len(_REQ_HEAD) + 32 + len(_REQ_MID) + 8 + len(_REQ_TAIL)
assert REQUEST_LENGTH == 0x45, "template length must match its SEQUENCE header"

GRANTED = 0
PKI_STATUS_NAMES = {
    0: "granted",
    1: "grantedWithMods",
    2: "rejection",
    3: "waiting",
    4: "revocationWarning",
    5: "revocationNotification",
}
NS = 1_000_000_000
SATURATED_CPU = 0.90
"""A process using this share of its core is taken to be the bottleneck."""


def build_request_der(digest: bytes, nonce: bytes) -> bytes:
    """One TimeStampReq; ``nonce`` is 8 bytes whose first byte is 0x01..0x7f (positive, minimal DER)."""
    if len(digest) != 32 or len(nonce) != 8 or not 0 < nonce[0] < 0x80:
        raise ValueError("digest must be 32 bytes, nonce 8 bytes with a first byte in 0x01..0x7f")
    return _REQ_HEAD + digest + _REQ_MID + nonce + _REQ_TAIL


def build_pool(count: int, host_header: str, path: str, headers: tuple[str, ...] = ()) -> list[bytes]:
    """Pre-built HTTP requests with distinct random imprints and nonces, so the hot loop only writes bytes.
    ``headers`` ("Name: value") are sent with every request, e.g. the ``Authorization`` of a subscriber."""
    for header in headers:
        name, sep, _ = header.partition(":")
        if not sep or not name.strip() or "\r" in header or "\n" in header:
            raise ValueError(f"a header is one 'Name: value' line, not {header!r}")
    extra = "".join(f"{h}\r\n" for h in headers)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host_header}\r\n{extra}"
        f"Content-Type: application/timestamp-query\r\nContent-Length: {REQUEST_LENGTH}\r\n\r\n"
    ).encode("ascii")
    rnd = os.urandom(40 * count)
    pool = []
    for i in range(count):
        chunk = rnd[40 * i : 40 * i + 40]
        nonce = bytes((chunk[32] % 0x7F + 1,)) + chunk[33:40]
        pool.append(head + build_request_der(chunk[:32], nonce))
    return pool


def _der_header(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``pos``; IndexError/ValueError if malformed."""
    tag = buf[pos]
    first = buf[pos + 1]
    if first < 0x80:
        return tag, pos + 2, pos + 2 + first
    n = first & 0x7F
    if n == 0 or n > 4:
        raise ValueError("unsupported length form")
    start = pos + 2 + n
    return tag, start, start + int.from_bytes(buf[pos + 2 : start], "big")


def classify_body(body: bytes) -> str | None:
    """None if ``body`` is a TimeStampResp granting a token, else the error kind (a cheap structural check)."""
    try:
        tag, start, end = _der_header(body, 0)
        if tag != 0x30 or end != len(body):
            return "malformed_body"
        tag, si_start, si_end = _der_header(body, start)
        if tag != 0x30 or body[si_start] != 0x02 or body[si_start + 1] != 0x01:
            return "malformed_body"
        status = body[si_start + 2]
        if status != GRANTED:
            return f"pki_status_{PKI_STATUS_NAMES.get(status, status)}"
        if si_end >= end or body[si_end] != 0x30:
            return "granted_without_token"
    except (IndexError, ValueError):
        return "malformed_body"
    return None


def deep_check(request_der: bytes, body: bytes) -> str | None:
    """None if the token answers this very request (nonce and imprint echoed), else why not.

    Run on a few responses only, to show that the cheap byte check above is looking at real tokens.
    """
    try:
        req = tsp.TimeStampReq.load(request_der)
        resp = tsp.TimeStampResp.load(body)
        if resp["status"]["status"].native != "granted":
            return "status not granted"
        token = resp["time_stamp_token"]
        if token["content_type"].native != "signed_data":
            return "token is not SignedData"
        signed = token["content"]
        encap = signed["encap_content_info"]
        if encap["content_type"].native != "tst_info":
            return "encapsulated content is not TSTInfo"
        tst = encap["content"].parsed
        if tst["nonce"].native != req["nonce"].native:
            return "nonce not echoed"
        if tst["message_imprint"].dump() != req["message_imprint"].dump():
            return "message imprint not echoed"
        if len(signed["signer_infos"]) != 1:
            return "expected exactly one SignerInfo"
        if len(signed["certificates"]) == 0:
            return "certReq was true but no certificate was returned"
    except Exception as e:  # a check, not a parser: any failure to decode is the finding
        return f"undecodable: {type(e).__name__}: {e}"
    return None


def _process_tree_ticks(pid: int) -> int | None:
    """utime+stime (clock ticks) of ``pid`` and its descendants, from /proc; None where /proc is missing."""
    try:
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
            ticks[int(entry.name)] = int(fields[11]) + int(fields[12])
    except OSError:
        return None
    if pid not in ticks:
        return None
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(ticks[p] for p in tree)


def _cpu_times() -> dict[int, tuple[int, int, int]]:
    """Per CPU (total, idle, iowait) jiffies from /proc/stat; empty where there is none."""
    out: dict[int, tuple[int, int, int]] = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
            out[int(name[3:])] = (sum(v), v[3], v[4])
    return out


def _core_usage(
    before: dict[int, tuple[int, int, int]], after: dict[int, tuple[int, int, int]], cpus: set[int]
) -> dict[str, dict[str, float]]:
    """Busy and iowait share of each CPU in ``cpus`` between two samples, whoever used it."""
    usage = {}
    for cpu in sorted(cpus & before.keys() & after.keys()):
        total = after[cpu][0] - before[cpu][0]
        if total > 0:
            idle = after[cpu][1] - before[cpu][1]
            iowait = after[cpu][2] - before[cpu][2]
            usage[str(cpu)] = {"busy": (total - idle - iowait) / total, "iowait": iowait / total}
    return usage


@dataclass
class LoadConfig:
    host: str
    port: int
    path: str = "/"
    connections: int = 64
    pipeline: int = 1
    duration: float = 10.0
    warmup: float = 2.0
    pool: int = 250_000
    check: int = 16
    grace: float = 10.0
    use_uvloop: bool = True
    server_pid: int | None = None
    server_cpus: tuple[int, ...] = ()
    """CPUs the server is pinned to; their total use shows whether anything else competed with it."""
    headers: tuple[str, ...] = field(default=(), repr=False)
    """Extra request headers ("Name: value"); not in the repr, since one may hold an API token."""


@dataclass
class LoadResult:
    connections: int
    pipeline: int
    duration_s: float
    warmup_s: float
    event_loop: str
    tokens: int
    tokens_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int]
    error_count: int
    warmup_tokens: int
    warmup_errors: dict[str, int]
    tokens_received_total: int
    requests_sent_total: int
    pool_size: int
    pool_wrapped: bool
    checked: int
    check_failures: list[str]
    per_second: list[int]
    generator_cpu: float
    server_cpu: float | None
    cores: dict[str, dict[str, float]]
    verdict: str
    unfinished_at_end: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Run:
    """Shared state of one run; one instance, mutated only from the event loop thread."""

    def __init__(self, config: LoadConfig, pool: list[bytes], t0: int, t1: int) -> None:
        self.c = config
        self.pool = pool
        self.t0 = t0
        self.t1 = t1
        self.next_index = 0
        self.wrapped = False
        self.stopping = False
        self.latencies: list[int] = []
        self.errors: collections.Counter[str] = collections.Counter()
        self.warmup_errors: collections.Counter[str] = collections.Counter()
        self.tokens_total = 0
        self.warmup_tokens = 0
        self.sent_total = 0
        self.checked = 0
        self.check_failures: list[str] = []
        self.per_second = [0] * max(1, math.ceil((t1 - t0) / NS))

    def take(self) -> int:
        i = self.next_index
        self.next_index = i + 1
        if self.next_index == len(self.pool):
            self.next_index = 0
            self.wrapped = True
        return i

    def error(self, kind: str, t_done: int, count: int = 1) -> None:
        if t_done < self.t0:
            self.warmup_errors[kind] += count
        elif t_done < self.t1:
            self.errors[kind] += count

    def done(self, t_sent: int, t_done: int, index: int, status: int, body: bytes) -> None:
        kind = f"http_{status}" if status != 200 else classify_body(body)
        if kind is None and self.checked < self.c.check:
            self.checked += 1
            request_der = self.pool[index][-REQUEST_LENGTH:]
            problem = deep_check(request_der, body)
            if problem is not None:
                self.check_failures.append(problem)
                kind = "check_failed"
        if kind is not None:
            self.error(kind, t_done)
            return
        self.tokens_total += 1
        if t_done < self.t0:
            self.warmup_tokens += 1
        elif t_done < self.t1:
            self.latencies.append(t_done - t_sent)
            self.per_second[(t_done - self.t0) // NS] += 1

    async def connection(self) -> None:
        """One keep-alive connection with up to ``pipeline`` requests in flight, reconnecting on failure."""
        c, pool, perf = self.c, self.pool, time.perf_counter_ns
        while not self.stopping:
            try:
                reader, writer = await asyncio.open_connection(c.host, c.port)
            except OSError:
                self.error("connect_failed", perf())
                await asyncio.sleep(0.05)
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            inflight: collections.deque[tuple[int, int]] = collections.deque()
            try:
                for _ in range(c.pipeline):
                    i = self.take()
                    writer.write(pool[i])
                    inflight.append((perf(), i))
                self.sent_total += c.pipeline
                while inflight:
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    lower = head.lower()
                    pos = lower.find(b"\r\ncontent-length:")
                    if pos >= 0:
                        end = lower.index(b"\r\n", pos + 2)
                        body = await reader.readexactly(int(lower[pos + 17 : end]))
                    elif b"\r\ntransfer-encoding: chunked" in lower:
                        body = await _read_chunked(reader)
                    else:
                        raise ConnectionError("response without Content-Length")
                    t_done = perf()
                    t_sent, i = inflight.popleft()
                    self.done(t_sent, t_done, i, status, body)
                    if b"\r\nconnection: close" in lower:
                        self.error("server_closed_connection", t_done)
                        break
                    if not self.stopping:
                        i = self.take()
                        writer.write(pool[i])
                        inflight.append((perf(), i))
                        self.sent_total += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
                kind = "connection_reset" if isinstance(e, OSError) else "bad_response"
                if isinstance(e, asyncio.IncompleteReadError):
                    kind = "connection_closed"
                self.error(kind, perf(), max(1, len(inflight)))
                inflight.clear()
                await asyncio.sleep(0.01)
            finally:
                writer.close()
            if inflight:  # closed by the server with requests still unanswered
                self.error("unanswered", perf(), len(inflight))


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)


def _percentile(sorted_ns: list[int], p: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    if not sorted_ns:
        return math.nan
    return sorted_ns[max(0, math.ceil(p / 100 * len(sorted_ns)) - 1)] / 1e6


async def _drive(
    config: LoadConfig, pool: list[bytes]
) -> tuple[_Run, float, float | None, dict[str, dict[str, float]], int]:
    perf = time.perf_counter_ns
    start = perf()
    t0 = start + int(config.warmup * NS)
    t1 = t0 + int(config.duration * NS)
    run = _Run(config, pool, t0, t1)
    tasks = [asyncio.create_task(run.connection()) for _ in range(config.connections)]
    clk = os.sysconf("SC_CLK_TCK")

    await asyncio.sleep(max(0.0, (t0 - perf()) / NS))
    a_wall, a_cpu, a_cores = perf(), time.process_time(), _cpu_times()
    a_srv = _process_tree_ticks(config.server_pid) if config.server_pid else None
    await asyncio.sleep(max(0.0, (t1 - perf()) / NS))
    b_wall, b_cpu, b_cores = perf(), time.process_time(), _cpu_times()
    b_srv = _process_tree_ticks(config.server_pid) if config.server_pid else None
    run.stopping = True

    wall = (b_wall - a_wall) / NS
    gen_cpu = (b_cpu - a_cpu) / wall
    srv_cpu = (b_srv - a_srv) / clk / wall if a_srv is not None and b_srv is not None else None
    _, pending = await asyncio.wait(tasks, timeout=config.grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    cores = _core_usage(a_cores, b_cores, set(config.server_cpus) | os.sched_getaffinity(0))
    return run, gen_cpu, srv_cpu, cores, len(pending)


def _loop_factory(use_uvloop: bool) -> tuple[Callable[[], asyncio.AbstractEventLoop], str]:
    if use_uvloop and uvloop is not None:
        return uvloop.new_event_loop, "uvloop"
    return asyncio.new_event_loop, "asyncio"


def run_load(config: LoadConfig) -> LoadResult:
    """Run one warm-up + measured window against ``config``'s server and summarise it."""
    if config.connections < 1 or config.pipeline < 1 or config.duration <= 0 or config.warmup < 0:
        raise ValueError("connections and pipeline must be >= 1, duration > 0, warmup >= 0")
    host_header = f"{config.host}:{config.port}"
    pool = build_pool(config.pool, host_header, config.path, config.headers)
    gc.collect()
    gc.freeze()  # the pool is immortal: keep the collector from rescanning it during the run
    factory, loop_name = _loop_factory(config.use_uvloop)
    with asyncio.Runner(loop_factory=factory) as runner:
        run, gen_cpu, srv_cpu, cores, unfinished = runner.run(_drive(config, pool))
    gc.unfreeze()

    lat = sorted(run.latencies)
    tokens = len(lat)
    notes = []
    if run.wrapped:
        notes.append(f"request pool of {len(pool)} wrapped: some imprints/nonces were sent twice (raise --pool)")
    core_busy = None
    srv_cores = [cores[str(c)] for c in config.server_cpus if str(c) in cores]
    if srv_cores:
        core_busy = sum(c["busy"] for c in srv_cores) / len(srv_cores)
        iowait = sum(c["iowait"] for c in srv_cores) / len(srv_cores)
        if srv_cpu is not None and core_busy - srv_cpu > 0.05:
            notes.append(
                f"the server's core was {core_busy:.0%} busy but the server used only {srv_cpu:.0%} of it: "
                "other work competed with the server, so its numbers may be low; rerun on a quiet machine"
            )
        if iowait > 0.05:
            notes.append(f"the server's core sat {iowait:.0%} in I/O wait (the records' commits)")
    if srv_cpu is not None and srv_cpu >= SATURATED_CPU:
        verdict = f"server saturated ({srv_cpu:.0%} of a core)"
    elif srv_cpu is not None and core_busy is not None and core_busy >= SATURATED_CPU:
        verdict = f"server's core saturated, but only {srv_cpu:.0%} by the server: CONTENDED, not comparable"
    elif gen_cpu >= SATURATED_CPU:
        verdict = (
            f"GENERATOR-BOUND ({gen_cpu:.0%} of its core"
            + (f", server at {srv_cpu:.0%}" if srv_cpu is not None else "")
            + "): the number understates the server; raise --pipeline or give the generator more CPU"
        )
    elif srv_cpu is not None:
        verdict = (
            f"neither side saturated (server {srv_cpu:.0%}, generator {gen_cpu:.0%}): "
            "latency-bound, raise --connections"
        )
    else:
        verdict = f"generator not saturated ({gen_cpu:.0%} of its core); server CPU unknown (no --server-pid)"
    return LoadResult(
        connections=config.connections,
        pipeline=config.pipeline,
        duration_s=config.duration,
        warmup_s=config.warmup,
        event_loop=loop_name,
        tokens=tokens,
        tokens_per_s=tokens / config.duration,
        latency_ms={
            "p50": _percentile(lat, 50),
            "p90": _percentile(lat, 90),
            "p99": _percentile(lat, 99),
            "max": lat[-1] / 1e6 if lat else math.nan,
        },
        errors=dict(sorted(run.errors.items())),
        error_count=sum(run.errors.values()),
        warmup_tokens=run.warmup_tokens,
        warmup_errors=dict(sorted(run.warmup_errors.items())),
        tokens_received_total=run.tokens_total,
        requests_sent_total=run.sent_total,
        pool_size=len(pool),
        pool_wrapped=run.wrapped,
        checked=run.checked,
        check_failures=run.check_failures[:10],
        per_second=run.per_second,
        generator_cpu=gen_cpu,
        server_cpu=srv_cpu,
        cores=cores,
        verdict=verdict,
        unfinished_at_end=unfinished,
        notes=notes,
    )


def format_result(r: LoadResult) -> str:
    lat = r.latency_ms
    errors = ", ".join(f"{k}={v}" for k, v in r.errors.items()) or "none"
    lines = [
        f"{r.tokens} tokens in {r.duration_s:g} s = {r.tokens_per_s:,.0f} tokens/s "
        f"({r.connections} connections x {r.pipeline} in flight, {r.event_loop})",
        f"latency ms: p50 {lat['p50']:.2f}  p90 {lat['p90']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}",
        f"errors: {r.error_count} ({errors}); warm-up: {r.warmup_tokens} tokens, "
        f"{sum(r.warmup_errors.values())} errors",
        f"deep-checked {r.checked} tokens against their requests: "
        + ("all good" if not r.check_failures else "FAILED: " + "; ".join(r.check_failures)),
        f"per second: {' '.join(str(n) for n in r.per_second)}",
        f"saturation: {r.verdict}",
        "cores busy: "
        + (", ".join(f"cpu{c} {u['busy']:.0%} (iowait {u['iowait']:.0%})" for c, u in r.cores.items()) or "unknown"),
    ]
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> tuple[LoadConfig, str | None, list[int] | None]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url", help="the TSA's HTTP endpoint, e.g. http://127.0.0.1:8318/")
    p.add_argument("-c", "--connections", type=int, default=64, help="concurrent keep-alive connections")
    p.add_argument("-p", "--pipeline", type=int, default=1, help="requests in flight per connection")
    p.add_argument("-d", "--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("-w", "--warmup", type=float, default=2.0, help="unmeasured seconds before")
    p.add_argument("--pool", type=int, default=250_000, help="pre-built distinct requests")
    p.add_argument("--check", type=int, default=16, help="tokens to decode fully and match to their request")
    p.add_argument("--no-uvloop", action="store_true", help="use the stock asyncio event loop")
    p.add_argument("--server-pid", type=int, help="sample this process tree's CPU to tell who saturated")
    p.add_argument("--server-cpu", type=int, action="append", help="the server's pinned CPU (repeatable)")
    p.add_argument("--cpu", type=int, action="append", help="pin the generator to this CPU (repeatable)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument(
        "-H", "--header", action="append", metavar="'NAME: VALUE'", help="send with every request (repeatable)"
    )
    a = p.parse_args(argv)
    url = urlsplit(a.url)
    if url.scheme != "http" or not url.hostname:
        p.error("only http://HOST[:PORT]/PATH URLs are supported")
    config = LoadConfig(
        host=url.hostname,
        port=url.port or 80,
        path=url.path or "/",
        connections=a.connections,
        pipeline=a.pipeline,
        duration=a.duration,
        warmup=a.warmup,
        pool=a.pool,
        check=a.check,
        use_uvloop=not a.no_uvloop,
        server_pid=a.server_pid,
        server_cpus=tuple(a.server_cpu or ()),
        headers=tuple(a.header or ()),
    )
    return config, a.json, a.cpu


def main(argv: list[str] | None = None) -> int:
    config, json_path, cpus = _parse_args(argv)
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    result = run_load(config)
    print(format_result(result))
    if json_path:
        Path(json_path).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return 0 if result.tokens and not result.check_failures else 1


if __name__ == "__main__":
    sys.exit(main())
