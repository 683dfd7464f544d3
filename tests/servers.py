"""
Private Redis and PostgreSQL servers on spare 127.0.0.1 ports, for tests
that kill and restart them.  Each is stopped for good at test cleanup.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from tests.store_contract import require_service

DEADLINE = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def _wait(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} after {DEADLINE}s")
        time.sleep(0.05)


class PrivateRedis:
    """A redis-server that persists (AOF, fsync always) so a restart keeps its data."""

    def __init__(self, testCase, password: str | None = None) -> None:
        if shutil.which("redis-server") is None:
            require_service("redis-server", "not installed")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="hmacfs-redis-")
        self.password = password
        self.process: subprocess.Popen | None = None
        testCase.addCleanup(self.cleanup)
        self.start()

    def start(self) -> None:
        args = [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            self.dir,
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        _wait(lambda: _answers(self.port), f"redis-server on {self.port} not answering")

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a goodbye, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=DEADLINE)
            self.process = None
        _wait(lambda: not _answers(self.port), f"redis-server on {self.port} still answering")

    def cleanup(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=DEADLINE)
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivatePostgres:
    """
    A PostgreSQL cluster of its own (initdb as the postgres user, trust
    auth, database "test"), started and stopped with pg_ctl.
    """

    def __init__(self, testCase) -> None:
        self.bin = self._bindir()
        if self.bin is None:
            require_service("postgresql", "no initdb/pg_ctl found")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="hmacfs-pg-")
        self.data = os.path.join(self.dir, "data")
        os.chmod(self.dir, 0o755)
        self.asPostgres = [] if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--"]
        if self.asPostgres:
            shutil.chown(self.dir, "postgres", "postgres")
        testCase.addCleanup(self.cleanup)
        self._run(
            os.path.join(self.bin, "initdb"),
            "-D",
            self.data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        )
        self.start()
        self._run(
            os.path.join(self.bin, "createdb"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "test",
        )

    @staticmethod
    def _bindir() -> str | None:
        root = "/usr/lib/postgresql"
        if not os.path.isdir(root):
            return None
        for version in sorted(os.listdir(root), reverse=True):
            candidate = os.path.join(root, version, "bin")
            if os.path.exists(os.path.join(candidate, "pg_ctl")):
                return candidate
        return None

    def _run(self, *args: str) -> None:
        subprocess.run(
            [*self.asPostgres, *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
            timeout=60,
            cwd=self.dir,
        )

    def start(self) -> None:
        self._run(
            os.path.join(self.bin, "pg_ctl"),
            "-D",
            self.data,
            "-w",
            "-l",
            os.path.join(self.dir, "log"),
            "-o",
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def kill(self) -> None:
        """Immediate shutdown: connections drop at once, as in a crash."""
        self._run(os.path.join(self.bin, "pg_ctl"), "-D", self.data, "-m", "immediate", "stop")
        _wait(lambda: not _answers(self.port), f"postgres on {self.port} still answering")

    def cleanup(self) -> None:
        if os.path.exists(os.path.join(self.data, "postmaster.pid")):
            try:
                self.kill()
            except (subprocess.SubprocessError, AssertionError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)
