"""
Workers = N: the real `twistd hmacfs` with worker processes sharing its listening socket.

Which process accepts a connection is the kernel's choice; the tests make it the worker's by
stopping the main process (SIGSTOP) while they connect.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import TestCase

from hmacd.auth import sign_jwt, sign_v
from hmacd.config import Config
from hmacd.housekeeping import GarbageCollector, SystemMonitor
from hmacd.services import HmacfsService, StoreService
from hmacd.takedown import DenyListRefresh
from hmacd.workers import WorkerError, address_family, build_worker_service
from tests.test_tap import DEADLINE, REPO, TwistdHarness, _free_port, _http, _read


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _state(pid: int) -> str | None:
    """The process's state letter in /proc (R, S, T, Z, ...), or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0]
    except OSError:
        return None


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z")


def _runs_as(uid: int, gid: int, executable: str) -> bool:
    """Whether that user can run this interpreter and import hmacd with it."""

    def switch():
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    try:
        result = subprocess.run(
            [executable, "-c", "import hmacd.workers"],
            preexec_fn=switch,
            capture_output=True,
            cwd="/",
            env={"PYTHONPATH": REPO},
            timeout=DEADLINE,
        )
    except OSError:
        return False
    return result.returncode == 0


class WorkersTests(TwistdHarness):
    """twistd -n hmacfs with Workers = 2."""

    def launch(self, *twistd: str) -> subprocess.Popen:
        """twistd -n [options] hmacfs with Workers = 2, LogFile and metrics; not waited for."""
        self.port = _free_port()
        self.metricsPort = _free_port()
        cfg = self.config(
            self.port,
            Workers=2,
            LogFile="hmacfs.log",
            MetricsEnabled=True,
            MetricsPort=f"127.0.0.1:{self.metricsPort}",
        )
        return self.spawn("-n", *twistd, "hmacfs", "--config", cfg)

    def start(self) -> subprocess.Popen:
        """L{launch}, once the worker serves; its pid in self.worker."""
        proc = self.launch()
        self.waitListening(self.port, proc)
        self.worker = self.waitWorker(proc)
        return proc

    def waitWorker(self, proc: subprocess.Popen, other_than: int | None = None) -> int:
        """The pid of the worker, once it is serving (it says so in the log)."""
        deadline = time.monotonic() + DEADLINE
        while True:
            pids = [p for p in _children(proc.pid) if p != other_than and _alive(p)]
            if pids and f"worker 1 serving, pid {pids[0]}" in self.log():
                return pids[0]
            if proc.poll() is not None or time.monotonic() > deadline:
                self.fail(f"no worker serving:\n{_read(self.output)}\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        path = os.path.join(self.cwd, "hmacfs.log")
        return _read(path) if os.path.exists(path) else ""

    @contextmanager
    def stopped(self, proc: subprocess.Popen):
        """The main process stopped meanwhile, so only the worker accepts."""
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            # Stopped for sure, not "probably by now": the kernel says so in /proc.
            deadline = time.monotonic() + DEADLINE
            while _state(proc.pid) not in ("T", "t"):
                self.assertLess(time.monotonic(), deadline, "the main process did not stop")
                time.sleep(0.01)
            yield
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metricsPort}/metrics", timeout=DEADLINE
        ) as response:
            text = response.read().decode()
        match = re.search(rf"^hmac_file_server_{name} (\S+)$", text, re.M)
        self.assertIsNotNone(match, text)
        return float(match.group(1))

    def waitGone(self, pid: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while _alive(pid):
            if time.monotonic() > deadline:
                self.fail(f"process {pid} still there after {DEADLINE}s")
            time.sleep(0.05)

    def test_worker_serves_and_is_counted(self) -> None:
        """
        The worker accepts on the shared socket and serves uploads and downloads; its log
        lines reach LogFile marked as its own, and the main process's /metrics counts its
        uploads with those of the main process.
        """
        proc = self.start()
        secret = self.secret()
        with self.stopped(proc):
            self.putAndGet(self.port, secret, "by-worker.txt")
        self.putAndGet(self.port, secret, "by-either.txt")
        self.assertEqual(self.metric("uploads_total"), 2)
        self.assertEqual(self.metric('requests_total{method="PUT",status="201"}'), 2)
        self.terminate(proc)
        self.waitGone(self.worker)
        self.waitClosed(self.port)
        log = self.log()
        self.assertRegex(log, r"\[worker 1\] 127\.0\.0\.1 .*PUT /upload/tapdir/by-worker\.txt")
        self.assertIn("[worker 1] SIGTERM: stopping", log)
        self.assertNotIn("Traceback", log)

    @contextmanager
    def paused(self, pid: int):
        """Process C{pid} stopped meanwhile (SIGSTOP), so the other one accepts."""
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + DEADLINE
            while _state(pid) not in ("T", "t"):
                self.assertLess(time.monotonic(), deadline, f"process {pid} did not stop")
                time.sleep(0.01)
            yield
        finally:
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)

    def test_quota_across_processes(self) -> None:
        """
        UserQuota counts the uploads of every process: what the worker stored counts when
        the main process decides, and the other way round.
        """
        self.port = _free_port()
        cfg = self.config(self.port, Workers=2, LogFile="hmacfs.log", UserQuota=10000)
        proc = self.spawn("-n", "hmacfs", "--config", cfg)
        self.waitListening(self.port, proc)
        worker = self.waitWorker(proc)
        secret = self.secret()

        def put(name: str) -> int:
            body = b"q" * 3000
            token = sign_jwt(
                secret,
                slot=f"s-{name}",
                filename=f"{name}.bin",
                filesize=len(body),
                filetype="application/octet-stream",
                exp=int(time.time()) + 300,
                sub="alice@example.org",
            )
            headers = {
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/octet-stream",
            }
            return _http(self.port, "PUT", f"/upload/s-{name}/{name}.bin", body, headers)[0]

        def settled() -> None:
            """
            Until no upload holds quota and nobody writes the SQLite store: the holds go
            after the 201 (in a batched transaction), and a process stopped in the middle of
            one would keep the store's write lock for as long as it is stopped.
            """
            import sqlite3

            path = os.path.join(self.cwd, "store", ".hmacfs", "meta.sqlite3")
            deadline = time.monotonic() + DEADLINE
            while True:
                db = sqlite3.connect(path, timeout=0.1)
                try:
                    db.execute("BEGIN IMMEDIATE")  # the write lock: nobody else writes
                    (held,) = db.execute(
                        "SELECT COUNT(*) FROM hmacfs_files_usage WHERE kind = 'hold'"
                    ).fetchone()
                    db.rollback()
                    if held == 0:
                        return
                except sqlite3.OperationalError:
                    pass  # locked: a write in progress
                finally:
                    db.close()
                self.assertLess(time.monotonic(), deadline, "holds never let go")
                time.sleep(0.05)

        with self.paused(proc.pid):  # the worker decides
            self.assertEqual([put("a"), put("b")], [201, 201])
            settled()
        with self.paused(worker):  # the main process decides, knowing the worker's 6000
            self.assertEqual([put("c"), put("d")], [201, 413])
            settled()
        with self.paused(proc.pid):  # and the worker knows the main process's 3000
            self.assertEqual(put("e"), 413)
        self.terminate(proc)

    def test_dead_worker_is_replaced(self) -> None:
        """A worker that dies is started again, and the new one serves."""
        proc = self.start()
        os.kill(self.worker, signal.SIGKILL)
        replacement = self.waitWorker(proc, other_than=self.worker)
        self.assertIn(f"worker 1 (pid {self.worker}) ended", self.log())
        with self.stopped(proc):
            self.putAndGet(self.port, self.secret())
        self.assertIn(f"worker 1 serving, pid {replacement}", self.log())
        self.terminate(proc)
        self.waitGone(replacement)

    def test_worker_leaves_with_main_process(self) -> None:
        """A main process killed outright takes its worker with it: nothing is left listening."""
        proc = self.start()
        proc.kill()
        proc.wait(timeout=DEADLINE)
        self.waitGone(self.worker)
        self.waitClosed(self.port)

    def test_worker_finishes_upload_at_shutdown(self) -> None:
        """At SIGTERM an upload in progress in a worker gets its 201, then everything stops."""
        proc = self.start()
        secret = self.secret()
        body = os.urandom(100_000)
        path = "tapdir/slow.bin"
        mac = sign_v(secret, path, len(body))
        head = (
            f"PUT /upload/{path}?v={mac} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        directory = os.path.join(self.cwd, "store", "tapdir")
        with self.stopped(proc):
            conn = socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE)
            self.addCleanup(conn.close)
            conn.sendall(head + body[:50_000])
            deadline = time.monotonic() + DEADLINE
            # Made when a body this large is accepted (its temp may have no name to list).
            while not os.path.isdir(directory):
                self.assertLess(time.monotonic(), deadline, "the worker took no upload")
                time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        # The worker has its SIGTERM (from the main process) once it says so in the log.
        deadline = time.monotonic() + DEADLINE
        while "[worker 1] SIGTERM: stopping" not in self.log():
            self.assertLess(time.monotonic(), deadline, f"no SIGTERM in the worker:\n{self.log()}")
            time.sleep(0.05)
        conn.sendall(body[50_000:])
        self.assertRegex(conn.recv(4096), rb"^HTTP/1.1 201 ")
        proc.wait(timeout=DEADLINE)
        self.waitGone(self.worker)
        with open(os.path.join(directory, "slow.bin"), "rb") as f:
            self.assertEqual(f.read(), body)

    def test_uid_switch(self) -> None:
        """With --uid the worker runs as that user too, and its metrics are counted."""
        nobody = self.switchingToNobody()
        proc = self.launch("--uid", str(nobody.pw_uid), "--gid", str(nobody.pw_gid))
        if not _runs_as(nobody.pw_uid, nobody.pw_gid, sys.executable):
            # This interpreter (under /root, say) cannot be run by that user: start-up
            # must stop with a line saying so, not run with fewer processes than configured.
            self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
            self.assertIn(
                f"as uid {nobody.pw_uid}: Permission denied (the interpreter and hmacfs must",
                self.log(),
            )
            return
        self.waitListening(self.port, proc)
        worker = self.waitWorker(proc)
        self.assertEqual(os.stat(f"/proc/{worker}").st_uid, nobody.pw_uid)
        with self.stopped(proc):
            self.putAndGet(self.port, self.secret())
        self.assertEqual(self.metric("uploads_total"), 1)
        self.terminate(proc)


