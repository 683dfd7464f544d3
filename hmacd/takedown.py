"""
Takedowns and the deny list.

An operator takes a file down with C{hmacfs admin rm}: the file and its record go, and a
L{Takedown} stays in the metadata store for good, keyed by the path, with the file's
SHA-256.  From then on:

 - a GET or HEAD of the path answers C{410 Gone} (or C{451 Unavailable For Legal
   Reasons}) with a short text body, not 404 (the store is asked only when the file is
   not found, so a normal GET costs nothing more);
 - a PUT to the path is refused with the same status before its body;
 - an upload, under any path, whose content has a taken-down SHA-256 is refused with the
   same status once its digest is known, before the file becomes visible: the upload is
   withdrawn and nothing of it stays.

The last two ask an in-process copy of the list (L{DenyList}) that L{DenyListRefresh}
reloads from the store every L{REFRESH_INTERVAL} seconds: a takedown made elsewhere (the
command line, another node) is enforced on uploads within that time, and an upload never
waits for a store round trip.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "GONE",
    "LEGAL",
    "REFRESH_INTERVAL",
    "Denied",
    "DenyList",
    "DenyListRefresh",
    "Takedown",
    "gone_body",
]

log = Logger()

GONE = 410
LEGAL = 451
STATUSES = (GONE, LEGAL)

# Seconds: how stale a process's copy of the deny list may be.
REFRESH_INTERVAL = 10.0


@dataclass(frozen=True)
class Takedown:
    """
    A path taken down for good.

    @ivar status: what its URL answers: 410 (removed) or 451 (legal reasons).
    @ivar sha256: the hex digest of the content taken down ("" when it was unknown): the
        same content uploaded again is refused.
    @ivar reason: the operator's note (never shown to clients).
    @ivar created: when (seconds since the epoch).
    @ivar who: who took it down (the OS user running the command).
    """

    path: str
    status: int
    sha256: str = ""
    reason: str = ""
    created: float = 0.0
    who: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"a takedown answers 410 or 451, not {self.status!r}")

    def to_json(self) -> str:
        """Every field but the path, as one JSON object (how Redis keeps it)."""
        fields = asdict(self)
        del fields["path"]
        return json.dumps(fields, sort_keys=True)

    @classmethod
    def from_json(cls, path: str, text: str | bytes) -> Takedown:
        """The takedown of C{path} from what L{to_json} gave."""
        fields = json.loads(text)
        return cls(
            path=path,
            status=int(fields["status"]),
            sha256=str(fields.get("sha256", "")),
            reason=str(fields.get("reason", "")),
            created=float(fields.get("created", 0.0)),
            who=str(fields.get("who", "")),
        )


class Denied(Exception):
    """An upload's content is on the deny list: it is withdrawn, and answered C{status}."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def gone_body(status: int) -> bytes:
    """The short text a taken-down URL answers."""
    if status == LEGAL:
        return b"unavailable for legal reasons\n"
    return b"removed\n"


class DenyList:
    """
    This process's copy of the takedowns: paths and digests, each with its status.
    Read from any thread (a commit asks it from a worker thread); L{load} swaps whole
    dictionaries, so a reader sees one copy or the other.
    """

    def __init__(self) -> None:
        self._paths: dict[str, int] = {}
        self._digests: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._paths)

    def load(self, takedowns: Iterable[Takedown]) -> None:
        """Replace the copy with C{takedowns}."""
        paths: dict[str, int] = {}
        digests: dict[str, int] = {}
        for t in takedowns:
            paths[t.path] = t.status
            if t.sha256:
                # 451 wins over 410 for the same content.
                digests[t.sha256] = max(t.status, digests.get(t.sha256, 0))
        self._paths, self._digests = paths, digests

    def path(self, relpath: str) -> int | None:
        """The status C{relpath} answers if it was taken down, else None."""
        return self._paths.get(relpath) if self._paths else None

    def digest(self, sha256: str) -> int | None:
        """The status an upload of content C{sha256} is refused with, else None."""
        return self._digests.get(sha256) if self._digests else None


class DenyListRefresh(TimerService):
    """Reload a L{DenyList} from the store every C{interval} seconds; a failure keeps the old."""

    def __init__(
        self,
        store: Any,
        denylist: DenyList,
        interval: float = REFRESH_INTERVAL,
        clock: Any = None,
    ) -> None:
        super().__init__(interval, self.refresh)
        self.store = store
        self.denylist = denylist
        if clock is not None:
            self.clock = clock
        self._failing = False

    def refresh(self) -> None:
        """One reload; errors are logged once per outage, never raised."""
        d: Deferred[list[Takedown]] = self.store.takedowns()

        def loaded(found: list[Takedown]) -> None:
            self.denylist.load(found)
            if self._failing:
                self._failing = False
                log.info("deny list reloaded ({count} takedowns)", count=len(found))

        def failed(failure: Failure) -> None:
            if not self._failing:
                self._failing = True
                log.warn(
                    "cannot reload the deny list ({why}); keeping the last one",
                    why=failure.getErrorMessage(),
                )

        # Not returned: TimerService would wait on it at stopService.
        d.addCallbacks(loaded, failed)
