"""
The converters of config values: each takes what TOML gave for one key and returns the
normalised value, or raises L{Invalid} with what is wrong (L{hmacd.config} adds the file and
the key).
"""

from __future__ import annotations

import encodings.idna
import ipaddress
import re
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

from hmacd.address import DEFAULT_DB_PORTS, HostPort
from hmacd.numbers import MAX_DIGITS
from hmacd.units import TOO_LARGE, parse_duration, parse_size

# ---------------------------------------------------------------------------------------------
# Parsing

NOTHING = object()


class Invalid(Exception):
    """A value its key cannot take: the reason, and the value to quote back (if any)."""

    def __init__(self, reason: str, got: object = NOTHING, *, wrong_type: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.got = got
        self.wrong_type = wrong_type


def wrong_type(expected: str, value: object) -> Invalid:
    return Invalid(f"must be {expected}", value, wrong_type=True)


def string(value: object) -> str:
    if not isinstance(value, str):
        raise wrong_type("a string", value)
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise wrong_type("a boolean (true or false)", value)
    return value


def nonnegative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type("an integer >= 0", value)
    if value < 0:
        raise Invalid("must be an integer >= 0", value)
    if value >= TOO_LARGE:
        raise Invalid(f"must be an integer of at most {MAX_DIGITS} digits", value)
    return value


MAX_WORKERS = 64


def workers(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type(f"an integer from 1 to {MAX_WORKERS}", value)
    if not 1 <= value <= MAX_WORKERS:
        raise Invalid(f"must be an integer from 1 to {MAX_WORKERS}", value)
    return value


def size(minimum: int) -> Callable[[object], int]:
    expected = f'a size >= {minimum} (bytes, or a string like "10GB")'

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise wrong_type(expected, value)
        try:
            size = parse_size(value)
        except ValueError:
            raise Invalid(f"must be {expected}", value) from None
        if size < minimum:
            raise Invalid(f"must be {expected}", value)
        return size

    return convert


def duration(value: object) -> int:
    expected = 'a duration >= 0 (seconds, or a string like "12h", "7d", "1y")'
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise wrong_type(expected, value)
    try:
        return parse_duration(value)
    except ValueError:
        raise Invalid(f"must be {expected}", value) from None


def positive_duration(value: object) -> int:
    # 0 would be a sweep that never waits; files past their expiry are not served anyway.
    expected = 'must be a duration >= 1 (seconds, or a string like "1m", "1h")'
    try:
        seconds = duration(value)
    except Invalid as problem:
        raise Invalid(expected, value, wrong_type=problem.wrong_type) from None
    if seconds < 1:
        raise Invalid(expected, value)
    return seconds


def positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise wrong_type("an integer >= 1", value)
    if value < 1:
        raise Invalid("must be an integer >= 1", value)
    return value


def networks(value: object) -> tuple[str, ...]:
    expected = 'a list of IP addresses or CIDR blocks, like ["127.0.0.1", "10.0.0.0/8"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise wrong_type(expected, value)
    for entry in value:
        try:
            ipaddress.ip_network(entry.strip(), strict=False)
        except ValueError:
            raise Invalid(f"must be {expected}; {entry!r} is not", value) from None
    return tuple(entry.strip() for entry in value)


def address(value: object) -> str:
    # An int is a port: "ListenPort = 8080" is as natural as ":8080".
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise wrong_type('a string like ":8080" (or a port number)', value)
    return str(value)


def secret(value: object) -> str:
    text = string(value)
    if not text:
        raise Invalid("must not be empty; leave it out to have one generated")
    return text


def previous_secrets(value: object) -> tuple[str, ...]:
    # Never shown back: Invalid without the value (config._invalid names its type only).
    expected = 'a list of non-empty strings, like ["old-secret"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise wrong_type(expected, value)
    if not all(value):
        raise Invalid(f"must be {expected}; an empty string verifies nothing")
    return tuple(value)


def store_dir(value: object) -> str:
    text = string(value)
    if not text or "\0" in text:
        raise Invalid("must be a directory path", value)
    return text


def upload_subdir(value: object) -> str:
    # The prefix is compared against URL paths segment by segment; "upload/" and "/upload"
    # mean the same prefix, and "." or ".." would let it point outside StoreDir.
    text = string(value).strip("/")
    if text:
        for segment in text.split("/"):
            if segment in ("", ".", "..") or "\\" in segment or "\0" in segment:
                raise Invalid(
                    'must be a relative path like "upload" without empty, ".", ".." segments,'
                    " backslashes or NUL",
                    value,
                )
    return text


def choice(names: Mapping[str, str], expected: str) -> Callable[[object], str]:
    """A converter for a case-insensitive name from C{names} (aliases map to one value)."""

    def convert(value: object) -> str:
        try:
            return names[string(value).lower()]
        except KeyError:
            raise Invalid(expected, value) from None

    return convert


log_level = choice(
    {"debug": "debug", "info": "info", "warn": "warn", "warning": "warn", "error": "error"},
    "must be one of debug, info, warn, error",
)
db_type = choice(
    {"postgres": "postgres", "postgresql": "postgres", "mysql": "mysql", "mariadb": "mysql"},
    'must be "postgres" or "mysql" (also "postgresql", "mariadb")',
)


def redis_addr(value: object) -> str:
    text = string(value)
    if text:
        try:
            HostPort.parse(text)
        except ValueError:
            raise Invalid(
                'must be "host:port" with a port from 1 to 65535 (e.g. "localhost:6379",'
                ' "[::1]:6379"), or "" for no Redis',
                value,
            ) from None
    return text


def db_host(value: object) -> str:
    text = string(value)
    try:
        HostPort.parse(text, DEFAULT_DB_PORTS["postgres"])
    except ValueError:
        raise Invalid(
            'must be "host" or "host:port" with a port from 1 to 65535 (e.g. "localhost:5432")',
            value,
        ) from None
    return text


# RFC 3491 nameprep with the STD3 ASCII rules, as twisted.words' JID parsing applies them:
# in a label only letters, digits, hyphens (not first or last) and non-ASCII characters.
_LABEL_PROHIBITED = re.compile(r"[\x00-\x2c\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f]")


def domain_name(text: str) -> str | None:
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


def domain_or_empty(value: object) -> str:
    text = string(value).strip()
    if not text:
        return ""
    domain = domain_name(text)
    if domain is None:
        raise Invalid(
            'must be a bare domain like "upload.example.org", or "" for no component', value
        )
    return domain


def domains(value: object) -> tuple[str, ...]:
    expected = 'a list of domains, like ["example.org", "chat.example.org"]'
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise wrong_type(expected, value)
    domains = []
    for entry in value:
        domain = domain_name(entry.strip())
        if domain is None:
            raise Invalid(f"must be {expected}; {entry!r} is not", value)
        domains.append(domain)
    return tuple(domains)


def component_secret(value: object) -> str:
    text = string(value)
    if text and not text.strip():
        raise Invalid('must not be blank; leave it "" when there is no component')
    return text


def component_server(value: object) -> str:
    text = string(value).strip()
    if text:
        try:
            HostPort.parse(text)
        except ValueError:
            raise Invalid(
                'must be "host:port" of the XMPP server\'s component port (e.g.'
                ' "localhost:5347"), or "" for no component',
                value,
            ) from None
    return text


component_protocol = choice(
    {"v": "v", "v1": "v", "v2": "v2", "token": "token", "jwt": "jwt"},
    'must be one of "v", "v2", "token", "jwt"',
)


def ping_timeout(value: object) -> int:
    # 0 would drop every link at its first ping; no pings at all is ComponentPingInterval = 0.
    seconds = duration(value)
    if seconds < 1:
        raise Invalid(
            'must be a duration >= 1 s (seconds, or a string like "30s", "1m"); to send no'
            " pings set ComponentPingInterval = 0",
            value,
        )
    return seconds


def public_url(value: object) -> str:
    text = string(value).strip()
    if not text:
        return ""
    problem = None
    try:
        parts = urlsplit(text)
    except ValueError:  # "http://[", "https://[x]/": brackets that hold no IPv6 address
        raise Invalid(
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
        raise Invalid(f'{problem}, like "https://files.example.org/upload/"', value)
    return text if text.endswith("/") else text + "/"
