"""Tests for hmacd.config: TOML files in, whole Config objects (or one-line errors) out."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import fields, replace

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    serverFromString,
)
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from hmacd.config import (
    KEY_DOCS,
    KEYS,
    Config,
    ConfigError,
    listen_endpoint,
    load_config,
    parse_config,
    parse_size,
)

ETC_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "etc", "config.toml")
README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.rst")


def readme_config_table() -> list[tuple[str, str, str]]:
    """README's configuration table as (key, default, meaning) rows, continuation lines joined."""
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index("Configuration")
    borders = [i for i in range(start, len(lines)) if re.fullmatch(r"=+ +=+ +=+", lines[i])][:3]
    cols = [m.start() for m in re.finditer(r"=+", lines[borders[0]])]
    rows: list[list[str]] = []
    for line in lines[borders[1] + 1 : borders[2]]:
        cells = [line[: cols[1]], line[cols[1] : cols[2]], line[cols[2] :]]
        key, default, meaning = (cell.strip() for cell in cells)
        if key:
            rows.append([key, default, meaning])
        else:
            rows[-1][1] = f"{rows[-1][1]} {default}".strip()
            rows[-1][2] = f"{rows[-1][2]} {meaning}".strip()
    return [(key, default, meaning) for key, default, meaning in rows]


GO_SEED = """\
ListenPort = ":8080"
UnixSocket = false
Secret = "your-secret-key"
StoreDir = "/mnt/storage/hmac-file-server/"
UploadSubDir = "upload"
LogLevel = "info"
LogFile = "/var/log/hmac-file-server.log"
RedisAddr = "localhost:6379"
RedisPassword = ""
RedisDB = 0
FallbackEnabled = true
FallbackDBType = "postgres"
FallbackDBHost = "localhost"
FallbackDBUser = "your_db_user"
FallbackDBPassword = "your_db_password"
FallbackDBName = "your_db_name"
MetricsEnabled = true
MetricsPort = ":9090"
ChunkSize = 1048576
UploadMaxSize = 10737418240
MaxBytesPerSecond = 1048576
"""

PROSODY_FILER = """\
listenport = "[::]:5050"
secret = "mysecret"
storeDir = "/home/prosody-filer/upload/"
uploadSubDir = "upload/"
"""


class ConfigFileTestCase(SynchronousTestCase):
    """Write TOML text to a fresh file and load it, as a user's config would be."""

    def write(self, text: str | bytes) -> str:
        path = self.mktemp()
        data = text.encode("utf-8") if isinstance(text, str) else text
        with open(path, "wb") as f:
            f.write(data)
        return path

    def load(self, text: str) -> tuple[str, Config]:
        path = self.write(text)
        return path, load_config(path)

    def assertConfigError(self, text: str, key: str | None, *fragments: str) -> str:
        """Loading ``text`` fails with one line naming the file, the key and each fragment."""
        path = self.write(text)
        error = self.assertRaises(ConfigError, load_config, path)
        message = str(error)
        self.assertNotIn("\n", message)
        self.assertTrue(message.startswith(path + ": "), message)
        self.assertEqual(error.source, path)
        if key is not None:
            self.assertIn(key, message)
            self.assertEqual(error.key, key)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class DefaultsTests(ConfigFileTestCase):
    def test_empty_file(self) -> None:
        """An empty file means every default, remembering where it came from."""
        path, config = self.load("")
        self.assertEqual(config, Config(source=path))

    def test_dataclass_defaults(self) -> None:
        """Config() carries the documented defaults, field by field."""
        self.assertEqual(
            Config(),
            Config(
                listen_port="127.0.0.1:8080",
                unix_socket=False,
                secret=None,
                store_dir="./uploads",
                upload_subdir="upload",
                log_level="info",
                log_file="",
                redis_addr="",
                redis_password="",
                redis_db=0,
                fallback_enabled=False,
                fallback_db_type="postgres",
                fallback_db_host="localhost",
                fallback_db_user="",
                fallback_db_password="",
                fallback_db_name="",
                metrics_enabled=False,
                metrics_port="127.0.0.1:9090",
                chunk_size=1048576,
                upload_max_size=0,
                max_bytes_per_second=0,
                source=None,
            ),
        )

    def test_default_endpoints(self) -> None:
        """By default both listeners are on loopback only."""
        self.assertEqual(
            (
                Config().listen_endpoint,
                Config().metrics_endpoint,
                Config().secret_bytes,
            ),
            ("tcp:8080:interface=127.0.0.1", "tcp:9090:interface=127.0.0.1", None),
        )

    def test_parse_config_empty_mapping(self) -> None:
        """parse_config on an empty mapping gives the defaults with the given source."""
        self.assertEqual(parse_config({}, "somewhere"), Config(source="somewhere"))

    def test_keys(self) -> None:
        """KEYS maps exactly the Go server's key names onto every Config field but source."""
        self.assertEqual(
            list(KEYS),
            [
                "ListenPort",
                "UnixSocket",
                "Secret",
                "PreviousSecrets",
                "StoreDir",
                "UploadSubDir",
                "LogLevel",
                "LogFile",
                "AuditLog",
                "RedisAddr",
                "RedisPassword",
                "RedisDB",
                "FallbackEnabled",
                "FallbackDBType",
                "FallbackDBHost",
                "FallbackDBUser",
                "FallbackDBPassword",
                "FallbackDBName",
                "MetricsEnabled",
                "MetricsPort",
                "ChunkSize",
                "UploadMaxSize",
                "UserQuota",
                "UserDailyQuota",
                "GlobalQuota",
                "UploaderFromPath",
                "MinFreeSpace",
                "MaxBytesPerSecond",
                "MaxTotalBytesPerSecond",
                "FileTTL",
                "ResumableTTL",
                "ExpiryInterval",
                "ExpiryBatch",
                "GCInterval",
                "MonitorInterval",
                "ShutdownGrace",
                "Workers",
                "RateLimitPerMinute",
                "RateLimitBurst",
                "RateLimitShared",
                "NodeName",
                "TrustedProxies",
                "HeaderTimeout",
                "MaxConnectionsPerClient",
                "MinUploadBytesPerSecond",
                "MinUploadRateWindow",
                "ComponentJID",
                "ComponentSecret",
                "ComponentServer",
                "ComponentAllowedDomains",
                "ComponentProtocol",
                "ComponentPingInterval",
                "ComponentPingTimeout",
                "PublicURL",
                "StorageBackend",
                "Deduplication",
                "SyncUploads",
                "IoUring",
                "S3Endpoint",
                "S3Region",
                "S3Bucket",
                "S3Prefix",
                "S3AccessKey",
                "S3SecretKey",
                "S3AddressingStyle",
                "S3RedirectDownloads",
                "S3StreamUploads",
                "S3MultipartThreshold",
                "S3PartSize",
            ],
        )
        fields = [name for name in Config.__dataclass_fields__ if name != "source"]
        self.assertEqual(sorted(KEYS.values()), sorted(fields))

    def test_etc_config_toml(self) -> None:
        """The shipped etc/config.toml parses to exactly the defaults."""
        self.assertEqual(load_config(ETC_CONFIG), Config(source=ETC_CONFIG))

    def test_etc_config_toml_mentions_every_key(self) -> None:
        """The shipped etc/config.toml sets every key (Secret only in a comment)."""
        with open(ETC_CONFIG, "rb") as f:
            data = tomllib.load(f)
        self.assertEqual(sorted(data), sorted(set(KEYS) - {"Secret"}))
        with open(ETC_CONFIG, encoding="utf-8") as f:
            lines = f.read().splitlines()
        self.assertIn('# Secret = "change-me"', lines)


