"""
What one client may hold of the server, and for how long.

A client that dribbles a request head one byte at a time resets the idle
timeout with every byte, and one that opens thousands of connections takes
every file descriptor.  Three limits, all on the injected reactor:

 - L{GuardedChannel}: a deadline for each request head (C{HeaderTimeout}),
   from its first byte (or, for a head that arrived while the previous request
   was being answered, from that answer's end) to the blank line ending it;
   past it the client gets a 408 and the connection is closed;
 - L{ClientCounts}: live connections per client address
   (C{MaxConnectionsPerClient}).  At accept the peer address is all there
   is: an untrusted peer is counted there and refused at once past the cap.
   A peer in C{TrustedProxies} is not capped itself (it carries everybody's
   requests); its requests are counted per forwarded client once their head
   is parsed, and refused with 429 past the cap;
 - L{BodyRateFloor}: an upload body whose average rate over a window
   (C{MinUploadRateWindow}) stays below C{MinUploadBytesPerSecond} is cut.
   Time in which the server itself holds the body back (a bandwidth limit,
   the disk catching up) is not the client's and is left out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from hmacd import internals
from hmacd.throttle import Network, client_address, client_ip, is_trusted

__all__ = [
    "HEAD_TIMEOUT_BODY",
    "BodyRateFloor",
    "ClientCounts",
    "GuardedChannel",
    "address_key",
    "counted_client",
    "watch_body_rate",
]

log = Logger()

HEAD_TIMEOUT_BODY = b"request head not complete in time\n"
_HEAD_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\n"
    b"Connection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"\r\n" % len(HEAD_TIMEOUT_BODY)
) + HEAD_TIMEOUT_BODY


def address_key(host: str) -> str:
    """
    The form of an address that connections are counted under: one client
    reaching a dual-stack listener as ::ffff:192.0.2.1 and an IPv4 one as
    192.0.2.1 is one client.
    """
    ip = client_ip(host)
    return host if ip is None else str(ip)


def counted_client(
    peer: str, forwardedFor: list[bytes] | None, trusted: tuple[Network, ...]
) -> str | None:
    """
    The client a request from a trusted proxy is counted against, or None
    when there is none to count: the peer is not a trusted proxy (it was
    counted at accept), or the request names no untrusted client (a proxy's
    own requests are never capped).
    """
    if not trusted or not is_trusted(peer, trusted):
        return None
    address = client_address(peer, forwardedFor, trusted)
    if is_trusted(address, trusted):
        return None
    return address_key(address)


class ClientCounts:
    """
    How many connections (or forwarded requests) each client address holds
    now, in this process.  An address leaves the table when its count is back
    at zero, so the table is as large as the set of clients connected.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def acquire(self, address: str, limit: int) -> bool:
        """Count one more for C{address}, unless it holds C{limit} already (0: no limit)."""
        held = self._counts.get(address, 0)
        if limit and held >= limit:
            return False
        self._counts[address] = held + 1
        return True

    def release(self, address: str) -> None:
        held = self._counts.get(address, 0) - 1
        if held > 0:
            self._counts[address] = held
        else:
            self._counts.pop(address, None)

    def held(self, address: str) -> int:
        """What C{address} holds now."""
        return self._counts.get(address, 0)


