"""
The twistd plugin: options as twistd parses them, the secret, the composed
services, and the real `twistd hmacfs` command in a subprocess.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    ILogObserver,
    Logger,
    LogLevel,
    eventAsText,
    formatEvent,
    globalLogPublisher,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile
from twisted.python.threadpool import ThreadPool
from twisted.python.usage import UsageError
from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SkipTest, TestCase

from hmacd import logs, tap
from hmacd.auth import sign_v
from hmacd.component import ComponentService
from hmacd.config import Config
from hmacd.housekeeping import ExpirySweep, GarbageCollector, PartialSweep, SystemMonitor
from hmacd.secret import ENV_VAR, SecretError, resolve_secret, secret_file
from hmacd.takedown import DenyListRefresh
from hmacd.web import HmacfsSite
from hmacd.workers import WorkerPool
from tests.support import memory_metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
# Every wait on a subprocess is a short poll bounded by this.
DEADLINE = 15.0


def customObserver() -> ILogObserver:
    """A log observer factory that a test names with twistd's --logger."""
    return textFileLogObserver(io.StringIO())


def _write(path: str, text: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _accepts_and_lets_go(port: int) -> bool:
    """
    Whether the port accepts; if so, returns once the server has closed its end of this
    probe too, so that a test starting right after sees no connection of the probe's left
    (MaxConnectionsPerClient counts them).
    """
    try:
        probe = socket.create_connection(("127.0.0.1", port), timeout=1)
    except OSError:
        return False
    with probe:
        probe.settimeout(DEADLINE)
        probe.shutdown(socket.SHUT_WR)
        try:
            while probe.recv(4096):
                pass
        except OSError:
            pass  # reset: gone on the server's side as well
    return True


def _http(port: int, method: str, url: str, body: bytes | None = None, headers=None):
    """One request on a fresh connection: (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, url, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _secret_config(tmp: str, **keys: str | int) -> str:
    """A TOML file of string and integer keys in tmp."""
    lines = "".join(f"{key} = {json.dumps(value)}\n" for key, value in keys.items())
    return _write(os.path.join(tmp, "cfg.toml"), lines)


class _MemoryReactorWithThreads(MemoryReactorClock):
    """A MemoryReactorClock that also hands out a (never started) thread pool."""

    def __init__(self) -> None:
        super().__init__()
        self._pool = ThreadPool()

    def getThreadPool(self) -> ThreadPool:
        return self._pool


class _IsolatedOptionsMixin:
    """Options tests see no HMACFS_SECRET from the outside and leave hmacd.logs as they found it."""

    def setUp(self) -> None:
        environ = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        self.patch(os, "environ", environ)
        self.patch(logs, "_for_twistd", None)
        # The observers hide their LogFile; close every one a test opens.
        opened: list[LogFile] = []

        class TrackedLogFile(LogFile):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                opened.append(self)

        self.patch(logs, "LogFile", TrackedLogFile)
        self.addCleanup(lambda: [f.close() for f in opened])
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)

    def parse(self, *args: str) -> ServerOptions:
        options = ServerOptions()
        options.parseOptions(list(args))
        return options


class OptionsTests(_IsolatedOptionsMixin, TestCase):
    """`twistd hmacfs` options, parsed the way twistd parses them."""

    def test_config_parsed_into_whole_config(self) -> None:
        """--config yields the whole Config, StoreDir made absolute, and the secret as bytes."""
        store = self.mktemp()  # relative on purpose
        path = _write(
            os.path.join(self.tmp, "cfg.toml"),
            'ListenPort = "127.0.0.1:8443"\n'
            f'StoreDir = "{store}"\n'
            'UploadSubDir = "/files/"\n'
            'UploadMaxSize = "10MB"\n'
            "ChunkSize = 65536\n"
            'LogLevel = "debug"\n'
            'Secret = "configured-secret"\n',
        )
        options = self.parse("-n", "hmacfs", "--config", path)
        self.assertFalse(os.path.exists(store), "postOptions only validates")
        self.assertEqual(
            options.subOptions.config,
            Config(
                listen_port="127.0.0.1:8443",
                store_dir=os.path.abspath(store),
                upload_subdir="files",
                upload_max_size=10 * 1024 * 1024,
                chunk_size=65536,
                log_level="debug",
                secret="configured-secret",
                source=path,
            ),
        )
        prepared = tap.prepare(options.subOptions)
        self.assertTrue(os.path.isdir(store))
        self.assertEqual(prepared.config, options.subOptions.config)
        self.assertEqual(prepared.secret, b"configured-secret")
        self.assertEqual(prepared.origin, "the config file")

    def test_generated_secret_is_bytes(self) -> None:
        """Without any secret configured, Options generates one under StoreDir, as bytes."""
        store = os.path.join(self.tmp, "store")
        path = _secret_config(self.tmp, StoreDir=store)
        prepared = tap.prepare(self.parse("-n", "hmacfs", "--config", path).subOptions)
        self.assertIsInstance(prepared.secret, bytes)
        with open(secret_file(store), "rb") as f:
            self.assertEqual(f.read().strip(), prepared.secret)
        self.assertIn(secret_file(store), prepared.origin)

    def test_secret_option(self) -> None:
        """--secret wins over HMACFS_SECRET and the config file."""
        os.environ[ENV_VAR] = "from-env"
        path = _secret_config(
            self.tmp, StoreDir=os.path.join(self.tmp, "store"), Secret="from-config"
        )
        options = self.parse("-n", "hmacfs", "--config", path, "--secret", "from-cli")
        prepared = tap.prepare(options.subOptions)
        self.assertEqual(prepared.secret, b"from-cli")
        self.assertEqual(prepared.origin, "--secret")

    def test_secret_environment(self) -> None:
        """HMACFS_SECRET, read when StoreDir is prepared, wins over the config file."""
        self.patch(os, "environ", {ENV_VAR: "from-env"})
        path = _secret_config(
            self.tmp, StoreDir=os.path.join(self.tmp, "store"), Secret="from-config"
        )
        prepared = tap.prepare(self.parse("-n", "hmacfs", "--config", path).subOptions)
        self.assertEqual(prepared.secret, b"from-env")
        self.assertEqual(prepared.origin, ENV_VAR)

    def test_empty_secret_option(self) -> None:
        """An empty --secret is a UsageError, not an empty HMAC key."""
        path = _secret_config(self.tmp, StoreDir=os.path.join(self.tmp, "store"))
        e = self.assertRaises(
            UsageError, self.parse, "-n", "hmacfs", "--config", path, "--secret", ""
        )
        self.assertIn("--secret", str(e))

    def test_empty_secret_environment(self) -> None:
        """An empty HMACFS_SECRET is a UsageError too, before anything is prepared."""
        self.patch(os, "environ", {ENV_VAR: ""})
        store = os.path.join(self.tmp, "store")
        path = _secret_config(self.tmp, StoreDir=store)
        e = self.assertRaises(UsageError, self.parse, "-n", "hmacfs", "--config", path)
        self.assertIn(ENV_VAR, str(e))
        self.assertFalse(os.path.exists(store))

    def test_logger_is_ours(self) -> None:
        """twistd's `logger` option ends up as the hmacd.logs.twistd_observer callable."""
        path = _secret_config(self.tmp, StoreDir=os.path.join(self.tmp, "store"))
        options = self.parse("-n", "hmacfs", "--config", path)
        self.assertIs(options["logger"], logs.twistd_observer)

    def _observe(self, level: str) -> str:
        """Parse a config with LogLevel=level and a LogFile, log debug+info, return the file."""
        logFile = os.path.join(self.tmp, "hmacfs.log")
        path = _secret_config(
            self.tmp, StoreDir=os.path.join(self.tmp, "store"), LogLevel=level, LogFile=logFile
        )
        options = self.parse("-n", "hmacfs", "--config", path)
        log = Logger(namespace="test", observer=options["logger"]())
        log.debug("a debug line {n}", n=1)
        log.info("an info line {n}", n=2)
        log.warn("a warning line {n}", n=3)
        return _read(logFile)

    def test_info_level_drops_debug(self) -> None:
        """With LogLevel = "info" the observer drops debug events and writes the rest to LogFile."""
        written = self._observe("info")
        self.assertNotIn("a debug line 1", written)
        self.assertIn("an info line 2", written)
        self.assertIn("a warning line 3", written)

    def test_debug_level_passes_debug(self) -> None:
        """With LogLevel = "debug" debug events reach LogFile."""
        written = self._observe("debug")
        self.assertIn("a debug line 1", written)
        self.assertIn("an info line 2", written)

    def test_warn_level_drops_info(self) -> None:
        """With LogLevel = "warn" info events (the access log's level) are dropped."""
        written = self._observe("warn")
        self.assertNotIn("an info line 2", written)
        self.assertIn("a warning line 3", written)

    def test_no_log_file_foreground_is_stdout(self) -> None:
        """Without LogFile, twistd -n logs to stdout, as twistd itself would."""
        path = _secret_config(self.tmp, StoreDir=os.path.join(self.tmp, "store"))
        options = self.parse("-n", "hmacfs", "--config", path)
        stdout = io.StringIO()
        self.patch(sys, "stdout", stdout)
        Logger(namespace="test", observer=options["logger"]()).info("to stdout {n}", n=4)
        self.assertIn("to stdout 4", stdout.getvalue())

    def test_no_log_file_uses_twistd_logfile(self) -> None:
        """Without LogFile, twistd's own --logfile is where the lines go."""
        twistdLog = os.path.join(self.tmp, "tw.log")
        path = _secret_config(self.tmp, StoreDir=os.path.join(self.tmp, "store"))
        options = self.parse("-n", "--logfile", twistdLog, "hmacfs", "--config", path)
        Logger(namespace="test", observer=options["logger"]()).info("to tw.log {n}", n=5)
        self.assertIn("to tw.log 5", _read(twistdLog))

    def test_explicit_logger_left_alone(self) -> None:
        """An explicit --logger given to twistd is not replaced by ours."""
        path = _secret_config(self.tmp, StoreDir=os.path.join(self.tmp, "store"))
        options = self.parse(
            "-n", "--logger", f"{__name__}.customObserver", "hmacfs", "--config", path
        )
        self.assertIs(options["logger"], customObserver)

    def test_syslog_left_alone(self) -> None:
        """twistd --syslog keeps twistd's own syslog observer."""
        if "syslog" not in ServerOptions().defaults:
            raise SkipTest("this twistd has no --syslog")
        path = _secret_config(self.tmp, StoreDir=os.path.join(self.tmp, "store"))
        options = self.parse("-n", "--syslog", "hmacfs", "--config", path)
        self.assertIsNone(options["logger"])


class OptionsErrorTests(_IsolatedOptionsMixin, TestCase):
    """Every config mistake is a UsageError that names the file and the key."""

    def assertUsageError(self, text: str, *expected: str) -> str:
        path = _write(os.path.join(self.tmp, "bad.toml"), text)
        e = self.assertRaises(UsageError, self.parse, "-n", "hmacfs", "--config", path)
        message = str(e)
        self.assertIn(path, message)
        for part in expected:
            self.assertIn(part, message)
        return message

    def test_unknown_key(self) -> None:
        """An unknown key is a UsageError naming the file and the key."""
        self.assertUsageError('ListenPort = "127.0.0.1:8443"\nBogusKey = 1\n', "BogusKey")

    def test_bad_type(self) -> None:
        """A value of the wrong type is a UsageError naming the file and the key."""
        self.assertUsageError("UploadMaxSize = true\n", "UploadMaxSize")

    def test_toml_syntax_error(self) -> None:
        """A TOML syntax error is a UsageError naming the file and the line."""
        self.assertUsageError('ListenPort = "127.0.0.1:8443\nStoreDir = "x"\n', "line 1")

    def test_missing_config_file(self) -> None:
        """A --config that does not exist is a UsageError naming it."""
        path = os.path.join(self.tmp, "nowhere.toml")
        e = self.assertRaises(UsageError, self.parse, "-n", "hmacfs", "--config", path)
        self.assertIn(path, str(e))

    def test_store_dir_cannot_be_created(self) -> None:
        """A StoreDir under a regular file stops makeService with one line naming StoreDir."""
        blocker = _write(os.path.join(self.tmp, "a-file"), "not a directory\n")
        path = _write(
            os.path.join(self.tmp, "bad.toml"), f'StoreDir = "{os.path.join(blocker, "store")}"\n'
        )
        options = self.parse("-n", "hmacfs", "--config", path).subOptions
        e = self.assertRaises(SystemExit, tap.makeService, options)
        message = str(e)
        for part in (path, "StoreDir", "cannot create"):
            self.assertIn(part, message)
        self.assertNotIn("\n", message)

    def test_unusable_listen_endpoint(self) -> None:
        """An endpoint string twisted cannot build is a UsageError naming ListenPort."""
        store = os.path.join(self.tmp, "store")
        self.assertUsageError(
            f'ListenPort = "ssl:8443:privateKey=/nonexistent.pem"\nStoreDir = "{store}"\n',
            "ListenPort",
        )

    def test_error_does_not_install_logger(self) -> None:
        """A rejected config leaves twistd's `logger` option unset."""
        path = _write(os.path.join(self.tmp, "bad.toml"), "BogusKey = 1\n")
        options = ServerOptions()
        self.assertRaises(UsageError, options.parseOptions, ["-n", "hmacfs", "--config", path])
        self.assertIsNone(options["logger"])


class EmbeddedDefaultsTests(_IsolatedOptionsMixin, TestCase):
    """
    `twistd -n hmacfs` without --config, as data: what README's Quick start promises, without
    binding its well-known port (anything may hold 8080 on a developer's machine).
    """

    def setUp(self) -> None:
        super().setUp()
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(self.tmp)

    def test_quick_start_promises_the_defaults(self) -> None:
        """README's Quick start names the listener, the store and the secret file Config() has."""
        with open(os.path.join(REPO, "README.rst"), encoding="utf-8") as f:
            readme = " ".join(f.read().split())
        defaults = Config()
        for promise in (
            f"embedded defaults ({defaults.listen_port}, files under ``{defaults.store_dir}``,"
            " a generated secret)",
            "mode 0600, in ``uploads/.hmacfs/secret``",
        ):
            self.assertTrue(promise in readme, f"README does not say {promise!r}")
        self.assertEqual(defaults.listen_endpoint, "tcp:8080:interface=127.0.0.1")
        self.assertEqual(os.path.normpath(defaults.store_dir), "uploads")

    def test_without_config(self) -> None:
        """No --config: Config() with StoreDir made absolute, a generated 0600 secret kept."""
        options = self.parse("-n", "hmacfs").subOptions
        store = os.path.join(self.tmp, "uploads")
        self.assertEqual(options.config, Config(store_dir=store))
        prepared = tap.prepare(options)
        path = secret_file(store)
        self.assertEqual(path, os.path.join(store, ".hmacfs", "secret"))
        self.assertEqual(_mode(path), 0o600)
        self.assertEqual(prepared.origin, f"{path} (generated)")
        with open(path, "rb") as f:
            self.assertEqual(f.read().strip(), prepared.secret)

        again = tap.prepare(self.parse("-n", "hmacfs").subOptions)
        self.assertEqual((again.config, again.secret), (prepared.config, prepared.secret))
        self.assertNotIn("generated", again.origin)

    def test_default_services(self) -> None:
        """The default services listen on 127.0.0.1:8080 only (in memory here), nothing else."""
        prepared = tap.prepare(self.parse("-n", "hmacfs").subOptions)
        reactor = _MemoryReactorWithThreads()
        top = tap.build_service(
            prepared.config,
            prepared.secret,
            reactor,
            prepared.origin,
            metadata=memory_metadata(reactor),
        )
        self.assertRaises(KeyError, top.getServiceNamed, "component")
        top.startService()
        self.addCleanup(top.stopService)
        self.assertEqual(len(reactor.tcpServers), 1)
        port, factory, _, interface = reactor.tcpServers[0]
        self.assertEqual((port, interface), (8080, "127.0.0.1"))
        self.assertIs(factory, top.getServiceNamed("http").factory)
        self.assertEqual(factory.fileServer.store_dir, os.path.join(self.tmp, "uploads"))
        self.assertEqual(factory.fileServer.prefix, "upload")


class ResolveSecretTests(TestCase):
    """Where the shared secret comes from, in order, and how the generated one is kept."""

    def setUp(self) -> None:
        self.store = os.path.abspath(self.mktemp())
        os.makedirs(self.store)
        self.path = secret_file(self.store)

    def test_generated_once_and_kept(self) -> None:
        """With nothing configured a secret is generated once, 0600 in a 0700 dir, then reused."""
        secret, origin = resolve_secret(self.store, None, environ={})
        self.assertEqual(_mode(self.path), 0o600)
        self.assertEqual(_mode(os.path.dirname(self.path)), 0o700)
        self.assertIn(self.path, origin)
        self.assertNotIn(secret.decode("ascii"), origin)
        again, originAgain = resolve_secret(self.store, None, environ={})
        self.assertEqual(again, secret)
        self.assertIn(self.path, originAgain)
        self.assertNotIn(secret.decode("ascii"), originAgain)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read().strip(), secret)

    def test_generated_secret_entropy(self) -> None:
        """A generated secret carries at least 32 random bytes (43 url-safe base64 chars)."""
        secret, _ = resolve_secret(self.store, None, environ={})
        self.assertGreaterEqual(len(secret), 43)
        other = os.path.abspath(self.mktemp())
        second, _ = resolve_secret(other, None, environ={})
        self.assertNotEqual(secret, second)

    def test_precedence(self) -> None:
        """--secret beats HMACFS_SECRET beats the config beats the file."""
        _write_secret_file(self.path, b"from-file\n")
        env = {ENV_VAR: "from-env"}
        self.assertEqual(
            resolve_secret(self.store, "from-config", "from-cli", env), (b"from-cli", "--secret")
        )
        self.assertEqual(
            resolve_secret(self.store, "from-config", None, env), (b"from-env", ENV_VAR)
        )
        self.assertEqual(
            resolve_secret(self.store, "from-config", None, {}),
            (b"from-config", "the config file"),
        )
        self.assertEqual(resolve_secret(self.store, None, None, {}), (b"from-file", self.path))

    def test_configured_secret_creates_no_file(self) -> None:
        """A configured secret is used as is: no file is generated next to it."""
        resolve_secret(self.store, "from-config", environ={})
        self.assertFalse(os.path.exists(self.path))

    def test_utf8_secret(self) -> None:
        """A non-ASCII secret is keyed with its UTF-8 bytes, as Prosody does."""
        secret, _ = resolve_secret(self.store, None, "s\u00e9cret", {})
        self.assertEqual(secret, "s\u00e9cret".encode())

    def test_empty_cli(self) -> None:
        """An empty --secret is a SecretError, not a fall-through to the next source."""
        e = self.assertRaises(SecretError, resolve_secret, self.store, "cfg", "", {})
        self.assertIn("--secret", str(e))

    def test_empty_environment(self) -> None:
        """An empty HMACFS_SECRET is a SecretError, not a fall-through to the next source."""
        e = self.assertRaises(SecretError, resolve_secret, self.store, "cfg", None, {ENV_VAR: ""})
        self.assertIn(ENV_VAR, str(e))

    def test_empty_file(self) -> None:
        """An empty secret file is a SecretError naming it, and is not silently regenerated."""
        _write_secret_file(self.path, b"\n")
        e = self.assertRaises(SecretError, resolve_secret, self.store, None, None, {})
        self.assertIn(self.path, str(e))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"\n")

    def test_unwritable_store(self) -> None:
        """A secret that can be neither read nor created is a SecretError naming the path."""
        blocker = os.path.join(self.store, "a-file")
        _write(blocker, "x")
        e = self.assertRaises(SecretError, resolve_secret, blocker, None, None, {})
        self.assertIn(secret_file(blocker), str(e))

    def test_reads_os_environ_by_default(self) -> None:
        """Without an explicit environ, HMACFS_SECRET comes from os.environ at call time."""
        self.patch(os, "environ", {ENV_VAR: "patched"})
        self.assertEqual(resolve_secret(self.store, None), (b"patched", ENV_VAR))


