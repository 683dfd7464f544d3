"""
The uploading half: streams a file to a signed URL with treq, whole or in
resumable Content-Range pieces, never holding more than one read in memory.
"""

from __future__ import annotations

import os

from tqdm import tqdm  # type: ignore[import-untyped]  # no types-tqdm in .[dev]
from treq.client import HTTPClient
from twisted.internet.error import ConnectError, ConnectionLost
from twisted.internet.task import deferLater
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
)

from hmacd.numbers import NotADecimal, parse_decimal

__all__ = ["UploadFailed", "Uploader"]

# The header mapping treq takes.
_Headers = dict[bytes | str, bytes | str]


class UploadFailed(Exception):
    """The server refused the upload, or could not be reached; the message says how."""


# What a dropped or refused connection looks like to a treq request.
_BROKEN = (
    ConnectError,
    ConnectionLost,
    ConnectionError,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
)


class _Slice:
    """
    A window of an open file, as a file for FileBodyProducer: it learns the
    length by seeking to the end, and reads in small blocks.
    """

    def __init__(self, path: str, offset: int, length: int, bar) -> None:
        self._file = open(path, "rb")
        self._file.seek(offset)
        self.offset, self.length, self.bar = offset, length, bar
        self.position = 0

    def seek(self, position: int, whence: int = 0) -> int:
        if whence == 2:
            position = self.length + position
        elif whence == 1:
            position = self.position + position
        self.position = max(0, min(position, self.length))
        self._file.seek(self.offset + self.position)
        return self.position

    def tell(self) -> int:
        return self.position

    def read(self, size: int = -1) -> bytes:
        left = self.length - self.position
        data = self._file.read(left if size < 0 else min(size, left))
        self.position += len(data)
        self.bar.update(len(data))
        return data

    def close(self) -> None:
        self._file.close()


def _held(response_headers) -> int:
    """The byte count a 308/416 answer's Range header says the server holds."""
    values = response_headers.getRawHeaders("range") or []
    if not values:
        return 0
    # Read like any other number from the network: a server is not trusted to send one.
    try:
        return parse_decimal(values[0].rsplit("-", 1)[-1].strip()) + 1
    except NotADecimal:
        raise UploadFailed(f"the server sent a malformed Range header: {values[0]!r:.80}") from None


class Uploader:
    def __init__(self, reactor, url: str, headers: dict[str, str], content_type: str | None):
        self.reactor = reactor
        self.url = url
        self.headers: _Headers = {name: value for name, value in headers.items()}
        if content_type:
            self.headers["Content-Type"] = content_type
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.http = HTTPClient(Agent(reactor, pool=self.pool))

    async def send(self, path: str, chunk: int, progress: bool, retries: int) -> None:
        size = os.path.getsize(path)
        bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress)
        try:
            if size <= chunk:
                await self._whole(path, size, bar, retries)
            else:
                await self._pieces(path, size, chunk, bar, retries)
        finally:
            bar.close()
            await self.pool.closeCachedConnections()

    async def _fail(self, response) -> None:
        body = (await response.content()).decode("utf-8", "replace").strip()
        phrase = response.phrase.decode("latin-1") if response.phrase else ""
        raise UploadFailed(f"{response.code} {phrase}: {body}".rstrip(": "))

    async def _wait(self, attempt: int, retries: int, error: Exception) -> None:
        if attempt > retries:
            raise UploadFailed(f"connection failed {attempt} times; last: {error}")
        await deferLater(self.reactor, min(2.0**attempt / 4, 30.0), lambda: None)

    async def _whole(self, path: str, size: int, bar, retries: int) -> None:
        attempt = 0
        while True:
            bar.reset(total=size)
            try:
                response = await self.http.put(
                    self.url,
                    data=FileBodyProducer(_Slice(path, 0, size, bar)),
                    headers=self.headers,
                    allow_redirects=False,
                )
            except _BROKEN as e:
                attempt += 1
                await self._wait(attempt, retries, e)
                continue
            if response.code == 201:
                await response.content()
                return
            await self._fail(response)

    async def _offset(self, size: int) -> int:
        headers: _Headers = {**self.headers, "Content-Range": f"bytes */{size}"}
        headers.pop("Content-Type", None)
        # 308 here is "Resume Incomplete", not a redirect to follow.
        response = await self.http.put(self.url, data=b"", headers=headers, allow_redirects=False)
        if response.code != 308:
            await self._fail(response)
        await response.content()
        return _held(response.headers)

    async def _pieces(self, path: str, size: int, chunk: int, bar, retries: int) -> None:
        attempt = 0
        while True:
            try:
                offset = await self._offset(size)
                break
            except _BROKEN as e:
                attempt += 1
                await self._wait(attempt, retries, e)
        bar.update(offset)
        while True:
            last = min(offset + chunk, size) - 1
            headers = {**self.headers, "Content-Range": f"bytes {offset}-{last}/{size}"}
            try:
                response = await self.http.put(
                    self.url,
                    data=FileBodyProducer(_Slice(path, offset, last - offset + 1, bar)),
                    headers=headers,
                    allow_redirects=False,
                )
            except _BROKEN as e:
                attempt += 1
                await self._wait(attempt, retries, e)
                try:
                    offset = await self._offset(size)
                except _BROKEN:
                    continue
                bar.reset(total=size)
                bar.update(offset)
                continue
            if response.code == 201:
                await response.content()
                return
            if response.code in (308, 416):
                # 416: a piece crossed with an earlier one that did land;
                # the server says where it stands either way.
                await response.content()
                offset = _held(response.headers)
                attempt = 0 if response.code == 308 else attempt
                continue
            await self._fail(response)
