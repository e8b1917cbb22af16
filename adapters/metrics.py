"""Prometheus metrics: a projection of the event log plus live gauges read at scrape time.

Every kernel has its own registry (no global state): counters and histograms are
fed by the observer as events commit; the queue, running jobs, watcher
heartbeats and the log's size are read when Prometheus scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from adapters.bootstrap import Kernel

DURATION_BUCKETS_S = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, float("inf"))


class Metrics:
    """The metrics of one kernel, in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process CPU and memory
        self.jobs = Gauge("multiflow_jobs", "Jobs by workflow and status",
                          ["workflow", "status"], registry=self.registry)
        self.finished = Counter("multiflow_jobs_finished", "Jobs that reached a final status",
                                ["workflow", "status"], registry=self.registry)
        self.failures = Counter("multiflow_job_failures", "Failed attempts by error type",
                                ["workflow", "error_type"], registry=self.registry)
        self.intake = Counter("multiflow_intake", "Files judged at intake",
                              ["workflow", "outcome", "reason"], registry=self.registry)
        self.duration = Histogram("multiflow_job_duration_seconds",
                                  "From the start of the last attempt to the final event",
                                  ["workflow"], buckets=DURATION_BUCKETS_S,
                                  registry=self.registry)
        self.wait = Histogram("multiflow_job_wait_seconds", "From creation to the first start",
                              ["workflow"], buckets=DURATION_BUCKETS_S, registry=self.registry)
        self.append = Histogram("multiflow_log_append_seconds",
                                "Time of one group commit of the event log",
                                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.1, 1.0,
                                         float("inf")), registry=self.registry)
        self.appended = Counter("multiflow_log_events_appended", "Events appended since start",
                                registry=self.registry)

    def watch_kernel(self, kernel: Kernel) -> None:
        """Add the gauges read from the running kernel at scrape time."""
        self.registry.register(_LiveCollector(kernel))

    def observe_commit(self, seconds: float, events: int) -> None:
        """The store's commit hook: one group commit took `seconds` for `events` events."""
        self.append.observe(seconds)
        self.appended.inc(events)


class _LiveCollector(Collector):
    """Queue depth, running jobs, watcher heartbeats and log size, read when scraped."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel

    def collect(self) -> Iterator[GaugeMetricFamily]:
        manager = self.kernel.manager
        depth = GaugeMetricFamily("multiflow_queue_depth", "Pending jobs in the queue",
                                  labels=["workflow", "priority"])
        counts: dict[tuple[str, int], int] = {}
        for job in manager.queue.jobs():
            key = (job.workflow_name, job.priority)
            counts[key] = counts.get(key, 0) + 1
        for (workflow, priority), count in sorted(counts.items()):
            depth.add_metric([workflow, str(priority)], count)
        yield depth
        running = GaugeMetricFamily("multiflow_running_jobs", "Jobs whose processors run now",
                                    labels=["workflow"])
        per_workflow: dict[str, int] = {}
        for job in manager.running_jobs():
            per_workflow[job.workflow_name] = per_workflow.get(job.workflow_name, 0) + 1
        for workflow, count in sorted(per_workflow.items()):
            running.add_metric([workflow], count)
        yield running
        heartbeat = GaugeMetricFamily("multiflow_watcher_heartbeat_age_seconds",
                                      "Seconds since each watcher last proved alive",
                                      labels=["workflow"])
        for name, watcher in sorted(self.kernel.watchers.items()):
            heartbeat.add_metric([name], watcher.heartbeat_age_s())
        yield heartbeat
        size = GaugeMetricFamily("multiflow_log_events", "Events in the log (its last seq)")
        observer = self.kernel.observer
        size.add_metric([], observer.last_seq if observer is not None else 0)
        yield size