class TableTests(SynchronousTestCase):
    """Config's fields are the one table of keys: the docs are checked against it."""

    def test_every_field_is_a_key(self) -> None:
        """Every field but source carries its key, converter and a one-line doc."""
        for f in fields(Config):
            if f.name == "source":
                self.assertEqual(dict(f.metadata), {})
                continue
            self.assertEqual(KEYS[f.metadata["key"]], f.name)
            self.assertTrue(callable(f.metadata["convert"]), f.name)
            self.assertTrue(f.metadata["doc"].strip(), f.name)
            self.assertNotIn("\n", f.metadata["doc"], f.name)

    def test_converters_accept_defaults(self) -> None:
        """Each key's converter gives back its default from the default's TOML spelling."""
        defaults = {
            "Secret": "s",
            "TrustedProxies": [],
            "ComponentAllowedDomains": [],
            "PreviousSecrets": [],
        }
        config = parse_config(
            {k: defaults.get(k, getattr(Config(), v)) for k, v in KEYS.items()}, "t"
        )
        self.assertEqual(config, Config(secret="s", source="t"))

    def test_readme_table(self) -> None:
        """README's table lists exactly the keys, in the table's order, with their docs."""
        rows = readme_config_table()
        self.assertEqual([key.strip("`") for key, _, _ in rows], list(KEYS))
        self.assertEqual({key.strip("`"): meaning for key, _, meaning in rows}, KEY_DOCS)

    def test_etc_config_toml_documents_every_key(self) -> None:
        """etc/config.toml has a comment and a line for every key, and no key it does not know."""
        with open(ETC_CONFIG, encoding="utf-8") as f:
            text = f.read()
        named = re.findall(r"^(?:# )?([A-Za-z0-9]+) = ", text, re.MULTILINE)
        self.assertEqual(sorted(named), sorted(KEYS))
        for key in KEYS:
            self.assertRegex(text, rf"#[^\n]*\n(?:# )?{key} = ", key)


