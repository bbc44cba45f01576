"""Prometheus metrics, fed by the adapters and the server (never by the core).

With several worker processes, every value lives in a file of a directory shared by the workers (prometheus_client's
multiprocess mode, chosen by :data:`SHARED_DIRECTORY_ENV` before the first metric exists) and every scrape, whichever
worker answers it, reads them all: counters and histograms are summed over the workers, dead ones included (a count
never goes back); each gauge's ``multiprocess_mode`` says how the live workers' values combine. One process keeps
its values in memory, which costs the requests nothing more.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from stampd.clockgate import ClockState, ClockStatus

SHARED_DIRECTORY_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""The environment variable naming the directory the workers share; set only by `stampd serve` with several
workers, in the supervisor, for the worker processes it starts."""

_SHARED_DIRECTORY = os.environ.get(SHARED_DIRECTORY_ENV)
"""Read once, as prometheus_client reads it when it is imported (just above): both agree for this process."""

REGISTRY = CollectorRegistry(auto_describe=True)

CLOCK_OFFSET = Gauge(
    "stampd_clock_offset_seconds",
    "Time sources minus the local clock, at the last check (agreeing sources)",
    registry=REGISTRY,
    multiprocess_mode="livemostrecent",  # each worker checks the same sources: the freshest check tells most
)
CLOCK_ERROR_BOUND = Gauge(
    "stampd_clock_error_bound_seconds",
    "Worst-case error of the local clock at the last check",
    registry=REGISTRY,
    multiprocess_mode="livemax",  # the worst bound any worker stamps with
)
CLOCK_AGREEING = Gauge(
    "stampd_clock_agreeing_sources",
    "Time sources that agreed at the last check",
    registry=REGISTRY,
    multiprocess_mode="livemin",  # the weakest agreement any worker stamps with
)
CLOCK_STATE = Gauge(
    "stampd_clock_state",
    "1 for the clock's current state",
    ["state"],
    registry=REGISTRY,
    multiprocess_mode="livemax",  # 1 for every state some worker is in: workers that disagree all show
)


TSU_DAYS_LEFT = Gauge(
    "stampd_tsu_signing_days_left",
    "Days until the TSU key may no longer sign (certificate validity and privateKeyUsagePeriod)",
    ["tsu"],
    registry=REGISTRY,
    multiprocess_mode="livemin",  # a worker whose reload was refused still signs with the older key
)
TSU_CERTIFICATE_DAYS_LEFT = Gauge(
    "stampd_tsu_certificate_days_left",
    "Days until the TSU certificate in use expires (notAfter; the key may stop signing sooner, see "
    "stampd_tsu_signing_days_left)",
    ["tsu"],
    registry=REGISTRY,
    multiprocess_mode="livemin",
)
TSU_ACTIVE = Gauge(
    "stampd_tsu_active",
    "1 while the TSU issues tokens",
    ["tsu"],
    registry=REGISTRY,
    multiprocess_mode="livemin",  # 0 as soon as one worker cannot issue with it: some of its requests fail
)
READINESS = Gauge(
    "stampd_readiness",
    "1 while the readiness check passes: clock (the clock gate), keys (every test signature worked), records "
    "(the last write worked), tsus (at least one TSU can issue); /readyz is 200 when all are 1",
    ["check"],
    registry=REGISTRY,
    multiprocess_mode="livemin",  # 0 when a check fails in any worker: the requests it takes fail
)


def observe_clock(status: ClockStatus) -> None:
    if status.offset_s is not None:
        CLOCK_OFFSET.set(status.offset_s)
    if status.error_bound_s is not None:
        CLOCK_ERROR_BOUND.set(status.error_bound_s)
    CLOCK_AGREEING.set(len(status.agreeing))
    for state in ClockState:
        CLOCK_STATE.labels(state=state.value).set(1 if state is status.state else 0)


def exposition() -> tuple[bytes, bytes]:
    """(body, content type) for GET /metrics: this process's metrics, or with several workers all of theirs."""
    if _SHARED_DIRECTORY is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST.encode()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=_SHARED_DIRECTORY)  # type: ignore[no-untyped-call]
    return generate_latest(registry), CONTENT_TYPE_LATEST.encode()


def forget_worker(directory: str, pid: int) -> None:
    """Drop the gauges of a worker that is gone (its counts stay in the sums); called by the supervisor."""
    mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


REQUESTS = Counter(
    "stampd_requests",
    "Requests answered, by TSU path, HTTP status and PKIFailureInfo bit name (empty when none)",
    ["tsu", "status", "fail_info"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "stampd_request_duration_seconds",
    "Time from the request's headers to its answer, per TSU path",
    ["tsu"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
    registry=REGISTRY,
)
RECORD_COMMIT_SECONDS = Histogram(
    "stampd_record_commit_seconds",
    "Time to commit one batch of token records (group commit), from its flush to its COMMIT",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
    registry=REGISTRY,
)
RECORD_BATCH_SIZE = Histogram(
    "stampd_record_batch_size",
    "Token records per committed transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
SUBSCRIBER_REFUSALS = Counter(
    "stampd_subscriber_refusals",
    "Requests refused by access control, quota or rate, by TSU path and reason (unauthorized, forbidden, quota, rate)",
    ["tsu", "reason"],
    registry=REGISTRY,
)
