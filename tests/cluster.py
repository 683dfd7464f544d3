"""
Several hmacfs nodes as real processes, for the cluster suite (issue 16).

A L{Cluster} is N C{twistd -n hmacfs --config F} processes, each with its own
C{StoreDir}, C{ListenPort}, C{MetricsPort} and C{NodeName}, sharing one Redis
(a redis-server of the cluster's own, database L{REDIS_DB}), one PostgreSQL
fallback (a database of the cluster's own on the running server, created and
dropped here: the table name is not a config key) and one object store
(C{StorageBackend = "s3"}, under a key prefix of the cluster's own), or else
one local C{StoreDir} for every node, as on a shared file system.  A node can
be killed (SIGKILL), stopped and started again; its log stays in the test's
temp directory and is quoted in failure messages.

The client side is blocking (C{http.client}, threads for concurrency): the
nodes are other processes, so the test's own reactor has nothing to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from hmacd.auth import slot_put
from tests.servers import RedisServer, free_port
from tests.store_contract import require_service

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

# A redis-server of each cluster's own, not the running one: two runs of the suite at
# once (trial -j2, or two checkouts) would share one database, each flushing the
# other's claims and records before it starts.  A database other than 0, as many
# deployments use (txredisapi SELECTs it on every reconnect).
REDIS_DB = 12
POSTGRES: dict[str, Any] = dict(
    host="127.0.0.1", port=5432, user="postgres", password="", dbname="test"
)

SECRET = "cluster-suite-secret-0123456789"
SUBDIR = "upload"

# How long a node may take to answer after it was started (imports, stores, the
# object store's start-up check), several times what it takes on a quiet machine.
READY_DEADLINE = 60.0
# Every request of the suite gives up after this long without a byte.
SOCKET_TIMEOUT = 60.0

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """
    In the child before exec: SIGKILL when the thread that started it dies
    (a killed trial worker runs no cleanup), so no node outlives the suite.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class Answer:
    """One HTTP response, read whole: status, headers (names lowercased), body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class Node:
    """One hmacfs process: its ports, its directory, its config and its log."""

    name: str
    dir: str
    port: int
    metrics_port: int
    keys: dict[str, object]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    starts: int = 0
    log: str = field(init=False)
    config: str = field(init=False)

    def __post_init__(self) -> None:
        self.log = os.path.join(self.dir, "twistd.log")
        self.config = os.path.join(self.dir, "hmacfs.toml")
        with open(self.config, "w", encoding="utf-8") as f:
            f.write(toml(self.keys))

    @property
    def store_dir(self) -> str:
        return str(self.keys["StoreDir"])

    def start(self) -> None:
        """Start the process (returns at once: see L{wait_ready})."""
        assert not self.alive(), f"{self.name} is running"
        self.starts += 1
        with open(self.log, "ab") as log:
            log.write(b"===== start %d of %s\n" % (self.starts, self.name.encode()))
            log.flush()
            self.process = subprocess.Popen(
                [TWISTD, "-n", "hmacfs", "--config", self.config],
                cwd=self.dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def pid(self) -> int | None:
        """The running process's id (None when it is not running)."""
        return self.process.pid if self.alive() and self.process is not None else None

    def answers(self) -> bool:
        """True once the health check of README ("Several nodes") and /metrics answer 200."""
        try:
            if request(self, "OPTIONS", f"/{SUBDIR}/", timeout=2).status != 200:
                return False
            metrics = _raw(self.metrics_port, "GET", "/metrics", b"", {}, 2)
            return metrics.status == 200
        except OSError:
            return False

    def wait_ready(self, deadline: float = READY_DEADLINE) -> None:
        until = time.monotonic() + deadline
        while not self.answers():
            if not self.alive():
                raise AssertionError(f"node {self.name} exited:\n{self.tail()}")
            if time.monotonic() > until:
                raise AssertionError(
                    f"node {self.name} not answering after {deadline}s:\n{self.tail()}"
                )
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: gone without a goodbye, its connections reset, its claims left behind."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (uploads may finish), then SIGKILL if it lingers."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log, errors="replace") as f:
                return f.read()[-chars:]
        except OSError:
            return ""

    def spool_files(self) -> list[str]:
        """What is left in the node's S3 spool (nothing, once every upload has ended)."""
        spool = os.path.join(self.store_dir, ".hmacfs", "s3-spool")
        if not os.path.isdir(spool):
            raise AssertionError(f"{self.name} has no S3 spool at {spool}")
        found = []
        for dirpath, _, names in os.walk(spool):
            found += [os.path.relpath(os.path.join(dirpath, n), spool) for n in names]
        return sorted(found)