class GuardedChannel(http.HTTPChannel):
    """
    An HTTP/1.1 channel with a deadline for each request head.

    The deadline is C{site.fileServer.header_timeout} (0: none).  It runs from
    the first byte of a head, or from the end of the previous response when
    the head arrived before that, to C{allHeadersReceived}; it never covers a
    body, which is the business of the idle timeout and L{BodyRateFloor}.
    """

    # The Site that built this channel (Site.buildProtocol sets it): an HmacfsSite, or a
    # host's Site that install_policy gave a fileServer.
    site: Any
    _headDeadline = None  # the pending IDelayedCall of the head being received
    _awaitingHead = True  # between requests: the next byte starts a head
    _headBegun = False  # bytes of the awaited head have been read
    _headTimedOut = False
    _localAddress: Any = None

    def getHost(self) -> Any:
        """
        The transport's own address, asked once: twisted.web asks for every request, and a
        TCP transport asks the kernel (getsockname) each time, for an address a connection
        never changes.
        """
        address = self._localAddress
        if address is None:
            address = self._localAddress = super().getHost()
        return address

    def _timeout(self) -> float:
        fs = getattr(self.site, "fileServer", None)
        return fs.header_timeout if fs is not None else 0

    def _startHead(self) -> None:
        timeout = self._timeout()
        if timeout and self._headDeadline is None:
            self._headDeadline = self.callLater(timeout, self._headTooSlow)

    def _endHead(self) -> None:
        self._awaitingHead = False
        self._headBegun = False
        if self._headDeadline is not None:
            if self._headDeadline.active():
                self._headDeadline.cancel()
            self._headDeadline = None

    def dataReceived(self, data: bytes) -> None:
        if self._headTimedOut:
            return  # answered with 408 and closing; the rest is not read
        if self._awaitingHead and data:
            self._headBegun = True
        super().dataReceived(data)
        # The deadline is armed only for a head still incomplete after the read that brought
        # its first bytes (the same instant): a head that arrives whole, as nearly every one
        # does, costs no DelayedCall.  A head replayed by requestDone comes through here too.
        if self._awaitingHead and self._headBegun and self._headDeadline is None:
            self._startHead()

    def allHeadersReceived(self) -> None:
        # Before the request sees its head: it may finish at once, and the
        # next head (already buffered) starts its own deadline in requestDone.
        self._endHead()
        super().allHeadersReceived()

    def requestDone(self, request) -> None:
        if self.persistent:
            # The next head's time starts with its first byte; a head that came while this
            # request was answered is replayed through dataReceived now, and starts now.
            self._awaitingHead = True
        super().requestDone(request)

    def _headTooSlow(self) -> None:
        self._headDeadline = None
        self._headTimedOut = True
        fs = self.site.fileServer
        transport = self.transport
        # The deadline is cancelled when the connection is lost: there is a transport.
        assert transport is not None
        fs.metrics.connections_cut.labels("header_timeout").inc()
        log.info(
            "request head from {peer} not complete after {timeout} s: 408, closing",
            peer=getattr(transport.getPeer(), "host", "-"),
            timeout=fs.header_timeout,
        )
        # No response is under way (the previous one has ended, or there was
        # none), so a 408 can always go out before the close.
        transport.write(_HEAD_TIMEOUT_RESPONSE)
        if self.abortTimeout is not None:
            # As timeoutConnection: a client that does not read cannot hold the close up.
            internals.abort_after(self, self.abortTimeout)
        self.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._endHead()
        super().connectionLost(reason)


class BodyRateFloor:
    """
    The floor under one upload body's rate.

    Every C{window} seconds the bytes received in that window must reach
    C{floor} bytes for each second of it that the client was free to send:
    the seconds in which the server held reading back (L{pause}/L{resume})
    are not counted.  Below that, C{cut(received, seconds)} is called once,
    with the window's bytes and the client's seconds, and the watch ends.
    """

    def __init__(
        self,
        floor: int,
        window: float,
        clock,
        received: Callable[[], int],
        cut: Callable[[int, float], None],
    ) -> None:
        self.floor = floor
        self.window = window
        self.clock = clock
        self._received = received
        self._cut = cut
        self._pausedSince: float | None = None
        self._startWindow()

    def _startWindow(self) -> None:
        self._windowStart = self.clock.seconds()
        self._windowBytes = self._received()
        self._pausedTotal = 0.0
        if self._pausedSince is not None:
            self._pausedSince = self._windowStart
        self._check = self.clock.callLater(self.window, self._judge)

    def pause(self) -> None:
        """The server stops reading this body: from now the client is not to blame."""
        if self._pausedSince is None:
            self._pausedSince = self.clock.seconds()

    def resume(self) -> None:
        if self._pausedSince is not None:
            self._pausedTotal += self.clock.seconds() - self._pausedSince
            self._pausedSince = None

    def stop(self) -> None:
        """The body is complete, or lost: no more judging."""
        if self._check is not None and self._check.active():
            self._check.cancel()
        self._check = None

    def _judge(self) -> None:
        self._check = None
        now = self.clock.seconds()
        paused = self._pausedTotal
        if self._pausedSince is not None:
            paused += now - self._pausedSince
        seconds = max(0.0, now - self._windowStart - paused)
        count = self._received() - self._windowBytes
        if count < self.floor * seconds:
            self._cut(count, seconds)
            return
        self._startWindow()


def watch_body_rate(fs, received: Callable[[], int], cut: Callable[[int, float], None]):
    """The L{BodyRateFloor} of an upload on C{fs}, or None when MinUploadBytesPerSecond is off."""
    if not fs.min_upload_bytes_per_second:
        return None
    return BodyRateFloor(
        fs.min_upload_bytes_per_second, fs.min_upload_rate_window, fs.reactor, received, cut
    )
