"""Tests for hmacd.address: the one host:port parser and its typed value."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hmacd.address import HostPort
from hmacd.config import Config, parse_config

# text, default port, expected (host, port) or None for a ValueError
CASES: list[tuple[str, int | None, tuple[str, int] | None]] = [
    ("localhost:6379", None, ("localhost", 6379)),
    ("10.0.0.1:7000", None, ("10.0.0.1", 7000)),
    ("[::1]:6380", None, ("::1", 6380)),
    ("[2001:db8::5]:3306", None, ("2001:db8::5", 3306)),
    ("db.example", 5432, ("db.example", 5432)),
    ("db.example:6543", 5432, ("db.example", 6543)),
    ("[::1]", 5432, ("::1", 5432)),
    ("::1", 5432, ("::1", 5432)),
    ("h:00080", None, ("h", 80)),
    ("localhost", None, None),
    ("[::1]", None, None),
    ("::1", None, None),
    ("", None, None),
    ("", 5432, None),
    (":6379", None, None),
    ("host:", None, None),
    ("host:0", None, None),
    ("host:65536", None, None),
    ("host:x", None, None),
    ("host:123456", None, None),
    ("h:\u0666\u0663\u0667\u0669", None, None),
    ("[::1", 5432, None),
    ("[]:5", None, None),
    ("[nope]:5", None, None),
    ("a b:5", None, None),
    ("a b", 5432, None),
    ("-host:5", None, None),
    ("stra\u00dfe:5", None, None),
    ("1:2:3", 5432, None),
]


class HostPortTests(SynchronousTestCase):
    """HostPort.parse takes exactly the host:port forms the config keys document."""

    def test_table(self) -> None:
        """Every form parses to its (host, port), every other text is a ValueError."""
        for text, default, expected in CASES:
            if expected is None:
                self.assertRaises(ValueError, HostPort.parse, text, default)
            else:
                self.assertEqual(HostPort.parse(text, default), expected, text)

    def test_str_round_trips(self) -> None:
        """str() gives host:port back, an IPv6 address in brackets, which parses to itself."""
        for value, text in [
            (HostPort("localhost", 6379), "localhost:6379"),
            (HostPort("::1", 6380), "[::1]:6380"),
        ]:
            self.assertEqual(str(value), text)
            self.assertEqual(HostPort.parse(text), value)

    def test_is_a_pair(self) -> None:
        """A HostPort unpacks and compares as the (host, port) pair callers used to get."""
        host, port = HostPort("h", 1)
        self.assertEqual((host, port), ("h", 1))
        self.assertEqual(HostPort("h", 1), ("h", 1))

    @given(st.text(max_size=12), st.one_of(st.none(), st.integers(1, 65535)))
    def test_only_value_error(self, text: str, default: int | None) -> None:
        """Any text either parses to a port from 1 to 65535 or raises ValueError, nothing else."""
        try:
            value = HostPort.parse(text, default)
        except ValueError:
            return
        self.assertTrue(1 <= value.port <= 65535)
        self.assertTrue(value.host)


class ConfigAddressTests(SynchronousTestCase):
    """Config hands out its host:port keys parsed, by the parser that checked them."""

    def test_redis_address(self) -> None:
        """RedisAddr becomes a HostPort; no RedisAddr is None."""
        self.assertIsNone(Config().redis_address)
        config = parse_config({"RedisAddr": "[::1]:6380"}, "t")
        self.assertEqual(config.redis_address, HostPort("::1", 6380))
        self.assertEqual(config.redis_addr, "[::1]:6380")

    def test_fallback_db_address(self) -> None:
        """FallbackDBHost gets the default port of FallbackDBType when it names none."""
        self.assertEqual(Config().fallback_db_address, ("localhost", 5432))
        mysql = parse_config({"FallbackDBType": "mariadb", "FallbackDBHost": "[::1]"}, "t")
        self.assertEqual(mysql.fallback_db_address, ("::1", 3306))
        pg = parse_config({"FallbackDBHost": "db:6543"}, "t")
        self.assertEqual(pg.fallback_db_address, ("db", 6543))

    def test_component_address(self) -> None:
        """ComponentServer becomes a HostPort."""
        config = Config(component_server="xmpp.example.org:5347")
        self.assertIsInstance(config.component_address, HostPort)
        self.assertEqual(config.component_address, ("xmpp.example.org", 5347))

    def test_typed_values_do_not_change_equality(self) -> None:
        """A Config whose addresses were read still equals one whose were not."""
        a, b = Config(redis_addr="h:1"), Config(redis_addr="h:1")
        self.assertIsNotNone(a.redis_address)
        self.assertEqual(a, b)
        self.assertEqual(repr(a), repr(b))
