"""
Tests for hmacd.paths: request path -> decoded relative path -> file name under the store root.

The decoded path is both what the MAC covers and what lands on disk, so it must be decoded
exactly once, as UTF-8, and every segment must be an ordinary name.
"""

from __future__ import annotations

import os
from urllib.parse import quote, unquote

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hmacd.paths import (
    MAX_PATH_BYTES,
    MAX_SEGMENT_BYTES,
    PathRefused,
    check_relative,
    relative_path,
    store_path,
)

PREFIX = "upload"

# (raw request path, UploadSubDir, decoded relative path or None when not under the prefix)
ACCEPTED: list[tuple[bytes, str, str | None]] = [
    (b"/upload/a/b.txt", PREFIX, "a/b.txt"),
    (b"/upload/a.txt", PREFIX, "a.txt"),
    (b"/upload/hello%20world.txt", PREFIX, "hello world.txt"),
    (b"/upload/h%c3%a4llo", PREFIX, "h\u00e4llo"),
    (b"/upload/h%C3%A4llo", PREFIX, "h\u00e4llo"),
    (b"/upload/h%C3%a4llo", PREFIX, "h\u00e4llo"),
    (b"/upload/h\xc3\xa4llo", PREFIX, "h\u00e4llo"),
    (b"/upload/%e6%97%a5%e6%9c%ac.png", PREFIX, "\u65e5\u672c.png"),
    (b"/upload/a+b.txt", PREFIX, "a+b.txt"),
    (b"/upload/a%2Bb.txt", PREFIX, "a+b.txt"),
    (b"/upload/a%2bb.txt", PREFIX, "a+b.txt"),
    (b"/upload/100%25.txt", PREFIX, "100%.txt"),
    # Decoded exactly once: %25 is "%", and what follows it is ordinary text.
    (b"/upload/%252e%252e", PREFIX, "%2e%2e"),
    (b"/upload/a/%252e%252e/b", PREFIX, "a/%2e%2e/b"),
    (b"/upload/%252F", PREFIX, "%2F"),
    # Not an escape: left alone, as urllib.parse.unquote (the signer's view) does.
    (b"/upload/a%zz", PREFIX, "a%zz"),
    (b"/upload/50%", PREFIX, "50%"),
    # Dots that do not lead a segment are ordinary.
    (b"/upload/a..b", PREFIX, "a..b"),
    (b"/upload/a./b.", PREFIX, "a./b."),
    # Real slots (tests/vectors/xmpp-slots.json): Prosody v1/v2, mod_http_file_share, ejabberd.
    (
        b"/upload/5fa167cb-419c-4437-84ee-5c77927d6fa4/"
        b"h%c3%a4llo%20w%c3%b6rld%20%e6%97%a5%e6%9c%ac.png",
        PREFIX,
        "5fa167cb-419c-4437-84ee-5c77927d6fa4/h\u00e4llo w\u00f6rld \u65e5\u672c.png",
    ),
    (
        b"/upload/53484898-fcd3-4b7d-ba71-b9974aa32318/a%2bb%3dc%26d%25e.bin",
        PREFIX,
        "53484898-fcd3-4b7d-ba71-b9974aa32318/a+b=c&d%e.bin",
    ),
    (
        b"/upload/7ND65Atew5Akzs9kqfveIi9u/a+b=c&d%25e.bin",
        PREFIX,
        "7ND65Atew5Akzs9kqfveIi9u/a+b=c&d%e.bin",
    ),
    (
        b"/upload/9637f279e87dc3aba7eb582ceceaa621fa695865/"
        b"d4Ix8rqkmowrD1dCjQVYuAtNzedjtkutSlxRveqT/h%C3%A4llo_w%C3%B6rld_%E6%97%A5%E6%9C%AC.png",
        PREFIX,
        "9637f279e87dc3aba7eb582ceceaa621fa695865/"
        "d4Ix8rqkmowrD1dCjQVYuAtNzedjtkutSlxRveqT/h\u00e4llo_w\u00f6rld_\u65e5\u672c.png",
    ),
    # The prefix: empty means everything under "/"; surrounding slashes do not matter.
    (b"/a/b.txt", "", "a/b.txt"),
    (b"/upload/a", "", "upload/a"),
    (b"/a", "/", "a"),
    (b"/upload/a", "/upload/", "a"),
    (b"/files/upload/a", "files/upload", "a"),
    (b"/h%c3%a4/a", "h\u00e4", None),
    (b"/h\xc3\xa4/a", "h\u00e4", "a"),
    # Not under the prefix at all.
    (b"/uploadX/a", PREFIX, None),
    (b"/upload", PREFIX, None),
    (b"/uploads/a", PREFIX, None),
    (b"/Upload/a", PREFIX, None),
    (b"/other/upload/a", PREFIX, None),
    (b"upload/a", PREFIX, None),
    (b"", PREFIX, None),
    (b"/", PREFIX, None),
    (b"/files/a", "files/upload", None),
]

