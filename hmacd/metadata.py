"""
File records: what the metadata stores (L{hmacd.store}) keep for each file.

Every stored file gets a L{FileRecord}, written before its 201 goes out: GET
takes the Content-Type and the ETag from it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FileRecord"]


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
