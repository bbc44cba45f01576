"""Prometheus metrics, fed by the adapters and the server (never by the core)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from stampd.clockgate import ClockState, ClockStatus

REGISTRY = CollectorRegistry(auto_describe=True)

CLOCK_OFFSET = Gauge(
    "stampd_clock_offset_seconds",
    "Time sources minus the local clock, at the last check (agreeing sources)",
    registry=REGISTRY,
)
CLOCK_ERROR_BOUND = Gauge(
    "stampd_clock_error_bound_seconds", "Worst-case error of the local clock at the last check", registry=REGISTRY
)
CLOCK_AGREEING = Gauge("stampd_clock_agreeing_sources", "Time sources that agreed at the last check", registry=REGISTRY)
CLOCK_STATE = Gauge("stampd_clock_state", "1 for the clock's current state", ["state"], registry=REGISTRY)


TSU_DAYS_LEFT = Gauge(
    "stampd_tsu_signing_days_left",
    "Days until the TSU key may no longer sign (certificate validity and privateKeyUsagePeriod)",
    ["tsu"],
    registry=REGISTRY,
)
TSU_ACTIVE = Gauge("stampd_tsu_active", "1 while the TSU issues tokens", ["tsu"], registry=REGISTRY)


def observe_clock(status: ClockStatus) -> None:
    if status.offset_s is not None:
        CLOCK_OFFSET.set(status.offset_s)
    if status.error_bound_s is not None:
        CLOCK_ERROR_BOUND.set(status.error_bound_s)
    CLOCK_AGREEING.set(len(status.agreeing))
    for state in ClockState:
        CLOCK_STATE.labels(state=state.value).set(1 if state is status.state else 0)


def exposition() -> tuple[bytes, bytes]:
    """(body, content type) for GET /metrics."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST.encode()
