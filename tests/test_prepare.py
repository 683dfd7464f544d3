"""
hmacd.prepare.prepare_store: what twistd and make_service both get ready on disk before a
server starts on a StoreDir, and the one-line errors when they cannot.
"""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import SkipTest, TestCase

from hmacd.claims import claims_file
from hmacd.config import Config
from hmacd.prepare import PrepareError, prepare_store
from hmacd.secret import secret_file


def _mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class PrepareStoreTests(TestCase):
    """StoreDir, the secret and what --uid must own, made ready once for every way to start."""

    def setUp(self) -> None:
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.store = os.path.join(self.tmp, "a", "store")

    def test_makes_store_and_generates_secret(self) -> None:
        """A missing StoreDir is made with its parents; the secret is generated 0600 and kept."""
        prepared = prepare_store(Config(store_dir=self.store), environ={})
        self.assertEqual(prepared.config.store_dir, self.store)
        self.assertEqual(_mode(secret_file(self.store)), 0o600)
        self.assertEqual(prepared.origin, f"{secret_file(self.store)} (generated)")
        self.assertEqual(
            prepared.created,
            (self.store, os.path.join(self.store, ".hmacfs"), secret_file(self.store)),
        )
        again = prepare_store(Config(store_dir=self.store), environ={})
        self.assertEqual((again.secret, again.created), (prepared.secret, ()))

    def test_relative_store_made_absolute(self) -> None:
        """A relative StoreDir comes back absolute in the prepared config."""
        relative = os.path.relpath(self.store)
        prepared = prepare_store(Config(store_dir=relative), secret=b"given")
        self.assertEqual(prepared.config.store_dir, self.store)

    def test_given_secret_writes_no_file(self) -> None:
        """A secret handed in (embedding) is used as is, with its origin; no secret file."""
        prepared = prepare_store(
            Config(store_dir=self.store), secret=b"given", origin="the embedding program"
        )
        self.assertEqual((prepared.secret, prepared.origin), (b"given", "the embedding program"))
        self.assertFalse(os.path.exists(secret_file(self.store)))

    def test_cli_and_environment_in_order(self) -> None:
        """--secret wins over HMACFS_SECRET, which wins over Secret in the config."""
        config = Config(store_dir=self.store, secret="from-config")
        env = {"HMACFS_SECRET": "from-env"}
        self.assertEqual(
            prepare_store(config, cli_secret="from-cli", environ=env).origin, "--secret"
        )
        self.assertEqual(prepare_store(config, environ=env).origin, "HMACFS_SECRET")
        self.assertEqual(prepare_store(config, environ={}).origin, "the config file")

    def test_shared_metrics_directory_emptied(self) -> None:
        """With Workers, the metrics directory is made empty (counters start from zero)."""
        old = os.path.join(self.store, ".hmacfs", "metrics")
        os.makedirs(old)
        with open(os.path.join(old, "counter_1.db"), "wb"):
            pass
        prepared = prepare_store(Config(store_dir=self.store), secret=b"s", shared_metrics=True)
        self.assertEqual(prepared.metrics_dir, old)
        self.assertEqual(os.listdir(old), [])
        self.assertEqual(_mode(old), 0o700)
        self.assertIsNone(prepare_store(Config(store_dir=self.store), secret=b"s").metrics_dir)

    def test_run_as_makes_claims_and_log_file(self) -> None:
        """With --uid, the claims file and LogFile are made now, so that user gets them."""
        log = os.path.join(self.tmp, "hmacfs.log")
        prepared = prepare_store(
            Config(store_dir=self.store, log_file=log),
            secret=b"s",
            run_as=(os.getuid(), os.getgid()),
        )
        self.assertTrue(os.path.isfile(claims_file(self.store)))
        self.assertTrue(os.path.isfile(log))
        self.assertIn(claims_file(self.store), prepared.created)
        self.assertIn(log, prepared.created)

    def test_run_as_makes_audit_log(self) -> None:
        """With --uid, AuditLog is made now (0640) for that user to reopen; a bad one says so."""
        audit = os.path.join(self.tmp, "audit.log")
        prepared = prepare_store(
            Config(store_dir=self.store, audit_log=audit),
            secret=b"s",
            run_as=(os.getuid(), os.getgid()),
        )
        self.assertIn(audit, prepared.created)
        self.assertEqual(_mode(audit), 0o640)
        bad = os.path.join(self.tmp, "no", "such", "dir", "audit.log")
        config = Config(store_dir=self.store, audit_log=bad, source="/etc/hmacfs.toml")
        e = self.assertRaises(
            PrepareError, prepare_store, config, secret=b"s", run_as=(os.getuid(), os.getgid())
        )
        self.assertEqual(
            str(e), f"/etc/hmacfs.toml: AuditLog: cannot open {bad}: No such file or directory"
        )

    def test_without_run_as_no_claims_file(self) -> None:
        """Without --uid nothing beyond StoreDir and the secret is made here."""
        prepare_store(Config(store_dir=self.store), secret=b"s")
        self.assertFalse(os.path.exists(claims_file(self.store)))

    def test_store_dir_under_a_file(self) -> None:
        """A StoreDir that cannot be made is one line naming the source, StoreDir and why."""
        blocker = os.path.join(self.tmp, "file")
        with open(blocker, "w"):
            pass
        config = Config(store_dir=os.path.join(blocker, "store"), source="/etc/hmacfs.toml")
        e = self.assertRaises(PrepareError, prepare_store, config, environ={})
        self.assertEqual(
            str(e),
            f"/etc/hmacfs.toml: StoreDir: cannot create {blocker}/store: Not a directory",
        )

    def test_not_writable_by_run_as_refused(self) -> None:
        """A StoreDir the --uid user cannot write is refused at start, naming the path."""
        if os.geteuid() != 0:
            raise SkipTest("handing files to another uid needs root")
        os.makedirs(self.store)
        os.chmod(self.store, 0o755)
        e = self.assertRaises(
            PrepareError, prepare_store, Config(store_dir=self.store), secret=b"s",
            run_as=(65534, 65534),
        )  # fmt: skip
        self.assertIn(f"defaults: StoreDir: {self.store} is not writable by uid 65534", str(e))
