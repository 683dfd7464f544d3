"""
Listen addresses as operators write them (``":8080"``, ``"127.0.0.1:8080"``, ``"[::]:5050"``,
a Twisted endpoint string or a Unix socket path), turned into endpoint strings.

Nothing here imports Twisted: the strings are checked against ``serverFromString`` in the
tests.
"""

from __future__ import annotations

import ipaddress
import re

from hmacd.units import show

# ---------------------------------------------------------------------------------------------
# Listen addresses

_ENDPOINT_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix", "systemd"})
_PORT_RE = re.compile(r"[0-9]{1,5}")
_LISTEN_FORMS = (
    '":8080" (all interfaces), "127.0.0.1:8080", "[::]:8080", "localhost:8080",'
    ' or a Twisted endpoint like "tcp:8080"'
)


def _escape_endpoint(text: str) -> str:
    """Quote a value for ``serverFromString``, which splits on ``:`` and ``=`` unless escaped."""
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def _port(text: str, original: object, *, allow_zero: bool = False) -> int:
    lowest = 0 if allow_zero else 1
    if not _PORT_RE.fullmatch(text) or not lowest <= int(text) <= 65535:
        raise ValueError(f"port must be a number from {lowest} to 65535, got {show(original)}")
    return int(text)


def _endpoint_arguments(description: str) -> tuple[list[str], dict[str, str]]:
    """Split an endpoint description the way ``serverFromString`` does: ``:`` separates
    arguments, the first ``=`` in one makes it a keyword, a backslash escapes either."""
    args: list[str] = []
    kwargs: dict[str, str] = {}
    key: str | None = None
    current = ""
    chars = iter(description)
    for char in chars:
        if char == "\\":
            current += next(chars, "")
        elif char == "=" and key is None:
            key, current = current, ""
        elif char == ":":
            if key is None:
                args.append(current)
            else:
                kwargs[key] = current
            key, current = None, ""
        else:
            current += char
    if key is None:
        args.append(current)
    else:
        kwargs[key] = current
    return args[1:], kwargs


def _check_endpoint(kind: str, description: str) -> None:
    args, kwargs = _endpoint_arguments(description)
    if kind in ("tcp", "tcp6", "ssl"):
        port = kwargs.get("port", args[0] if args else None)
        if port is None:
            raise ValueError(f"endpoint {show(description)} has no port")
        _port(port, description, allow_zero=True)
    elif kind == "unix" and not kwargs.get("address", args[0] if args else ""):
        raise ValueError(f"endpoint {show(description)} has no socket path")


def listen_endpoint(value: str | int, unix_socket: bool = False) -> str:
    """A ``serverFromString`` description for a Go-style listen address.

    Listening resolves no names: a hostname may stand for several addresses or change later,
    so only IP literals are taken, plus ``localhost`` as 127.0.0.1.  A value that already is a
    Twisted endpoint (tcp, tcp6, ssl, unix, systemd) passes through, which gives TLS and socket
    activation without new keys; port 0 is allowed only there, for tests.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"a listen address must be a string or a port number, got {value!r}")
    text = str(value)
    if unix_socket:
        if not text or "\0" in text:
            raise ValueError(f"must be a socket path when UnixSocket is true, got {show(value)}")
        return "unix:" + _escape_endpoint(text)

    kind, sep, _ = text.partition(":")
    if sep and kind.lower() in _ENDPOINT_TYPES:
        _check_endpoint(kind.lower(), text)
        # serverFromString only knows lower-case endpoint types.
        return kind.lower() + text[len(kind) :]

    if text.startswith("["):
        match = re.fullmatch(r"\[([^\]]*)\]:(.*)", text, re.DOTALL)
        if match is None:
            raise ValueError(
                f'a bracketed IPv6 address needs a port, like "[::1]:8080", got {show(value)}'
            )
        try:
            address = ipaddress.IPv6Address(match.group(1))
        except ValueError:
            raise ValueError(
                f"not an IPv6 address in brackets: {show(value)}; use one of {_LISTEN_FORMS}"
            ) from None
        port = _port(match.group(2), value)
        return f"tcp6:{port}:interface={_escape_endpoint(str(address))}"

    host, sep, port_text = text.rpartition(":")
    if not sep:
        if not _PORT_RE.fullmatch(text):
            raise ValueError(
                f"not a port or listen address, got {show(value)}; use one of {_LISTEN_FORMS}"
            )
        return f"tcp:{_port(text, value)}"
    if ":" in host:
        raise ValueError(
            f'an IPv6 address must be in brackets, like "[::1]:8080", got {show(value)}'
        )
    port = _port(port_text, value)
    if host == "":
        return f"tcp:{port}"
    if host.lower() == "localhost":
        return f"tcp:{port}:interface=127.0.0.1"
    try:
        ipv4 = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(
            f"cannot listen on a hostname, got {show(value)}; use one of {_LISTEN_FORMS}"
        ) from None
    return f"tcp:{port}:interface={ipv4}"
