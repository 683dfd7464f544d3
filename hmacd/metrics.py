"""
Prometheus metrics: one registry per server, served on a Site of its own.

Every metric here is updated by the code it describes; the names of the
first three are those of the Go HMAC File Server, which dashboards use.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.web import resource, server

__all__ = ["UPLOAD_BUCKETS", "Metrics", "MetricsResource", "metrics_site"]

PREFIX = "hmac_file_server_"

# Uploads take from a fraction of a second (a voice message) to many
# minutes (a video over a phone connection): HTTP's default buckets stop at 10 s.
UPLOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class Metrics:
    """The registry and every metric hmacfs reports."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name, doc, labels=()):
            return Counter(PREFIX + name, doc, labels, registry=registry)

        def gauge(name, doc, labels=()):
            return Gauge(PREFIX + name, doc, labels, registry=registry)

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
        self.slots = counter(
            "slots",
            "Upload slots asked of the XMPP component: issued, or the stanza error refusing it.",
            ["result"],
        )
        self.component_connected = gauge(
            "component_connected", "1 while the XMPP component's stream is authenticated."
        )
        self.threads = gauge("process_threads", "Threads of the server process.")
        self.rss = gauge("process_resident_memory_bytes", "Resident memory of the server process.")
        self.vms = gauge("process_virtual_memory_bytes", "Virtual memory of the server process.")
        self.cpu = gauge("process_cpu_percent", "CPU use since the previous sample, percent.")
        self.fds = gauge("process_open_fds", "Open file descriptors of the server process.")
        self.connections = gauge("open_connections", "Open HTTP connections on the upload port.")
        self.reactor_lag = gauge(
            "reactor_lag_seconds", "How late the reactor ran a call scheduled for now."
        )

    def watch_stores(self, store) -> None:
        """Report the breaker state of a FailoverStore's backends at each scrape."""
        self.registry.register(_StoreCollector(store))

    def render(self) -> bytes:
        return generate_latest(self.registry)


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
