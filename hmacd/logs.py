"""
LogLevel and LogFile, on top of twisted.logger; and what makes a value a
client sent fit for a log line (L{escape}, L{censor}).  The access-log formatter that
uses them on a host's Site is HTTP policy, in L{hmacd.web}.
"""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Callable
from urllib.parse import unquote_to_bytes

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEventAsClassicLogText,
)
from twisted.python.logfile import LogFile

__all__ = [
    "LEVELS",
    "censor",
    "censored_uri",
    "emits",
    "escape",
    "for_twistd",
    "is_secret_name",
    "make_observer",
    "twistd_observer",
    "twistd_sink",
]

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


# Matched on the decoded name: parse_qs (upload.py) reads "?%76=<mac>" as v too.
_SECRET_NAMES = frozenset({b"v", b"v2", b"token"})
_QUERY_PARAM = re.compile(rb"([?&;])([^=&;#]*)=[^&;#]*")


def is_secret_name(name: bytes) -> bool:
    """Whether a query parameter called C{name} (as sent, still %-encoded) carries a MAC."""
    return unquote_to_bytes(name.replace(b"+", b" ")).lower() in _SECRET_NAMES


def _redact(match: re.Match[bytes]) -> bytes:
    if not is_secret_name(match.group(2)):
        return match.group(0)
    return match.group(1) + match.group(2) + b"=<redacted>"


# Bytes: printable ASCII stays, every other byte is \xNN; the backslash and the
# double quote are escaped so that the escaping reads back unambiguously, and a
# quoted field of a log line ends where it seems to.
_BYTE_ESCAPES = {
    code: (
        chr(code)
        if 0x20 <= code < 0x7F and chr(code) not in '\\"'
        else "\\" + chr(code)
        if chr(code) in '\\"'
        else f"\\x{code:02x}"
    )
    for code in range(256)
}

_UNSAFE_BYTE = re.compile(rb"[^ !#-\[\]-~]")


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def escape(value: bytes | str | None, quote: bool = True) -> str:
    """
    C{value}, from a client, as one line of printable characters for a log.

    Bytes keep printable ASCII; every other byte becomes C{\\xNN} (C0 and C1
    controls, DEL, and the bytes of UTF-8 alike).  Text keeps printable
    characters; C0/C1 controls, DEL, line and paragraph separators and every
    other character Python does not call printable become C{\\xNN},
    C{\\uNNNN} or C{\\UNNNNNNNN}.  With C{quote} (the default) a backslash
    and a double quote are escaped too, so that an escaped value reads back
    unambiguously inside double quotes.  L{None} is C{"-"}.
    """
    if value is None:
        return "-"
    if isinstance(value, bytes | bytearray):
        if not _UNSAFE_BYTE.search(value):
            return value.decode("ascii")  # the common case, at a fraction of the cost
        return bytes(value).decode("latin-1").translate(_BYTE_ESCAPES)
    if value.isprintable() and (not quote or ("\\" not in value and '"' not in value)):
        return value
    return "".join(
        ("\\" + char if quote else char)
        if char in '\\"'
        else char
        if char.isprintable()
        else _escape_char(char)
        for char in value
    )


def censored_uri(uri: bytes) -> bytes:
    """C{uri} with the values of v, v2 and token replaced, not yet escaped."""
    # File names may hold "&v=" (mod_http_file_share sends them raw): only the query counts.
    path, mark, query = uri.partition(b"?")
    return path + _QUERY_PARAM.sub(_redact, mark + query)


def censor(uri: bytes | None) -> str:
    """
    A URI fit for a log: the values of v, v2 and token are replaced, the path
    is kept, and the whole is L{escape}d.
    """
    if not uri:
        return "-"
    return escape(censored_uri(uri))


# The last line of defence for "one entry, one printable line": whatever a log call passed
# unescaped (a client's path with NEL, CSI or U+2028 in it, a driver's message) is escaped
# where the line is written.  Newlines and tabs stay: tracebacks are ours.  Terminal
# controls (C0, DEL, C1), line and paragraph separators and the bidirectional overrides
# (which reorder what a reader sees) do not.
_UNPRINTABLE = {
    code: _escape_char(chr(code))
    for code in [
        *(c for c in range(0x20) if chr(c) not in "\n\t"),
        *range(0x7F, 0xA0),
        0x2028,
        0x2029,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    ]
}


def printable_line(event: dict) -> str | None:
    """The classic text line of C{event}, with every control character in it escaped."""
    text = formatEventAsClassicLogText(event)
    return None if text is None else text.translate(_UNPRINTABLE)


def _text_observer(out) -> ILogObserver:
    return FileLogObserver(out, printable_line)


def _file_observer(path: str, rotateOnSignal: bool = False) -> ILogObserver:
    # No size-based rotation: rotating is logrotate's job.
    logFile = LogFile.fromFullPath(path, rotateLength=None)
    if rotateOnSignal:
        # SIGUSR1 rotates, as twistd does for its own log file (left at its
        # default the signal would kill the daemon); SIGHUP reopens the file
        # after logrotate has moved it.
        _on_signal(signal.SIGUSR1, logFile.rotate)
        _on_signal(signal.SIGHUP, logFile.reopen)
    return _text_observer(logFile)


def _on_signal(signum: int, action: Callable[[], object]) -> None:
    if signal.getsignal(signum) not in (signal.SIG_DFL, None, 0):
        return  # somebody else's handler: leave it

    def handler(signum, frame):
        from twisted.internet import reactor
        from twisted.internet.interfaces import IReactorFromThreads

        # A signal handler runs between bytecodes of the reactor thread: hand the work over.
        IReactorFromThreads(reactor).callFromThread(action)

    signal.signal(signum, handler)


def twistd_sink(logfile: str | None, nodaemon: bool) -> Callable[[], ILogObserver]:
    """
    The observer twistd itself would have made for its --logfile and
    --nodaemon options (stdout in the foreground, twistd.log as a daemon).
    """

    def make() -> ILogObserver:
        if logfile == "-" or (nodaemon and not logfile):
            return _text_observer(sys.stdout)
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
    global _process_filter
    if _for_twistd is None:
        raise RuntimeError("hmacd.logs.for_twistd() was not called")
    level, log_file, default = _for_twistd
    observer = make_observer(level, log_file, default, rotateOnSignal=True)
    # twistd makes this the process's one observer: what it filters out reaches no log.
    _process_filter = LogLevelFilterPredicate(defaultLogLevel=LEVELS[level])
    _emits.clear()
    return observer


# The level filter of the process's own log when twistd runs hmacfs; None where a host (or
# a test) owns the observers, and any event may be wanted by one of them.
_process_filter: LogLevelFilterPredicate | None = None
_emits: dict[tuple[LogLevel, str], bool] = {}


def emits(level: LogLevel, namespace: str) -> bool:
    """
    Whether an event at C{level} in C{namespace} can reach a log.  False only
    when the process logs through L{twistd_observer} and its LogLevel drops
    such events: then a caller may skip building the event (the access log's
    escaping, per request) without anyone missing it.
    """
    if _process_filter is None:
        return True
    try:
        return _emits[level, namespace]
    except KeyError:
        event = {"log_level": level, "log_namespace": namespace}
        result = _emits[level, namespace] = _process_filter(event) != PredicateResult.no
        return result