def _write_secret_file(path: str, content: bytes) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)


class BuildServiceTests(TestCase):
    """The composed services, checked as data on a MemoryReactor."""

    secret = b"composition-test-secret-0123456789"

    def setUp(self) -> None:
        self.store = os.path.abspath(self.mktemp())
        os.makedirs(self.store)
        self.config = Config(
            listen_port="127.0.0.1:8443",
            store_dir=self.store,
            upload_subdir="files",
            upload_max_size=12345,
            chunk_size=4096,
        )
        self.reactor = _MemoryReactorWithThreads()

    def build(self, secret: bytes | None = None) -> MultiService:
        self.metadata = memory_metadata(self.reactor)
        top = tap.build_service(
            self.config,
            secret or self.secret,
            self.reactor,
            "/etc/hmacfs/secret-origin",
            metadata=self.metadata,
        )
        self.assertIsInstance(top, MultiService)
        return top

    def start(self, top: MultiService) -> list[dict]:
        """Start top and return the log events it emitted on the way."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        top.startService()
        self.addCleanup(top.stopService)
        return events

    def test_children(self) -> None:
        """Announce, the metadata stores, the "http" endpoint service, then the two sweeps."""
        top = self.build()
        children = list(top)
        self.assertEqual(len(children), 8)
        announce, stores, listener, partials, expiry, collector, monitor, denials = children
        self.assertIsInstance(denials, DenyListRefresh)
        self.assertIs(denials.denylist, listener.factory.fileServer.denials)
        self.assertIsInstance(collector, GarbageCollector)
        self.assertIsInstance(monitor, SystemMonitor)
        self.assertEqual((collector.step, monitor.step), (30, 10))
        self.assertIsInstance(stores, tap.StoreService)
        self.assertIs(stores.store, self.metadata)
        self.assertIs(listener.factory.fileServer.metadata, self.metadata)
        self.assertIsInstance(partials, PartialSweep)
        self.assertIsInstance(expiry, ExpirySweep)
        self.assertIs(partials.fs, listener.factory.fileServer)
        self.assertIs(expiry.fs, listener.factory.fileServer)
        self.assertIsInstance(announce, Service)
        self.assertNotIsInstance(announce, StreamServerEndpointService)
        self.assertIs(top.getServiceNamed("http"), listener)
        self.assertIsInstance(listener, StreamServerEndpointService)
        site = listener.factory
        self.assertIsInstance(site, HmacfsSite)
        fs = site.fileServer
        self.assertEqual(
            (fs.prefix, fs.store_dir, fs.upload_max_size, fs.chunk_size, fs.secret),
            ("files", self.store, 12345, 4096, self.secret),
        )
        self.assertIs(fs.reactor, self.reactor)

    def test_component(self) -> None:
        """With ComponentJID set there is a "component" service signing for this server."""
        self.assertRaises(KeyError, self.build().getServiceNamed, "component")
        self.config = dataclasses.replace(
            self.config,
            component_jid="upload.example.org",
            component_secret="component-secret",
            component_server="xmpp.example.org:5347",
            component_protocol="jwt",
            public_url="https://files.example.org/files/",
        )
        top = self.build()
        component = top.getServiceNamed("component")
        self.assertIsInstance(component, ComponentService)
        self.assertEqual(
            (component.jid, component.address), ("upload.example.org", ("xmpp.example.org", 5347))
        )
        issuer = component.slots.issuer
        self.assertEqual(
            (issuer.secret, issuer.public_url, issuer.protocol, issuer.max_size, issuer.domains),
            (self.secret, "https://files.example.org/files/", "jwt", 12345, {"example.org"}),
        )
        fs = top.fileServer
        component.slots.counted("issued")
        component._onConnected(True)
        scrape = fs.metrics.render().decode()
        self.assertIn('hmac_file_server_slots_total{result="issued"} 1.0', scrape)
        self.assertIn("hmac_file_server_component_connected 1.0", scrape)

    def test_listens_on_configured_endpoint(self) -> None:
        """Starting the service listens on the configured port and interface."""
        top = self.build()
        self.start(top)
        self.assertEqual(len(self.reactor.tcpServers), 1)
        port, factory, backlog, interface = self.reactor.tcpServers[0]
        self.assertEqual((port, interface, backlog), (8443, "127.0.0.1", tap.LISTEN_BACKLOG))
        self.assertIs(factory, top.getServiceNamed("http").factory)

    def test_port_that_cannot_be_bound_is_fatal(self) -> None:
        """A ListenPort in use raises from privilegedStartService (strports), so twistd stops."""
        from twisted.internet import reactor
        from twisted.internet.error import CannotListenError

        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            self.config = dataclasses.replace(
                self.config, listen_port=f"127.0.0.1:{busy.getsockname()[1]}"
            )
            self.reactor = reactor
            listener = self.build().getServiceNamed("http")
            self.assertRaises(CannotListenError, listener.privilegedStartService)

    def test_workers_switch_nothing_for_the_process(self) -> None:
        """With Workers, building leaves prometheus_client and the environment as they were."""
        from prometheus_client import values

        self.config = dataclasses.replace(self.config, workers=2)
        self.assertRaises(ValueError, self.build)
        valueClass = values.ValueClass
        environ = dict(os.environ)
        self.metadata = memory_metadata(self.reactor)
        top = tap.build_service(
            self.config,
            self.secret,
            self.reactor,
            metadata=self.metadata,
            metricsDir=os.path.join(self.store, "metrics"),
        )
        self.assertIsInstance(top.getServiceNamed("http"), WorkerPool)
        self.assertEqual(top.fileServer.metrics.shared, os.path.join(self.store, "metrics"))
        self.assertIs(values.ValueClass, valueClass)
        self.assertEqual(dict(os.environ), environ)

    def test_backlog(self) -> None:
        """A backlog for many clients at once, unless the endpoint string names its own."""
        self.assertEqual(tap.with_backlog("tcp:80"), "tcp:80:backlog=1024")
        self.assertEqual(tap.with_backlog("unix:/run/s"), "unix:/run/s:backlog=1024")
        for given in (
            "tcp:80:backlog=5",
            "ssl:443:privateKey=k.pem",
            "systemd:domain=INET:index=0",
        ):
            self.assertEqual(tap.with_backlog(given), given)

    def test_nothing_listens_before_start(self) -> None:
        """Building the services opens no listener; only starting them does."""
        self.build()
        self.assertEqual(self.reactor.tcpServers, [])

    def test_announce_names_origin_not_secret(self) -> None:
        """The start-up line says where the secret came from and never what it is."""
        events = self.start(self.build())
        texts = [formatEvent(e) for e in events if e.get("log_namespace") == "hmacd.tap"]
        self.assertTrue(any("/etc/hmacfs/secret-origin" in t for t in texts), texts)
        self.assertTrue(any("tcp:8443:interface=127.0.0.1" in t for t in texts), texts)
        for event in events:
            self.assertNotIn(self.secret.decode(), repr(event))
            self.assertNotIn(self.secret.decode(), eventAsText(event))

    def warnings(self, secret: bytes) -> list[dict]:
        events = self.start(self.build(secret))
        return [
            e
            for e in events
            if e.get("log_namespace") == "hmacd.tap" and e["log_level"] == LogLevel.warn
        ]

    def test_short_secret_warns(self) -> None:
        """A secret shorter than 16 bytes gets one warning at start, which does not quote it."""
        warnings = self.warnings(b"tiny-secret")
        self.assertEqual(len(warnings), 1)
        self.assertNotIn("tiny-secret", formatEvent(warnings[0]))

    def test_long_secret_does_not_warn(self) -> None:
        """A secret of 16 bytes or more starts without a warning."""
        self.assertEqual(self.warnings(b"0123456789abcdef"), [])

    def test_no_extended_attributes_warns(self) -> None:
        """A StoreDir whose file system keeps no user xattrs gets one warning at start."""
        from hmacd import facts

        self.patch(facts, "probe", lambda directory: directory != self.store)
        warnings = self.warnings(b"0123456789abcdef")
        self.assertEqual(len(warnings), 1)
        self.assertIn("no user extended attributes", formatEvent(warnings[0]))


class TwistdHarness(TestCase):
    """Runs the real `twistd hmacfs` command, as users run it, in a subprocess."""

    def setUp(self) -> None:
        if not os.path.exists(TWISTD):
            raise SkipTest(f"no twistd script next to {sys.executable}")
        self.cwd = os.path.abspath(self.mktemp())
        os.makedirs(self.cwd)
        self.env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        self.env["PYTHONPATH"] = REPO

    def spawn(self, *args: str, output: str = "twistd.out") -> subprocess.Popen:
        """Start twistd with args in self.cwd, output to a file; always killed at cleanup."""
        self.output = os.path.join(self.cwd, output)
        with open(self.output, "wb") as out:
            proc = subprocess.Popen(
                [TWISTD, *args],
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.addCleanup(self._kill, proc)
        return proc

    @staticmethod
    def _kill(proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=DEADLINE)

    def waitListening(self, port: int, proc: subprocess.Popen | None = None) -> None:
        deadline = time.monotonic() + DEADLINE
        while not _accepts_and_lets_go(port):
            if proc is not None and proc.poll() is not None:
                self.fail(f"twistd exited with {proc.returncode}:\n{_read(self.output)}")
            if time.monotonic() > deadline:
                self.fail(f"nothing listens on {port} after {DEADLINE}s:\n{_read(self.output)}")
            time.sleep(0.05)

    def waitClosed(self, port: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while _accepts(port):
            if time.monotonic() > deadline:
                self.fail(f"port {port} still open after {DEADLINE}s")
            time.sleep(0.05)

    def terminate(self, proc: subprocess.Popen) -> None:
        """SIGTERM, and wait for a clean exit."""
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=DEADLINE)
        # twistd re-raises the signal that stopped it.
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), _read(self.output))

    def switchingToNobody(self) -> pwd.struct_passwd:
        """For a test of --uid: skipped unless root; self.cwd one that nobody can reach."""
        if os.geteuid() != 0:
            raise SkipTest("switching uid needs root")
        # A directory the unprivileged user can reach, whatever holds the checkout.
        self.cwd = tempfile.mkdtemp(prefix="hmacfs-uid-")
        os.chmod(self.cwd, 0o755)
        self.addCleanup(shutil.rmtree, self.cwd, True)
        return pwd.getpwnam("nobody")

    def config(self, port: int, **extra: str | int) -> str:
        keys = {"ListenPort": f"127.0.0.1:{port}", "StoreDir": "store", **extra}
        return _secret_config(self.cwd, **keys)

    def secret(self, store: str = "store") -> bytes:
        with open(os.path.join(self.cwd, store, ".hmacfs", "secret"), "rb") as f:
            return f.read().strip()

    def putAndGet(self, port: int, secret: bytes, name: str = "hello.txt") -> str:
        """One v-signed PUT (201) and its GET back byte-identical; the MAC is returned."""
        body = b"hello from the twistd test\n\x00\xff"
        path = f"tapdir/{name}"
        mac = sign_v(secret, path, len(body))
        status, _ = _http(
            port, "PUT", f"/upload/{path}?v={mac}", body, {"Content-Type": "text/plain"}
        )
        self.assertEqual(status, 201)
        self.assertEqual(_http(port, "GET", f"/upload/{path}"), (200, body))
        return mac


class TwistdTests(TwistdHarness):
    """The real `twistd hmacfs` command, as users run it, in a subprocess."""

    def test_foreground_serves_and_logs_censored(self) -> None:
        """twistd -n hmacfs serves a signed PUT and GET, and its LogFile shows no secret or MAC."""
        port = _free_port()
        cfg = self.config(port, LogLevel="info", LogFile="hmacfs.log")
        proc = self.spawn("-n", "hmacfs", "--config", cfg)
        self.waitListening(port, proc)
        self.assertEqual(_http(port, "GET", "/upload/nothing")[0], 404)
        secret = self.secret()
        mac = self.putAndGet(port, secret)
        self.terminate(proc)

        logged = _read(os.path.join(self.cwd, "hmacfs.log"))
        self.assertIn(os.path.join(self.cwd, "store", ".hmacfs", "secret"), logged)
        self.assertIn("PUT /upload/tapdir/hello.txt?v=<redacted>", logged)
        self.assertNotIn(secret.decode("ascii"), logged)
        self.assertNotIn(mac, logged)
        self.assertNotIn(secret.decode("ascii"), _read(self.output))

    def test_warn_level_has_no_access_log(self) -> None:
        """With LogLevel = "warn" the access log lines (info) are not written."""
        port = _free_port()
        cfg = self.config(port, LogLevel="warn", LogFile="hmacfs.log")
        proc = self.spawn("-n", "hmacfs", "--config", cfg)
        self.waitListening(port, proc)
        self.putAndGet(port, self.secret())
        self.terminate(proc)
        logged = _read(os.path.join(self.cwd, "hmacfs.log"))
        self.assertNotIn("PUT /upload", logged)
        self.assertNotIn("GET /upload", logged)

    def test_embedded_defaults_on_a_spare_port(self) -> None:
        """Only ListenPort set, to a free port: ./uploads, a 0600 secret kept across restarts."""
        # The defaults themselves, port 8080 included, are checked as data in
        # EmbeddedDefaultsTests: anything may hold 8080 on a developer's machine.
        port = _free_port()
        cfg = os.path.basename(_secret_config(self.cwd, ListenPort=f"127.0.0.1:{port}"))
        proc = self.spawn("-n", "hmacfs", "--config", cfg, output="first.out")
        self.waitListening(port, proc)
        self.assertEqual(_http(port, "GET", "/upload/nothing")[0], 404)
        self.terminate(proc)
        path = os.path.join(self.cwd, "uploads", ".hmacfs", "secret")
        self.assertEqual(_mode(path), 0o600)
        secret = self.secret("uploads")
        self.assertIn(f"{path} (generated)", _read(self.output))
        self.waitClosed(port)

        proc = self.spawn("-n", "hmacfs", "--config", cfg, output="second.out")
        self.waitListening(port, proc)
        self.putAndGet(port, secret)
        self.terminate(proc)
        self.assertEqual(self.secret("uploads"), secret)
        second = _read(self.output)
        self.assertIn(path, second)
        self.assertNotIn(f"{path} (generated)", second)
        self.assertTrue(os.path.isfile(os.path.join(self.cwd, "uploads", "tapdir", "hello.txt")))

    def test_daemon(self) -> None:
        """Daemonized twistd writes its pid file, serves, logs to --logfile, stops on SIGTERM."""
        port = _free_port()
        cfg = self.config(port)
        pidfile = os.path.join(self.cwd, "tw.pid")
        twlog = os.path.join(self.cwd, "tw.log")
        proc = self.spawn("--pidfile", "tw.pid", "--logfile", "tw.log", "hmacfs", "--config", cfg)
        self.addCleanup(_kill_daemon, pidfile)
        self.assertEqual(proc.wait(timeout=DEADLINE), 0, _read(self.output))

        deadline = time.monotonic() + DEADLINE
        while not os.path.exists(pidfile):
            if time.monotonic() > deadline:
                self.fail(f"no pid file after {DEADLINE}s")
            time.sleep(0.05)
        with open(pidfile) as f:
            pid = int(f.read())
        self.assertNotEqual(pid, proc.pid)
        self.waitListening(port)
        self.putAndGet(port, self.secret())

        os.kill(pid, signal.SIGTERM)
        self.waitClosed(port)
        deadline = time.monotonic() + DEADLINE
        while os.path.exists(pidfile):
            if time.monotonic() > deadline:
                self.fail(f"pid file still there {DEADLINE}s after SIGTERM")
            time.sleep(0.05)
        logged = _read(twlog)
        self.assertIn(os.path.join(self.cwd, "store", ".hmacfs", "secret"), logged)
        self.assertIn("PUT /upload/tapdir/hello.txt?v=<redacted>", logged)
        self.assertNotIn(self.secret().decode("ascii"), logged)

    def test_config_error_exits_before_listening(self) -> None:
        """An unknown key makes twistd exit non-zero naming file and key; nothing listens."""
        port = _free_port()
        bad = _write(
            os.path.join(self.cwd, "bad.toml"),
            f'ListenPort = "127.0.0.1:{port}"\nStoreDir = "store"\nBogusKey = 1\n',
        )
        proc = self.spawn("-n", "hmacfs", "--config", os.path.basename(bad))
        self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
        output = _read(self.output)
        self.assertIn("bad.toml", output)
        self.assertIn("BogusKey", output)
        self.assertFalse(_accepts(port))
        self.assertFalse(os.path.exists(os.path.join(self.cwd, "store")))

    def test_unreachable_store_is_degraded_not_fatal(self) -> None:
        """Redis unreachable at start: logged, uploads 503, no traceback, no hang at stop."""
        port = _free_port()
        cfg = self.config(port, RedisAddr=f"127.0.0.1:{_free_port()}", LogFile="hmacfs.log")
        proc = self.spawn("-n", "hmacfs", "--config", cfg)
        self.waitListening(port, proc)
        body = b"abc"
        mac = sign_v(self.secret(), "x.txt", len(body))
        deadline = time.monotonic() + DEADLINE
        while True:
            status, _ = _http(port, "PUT", f"/upload/x.txt?v={mac}", body)
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.assertEqual(status, 503)
        self.assertEqual(_http(port, "GET", "/upload/x.txt")[0], 404)
        self.terminate(proc)
        logged = _read(os.path.join(self.cwd, "hmacfs.log"))
        self.assertIn("primary metadata store redis unavailable at start", logged)
        self.assertNotIn("Traceback", logged)
        self.assertNotIn("Traceback", _read(self.output))

    def test_store_dir_error_exits_before_listening(self) -> None:
        """A StoreDir that cannot be made stops twistd: non-zero, one line naming it, no port."""
        port = _free_port()
        blocker = _write(os.path.join(self.cwd, "a-file"), "not a directory\n")
        proc = self.spawn("-n", "hmacfs", "--config", self.config(port, StoreDir="a-file/store"))
        self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
        output = _read(self.output)
        self.assertIn(f"StoreDir: cannot create {blocker}/store: Not a directory", output)
        self.assertNotIn("Traceback", output)
        self.assertFalse(_accepts(port))

    def test_port_in_use_exits_nonzero(self) -> None:
        """A ListenPort that cannot be bound stops twistd with a non-zero exit."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen(1)
            port = blocker.getsockname()[1]
            proc = self.spawn("-n", "hmacfs", "--config", self.config(port))
            self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
        self.assertIn(f"Couldn't listen on 127.0.0.1:{port}", _read(self.output))

    def test_unusable_log_file(self) -> None:
        """A LogFile that cannot be opened is a one-line error naming LogFile, before listening."""
        port = _free_port()
        cfg = self.config(port, LogFile="/nonexistent/dir/hmacfs.log")
        proc = self.spawn("-n", "hmacfs", "--config", cfg)
        self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
        output = _read(self.output)
        self.assertIn("LogFile: cannot open /nonexistent/dir/hmacfs.log", output)
        self.assertNotIn("Traceback", output)
        self.assertFalse(_accepts(port))

    def test_daemon_cannot_log_to_stdout(self) -> None:
        """--logfile - without -n is refused, as plain twistd refuses it."""
        proc = self.spawn("--logfile", "-", "hmacfs", "--config", self.config(_free_port()))
        self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
        self.assertIn("cannot log to stdout", _read(self.output))

    def test_sigusr1_rotates_log_file(self) -> None:
        """SIGUSR1 rotates LogFile, as twistd does for its own log, and the server lives on."""
        port = _free_port()
        proc = self.spawn("-n", "hmacfs", "--config", self.config(port, LogFile="hmacfs.log"))
        self.waitListening(port, proc)
        proc.send_signal(signal.SIGUSR1)
        rotated = os.path.join(self.cwd, "hmacfs.log.1")
        deadline = time.monotonic() + DEADLINE
        while not os.path.exists(rotated):
            if time.monotonic() > deadline:
                self.fail(f"no {rotated} after SIGUSR1")
            time.sleep(0.05)
        self.putAndGet(port, self.secret())
        self.terminate(proc)
        self.assertIn("PUT /upload/tapdir", _read(os.path.join(self.cwd, "hmacfs.log")))

    def test_sighup_reopens_log_file(self) -> None:
        """After logrotate moves LogFile away, SIGHUP makes hmacfs write a new one."""
        port = _free_port()
        proc = self.spawn("-n", "hmacfs", "--config", self.config(port, LogFile="hmacfs.log"))
        self.waitListening(port, proc)
        log = os.path.join(self.cwd, "hmacfs.log")
        os.rename(log, log + ".old")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + DEADLINE
        while not os.path.exists(log):
            if time.monotonic() > deadline:
                self.fail("no new LogFile after SIGHUP")
            time.sleep(0.05)
        self.putAndGet(port, self.secret())
        self.terminate(proc)
        self.assertIn("PUT /upload/tapdir", _read(log))
        self.assertNotIn("PUT /upload/tapdir", _read(log + ".old"))

    def test_uid_switch(self) -> None:
        """With --uid/--gid, what start-up creates belongs to that user, and uploads work."""
        nobody = self.switchingToNobody()
        port = _free_port()
        cfg = self.config(port, LogFile="hmacfs.log")
        pidfile = os.path.join(self.cwd, "tw.pid")
        proc = self.spawn(
            "--pidfile",
            "tw.pid",
            "--uid",
            str(nobody.pw_uid),
            "--gid",
            str(nobody.pw_gid),
            "hmacfs",
            "--config",
            cfg,
        )
        self.addCleanup(_kill_daemon, pidfile)
        self.assertEqual(proc.wait(timeout=DEADLINE), 0, _read(self.output))
        self.waitListening(port)
        store = os.path.join(self.cwd, "store")
        for path in (
            store,
            os.path.join(store, ".hmacfs"),
            os.path.join(store, ".hmacfs", "secret"),
            os.path.join(store, ".hmacfs", "claims"),
        ):
            self.assertEqual(os.stat(path).st_uid, nobody.pw_uid, path)
        self.putAndGet(port, self.secret())
        self.assertEqual(os.stat(os.path.join(store, "tapdir", "hello.txt")).st_uid, nobody.pw_uid)

    def test_uid_without_write_access_refused(self) -> None:
        """A StoreDir the --uid user cannot write is refused before start-up."""
        if os.geteuid() != 0:
            raise SkipTest("switching uid needs root")
        os.makedirs(os.path.join(self.cwd, "store"))
        os.chmod(os.path.join(self.cwd, "store"), 0o755)
        proc = self.spawn(
            "-n",
            "--uid",
            "nobody",
            "hmacfs",
            "--config",
            self.config(_free_port()),
        )
        self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
        self.assertIn("is not writable by uid", _read(self.output))

    def test_uid_with_state_left_by_root_refused(self) -> None:
        """A claims file an earlier root run left is named at start-up, not a 500 per upload."""
        if os.geteuid() != 0:
            raise SkipTest("switching uid needs root")
        state = os.path.join(self.cwd, "store", ".hmacfs")
        os.makedirs(state)
        os.chmod(os.path.join(self.cwd, "store"), 0o777)
        os.chmod(state, 0o777)
        with open(os.path.join(state, "claims"), "w"):
            pass
        os.chmod(os.path.join(state, "claims"), 0o600)
        proc = self.spawn("-n", "--uid", "nobody", "hmacfs", "--config", self.config(_free_port()))
        self.assertNotEqual(proc.wait(timeout=DEADLINE), 0)
        self.assertIn("claims is not writable by uid", _read(self.output))