class SeedConfigTests(ConfigFileTestCase):
    def test_go_seed_config(self) -> None:
        """The Go HMAC File Server's seed config parses, key for key."""
        path, config = self.load(GO_SEED)
        self.assertEqual(
            config,
            Config(
                listen_port=":8080",
                unix_socket=False,
                secret="your-secret-key",
                store_dir="/mnt/storage/hmac-file-server/",
                upload_subdir="upload",
                log_level="info",
                log_file="/var/log/hmac-file-server.log",
                redis_addr="localhost:6379",
                redis_password="",
                redis_db=0,
                fallback_enabled=True,
                fallback_db_type="postgres",
                fallback_db_host="localhost",
                fallback_db_user="your_db_user",
                fallback_db_password="your_db_password",
                fallback_db_name="your_db_name",
                metrics_enabled=True,
                metrics_port=":9090",
                chunk_size=1048576,
                upload_max_size=10737418240,
                max_bytes_per_second=1048576,
                source=path,
            ),
        )
        self.assertEqual(
            (config.listen_endpoint, config.metrics_endpoint, config.secret_bytes),
            ("tcp:8080", "tcp:9090", b"your-secret-key"),
        )

    def test_prosody_filer_config(self) -> None:
        """A prosody-filer config with lower/camel-case keys works unchanged."""
        path, config = self.load(PROSODY_FILER)
        self.assertEqual(
            config,
            Config(
                listen_port="[::]:5050",
                secret="mysecret",
                store_dir="/home/prosody-filer/upload/",
                upload_subdir="upload",
                source=path,
            ),
        )
        self.assertEqual(config.listen_endpoint, r"tcp6:5050:interface=\:\:")

    def test_keys_any_case(self) -> None:
        """Every key matches whatever its case."""
        lines = []
        for i, line in enumerate(GO_SEED.splitlines()):
            key, value = line.split(" = ", 1)
            lines.append(f"{key.upper() if i % 2 else key.lower()} = {value}\n")
        path, config = self.load("".join(lines))
        _, seed = self.load(GO_SEED)
        self.assertEqual(config, replace(seed, source=path))

    def test_normalised_values(self) -> None:
        """Aliases and spellings are normalised: log level, DB type, subdir slashes, sizes."""
        path, config = self.load(
            'LogLevel = "WARNING"\n'
            'FallbackDBType = "MariaDB"\n'
            'FallbackDBHost = "[::1]:3306"\n'
            'UploadSubDir = "/files/xmpp/"\n'
            "ListenPort = 8080\n"
            'RedisAddr = "[::1]:6379"\n'
            "RedisDB = 3\n"
            'ChunkSize = "64KB"\n'
            'UploadMaxSize = "1.5GB"\n'
            'MaxBytesPerSecond = "10 mib"\n'
        )
        self.assertEqual(
            config,
            Config(
                log_level="warn",
                fallback_db_type="mysql",
                fallback_db_host="[::1]:3306",
                upload_subdir="files/xmpp",
                listen_port="8080",
                redis_addr="[::1]:6379",
                redis_db=3,
                chunk_size=65536,
                upload_max_size=1610612736,
                max_bytes_per_second=10485760,
                source=path,
            ),
        )
        self.assertEqual(config.listen_endpoint, "tcp:8080")

    def test_aliases(self) -> None:
        """LogLevel and FallbackDBType accept their aliases in any case."""
        cases = [
            ("LogLevel", "Debug", "log_level", "debug"),
            ("LogLevel", "INFO", "log_level", "info"),
            ("LogLevel", "warn", "log_level", "warn"),
            ("LogLevel", "Warning", "log_level", "warn"),
            ("LogLevel", "error", "log_level", "error"),
            ("FallbackDBType", "PostgreSQL", "fallback_db_type", "postgres"),
            ("FallbackDBType", "postgres", "fallback_db_type", "postgres"),
            ("FallbackDBType", "MYSQL", "fallback_db_type", "mysql"),
            ("FallbackDBType", "mariadb", "fallback_db_type", "mysql"),
        ]
        for key, value, field, expected in cases:
            config = parse_config({key: value}, "t")
            self.assertEqual(config, Config(source="t", **{field: expected}), (key, value))

    def test_upload_subdir_forms(self) -> None:
        """UploadSubDir loses surrounding slashes; "/" and "" mean no prefix."""
        for value, expected in [
            ("upload", "upload"),
            ("upload/", "upload"),
            ("/upload", "upload"),
            ("/", ""),
            ("", ""),
            ("a/b/c/", "a/b/c"),
            ("..files", "..files"),
        ]:
            config = parse_config({"UploadSubDir": value}, "t")
            self.assertEqual(config, Config(upload_subdir=expected, source="t"), value)

    def test_unix_socket(self) -> None:
        """With UnixSocket, ListenPort is a path; MetricsPort stays a TCP address."""
        path, config = self.load(
            'UnixSocket = true\nListenPort = "/run/hmacfs/up:load.sock"\nMetricsPort = ":9100"\n'
        )
        self.assertEqual(
            config,
            Config(
                unix_socket=True,
                listen_port="/run/hmacfs/up:load.sock",
                metrics_port=":9100",
                source=path,
            ),
        )
        self.assertEqual(
            (config.listen_endpoint, config.metrics_endpoint),
            (r"unix:/run/hmacfs/up\:load.sock", "tcp:9100"),
        )

    def test_secret_bytes(self) -> None:
        """The HMAC key is the UTF-8 encoding of Secret."""
        self.assertEqual(Config(secret="sécret").secret_bytes, "sécret".encode())

    def test_bom(self) -> None:
        """A file saved with a UTF-8 byte order mark still loads."""
        path = self.write(b'\xef\xbb\xbfSecret = "s"\n')
        self.assertEqual(load_config(path), Config(secret="s", source=path))


class ReprTests(SynchronousTestCase):
    def test_repr_masks_secrets(self) -> None:
        """repr(Config) shows that secrets are set but never their values."""
        config = Config(
            secret="s3cr3t-value",
            redis_password="redis-pw-value",
            fallback_db_password="db-pw-value",
            fallback_db_user="db-user",
        )
        text = repr(config)
        for secret in ("s3cr3t-value", "redis-pw-value", "db-pw-value"):
            self.assertNotIn(secret, text)
            self.assertNotIn(secret, str(config))
        self.assertIn("secret='***'", text)
        self.assertIn("redis_password='***'", text)
        self.assertIn("fallback_db_password='***'", text)
        self.assertIn("fallback_db_user='db-user'", text)

    def test_repr_unset_secrets(self) -> None:
        """Unset secrets show as unset, so "***" always means "configured"."""
        text = repr(Config())
        self.assertIn("secret=None", text)
        self.assertIn("redis_password=''", text)
        self.assertNotIn("***", text)


# value, unix_socket, endpoint string, endpoint class, port, interface/address
LISTEN_FORMS: list[tuple[str | int, bool, str, type, int, str]] = [
    (":8080", False, "tcp:8080", TCP4ServerEndpoint, 8080, ""),
    ("8080", False, "tcp:8080", TCP4ServerEndpoint, 8080, ""),
    (8080, False, "tcp:8080", TCP4ServerEndpoint, 8080, ""),
    (
        "127.0.0.1:8080",
        False,
        "tcp:8080:interface=127.0.0.1",
        TCP4ServerEndpoint,
        8080,
        "127.0.0.1",
    ),
    (
        "0.0.0.0:80",
        False,
        "tcp:80:interface=0.0.0.0",
        TCP4ServerEndpoint,
        80,
        "0.0.0.0",
    ),
    (
        "localhost:8080",
        False,
        "tcp:8080:interface=127.0.0.1",
        TCP4ServerEndpoint,
        8080,
        "127.0.0.1",
    ),
    (
        "LocalHost:1",
        False,
        "tcp:1:interface=127.0.0.1",
        TCP4ServerEndpoint,
        1,
        "127.0.0.1",
    ),
    (":65535", False, "tcp:65535", TCP4ServerEndpoint, 65535, ""),
    ("[::]:5050", False, r"tcp6:5050:interface=\:\:", TCP6ServerEndpoint, 5050, "::"),
    (
        "[::1]:8080",
        False,
        r"tcp6:8080:interface=\:\:1",
        TCP6ServerEndpoint,
        8080,
        "::1",
    ),
    (
        "[2001:db8::7]:443",
        False,
        r"tcp6:443:interface=2001\:db8\:\:7",
        TCP6ServerEndpoint,
        443,
        "2001:db8::7",
    ),
    ("tcp:8080", False, "tcp:8080", TCP4ServerEndpoint, 8080, ""),
    ("tcp:0", False, "tcp:0", TCP4ServerEndpoint, 0, ""),
    ("TCP:8080", False, "tcp:8080", TCP4ServerEndpoint, 8080, ""),
    (
        "tcp:port=8443:interface=10.0.0.1",
        False,
        "tcp:port=8443:interface=10.0.0.1",
        TCP4ServerEndpoint,
        8443,
        "10.0.0.1",
    ),
    (
        r"tcp6:0:interface=\:\:1",
        False,
        r"tcp6:0:interface=\:\:1",
        TCP6ServerEndpoint,
        0,
        "::1",
    ),
    (
        "unix:/run/hmacfs.sock",
        False,
        "unix:/run/hmacfs.sock",
        UNIXServerEndpoint,
        0,
        "/run/hmacfs.sock",
    ),
    (
        "/run/hmacfs.sock",
        True,
        "unix:/run/hmacfs.sock",
        UNIXServerEndpoint,
        0,
        "/run/hmacfs.sock",
    ),
    (
        "relative.sock",
        True,
        "unix:relative.sock",
        UNIXServerEndpoint,
        0,
        "relative.sock",
    ),
    (
        "/tmp/a:b=c.sock",
        True,
        r"unix:/tmp/a\:b\=c.sock",
        UNIXServerEndpoint,
        0,
        "/tmp/a:b=c.sock",
    ),
    (
        "/tmp/back\\slash",
        True,
        "unix:/tmp/back\\\\slash",
        UNIXServerEndpoint,
        0,
        "/tmp/back\\slash",
    ),
]

