"""
Prometheus metrics: one registry per server, served on a Site of its own.

Every metric here is updated by the code it describes; the names of the
first three are those of the Go HMAC File Server, which dashboards use.
"""

from __future__ import annotations

import glob
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web import resource, server

__all__ = [
    "UPLOAD_BUCKETS",
    "Metrics",
    "MetricsResource",
    "forget_process",
    "metrics_site",
    "share_between_processes",
]

PREFIX = "hmac_file_server_"

# Uploads take from a fraction of a second (a voice message) to many
# minutes (a video over a phone connection): HTTP's default buckets stop at 10 s.
UPLOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def share_between_processes(directory: str) -> None:
    """
    Keep the values of the metrics made from now on in prometheus_client's multiprocess files
    under C{directory}, where L{Metrics.render} of any process adds them up (Workers > 1).

    prometheus_client decides this per process, from the environment and a module global; a
    worker calls this before it makes its L{Metrics}, the main process too (hmacd.workers).
    """
    from hmacd.internals import use_multiprocess_values

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    use_multiprocess_values()


def forget_process(directory: str, pid: int) -> None:
    """Drop the gauges of a process that has exited; its counters keep counting in the sum."""
    for path in glob.glob(os.path.join(directory, f"gauge_live*_{pid}.db")):
        os.remove(path)


class Metrics:
    """
    The registry and every metric hmacfs reports.

    With C{shared} (a directory given to L{share_between_processes}), values are those of every
    process writing there: gauges of processes are summed (the largest reactor lag is kept).
    """

    def __init__(self, shared: str | None = None) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.shared = shared
        self._stores: list[_StoreCollector] = []

        def counter(name, doc, labels=()):
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def gauge(name, doc, labels=(), mode="livesum"):
            return Gauge(PREFIX + name, doc, labels, registry=registry, multiprocess_mode=mode)

        self.upload_duration = Histogram(
            PREFIX + "upload_duration_seconds",
            "Time from an accepted upload's headers to its 201.",
            buckets=UPLOAD_BUCKETS,
            registry=registry,
        )
        self.uploads = counter("uploads", "Uploads stored (201).")
        self.upload_errors = counter(
            "upload_errors", "Uploads refused or failed, by reason.", ["reason"]
        )
        self.previous_secret_uses = counter(
            "previous_secret_uses",
            "Slots that verified with a previous secret, by its position in PreviousSecrets"
            " (1 is the first): none for a while, and that secret can go.",
            ["position"],
        )
        self.upload_bytes = counter("upload_bytes", "Bytes of stored uploads.")
        self.downloads = counter("downloads", "Downloads served in full (200 and 206 GETs).")
        self.download_bytes = counter("download_bytes", "Bytes sent in download bodies.")
        self.requests = counter(
            "requests", "HTTP requests, by method and status.", ["method", "status"]
        )
        self.uploads_in_progress = gauge("uploads_in_progress", "Upload bodies being received.")
        self.rate_limited = counter(
            "rate_limited", "Requests refused with 429 by the per-address request-rate limit."
        )
        self.connections_refused = counter(
            "connections_refused",
            "Connections closed at accept (or, through a trusted proxy, requests refused with"
            " 429) because the client address held MaxConnectionsPerClient already.",
            ["reason"],
        )
        self.connections_cut = counter(
            "connections_cut",
            "Connections the server closed for slowness: a request head past HeaderTimeout"
            " (header_timeout), an upload body under MinUploadBytesPerSecond (slow_upload).",
            ["reason"],
        )
        self.slots = counter(
            "slots",
            "Upload slots asked of the XMPP component: issued, or the stanza error refusing it.",
            ["result"],
        )
        self.component_connected = gauge(
            "component_connected", "1 while the XMPP component's stream is authenticated."
        )
        self.expired_files = counter(
            "expired_files", "Files the expiry sweep deleted (their expiry had passed)."
        )
        self.expiry_backlog = gauge(
            "expiry_backlog",
            "Records past their expiry not yet deleted, as the expiry sweep last counted.",
            mode="livemax",
        )
        self.dedup_bytes = counter(
            "dedup_bytes",
            "Bytes of uploads stored as another path to identical bytes already stored"
            " (Deduplication): written to a temp file, then dropped instead of kept.",
        )
        self.dedup_saved_bytes = gauge(
            "dedup_saved_bytes",
            "Bytes deduplication keeps off the disk now: for each stored content, its size"
            " times the paths referring to it beyond the first (counted by the main process"
            " every DedupCensus interval).",
            mode="livemax",
        )
        self.threads = gauge("process_threads", "Threads of the server process.")
        self.rss = gauge("process_resident_memory_bytes", "Resident memory of the server process.")
        self.vms = gauge("process_virtual_memory_bytes", "Virtual memory of the server process.")
        self.cpu = gauge("process_cpu_percent", "CPU use since the previous sample, percent.")
        self.fds = gauge("process_open_fds", "Open file descriptors of the server process.")
        self.connections = gauge("open_connections", "Open HTTP connections on the upload port.")
        self.reactor_lag = gauge(
            "reactor_lag_seconds",
            "How late the reactor ran a call scheduled for now.",
            mode="livemax",
        )

    def watch_stores(self, store) -> None:
        """Report the breaker state of a FailoverStore's backends at each scrape."""
        collector = _StoreCollector(store)
        self._stores.append(collector)
        self.registry.register(collector)

    def render(self) -> bytes:
        if self.shared is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        # Each scrape reads the files afresh; the store breakers are this process's own.
        registry = CollectorRegistry()
        MultiProcessCollector(registry, self.shared)
        for collector in self._stores:
            registry.register(collector)
        return generate_latest(registry)


class _StoreCollector:
    """Read at scrape time, so the figures are the breakers' own state."""

    def __init__(self, store) -> None:
        self.store = store

    def collect(self):
        up = GaugeMetricFamily(
            PREFIX + "store_up",
            "1 while a metadata store answers, 0 while it is down.",
            labels=["backend", "role"],
        )
        failovers = CounterMetricFamily(
            PREFIX + "store_failovers",
            "Times a metadata store went down (calls then go to the fallback, if any).",
            labels=["backend", "role"],
        )
        for backend in self.store.backends():
            labels = [backend.name, backend.role]
            up.add_metric(labels, 1 if backend.up else 0)
            failovers.add_metric(labels, backend.downs)
        yield up
        yield failovers


class MetricsResource(resource.Resource):
    """C{/metrics} in the Prometheus text format; nothing else."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request) -> bytes:
        if request.path != b"/metrics":
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"not found\n"
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()


def metrics_site(metrics: Metrics, reactor=None) -> server.Site:
    site = server.Site(MetricsResource(metrics), reactor=reactor)
    site.displayTracebacks = False
    site.noisy = False
    return site
