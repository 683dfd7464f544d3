"""
The audit log: one JSON object a line, appended, for every upload, expiry, takedown,
purge and lifted takedown (C{AuditLog}; off when empty).

Several writers share the file (every Workers process, each node on a shared disk, the
admin commands): it is opened with C{O_APPEND} and each entry is one C{write()}, so
lines never interleave.  SIGHUP reopens it, as it does the log file, after logrotate has
moved it; and since only the main process gets that signal, every writer also notices by
itself (a C{stat} at most once a second) that the name now leads to another file, and
reopens it.  An entry holds no secret: time, action, path, uploader, size, SHA-256, who
(the OS user running a command; the node's name for the server), and what an action adds
(a takedown's status and note).  Every string is JSON-escaped, non-ASCII included, so a
path can neither break a line nor hide in a terminal.

Writing is best effort: a full disk or a removed directory is logged once, and the
upload or command goes on.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from hmacd.metadata import FileRecord

__all__ = ["AuditLog", "audit_entry", "os_user", "reopen_on_sighup"]

log = Logger()

ACTIONS = ("upload", "expire", "takedown", "purge", "lift")


def os_user() -> str:
    """The name of the OS user running this process (its uid when it has none)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def _iso(when: float) -> str:
    seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
    return f"{seconds}.{int(when % 1 * 1000):03d}Z"


def audit_entry(
    action: str,
    path: str,
    *,
    when: float,
    who: str,
    record: FileRecord | None = None,
    **extra: Any,
) -> bytes:
    """One line of the audit log: JSON, ASCII, ending in a newline."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action {action!r}")
    entry: dict[str, Any] = {
        "time": _iso(when),
        "action": action,
        "path": path,
        "uploader": record.uploader if record is not None else None,
        "size": record.size if record is not None else None,
        "sha256": record.sha256 if record is not None else None,
        "who": who,
    }
    entry.update(extra)
    return json.dumps(entry, ensure_ascii=True, separators=(", ", ": ")).encode("ascii") + b"\n"


class AuditLog:
    """
    The audit log at C{path}, appended to by this process as C{who}.

    @param clock: gives the entries' times (C{seconds()}); wall time when None.
    """

    # Seconds between checks that the name still leads to the open file.
    checkInterval = 1.0

    def __init__(self, path: str, who: str, clock: Any = None) -> None:
        self.path = path
        self.who = who
        self._clock = clock
        self._fd: int | None = None
        self._failing = False
        self._checked = time.monotonic()
        self._open()

    def _open(self) -> None:
        # 0640: what files were uploaded, and by whom, is not everyone's to read.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def reopen(self) -> None:
        """Close and open the file again (after logrotate moved it); errors are logged."""
        self.close()
        try:
            self._open()
        except OSError as e:
            self._warn(e)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)

    def write(self, action: str, path: str, record: FileRecord | None = None, **extra: Any) -> None:
        """Append one entry; never raises for an I/O error (it is logged, once per outage)."""
        when = self._clock.seconds() if self._clock is not None else time.time()
        line = audit_entry(action, path, when=when, who=self.who, record=record, **extra)
        if self._fd is None or self._moved():
            self.reopen()
            if self._fd is None:
                return
        try:
            written = os.write(self._fd, line)
            while written < len(line):  # a regular file writes short only when it is full
                more = os.write(self._fd, line[written:])
                if more == 0:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                written += more
        except OSError as e:
            self._warn(e)
            return
        if self._failing:
            self._failing = False
            log.info("audit log {path}: writing again", path=self.path)

    def _moved(self) -> bool:
        """Now and then: whether the name leads elsewhere than the open file (logrotate)."""
        now = time.monotonic()
        if now - self._checked < self.checkInterval:
            return False
        self._checked = now
        assert self._fd is not None
        try:
            named, opened = os.stat(self.path), os.fstat(self._fd)
        except OSError:
            return True  # moved away and not made again yet: make it
        return (named.st_dev, named.st_ino) != (opened.st_dev, opened.st_ino)

    def _warn(self, error: OSError) -> None:
        if not self._failing:
            self._failing = True
            log.error("audit log {path}: {error}", path=self.path, error=error)


def reopen_on_sighup(action: Callable[[], object]) -> None:
    """
    Run C{action} in the reactor thread on SIGHUP, after any handler already there (the
    log file's reopening): both files are reopened by one signal.
    """
    previous = signal.getsignal(signal.SIGHUP)

    def handler(signum: int, frame: Any) -> None:
        from twisted.internet import reactor
        from twisted.internet.interfaces import IReactorFromThreads

        IReactorFromThreads(reactor).callFromThread(action)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGHUP, handler)
