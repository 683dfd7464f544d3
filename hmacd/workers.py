"""
C{Workers = N}: N processes accepting on the one listening socket.

The process twistd runs (the main one) listens, serves, and alone runs the sweeps, the
metrics listener and the XMPP component.  L{WorkerPool} starts N-1 more with
C{python -m hmacd.workers}: each gets the listening socket as its fd 3 and, on its stdin,
the config and the secret (never on a command line or in an environment, where C{ps} and
C{/proc} show them).  A worker serves HTTP and nothing else.  Its log events come back on
its stdout as JSON and go into the main process's log, so that LogLevel and LogFile apply
in one place.  A worker stops on SIGTERM, letting its uploads finish as the main process
does, or when its stdin closes because the main process is gone; one that dies is started
again.

Everything that must hold across processes holds on disk: the final C{link()} refuses a
second upload of a name, resumable chunks are locked with C{flock}, and download records
are cached together with the file's inode.  Counters every process keeps apart (the rate
limit, the total bandwidth) are refused with Workers by the config.  Metrics are written
to prometheus_client's multiprocess files, which the main process's C{/metrics} adds up.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IProcessTransport, IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol, Protocol, connectionDone
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevelFilterPredicate,
    eventFromJSON,
    formatEvent,
    globalLogBeginner,
    globalLogPublisher,
    jsonFileLogObserver,
)
from twisted.python.failure import Failure

from hmacd.config import Config
from hmacd.metrics import forget_process, share_between_processes
from hmacd.secret import ENV_VAR as SECRET_ENV
from hmacd.secret import PREVIOUS_ENV_VAR
from hmacd.services import (
    HmacfsService,
    StoreService,
    build_file_server,
    build_metadata,
    timers,
)
from hmacd.web import HmacfsSite

__all__ = ["WorkerError", "WorkerPool", "address_family", "build_worker_service", "run_worker"]

log = Logger()

# The listening socket's number in a worker.
LISTEN_FD = 3


@dataclass(frozen=True)
class Job:
    """What a worker is told on its stdin."""

    config: Config
    secret: bytes
    index: int
    family: int
    metrics: str | None


class WorkerError(Exception):
    """A worker process could not be started; the text is one line for the admin."""


def address_family(address: object) -> int:
    """
    The socket family of a listening port's C{getHost()}: what a worker needs to adopt
    the socket, found from the public address types rather than the port's socket.
    """
    if isinstance(address, IPv6Address):
        return socket.AF_INET6
    if isinstance(address, IPv4Address):
        return socket.AF_INET
    if isinstance(address, UNIXAddress):
        return socket.AF_UNIX
    raise WorkerError(f"Workers: cannot share a listening port on {address!r}")


class WorkerPool(Service):
    """
    Listens on C{endpoint} with C{site} in this process, and keeps C{count - 1} worker
    processes accepting on the same socket.

    @ivar workers: the running workers' L{_Worker} protocols, by index (1 to count - 1).
    """

    name = "http"
    port = None
    restartDelay = 1.0  # seconds before a worker that died is started again
    stopTimeout = 10.0  # seconds a worker gets beyond ShutdownGrace before SIGKILL

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        site: HmacfsSite,
        config: Config,
        secret: bytes,
        reactor: Any,
        metrics: str | None = None,
        executable: str = sys.executable,
    ) -> None:
        self.endpoint = endpoint
        self.site = site
        self.config = config
        self.secret = secret
        self.reactor = reactor
        self.metrics = metrics
        self.executable = executable
        self.workers: dict[int, _Worker] = {}
        self._restarts: dict[int, IDelayedCall] = {}

    def privilegedStartService(self) -> None:
        # Listening may need root (port 443): before twistd drops privileges.  The workers
        # are started in startService, after, so they run as the user twistd switched to.
        super().privilegedStartService()
        self._listen()

    def _listen(self) -> None:
        failures: list[Failure] = []
        d = self.endpoint.listen(self.site)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            # As strports.service: a port that cannot be bound makes twistd exit non-zero.
            failures[0].raiseException()

    def _listening(self, port) -> None:
        self.port = port

    def startService(self) -> None:
        super().startService()
        if self.port is None:
            self._listen()
        for index in range(1, self.config.workers):
            try:
                self._spawn(index)
            except OSError as e:
                # twistd exits non-zero: better than fewer processes than configured.
                raise WorkerError(self._cannot(e)) from None

    def _cannot(self, e: OSError) -> str:
        return (
            f"Workers: cannot run {self.executable} as uid {os.getuid()}: {e.strerror}"
            " (the interpreter and hmacfs must be readable by the user twistd runs as)"
        )

    def _start(self, index: int) -> None:
        """Start worker C{index} again; if that fails, try again later."""
        self._restarts.pop(index, None)
        try:
            self._spawn(index)
        except OSError as e:
            log.error(
                "{why}; trying again in {delay} s", why=self._cannot(e), delay=self.restartDelay
            )
            self._restarts[index] = self.reactor.callLater(self.restartDelay, self._start, index)

    def _spawn(self, index: int) -> None:
        port = self.port
        if port is None:
            raise WorkerError("Workers: a worker started before the port listens")
        family = address_family(port.getHost())
        job = Job(self.config, self.secret, index, family, self.metrics)
        worker = _Worker(self, index)
        transport = self.reactor.spawnProcess(
            worker,
            self.executable,
            [self.executable, "-m", "hmacd.workers"],
            # The secrets go on the pipe (the previous ones in the config, as prepare_store
            # resolved them); not in the environment either, if they came from there.
            env={k: v for k, v in os.environ.items() if k not in (SECRET_ENV, PREVIOUS_ENV_VAR)},
            childFDs={0: "w", 1: "r", 2: "r", LISTEN_FD: port.fileno()},
        )
        data = pickle.dumps(job)
        transport.write(struct.pack("!I", len(data)) + data)
        self.workers[index] = worker
        log.info("worker {index} started, pid {pid}", index=index, pid=transport.pid)

    def _ended(self, worker: _Worker, reason) -> None:
        if self.metrics is not None and worker.pid is not None:
            forget_process(self.metrics, worker.pid)
        if self.workers.get(worker.index) is not worker:
            return
        del self.workers[worker.index]
        if self.running:
            log.error(
                "worker {index} (pid {pid}) ended: {why}; starting it again in {delay} s",
                index=worker.index,
                pid=worker.pid,
                why=reason.getErrorMessage(),
                delay=self.restartDelay,
            )
            self._restarts[worker.index] = self.reactor.callLater(
                self.restartDelay, self._start, worker.index
            )

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        stopping = [
            worker.stop(self.config.shutdown_grace + self.stopTimeout)
            for worker in list(self.workers.values())
        ]
        # This process stops accepting now, as with Workers = 1; the workers have the socket
        # open until they have stopped accepting too.
        closed = []
        if self.port is not None:
            port, self.port = self.port, None
            closed.append(maybeDeferred(port.stopListening))
        return DeferredList(closed + stopping)


class _Worker(ProcessProtocol):
    """The main process's end of one worker: its log, its end, its stop."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.pid: int | None = None
        self._out = b""
        self._err = b""
        self._ended: Deferred[None] | None = None
        self._kill: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.pid = self._process().pid

    def _process(self) -> IProcessTransport:
        """The process, from spawnProcess on (which connects it before it returns)."""
        if self.transport is None:
            raise WorkerError(f"worker {self.index} has no process")
        return self.transport

    def outReceived(self, data: bytes) -> None:
        # jsonFileLogObserver: one event per line (JSON escapes every newline in it).
        *lines, self._out = (self._out + data).split(b"\n")
        for line in lines:
            self._event(line)

    def errReceived(self, data: bytes) -> None:
        # A worker that fails before its logging is set up says so on stderr.
        *lines, self._err = (self._err + data).split(b"\n")
        for line in lines:
            self._said(line)

    def _event(self, line: bytes) -> None:
        line = line.lstrip(b"\x1e")
        if not line.strip():
            return
        try:
            event = eventFromJSON(line.decode("utf-8"))
        except ValueError:
            self._said(line)
            return
        event["log_system"] = f"worker {self.index}"
        globalLogPublisher(event)

    def _said(self, line: bytes) -> None:
        """A line of the worker's that is no log event of its own."""
        log.error("worker {index}: {line}", index=self.index, line=line.decode("utf-8", "replace"))

    def stop(self, timeout: float) -> Deferred[None]:
        """SIGTERM; SIGKILL after C{timeout} seconds.  Fires when the process has ended."""
        if self.pid is None or self._kill is not None or self._process().pid is None:
            return self._ended or succeed(None)
        self._ended = Deferred()
        try:
            self._process().signalProcess("TERM")
        except error.ProcessExitedAlready:
            return self._ended
        self._kill = self.pool.reactor.callLater(timeout, self._forceStop)
        return self._ended

    def _forceStop(self) -> None:
        log.warn("worker {index} did not stop in time: killing it", index=self.index)
        try:
            self._process().signalProcess("KILL")
        except error.ProcessExitedAlready:
            pass

    def processEnded(self, reason) -> None:
        if self._out:
            self._event(self._out)
        if self._err:
            self._said(self._err)
        if self._kill is not None and self._kill.active():
            self._kill.cancel()
        self.pool._ended(self, reason)
        if self._ended is not None:
            self._ended.callback(None)


