"""
How fast an upload's connection is read.

Reading pauses while the storage is behind the client ("disk") and while the upload, or all
uploads together, are ahead of their bandwidth ("rate"); it goes on only when no reason
holds it back.  The MinUploadBytesPerSecond floor (L{hmacd.guard.BodyRateFloor}) is paused
with it: our own pause is not the client's slowness.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, cast

from twisted.internet.interfaces import IDelayedCall

from hmacd.guard import BodyRateFloor
from hmacd.throttle import Bandwidth

if TYPE_CHECKING:
    from hmacd.core import FileServer

__all__ = ["Paced", "Pacer"]


class _Connection(Protocol):
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...


class Paced(Protocol):
    """The request a L{Pacer} reads for."""

    def liveChannel(self) -> Any | None:
        """Its HTTPChannel, or None once the request has finished or its connection is lost."""


class Pacer:
    """
    The pauses of one upload's reading.

    @param fs: the L{hmacd.core.FileServer} (its reactor, its total bandwidth).
    @param bandwidth: this upload's own MaxBytesPerSecond, or None.
    """

    floor: BodyRateFloor | None = None  # set once the floor is watching
    _resume: IDelayedCall | None = None  # the pending end of a throttling pause
    _savedTimeout: float | None = None

    def __init__(self, request: Paced, fs: FileServer, bandwidth: Bandwidth | None) -> None:
        self._request = request
        self._fs = fs
        self.bandwidth = bandwidth
        self._pausedFor: frozenset[str] = frozenset()  # "disk", "rate"

    def pause(self, reason: str) -> None:
        """Stop reading from the client, for C{reason}, until L{unpause} of it."""
        if not self._pausedFor:
            channel = self._request.liveChannel()
            if channel is not None:
                cast(_Connection, channel.transport).pauseProducing()
            if self.floor is not None:
                self.floor.pause()
        self._pausedFor |= {reason}

    def unpause(self, reason: str) -> None:
        """Read on, unless another reason still holds reading back."""
        if reason not in self._pausedFor:
            return
        self._pausedFor -= {reason}
        channel = self._request.liveChannel()
        if not self._pausedFor and channel is not None:
            cast(_Connection, channel.transport).resumeProducing()
            if self.floor is not None:
                self.floor.resume()

    def diskCaughtUp(self) -> None:
        """The storage has written what it held: read on, as far as the rate allows."""
        self.unpause("disk")

    def took(self, count: int) -> None:
        """C{count} bytes were read: pause while this upload (or all) is ahead of its rate."""
        fs = self._fs
        waits = [b.take(count) for b in (self.bandwidth, fs.total_bandwidth) if b is not None]
        wait = max(waits, default=0.0)
        if wait <= 0 or self._resume is not None:
            return
        self.pause("rate")
        # A deliberate pause is not an idle client: no timeout while it lasts.
        channel = self._request.liveChannel()
        if channel is not None:
            self._savedTimeout = channel.setTimeout(None)
        self._resume = fs.reactor.callLater(wait, self._unthrottle)

    def _unthrottle(self) -> None:
        self._resume = None
        channel = self._request.liveChannel()
        if channel is not None:
            channel.setTimeout(self._savedTimeout)
        self.unpause("rate")

    def endThrottle(self) -> None:
        """The body is complete: no more rate pauses; undo a pending one now."""
        self.bandwidth = None
        if self._resume is not None:
            self._resume.cancel()
            self._unthrottle()

    def lost(self) -> None:
        """The connection is gone: nothing more to time."""
        self.stopFloor()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None

    def stopFloor(self) -> None:
        """The floor has fired, or has nothing more to watch."""
        if self.floor is not None:
            self.floor.stop()
            self.floor = None
