"""hmacfs configuration: a TOML file read into a frozen :class:`Config`.

The key names are the Go HMAC File Server's, so its config files work unchanged, and they match
case-insensitively because prosody-filer configs spell the same keys ``listenport`` or
``storeDir``.  Everything a user can get wrong becomes a :class:`ConfigError` whose text is one
line naming the file and the key, so the service can print it and exit before anything listens.

Nothing here imports Twisted: the endpoint strings are only built here and are checked against
``serverFromString`` in the tests.
"""

from __future__ import annotations

import datetime
import difflib
import encodings.idna
import ipaddress
import json
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from hmacd.address import DEFAULT_DB_PORTS, HostPort
from hmacd.numbers import MAX_DIGITS, NotADecimal, parse_decimal

__all__ = [
    "KEYS",
    "KEY_DOCS",
    "SECRET_FIELDS",
    "Config",
    "ConfigError",
    "listen_endpoint",
    "load_config",
    "parse_config",
    "parse_size",
]


class ConfigError(Exception):
    """A configuration the user has to fix; ``str(e)`` is one line meant for them.

    The line names the file and, when there is one, the key, e.g.
    ``etc/config.toml: UploadMaxSize: must be a size >= 0 (bytes, or a string like "10GB"),
    got -5``;
    a TOML syntax error carries TOML's own message with line and column, an unreadable file the
    OS reason.  ``source`` and ``key`` are kept apart too, for callers that want them.
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.key = key


# ---------------------------------------------------------------------------------------------
# Sizes

_BINARY_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?[ \t]*([A-Za-z]*)")
# TOML integers are arbitrary-precision to tomllib; one of more digits than hmacd.numbers
# reads anywhere else is a typo, not a size or a duration.
_TOO_LARGE = 10**MAX_DIGITS


def _bounded(value: int, what: str) -> int:
    if value < 0:
        raise ValueError(f"{what} cannot be negative, got {value}")
    if value >= _TOO_LARGE:
        raise ValueError(f"{what} must have at most {MAX_DIGITS} digits")
    return value


def parse_size(value: int | str) -> int:
    """A byte count from an int or a string like ``"10MB"``, ``"1.5GB"``, ``"2TiB"``.

    Every multiple is binary (KB = KiB = 1024) because that is what the Go HMAC File Server
    means by them, and the seed config's 10737418240 is its "10GB".  A fraction needs a unit
    and is rounded down to whole bytes.  ``bool`` is refused although it is an ``int``:
    ``UploadMaxSize = true`` is a mistake, not one byte.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        # ValueError, not TypeError: callers catch one exception for any bad user value.
        raise ValueError(f'a size must be an integer or a string like "10MB", got {value!r}')
    if isinstance(value, int):
        return _bounded(value, "a size")
    # Only spaces and tabs around it: str.strip() would also take Unicode spaces.
    match = _SIZE_RE.fullmatch(value.strip(" \t"))
    unit = match.group(3).lower() if match else None
    if match is None or unit not in _BINARY_UNITS:
        raise ValueError(
            f"not a size: {value!r} (use bytes, or a number with K, KB, KiB, M, MB, MiB, G, GB,"
            " GiB, T, TB or TiB)"
        )
    whole, fraction = match.group(1), match.group(2)
    if fraction is not None and _BINARY_UNITS[unit] == 1:
        raise ValueError(f'not a size: {value!r} (a fraction of a byte needs a unit, e.g. "1.5GB")')
    try:
        number = Fraction(parse_decimal(whole))
        if fraction is not None:
            number += Fraction(parse_decimal(fraction), 10 ** len(fraction))
    except NotADecimal as e:
        raise ValueError(f"not a size: {value!r} ({e})") from None
    return int(number * _BINARY_UNITS[unit])


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
# ASCII letters spelt out: with re.IGNORECASE, "s" also matches U+017F LATIN SMALL LETTER
# LONG S, which lower() keeps as it is.
_DURATION_PART = r"([0-9]+)[ \t]*([smhdwySMHDWY])"
_DURATION_RE = re.compile(_DURATION_PART)
_DURATION_WHOLE = re.compile(rf"(?:{_DURATION_PART}[ \t]*)+")