# (the raw path after "/upload/", a fragment of the reason given)
REFUSED: list[tuple[bytes, str]] = [
    (b"", "empty path"),
    (b"..", "starts with '.'"),
    (b".", "starts with '.'"),
    (b"../etc/passwd", "starts with '.'"),
    (b"a/../b", "starts with '.'"),
    (b"a/..", "starts with '.'"),
    (b"a/./b", "starts with '.'"),
    (b"%2e%2e", "starts with '.'"),
    (b"%2E%2e", "starts with '.'"),
    (b"%2e%2E/x", "starts with '.'"),
    (b"%2e", "starts with '.'"),
    (b".%2e", "starts with '.'"),
    (b"a/%2e%2e/b", "starts with '.'"),
    # An encoded slash is a slash once decoded, and its segments are judged like any other.
    (b"a%2f..%2fb", "starts with '.'"),
    (b"a%2F..%2Fb", "starts with '.'"),
    (b"..%2fetc", "starts with '.'"),
    (b".hmacfs/secret", "starts with '.'"),
    (b"%2ehmacfs/secret", "starts with '.'"),
    (b"a/.hidden", "starts with '.'"),
    (b".hidden", "starts with '.'"),
    (b"...", "starts with '.'"),
    (b"a//b", "empty path segment"),
    (b"a/", "empty path segment"),
    (b"/a", "empty path segment"),
    (b"a%2f%2fb", "empty path segment"),
    (b"a/%2f", "empty path segment"),
    (b"a%00b", "control character"),
    (b"a\x00b", "control character"),
    (b"a%0ab", "control character"),
    (b"a%0Db", "control character"),
    (b"a%09b", "control character"),
    (b"a%1fb", "control character"),
    (b"a%7fb", "control character"),
    (b"a%7Fb", "control character"),
    (b"a\nb", "control character"),
    (b"a\\b", "backslash"),
    (b"a%5cb", "backslash"),
    (b"a%5Cb", "backslash"),
    (b"..%5c..%5cetc", "starts with '.'"),
    (b"a%5c..%5cb", "backslash"),
    (b"%ff", "UTF-8"),
    (b"a%c3", "UTF-8"),
    (b"%c3", "UTF-8"),
    (b"%c3/b", "UTF-8"),
    (b"\xff", "UTF-8"),
    (b"h\xc3", "UTF-8"),
    # A surrogate and an overlong "..": neither is UTF-8.
    (b"%ed%a0%80", "UTF-8"),
    (b"%c0%ae%c0%ae", "UTF-8"),
    (b"a" * (MAX_SEGMENT_BYTES + 1), "segment too long"),
    (b"x/" + b"a" * (MAX_SEGMENT_BYTES + 1), "segment too long"),
    (b"%c3%a4" * 128, "segment too long"),
    (b"/".join([b"a" * 200] * 11), "path too long"),
    (b"/".join([b"a" * 99] * 20) + b"/" + b"b" * 49, "path too long"),
]


