"""
URL paths to store paths.

A request path is percent-decoded exactly once, as UTF-8, and then judged:
what survives is a relative path whose every segment is an ordinary name.
Prosody signs the raw file name (C{hello world.txt}) and sends it encoded
(C{hello%20world.txt}), so the decoded string is also what the MAC covers.
"""

from __future__ import annotations

import functools
import os
import stat
from urllib.parse import unquote_to_bytes

__all__ = [
    "MAX_SEGMENT_BYTES",
    "PathRefused",
    "locate",
    "relative_path",
    "resolved_root",
    "store_path",
]

# Linux NAME_MAX; a longer segment cannot be created, so refuse it up front
# rather than failing half-way through an upload.
MAX_SEGMENT_BYTES = 255
MAX_PATH_BYTES = 2048

_FORBIDDEN = frozenset(chr(c) for c in range(0x20)) | {"\x7f", "\\"}


class PathRefused(ValueError):
    """
    The path is under the upload prefix but names nothing we would store.

    C{str()} of it is a short reason that is safe to send to the client.
    """


def _prefix_bytes(prefix: str) -> bytes:
    prefix = prefix.strip("/")
    return b"/" + prefix.encode("utf-8") + b"/" if prefix else b"/"


def relative_path(raw_path: bytes, prefix: str) -> str | None:
    """
    The decoded store path of a request path, or L{None} when the request
    is not under C{/<prefix>/}.

    @param raw_path: the request path as sent, without the query string.
    @param prefix: the C{UploadSubDir}, without surrounding slashes.
    @raise PathRefused: the path is under the prefix but unsafe.
    """
    head = _prefix_bytes(prefix)
    if not raw_path.startswith(head):
        return None
    rest = raw_path[len(head) :]
    try:
        decoded = unquote_to_bytes(rest).decode("utf-8")
    except UnicodeDecodeError:
        raise PathRefused("path is not valid UTF-8") from None
    check_relative(decoded)
    return decoded


def check_relative(path: str) -> None:
    """
    Refuse a decoded relative path unless every segment is an ordinary name.

    @raise PathRefused: with the reason.
    """
    if not path:
        raise PathRefused("empty path")
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise PathRefused("path too long")
    for segment in path.split("/"):
        if not segment:
            raise PathRefused("empty path segment")
        if segment.startswith("."):
            # Covers "." and ".." too, and keeps our own dot files
            # (temp files, .hmacfs/) out of reach of any URL.
            raise PathRefused("path segment starts with '.'")
        if not _FORBIDDEN.isdisjoint(segment):
            raise PathRefused("control character or backslash in path")
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            raise PathRefused("path segment too long")


def store_path(root: str, relpath: str) -> str:
    """
    The absolute file name of C{relpath} under C{root}.

    C{relpath} must already have passed L{check_relative}; this adds the
    check that no symbolic link on the way leads out of C{root}, to C{root}
    itself, or to a dot name under it.

    Every upload and download asks this, so it does not resolve the whole
    name each time (C{os.path.realpath} costs an C{lstat} and a good deal of
    Python per component, root included): the root is resolved once per
    process, and the components under it are looked at one by one until the
    first that does not exist.  Only when one of them is a symbolic link is
    the whole name resolved and judged.

    @raise PathRefused: the path resolves outside C{root}, or to a name with
        a component starting with ".".
    """
    return locate(root, relpath)[0]


def locate(root: str, relpath: str) -> tuple[str, bool, int | None]:
    """
    L{store_path}, whether the name is taken (something is there already, or a component on
    the way is not a directory: nothing can be made under it), and how many of its leading
    directories exist: None when a link on the way makes that a question for the caller's
    own walk.

    The walk that looks for links answers all three: an upload asks before its body, and a
    separate C{lexists}, or the C{isdir} of each parent before making its directories,
    would walk the same components again.

    @raise PathRefused: as L{store_path}.
    """
    real_root = resolved_root(root)
    segments = relpath.split("/")
    target = os.path.join(real_root, *segments)
    current = real_root
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        current = os.path.join(current, segment)
        try:
            mode = os.lstat(current).st_mode
        except OSError:
            # Missing, or not searchable: nothing below it can be a link that we would
            # follow, nor a file in the way.
            return target, False, i
        if stat.S_ISLNK(mode):
            _judge_resolved(real_root, os.path.realpath(target))
            parent = os.path.dirname(target)
            under_a_file = os.path.lexists(parent) and not os.path.isdir(parent)
            return target, under_a_file or os.path.lexists(target), None
        if i < last and not stat.S_ISDIR(mode):
            return target, True, i  # a file on the way
    return target, True, last


def _judge_resolved(real_root: str, resolved: str) -> None:
    """
    Refuse a fully resolved name that is not an ordinary name under C{real_root}.

    The dot rule of L{check_relative} holds for where a link leads as well as for the
    URL: a link to C{.hmacfs/} (or to a temp file, or to any dot name) must not serve
    the metadata database or take an upload into our internals.
    """
    if os.path.commonpath([real_root, resolved]) != real_root or resolved == real_root:
        raise PathRefused("path leads outside the store")
    if any(part.startswith(".") for part in os.path.relpath(resolved, real_root).split(os.sep)):
        raise PathRefused("path leads to an internal name")


@functools.lru_cache(maxsize=32)
def resolved_root(root: str) -> str:
    """C{root} with its symbolic links resolved, once: it is the operator's StoreDir."""
    return os.path.realpath(root)