def toml(keys: Mapping[str, object]) -> str:
    """A flat TOML document of strings, integers and booleans."""
    lines = []
    for key, value in keys.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        else:
            text = '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


def create_database() -> tuple[str, Callable[[], None]]:
    """A PostgreSQL database of the cluster's own, and the function that drops it."""
    import psycopg2

    name = "hmacfs_cluster_" + uuid.uuid4().hex[:12]
    try:
        conn = psycopg2.connect(connect_timeout=5, **POSTGRES)
    except psycopg2.OperationalError as e:
        require_service("PostgreSQL", str(e).strip())
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
    finally:
        conn.close()

    def drop() -> None:
        conn = psycopg2.connect(connect_timeout=5, **POSTGRES)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            conn.close()

    return name, drop


@dataclass
class ObjectStore:
    """Where the nodes keep their files: S3 gateways of one store (node i uses i mod n)."""

    endpoints: list[str]
    bucket: str
    access_key: str
    secret_key: str

    @classmethod
    def of(cls, seaweed) -> ObjectStore:
        """The store of a L{tests.seaweed.SeaweedMini} or L{tests.seaweed.SeaweedCluster}."""
        endpoints = getattr(seaweed, "endpoints", None) or [seaweed.endpoint]
        return cls(list(endpoints), seaweed.bucket, seaweed.access_key, seaweed.secret_key)

    def signed(
        self, method: str, key: str | None = None, query: Mapping[str, str] | None = None
    ) -> tuple[str, dict[str, str]]:
        """A SigV4-signed request to the first gateway, for looking behind hmacfs's back."""
        from twisted.internet import reactor

        from hmacd.s3 import S3Client

        client = S3Client(reactor, self.endpoints[0], self.bucket, self.access_key, self.secret_key)
        return client.sign(method, key, query)

    def create_bucket(self) -> None:
        """Create the bucket (a fresh SeaweedCluster has none); one already ours is fine."""
        url, headers = self.signed("PUT")
        parts = urlsplit(url)
        assert parts.port is not None
        answer = _raw(parts.port, "PUT", parts.path, b"", headers, 30)
        if answer.status not in (200, 409):
            raise AssertionError(f"creating bucket {self.bucket}: {answer}")