LISTEN_ERRORS: list[tuple[str | int, bool, str]] = [
    ("example.com:8080", False, "hostname"),
    ("1.2.3:80", False, "hostname"),
    ("::1:8080", False, "brackets"),
    ("[::1]", False, "needs a port"),
    ("[example]:80", False, "IPv6"),
    ("[127.0.0.1]:80", False, "IPv6"),
    ("127.0.0.1:0", False, "1 to 65535"),
    (":0", False, "1 to 65535"),
    (0, False, "1 to 65535"),
    (":65536", False, "1 to 65535"),
    ("127.0.0.1:http", False, "1 to 65535"),
    ("0.0.0.0: 80", False, "1 to 65535"),
    ("", False, "not a port"),
    ("http", False, "not a port"),
    ("tcp:", False, "0 to 65535"),
    ("tcp:http", False, "0 to 65535"),
    ("tcp:interface=127.0.0.1", False, "no port"),
    ("ssl:70000", False, "0 to 65535"),
    ("unix:", False, "no socket path"),
    ("", True, "socket path"),
]


class ListenEndpointTests(SynchronousTestCase):
    def test_forms(self) -> None:
        """Each listen form becomes an endpoint string serverFromString builds as intended."""
        for value, unix, expected, kind, port, where in LISTEN_FORMS:
            description = listen_endpoint(value, unix)
            self.assertEqual(description, expected, value)
            endpoint = serverFromString(MemoryReactor(), description)
            self.assertIsInstance(endpoint, kind, value)
            if kind is UNIXServerEndpoint:
                self.assertEqual(endpoint._address, where, value)
            else:
                self.assertEqual((endpoint._port, endpoint._interface), (port, where), value)

    def test_passthrough(self) -> None:
        """Twisted endpoint strings that need files or fds to build pass through unchanged."""
        for value in (
            "ssl:8443:privateKey=key.pem:certKey=cert.pem",
            "systemd:domain=INET:index=0",
            "tcp6:port=8080",
        ):
            self.assertEqual(listen_endpoint(value), value)

    def test_errors(self) -> None:
        """Bad listen addresses raise ValueError with a message saying what is wrong."""
        for value, unix, fragment in LISTEN_ERRORS:
            error = self.assertRaises(ValueError, listen_endpoint, value, unix)
            self.assertIn(fragment, str(error), value)

    def test_not_str_or_int(self) -> None:
        """A bool is not a port number."""
        self.assertRaises(ValueError, listen_endpoint, True)

    def test_config_listen_forms(self) -> None:
        """ListenPort and MetricsPort accept the same forms through a config file."""
        for value, unix, expected, _kind, _port, _where in LISTEN_FORMS:
            if unix:
                continue
            data = {"ListenPort": value, "MetricsPort": value}
            config = parse_config(data, "t")
            self.assertEqual(
                config,
                Config(listen_port=str(value), metrics_port=str(value), source="t"),
            )
            self.assertEqual(
                (config.listen_endpoint, config.metrics_endpoint), (expected, expected)
            )


