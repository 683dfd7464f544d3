"""
Claims across nodes (hmacd.node_claims) and the PUT that waits for one before its body
(hmacd.admission.admit_across_nodes, hmacd.upload.UploadRequest): nothing of the body is
read and no 100 Continue is sent until the claim in the shared store is ours.
"""

from __future__ import annotations

import os

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from hmacd.metadata import FileRecord
from hmacd.node_claims import NodeClaims
from hmacd.store import StoreUnavailable
from hmacd.store.memory import MemoryStore
from tests.support import MemoryServer, v2_query

BODY = b"x" * 1000
NAME = "slot/claimed.bin"


def put_head(path: str = NAME, size: int = len(BODY), expect: bool = True) -> bytes:
    """The head of a PUT of C{size} bytes at C{path}, signed (v2)."""
    query = v2_query(path, size, "application/octet-stream")
    lines = [
        f"PUT /upload/{path}?{query} HTTP/1.1",
        "Host: up.example",
        "Content-Type: application/octet-stream",
        f"Content-Length: {size}",
    ]
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class NodeClaimsTests(SynchronousTestCase):
    """One claim per path across every owner; renewed while held; lapses when not."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = MemoryStore(clock=self.clock)
        self.a = NodeClaims(self.store, "a", self.clock, lease=30)
        self.b = NodeClaims(self.store, "b", self.clock, lease=30)

    def take(self, claims: NodeClaims, path: str = "p"):
        return self.successResultOf(claims.take(path))

    def test_one_holder(self):
        """A path held by one node (or one request of the same node) is refused to others."""
        held = self.take(self.a)
        self.assertIsNotNone(held)
        self.assertIsNone(self.take(self.b))
        self.assertIsNone(self.take(self.a))  # another request of node a: another owner
        held.release()
        self.assertIsNotNone(self.take(self.b))

    def test_renewed_while_held(self):
        """A claim held past its lease is renewed; released, it stops being renewed."""
        held = self.take(self.a)
        for _ in range(9):
            self.clock.advance(10)
        self.assertIsNone(self.take(self.b))
        held.release()
        held.release()  # idempotent
        self.assertEqual(len(self.a), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNotNone(self.take(self.b))

    def test_dead_node_lapses(self):
        """A node that stops renewing (it died) loses the path once its lease is over."""
        self.take(self.a)
        self.a.stop()  # as if the process were gone
        self.clock.advance(29)
        self.assertIsNone(self.take(self.b))
        self.clock.advance(2)
        self.assertIsNotNone(self.take(self.b))

    def test_lapsed_claim_is_logged(self):
        """A renewal that finds the claim lost says so once."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        held = self.take(self.a)
        self.store._shared.clear()  # the store forgot it (restarted, expired meanwhile)
        self.take(self.b)
        self.clock.advance(10)
        self.clock.advance(10)
        lapsed = [e for e in events if "lapsed" in e.get("log_format", "")]
        self.assertEqual(len(lapsed), 1)
        self.assertFalse(held.kept)
        held.release()


class Gate:
    """Holds the answers of the store's claims until the test lets them through."""

    def __init__(self, metadata) -> None:
        self.real = metadata.claim
        self.pending: list[tuple[Deferred, tuple]] = []
        metadata.claim = self.claim

    def claim(self, *args):
        d: Deferred = Deferred()
        self.pending.append((d, args))
        return d

    def open(self) -> None:
        d, args = self.pending.pop(0)
        self.real(*args).chainDeferred(d)

    def fail(self) -> None:
        d, _ = self.pending.pop(0)
        d.errback(StoreUnavailable("no store answers"))


