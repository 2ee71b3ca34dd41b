"""The service's Prometheus metrics (``GET /metrics``).

Counters and histograms are fed as jobs finish; gauges (queue depth, jobs by state, replicas up) are read
from the service when scraped, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from engine.controller.tracker import TrackedRequest

if TYPE_CHECKING:
    from engine.serve.jobs import Job
    from engine.serve.service import Service

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
disable_created_metrics()  # the *_created series only double every counter
_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class _Live(Collector):
    """Gauges read from the service at scrape time."""

    def __init__(self, service: Service):
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        service = self.service
        queue = GaugeMetricFamily("engine_queue_depth", "Jobs accepted and waiting to run")
        queue.add_metric([], service.queued)
        yield queue
        jobs = GaugeMetricFamily("engine_jobs", "Jobs known to the service, by status", labels=["status"])
        counts = service.store.counts()
        for status in ("queued", "in_progress", "completed", "failed", "cancelled"):
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        up = GaugeMetricFamily("engine_replicas_up", "Replicas ready and in service, by node", labels=["node"])
        fleet = service.controller.fleet
        for node in fleet.plan.nodes:
            up.add_metric([node], sum(r.node == node and r.down is None and r.state == "ready"
                                      for r in fleet.replicas.values()))
        yield up
        yield from self._elastic()
        yield from self._work()

    def _elastic(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        """Replica counts now (starting and draining ones too) and the autoscaler's decisions."""
        controller = self.service.controller
        replicas = GaugeMetricFamily("engine_replicas", "Replica processes of each node (starting, serving or "
                                     "draining)", labels=["node"])
        for node in controller.fleet.plan.nodes:
            replicas.add_metric([node], sum(r.node == node and r.down is None for r in controller.fleet.replicas.values()))
        yield replicas
        events = CounterMetricFamily("engine_scale_events", "Replicas added (out) or drained (in) by the autoscaler",
                                     labels=["node", "direction", "reason"])
        for (node, direction, reason), count in sorted(controller.autoscaler.counts.items() if controller.autoscaler else ()):
            events.add_metric([node, direction, reason], count)
        yield events

    def _work(self) -> Iterator[CounterMetricFamily]:
        """Per node: segments finished, seconds busy on them and waiting in the replicas' queues; the output cache."""
        scheduler = self.service.scheduler
        if scheduler is None:
            return
        families = [CounterMetricFamily(f"engine_node_{name}", text, labels=["node"]) for name, text in (
            ("segments", "Segments the node's replicas finished"),
            ("busy_seconds", "Seconds the node's replicas spent on the segments they finished"),
            ("queue_wait_seconds", "Seconds those segments waited in a replica's queue before they started"))]
        for node, spent in scheduler.node_time.items():
            for family, value in zip(families, (spent.segments, spent.busy_s, spent.waited_s), strict=True):
                family.add_metric([node], value)
        yield from families
        cache = scheduler.cache
        for name, text, value in (("hits", "Stage runs skipped: outputs from a replica's output cache", cache.hits),
                                  ("misses", "Cacheable stage runs that ran (their outputs then kept)", cache.misses),
                                  ("saved_seconds", "Seconds the cache hits saved", cache.saved_s)):
            family = CounterMetricFamily(f"engine_output_cache_{name}", text)
            family.add_metric([], value)
            yield family
        lookups = CounterMetricFamily("engine_output_cache_lookups", "Output cache lookups per cacheable stage, or "
                                      "stage/part for a stage cached part by part (text_encode/negative_prompt)",
                                      labels=["part", "result"])
        for part, (hits, misses) in sorted(cache.by_part.items()):
            lookups.add_metric([part, "hit"], hits)
            lookups.add_metric([part, "miss"], misses)
        yield lookups


class ServiceMetrics:
    def __init__(self, service: Service):
        self.registry = CollectorRegistry()
        self.registry.register(_Live(service))
        self.jobs_accepted = Counter("engine_jobs_accepted", "Jobs accepted", ["object"], registry=self.registry)
        self.jobs_finished = Counter("engine_jobs_finished", "Jobs finished, by how", ["state"], registry=self.registry)
        self.job_seconds = Histogram("engine_job_seconds", "Seconds from acceptance to completion of completed jobs",
                                     buckets=_SECONDS, registry=self.registry)
        self.stage_seconds = Histogram("engine_stage_seconds", "Seconds per stage run", ["stage"], buckets=_SECONDS,
                                       registry=self.registry)
        self.edge_bytes = Counter("engine_edge_bytes", "Payload bytes moved over each edge", ["edge"], registry=self.registry)
        self.edge_seconds = Counter("engine_edge_seconds", "Seconds spent moving payloads over each edge (grant to "
                                    "acknowledgement); bytes / seconds is the edge's GB/s", ["edge"], registry=self.registry)
        self.retries = Counter("engine_retries", "Requests started again on other replicas", registry=self.registry)
        self.dit_passes = Counter("engine_dit_passes", "DiT passes (one transformer call of one guidance branch at one "
                                  "step), by whether step caching ran or skipped them", ["stage", "result"],
                                  registry=self.registry)
        self.step_cache_seconds_saved = Counter("engine_step_cache_seconds_saved", "Seconds step caching saved (skipped "
                                                "passes at a computed pass's mean time, less their own)", ["stage"],
                                                registry=self.registry)
        self.integrity_failures = Counter("engine_integrity_failures", "Edge deliveries rejected by the receiver's "
                                          "integrity check", ["edge"], registry=self.registry)
        self.backend_fallbacks = Counter("engine_backend_fallback", "Stage runs that fell back from one backend to the "
                                         "next, by reason", ["node", "stage", "from", "to", "reason"], registry=self.registry)
        self._completed = 0
        self._completed_s = 0.0

    def accepted(self, job: Job) -> None:
        self.jobs_accepted.labels(job.object).inc()

    def finished(self, request: TrackedRequest) -> None:
        self.jobs_finished.labels(request.state.value).inc()
        self.retries.inc(request.attempt)
        for stage, seconds in request.stage_seconds.items():
            self.stage_seconds.labels(stage).observe(seconds)
        for stage, cached in request.step_cache.items():
            self.dit_passes.labels(stage, "run").inc(cached.passes_run)
            self.dit_passes.labels(stage, "skipped").inc(cached.passes_skipped)
            self.step_cache_seconds_saved.labels(stage).inc(max(0.0, cached.seconds_saved))
        for edge, stats in request.edges.items():
            self.edge_bytes.labels(edge).inc(stats["nbytes"])
            self.edge_seconds.labels(edge).inc(stats["seconds"])
            self.integrity_failures.labels(edge).inc(stats.get("rejected", 0))
        for stage, use in request.backends.items():
            chain = use["chain"]
            for step, after in zip(chain, chain[1:]):
                self.backend_fallbacks.labels(use["node"], stage, step["backend"], after["backend"], step["reason"]).inc()
        if request.state.value == "done":
            self._completed += 1
            self._completed_s += request.seconds
            self.job_seconds.observe(request.seconds)

    def mean_job_s(self) -> float | None:
        return self._completed_s / self._completed if self._completed else None

    def render(self) -> bytes:
        return generate_latest(self.registry)
