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


class ReplyError(Exception):
    """An error reply from Redis to the raw client."""


class RawRedis:
    """A blocking RESP client of the tests' own, to look behind the store's back."""

    def __init__(self, port: int, password: str | None = None, db: int = 0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.reader = self.sock.makefile("rb")
        try:
            if password is not None:
                self.call("AUTH", password)
            if db:
                self.call("SELECT", db)
        except BaseException:
            self.close()
            raise

    def call(self, *args: str | bytes | int):
        parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
        self.sock.sendall(
            b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        )
        return self._read()

    def _read(self):
        line = self.reader.readline()
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise ReplyError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return None if int(rest) < 0 else self.reader.read(int(rest) + 2)[:-2]
        if kind == b"*":
            return None if int(rest) < 0 else [self._read() for _ in range(int(rest))]
        raise AssertionError(f"unexpected reply line {line!r}")

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def delete_prefix(port: int, prefix: str, password: str | None = None, db: int = 0) -> None:
    """Delete every key under prefix (plain characters only: it is a glob)."""
    raw = RawRedis(port, password, db)
    try:
        cursor = b"0"
        while True:
            cursor, keys = raw.call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            if keys:
                raw.call("DEL", *keys)
            if cursor == b"0":
                break
    finally:
        raw.close()


class RedisServer:
    """
    A redis-server of a test's own on a spare 127.0.0.1 port, killed at
    cleanup.  With persist=True it keeps its data in an append-only file
    (fsync always), so a restart after kill() finds it again.
    """

    def __init__(self, testCase, password: str | None = None, persist: bool = False) -> None:
        if shutil.which("redis-server") is None:
            require_service("redis-server", "not on PATH")
        self.port = free_port()
        self.password = password
        self.persist = persist
        self.dir = tempfile.mkdtemp(prefix="hmacfs-redis-")
        self.process: subprocess.Popen | None = None
        testCase.addCleanup(self.cleanup)
        self.start()

    def start(self) -> None:
        """
        Start on self.port and wait (at most 5 s) until it answers.  The port was free when
        picked, but another test run may take it first: a server that is not ours (or ours
        exiting because the port is taken) means another port, not a test that fails later.
        """
        for _ in range(5):
            if self._start():
                return
            self.port = free_port()
        raise AssertionError("redis-server: no free port was ours five times")

    def _start(self) -> bool:
        args = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.persist else "no",
            "--appendfsync", "always",
            "--dir", self.dir,
            "--logfile", os.path.join(self.dir, "log"),
        ]  # fmt: skip
        if self.password is not None:
            args += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while True:
            if self.process.poll() is not None:
                with open(os.path.join(self.dir, "log"), errors="replace") as f:
                    log = f.read()[-500:]
                if "Address already in use" in log:
                    return False
                raise AssertionError(f"redis-server exited: {log}")
            try:
                raw = self.raw()
            except (OSError, ReplyError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
                continue
            try:
                info = raw.call("INFO", "server")
            except ReplyError:
                info = b""  # another run's server, with a password
            finally:
                raw.close()
            if f"process_id:{self.process.pid}\r\n".encode() in info:
                return True
            self.process.kill()
            self.process.wait(timeout=5)
            return False

    def raw(self, db: int = 0) -> RawRedis:
        return RawRedis(self.port, self.password, db)

    def kill(self) -> None:
        """SIGKILL: gone without a goodbye, as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=5)
        self.process = None

    def pause(self) -> None:
        """SIGSTOP: connected and accepting (the kernel does that), never answering."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        if self.process is not None:
            self.resume()
            self.kill()
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


def lua_string(value: str | bytes) -> str:
    """A Lua string literal of value's bytes (UTF-8 for str), safe for any byte."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    out = []
    for byte in data:
        char = chr(byte)
        if 0x20 <= byte < 0x7F and char not in '"\\':
            out.append(char)
        else:
            out.append(f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


class ProsodyServer:
    """
    A Prosody of a test's own: loopback only, spare ports, no TLS, plain authentication,
    in the foreground, killed at cleanup.

    ``hosts`` maps each VirtualHost to its users' passwords; ``components`` is Lua for the
    Component sections (the caller knows the ports and secrets they need).  Accounts are
    written where mod_auth_internal_plain keeps them, because ``prosodyctl register`` as root
    drops to the prosody user, who cannot write into a test's temporary directory.
    """

    def __init__(self, testCase, hosts: dict[str, dict[str, str]], components: str) -> None:
        self.binary = shutil.which("prosody")
        if self.binary is None:
            require_service("prosody", "not installed (apt-get install prosody prosody-modules)")
        if not os.path.exists("/usr/lib/prosody/modules/mod_http_upload_external"):
            require_service("prosody-modules", "mod_http_upload_external is not installed")
        self.dir = os.path.abspath(testCase.mktemp())
        os.makedirs(os.path.join(self.dir, "data"))
        os.makedirs(os.path.join(self.dir, "certs"))
        self.c2s_port = free_port()
        self.component_port = free_port()
        self.config = os.path.join(self.dir, "prosody.cfg.lua")
        self.log = os.path.join(self.dir, "prosody.log")
        virtual_hosts = "".join(f"VirtualHost {lua_string(host)}\n" for host in hosts)
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(
                f"daemonize = false\n"
                # CI and these sandboxes run as root; Prosody refuses that unless told.
                f"run_as_root = {'true' if os.geteuid() == 0 else 'false'}\n"
                f"pidfile = {lua_string(os.path.join(self.dir, 'prosody.pid'))}\n"
                f"data_path = {lua_string(os.path.join(self.dir, 'data'))}\n"
                f"certificates = {lua_string(os.path.join(self.dir, 'certs'))}\n"
                f"admin_socket = {lua_string(os.path.join(self.dir, 'admin.sock'))}\n"
                f'interfaces = {{ "127.0.0.1" }}\n'
                f"c2s_ports = {{ {self.c2s_port} }}\n"
                f"c2s_direct_tls_ports = {{}}\n"
                f"s2s_ports = {{}}\n"
                f"http_ports = {{}}\n"
                f"https_ports = {{}}\n"
                f'component_interfaces = {{ "127.0.0.1" }}\n'
                f"component_ports = {{ {self.component_port} }}\n"
                f"log = {{ debug = {lua_string(self.log)} }}\n"
                f'authentication = "internal_plain"\n'
                f"c2s_require_encryption = false\n"
                f"allow_unencrypted_plain_auth = true\n"
                f'modules_enabled = {{ "roster"; "saslauth"; "disco"; "ping" }}\n'
                f'modules_disabled = {{ "s2s"; "tls" }}\n'
                f"{virtual_hosts}\n{components}"
            )
        for host, users in hosts.items():
            accounts = os.path.join(self.dir, "data", _prosody_encode(host), "accounts")
            os.makedirs(accounts)
            for user, password in users.items():
                with open(os.path.join(accounts, f"{_prosody_encode(user)}.dat"), "w") as f:
                    f.write(f'return {{\n\t["password"] = {lua_string(password)};\n}};\n')
        self.process: subprocess.Popen | None = None
        testCase.addCleanup(self.cleanup)
        self.start()

    def start(self) -> None:
        """Start and wait until both the client and the component port answer."""
        self.process = subprocess.Popen(
            [self.binary, "--config", self.config, "-F"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + DEADLINE
        while not (_answers(self.c2s_port) and _answers(self.component_port)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prosody did not start: {self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM, as an admin's restart does: Prosody closes its streams and exits."""
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=DEADLINE)
        self.process = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-n:]
        except OSError as e:
            return f"(no log: {e})"

    def cleanup(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=5)
            self.process = None


def _prosody_encode(name: str) -> str:
    # util.datamanager's encode(): every byte but [A-Za-z0-9] as %xx, lowercase hex.
    return "".join(
        c if c.isascii() and c.isalnum() else "".join(f"%{b:02x}" for b in c.encode()) for c in name
    )
