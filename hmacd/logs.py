"""
LogLevel and LogFile, on top of twisted.logger.
"""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    textFileLogObserver,
)
from twisted.python.logfile import LogFile

__all__ = ["LEVELS", "censor", "for_twistd", "make_observer", "twistd_observer", "twistd_sink"]

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


# Matched on the decoded name: parse_qs (upload.py) reads "?%76=<mac>" as v too.
_SECRET_NAMES = frozenset({b"v", b"v2", b"token"})
_QUERY_PARAM = re.compile(rb"([?&;])([^=&;#]*)=[^&;#]*")


def _redact(match: re.Match[bytes]) -> bytes:
    name = unquote_to_bytes(match.group(2).replace(b"+", b" ")).lower()
    if name not in _SECRET_NAMES:
        return match.group(0)
    return match.group(1) + match.group(2) + b"=<redacted>"


def censor(uri: bytes | None) -> str:
    """A URI fit for a log: the values of v, v2 and token are replaced, the path is kept."""
    if not uri:
        return "-"
    # File names may hold "&v=" (mod_http_file_share sends them raw): only the query counts.
    path, mark, query = uri.partition(b"?")
    return (path + _QUERY_PARAM.sub(_redact, mark + query)).decode("ascii", "backslashreplace")


def _file_observer(path: str, rotateOnSignal: bool = False) -> ILogObserver:
    # No size-based rotation: rotating is logrotate's job.
    logFile = LogFile.fromFullPath(path, rotateLength=None)
    if rotateOnSignal:
        # SIGUSR1 rotates, as twistd does for its own log file (left at its
        # default the signal would kill the daemon); SIGHUP reopens the file
        # after logrotate has moved it.
        _on_signal(signal.SIGUSR1, logFile.rotate)
        _on_signal(signal.SIGHUP, logFile.reopen)
    return textFileLogObserver(logFile)


def _on_signal(signum: int, action: Callable[[], object]) -> None:
    if signal.getsignal(signum) not in (signal.SIG_DFL, None, 0):
        return  # somebody else's handler: leave it

    def handler(signum, frame):
        from twisted.internet import reactor

        reactor.callFromThread(action)

    signal.signal(signum, handler)


def twistd_sink(logfile: str | None, nodaemon: bool) -> Callable[[], ILogObserver]:
    """
    The observer twistd itself would have made for its --logfile and
    --nodaemon options (stdout in the foreground, twistd.log as a daemon).
    """

    def make() -> ILogObserver:
        if logfile == "-" or (nodaemon and not logfile):
            return textFileLogObserver(sys.stdout)
        return _file_observer(logfile or "twistd.log", rotateOnSignal=True)

    return make


def make_observer(
    level: str,
    log_file: str,
    default: Callable[[], ILogObserver],
    rotateOnSignal: bool = False,
) -> ILogObserver:
    """An observer that drops events below C{level} and writes the rest to
    C{log_file}, or to what C{default} makes when no file is configured."""
    sink = _file_observer(log_file, rotateOnSignal) if log_file else default()
    return FilteringLogObserver(sink, [LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])])


# twistd takes its `logger` option as a dotted name and imports it after our
# options are parsed; this is what that name points at.
_for_twistd: tuple[str, str, Callable[[], ILogObserver]] | None = None


def for_twistd(level: str, log_file: str, default: Callable[[], ILogObserver]) -> str:
    """Remember the settings for L{twistd_observer}, and return its dotted name."""
    global _for_twistd
    _for_twistd = (level, log_file, default)
    return f"{__name__}.twistd_observer"


def twistd_observer() -> ILogObserver:
    if _for_twistd is None:
        raise RuntimeError("hmacd.logs.for_twistd() was not called")
    return make_observer(*_for_twistd, rotateOnSignal=True)