class ErrorTests(ConfigFileTestCase):
    def test_unknown_key_suggestion(self) -> None:
        """A misspelt key is refused, with the closest real key suggested."""
        self.assertConfigError(
            "UploadMaxSzie = 5\n",
            "UploadMaxSzie",
            "unknown key",
            'did you mean "UploadMaxSize"?',
        )
        self.assertConfigError(
            "maxuploadsize = 5\n", "maxuploadsize", 'did you mean "UploadMaxSize"?'
        )

    def test_unknown_key_without_suggestion(self) -> None:
        """A key like no real one is refused without a suggestion."""
        message = self.assertConfigError("Frobnicate = 1\n", "Frobnicate", "unknown key")
        self.assertNotIn("did you mean", message)

    def test_unknown_key_quoted(self) -> None:
        """A quoted key with odd characters is still named on one line."""
        path = self.write('"a\\nb" = 1\n')
        error = self.assertRaises(ConfigError, load_config, path)
        self.assertEqual((str(error), error.key), (f'{path}: "a\\nb": unknown key', "a\nb"))

    def test_table(self) -> None:
        """A [table] is an unknown key: every key is top-level."""
        self.assertConfigError('[server]\nlistenport = ":8080"\n', "server", "unknown table")

    def test_known_key_as_table(self) -> None:
        """A known key written as a [table] is a wrong type, not an unknown key."""
        self.assertConfigError("[StoreDir]\nx = 1\n", "StoreDir", "must be a string, got table")

    def test_duplicate_key_by_case(self) -> None:
        """The same key twice in different case is refused, naming both spellings."""
        message = self.assertConfigError(
            'Secret = "a"\nsecret = "b"\n', "secret", 'same key as "Secret"'
        )
        self.assertNotIn('"b"', message)

    def test_wrong_types(self) -> None:
        """Each kind of key names the expected type and the TOML type it got."""
        cases = [
            ("StoreDir = 5", "StoreDir", "must be a string, got integer 5"),
            ("LogFile = true", "LogFile", "must be a string, got boolean true"),
            ("LogLevel = [1, 2]", "LogLevel", "must be a string, got array"),
            ("UploadSubDir = 1.5", "UploadSubDir", "must be a string, got float 1.5"),
            (
                "UnixSocket = 1",
                "UnixSocket",
                "must be a boolean (true or false), got integer 1",
            ),
            ('FallbackEnabled = "true"', "FallbackEnabled", 'got string "true"'),
            ("MetricsEnabled = 0", "MetricsEnabled", "must be a boolean"),
            ("RedisDB = true", "RedisDB", "must be an integer >= 0, got boolean true"),
            ('RedisDB = "0"', "RedisDB", 'must be an integer >= 0, got string "0"'),
            ("RedisDB = 1.0", "RedisDB", "got float 1.0"),
            (
                "ChunkSize = 1.5",
                "ChunkSize",
                'must be a size >= 1 (bytes, or a string like "10GB"), got float 1.5',
            ),
            (
                "UploadMaxSize = true",
                "UploadMaxSize",
                "must be a size >= 0",
                "got boolean true",
            ),
            (
                "MaxBytesPerSecond = 1979-05-27",
                "MaxBytesPerSecond",
                "got date 1979-05-27",
            ),
            ("ListenPort = true", "ListenPort", "got boolean true"),
            ("MetricsPort = [8080]", "MetricsPort", "got array"),
            ("RedisAddr = 6379", "RedisAddr", "must be a string, got integer 6379"),
            ("FallbackDBType = 1", "FallbackDBType", "must be a string"),
            ("FallbackDBHost = 1", "FallbackDBHost", "must be a string"),
            ("FallbackDBUser = 1", "FallbackDBUser", "must be a string"),
            ("FallbackDBName = 1", "FallbackDBName", "must be a string"),
        ]
        for text, key, *fragments in cases:
            self.assertConfigError(text + "\n", key, *fragments)

    def test_wrong_type_secrets_not_echoed(self) -> None:
        """A mistyped secret or password is reported by type only, never by value."""
        for key in ("Secret", "RedisPassword", "FallbackDBPassword"):
            message = self.assertConfigError(
                f"{key} = 1234567\n", key, "must be a string, got integer"
            )
            self.assertNotIn("1234567", message)

    def test_empty_secret(self) -> None:
        """An empty Secret is refused: leaving it out is how to get a generated one."""
        self.assertConfigError(
            'Secret = ""\n',
            "Secret",
            "must not be empty; leave it out to have one generated",
        )

    def test_bad_sizes(self) -> None:
        """Negative, zero-where-forbidden and malformed sizes are refused with the value."""
        cases = [
            (
                "UploadMaxSize = -5",
                "UploadMaxSize",
                'must be a size >= 0 (bytes, or a string like "10GB"), got -5',
            ),
            ("MaxBytesPerSecond = -1", "MaxBytesPerSecond", "got -1"),
            ("ChunkSize = 0", "ChunkSize", "must be a size >= 1", "got 0"),
            ('ChunkSize = "0KB"', "ChunkSize", 'got "0KB"'),
            ('UploadMaxSize = "10XB"', "UploadMaxSize", 'got "10XB"'),
            ('UploadMaxSize = "ten"', "UploadMaxSize", 'got "ten"'),
            ('UploadMaxSize = "-5MB"', "UploadMaxSize", 'got "-5MB"'),
            ('UploadMaxSize = "1.5"', "UploadMaxSize", 'got "1.5"'),
            ('UploadMaxSize = ""', "UploadMaxSize", 'got ""'),
        ]
        for text, key, *fragments in cases:
            self.assertConfigError(text + "\n", key, *fragments)

    def test_bad_log_level(self) -> None:
        """An unknown LogLevel is refused, listing the levels."""
        self.assertConfigError(
            'LogLevel = "verbose"\n',
            "LogLevel",
            "debug, info, warn, error",
            'got "verbose"',
        )

    def test_bad_db_type(self) -> None:
        """An unknown FallbackDBType is refused even while the fallback is disabled."""
        self.assertConfigError(
            'FallbackEnabled = false\nFallbackDBType = "oracle"\n',
            "FallbackDBType",
            '"postgres" or "mysql"',
            'got "oracle"',
        )

    def test_fallback_without_db_name(self) -> None:
        """Enabling the fallback needs FallbackDBName, in whatever case it is spelt."""
        self.assertConfigError(
            "FallbackEnabled = true\n",
            "FallbackDBName",
            "must be set when FallbackEnabled is true",
        )
        self.assertConfigError(
            'FallbackEnabled = true\nfallbackdbname = ""\n',
            "fallbackdbname",
            "must be set",
        )

    def test_bad_redis_addr(self) -> None:
        """RedisAddr must be host:port with a real port."""
        for value in (
            "localhost",
            "localhost:0",
            "localhost:65536",
            "localhost:redis",
            "::1:6379",
            "[::1]",
            "[nohost]:6379",
            "bad host:6379",
            ":6379",
        ):
            self.assertConfigError(
                f'RedisAddr = "{value}"\n', "RedisAddr", '"host:port"', f'got "{value}"'
            )

    def test_bad_db_host(self) -> None:
        """FallbackDBHost must be host or host:port."""
        for value in ("", "db:0", "db:x", "a b", "[::1]:99999"):
            self.assertConfigError(
                f'FallbackDBHost = "{value}"\n',
                "FallbackDBHost",
                '"host" or "host:port"',
            )

    def test_bad_upload_subdir(self) -> None:
        """UploadSubDir segments may not be empty, ".", "..", or hold a backslash or NUL."""
        for value in ("a//b", "./upload", "upload/..", "..", "a\\\\b", "a\\u0000b"):
            self.assertConfigError(f'UploadSubDir = "{value}"\n', "UploadSubDir", "relative path")

    def test_bad_store_dir(self) -> None:
        """An empty StoreDir is refused rather than meaning the current directory."""
        self.assertConfigError('StoreDir = ""\n', "StoreDir", "must be a directory path")

    def test_bad_redis_db(self) -> None:
        """A negative RedisDB is refused."""
        self.assertConfigError("RedisDB = -1\n", "RedisDB", "must be an integer >= 0, got -1")

    def test_bad_listen_port(self) -> None:
        """A bad ListenPort or MetricsPort is refused with the address rule it broke."""
        self.assertConfigError('ListenPort = "example.com:80"\n', "ListenPort", "hostname")
        self.assertConfigError('listenport = ":0"\n', "listenport", "1 to 65535")
        self.assertConfigError("MetricsPort = 70000\n", "MetricsPort", "1 to 65535")

    def test_unix_socket_without_path(self) -> None:
        """UnixSocket without a ListenPort path is refused instead of using "127.0.0.1:8080"."""
        self.assertConfigError("UnixSocket = true\n", "ListenPort", "socket path")
        self.assertConfigError('UnixSocket = true\nListenPort = ""\n', "ListenPort", "socket path")

    def test_syntax_error(self) -> None:
        """A TOML syntax error names the file and TOML's line and column."""
        self.assertConfigError(
            'Secret = "ok"\nStoreDir = /nope\n', None, "TOML syntax error", "line 2"
        )

    def test_exact_duplicate(self) -> None:
        """The same key twice, same case, is TOML's own error, with its line."""
        self.assertConfigError('Secret = "a"\nSecret = "b"\n', None, "line 2")

    def test_not_utf8(self) -> None:
        """A file that is not UTF-8 is refused with the offending byte's offset."""
        path = self.write(b'Secret = "\xff"\n')
        message = str(self.assertRaises(ConfigError, load_config, path))
        self.assertEqual(message, f"{path}: not valid UTF-8 (byte 10)")

    def test_missing_file(self) -> None:
        """A missing file is named with the OS's reason."""
        path = self.mktemp()
        message = str(self.assertRaises(ConfigError, load_config, path))
        self.assertEqual(message, f"{path}: cannot read: No such file or directory")

    def test_directory(self) -> None:
        """A directory instead of a file is named with the OS's reason."""
        path = self.mktemp()
        os.mkdir(path)
        message = str(self.assertRaises(ConfigError, load_config, path))
        self.assertEqual(message, f"{path}: cannot read: Is a directory")

    def test_unreadable_file(self) -> None:
        """A file without read permission is named with the OS's reason."""
        path = self.write('Secret = "s"\n')
        if os.geteuid() == 0:
            # root reads a mode-000 file anyway: make open() fail as it
            # would for anyone else.
            import hmacd.config

            def denied(*args, **kwargs):
                raise PermissionError(13, "Permission denied", path)

            hmacd.config.open = denied  # shadows the builtin for the module
            self.addCleanup(delattr, hmacd.config, "open")
        else:
            os.chmod(path, 0o000)
            self.addCleanup(os.chmod, path, 0o600)
        message = str(self.assertRaises(ConfigError, load_config, path))
        self.assertEqual(message, f"{path}: cannot read: Permission denied")