# ---------------------------------------------------------------------------------------------
# The worker process


def _read_exactly(fd: int, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = os.read(fd, count - len(data))
        if not chunk:
            raise SystemExit("hmacd.workers: stdin closed before the job was read")
        data += chunk
    return data


class _Stopper:
    """Stops the reactor once, whichever comes first: SIGTERM or the main process gone."""

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.stopping = False

    def __call__(self, why: str) -> None:
        if not self.stopping:
            self.stopping = True
            log.info("{why}: stopping", why=why)
            self.reactor.stop()

    def onSignal(self, signum, frame) -> None:
        self.reactor.callFromThread(self, "SIGTERM")


class _Lifeline(Protocol):
    """The worker's stdin: when it closes, the main process is gone and so is the worker."""

    def __init__(self, stop: _Stopper) -> None:
        self.stop = stop

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.stop("the main process is gone")


def _forwarder(sink):
    """
    A log observer sending each event as JSON with its text formatted here: Twisted's
    flattening for JSON keeps the values but drops format specs like C{{rss:.1f}}.
    """
    json = jsonFileLogObserver(sink)

    def forward(event) -> None:
        sent = {key: event[key] for key in _FORWARDED if key in event}
        sent["log_format"] = "{log_text}"
        sent["log_text"] = formatEvent(event)
        json(sent)

    return forward


_FORWARDED = ("log_level", "log_namespace", "log_time", "log_failure", "log_system")


class _Lines:
    """A file-like sink for jsonFileLogObserver that writes to the StandardIO transport."""

    def __init__(self, transport) -> None:
        self.transport = transport

    def write(self, text: str) -> None:
        self.transport.write(text.encode("utf-8"))

    def flush(self) -> None:
        pass


class _Adopted(Service):
    """A worker's listener: the main process's listening socket, adopted."""

    name = "http"
    port = None

    def __init__(self, reactor: Any, fd: int, family: int, site: HmacfsSite) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.site = site

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.site)
        os.close(self.fd)  # the port has a duplicate of it

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        return self.port.stopListening() if self.port is not None else None