def parse_duration(value: int | str) -> int:
    """Seconds from an int or a string like ``"7d"``, ``"12h"``, ``"1h30m"``, ``"1y"``.

    The units are those of the Go HMAC File Server's FileTTL: s, m, h, d, w and y (365 days).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f'a duration must be seconds or a string like "7d", got {value!r}')
    if isinstance(value, int):
        return _bounded(value, "a duration")
    text = value.strip(" \t")
    try:
        if _DURATION_WHOLE.fullmatch(text) is None:
            return parse_decimal(text)
        total = sum(
            parse_decimal(n) * _DURATION_UNITS[u.lower()] for n, u in _DURATION_RE.findall(text)
        )
    except NotADecimal:
        raise ValueError(
            f"not a duration: {value!r} (use seconds of at most {MAX_DIGITS} digits, or e.g."
            ' "30m", "12h", "7d", "1y")'
        ) from None
    return total


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
        raise ValueError(f"port must be a number from {lowest} to 65535, got {_show(original)}")
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
            raise ValueError(f"endpoint {_show(description)} has no port")
        _port(port, description, allow_zero=True)
    elif kind == "unix" and not kwargs.get("address", args[0] if args else ""):
        raise ValueError(f"endpoint {_show(description)} has no socket path")


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
            raise ValueError(f"must be a socket path when UnixSocket is true, got {_show(value)}")
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
                f'a bracketed IPv6 address needs a port, like "[::1]:8080", got {_show(value)}'
            )
        try:
            address = ipaddress.IPv6Address(match.group(1))
        except ValueError:
            raise ValueError(
                f"not an IPv6 address in brackets: {_show(value)}; use one of {_LISTEN_FORMS}"
            ) from None
        port = _port(match.group(2), value)
        return f"tcp6:{port}:interface={_escape_endpoint(str(address))}"

    host, sep, port_text = text.rpartition(":")
    if not sep:
        if not _PORT_RE.fullmatch(text):
            raise ValueError(
                f"not a port or listen address, got {_show(value)}; use one of {_LISTEN_FORMS}"
            )
        return f"tcp:{_port(text, value)}"
    if ":" in host:
        raise ValueError(
            f'an IPv6 address must be in brackets, like "[::1]:8080", got {_show(value)}'
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
            f"cannot listen on a hostname, got {_show(value)}; use one of {_LISTEN_FORMS}"
        ) from None
    return f"tcp:{port}:interface={ipv4}"


# ---------------------------------------------------------------------------------------------
# Parsing

_NOTHING = object()


class _Invalid(Exception):
    """A value its key cannot take: the reason, and the value to quote back (if any)."""

    def __init__(self, reason: str, got: object = _NOTHING, *, wrong_type: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.got = got
        self.wrong_type = wrong_type


def _toml_type(value: object) -> str:
    """The TOML name of a parsed value's type: the user wrote TOML, not Python."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, datetime.datetime):
        return "datetime"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def _show(value: object) -> str:
    """A value as TOML would spell it, on one short line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if len(value) > 80:
            return json.dumps(value[:77], ensure_ascii=False)[:-1] + '..."'
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return _toml_type(value)


def _show_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)


def _wrong_type(expected: str, value: object) -> _Invalid:
    return _Invalid(f"must be {expected}", value, wrong_type=True)


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _wrong_type("a string", value)
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _wrong_type("a boolean (true or false)", value)
    return value


def _nonnegative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type("an integer >= 0", value)
    if value < 0:
        raise _Invalid("must be an integer >= 0", value)
    if value >= _TOO_LARGE:
        raise _Invalid(f"must be an integer of at most {MAX_DIGITS} digits", value)
    return value


MAX_WORKERS = 64


def _workers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type(f"an integer from 1 to {MAX_WORKERS}", value)
    if not 1 <= value <= MAX_WORKERS:
        raise _Invalid(f"must be an integer from 1 to {MAX_WORKERS}", value)
    return value


def _size(minimum: int) -> Callable[[object], int]:
    expected = f'a size >= {minimum} (bytes, or a string like "10GB")'

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise _wrong_type(expected, value)
        try:
            size = parse_size(value)
        except ValueError:
            raise _Invalid(f"must be {expected}", value) from None
        if size < minimum:
            raise _Invalid(f"must be {expected}", value)
        return size

    return convert


def _duration(value: object) -> int:
    expected = 'a duration >= 0 (seconds, or a string like "12h", "7d", "1y")'
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _wrong_type(expected, value)
    try:
        return parse_duration(value)
    except ValueError:
        raise _Invalid(f"must be {expected}", value) from None


def _positive_duration(value: object) -> int:
    # 0 would be a sweep that never waits; files past their expiry are not served anyway.
    expected = 'must be a duration >= 1 (seconds, or a string like "1m", "1h")'
    try:
        seconds = _duration(value)
    except _Invalid as problem:
        raise _Invalid(expected, value, wrong_type=problem.wrong_type) from None
    if seconds < 1:
        raise _Invalid(expected, value)
    return seconds


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong_type("an integer >= 1", value)
    if value < 1:
        raise _Invalid("must be an integer >= 1", value)
    return value


def _networks(value: object) -> tuple[str, ...]:
    expected = 'a list of IP addresses or CIDR blocks, like ["127.0.0.1", "10.0.0.0/8"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong_type(expected, value)
    for entry in value:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise _Invalid(f"must be {expected}; {entry!r} is not", value) from None
    return tuple(entry.strip() for entry in value)


def _address(value: object) -> str:
    # An int is a port: "ListenPort = 8080" is as natural as ":8080".
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _wrong_type('a string like ":8080" (or a port number)', value)
    return str(value)


def _secret(value: object) -> str:
    text = _string(value)
    if not text:
        raise _Invalid("must not be empty; leave it out to have one generated")
    return text


def _store_dir(value: object) -> str:
    text = _string(value)
    if not text or "\0" in text:
        raise _Invalid("must be a directory path", value)
    return text


def _upload_subdir(value: object) -> str:
    # The prefix is compared against URL paths segment by segment; "upload/" and "/upload"
    # mean the same prefix, and "." or ".." would let it point outside StoreDir.
    text = _string(value).strip("/")
    if text:
        for segment in text.split("/"):
            if segment in ("", ".", "..") or "\\" in segment or "\0" in segment:
                raise _Invalid(
                    'must be a relative path like "upload" without empty, ".", ".." segments,'
                    " backslashes or NUL",
                    value,
                )
    return text


def _choice(names: Mapping[str, str], expected: str) -> Callable[[object], str]:
    """A converter for a case-insensitive name from C{names} (aliases map to one value)."""

    def convert(value: object) -> str:
        try:
            return names[_string(value).lower()]
        except KeyError:
            raise _Invalid(expected, value) from None

    return convert


_log_level = _choice(
    {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"},
    "must be one of debug, info, warn, error",
)
_db_type = _choice(
    {"postgres": "postgres", "postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"},
    'must be "postgres" or "mysql" (also "postgresql", "mariadb")',
)


def _redis_addr(value: object) -> str:
    text = _string(value)
    if text:
        try:
            HostPort.parse(text)
        except ValueError:
            raise _Invalid(
                'must be "host:port" with a port from 1 to 65535 (e.g. "localhost:6379",'
                ' "[::1]:6379"), or "" for no Redis',
                value,
            ) from None
    return text


def _db_host(value: object) -> str:
    text = _string(value)
    try:
        HostPort.parse(text, DEFAULT_DB_PORTS["postgres"])
    except ValueError:
        raise _Invalid(
            'must be "host" or "host:port" with a port from 1 to 65535 (e.g. "localhost:5432")',
            value,
        ) from None
    return text


# RFC 3491 nameprep with the STD3 ASCII rules, as twisted.words' JID parsing applies them:
# in a label only letters, digits, hyphens (not first or last) and non-ASCII characters.
_LABEL_PROHIBITED = re.compile(r"[\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]")


def _domain(text: str) -> str | None:
    """The normalised form of a bare XMPP domain (``Upload.Example.org`` ->
    ``upload.example.org``, ``straße.example`` -> ``strasse.example``), or None when it is not
    one: a localpart, resource, port, wildcard, empty label or forbidden character."""
    labels = []
    for label in text.split("."):
        try:
            label = encodings.idna.nameprep(label)
        except UnicodeError:
            return None
        if not label or _LABEL_PROHIBITED.search(label) or label[0] == "-" or label[-1] == "-":
            return None
        labels.append(label)
    domain = ".".join(labels)
    return domain if len(domain.encode("utf-8")) <= 1023 else None


def _domain_or_empty(value: object) -> str:
    text = _string(value).strip()
    if not text:
        return ""
    domain = _domain(text)
    if domain is None:
        raise _Invalid(
            'must be a bare domain like "upload.example.org", or "" for no component', value
        )
    return domain


def _domains(value: object) -> tuple[str, ...]:
    expected = 'a list of domains, like ["example.org", "chat.example.org"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _wrong_type(expected, value)
    domains = []
    for entry in value:
        domain = _domain(entry.strip())
        if domain is None:
            raise _Invalid(f"must be {expected}; {entry!r} is not", value)
        domains.append(domain)
    return tuple(domains)


def _component_secret(value: object) -> str:
    text = _string(value)
    if text and not text.strip():
        raise _Invalid('must not be blank; leave it "" when there is no component')
    return text


def _component_server(value: object) -> str:
    text = _string(value).strip()
    if text:
        try:
            HostPort.parse(text)
        except ValueError:
            raise _Invalid(
                'must be "host:port" of the XMPP server\'s component port (e.g.'
                ' "localhost:5347"), or "" for no component',
                value,
            ) from None
    return text


_component_protocol = _choice(
    {"v": "v", "v1": "v", "v2": "v2", "token": "token", "jwt": "jwt"},
    'must be one of "v", "v2", "token", "jwt"',
)


def _ping_timeout(value: object) -> int:
    # 0 would drop every link at its first ping; no pings at all is ComponentPingInterval = 0.
    seconds = _duration(value)
    if seconds < 1:
        raise _Invalid(
            'must be a duration >= 1 s (seconds, or a string like "30s", "1m"); to send no'
            " pings set ComponentPingInterval = 0",
            value,
        )
    return seconds


def _public_url(value: object) -> str:
    text = _string(value).strip()
    if not text:
        return ""
    problem = None
    try:
        parts = urlsplit(text)
    except ValueError:  # "http://[", "https://[x]/": brackets that hold no IPv6 address
        raise _Invalid(
            'must be the http(s) URL of the upload space, like "https://files.example.org/upload/"',
            value,
        ) from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problem = "must be the http(s) URL of the upload space"
    elif parts.query or parts.fragment or text.endswith(("?", "#")):
        problem = "must have no query or fragment"
    elif "@" in parts.netloc:
        problem = "must have no user or password"
    elif any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        problem = "must have no spaces or control characters (percent-encode them)"
    else:
        try:
            port = parts.port  # ValueError when out of range
        except ValueError:
            port = 0
        if port == 0:
            problem = "must have a port from 1 to 65535"
    if problem is not None:
        raise _Invalid(f'{problem}, like "https://files.example.org/upload/"', value)
    return text if text.endswith("/") else text + "/"


# ---------------------------------------------------------------------------------------------
# The table

# A key is one line here: its Go-style name, default, converter and a one-line meaning, kept
# in the field's metadata.  KEYS, the converters parse_config runs, SECRET_FIELDS, the key list
# of etc/config.toml and README's table (both checked by tests/test_config.py) all come from it.


def _key(
    name: str,
    default: Any,
    convert: Callable[[object], object],
    doc: str,
    *,
    secret: bool = False,
) -> Any:
    """A Config field read from the TOML key C{name} through C{convert}."""
    metadata = {"key": name, "convert": convert, "doc": doc, "secret": secret}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, repr=False)
class Config:
    """Every setting hmacfs reads, already validated and normalised by :func:`parse_config`.

    Frozen so that one object can be handed to every service without anyone changing it under
    the others; the defaults are what an empty file means.
    """

    listen_port: str = _key(
        "ListenPort",
        "127.0.0.1:8080",
        _address,
        '``":8080"``, ``"127.0.0.1:8080"``, ``"[::]:5050"``, or a Twisted endpoint'
        " (``tcp:8080``, ``ssl:8443:...``, ``unix:/run/hmacfs.sock``)",
    )
    unix_socket: bool = _key("UnixSocket", False, _boolean, "``ListenPort`` is a Unix socket path")
    secret: str | None = _key(
        "Secret", None, _secret, "shared secret (see Quick start)", secret=True
    )
    store_dir: str = _key("StoreDir", "./uploads", _store_dir, "where files are kept")
    upload_subdir: str = _key(
        "UploadSubDir", "upload", _upload_subdir, "URL prefix of the upload space"
    )
    log_level: str = _key(
        "LogLevel", "info", _log_level, "``debug``, ``info``, ``warn``, ``error``"
    )
    log_file: str = _key("LogFile", "", _string, "file to log to")
    redis_addr: str = _key("RedisAddr", "", _redis_addr, "metadata in Redis (``host:port``)")
    redis_password: str = _key("RedisPassword", "", _string, "Redis password", secret=True)
    redis_db: int = _key("RedisDB", 0, _nonnegative_int, "Redis database number")
    fallback_enabled: bool = _key(
        "FallbackEnabled", False, _boolean, "SQL store (fallback of Redis, or the store)"
    )
    fallback_db_type: str = _key(
        "FallbackDBType", "postgres", _db_type, "``postgres`` or ``mysql``"
    )
    fallback_db_host: str = _key(
        "FallbackDBHost", "localhost", _db_host, "``host`` or ``host:port``"
    )
    fallback_db_user: str = _key("FallbackDBUser", "", _string, "SQL user name")
    fallback_db_password: str = _key("FallbackDBPassword", "", _string, "SQL password", secret=True)
    fallback_db_name: str = _key("FallbackDBName", "", _string, "required with ``FallbackEnabled``")
    metrics_enabled: bool = _key(
        "MetricsEnabled", False, _boolean, "Prometheus metrics at ``/metrics``"
    )
    metrics_port: str = _key(
        "MetricsPort", "127.0.0.1:9090", _address, "same forms as ``ListenPort``"
    )
    chunk_size: int = _key(
        "ChunkSize", 1048576, _size(1), "write buffer of each upload, at most 64 KiB used"
    )
    upload_max_size: int = _key("UploadMaxSize", 0, _size(0), "413 above this")
    min_free_space: int = _key(
        "MinFreeSpace",
        67108864,
        _size(0),
        "space kept free: 507, before the body, for an upload whose declared size does not"
        " fit in the rest",
    )
    max_bytes_per_second: int = _key(
        "MaxBytesPerSecond",
        0,
        _size(0),
        "bandwidth cap of each upload (the transport is paused)",
    )
    max_total_bytes_per_second: int = _key(
        "MaxTotalBytesPerSecond", 0, _size(0), "bandwidth cap shared by all uploads"
    )
    file_ttl: int = _key("FileTTL", 0, _duration, "how long uploads are kept")
    resumable_ttl: int = _key(
        "ResumableTTL", 86400, _duration, "seconds an unfinished resumable upload is kept"
    )
    expiry_interval: int = _key(
        "ExpiryInterval",
        60,
        _positive_duration,
        "seconds between expiry sweeps (at least 1)",
    )
    expiry_batch: int = _key(
        "ExpiryBatch", 200, _positive_int, "records an expiry sweep deletes per batch"
    )
    gc_interval: int = _key(
        "GCInterval", 30, _duration, "seconds between ``gc.collect()`` (0: off)"
    )
    monitor_interval: int = _key(
        "MonitorInterval", 10, _duration, "seconds between status lines (0: off)"
    )
    shutdown_grace: int = _key(
        "ShutdownGrace", 30, _duration, "seconds uploads may finish in at shutdown"
    )
    workers: int = _key("Workers", 1, _workers, "processes serving the upload port (see below)")
    rate_limit_per_minute: int = _key(
        "RateLimitPerMinute",
        0,
        _nonnegative_int,
        "requests per minute per client address (429 past it)",
    )
    rate_limit_burst: int = _key(
        "RateLimitBurst", 0, _nonnegative_int, "requests a client may make at once"
    )
    trusted_proxies: tuple[str, ...] = _key(
        "TrustedProxies",
        (),
        _networks,
        "proxies whose ``X-Forwarded-For`` names the client",
    )
    header_timeout: int = _key(
        "HeaderTimeout",
        20,
        _duration,
        "seconds a request head may take (408 past it; 0: off)",
    )
    max_connections_per_client: int = _key(
        "MaxConnectionsPerClient",
        100,
        _nonnegative_int,
        "connections per client address (0: no cap)",
    )
    min_upload_bytes_per_second: int = _key(
        "MinUploadBytesPerSecond",
        0,
        _size(0),
        "slowest upload body kept, averaged over the window",
    )
    min_upload_rate_window: int = _key(
        "MinUploadRateWindow",
        30,
        _duration,
        "seconds ``MinUploadBytesPerSecond`` is averaged over",
    )
    # The XEP-0363 slot component (XEP-0114), on when ComponentJID is set.
    component_jid: str = _key(
        "ComponentJID",
        "",
        _domain_or_empty,
        "the XMPP slot component's JID (turns it on)",
    )
    component_secret: str = _key(
        "ComponentSecret",
        "",
        _component_secret,
        "its component password on the XMPP server",
        secret=True,
    )
    component_server: str = _key(
        "ComponentServer",
        "",
        _component_server,
        "``host:port`` of the server's component listener",
    )
    component_allowed_domains: tuple[str, ...] = _key(
        "ComponentAllowedDomains",
        (),  # () = the domain ComponentJID is under
        _domains,
        "domains whose users may ask for slots",
    )
    component_protocol: str = _key(
        "ComponentProtocol",
        "v2",
        _component_protocol,
        "how its slots are signed: ``v``, ``v2``, ``token``, ``jwt``",
    )
    # A link that stops answering is noticed within interval + timeout seconds (README says 30).
    component_ping_interval: int = _key(
        "ComponentPingInterval",
        15,
        _duration,
        "seconds between its keepalive pings (0: none)",
    )
    component_ping_timeout: int = _key(
        "ComponentPingTimeout",
        15,
        _ping_timeout,
        "seconds a ping may go unanswered before it reconnects",
    )
    public_url: str = _key(
        "PublicURL",
        "",
        _public_url,
        "the upload space as clients reach it, for its slots",
    )
    source: str | None = None

    # The listeners too are read once: parse_config checks them by reading them.

    @cached_property
    def listen_endpoint(self) -> str:
        """The upload listener as a ``serverFromString`` description, so tap.py need not know
        the Go server's address syntax."""
        return listen_endpoint(self.listen_port, self.unix_socket)

    @cached_property
    def metrics_endpoint(self) -> str:
        """The Prometheus listener; ``UnixSocket`` only ever applies to the upload listener."""
        return listen_endpoint(self.metrics_port)

    @property
    def upload_domains(self) -> tuple[str, ...]:
        """Whose users the slot component serves: ComponentAllowedDomains, or else the domain
        the component is under (``upload.example.org`` serves ``example.org``)."""
        if self.component_allowed_domains:
            return self.component_allowed_domains
        return (self.component_jid.partition(".")[2],) if self.component_jid else ()

    # The host:port keys, parsed by the one parser that checked them.  Cached: a Config is
    # frozen, so each is parsed at most once, and not at all when nothing connects there.

    @cached_property
    def redis_address(self) -> HostPort | None:
        """RedisAddr as a HostPort, or None when there is no Redis."""
        return HostPort.parse(self.redis_addr) if self.redis_addr else None

    @cached_property
    def fallback_db_address(self) -> HostPort:
        """FallbackDBHost as a HostPort, with FallbackDBType's usual port when it names none."""
        return HostPort.parse(self.fallback_db_host, DEFAULT_DB_PORTS[self.fallback_db_type])

    @cached_property
    def component_address(self) -> HostPort:
        """ComponentServer as a HostPort (a (host, port) tuple; IPv6 without brackets)."""
        return HostPort.parse(self.component_server.strip())

    @property
    def secret_bytes(self) -> bytes | None:
        """The HMAC key: Prosody and ejabberd key their MACs with the UTF-8 bytes of the secret."""
        return None if self.secret is None else self.secret.encode("utf-8")

    def __repr__(self) -> str:
        # A Config gets logged at startup: show that a secret is set, never what it is.
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = "'***'" if f.name in SECRET_FIELDS and value else repr(value)
            parts.append(f"{f.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


# What the rest of this module (and hmacfs) reads off the table.
_TABLE = tuple(f for f in fields(Config) if "key" in f.metadata)
KEYS: dict[str, str] = {f.metadata["key"]: f.name for f in _TABLE}
KEY_DOCS: dict[str, str] = {f.metadata["key"]: f.metadata["doc"] for f in _TABLE}
_CONVERTERS: dict[str, Callable[[object], object]] = {
    f.metadata["key"]: f.metadata["convert"] for f in _TABLE
}
# Fields whose values must never reach a log line, a traceback or an error message.
SECRET_FIELDS = frozenset(f.name for f in _TABLE if f.metadata["secret"])
_CANONICAL = {key.lower(): key for key in KEYS}


def _error(source: str, key: str | None, reason: str) -> ConfigError:
    if key is None:
        return ConfigError(f"{source}: {reason}", source=source)
    return ConfigError(f"{source}: {_show_key(key)}: {reason}", source=source, key=key)


def _invalid(source: str, key: str, canonical: str, problem: _Invalid) -> ConfigError:
    reason = problem.reason
    if problem.got is not _NOTHING:
        if KEYS[canonical] in SECRET_FIELDS:
            # Even a mistyped secret is a secret: name the type only.
            reason += f", got {_toml_type(problem.got)}"
        elif problem.wrong_type and isinstance(problem.got, (list, Mapping)):
            reason += f", got {_toml_type(problem.got)}"
        elif problem.wrong_type:
            reason += f", got {_toml_type(problem.got)} {_show(problem.got)}"
        else:
            reason += f", got {_show(problem.got)}"
    return _error(source, key, reason)


def _unknown(source: str, key: str, value: object) -> ConfigError:
    if isinstance(value, Mapping):
        return _error(
            source,
            key,
            f"unknown table [{_show_key(key)}]: hmacfs reads only top-level keys"
            ' (like "ListenPort" and "StoreDir")',
        )
    close = difflib.get_close_matches(key.lower(), list(_CANONICAL), n=1, cutoff=0.6)
    hint = f'; did you mean "{_CANONICAL[close[0]]}"?' if close else ""
    return _error(source, key, f"unknown key{hint}")


def parse_config(data: Mapping[str, object], source: str) -> Config:
    """A validated Config from an already-parsed TOML mapping; ConfigError on the first problem.

    Unknown keys are errors rather than ignored because a misspelt ``UploadMaxSize`` would
    otherwise silently mean "unlimited".
    """
    values: dict[str, object] = {}
    spelled: dict[str, str] = {}
    for key, raw in data.items():
        key = str(key)
        canonical = _CANONICAL.get(key.lower())
        if canonical is None:
            raise _unknown(source, key, raw)
        if canonical in spelled:
            raise _error(
                source,
                key,
                f'same key as "{spelled[canonical]}" (key names are case-insensitive);'
                " keep one of them",
            )
        spelled[canonical] = key
        try:
            values[KEYS[canonical]] = _CONVERTERS[canonical](raw)
        except _Invalid as problem:
            raise _invalid(source, key, canonical, problem) from None

    config = Config(**values, source=source)  # type: ignore[arg-type]

    def name(canonical: str) -> str:
        return spelled.get(canonical, canonical)

    if config.unix_socket and "ListenPort" not in spelled:
        raise _error(
            source,
            "ListenPort",
            "must be set to the socket path when UnixSocket is true",
        )
    checks: tuple[tuple[str, Callable[[], str]], ...] = (
        ("ListenPort", lambda: config.listen_endpoint),
        ("MetricsPort", lambda: config.metrics_endpoint),
    )
    for canonical, endpoint in checks:
        try:
            endpoint()
        except ValueError as e:
            raise _error(source, name(canonical), str(e)) from None
    component = ("ComponentJID", "ComponentSecret", "ComponentServer", "PublicURL")
    if any(getattr(config, KEYS[key]) for key in (*component, "ComponentAllowedDomains")):
        for canonical in component:
            if not getattr(config, KEYS[canonical]):
                raise _error(
                    source,
                    name(canonical),
                    "must be set for the XMPP component (" + ", ".join(component) + " go together)",
                )
        if not config.component_allowed_domains and "." not in config.component_jid:
            raise _error(
                source,
                name("ComponentAllowedDomains"),
                f"must list the domains whose users may upload: ComponentJID"
                f" {config.component_jid!r} is not under one",
            )
    if config.workers > 1:
        if config.listen_endpoint.partition(":")[0] not in ("tcp", "tcp6"):
            # A worker adopts the bare socket: TLS would reach it as plain HTTP, and a
            # worker stopping would unlink a unix socket's path from under the others.
            raise _error(
                source,
                name("ListenPort"),
                "Workers above 1 need a plain TCP listener (no UnixSocket, ssl: or systemd:)",
            )
        # Their counters live in each process: N workers would let N times the limit through.
        for canonical in ("RateLimitPerMinute", "MaxTotalBytesPerSecond"):
            if getattr(config, KEYS[canonical]):
                raise _error(
                    source,
                    name(canonical),
                    "cannot be enforced across processes: use it with Workers = 1",
                )
    if config.min_upload_bytes_per_second and not config.min_upload_rate_window:
        # A floor judged over no time at all would cut every upload at its first byte.
        raise _error(
            source,
            name("MinUploadRateWindow"),
            "must be at least 1 second when MinUploadBytesPerSecond is set",
        )
    if config.fallback_enabled and not config.fallback_db_name:
        raise _error(source, name("FallbackDBName"), "must be set when FallbackEnabled is true")
    return config


def _long_number_at(text: str) -> str:
    """Where the first run of digits too long for int() is, as " (line N)", or ""."""
    match = re.search(r"[0-9_]{4301,}", text)
    return f" (line {text.count(chr(10), 0, match.start()) + 1})" if match else ""


def load_config(path: str) -> Config:
    """Read and validate the TOML file at ``path``; every failure is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _error(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        # utf-8-sig: editors on Windows like to start the file with a BOM.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _error(path, None, f"not valid UTF-8 (byte {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _error(path, None, f"TOML syntax error: {e}") from None
    except ValueError:
        # tomllib converts integers with int(), which raises past 4,300 digits.
        raise _error(path, None, f"TOML integer too long to read{_long_number_at(text)}") from None
    except RecursionError:
        raise _error(path, None, "TOML arrays or tables nested too deeply") from None
    return parse_config(data, path)
