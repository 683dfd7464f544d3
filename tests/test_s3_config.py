"""The object-store keys of the config (StorageBackend, S3*): defaults, checks, secrets."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from hmacd.config import S3_MIN_PART, Config, ConfigError, parse_config

S3 = {"StorageBackend": "s3", "S3Endpoint": "http://127.0.0.1:8333", "S3Bucket": "files"}


class S3ConfigTests(SynchronousTestCase):
    """StorageBackend = "s3" and the S3 keys."""

    def test_defaults(self) -> None:
        """An empty file means the local directory, and S3's defaults where it is chosen."""
        config = parse_config({}, "t")
        self.assertEqual(config.storage_backend, "local")
        config = parse_config(S3, "t")
        self.assertEqual(
            (config.storage_backend, config.s3_region, config.s3_addressing_style),
            ("s3", "us-east-1", "path"),
        )
        self.assertEqual((config.s3_prefix, config.s3_redirect_downloads), ("", False))
        self.assertGreaterEqual(config.s3_part_size, S3_MIN_PART)

    def test_endpoint_and_bucket_required(self) -> None:
        """Without S3Endpoint or S3Bucket, "s3" is a one-line error naming the key."""
        for missing in ("S3Endpoint", "S3Bucket"):
            data = {k: v for k, v in S3.items() if k != missing}
            with self.assertRaises(ConfigError) as caught:
                parse_config(data, "t.toml")
            self.assertEqual(caught.exception.key, missing)
            self.assertNotIn("\n", str(caught.exception))
            self.assertIn(missing, str(caught.exception))

    def test_endpoint_is_a_url(self) -> None:
        """An S3Endpoint that is no http(s) URL is refused at start."""
        with self.assertRaises(ConfigError) as caught:
            parse_config({**S3, "S3Endpoint": "127.0.0.1:8333"}, "t")
        self.assertEqual(caught.exception.key, "S3Endpoint")

    def test_choices(self) -> None:
        """StorageBackend and S3AddressingStyle take their names only (any case)."""
        self.assertEqual(parse_config({"StorageBackend": "S3", **S3}, "t").storage_backend, "s3")
        self.assertEqual(
            parse_config({**S3, "S3AddressingStyle": "Virtual"}, "t").s3_addressing_style,
            "virtual",
        )
        for key, value in (("StorageBackend", "nfs"), ("S3AddressingStyle", "dns")):
            with self.assertRaises(ConfigError) as caught:
                parse_config({**S3, key: value}, "t")
            self.assertEqual(caught.exception.key, key)

    def test_part_minimum(self) -> None:
        """S3PartSize and S3MultipartThreshold below S3's 5 MiB part are refused."""
        for key in ("S3PartSize", "S3MultipartThreshold"):
            with self.assertRaises(ConfigError) as caught:
                parse_config({**S3, key: "4MB"}, "t")
            self.assertEqual(caught.exception.key, key)
            self.assertEqual(getattr(parse_config({**S3, key: "5MB"}, "t"), key.lower()
                             .replace("s3partsize", "s3_part_size")
                             .replace("s3multipartthreshold", "s3_multipart_threshold")),
                             S3_MIN_PART)  # fmt: skip

    def test_redirect_downloads(self) -> None:
        """S3RedirectDownloads is a boolean, off unless asked for."""
        self.assertTrue(
            parse_config({**S3, "S3RedirectDownloads": True}, "t").s3_redirect_downloads
        )
        with self.assertRaises(ConfigError) as caught:
            parse_config({**S3, "S3RedirectDownloads": "yes please"}, "t")
        self.assertEqual(caught.exception.key, "S3RedirectDownloads")

    def test_credentials_from_environment(self) -> None:
        """The file's keys win; missing ones come from HMACFS_S3_ACCESS_KEY/SECRET_KEY."""
        environ = {"HMACFS_S3_ACCESS_KEY": "env-ak", "HMACFS_S3_SECRET_KEY": "env-sk"}
        self.assertEqual(parse_config(S3, "t").s3_credentials(environ), ("env-ak", "env-sk"))
        config = parse_config({**S3, "S3AccessKey": "ak", "S3SecretKey": "sk"}, "t")
        self.assertEqual(config.s3_credentials(environ), ("ak", "sk"))
        self.assertEqual(config.s3_credentials({}), ("ak", "sk"))

    def test_secrets_never_shown(self) -> None:
        """repr(Config) masks both S3 keys."""
        text = repr(Config(s3_access_key="AKIDVALUE", s3_secret_key="SECRETVALUE"))
        self.assertNotIn("AKIDVALUE", text)
        self.assertNotIn("SECRETVALUE", text)
        self.assertIn("s3_secret_key='***'", text)