class WorkersRefusedTests(TwistdHarness):
    """Settings that Workers cannot honour stop start-up with one line."""

    def test_rate_limit_refused(self) -> None:
        cfg = self.config(_free_port(), Workers=2, RateLimitPerMinute=60)
        proc = self.spawn("-n", "hmacfs", "--config", cfg)
        self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
        self.assertIn("RateLimitPerMinute: cannot be enforced across processes", _read(self.output))

    def test_port_in_use_exits_nonzero(self) -> None:
        """A port that cannot be bound stops start-up, as with one process; no worker starts."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            cfg = self.config(busy.getsockname()[1], Workers=2)
            proc = self.spawn("-n", "hmacfs", "--config", cfg)
            self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
        self.assertNotIn("worker 1 started", _read(self.output))


class WorkerCompositionTests(TestCase):
    """The worker process's own builder, as data: what a worker runs and what it leaves out."""

    def test_address_family_from_public_address(self) -> None:
        """The family a worker adopts its socket with comes from the port's getHost() type."""
        for address, family in (
            (IPv4Address("TCP", "127.0.0.1", 8080), socket.AF_INET),
            (IPv6Address("TCP", "::1", 8080), socket.AF_INET6),
            (UNIXAddress(b"/run/hmacfs.sock"), socket.AF_UNIX),
        ):
            self.assertEqual(address_family(address), family, address)
        self.assertRaises(WorkerError, address_family, object())

    def test_worker_services(self) -> None:
        """A worker: the stores, its adopted socket and its timers; no announce, sweep or port."""
        store = os.path.abspath(self.mktemp())
        os.makedirs(store)
        reactor = MemoryReactorClock()
        top = build_worker_service(
            Config(store_dir=store, workers=2), b"s" * 32, reactor, 3, socket.AF_INET
        )
        self.assertIsInstance(top, HmacfsService)
        stores, adopted, collector, monitor, denials = list(top)
        self.assertIsInstance(denials, DenyListRefresh)
        self.assertIsInstance(stores, StoreService)
        self.assertIs(stores.fs, top.fileServer)
        self.assertEqual((adopted.name, adopted.fd, adopted.family), ("http", 3, socket.AF_INET))
        self.assertIs(adopted.site.fileServer, top.fileServer)
        self.assertIsInstance(collector, GarbageCollector)
        self.assertIsInstance(monitor, SystemMonitor)
        self.assertIsNone(top.fileServer.metrics.shared)
        self.assertEqual(reactor.tcpServers, [])

    def test_no_import_cycle(self) -> None:
        """hmacd.workers builds a worker without importing hmacd.tap (the plugin)."""
        imported = subprocess.run(
            [sys.executable, "-c", "import sys, hmacd.workers; print('hmacd.tap' in sys.modules)"],
            capture_output=True,
            env=dict(os.environ, PYTHONPATH=REPO),
            timeout=DEADLINE,
            check=True,
        )
        self.assertEqual(imported.stdout.strip(), b"False", imported.stderr)
