"""
Tests for hmacd.verdict: every refusal of judge() and check_piece() is a row of a table, and
so is every accepted plan.  No Twisted, no disk: what the request says in, a verdict out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from hmacd import auth
from hmacd.verdict import Plan, Refusal, check_piece, judge, received_range

SECRET = b"verdict-secret"
NOW = 1_700_000_000.0


@dataclass
class Policy:
    """The configuration judge() reads."""

    secret: bytes = SECRET
    previous_secrets: tuple[bytes, ...] = ()
    prefix: str = "upload"
    upload_max_size: int = 0


def v(path: str, size: int) -> str:
    return "v=" + auth.sign_v(SECRET, path, size)


def v2(path: str, size: int, content_type: str | None) -> str:
    return "v2=" + auth.sign_v2(SECRET, path, size, content_type)


def bearer(path: str, size: int, filetype: str | None = "image/png", **claims: Any) -> str:
    slot, _, name = path.partition("/")
    fields: dict[str, Any] = dict(
        slot=slot, filename=name, filesize=size, filetype=filetype, exp=int(NOW) + 60
    )
    fields.update(claims)
    return "Bearer " + auth.sign_jwt(SECRET, **fields)


def run(
    path: str = "/upload/a/b.txt",
    query: str = "",
    length: int | None = 3,
    headers: dict[str, list[str]] | None = None,
    policy: Policy | None = None,
) -> Plan | Refusal:
    return judge(path.encode(), query.encode(), length, headers or {}, policy or Policy(), NOW)


class RefusalTests(SynchronousTestCase):
    """Each way a PUT is refused before its body, with its status and reason."""

    def test_table(self) -> None:
        """Every refusal of judge(): (arguments) -> (status, reason, headers)."""
        table: list[tuple[dict[str, Any], int, str, tuple]] = [
            (dict(path="/upload/a/../b"), 400, "", ()),
            (dict(path="/other/a.txt"), 404, "not an upload path", ()),
            (
                dict(headers={"content-type": ["text/plain", "text/html"]}),
                400,
                "more than one Content-Type",
                (),
            ),
            (
                dict(headers={"content-type": ["image/png, text/html"]}),
                400,
                "bad Content-Type: not exactly one media type",
                (),
            ),
            (
                dict(query=v("a/b.txt", 3), headers={"content-range": ["bytes 5-1/9"]}),
                400,
                "bad Content-Range",
                (),
            ),
            (
                dict(query=v("a/b.txt", 3), length=None),
                411,
                "Content-Length or X-Upload-Length (1 to 20 digits) required",
                (),
            ),
            (
                dict(query=v("a/b.txt", 3), length=None, headers={"x-upload-length": ["3x"]}),
                411,
                "Content-Length or X-Upload-Length (1 to 20 digits) required",
                (),
            ),
            (dict(query=v("a/b.txt", 4)), 403, "invalid MAC", ()),
            (
                dict(query=v2("a/b.txt", 3, "text/plain")),
                403,
                "invalid MAC",
                (),
            ),
            (
                dict(),
                401,
                "no MAC (v, v2, token) and no bearer token",
                ((b"WWW-Authenticate", b"Bearer"),),
            ),
            (dict(headers={"authorization": ["Bearer x.y.z"]}), 403, "", ()),
            (dict(headers={"authorization": [bearer("z/b.txt", 3)]}), 403, "", ()),
            (
                dict(
                    headers={
                        "authorization": [bearer("a/b.txt", 9)],
                        "content-range": ["bytes 0-2/8"],
                    }
                ),
                400,
                "total differs from the slot's 9",
                (),
            ),
            (
                dict(headers={"authorization": [bearer("a/b.txt", 2)]}),
                413,
                "Content-Length 3 differs from the slot's 2",
                (),
            ),
            (
                dict(headers={"authorization": [bearer("a/b.txt", 4)]}),
                400,
                "Content-Length 3 differs from the slot's 4",
                (),
            ),
            (
                dict(headers={"authorization": [bearer("a/b.txt", 3, filetype="a, b/c")]}),
                400,
                "bad filetype in token",
                (),
            ),
            (
                dict(query=v("a/b.txt", 3), policy=Policy(upload_max_size=2)),
                413,
                "larger than 2 bytes",
                (),
            ),
        ]
        for arguments, status, reason, headers in table:
            verdict = run(**arguments)
            self.assertIsInstance(verdict, Refusal, arguments)
            assert isinstance(verdict, Refusal)
            self.assertEqual(verdict.status, status, arguments)
            if reason:
                self.assertEqual(verdict.reason, reason, arguments)
            self.assertEqual(tuple(verdict.headers), headers, arguments)
            self.assertTrue(verdict.error, arguments)

    def test_piece_table(self) -> None:
        """Every refusal of check_piece(): a body that does not fit its range."""
        whole = Plan("a", "v", 9, "text/plain")
        query = Plan("a", "v", 9, "text/plain", span=(9,))
        piece = Plan("a", "v", 9, "text/plain", span=(2, 4, 9))
        table: list[tuple[Plan, int | None, tuple[int, str] | None]] = [
            (whole, 7, None),
            (query, 0, None),
            (query, None, None),
            (query, 1, (400, "an offset query has no body")),
            (piece, 3, None),
            (piece, None, None),
            (piece, 4, (400, "Content-Length must match Content-Range")),
        ]
        for plan, length, expected in table:
            refusal = check_piece(plan, length)
            got = None if refusal is None else (refusal.status, refusal.reason)
            self.assertEqual(got, expected, (plan.span, length))


class PlanTests(SynchronousTestCase):
    """What an accepted PUT is: path, protocol, signed size, served type, uploader, range."""

    def test_table(self) -> None:
        """Every kind of accepted upload: (arguments) -> the plan."""
        table: list[tuple[dict[str, Any], Plan]] = [
            (dict(query=v("a/b.txt", 3)), Plan("a/b.txt", "v", 3, "text/plain")),
            (
                dict(query=v("a/b.bin", 3), path="/upload/a/b.bin"),
                Plan("a/b.bin", "v", 3, "application/octet-stream"),
            ),
            (
                dict(
                    query=v2("a/b.txt", 3, "Text/Plain;Charset=UTF-8"),
                    headers={"content-type": ["Text/Plain;Charset=UTF-8"]},
                ),
                Plan("a/b.txt", "v2", 3, "text/plain; charset=UTF-8"),
            ),
            (
                dict(query=v2("a/b.txt", 3, None)),
                Plan("a/b.txt", "v2", 3, auth.DEFAULT_CONTENT_TYPE),
            ),
            (
                dict(query=v("a/b.txt", 3), length=None, headers={"x-upload-length": [" 3\t"]}),
                Plan("a/b.txt", "v", 3, "text/plain"),
            ),
            (
                dict(query=v("a/b.txt", 9), length=3, headers={"content-range": ["bytes 2-4/9"]}),
                Plan("a/b.txt", "v", 9, "text/plain", span=(2, 4, 9)),
            ),
            (
                dict(query=v("a/b.txt", 9), length=0, headers={"content-range": ["bytes */9"]}),
                Plan("a/b.txt", "v", 9, "text/plain", span=(9,)),
            ),
            (
                dict(
                    headers={"authorization": [bearer("a/b.txt", 3, sub="u@x", expires=99)]},
                ),
                Plan("a/b.txt", "jwt", 3, "image/png", uploader="u@x", expires=99),
            ),
            (
                dict(headers={"authorization": [bearer("a/b.txt", 3, filetype=None)]}),
                Plan("a/b.txt", "jwt", 3, "text/plain"),
            ),
            (
                dict(query=v("a/b.txt", 3), policy=Policy(upload_max_size=3)),
                Plan("a/b.txt", "v", 3, "text/plain"),
            ),
        ]
        for arguments, plan in table:
            self.assertEqual(run(**arguments), plan, arguments)

    def test_needed(self) -> None:
        """What a request will write: the whole size, a piece its range, an offset query 0."""
        self.assertEqual(Plan("a", "v", 9, "t").needed, 9)
        self.assertEqual(Plan("a", "v", 9, "t", span=(2, 4, 9)).needed, 3)
        self.assertEqual(Plan("a", "v", 9, "t", span=(9,)).needed, 0)

    def test_expired_token(self) -> None:
        """A token whose exp has passed, by the clock given, is refused."""
        token = bearer("a/b.txt", 3, exp=int(NOW) - 1)
        verdict = run(headers={"authorization": [token]})
        self.assertIsInstance(verdict, Refusal)
        assert isinstance(verdict, Refusal)
        self.assertEqual(verdict.status, 403)

    def test_received_range(self) -> None:
        """The Range header of an offset: none for 0, inclusive last byte otherwise."""
        self.assertEqual(received_range(0), [])
        self.assertEqual(received_range(5), [(b"Range", b"bytes=0-4")])
