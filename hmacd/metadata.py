"""
File records, and the interim sidecar store that keeps them.

Every stored file gets a L{FileRecord}: GET takes the Content-Type and the
ETag from it.  Until the database-backed stores exist, records are small JSON
files under C{StoreDir/.hmacfs/meta/}, named by the SHA-256 of the path so
that a 255-byte file name still gives a valid sidecar name.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

from twisted.internet.defer import Deferred, fail, succeed

__all__ = ["FileRecord", "SidecarStore"]


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


class SidecarStore:
    """
    Records as JSON files under C{<root>/.hmacfs/meta/}.

    Synchronous underneath (a few hundred bytes per call), with the
    L{Deferred} interface the database stores will have.
    """

    def __init__(self, root: str) -> None:
        self._dir = os.path.join(root, ".hmacfs", "meta")

    def _file(self, path: str) -> str:
        digest = hashlib.sha256(path.encode("utf-8")).hexdigest()
        return os.path.join(self._dir, digest[:2], digest + ".json")

    def put(self, record: FileRecord) -> Deferred[None]:
        """Store C{record}, replacing any record for the same path."""
        target = self._file(record.path)
        try:
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            temp = f"{target}.{os.getpid()}.tmp"
            with open(temp, "w", encoding="utf-8") as f:
                json.dump(asdict(record), f)
            os.replace(temp, target)
        except OSError:
            return fail()
        return succeed(None)

    def get(self, path: str) -> Deferred[FileRecord | None]:
        """The record for C{path}, or L{None} if there is none."""
        try:
            with open(self._file(path), encoding="utf-8") as f:
                record = FileRecord(**json.load(f))
        except FileNotFoundError:
            return succeed(None)
        except (OSError, ValueError, TypeError):
            return fail()
        return succeed(record)

    def delete(self, path: str) -> Deferred[None]:
        """Forget the record for C{path}; no error if there is none."""
        try:
            os.unlink(self._file(path))
        except FileNotFoundError:
            pass
        except OSError:
            return fail()
        return succeed(None)
