"""Tests for hmacd.metadata: FileRecord to and from each shape a store keeps it in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hmacd.metadata import RECORD_FIELDS, FileRecord

FULL = FileRecord("a/b c.txt", 5, "text/plain", "ab" * 32, 1.1, "v2", "u@example.org", 0.1 + 0.2)
BARE = FileRecord("x", 0, "application/octet-stream", "00" * 32, 1700000000.0, "v")

records = st.builds(
    FileRecord,
    path=st.text(min_size=1),
    size=st.integers(0, 2**63 - 1),
    content_type=st.text(),
    sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
    created=st.floats(allow_nan=False, allow_infinity=False),
    protocol=st.sampled_from(["v", "v2", "token", "jwt", "guessed"]),
    uploader=st.none() | st.text(),
    expires=st.none() | st.floats(allow_nan=False, allow_infinity=False),
)


class FileRecordTests(SynchronousTestCase):
    """One record, spelled out once, round-trips through rows, fields and strings."""

    def test_field_order(self) -> None:
        """RECORD_FIELDS is the SQL column order: path first, the optional ones last."""
        self.assertEqual(
            RECORD_FIELDS,
            (
                "path",
                "size",
                "content_type",
                "sha256",
                "created",
                "protocol",
                "uploader",
                "expires",
            ),
        )

    def test_row(self) -> None:
        """to_row gives every field in order, None kept; from_row reads it back."""
        self.assertEqual(
            BARE.to_row(),
            ("x", 0, "application/octet-stream", "00" * 32, 1700000000.0, "v", None, None),
        )
        self.assertEqual(FileRecord.from_row(FULL.to_row()), FULL)
        self.assertRaises(TypeError, FileRecord.from_row, FULL.to_row()[:5])
        self.assertRaises(TypeError, FileRecord.from_row, (*FULL.to_row(), None))

    def test_fields_leave_out_unset(self) -> None:
        """to_fields leaves out the path and the unset optional fields."""
        self.assertEqual(
            BARE.to_fields(),
            {
                "size": 0,
                "content_type": "application/octet-stream",
                "sha256": "00" * 32,
                "created": 1700000000.0,
                "protocol": "v",
            },
        )
        self.assertEqual(FULL.to_fields()["uploader"], "u@example.org")

    def test_strings(self) -> None:
        """to_strings writes floats by repr, so 0.1 + 0.2 comes back bit for bit."""
        text = FULL.to_strings()
        self.assertEqual(text["expires"], "0.30000000000000004")
        self.assertEqual(text["size"], "5")
        self.assertEqual(FileRecord.from_fields(FULL.path, text), FULL)

    def test_not_a_record(self) -> None:
        """A mapping that lacks a required field, or has a bad number, is refused."""
        good = BARE.to_strings()
        for broken in (
            {k: v for k, v in good.items() if k != "sha256"},
            {**good, "size": "five"},
            {**good, "created": [1]},
        ):
            with self.assertRaises((KeyError, ValueError, TypeError)):
                FileRecord.from_fields("x", broken)

    @given(records)
    def test_round_trips(self, record: FileRecord) -> None:
        """Any record comes back equal from its row, its fields and its strings."""
        self.assertEqual(FileRecord.from_row(record.to_row()), record)
        self.assertEqual(FileRecord.from_fields(record.path, record.to_fields()), record)
        self.assertEqual(FileRecord.from_fields(record.path, record.to_strings()), record)
