"""
Operations: the metrics site scraped after real traffic, the timers on a
Clock, and graceful shutdown with uploads in flight.
"""

from __future__ import annotations

import gc
import os
import socket
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import readBody

from hmacd.housekeeping import GarbageCollector, SystemMonitor, drain_uploads
from hmacd.metrics import metrics_site
from tests.support import LoopbackServer, store_files, v_query
from tests.test_http import raw_request


def samples(text: str) -> dict[tuple, float]:
    """{(name, (label pairs...)): value} of a Prometheus text exposition."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


class MetricsTests(TestCase):
    """Scrape /metrics over HTTP after scripted traffic; every figure matches it."""

    @inlineCallbacks
    def test_counters_match_traffic(self):
        """Uploads, refusals, downloads, requests and gauges count exactly what happened."""
        server = LoopbackServer(self, upload_max_size=10_000)
        server.fs.metrics.watch_stores(server.fs.metadata)
        port = reactor.listenTCP(0, metrics_site(server.fs.metrics, reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        scrape = f"http://127.0.0.1:{port.getHost().port}/metrics"

        def put(name, body, query=None):
            target = "/upload/" + name + "?" + (query or v_query(name, len(body)))
            return deferToThread(raw_request, server, "PUT", target, body)

        for name, size in (("a.bin", 100), ("b.bin", 2000), ("c.bin", 5000)):
            response = yield put(name, b"x" * size)
            self.assertEqual(response.code, 201)
        self.assertEqual((yield put("d.bin", b"x", v_query("d.bin", 2))).code, 403)
        self.assertEqual((yield put("a.bin", b"y" * 100)).code, 409)
        self.assertEqual((yield put("big.bin", b"z" * 10_001)).code, 413)
        self.assertEqual((yield put("a//b", b"z")).code, 400)

        # One upload broken off mid-body.
        def brokenOff():
            with socket.create_connection((server.host, server.portNumber)) as s:
                s.sendall(
                    b"PUT /upload/e.bin?" + v_query("e.bin", 4000).encode() + b" HTTP/1.1\r\n"
                    b"Host: x\r\nContent-Length: 4000\r\n\r\n" + b"e" * 1000
                )
                # Hang up once the server has taken the upload on, not "probably by now".
                deadline = time.monotonic() + 10
                while not server.fs.uploads:
                    if time.monotonic() > deadline:
                        raise AssertionError("the server never took the upload on")
                    time.sleep(0.01)

        yield deferToThread(brokenOff)
        for _ in range(100):
            if not server.fs.uploads:
                break
            yield deferLater(reactor, 0.02, lambda: None)

        get = lambda target, headers=None: deferToThread(  # noqa: E731
            raw_request, server, "GET", target, b"", headers
        )
        self.assertEqual((yield get("/upload/b.bin")).code, 200)
        self.assertEqual((yield get("/upload/c.bin", {"Range": "bytes=0-99"})).code, 206)
        self.assertEqual(
            (yield deferToThread(raw_request, server, "HEAD", "/upload/c.bin")).code, 200
        )
        self.assertEqual((yield get("/upload/missing")).code, 404)

        response = yield server.http.get(scrape)
        self.assertEqual(response.code, 200)
        text = (yield readBody(response)).decode()
        got = samples(text)

        def value(name, **labels):
            return got[("hmac_file_server_" + name, tuple(sorted(labels.items())))]

        self.assertEqual(value("uploads_total"), 3)
        self.assertEqual(value("upload_bytes_total"), 7100)
        self.assertEqual(value("upload_duration_seconds_count"), 3)
        for reason, count in (
            ("auth", 1),
            ("conflict", 1),
            ("too_large", 1),
            ("bad_request", 1),
            ("aborted", 1),
        ):
            self.assertEqual(value("upload_errors_total", reason=reason), count, reason)
        self.assertEqual(value("downloads_total"), 2)
        self.assertEqual(value("download_bytes_total"), 2000 + 100)
        for method, status, count in (
            ("PUT", "201", 3),
            ("PUT", "403", 1),
            ("PUT", "409", 1),
            ("PUT", "413", 1),
            ("PUT", "400", 1),
            ("GET", "200", 1),
            ("GET", "206", 1),
            ("GET", "404", 1),
            ("HEAD", "200", 1),
        ):
            self.assertEqual(value("requests_total", method=method, status=status), count)
        self.assertEqual(value("uploads_in_progress"), 0)
        self.assertEqual(value("store_up", backend="memory", role="primary"), 1)
        self.assertEqual(value("store_failovers_total", backend="memory", role="primary"), 0)
        self.assertIn("hmac_file_server_upload_duration_seconds_bucket", text)
        self.assertIn('le="3600.0"', text)

    @inlineCallbacks
    def test_only_metrics_path(self):
        """The metrics site answers /metrics and nothing else; the upload port has no /metrics."""
        server = LoopbackServer(self)
        port = reactor.listenTCP(0, metrics_site(server.fs.metrics, reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        response = yield server.http.get(f"http://127.0.0.1:{port.getHost().port}/other")
        yield readBody(response)
        self.assertEqual(response.code, 404)
        self.assertEqual((yield deferToThread(raw_request, server, "GET", "/metrics")).code, 404)


class TimerTests(SynchronousTestCase):
    """GC and the system monitor, driven by a Clock."""

    def test_gc_every_interval(self):
        """gc.collect() runs at start and then every interval; a failing run keeps the loop."""
        clock = Clock()
        calls = []

        def collect():
            calls.append(clock.seconds())
            if len(calls) == 2:
                raise RuntimeError("gc broke")
            return 7

        self.patch(gc, "collect", collect)
        service = GarbageCollector(30, clock)
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(30)
        clock.advance(30)
        self.assertEqual(calls, [0, 30, 60])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_monitor_sets_gauges_and_logs(self):
        """Each sample sets the process gauges and logs one status line at info level."""
        clock = Clock()
        server = _FakeSite()
        from tests.support import MemoryServer

        memory = MemoryServer(self.mktemp())
        memory.fs.reactor = clock
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        service = SystemMonitor(memory.fs, server, 10)
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(0)
        metrics = memory.fs.metrics
        got = samples(metrics.render().decode())
        self.assertGreaterEqual(got[("hmac_file_server_process_threads", ())], 1)
        self.assertGreater(got[("hmac_file_server_process_resident_memory_bytes", ())], 1 << 20)
        self.assertGreater(got[("hmac_file_server_process_open_fds", ())], 2)
        clock.advance(10)
        status = [e for e in events if e.get("log_format", "").startswith("status:")]
        self.assertEqual(len(status), 2)
        self.assertEqual(status[0]["log_level"].name, "info")
        self.assertEqual(status[0]["connections"], 3)

    def test_monitor_step_failure_keeps_loop(self):
        """A sample that raises is logged and the next one still runs."""
        clock = Clock()
        from tests.support import MemoryServer

        memory = MemoryServer(self.mktemp())
        memory.fs.reactor = clock
        service = SystemMonitor(memory.fs, _FakeSite(), 10)
        calls = []

        class BrokenProcess:
            def oneshot(self):
                calls.append(1)
                raise OSError("no /proc")

        self.patch(service, "process", BrokenProcess())
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(10)
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)


class _FakeSite:
    openConnections = 3


class ShutdownTests(TestCase):
    """Graceful shutdown with an upload in flight."""

    def partial(self, server, name: str, size: int, first: bytes):
        """A raw socket that has sent the headers and the first bytes of a body."""
        s = socket.create_connection((server.host, server.portNumber))
        s.sendall(
            f"PUT /upload/{name}?{v_query(name, size)} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
            + first
        )
        self.addCleanup(s.close)
        return s

    @inlineCallbacks
    def waitUploads(self, server, count):
        for _ in range(200):
            if len(server.fs.uploads) == count:
                return
            yield deferLater(reactor, 0.02, lambda: None)
        self.fail(f"{len(server.fs.uploads)} uploads in progress, wanted {count}")

    @inlineCallbacks
    def test_upload_finishes_within_grace(self):
        """An upload in flight finishes (201) during the grace period; new ones get 503."""
        server = LoopbackServer(self)
        s = self.partial(server, "slow.bin", 2000, b"a" * 1000)
        yield self.waitUploads(server, 1)
        drained = Deferred.fromCoroutine(drain_uploads(server.fs, grace=10))
        refused = yield deferToThread(
            raw_request, server, "PUT", "/upload/new.bin?" + v_query("new.bin", 1), b"n"
        )
        self.assertEqual(refused.code, 503)
        yield deferToThread(s.sendall, b"a" * 1000)
        answer = yield deferToThread(s.recv, 4096)
        self.assertIn(b"201 Created", answer)
        yield drained
        self.assertEqual(store_files(server.root), ["slow.bin"])

    @inlineCallbacks
    def test_upload_aborted_after_grace(self):
        """An upload still unfinished when the grace ends is aborted; its temp file goes."""
        server = LoopbackServer(self)
        self.partial(server, "dir/stuck.bin", 10_000, b"b" * 100)
        yield self.waitUploads(server, 1)
        started = reactor.seconds()
        yield Deferred.fromCoroutine(drain_uploads(server.fs, grace=0.3))
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)
        yield self.waitUploads(server, 0)
        self.assertEqual(store_files(server.root), [])
        self.assertFalse(os.path.exists(os.path.join(server.root, "dir")))