SIZE_CASES = [
    (0, 0),
    (1048576, 1048576),
    ("1048576", 1048576),
    ("512KB", 512 * 1024),
    ("512kib", 512 * 1024),
    ("512k", 512 * 1024),
    ("10MB", 10 * 1024**2),
    ("10 MB", 10 * 1024**2),
    ("10mb", 10 * 1024**2),
    ("1.5GB", 1610612736),
    ("10GB", 10737418240),
    ("2TiB", 2 * 1024**4),
    ("1t", 1024**4),
    ("100B", 100),
    ("100 b", 100),
    (" 7K ", 7168),
    ("0.5KB", 512),
    ("1.1KB", 1126),
]

SIZE_ERRORS: list[object] = [
    True,
    False,
    -1,
    1.5,
    None,
    "",
    "MB",
    "-5",
    "-5MB",
    "+5",
    "1.5",
    "1.5B",
    "10XB",
    "10 M B",
    "1e3",
    "1,000",
    "1_000",
    "5PB",
    ".5GB",
]


class ParseSizeTests(SynchronousTestCase):
    def test_sizes(self) -> None:
        """Ints are bytes; strings take binary units with or without B, in any case."""
        for value, expected in SIZE_CASES:
            self.assertEqual(parse_size(value), expected, value)  # type: ignore[arg-type]

    def test_errors(self) -> None:
        """Anything else, bool included, is a ValueError."""
        for value in SIZE_ERRORS:
            self.assertRaises(ValueError, parse_size, value)

    @given(st.integers(min_value=0, max_value=2**63 - 1))
    def test_int_round_trip(self, n: int) -> None:
        """An int and its decimal string are that many bytes."""
        self.assertEqual((parse_size(n), parse_size(str(n))), (n, n))

    @given(
        st.integers(min_value=0, max_value=2**40),
        st.sampled_from([("KB", 1024), ("MB", 1024**2), ("GB", 1024**3)]),
        st.sampled_from(["", " "]),
        st.booleans(),
    )
    def test_unit_round_trip(self, n: int, unit: tuple[str, int], space: str, lower: bool) -> None:
        """ "<n>KB/MB/GB" is n times the binary multiple, whatever the case and spacing."""
        suffix, multiple = unit
        text = f"{n}{space}{suffix.lower() if lower else suffix}"
        self.assertEqual(parse_size(text), n * multiple)


