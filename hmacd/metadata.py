"""
File records: what the metadata stores (L{hmacd.store}) keep for each file.

Every stored file gets a L{FileRecord}, written before its 201 goes out: GET
takes the Content-Type and the ETag from it.

The record's fields are spelled out here and nowhere else: a store turns a
record into its own shape with L{FileRecord.to_row} (SQL columns),
L{FileRecord.to_fields} (a JSON object) or L{FileRecord.to_strings} (a Redis
hash), and back with L{FileRecord.from_row} or L{FileRecord.from_fields}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

__all__ = ["RECORD_FIELDS", "FileRecord"]


@dataclass(frozen=True)
class FileRecord:
    """What we know about one stored file, written before its 201 goes out."""

    path: str
    size: int
    content_type: str
    sha256: str
    created: float
    protocol: str
    uploader: str | None = None
    expires: float | None = None

    @property
    def etag(self) -> bytes:
        """A strong validator: the content hash, computed while streaming."""
        return b'"' + self.sha256[:32].encode("ascii") + b'"'

    def to_row(self) -> tuple[Any, ...]:
        """Every field, path first, in L{RECORD_FIELDS} order; None where unset."""
        return _ROW(self)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> FileRecord:
        """The record whose fields C{row} holds in L{RECORD_FIELDS} order, taken as they are."""
        # Positional: the fields are declared in RECORD_FIELDS order (a GET may read this).
        return cls(*row)

    def to_fields(self) -> dict[str, int | float | str]:
        """Every field but the path (a store's key for the record), the unset ones left out."""
        values = {name: getattr(self, name) for name in RECORD_FIELDS[1:]}
        return {name: value for name, value in values.items() if value is not None}

    def to_strings(self) -> dict[str, str]:
        """L{to_fields} as text: floats as C{repr()}, which reads back bit for bit."""
        return {name: _TEXT[name](value) for name, value in self.to_fields().items()}

    @classmethod
    def from_fields(cls, path: str, values: Mapping[str, object]) -> FileRecord:
        """
        The record at C{path} from what L{to_fields} or L{to_strings} gave (values may be
        text); missing optional fields are unset.  KeyError, ValueError or TypeError when
        C{values} is not a record.
        """
        read = {name: _READ[name](values[name]) for name in _REQUIRED}
        for name in _OPTIONAL:
            value = values.get(name)
            read[name] = None if value is None else _READ[name](value)
        return cls(path=path, **read)


# path, size, content_type, sha256, created, protocol, uploader, expires.
RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(FileRecord))
_ROW: Callable[[FileRecord], tuple[Any, ...]] = attrgetter(*RECORD_FIELDS)
_OPTIONAL = ("uploader", "expires")
_REQUIRED = tuple(name for name in RECORD_FIELDS[1:] if name not in _OPTIONAL)


def _float_text(value: Any) -> str:
    return repr(float(value))


def _int_text(value: Any) -> str:
    return str(int(value))


_TEXT: dict[str, Callable[[Any], str]] = {
    "size": _int_text,
    "content_type": str,
    "sha256": str,
    "created": _float_text,
    "protocol": str,
    "uploader": str,
    "expires": _float_text,
}
_READ: dict[str, Callable[[Any], Any]] = {
    "size": int,
    "content_type": str,
    "sha256": str,
    "created": float,
    "protocol": str,
    "uploader": str,
    "expires": float,
}