def is_acceptable(path: str) -> bool:
    """Whether check_relative lets this decoded path through."""
    try:
        check_relative(path)
    except PathRefused:
        return False
    return True


def inside(root: str, path: str) -> bool:
    """Whether path (resolved) names something strictly below the real root."""
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(path)
    return resolved != real_root and os.path.commonpath([real_root, resolved]) == real_root


class RelativePathTests(SynchronousTestCase):
    """relative_path: which request paths are ours, and what they decode to."""

    def test_accepted(self) -> None:
        """Each accepted path decodes to exactly the expected relative path (or None)."""
        for raw, prefix, expected in ACCEPTED:
            self.assertEqual(relative_path(raw, prefix), expected, (raw, prefix))

    def test_decoding_is_unquote(self) -> None:
        """For ASCII request paths the result is urllib.parse.unquote's, which signers undo."""
        for raw, prefix, expected in ACCEPTED:
            if expected is None or not raw.isascii():
                continue
            head = "/" + prefix.strip("/") + "/" if prefix.strip("/") else "/"
            self.assertEqual(expected, unquote(raw.decode("ascii")[len(head) :]), raw)

    def test_bare_prefix_not_ours(self) -> None:
        """The bare prefix is not under "/upload/"; "/upload/" is, and names nothing."""
        self.assertIsNone(relative_path(b"/upload", PREFIX))
        exc = self.assertRaises(PathRefused, relative_path, b"/upload/", PREFIX)
        self.assertEqual(str(exc), "empty path")

    def test_refused(self) -> None:
        """Each unsafe path under the prefix is refused, for the expected reason."""
        for rest, reason in REFUSED:
            raw = b"/upload/" + rest
            try:
                result = relative_path(raw, PREFIX)
            except PathRefused as e:
                self.assertIn(reason, str(e), raw)
            else:
                self.fail(f"{raw!r} accepted as {result!r}")

    def test_refused_under_empty_prefix(self) -> None:
        """With no prefix the same paths are refused directly under "/"."""
        for rest, _ in REFUSED:
            self.assertRaises(PathRefused, relative_path, b"/" + rest, "")

    def test_refusal_is_a_value_error(self) -> None:
        """PathRefused is a ValueError whose text is a short reason fit for the client."""
        exc = self.assertRaises(PathRefused, relative_path, b"/upload/%2e%2e", PREFIX)
        self.assertIsInstance(exc, ValueError)
        self.assertNotIn("%2e", str(exc))

    def test_segment_length_limit(self) -> None:
        """A segment of 255 bytes is accepted (also in two-byte characters); 256 is not."""
        name = "a" * MAX_SEGMENT_BYTES
        self.assertEqual(relative_path(b"/upload/x/" + name.encode(), PREFIX), "x/" + name)
        wide = "\u00e4" * 127 + "a"
        self.assertEqual(len(wide.encode("utf-8")), MAX_SEGMENT_BYTES)
        self.assertEqual(relative_path(b"/upload/" + quote(wide).encode(), PREFIX), wide)
        self.assertRaises(
            PathRefused, relative_path, b"/upload/" + quote(wide + "a").encode(), PREFIX
        )

    def test_path_length_limit(self) -> None:
        """A decoded path of exactly 2048 bytes is accepted; one more byte is not."""
        path = "/".join(["a" * 99] * 20) + "/" + "b" * 48
        self.assertEqual(len(path.encode("utf-8")), MAX_PATH_BYTES)
        self.assertEqual(relative_path(b"/upload/" + path.encode(), PREFIX), path)
        self.assertRaises(PathRefused, relative_path, b"/upload/" + path.encode() + b"b", PREFIX)

    def test_length_counts_decoded_bytes(self) -> None:
        """The limits apply to the decoded UTF-8 bytes, not to the longer encoded request path."""
        encoded = b"%61" * MAX_SEGMENT_BYTES
        self.assertEqual(relative_path(b"/upload/" + encoded, PREFIX), "a" * MAX_SEGMENT_BYTES)