class Cluster:
    """
    C{count} hmacfs nodes on one shared Redis database and one PostgreSQL
    database, started and answering when this returns; killed and removed at
    test cleanup.  With C{store}, files live in that object store under a
    prefix of the cluster's own; without, every node has the same local
    C{StoreDir} (as on a shared file system: README, "StoreDir on NFS or
    CephFS").  C{extra} adds config keys to every node.
    """

    def __init__(
        self,
        testCase,
        store: ObjectStore | None,
        count: int = 3,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        if not os.path.exists(TWISTD):
            require_service("twistd", f"no twistd script next to {sys.executable}")
        self.testCase = testCase
        # In the test's own temp directory, so the nodes' configs and logs outlive the run
        # (trial keeps _trial_temp until the next); the files they stored do not.
        self.dir = os.path.abspath(testCase.mktemp())
        os.makedirs(self.dir)
        testCase.addCleanup(self.remove_files)
        self.redis = RedisServer(testCase)  # empty: no claim or lease of an earlier run
        self.database, drop = create_database()
        testCase.addCleanup(drop)
        # The nodes are killed before the database is dropped (cleanups run last first).
        testCase.addCleanup(self.kill_all)
        self.prefix = f"cluster-{uuid.uuid4().hex[:12]}/"
        self.secret = SECRET.encode()
        env = {k: v for k, v in os.environ.items() if not k.startswith("HMACFS_")}
        env["PYTHONPATH"] = REPO
        shared_store_dir = os.path.join(self.dir, "shared-store")
        self.nodes: list[Node] = []
        for i in range(count):
            name = "node-" + "abcdefghij"[i]
            home = os.path.join(self.dir, name)
            os.mkdir(home)
            port, metrics_port = free_port(), free_port()
            keys: dict[str, object] = {
                "ListenPort": f"127.0.0.1:{port}",
                "StoreDir": os.path.join(home, "store") if store else shared_store_dir,
                "UploadSubDir": SUBDIR,
                "Secret": SECRET,
                "NodeName": name,
                "LogLevel": "info",
                "MetricsEnabled": True,
                "MetricsPort": f"127.0.0.1:{metrics_port}",
                "MonitorInterval": 0,
                "RedisAddr": f"127.0.0.1:{self.redis.port}",
                "RedisDB": REDIS_DB,
                "FallbackEnabled": True,
                "FallbackDBType": "postgres",
                "FallbackDBHost": f"{POSTGRES['host']}:{POSTGRES['port']}",
                "FallbackDBUser": POSTGRES["user"],
                "FallbackDBName": self.database,
            }
            if store is not None:
                keys.update(
                    StorageBackend="s3",
                    S3Endpoint=store.endpoints[i % len(store.endpoints)],
                    S3Bucket=store.bucket,
                    S3Prefix=self.prefix,
                    S3AccessKey=store.access_key,
                    S3SecretKey=store.secret_key,
                )
            keys.update(extra or {})
            self.nodes.append(Node(name, home, port, metrics_port, keys, env))
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready()

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> Node:
        return self.nodes[index]

    def kill_all(self) -> None:
        for node in self.nodes:
            node.kill()

    def remove_files(self) -> None:
        """Remove every StoreDir (the logs and configs stay for a look after a failure)."""
        for node in self.nodes:
            shutil.rmtree(node.store_dir, ignore_errors=True)

    def logs(self) -> str:
        """The end of every node's log, for a failure message."""
        return "\n".join(f"----- {n.name}:\n{n.tail(2500)}" for n in self.nodes)

    def url(self, path: str) -> str:
        """The request target of path in the upload space, for GET and HEAD."""
        return f"/{SUBDIR}/{quote(path)}"

    def slot(
        self, path: str, size: int, content_type: str | None = None, protocol: str = "v2"
    ) -> tuple[str, dict[str, str]]:
        """
        A slot as the XMPP server hands it out: the PUT's request target and the headers
        to send with it (C{Authorization} for C{jwt}, the signed C{Content-Type}).
        """
        url, headers = slot_put(
            self.secret, f"http://upload/{SUBDIR}/", path, size, content_type, protocol, time.time()
        )
        parts = urlsplit(url)
        if content_type is not None:
            headers["Content-Type"] = content_type
        return parts.path + (f"?{parts.query}" if parts.query else ""), headers


# -- the client ------------------------------------------------------------------------------


def _raw(
    port: int,
    method: str,
    target: str,
    body: bytes | Iterator[bytes],
    headers: Mapping[str, str],
    timeout: float,
    length: int | None = None,
) -> Answer:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        if isinstance(body, bytes):
            length = len(body)
        if length is not None and method in ("PUT", "POST"):
            conn.putheader("Content-Length", str(length))
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        try:
            for chunk in [body] if isinstance(body, bytes) else body:
                if chunk:
                    conn.send(chunk)
        except OSError as broken:
            # A refusal from the head is answered at once and the connection closed:
            # that answer, if it can still be read, says more than the broken pipe.
            try:
                response = conn.getresponse()
            except (OSError, http.client.HTTPException):
                raise broken from None
        else:
            response = conn.getresponse()
        data = response.read()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


def request(
    node: Node,
    method: str,
    target: str,
    body: bytes | Iterator[bytes] = b"",
    headers: Mapping[str, str] | None = None,
    timeout: float = SOCKET_TIMEOUT,
    length: int | None = None,
) -> Answer:
    """One request on a connection of its own; a streamed body needs its length."""
    return _raw(node.port, method, target, body, headers or {}, timeout, length)


def download_digest(
    node: Node, target: str, timeout: float = SOCKET_TIMEOUT
) -> tuple[int, str, int, dict[str, str]]:
    """
    GET target, streaming: (status, SHA-256 hex of the body, its length, headers).
    A body cut short raises L{http.client.IncompleteRead}.
    """
    conn = http.client.HTTPConnection("127.0.0.1", node.port, timeout=timeout)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        digest, count = hashlib.sha256(), 0
        while True:
            chunk = response.read(1 << 20)
            if not chunk:
                break
            digest.update(chunk)
            count += len(chunk)
        expected = response.getheader("Content-Length")
        if response.status == 200 and expected is not None and int(expected) != count:
            raise http.client.IncompleteRead(b"", int(expected) - count)
        return (
            response.status,
            digest.hexdigest(),
            count,
            {k.lower(): v for k, v in response.getheaders()},
        )
    finally:
        conn.close()


def expect_continue(
    node: Node,
    target: str,
    length: int,
    headers: Mapping[str, str],
    timeout: float = SOCKET_TIMEOUT,
) -> tuple[bytes, dict[str, str], bytes]:
    """
    Send only the head of a PUT with C{Expect: 100-continue} and read what
    comes back before any body byte: (status line, headers, body).  A
    C{100 Continue} is returned as such: the caller then knows the server
    wanted the body.
    """
    with socket.create_connection(("127.0.0.1", node.port), timeout=timeout) as sock:
        head = [
            f"PUT {target} HTTP/1.1",
            "Host: 127.0.0.1",
            f"Content-Length: {length}",
            "Expect: 100-continue",
        ]
        head += [f"{k}: {v}" for k, v in headers.items()]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        reader = sock.makefile("rb")
        status = reader.readline().rstrip(b"\r\n")
        found: dict[str, str] = {}
        while True:
            line = reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            found[name.strip().lower()] = value.strip()
        body = b""
        if b" 100 " not in status + b" " and "content-length" in found:
            body = reader.read(int(found["content-length"]))
        return status, found, body


class Pattern:
    """
    A file's worth of bytes that differ everywhere, made again on demand from a
    seed (1 MiB blocks of SHAKE-128), so a 200 MiB body is never whole in memory.
    """

    BLOCK = 1 << 20

    def __init__(self, seed: str, size: int) -> None:
        self.seed = seed
        self.size = size

    def _block(self, index: int) -> bytes:
        return hashlib.shake_128(f"{self.seed}:{index}".encode()).digest(self.BLOCK)

    def chunks(self, first: int = 0, last: int | None = None) -> Iterator[bytes]:
        """Bytes first..last (inclusive; default: to the end), a block at most at a time."""
        end = self.size if last is None else last + 1
        offset = first
        while offset < end:
            index, skip = divmod(offset, self.BLOCK)
            chunk = self._block(index)[skip : skip + end - offset]
            yield chunk
            offset += len(chunk)

    def bytes(self, first: int = 0, last: int | None = None) -> bytes:
        return b"".join(self.chunks(first, last))

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()


# -- resumable uploads (README, "Resumable uploads") -----------------------------------------


def received(answer: Answer) -> int:
    """How many bytes a 308 or 416 says the upload holds (its C{Range}, none: 0)."""
    value = answer.header("Range")
    if value is None:
        return 0
    unit, _, span = value.partition("=")
    first, _, last = span.partition("-")
    if unit != "bytes" or first != "0" or not last.isdigit():
        raise AssertionError(f"unexpected Range {value!r} in {answer}")
    return int(last) + 1


def ask(node: Node, target: str, headers: Mapping[str, str], total: int) -> Answer:
    """Where does the upload stand?  C{PUT} with C{Content-Range: bytes */total}, no body."""
    return request(node, "PUT", target, b"", {**headers, "Content-Range": f"bytes */{total}"})


def send_piece(
    node: Node,
    target: str,
    headers: Mapping[str, str],
    data: Pattern,
    first: int,
    last: int,
) -> Answer:
    """One piece, bytes first..last of data, streamed on a connection of its own."""
    return request(
        node,
        "PUT",
        target,
        data.chunks(first, last),
        {**headers, "Content-Range": f"bytes {first}-{last}/{data.size}"},
        length=last - first + 1,
    )


def send_piece_and_kill(
    node: Node,
    target: str,
    headers: Mapping[str, str],
    data: Pattern,
    first: int,
    last: int,
    cut: int,
) -> None:
    """
    Start a piece, send its first C{cut} bytes, then SIGKILL the node: the client
    is left with a connection that breaks under it.
    """
    head = [
        f"PUT {target} HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Length: {last - first + 1}",
        f"Content-Range: bytes {first}-{last}/{data.size}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    with socket.create_connection(("127.0.0.1", node.port), timeout=SOCKET_TIMEOUT) as sock:
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
            for chunk in data.chunks(first, first + cut - 1):
                sock.sendall(chunk)
        except OSError as e:
            early = b""
            with contextlib.suppress(OSError):
                early = sock.recv(1000)
            raise AssertionError(
                f"{node.name} broke off the piece before the kill: {early!r}"
            ) from e
        node.kill()
        try:
            for chunk in data.chunks(first + cut, last):
                sock.sendall(chunk)
            reply = sock.recv(100)
        except OSError:
            return  # reset, as it should be: nobody is there any more
        if reply:
            raise AssertionError(f"{node.name} answered after it was killed: {reply!r}")
