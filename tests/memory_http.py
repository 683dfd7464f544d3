"""
One HTTP exchange with a L{MemoryServer}, bytes in and bytes out, for tests that look only
at statuses, headers and small bodies: no socket, no thread, no real time.

The request goes in exactly as given (no client-side normalisation of the target), as
C{http.client} with C{putrequest} would send it; the answer is read back from the
StringTransport, as a client would parse it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.support import MemoryServer

# Enough turns of the clock for every callLater(0) an answer waits on (group commit,
# the store's Deferreds); an answer still missing after them is a failure, not a wait.
_TURNS = 10


@dataclass
class Response:
    """A parsed HTTP/1.1 response: status, headers (lowercase names, last value), body."""

    code: int
    headers: dict[str, str]
    body: bytes


def request_bytes(
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    chunks: list[bytes] | None = None,
) -> bytes:
    """The bytes of one request; C{chunks} sends the body with chunked transfer coding."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if chunks is not None:
        lines.append("Transfer-Encoding: chunked")
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    elif method == "PUT" or body:
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("ascii") + b"\r\n\r\n" + body


def parse_response(data: bytes, method: str, closed: bool = False) -> Response | None:
    """
    The first final response in C{data}, or None while it is incomplete; C{closed}: the
    connection has been closed, which ends a body that has no length of its own.
    """
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return None
        statusLine, *lines = head.decode("latin-1").split("\r\n")
        code = int(statusLine.split(" ", 2)[1])
        if 100 <= code < 200:
            data = rest  # an interim answer (100 Continue): the final one follows
            continue
        break
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if method == "HEAD" or code in (204, 304):
        return Response(code, headers, b"")
    if "content-length" in headers:
        length = int(headers["content-length"])
        if len(rest) < length:
            return None
        return Response(code, headers, rest[:length])
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size, sep, rest = rest.partition(b"\r\n")
            if not sep:
                return None
            n = int(size.split(b";")[0], 16)
            if n == 0:
                return Response(code, headers, body)
            if len(rest) < n + 2:
                return None
            body, rest = body + rest[:n], rest[n + 2 :]
    return Response(code, headers, rest) if closed else None


def exchange(
    server: MemoryServer | Any,
    method: str,
    target: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    chunks: list[bytes] | None = None,
) -> Response:
    """
    Send one request on a fresh connection to C{server} and return its answer.

    C{server} is a L{MemoryServer}, or anything with its C{connect()} and C{clock}.

    @raise AssertionError: no complete answer came.
    """
    channel, transport = server.connect()
    channel.dataReceived(request_bytes(method, target, body, headers, chunks))
    for _ in range(_TURNS):
        response = parse_response(transport.value(), method)
        if response is not None:
            return response
        server.clock.advance(0)
    if transport.disconnecting:
        response = parse_response(transport.value(), method, closed=True)
        if response is not None:
            return response
    raise AssertionError(f"no complete answer to {method} {target}: {transport.value()!r}")