class CheckRelativeTests(SynchronousTestCase):
    """check_relative on already-decoded paths."""

    def test_decoded_table(self) -> None:
        """The same rules hold for a path that is already decoded."""
        for path in ("", "..", ".", "a/../b", ".x", "a//b", "a/", "a\0b", "a\\b", "a\x7fb"):
            self.assertRaises(PathRefused, check_relative, path)
        for path in ("a", "a/b/c", "%2e%2e", "h\u00e4llo w\u00f6rld.png", "a+b=c&d%e.bin"):
            self.assertIsNone(check_relative(path))


class StorePathTests(SynchronousTestCase):
    """store_path: the file name under the root, and no way out of it through a symlink."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.outside = os.path.abspath(self.mktemp())
        os.makedirs(self.outside)

    def test_joins_under_root(self) -> None:
        """The result is the relative path joined under the root, whether or not it exists yet."""
        real_root = os.path.realpath(self.root)
        self.assertEqual(store_path(self.root, "a.txt"), os.path.join(real_root, "a.txt"))
        self.assertEqual(
            store_path(self.root, "a/b/h\u00e4llo.txt"),
            os.path.join(real_root, "a", "b", "h\u00e4llo.txt"),
        )
        self.assertTrue(inside(self.root, store_path(self.root, "x/y/z")))

    def test_symlink_out_of_root(self) -> None:
        """A directory symlink inside the root that points outside it refuses paths through it."""
        os.symlink(self.outside, os.path.join(self.root, "escape"))
        for relpath in ("escape/file.txt", "escape/new/file.txt", "escape"):
            self.assertRaises(PathRefused, store_path, self.root, relpath)

    def test_relative_symlink_out_of_root(self) -> None:
        """A relative symlink climbing out with ".." is refused the same way."""
        os.makedirs(os.path.join(self.root, "a"))
        os.symlink(os.path.join("..", ".."), os.path.join(self.root, "a", "up"))
        self.assertRaises(PathRefused, store_path, self.root, "a/up/file.txt")

    def test_file_symlink_out_of_root(self) -> None:
        """A file symlink to a file outside the root, or to nothing outside it, is refused."""
        secret = os.path.join(self.outside, "secret")
        with open(secret, "w") as f:
            f.write("x")
        os.symlink(secret, os.path.join(self.root, "link"))
        os.symlink(os.path.join(self.outside, "missing"), os.path.join(self.root, "dangling"))
        self.assertRaises(PathRefused, store_path, self.root, "link")
        self.assertRaises(PathRefused, store_path, self.root, "dangling")

    def test_symlink_to_root_itself(self) -> None:
        """A symlink resolving to the root itself does not name a file."""
        os.symlink(self.root, os.path.join(self.root, "self"))
        self.assertRaises(PathRefused, store_path, self.root, "self")
        self.assertTrue(inside(self.root, store_path(self.root, "self/a.txt")))

    def test_symlink_within_root(self) -> None:
        """A symlink that stays inside the root is followed like a directory."""
        os.makedirs(os.path.join(self.root, "real"))
        os.symlink(os.path.join(self.root, "real"), os.path.join(self.root, "alias"))
        os.symlink("real", os.path.join(self.root, "relalias"))
        for relpath in ("alias/file.txt", "relalias/file.txt", "alias"):
            self.assertTrue(inside(self.root, store_path(self.root, relpath)), relpath)

    def test_symlink_to_internals(self) -> None:
        """A link into .hmacfs/ (or to any dot name) refuses paths through it, read or write."""
        internals = os.path.join(self.root, ".hmacfs")
        os.makedirs(internals)
        open(os.path.join(internals, "meta.sqlite3-wal"), "w").close()
        open(os.path.join(self.root, ".hmacfs-0123.part"), "w").close()
        os.symlink(internals, os.path.join(self.root, "l"))
        os.symlink(".hmacfs", os.path.join(self.root, "rel"))
        os.symlink(".hmacfs-0123.part", os.path.join(self.root, "temp"))
        os.symlink(".missing", os.path.join(self.root, "dangling"))
        os.makedirs(os.path.join(self.root, "a"))
        os.symlink(os.path.join("..", ".hmacfs"), os.path.join(self.root, "a", "up"))
        for relpath in (
            "l/meta.sqlite3-wal",
            "l/x.txt",
            "l/new/x.txt",
            "l",
            "rel/meta.sqlite3-wal",
            "temp",
            "dangling/x.txt",
            "a/up/meta.sqlite3-wal",
        ):
            exc = self.assertRaises(PathRefused, store_path, self.root, relpath)
            self.assertEqual(str(exc), "path leads to an internal name", relpath)

    def test_root_behind_symlink(self) -> None:
        """A root that is itself a symlink works: paths are judged against its real location."""
        link = os.path.abspath(self.mktemp())
        os.symlink(self.root, link)
        result = store_path(link, "a/b.txt")
        self.assertEqual(result, os.path.join(os.path.realpath(self.root), "a", "b.txt"))


def resolved_store_path(root: str, relpath: str) -> str:
    """store_path's definition, resolving the whole name every time: what it must agree with."""
    real_root = os.path.realpath(root)
    target = os.path.join(real_root, *relpath.split("/"))
    resolved = os.path.realpath(target)
    if os.path.commonpath([real_root, resolved]) != real_root or resolved == real_root:
        raise PathRefused("path leads outside the store")
    if any(part.startswith(".") for part in os.path.relpath(resolved, real_root).split(os.sep)):
        raise PathRefused("path leads to an internal name")
    return target


