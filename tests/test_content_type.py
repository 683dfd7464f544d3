"""
Content-Type at the protocol level: one media type or 400, the MAC over the header as sent,
the normal form stored and served, the inline rule on the parsed type (issue 14 item 4).
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from hmacd import auth
from hmacd.core import is_inline_type
from hmacd.metadata import FileRecord
from tests.support import SECRET, MemoryServer, store_files, v2_query, v_query
from tests.test_upload import request_head, status

LIST = "image/png, text/html"


def response_headers(transport) -> dict[bytes, bytes]:
    """The header lines of the last response on the transport, names lowercased."""
    head = transport.value().rsplit(b"HTTP/1.1 ", 1)[1].split(b"\r\n\r\n", 1)[0]
    pairs = (line.split(b":", 1) for line in head.split(b"\r\n")[1:])
    return {name.strip().lower(): value.strip() for name, value in pairs}


class ContentTypeUploadTests(SynchronousTestCase):
    """A PUT's Content-Type is exactly one media type, for every protocol."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)
        self.server.clock.advance(1_800_000_000)

    def put(self, query: str, *headers: str, body: bytes = b"<p>hi</p>", path: str = "p.html"):
        channel, transport = self.server.connect()
        target = f"/upload/{path}?{query}" if query else f"/upload/{path}"
        channel.dataReceived(request_head("PUT", target, len(body), headers) + body)
        self.server.clock.advance(0)
        return status(transport)

    def get(self, path: str) -> dict[bytes, bytes]:
        channel, transport = self.server.connect()
        channel.dataReceived(request_head("GET", f"/upload/{path}"))
        self.assertEqual(status(transport), http.OK)
        return response_headers(transport)

    def test_list_refused_for_every_protocol(self):
        """'image/png, text/html' is 400 before the body, even where the MAC covers it."""
        token = auth.sign_jwt(
            SECRET, slot="s", filename="p.html", filesize=9, filetype=None, exp=1_800_000_300
        )
        cases = [
            (v_query("p.html", 9), ()),
            (v2_query("p.html", 9, LIST), ()),  # a MAC that verifies over the list
            ("token=" + auth.sign_token(SECRET, "p.html", 9, LIST), ()),
        ]
        for query, extra in cases:
            self.assertEqual(self.put(query, f"Content-Type: {LIST}", *extra), 400, query)
        code = self.put(
            "", f"Content-Type: {LIST}", f"Authorization: Bearer {token}", path="s/p.html"
        )
        self.assertEqual(code, http.BAD_REQUEST)
        self.assertEqual(store_files(self.root), [])

    def test_other_malformed_types_refused(self):
        """A bare word, a stray character or an unterminated quote is 400 too."""
        for value in ("html", "text/html;", "text/html x", 'text/html; a="b', "text/html;a"):
            expected = http.CREATED if value == "text/html;" else http.BAD_REQUEST
            path = f"m{len(value)}.bin"
            query = v2_query(path, 9, value)
            self.assertEqual(self.put(query, f"Content-Type: {value}", path=path), expected, value)

    def test_two_content_type_headers_refused(self):
        """Two Content-Type lines are a list as well."""
        code = self.put(v_query("p.html", 9), "Content-Type: image/png", "Content-Type: text/html")
        self.assertEqual(code, http.BAD_REQUEST)
        self.assertEqual(store_files(self.root), [])

    def test_mac_over_header_as_sent_normal_form_served(self):
        """v2 verifies over the raw header; GET serves the normal form, judged inline on it."""
        raw = "Text/HTML;Charset=UTF-8"
        self.assertEqual(self.put(v2_query("p.html", 9, raw), f"Content-Type: {raw}"), 201)
        record = self.successResultOf(self.server.fs.metadata.get("p.html"))
        self.assertEqual(record.content_type, "text/html; charset=UTF-8")
        headers = self.get("p.html")
        self.assertEqual(headers[b"content-type"], b"text/html; charset=UTF-8")
        self.assertTrue(headers[b"content-disposition"].startswith(b"attachment"))
        # The normal form would not have verified: the MAC is over the bytes sent.
        self.assertEqual(
            self.put(v2_query("q.png", 9, "image/png"), "Content-Type: IMAGE/PNG", path="q.png"),
            http.FORBIDDEN,
        )
        self.assertEqual(
            self.put(v2_query("q.png", 9, "IMAGE/PNG"), "Content-Type: IMAGE/PNG", path="q.png"),
            http.CREATED,
        )
        headers = self.get("q.png")
        self.assertEqual(headers[b"content-type"], b"image/png")
        self.assertNotIn(b"content-disposition", headers)

    def test_token_filetype_parsed(self):
        """A JWT's filetype is parsed too: a list is 400, an odd case is stored normalised."""
        for filetype, code in ((LIST, http.BAD_REQUEST), ("Image/PNG", http.CREATED)):
            token = auth.sign_jwt(
                SECRET, slot="s", filename="p.png", filesize=9, filetype=filetype,
                exp=1_800_000_300,
            )  # fmt: skip
            self.assertEqual(self.put("", f"Authorization: Bearer {token}", path="s/p.png"), code)
        record = self.successResultOf(self.server.fs.metadata.get("s/p.png"))
        self.assertEqual(record.content_type, "image/png")

    def test_unparsable_stored_type_served_as_octet_stream(self):
        """A record from before parsing with a list type: octet-stream, as an attachment."""
        os.makedirs(self.root, exist_ok=True)
        with open(os.path.join(self.root, "old.html"), "wb") as f:
            f.write(b"<p>hi</p>")
        record = FileRecord(
            path="old.html", size=9, content_type=LIST, sha256="0" * 64, created=0.0,
            protocol="v",
        )  # fmt: skip
        self.successResultOf(self.server.fs.metadata.put(record))
        headers = self.get("old.html")
        self.assertEqual(headers[b"content-type"], b"application/octet-stream")
        self.assertTrue(headers[b"content-disposition"].startswith(b"attachment"))


