"""
Shared test helpers: a store in a temp dir, signed URLs, servers.
"""

from __future__ import annotations

import json
import os

from twisted.internet.address import IPv4Address
from twisted.internet.defer import maybeDeferred
from twisted.internet.testing import MemoryReactorClock, StringTransport

from hmacd import auth
from hmacd.core import FileServer
from hmacd.store.failover import FailoverStore
from hmacd.store.memory import MemoryStore
from hmacd.web import HmacfsSite

SECRET = b"test-secret-\xc3\xa9t\xc3\xa9"
# The project's own copy of the slots real servers issued (tests/vectors/README.md says
# where each came from): a clone alone has everything its tests read.
VECTORS_FILE = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "vectors", "xmpp-slots.json"
)


def load_vectors() -> dict:
    """The real XMPP slots; a missing file is an error, not a skip."""
    with open(VECTORS_FILE, encoding="utf-8") as f:
        return json.load(f)


def memory_metadata(clock) -> FailoverStore:
    """A started FailoverStore over a MemoryStore (starting it is synchronous)."""
    # No health pings: a dict does not fail, and a loop left running on the
    # global reactor would make the test's reactor unclean.
    store = FailoverStore(MemoryStore(), clock=clock, healthInterval=0)
    store.start()
    return store


def strip_facts(path: str) -> None:
    """Take a stored file's facts off it, as if an older version had uploaded it."""
    from hmacd.facts import ATTRIBUTE

    os.removexattr(path, ATTRIBUTE)


def synchronous(f):
    return maybeDeferred(f)


def store_files(root: str) -> list[str]:
    """Every file and directory under root except our own .hmacfs/ dir."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        if rel == ".hmacfs" or rel.startswith(".hmacfs" + os.sep):
            continue
        for name in dirnames + filenames:
            path = os.path.normpath(os.path.join(rel, name))
            if path != ".hmacfs":
                found.append(path)
    return sorted(found)


def v_query(path: str, size: int, secret: bytes = SECRET) -> str:
    return "v=" + auth.sign_v(secret, path, size)


def v2_query(path: str, size: int, content_type: str | None, secret: bytes = SECRET) -> str:
    return "v2=" + auth.sign_v2(secret, path, size, content_type)


class MemoryServer:
    """
    An HmacfsSite driven with raw bytes through StringTransport, on a
    MemoryReactorClock, with blocking work done synchronously.
    """

    def __init__(self, store_dir: str, **kwargs) -> None:
        os.makedirs(store_dir, exist_ok=True)
        self.clock = MemoryReactorClock()
        kwargs.setdefault("secret", SECRET)
        kwargs.setdefault("metadata", memory_metadata(self.clock))
        self.fs = FileServer(
            store_dir=store_dir, reactor=self.clock, blocking=synchronous, **kwargs
        )
        self.site = HmacfsSite(self.fs)

    def connect(self):
        """A fresh channel and its transport."""
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4711))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4711))
        channel.makeConnection(transport)
        return channel, transport


class LoopbackServer:
    """
    An HmacfsSite on a real 127.0.0.1 socket, with a treq client whose
    connections are closed when the test ends.
    """

    def __init__(self, testCase, root: str | None = None, **kwargs) -> None:
        from treq.client import HTTPClient
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool

        self.root = root or testCase.mktemp()
        os.makedirs(self.root, exist_ok=True)
        kwargs.setdefault("secret", SECRET)
        kwargs.setdefault("metadata", memory_metadata(reactor))
        self.fs = FileServer(store_dir=self.root, reactor=reactor, **kwargs)
        self.site = HmacfsSite(self.fs)
        self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        testCase.addCleanup(self.port.stopListening)
        self.host, self.portNumber = "127.0.0.1", self.port.getHost().port
        self.base = f"http://127.0.0.1:{self.portNumber}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = HTTPClient(Agent(reactor, pool=pool))
        testCase.addCleanup(pool.closeCachedConnections)

    def url(self, path: str, query: str = "") -> str:
        from urllib.parse import quote

        return f"{self.base}/upload/{quote(path)}" + (f"?{query}" if query else "")