class WaitForClaimTests(SynchronousTestCase):
    """A PUT whose claim is asked of a shared store, driven byte by byte."""

    def setUp(self) -> None:
        self.server = MemoryServer(self.mktemp())
        fs = self.server.fs
        fs.node_claims = NodeClaims(fs.metadata, "here", self.server.clock)
        self.gate = Gate(fs.metadata)
        self.channel, self.transport = self.server.connect()

    def stored(self, path: str = NAME) -> bytes | None:
        try:
            with open(os.path.join(self.server.fs.store_dir, path), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def test_no_continue_before_the_claim(self):
        """100 Continue only once the claim is ours; then the body is stored."""
        self.channel.dataReceived(put_head())
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.transport.producerState, "paused")
        self.gate.open()
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(self.transport.producerState, "producing")
        self.transport.clear()
        self.channel.dataReceived(BODY)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 201 "))
        self.assertEqual(self.stored(), BODY)
        self.assertEqual(len(self.server.fs.node_claims), 0)

    def test_body_with_the_headers(self):
        """A body sent with its headers (no Expect) waits in memory, then is stored."""
        self.channel.dataReceived(put_head(expect=False) + BODY[:300])
        self.assertEqual(self.transport.value(), b"")
        self.gate.open()
        self.channel.dataReceived(BODY[300:])
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 201 "))
        self.assertNotIn(b"100 Continue", self.transport.value())
        self.assertEqual(self.stored(), BODY)

    def test_whole_request_before_the_claim(self):
        """The whole request arrived during the wait: answered once the claim is ours."""
        self.channel.dataReceived(put_head(expect=False) + BODY)
        self.assertEqual(self.transport.value(), b"")
        self.gate.open()
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 201 "))
        self.assertEqual(self.stored(), BODY)

    def test_held_elsewhere(self):
        """Another node holds the path: 409 before the body, no 100 Continue, closed."""
        fs = self.server.fs
        self.successResultOf(fs.metadata.primary.store.claim(NAME, "other/1", 30))
        self.channel.dataReceived(put_head())
        self.gate.open()
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 409 "), answer)
        self.assertIn(b"in progress", answer)
        self.assertNotIn(b"100 Continue", answer)
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.stored())

    def test_held_elsewhere_small_body_drained(self):
        """A small body without Expect is drained, so the client reads the 409."""
        self.successResultOf(self.server.fs.metadata.primary.store.claim(NAME, "other/1", 30))
        self.channel.dataReceived(put_head(expect=False) + BODY[:100])
        self.gate.open()
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 409 "))
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.transport.producerState, "producing")
        self.channel.dataReceived(BODY[100:])
        self.assertTrue(self.transport.disconnecting)
        self.assertIsNone(self.stored())

    def test_file_recorded(self):
        """A path the store has a record of is a 409 before the body."""
        fs = self.server.fs
        record = FileRecord(NAME, 3, "text/plain", "0" * 64, 1.0, "v2")
        self.successResultOf(fs.metadata.put(record))
        self.channel.dataReceived(put_head())
        self.gate.open()
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 409 "), answer)
        self.assertIn(b"file exists", answer)
        self.assertEqual(len(fs.node_claims), 0)  # let go again

    def test_store_down(self):
        """No store answers the claim: 503 with Retry-After, before the body."""
        self.channel.dataReceived(put_head())
        self.gate.fail()
        answer = self.transport.value()
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"Retry-After: ", answer)
        self.assertNotIn(b"100 Continue", answer)

    def test_gone_while_waiting(self):
        """A client gone during the wait: the claim taken for it is let go, nothing stored."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.channel.dataReceived(put_head())
        self.channel.connectionLost(Failure(ConnectionLost()))
        self.gate.open()
        fs = self.server.fs
        self.assertEqual(len(fs.node_claims), 0)
        self.assertTrue(self.successResultOf(self.gate.real(NAME, "next/1", 30)))
        self.assertEqual(len(fs.uploads), 0)

    def test_racing_requests(self):
        """Two connections for one path: the first claim wins, the second gets 409."""
        other, otherTransport = self.server.connect()
        self.channel.dataReceived(put_head())
        other.dataReceived(put_head())
        self.gate.open()
        self.gate.open()
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertTrue(otherTransport.value().startswith(b"HTTP/1.1 409 "))
        self.channel.dataReceived(BODY)
        self.assertIn(b"HTTP/1.1 201 ", self.transport.value())

    def test_answered_at_once(self):
        """A store that answers at once: no wait, the usual path (the channel says 100)."""
        fs = self.server.fs
        fs.metadata.claim = self.gate.real
        self.channel.dataReceived(put_head())
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.channel.dataReceived(BODY)
        self.assertIn(b"HTTP/1.1 201 ", self.transport.value())


class StoreFailureShapes(SynchronousTestCase):
    """What a claim store may fail with becomes 503, never a 500 or a hang."""

    def test_timeout(self):
        server = MemoryServer(self.mktemp())
        fs = server.fs
        fs.node_claims = NodeClaims(fs.metadata, "here", server.clock)
        fs.metadata.claim = lambda *a: fail(TimeoutError())
        channel, transport = server.connect()
        channel.dataReceived(put_head())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))

    def test_record_lookup_fails(self):
        server = MemoryServer(self.mktemp())
        fs = server.fs
        fs.node_claims = NodeClaims(fs.metadata, "here", server.clock)
        fs.metadata.get = lambda path: fail(StoreUnavailable("gone"))
        channel, transport = server.connect()
        channel.dataReceived(put_head())
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 503 "))
        self.assertEqual(len(fs.node_claims), 0)
        self.assertTrue(self.successResultOf(fs.metadata.claim(NAME, "x/1", 3)))


class WaitEdgesTests(SynchronousTestCase):
    """The wait for a claim: the channel resuming its transport, bugs, Expect values."""

    def setUp(self) -> None:
        self.server = MemoryServer(self.mktemp())
        fs = self.server.fs
        fs.node_claims = NodeClaims(fs.metadata, "here", self.server.clock)
        self.gate = Gate(fs.metadata)
        self.channel, self.transport = self.server.connect()

    def test_channel_resumes_transport(self):
        """
        The channel resumes its transport when a response has drained: the wait pauses it
        again at the next bytes, and cuts off a client that gets too much in.
        """
        from hmacd.upload import MAX_WAIT_BUFFER

        size = 2 * MAX_WAIT_BUFFER
        self.channel.dataReceived(put_head(size=size, expect=False))
        self.channel.resumeProducing()  # as the transport does once its buffer drained
        self.assertEqual(self.transport.producerState, "producing")
        self.channel.dataReceived(b"y" * 1000)
        self.assertEqual(self.transport.producerState, "paused")
        self.channel.dataReceived(b"y" * MAX_WAIT_BUFFER)
        self.assertTrue(self.transport.disconnected)

    def test_bug_after_the_wait(self):
        """An error once the claim is ours: 500, the claim let go, nothing paused forever."""
        fs = self.server.fs

        def broken(request):
            raise RuntimeError("a bug")

        fs.uploads.add = broken
        self.channel.dataReceived(put_head())
        self.gate.open()
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 500 "))
        self.assertEqual(len(fs.node_claims), 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_other_expectation(self):
        """Only 100-continue gets 100 Continue."""
        head = put_head().replace(b"100-continue", b"something-else")
        self.channel.dataReceived(head)
        self.gate.open()
        self.assertNotIn(b"100 Continue", self.transport.value())