# What a name in the generated trees is: a directory, a file, or a link to somewhere in or
# out of the root (absolute or relative), to the root itself, to nothing, or to a dot name
# under the root (our .hmacfs/ directory, a file in it, a temp file, a missing dot name).
_NAMES = ("a", "b", "c")
_KINDS = (
    "dir",
    "file",
    "link-in",
    "link-out",
    "link-up",
    "link-root",
    "link-missing",
    "link-internal",
    "link-internal-file",
    "link-temp",
    "link-dot-missing",
    "none",
)


class StorePathAgreementTests(SynchronousTestCase):
    """store_path looks only at the components under the root; it decides as realpath would."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(st.tuples(st.sampled_from(_NAMES), st.sampled_from(_KINDS)), max_size=6),
        st.lists(st.sampled_from((*_NAMES, "x")), min_size=1, max_size=4),
    )
    def test_agrees_with_realpath(self, layout, relpath) -> None:
        """In any tree of directories, files and links, store_path decides as the definition."""
        base = os.path.abspath(self.mktemp())
        root, outside = os.path.join(base, "root"), os.path.join(base, "outside")
        os.makedirs(os.path.join(outside, "a"))
        os.makedirs(os.path.join(root, ".hmacfs", "a"))
        open(os.path.join(root, ".hmacfs", "b"), "w").close()
        open(os.path.join(root, ".hmacfs-0.part"), "w").close()
        # Each entry makes its name in the directory the previous directory entry made.
        here = root
        for name, kind in layout:
            path = os.path.join(here, name)
            if os.path.lexists(path):
                continue
            if kind == "dir":
                os.mkdir(path)
                here = path
            elif kind == "file":
                open(path, "w").close()
            elif kind == "link-in":
                os.symlink(root, path)
            elif kind == "link-out":
                os.symlink(outside, path)
            elif kind == "link-up":
                os.symlink(os.path.relpath(base, here), path)
            elif kind == "link-root":
                os.symlink(os.path.relpath(root, here), path)
            elif kind == "link-missing":
                os.symlink(os.path.join(outside, "missing"), path)
            elif kind == "link-internal":
                os.symlink(os.path.relpath(os.path.join(root, ".hmacfs"), here), path)
            elif kind == "link-internal-file":
                os.symlink(os.path.join(root, ".hmacfs", "b"), path)
            elif kind == "link-temp":
                os.symlink(os.path.relpath(os.path.join(root, ".hmacfs-0.part"), here), path)
            elif kind == "link-dot-missing":
                os.symlink(os.path.join(root, ".nothing"), path)
        name = "/".join(relpath)
        try:
            expected = resolved_store_path(root, name)
        except PathRefused:
            self.assertRaises(PathRefused, store_path, root, name)
        else:
            self.assertEqual(store_path(root, name), expected)


# Segments a careful signer could name: any text without "/" (surrogates cannot be in a URL).
segments = st.text(
    st.characters(exclude_categories=("Cs",), exclude_characters="/"), min_size=1, max_size=40
).filter(is_acceptable)

# Bytes after "/upload/", biased towards the pieces that traversal and encoding tricks are made of.
raw_pieces = st.one_of(
    st.sampled_from(
        [
            b"..",
            b".",
            b"/",
            b"%2e",
            b"%2E",
            b"%2f",
            b"%2F",
            b"%25",
            b"%",
            b"%00",
            b"%0a",
            b"\\",
            b"%5c",
            b"%c3",
            b"%a4",
            b"%c3%a4",
            b"\xc3\xa4",
            b"\xff",
            b"a",
            b"b.txt",
            b"+",
            b"%2b",
            b"2e",
            b"\x00",
        ]
    ),
    st.binary(min_size=1, max_size=6),
)
raw_paths = st.lists(raw_pieces, max_size=12).map(b"".join)


class PathPropertyTests(SynchronousTestCase):
    """Properties over generated paths."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    @given(st.lists(segments, min_size=1, max_size=5).filter(lambda s: is_acceptable("/".join(s))))
    def test_quoted_round_trip(self, names: list[str]) -> None:
        """Any acceptable path, quote()d segment by segment, decodes back to itself."""
        path = "/".join(names)
        raw = b"/upload/" + "/".join(quote(name) for name in names).encode("ascii")
        self.assertEqual(relative_path(raw, PREFIX), path)
        self.assertEqual(relative_path(b"/" + raw[len(b"/upload/") :], ""), path)

    @given(st.lists(segments, min_size=1, max_size=5).filter(lambda s: is_acceptable("/".join(s))))
    def test_raw_utf8_round_trip(self, names: list[str]) -> None:
        """The same path sent as raw UTF-8, with only "%" escaped, decodes back to itself too."""
        path = "/".join(names)
        raw = b"/upload/" + path.replace("%", "%25").encode("utf-8")
        self.assertEqual(relative_path(raw, PREFIX), path)

    # Most generated paths are refused; more examples so that enough of them get through.
    @settings(max_examples=500)
    @given(raw_paths)
    def test_whatever_is_accepted_is_safe(self, rest: bytes) -> None:
        """Whatever relative_path returns has only ordinary segments and stays inside the root."""
        try:
            path = relative_path(b"/upload/" + rest, PREFIX)
        except PathRefused:
            return
        assert path is not None
        for segment in path.split("/"):
            self.assertNotEqual(segment, "")
            self.assertNotEqual(segment, "..")
            self.assertFalse(segment.startswith("."), path)
            self.assertLessEqual(len(segment.encode("utf-8")), MAX_SEGMENT_BYTES)
        self.assertNotIn("\0", path)
        self.assertNotIn("\\", path)
        self.assertLessEqual(len(path.encode("utf-8")), MAX_PATH_BYTES)
        self.assertTrue(inside(self.root, store_path(self.root, path)), path)
