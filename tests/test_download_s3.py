"""The S3 read path's pieces that need no store: the stall deadline of a download."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from hmacd.download_s3 import _ToResponse
from hmacd.metrics import Metrics


class FakeRequest:
    """What _ToResponse uses of a twisted.web request."""

    path = b"/upload/f.bin"

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.producer = None
        self.written: list[bytes] = []

    def registerProducer(self, producer, streaming) -> None:
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.written.append(data)


class Producer:
    stopped = False

    def stopProducing(self) -> None:
        self.stopped = True


class FakeServer:
    def __init__(self, clock: Clock) -> None:
        self.reactor = clock
        self.metrics = Metrics()


class StallTests(SynchronousTestCase):
    """A client that stops reading a download from the store is cut off."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.request = FakeRequest()
        self.consumer = _ToResponse(self.request, FakeServer(self.clock), 10)
        self.producer = Producer()
        self.consumer.registerProducer(self.producer, True)

    def test_moving_bytes_renew_the_deadline(self) -> None:
        """Each write renews the deadline: a slow but moving download goes on."""
        for _ in range(5):
            self.clock.advance(9)
            self.consumer.write(b"x")
        self.assertFalse(self.request.transport.disconnecting)
        self.assertEqual(self.request.written, [b"x"] * 5)

    def test_stalled_client_dropped(self) -> None:
        """No byte moving for the stall timeout: the connection is aborted."""
        self.consumer.write(b"x")
        self.clock.advance(10)
        self.assertTrue(self.request.transport.disconnecting)

    def test_done_or_gone_disarms(self) -> None:
        """A finished download leaves no timer; a client that left stops the store too."""
        self.consumer.unregisterProducer()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.consumer.registerProducer(self.producer, True)
        self.consumer.left()
        self.assertTrue(self.producer.stopped)
        self.assertEqual(self.clock.getDelayedCalls(), [])
