"""
The state one running file server shares between its requests.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from hmacd.auth import DEFAULT_CONTENT_TYPE
from hmacd.metadata import SidecarStore

__all__ = ["FileServer", "guess_type", "is_inline_type"]

# Built-in table only: the same answer on every machine, whatever
# /etc/mime.types says.
_TYPES = mimetypes.MimeTypes()


def guess_type(name: str) -> str:
    """The content type for a file name, by its extension."""
    guessed, _ = _TYPES.guess_type(name, strict=False)
    return guessed or DEFAULT_CONTENT_TYPE


def is_inline_type(content_type: str) -> bool:
    """
    Whether a browser may show this type inline.

    XEP-0363 deployments show pictures, video, audio and plain text in the
    page; everything else is served as an attachment so that an uploaded
    HTML or PDF file never runs in the server's origin.
    """
    main = content_type.split(";", 1)[0].strip().lower()
    return main == "text/plain" or main.split("/", 1)[0] in ("image", "video", "audio")


@dataclass
class FileServer:
    """
    Configuration, secret, store and clock of one hmacfs instance.

    @ivar store_dir: absolute path of C{StoreDir}.
    @ivar prefix: C{UploadSubDir} without slashes; C{""} serves from C{/}.
    @ivar reactor: provides IReactorTime and IReactorThreads: timers and
        the thread pool that the request code uses.
    @ivar blocking: runs a blocking callable off the reactor thread and
        returns a Deferred of its result; the reactor's thread pool unless
        given (tests pass a synchronous one).
    @ivar clock: where "now" comes from (JWT expiry, record times); the
        reactor unless given.
    """

    secret: bytes
    store_dir: str
    reactor: Any
    prefix: str = "upload"
    upload_max_size: int = 0
    chunk_size: int = 1 << 20
    blocking: Callable[[Callable[[], Any]], Deferred] | None = None
    clock: Any = None
    metadata: SidecarStore = field(init=False)

    def __post_init__(self) -> None:
        self.store_dir = os.path.abspath(self.store_dir)
        self.metadata = SidecarStore(self.store_dir)
        if self.clock is None:
            self.clock = self.reactor
        if self.blocking is None:
            # fsync of a large file takes long enough to stall every other
            # connection if done in the reactor thread.
            self.blocking = lambda f: deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), f
            )

    def now(self) -> float:
        """Wall-clock time for token expiry and records (a Clock in tests)."""
        return self.clock.seconds()
