"""L{S3Client}: the core (L{hmacd.s3.base.S3Base}) and multipart uploads."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from urllib.parse import quote, unquote_plus

from twisted.internet.defer import Deferred
from twisted.web.iweb import IBodyProducer, IResponse

from hmacd.s3.base import S3Base
from hmacd.s3.protocol import (
    _NS,
    MAX_PART_NUMBER,
    ListedPart,
    ListedUpload,
    S3Error,
    _header,
    _iso,
    _key,
    _parse_xml,
    _text,
)
from hmacd.s3.transfer import (
    _Deadline,
)


class S3Client(S3Base):
    """
    One bucket of an S3-compatible store (see L{S3Base}), with multipart uploads.
    """

    def copy_object(
        self,
        source: str,
        key: str,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        if_none_match: bool = False,
        source_if_match: str | None = None,
    ) -> Deferred[str]:
        """
        Copy the object C{source} to C{key} inside the bucket, with new type and metadata
        (REPLACE); fires with the new ETag.  With if_none_match an existing C{key} fails it
        with L{PreconditionFailed} (SeaweedFS honours it on a copy too), as does a source
        whose ETag is not C{source_if_match}.  S3 copies at most 5 GiB this way.
        """
        headers = self._object_headers(content_type, metadata, if_none_match)
        if source_if_match is not None:
            headers["x-amz-copy-source-if-match"] = source_if_match
        headers["x-amz-copy-source"] = "/" + quote(
            f"{self.bucket}/{self._full_key(source)}", safe="/-_.~"
        )
        headers["x-amz-metadata-directive"] = "REPLACE"
        d = self._request("PUT", key, headers=headers, body=b"")

        def parse(answer: tuple[IResponse, bytes | None, _Deadline]) -> str:
            # As CompleteMultipartUpload, a copy may answer 200 and fail in its body.
            body = answer[1] or b""
            root = _parse_xml(body)
            if root.tag in ("Error", _NS + "Error"):
                status = 500 if "Internal" in _text(root, "Code") else 400
                raise self._error(status, body, key)
            return _text(root, "ETag")

        return d.addCallback(parse)

    # Multipart.

    def create_multipart_upload(
        self,
        key: str,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred[str]:
        """Begin a multipart upload; fires with its upload id."""
        headers = self._object_headers(content_type, metadata, False)

        def parse(answer: tuple[IResponse, bytes | None, _Deadline]) -> str:
            upload_id = _text(_parse_xml(answer[1] or b""), "UploadId")
            if not upload_id:
                raise S3Error("the store began a multipart upload without an UploadId")
            return upload_id

        d = self._request("POST", key, query={"uploads": ""}, headers=headers, body=b"")
        return d.addCallback(parse)

    def upload_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        body: bytes | IBodyProducer,
        length: int | None = None,
        payload_sha256: str | None = None,
    ) -> Deferred[str]:
        """Send one part (1..10000, each but the last at least 5 MiB); fires with its ETag."""
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise ValueError(f"part number {part_number} outside 1..{MAX_PART_NUMBER}")
        self._check_length(body, length)
        query = {"partNumber": str(part_number), "uploadId": upload_id}
        d = self._request("PUT", key, query=query, body=body, payload_sha256=payload_sha256)

        def etag(answer: tuple[IResponse, bytes | None, _Deadline]) -> str:
            value = _header(answer[0].headers, "etag")
            if not value:
                raise S3Error(f"the store took part {part_number} without an ETag")
            return value

        return d.addCallback(etag)

    def complete_multipart_upload(
        self,
        key: str,
        upload_id: str,
        parts: Iterable[tuple[int, str]],
        if_none_match: bool = False,
    ) -> Deferred[str]:
        """
        Join the parts (number, ETag) into the object; fires with its ETag.
        S3 may answer 200 and still fail (the error is in the body): that
        is an error here too.
        """
        root = ET.Element("CompleteMultipartUpload", xmlns=_NS[1:-1])
        for number, etag in sorted(parts):
            part = ET.SubElement(root, "Part")
            ET.SubElement(part, "PartNumber").text = str(number)
            ET.SubElement(part, "ETag").text = etag
        xml = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        headers = {"Content-Type": "application/xml"}
        if if_none_match:
            headers["If-None-Match"] = "*"
        d = self._request("POST", key, query={"uploadId": upload_id}, headers=headers, body=xml)

        def parse(answer: tuple[IResponse, bytes | None, _Deadline]) -> str:
            body = answer[1]
            root = _parse_xml(body or b"")
            if root.tag in ("Error", _NS + "Error"):
                status = 500 if "Internal" in _text(root, "Code") else 400
                raise self._error(status, body or b"", key)
            return _text(root, "ETag")

        return d.addCallback(parse)

    def abort_multipart_upload(self, key: str, upload_id: str) -> Deferred[None]:
        """Throw the parts away; L{NoSuchUpload} if it is already gone."""
        d = self._request("DELETE", key, query={"uploadId": upload_id})
        return d.addCallback(lambda _: None)

    def list_multipart_uploads(self, prefix: str = "") -> Deferred[list[ListedUpload]]:
        """Every multipart upload in progress under prefix, with when it began."""
        found: list[ListedUpload] = []

        def page(_: object, key_marker: str, id_marker: str) -> Deferred[list[ListedUpload]]:
            query = {"uploads": "", "prefix": self.prefix + prefix, "encoding-type": "url"}
            if key_marker:
                query["key-marker"] = key_marker
                query["upload-id-marker"] = id_marker

            def parse(answer: tuple[IResponse, bytes | None, _Deadline]):
                root = _parse_xml(answer[1] or b"")
                encoded = _text(root, "EncodingType") == "url"
                for u in root.iter(_NS + "Upload"):
                    found.append(
                        ListedUpload(
                            key=self._strip(_key(u, encoded)),
                            upload_id=_text(u, "UploadId"),
                            initiated=_iso(_text(u, "Initiated")),
                        )
                    )
                next_key = _text(root, "NextKeyMarker")
                if encoded:
                    next_key = unquote_plus(next_key)
                if _text(root, "IsTruncated") == "true" and next_key:
                    return page(None, next_key, _text(root, "NextUploadIdMarker"))
                return found

            return self._request("GET", query=query).addCallback(parse)

        return page(None, "", "")

    def list_parts(self, key: str, upload_id: str) -> Deferred[list[ListedPart]]:
        """The parts the store holds for a multipart upload, in order."""
        found: list[ListedPart] = []

        def page(marker: str) -> Deferred[list[ListedPart]]:
            query = {"uploadId": upload_id}
            if marker:
                query["part-number-marker"] = marker

            def parse(answer: tuple[IResponse, bytes | None, _Deadline]):
                root = _parse_xml(answer[1] or b"")
                for p in root.iter(_NS + "Part"):
                    found.append(
                        ListedPart(
                            number=int(_text(p, "PartNumber")),
                            etag=_text(p, "ETag"),
                            size=int(_text(p, "Size") or 0),
                        )
                    )
                following = _text(root, "NextPartNumberMarker")
                if _text(root, "IsTruncated") == "true" and following:
                    return page(following)
                return found

            return self._request("GET", key, query=query).addCallback(parse)

        return page("")