def build_worker_service(
    config: Config,
    secret: bytes,
    reactor: Any,
    fd: int,
    family: int,
) -> HmacfsService:
    """
    The services of a worker process: the metadata stores, the adopted listening socket
    C{fd} (of address C{family}) and the timers; no announce, sweep, metrics listener or
    component, which the main process runs alone.  Its metrics go where the process's
    prometheus_client is switched to (L{run_worker}); only the main process reads them.
    """
    metadata = build_metadata(config, reactor)
    fs = build_file_server(config, secret, reactor, metadata)
    site = HmacfsSite(fs)
    top = HmacfsService(fs)
    children: list[Service] = [
        StoreService(metadata, fs, config.shutdown_grace),
        _Adopted(reactor, fd, family, site),
    ]
    for child in [*children, *timers(config, fs, site, reactor)]:
        child.setServiceParent(top)
    return top


def run_worker() -> None:
    """C{python -m hmacd.workers}: serve the socket on fd 3 as the job on stdin says."""
    (length,) = struct.unpack("!I", _read_exactly(0, 4))
    job: Job = pickle.loads(_read_exactly(0, length))
    if job.metrics is not None:
        share_between_processes(job.metrics)

    from twisted.internet import reactor
    from twisted.internet.stdio import StandardIO

    from hmacd.logs import LEVELS

    # SIGTERM (from the main process, or from whoever signals the whole group) stops the
    # worker gracefully once; SIGINT is a terminal's Ctrl-C, which the main process handles.
    stop = _Stopper(reactor)
    signal.signal(signal.SIGTERM, stop.onSignal)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stdio = StandardIO(_Lifeline(stop), reactor=reactor)
    observer = FilteringLogObserver(
        _forwarder(_Lines(stdio)),
        [LogLevelFilterPredicate(defaultLogLevel=LEVELS[job.config.log_level])],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    service = build_worker_service(job.config, job.secret, reactor, LISTEN_FD, job.family)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    log.info("worker {index} serving, pid {pid}", index=job.index, pid=os.getpid())
    # The global reactor is typed as IReactorCore, whose run() takes no arguments; the
    # installed one (every posix reactor) takes this one.
    cast(Any, reactor).run(installSignalHandlers=False)


if __name__ == "__main__":
    run_worker()