class InlineRuleTests(SynchronousTestCase):
    """is_inline_type decides on the parsed type alone."""

    def test_table(self):
        """Inline only for one image/video/audio type or text/plain; lists never."""
        for value, inline in [
            ("image/png", True),
            ("IMAGE/PNG", True),
            ("text/plain; charset=utf-8", True),
            ("audio/ogg", True),
            ("text/html", False),
            (LIST, False),
            ("image/png;, text/html", False),
            ("text/plain, text/html", False),
            ("image/png text/html", False),
            ("", False),
        ]:
            self.assertEqual(is_inline_type(value), inline, value)


class SlotTypeTests(SynchronousTestCase):
    """The XMPP component hands out slots only for types the PUT will be allowed to send."""

    def test_list_type_gets_no_slot(self):
        """A slot request for a type list (or padded type) is refused; one type is signed as is."""
        from hmacd.component import SlotRefused
        from tests.test_component import ALICE, issuer

        for value in (LIST, " image/png", "image/png;, text/html", "image/png x"):
            self.assertRaises(SlotRefused, issuer().issue, ALICE, "a.png", "10", value)
        slot = issuer().issue(ALICE, "a.png", "10", "Image/PNG; q=1")
        mac = auth.sign_v2(SECRET, "SLOT/a.png", 10, "Image/PNG; q=1")
        self.assertTrue(slot.put.endswith(f"?v2={mac}"))

    def test_size_digits(self):
        """The slot size is read by parse_decimal: non-ASCII digits and 21 digits refused."""
        from hmacd.component import SlotRefused
        from tests.test_component import ALICE, issuer

        for size in ("\u0661\u0662", "1" * 21, "+1", " 1", ""):
            self.assertRaises(SlotRefused, issuer(max_size=0).issue, ALICE, "a", size, None)
        self.assertEqual(issuer(max_size=0).issue(ALICE, "a", "0" * 20, None).get[-6:], "SLOT/a")