class DurationTests(SynchronousTestCase):
    def test_file_ttl_forms(self) -> None:
        """FileTTL takes seconds or Go-style durations; 0 keeps files forever."""
        for value, seconds in (
            ("0", 0),
            ("86400", 86400),
            ('"45s"', 45),
            ('"30m"', 1800),
            ('"12h"', 43200),
            ('"7d"', 604800),
            ('"2w"', 1209600),
            ('"1y"', 31536000),
            ('"1h30m"', 5400),
        ):
            self.assertEqual(
                parse_config(tomllib.loads(f"FileTTL = {value}"), "t.toml").file_ttl, seconds, value
            )

    def test_file_ttl_errors(self) -> None:
        """A negative, unitless-fraction or unknown-unit FileTTL names the key."""
        for value in ("-1", '"7 days"', '"1.5h"', '"h"', "true", '"7d garbage"'):
            with self.assertRaises(ConfigError) as caught:
                parse_config(tomllib.loads(f"FileTTL = {value}"), "t.toml")
            self.assertIn("t.toml: FileTTL:", str(caught.exception), value)


class ExpiryConfigTests(ConfigFileTestCase):
    def test_expiry_keys(self) -> None:
        """ExpiryInterval is a duration of at least 1 s, ExpiryBatch an integer of at least 1."""
        config = self.load('ExpiryInterval = "2m"\nexpirybatch = 50\n')[1]
        self.assertEqual((config.expiry_interval, config.expiry_batch), (120, 50))
        self.assertEqual((Config().expiry_interval, Config().expiry_batch), (60, 200))
        for value in ("0", '"0s"', "-5", "true", '"soon"'):
            self.assertConfigError(f"ExpiryInterval = {value}\n", "ExpiryInterval", ">= 1")
        for value in ("0", "-1", '"500"', "true", "2.5"):
            self.assertConfigError(f"ExpiryBatch = {value}\n", "ExpiryBatch", ">= 1")


class WorkersConfigTests(ConfigFileTestCase):
    def test_workers(self) -> None:
        """Workers is a number of processes, from 1 to 64."""
        self.assertEqual(self.load("Workers = 4\n")[1].workers, 4)
        self.assertEqual(self.load("workers = 64\n")[1].workers, 64)
        for value in ("0", "65", "-1"):
            self.assertConfigError(
                f"Workers = {value}\n", "Workers", "must be an integer from 1 to 64", value
            )
        for value in ('"2"', "true", "1.5"):
            self.assertConfigError(f"Workers = {value}\n", "Workers", "integer from 1 to 64")

    def test_limits_kept_per_process_refused(self) -> None:
        """Limits counted in each process would let N times through: refused with Workers."""
        for key in ("RateLimitPerMinute", "MaxTotalBytesPerSecond"):
            self.assertConfigError(
                f"Workers = 2\n{key} = 100\n",
                key,
                "cannot be enforced across processes: use it with Workers = 1",
            )
            self.assertEqual(self.load(f"Workers = 1\n{key} = 100\n")[1].workers, 1)
        for listen in (
            'UnixSocket = true\nListenPort = "/run/hmacfs.sock"',
            'ListenPort = "ssl:8443:privateKey=k.pem"',
            'ListenPort = "systemd:domain=INET:index=0"',
        ):
            self.assertConfigError(
                f"Workers = 2\n{listen}\n", "ListenPort", "need a plain TCP listener"
            )
        for listen in ('"[::1]:8080"', '"tcp:8080:interface=127.0.0.1"', "8080"):
            self.assertEqual(self.load(f"Workers = 2\nListenPort = {listen}\n")[1].workers, 2)
        config = self.load('Workers = 2\nMaxBytesPerSecond = "1MB"\n')[1]
        self.assertEqual((config.workers, config.max_bytes_per_second), (2, 1 << 20))


class RateLimitConfigTests(SynchronousTestCase):
    def test_rate_limit_keys(self) -> None:
        """RateLimitPerMinute, RateLimitBurst and TrustedProxies parse to their fields."""
        config = parse_config(
            tomllib.loads(
                "RateLimitPerMinute = 120\nRateLimitBurst = 10\n"
                'TrustedProxies = ["127.0.0.1", "10.0.0.0/8", "::1"]\n'
            ),
            "t.toml",
        )
        self.assertEqual(
            (config.rate_limit_per_minute, config.rate_limit_burst, config.trusted_proxies),
            (120, 10, ("127.0.0.1", "10.0.0.0/8", "::1")),
        )

    def test_bad_trusted_proxies(self) -> None:
        """A TrustedProxies entry that is no address, or not a list, names the key."""
        for value in ('["10.0.0.0/33"]', '["proxy.example"]', '"127.0.0.1"', "[1]"):
            with self.assertRaises(ConfigError) as caught:
                parse_config(tomllib.loads(f"TrustedProxies = {value}"), "t.toml")
            self.assertIn("t.toml: TrustedProxies:", str(caught.exception), value)