def _kill_daemon(pidfile: str) -> None:
    """Cleanup: a daemon whose pid file is still there did not stop; kill it."""
    try:
        with open(pidfile) as f:
            pid = int(f.read())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class InstalledPackageTests(TestCase):
    """What `pip install .` puts on disk is a working hmacfs, without the checkout."""

    timeout = 180

    def test_installed_twistd_plugin_serves(self):
        """Installed into a scratch target, twistd -n hmacfs starts and takes an upload."""
        target = os.path.abspath(self.mktemp())
        # The tracked files only: a build/ left in the checkout by an earlier
        # install would hide a package missing from setup.py.
        source = os.path.abspath(self.mktemp())
        tracked = (
            subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True)
            .stdout.decode()
            .split("\0")
        )
        for name in filter(None, tracked):
            os.makedirs(os.path.join(source, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(REPO, name), os.path.join(source, name))
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
             "--target", target, source],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=150,
        )  # fmt: skip
        cwd = os.path.abspath(self.mktemp())
        os.makedirs(cwd)
        port = _free_port()
        cfg = _secret_config(cwd, ListenPort=f"127.0.0.1:{port}", StoreDir="store")
        env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
        env["PYTHONPATH"] = target  # the installed copy, not the checkout
        out = os.path.join(cwd, "out.log")
        with open(out, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
                 "-n", "hmacfs", "--config", cfg],
                cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait()))
        deadline = time.monotonic() + DEADLINE
        while not _accepts(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.fail(f"installed hmacfs did not start:\n{_read(out)}")
            time.sleep(0.05)
        with open(os.path.join(cwd, "store", ".hmacfs", "secret"), "rb") as f:
            secret = f.read().strip()
        mac = sign_v(secret, "i/x.txt", 2)
        self.assertEqual(_http(port, "PUT", f"/upload/i/x.txt?v={mac}", b"ok")[0], 201)
        self.assertEqual(_http(port, "GET", "/upload/i/x.txt"), (200, b"ok"))
        import hmacd

        self.assertFalse(_read(out).count("Traceback"))
        self.assertTrue(os.path.isdir(os.path.join(target, "hmacd", "store")), hmacd.__file__)
