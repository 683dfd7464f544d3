"""
Network addresses as typed values: one parser for every ``host:port`` key.

RedisAddr, FallbackDBHost and ComponentServer are all ``host:port`` (or ``host``) strings;
before this module each one was parsed in config.py to check it and again, a little
differently, by the store or the component that used it.  Now config.py checks a key with
L{HostPort.parse} and L{hmacd.config.Config} hands the parsed value to whoever connects.

No Twisted here: this is pure text, tested with tables and hypothesis.
"""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

__all__ = ["DEFAULT_DB_PORTS", "HostPort"]

# The port a database server listens on when FallbackDBHost names none.
DEFAULT_DB_PORTS = {"postgres": 5432, "mysql": 3306}

_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_BRACKETED_RE = re.compile(r"\[([^\]]*)\](?::(.*))?", re.DOTALL)
# ASCII digits only: int() would also read Arabic-Indic digits as a port.
_PORT_RE = re.compile(r"[0-9]{1,5}")


class HostPort(NamedTuple):
    """
    A host (name, IPv4 or IPv6 address, without brackets) and a port from 1 to 65535.

    A tuple, so that ``host, port = address`` and comparisons with ``(host, port)`` work
    wherever a pair was taken before; C{str()} gives it back as ``host:port`` with an IPv6
    address in brackets.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> HostPort:
        """
        ``host:port``, ``[v6]:port``, and, when C{default_port} is given, ``host``, ``[v6]``
        or a bare IPv6 address (which can carry no port).  A host is an IP address or a name
        of ASCII letters, digits, ``_``, ``-`` and dots; ValueError for anything else.
        """
        port_text: str | None
        if text.startswith("["):
            match = _BRACKETED_RE.fullmatch(text)
            if match is None:
                raise ValueError(f"bad bracketed IPv6 address in {text!r}")
            host, port_text = match.group(1), match.group(2)
            ipaddress.IPv6Address(host)  # ValueError when it is not one
        elif text.count(":") > 1:
            # Unbracketed IPv6: only a bare address, where no port can be meant.
            ipaddress.IPv6Address(text)
            host, port_text = text, None
        else:
            host, sep, rest = text.partition(":")
            if not _HOSTNAME_RE.fullmatch(host):
                raise ValueError(f"bad host in {text!r}")
            port_text = rest if sep else None
        if port_text is None:
            if default_port is None:
                raise ValueError(f"no port in {text!r}")
            return cls(host, default_port)
        if not _PORT_RE.fullmatch(port_text) or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"not a port from 1 to 65535 in {text!r}")
        return cls(host, int(port_text))