class ComponentConfigTests(SynchronousTestCase):
    COMPONENT = (
        'ComponentJID = "Upload.Example.org"\n'
        'ComponentSecret = "s3cret"\n'
        'ComponentServer = "xmpp.example.org:5347"\n'
        'PublicURL = "https://files.example.org/upload"\n'
    )

    def parse(self, text: str) -> Config:
        return parse_config(tomllib.loads(text), "t.toml")

    def refused(self, text: str, key: str, fragment: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.parse(text)
        message = str(caught.exception)
        self.assertTrue(message.startswith(f"t.toml: {key}:"), message)
        self.assertIn(fragment, message)
        return message

    def test_component_keys(self) -> None:
        """The four keys parse; the JID is lowercased, PublicURL gets its trailing slash."""
        config = self.parse(self.COMPONENT)
        self.assertEqual(
            (config.component_jid, config.component_server, config.public_url),
            ("upload.example.org", "xmpp.example.org:5347", "https://files.example.org/upload/"),
        )
        self.assertEqual(config.component_address, ("xmpp.example.org", 5347))
        self.assertEqual(config.upload_domains, ("example.org",))
        self.assertEqual(config.component_protocol, "v2")
        self.assertNotIn("s3cret", repr(config))

    def test_allowed_domains_and_protocol(self) -> None:
        config = self.parse(
            self.COMPONENT
            + 'ComponentAllowedDomains = ["Example.org", "chat.example.net"]\n'
            + 'ComponentProtocol = "JWT"\n'
        )
        self.assertEqual(config.upload_domains, ("example.org", "chat.example.net"))
        self.assertEqual(config.component_protocol, "jwt")
        ipv6 = self.parse(self.COMPONENT.replace("xmpp.example.org:5347", "[::1]:5347"))
        self.assertEqual(ipv6.component_address, ("::1", 5347))

    def test_keys_go_together(self) -> None:
        """Any one of them without the others names the first one missing."""
        lines = self.COMPONENT.splitlines(keepends=True)
        for i, line in enumerate(lines):
            key = line.split(" = ")[0]
            self.refused("".join(lines[:i] + lines[i + 1 :]), key, "go together")

    def test_bad_values(self) -> None:
        cases = [
            ('ComponentJID = "alice@example.org"', "ComponentJID", "bare domain"),
            ('ComponentJID = "upload..example.org"', "ComponentJID", "bare domain"),
            ('ComponentServer = "xmpp.example.org"', "ComponentServer", "host:port"),
            ('ComponentServer = "xmpp.example.org:0"', "ComponentServer", "host:port"),
            ('PublicURL = "ftp://files.example.org/"', "PublicURL", "http(s) URL"),
            ('PublicURL = "https:///upload/"', "PublicURL", "http(s) URL"),
            ('PublicURL = "https://f.example/upload/?x=1"', "PublicURL", "no query"),
            ('ComponentProtocol = "v3"', "ComponentProtocol", '"v", "v2", "token", "jwt"'),
            ('ComponentAllowedDomains = "example.org"', "ComponentAllowedDomains", "a list"),
            ('ComponentAllowedDomains = ["a b"]', "ComponentAllowedDomains", "'a b' is not"),
            ('ComponentJID = "upload.example.org:5347"', "ComponentJID", "bare domain"),
            ('ComponentJID = "*.example.org"', "ComponentJID", "bare domain"),
            ('ComponentJID = "up_load.example.org"', "ComponentJID", "bare domain"),
            ('ComponentJID = "-upload.example.org"', "ComponentJID", "bare domain"),
            ('ComponentJID = "upload\\u0000.example.org"', "ComponentJID", "bare domain"),
            ('ComponentSecret = "   "', "ComponentSecret", "blank"),
            ('PublicURL = "https://f.example:99999/u/"', "PublicURL", "port from 1 to 65535"),
            ('PublicURL = "https://f.example:0/u/"', "PublicURL", "port from 1 to 65535"),
            ('PublicURL = "https://u:pw@f.example/u/"', "PublicURL", "no user or password"),
            ('PublicURL = "https://f.example/my files/"', "PublicURL", "no spaces"),
            ('PublicURL = "https://f.example/u/#"', "PublicURL", "no query or fragment"),
        ]
        for line, key, fragment in cases:
            self.refused(line + "\n", key, fragment)

    def test_domains_normalised_as_jids_are(self) -> None:
        """Domains get the nameprep JIDs get, so a configured domain matches its users."""
        config = self.parse(
            self.COMPONENT.replace("Upload.Example.org", "Upload.Straße.example")
            + 'ComponentAllowedDomains = ["STRASSE.example", "Bücher.example"]\n'
        )
        self.assertEqual(config.component_jid, "upload.strasse.example")
        self.assertEqual(config.upload_domains, ("strasse.example", "bücher.example"))

    def test_component_keys_alone(self) -> None:
        """PublicURL or ComponentAllowedDomains without a component is a mistake, not a no-op."""
        for line in ('PublicURL = "https://f.example/u/"', 'ComponentAllowedDomains = ["a.b"]'):
            self.refused(line + "\n", "ComponentJID", "go together")

    def test_top_level_jid_needs_domains(self) -> None:
        """A JID not under a domain (e.g. "uploads") must say whose users it serves."""
        text = self.COMPONENT.replace("Upload.Example.org", "uploads")
        self.refused(text, "ComponentAllowedDomains", "whose users")
        config = self.parse(text + 'ComponentAllowedDomains = ["example.org"]\n')
        self.assertEqual(config.upload_domains, ("example.org",))

    def test_ping_keys(self) -> None:
        """Keepalive timing: 15 s and 15 s by default, seconds or durations; 0 turns pings off."""
        config = self.parse(self.COMPONENT)
        self.assertEqual((config.component_ping_interval, config.component_ping_timeout), (15, 15))
        for text, expected in (
            ("ComponentPingInterval = 5\nComponentPingTimeout = 2\n", (5, 2)),
            ('ComponentPingInterval = "1m"\nComponentPingTimeout = "30s"\n', (60, 30)),
            ("ComponentPingInterval = 0\nComponentPingTimeout = 1\n", (0, 1)),
        ):
            config = self.parse(self.COMPONENT + text)
            self.assertEqual(
                (config.component_ping_interval, config.component_ping_timeout), expected, text
            )

    def test_bad_ping_keys(self) -> None:
        """A negative interval, a timeout under a second or a non-duration is refused by name."""
        cases = [
            ("ComponentPingInterval = -1", "ComponentPingInterval", "duration >= 0"),
            ('ComponentPingInterval = "soon"', "ComponentPingInterval", "duration >= 0"),
            ("ComponentPingInterval = 1.5", "ComponentPingInterval", "got float"),
            ("ComponentPingTimeout = 0", "ComponentPingTimeout", "ComponentPingInterval = 0"),
            ('ComponentPingTimeout = "0s"', "ComponentPingTimeout", "duration >= 1 s"),
            ("ComponentPingTimeout = -3", "ComponentPingTimeout", "duration >= 0"),
            ("ComponentPingTimeout = true", "ComponentPingTimeout", "got boolean"),
        ]
        for line, key, fragment in cases:
            self.refused(self.COMPONENT + line + "\n", key, fragment)

    def test_secret_never_in_errors(self) -> None:
        message = self.refused('ComponentSecret = ["hunter2-secret"]\n', "ComponentSecret", "")
        self.assertNotIn("hunter2", message)
