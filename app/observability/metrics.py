"""Prometheus metrics: what `/metrics` shows, and the events the code counts.

Two kinds of numbers, kept apart on purpose:

- State (queue depth, oldest urgency, SLO attainment, pool limits and in-flight, workers and
  the versions they hold) is read from Postgres at scrape time through `SnapshotCollector`,
  which calls `take_snapshot()`: the same numbers as the dashboard and `dreamq status`, so the
  three never disagree. Postgres is the source of truth; a gauge that each process kept itself
  would drift (a crashed worker never decrements it) and differ between the API processes.
- Events (a job's wait when it starts, outcomes, model loads, rate-limit refusals, dispatch
  passes, API requests) are counters and histograms incremented where they happen: in the API
  processes, the dispatcher and the GPU/CPU workers.

Multiprocess: gunicorn runs several API processes and Celery prefork several children, each
with its own memory. With PROMETHEUS_MULTIPROC_DIR set (before prometheus_client is imported;
`dreamq up` sets it for every process it starts, one directory per host) every process writes its
event metrics to mmap files there and a scrape of any API process sums them all
(`MultiProcessCollector`). Gunicorn's child_exit hook (app/gunicorn_conf.py) and Celery's
worker_process_shutdown mark dead processes. Without the variable (tests of one process, a
shell) the same metrics live in this process's memory and `/metrics` still shows them.

Event metrics only use counters and histograms: they sum correctly across processes. Labels
are bounded (tier, state, failure code, model, pool, route): never a job or user id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Iterable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.db.session import transaction
from app.observability.snapshot import take_snapshot

log = logging.getLogger(__name__)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "render",
    "observe_wait",
    "count_transition",
    "observe_model_load",
    "count_rejection",
    "observe_dispatch_pass",
    "observe_request",
    "multiprocess_dir",
]

# Event metrics register here, never in prometheus_client's global REGISTRY: in multiprocess
# mode the values live in the mmap files and are read back by MultiProcessCollector, and in
# one process this registry is what `/metrics` exposes (no process_*/python_* collectors, which
# would describe only the one API process that answered the scrape).
EVENTS = CollectorRegistry(auto_describe=True)

# Wait buckets around the tiers' W (60 s api ... 7200 s free), so each tier's SLO is a bucket
# edge and `histogram_quantile` / the share under W read straight off the buckets.
WAIT_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PASS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

JOB_WAIT = Histogram(
    "dreamq_job_wait_seconds",
    "Time a job waited from submission to starting on a GPU worker (each start)",
    ["tier"],
    buckets=WAIT_BUCKETS,
    registry=EVENTS,
)
JOB_OUTCOMES = Counter(
    "dreamq_job_outcomes",
    "Jobs that reached a terminal state, by tier, state and reason (failure code)",
    ["tier", "state", "reason"],
    registry=EVENTS,
)
JOB_REQUEUES = Counter(
    "dreamq_job_requeues",
    "Jobs sent back to the queue (worker lost, draining, publish failed, reaper)",
    ["tier", "from_state"],
    registry=EVENTS,
)
BURST_DECISIONS = Counter(
    "dreamq_burst_decisions",
    "Burst controller decisions per burst pool (hold, scale_up, drain, release); "
    "the reason of each non-hold decision is in the log and in Redis dreamq:burst:<pool>:decisions",
    ["pool", "action"],
    registry=EVENTS,
)
MODEL_LOAD = Histogram(
    "dreamq_model_load_seconds",
    "Time to load a model version into a worker (cache fetch + weights)",
    ["model"],
    buckets=LOAD_BUCKETS,
    registry=EVENTS,
)
MODEL_EVICTIONS = Counter(
    "dreamq_model_evictions",
    "Model versions evicted from a worker's memory to make room",
    ["model"],
    registry=EVENTS,
)
REJECTIONS = Counter(
    "dreamq_submission_rejections",
    "Submissions refused with 429, by tier and reason (rate_limited_user, rate_limited_tier, quota_exceeded)",
    ["tier", "reason"],
    registry=EVENTS,
)
LIMITER_UNAVAILABLE = Counter(
    "dreamq_rate_limiter_unavailable",
    "Submissions accepted without a token because Redis did not answer",
    registry=EVENTS,
)
DISPATCH_PASSES = Counter(
    "dreamq_dispatch_passes",
    "Dispatcher passes (plan + apply in one transaction)",
    registry=EVENTS,
)
DISPATCH_RELEASED = Counter(
    "dreamq_dispatch_released",
    "Jobs released to a pool's queue by the dispatcher",
    ["tier"],
    registry=EVENTS,
)
DISPATCH_DECISIONS = Counter(
    "dreamq_dispatch_decisions",
    "Dispatch decisions by the policy's reason (floor: the tier's minimum share; "
    "urgency; rank; fifo; affinity: releases routed to a worker holding the version, counted again)",
    ["reason"],
    registry=EVENTS,
)
DISPATCH_PASS_SECONDS = Histogram(
    "dreamq_dispatch_pass_seconds",
    "Duration of one dispatcher pass",
    buckets=PASS_BUCKETS,
    registry=EVENTS,
)
DISPATCH_PUBLISH_FAILURES = Counter(
    "dreamq_dispatch_publish_failures",
    "Dispatched batches the broker refused (returned to the queue)",
    registry=EVENTS,
)
HTTP_REQUESTS = Counter(
    "dreamq_http_requests",
    "API requests by route, method and status",
    ["route", "method", "status"],
    registry=EVENTS,
)
HTTP_SECONDS = Histogram(
    "dreamq_http_request_seconds",
    "API request duration by route",
    ["route", "method"],
    buckets=REQUEST_BUCKETS,
    registry=EVENTS,
)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


def _safe(observe):
    """Metrics never break the code path they observe (a full disk under the mmap files, say)."""

    def wrapper(*args, **kwargs):
        try:
            observe(*args, **kwargs)
        except Exception:
            log.warning("metric not recorded", exc_info=True)

    wrapper.__name__ = observe.__name__
    wrapper.__doc__ = observe.__doc__
    return wrapper


@_safe
def observe_wait(tier: str, seconds: float) -> None:
    JOB_WAIT.labels(tier).observe(max(seconds, 0.0))


@_safe
def count_transition(tier: str, from_state: str, to: str, failure_code: str | None) -> None:
    """After the commit of a transition that won (app/observability/listeners.py)."""
    if to in ("succeeded", "failed", "cancelled"):
        reason = (failure_code or "unknown") if to == "failed" else "none"
        JOB_OUTCOMES.labels(tier, to, reason).inc()
    elif to == "queued":
        JOB_REQUEUES.labels(tier, from_state).inc()


@_safe
def observe_model_load(model: str, seconds: float) -> None:
    MODEL_LOAD.labels(model).observe(seconds)


@_safe
def count_eviction(model: str) -> None:
    MODEL_EVICTIONS.labels(model).inc()


@_safe
def count_rejection(tier: str, reason: str) -> None:
    REJECTIONS.labels(tier, reason).inc()


@_safe
def count_limiter_unavailable() -> None:
    LIMITER_UNAVAILABLE.inc()


@_safe
def observe_dispatch_pass(seconds: float, released_per_tier: dict[str, int], reasons: dict[str, int]) -> None:
    DISPATCH_PASSES.inc()
    DISPATCH_PASS_SECONDS.observe(seconds)
    for tier, count in released_per_tier.items():
        DISPATCH_RELEASED.labels(tier).inc(count)
    for reason, count in reasons.items():
        if count:
            DISPATCH_DECISIONS.labels(str(reason)).inc(count)


@_safe
def count_publish_failure() -> None:
    DISPATCH_PUBLISH_FAILURES.inc()


@_safe
def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(route, method, str(status)).inc()
    HTTP_SECONDS.labels(route, method).observe(seconds)


# --- state from Postgres, at scrape time -------------------------------------------------------


class SnapshotCollector(Collector):
    """Gauges from `take_snapshot()`, evaluated when Prometheus scrapes.

    Cached for `ttl_s` per process: a scrape storm (several Prometheus replicas, a dashboard
    polling /metrics) costs one snapshot a second, not one per request.
    """

    def __init__(self, ttl_s: float = 1.0):
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Metric]] | None = None

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] >= self.ttl_s:
                self._cached = (now, list(self._families()))
            families = self._cached[1]
        yield from families

    def invalidate(self) -> None:
        with self._lock:
            self._cached = None

    def _families(self) -> Iterable[Metric]:
        started = time.perf_counter()
        try:
            with transaction() as session:
                snap = take_snapshot(session)
        except Exception:
            # The event metrics still answer; `dreamq_snapshot_up 0` says the gauges are missing.
            log.warning("metrics snapshot failed", exc_info=True)
            up = GaugeMetricFamily("dreamq_snapshot_up", "1 if the Postgres snapshot behind the gauges succeeded")
            up.add_metric([], 0)
            yield up
            return
        took = time.perf_counter() - started

        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        jobs = gauge(
            "dreamq_jobs",
            "Unfinished jobs per tier and state (queued in Postgres, dispatched, running)",
            ["tier", "state"],
        )
        depth = gauge("dreamq_queue_depth", "Jobs queued in Postgres per tier", ["tier"])
        oldest = gauge("dreamq_queue_oldest_wait_seconds", "Wait of the oldest queued job per tier", ["tier"])
        urgency = gauge(
            "dreamq_queue_oldest_urgency", "Oldest queued job's wait / W per tier (above 1: SLO broken)", ["tier"]
        )
        slo = gauge("dreamq_tier_slo_seconds", "The tier's promised worst-case wait W", ["tier"])
        attainment = gauge(
            "dreamq_slo_attainment_ratio",
            "Share of the last hour's starts (plus jobs still queued "
            "past W) that started within W; absent when there were none",
            ["tier"],
        )
        started_h = gauge("dreamq_slo_started_last_hour", "Jobs that started in the last hour", ["tier"])
        within_h = gauge("dreamq_slo_within_last_hour", "Jobs that started within W in the last hour", ["tier"])
        past = gauge("dreamq_queue_past_slo", "Queued jobs that have already waited longer than W", ["tier"])
        for t in snap.tiers:
            for state, value in (("queued", t.queued), ("dispatched", t.dispatched), ("running", t.running)):
                jobs.add_metric([t.name, state], value)
            depth.add_metric([t.name], t.queued)
            oldest.add_metric([t.name], t.oldest_wait_s)
            urgency.add_metric([t.name], t.urgency)
            slo.add_metric([t.name], t.slo_s)
            if t.attainment is not None:
                attainment.add_metric([t.name], t.attainment)
            started_h.add_metric([t.name], t.started_last_hour)
            within_h.add_metric([t.name], t.within_slo_last_hour)
            past.add_metric([t.name], t.queued_past_slo)
        yield from (jobs, depth, oldest, urgency, slo, attainment, started_h, within_h, past)

        model_depth = gauge(
            "dreamq_model_queue_depth",
            "Jobs queued in Postgres per model and tier (any pool serving the model may take them)",
            ["model", "tier"],
        )
        model_urgency = gauge(
            "dreamq_model_queue_oldest_urgency", "Oldest queued job's wait / W per model and tier", ["model", "tier"]
        )
        for q in snap.queues:
            model_depth.add_metric([q.model, q.tier], q.queued)
            model_urgency.add_metric([q.model, q.tier], q.urgency)
        pool_depth = gauge(
            "dreamq_pool_queue_depth",
            "Jobs dispatched to a pool and not started, per tier: the messages in its broker queue <pool>.<tier>",
            ["pool", "tier"],
        )
        pool_running = gauge("dreamq_pool_running_jobs", "Jobs running in a pool per tier", ["pool", "tier"])
        for pq in snap.pool_queues:
            pool_depth.add_metric([pq.pool, pq.tier], pq.dispatched)
            pool_running.add_metric([pq.pool, pq.tier], pq.running)
        yield from (model_depth, model_urgency, pool_depth, pool_running)

        limit = gauge(
            "dreamq_pool_dispatch_limit",
            "A pool's dispatch limit (most jobs dispatched and not started)",
            ["pool", "cluster", "model"],
        )
        effective = gauge(
            "dreamq_pool_effective_limit",
            "The limit the dispatcher applies: min(limit, per-worker cap x live workers), 0 when disabled",
            ["pool"],
        )
        in_flight = gauge(
            "dreamq_pool_in_flight", "Jobs dispatched to the pool and not started (held against its limit)", ["pool"]
        )
        running = gauge("dreamq_pool_running", "Jobs running on the pool's workers", ["pool"])
        live = gauge("dreamq_pool_live_workers", "Workers of the pool that heartbeat and take work", ["pool"])
        enabled = gauge("dreamq_pool_enabled", "1 if the pool and its cluster are enabled", ["pool", "cluster_kind"])
        for p in snap.pools:
            limit.add_metric([p.name, p.cluster, p.model], p.dispatch_limit)
            effective.add_metric([p.name], p.effective_limit)
            in_flight.add_metric([p.name], p.dispatched)
            running.add_metric([p.name], p.running)
            live.add_metric([p.name], p.live_workers)
            enabled.add_metric([p.name, p.cluster_kind], 1 if p.enabled else 0)
        yield from (limit, effective, in_flight, running, live, enabled)

        states = gauge(
            "dreamq_workers",
            "Workers seen in the last hour per pool and state (stale: no heartbeat for WORKER_STALE_S)",
            ["pool", "state"],
        )
        info = gauge(
            "dreamq_worker_info", "One series per worker seen in the last hour", ["worker", "pool", "device", "state"]
        )
        heartbeat = gauge(
            "dreamq_worker_heartbeat_age_seconds", "Seconds since the worker's last heartbeat", ["worker"]
        )
        busy = gauge("dreamq_worker_busy", "1 if the worker is running a job", ["worker"])
        loaded = gauge(
            "dreamq_worker_loaded_version", "1 per model version a worker holds in memory", ["worker", "version"]
        )
        counts: dict[tuple[str, str], int] = {}
        for w in snap.workers:
            pool = w.pool or ""
            state = "stale" if w.stale else w.state
            counts[(pool, state)] = counts.get((pool, state), 0) + 1
            info.add_metric([w.id, pool, w.device, state], 1)
            heartbeat.add_metric([w.id], w.heartbeat_age_s)
            busy.add_metric([w.id], 1 if w.current_job_id and not w.stale else 0)
            for version in w.loaded:
                loaded.add_metric([w.id, version], 1)
        for (pool, state), value in sorted(counts.items()):
            states.add_metric([pool, state], value)
        yield from (states, info, heartbeat, busy, loaded)

        up = gauge("dreamq_snapshot_up", "1 if the Postgres snapshot behind the gauges succeeded", [])
        up.add_metric([], 1)
        seconds = gauge("dreamq_snapshot_seconds", "Time the last Postgres snapshot took", [])
        seconds.add_metric([], took)
        yield from (up, seconds)


SNAPSHOT = SnapshotCollector()


class _Exposition(Collector):
    def collect(self) -> Iterator[Metric]:
        path = multiprocess_dir()
        if path:
            # Every process of this host, this one included (its values are in the files too).
            yield from MultiProcessCollector(None, path=path).collect()
        else:
            yield from EVENTS.collect()
        yield from SNAPSHOT.collect()


_EXPOSITION = CollectorRegistry(auto_describe=False)
_EXPOSITION.register(_Exposition())


def render() -> bytes:
    """The text exposition format (CONTENT_TYPE_LATEST) of event metrics and snapshot gauges."""
    return generate_latest(_EXPOSITION)


def mark_process_dead(pid: int) -> None:
    """For gunicorn's child_exit and Celery's worker_process_shutdown: drop a dead process's live files."""
    path = multiprocess_dir()
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)


def serve_host_metrics(port: int, addr: str = "0.0.0.0") -> None:
    """Event metrics of every process of this host on http://<addr>:<port>/ (no snapshot gauges:
    those come from the API's /metrics). For GPU hosts that run no API process; needs
    PROMETHEUS_MULTIPROC_DIR, since the Celery children that observe the events are separate
    processes."""
    from prometheus_client import start_http_server

    path = multiprocess_dir()
    if not path:
        raise RuntimeError("DREAMQ_METRICS_PORT needs PROMETHEUS_MULTIPROC_DIR (one directory per host)")
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    start_http_server(port, addr=addr, registry=registry)
    log.info("serving this host's metrics", extra={"port": port})


def prepare_multiprocess_dir(path: str) -> None:
    """Create the directory empty: files left by an earlier run carry its pids and its counts."""
    import shutil
    from pathlib import Path

    target = Path(path)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
