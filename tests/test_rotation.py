"""
Secret rotation: C{PreviousSecrets} (and C{HMACFS_PREVIOUS_SECRETS}) verify slots as C{Secret}
does, in every protocol, over real HTTP and in the worker processes of C{Workers = 2}; the
server says (by position, never by value) when one of them is used, and check-config warns of
a previous secret that is the current one.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd import auth
from hmacd.config import Config, ConfigError, parse_config
from hmacd.metrics import Metrics
from hmacd.prepare import PrepareError, prepare_store
from hmacd.secret import (
    PREVIOUS_ENV_VAR,
    PreviousSecretUses,
    SecretError,
    parse_previous_secrets,
    resolve_previous_secrets,
)
from hmacd.verdict import Plan, Refusal, judge
from tests import test_workers
from tests.support import LoopbackServer, load_vectors
from tests.test_cli import run_cli
from tests.test_http import upload_vectors
from tests.test_tap import TwistdHarness, _http

NEW = b"the-new-secret"
OLD = b"an-old-secret-\xc3\xa9"
NOW = 1_700_000_000.0


class _Policy:
    """What judge() reads: the current secret and the previous ones."""

    def __init__(self, secret: bytes, previous: tuple[bytes, ...]) -> None:
        self.secret = secret
        self.previous_secrets = previous
        self.prefix = "upload"
        self.upload_max_size = 0


def _judged(vector: dict[str, Any], base_url: str, policy: _Policy) -> Plan | Refusal:
    """The verdict on the PUT of a real slot, at a time inside its validity."""
    target = urllib.parse.urlsplit(vector["put_url"])
    headers = {k.lower(): [v] for k, v in vector["put_headers"].items()}
    if vector["content_type"] is not None:
        headers["content-type"] = [vector["content_type"]]
    return judge(
        target.path.encode("latin-1"),
        target.query.encode("latin-1"),
        vector["size"],
        headers,
        policy,
        vector["issued_at"] + 1,
    )


class VerifyAnyTests(SynchronousTestCase):
    """auth.verify_hmac_any and verify_jwt_any: the position of the secret that signed."""

    def test_hmac_position(self) -> None:
        """Each protocol's MAC verifies under the secret that made it, at its position."""
        secrets = (NEW, b"middle", OLD)
        for protocol, sign in (
            ("v", lambda s: auth.sign_v(s, "a/b.txt", 3)),
            ("v2", lambda s: auth.sign_v2(s, "a/b.txt", 3, "text/plain")),
            ("token", lambda s: auth.sign_token(s, "a/b.txt", 3, "text/plain")),
        ):
            for position, secret in enumerate(secrets):
                mac = sign(secret)
                self.assertEqual(
                    auth.verify_hmac_any(protocol, secrets, "a/b.txt", 3, "text/plain", mac),
                    position,
                    protocol,
                )
                self.assertEqual(
                    auth.verify_hmac_any(
                        protocol, secrets, "a/b.txt", 3, "text/plain", mac.upper()
                    ),
                    position,
                )
            wrong = sign(b"nobody's")
            self.assertIsNone(
                auth.verify_hmac_any(protocol, secrets, "a/b.txt", 3, "text/plain", wrong)
            )

    def test_hmac_same_secret_twice(self) -> None:
        """A secret listed twice verifies at its first position."""
        mac = auth.sign_v(OLD, "a/b", 1)
        self.assertEqual(auth.verify_hmac_any("v", (NEW, OLD, OLD), "a/b", 1, None, mac), 1)

    def test_hmac_tries_every_secret(self) -> None:
        """The loop does not stop at the match: each secret costs one HMAC, whichever signed."""
        tried: list[bytes] = []
        original = auth.verify_hmac

        def spy(protocol, secret, *rest):
            tried.append(secret)
            return original(protocol, secret, *rest)

        self.patch(auth, "verify_hmac", spy)
        mac = auth.sign_v(NEW, "a/b", 1)
        self.assertEqual(auth.verify_hmac_any("v", (NEW, b"x", OLD), "a/b", 1, None, mac), 0)
        self.assertEqual(tried, [NEW, b"x", OLD])

    def _jwt(self, secret: bytes, **claims: Any) -> str:
        fields: dict[str, Any] = dict(
            slot="s", filename="f.txt", filesize=3, filetype="text/plain", exp=int(NOW) + 60
        )
        fields.update(claims)
        return auth.sign_jwt(secret, **fields)

    def test_jwt_position(self) -> None:
        """A token signed with a previous secret verifies, and says which."""
        slot, position = auth.verify_jwt_any((NEW, OLD), self._jwt(OLD), now=NOW)
        self.assertEqual((slot.slot, slot.filename, position), ("s", "f.txt", 1))
        self.assertEqual(auth.verify_jwt_any((NEW, OLD), self._jwt(NEW), now=NOW)[1], 0)

    def test_jwt_no_secret_signed(self) -> None:
        """A token none of the secrets signed is a bad signature."""
        self.assertRaises(
            auth.BadSignature, auth.verify_jwt_any, (NEW, OLD), self._jwt(b"x"), now=NOW
        )

    def test_jwt_genuine_but_expired(self) -> None:
        """A previous secret's genuine token that expired says so, not 'bad signature'."""
        token = self._jwt(OLD, exp=int(NOW) - 1)
        self.assertRaises(auth.TokenExpired, auth.verify_jwt_any, (NEW, OLD), token, now=NOW)

    def test_jwt_malformed(self) -> None:
        """A token that is no JWT is invalid under any number of secrets."""
        self.assertRaises(auth.TokenInvalid, auth.verify_jwt_any, (NEW, OLD), "x.y.z", now=NOW)

    def test_jwt_needs_a_secret(self) -> None:
        """No secret at all is the caller's mistake."""
        self.assertRaises(ValueError, auth.verify_jwt_any, (), self._jwt(NEW), now=NOW)


class VectorRotationTests(SynchronousTestCase):
    """Every real slot verifies with its secret given as a previous one, at its position."""

    def test_every_vector_as_previous_secret(self) -> None:
        """Each of the 28 vectors is a Plan naming previous secret #2 when the current is other."""
        vectors = load_vectors()
        secret = vectors["secret"].encode("utf-8")
        policy = _Policy(NEW, (OLD, secret))
        self.assertEqual(len(vectors["vectors"]), 28)
        for vector in vectors["vectors"]:
            plan = _judged(vector, vectors["base_url"], policy)
            self.assertIsInstance(plan, Plan, (vector["issuer"], vector["filename"], plan))
            assert isinstance(plan, Plan)
            self.assertEqual(plan.previous, 2, vector["filename"])
            self.assertEqual(plan.size, vector["size"])

    def test_current_secret_is_position_zero(self) -> None:
        """With the vectors' secret current, no previous secret is named."""
        vectors = load_vectors()
        policy = _Policy(vectors["secret"].encode("utf-8"), (OLD,))
        for vector in vectors["vectors"]:
            plan = _judged(vector, vectors["base_url"], policy)
            assert isinstance(plan, Plan), plan
            self.assertEqual(plan.previous, 0)

    def test_wrong_secret_everywhere(self) -> None:
        """No position holding the vectors' secret: every vector is refused with 403."""
        vectors = load_vectors()
        policy = _Policy(NEW, (OLD, b"yet another"))
        for vector in vectors["vectors"]:
            refusal = _judged(vector, vectors["base_url"], policy)
            self.assertIsInstance(refusal, Refusal, vector["filename"])
            assert isinstance(refusal, Refusal)
            self.assertEqual(refusal.status, 403, (vector["issuer"], refusal.reason))


class UsesTests(SynchronousTestCase):
    """PreviousSecretUses: every use counted, one log line per position a minute at most."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.events: list[dict] = []

        class _Log:
            def info(log, format: str, **kw: Any) -> None:
                self.events.append(dict(kw, log_format=format, log_level=LogLevel.info))

        self.uses = PreviousSecretUses(
            self.clock.seconds, self.metrics.previous_secret_uses, _Log()
        )

    def count(self, position: int) -> float:
        value = self.metrics.registry.get_sample_value(
            "hmac_file_server_previous_secret_uses_total", {"position": str(position)}
        )
        return value or 0.0

    def lines(self) -> list[str]:
        from twisted.logger import formatEvent

        return [formatEvent(e) for e in self.events]

    def test_rate_limited_per_position(self) -> None:
        """Many uses in a minute: one line per position, every use counted."""
        for _ in range(5):
            self.uses.used(1)
        self.uses.used(2)
        self.assertEqual(
            self.lines(),
            ["verified with previous secret #1", "verified with previous secret #2"],
        )
        self.assertEqual((self.count(1), self.count(2)), (5.0, 1.0))
        self.clock.advance(59)
        self.uses.used(1)
        self.assertEqual(len(self.events), 2)
        self.clock.advance(1)
        self.uses.used(1)
        self.assertEqual(
            self.lines()[-1],
            "verified with previous secret #1 (5 more uses since the last such line)",
        )
        self.assertEqual(self.count(1), 7.0)


class ConfigTests(SynchronousTestCase):
    """PreviousSecrets in the config and HMACFS_PREVIOUS_SECRETS in the environment."""

    def test_config_key(self) -> None:
        """A list of strings is read, and never shown."""
        config = parse_config({"PreviousSecrets": ["old-one", "older"]}, "t.toml")
        self.assertEqual(config.previous_secrets, ("old-one", "older"))
        self.assertNotIn("old-one", repr(config))
        self.assertIn("previous_secrets='***'", repr(config))
        self.assertEqual(Config().previous_secrets, ())

    def test_config_refused(self) -> None:
        """Not a list of non-empty strings: an error naming the key, never the value."""
        for value in ("old-one", [""], ["ok", 3], {"a": "old-one"}):
            e = self.assertRaises(ConfigError, parse_config, {"PreviousSecrets": value}, "t.toml")
            self.assertIn("PreviousSecrets", str(e))
            self.assertNotIn("old-one", str(e))

    def test_environment(self) -> None:
        """The variable, a JSON list, overrides the config; even [] does."""
        env = {PREVIOUS_ENV_VAR: json.dumps(["é-old", "b,c"])}
        self.assertEqual(
            resolve_previous_secrets(("cfg",), env), (("é-old", "b,c"), PREVIOUS_ENV_VAR)
        )
        self.assertEqual(resolve_previous_secrets(("cfg",), {PREVIOUS_ENV_VAR: "[]"})[0], ())
        self.assertEqual(resolve_previous_secrets(("cfg",), {}), (("cfg",), "the config file"))

    def test_environment_refused(self) -> None:
        """A variable that is no JSON list of non-empty strings: one line, without its text."""
        for text in ("s3cr3t", '"s3cr3t"', '["s3cr3t", 1]', '["s3cr3t", ""]', '{"s3cr3t": 1}'):
            e = self.assertRaises(SecretError, parse_previous_secrets, text)
            self.assertIn(PREVIOUS_ENV_VAR, str(e))
            self.assertNotIn("s3cr3t", str(e))

    def test_prepare_puts_them_in_the_config(self) -> None:
        """prepare_store resolves the variable into the config the services (and Workers) get."""
        config = Config(secret="new", previous_secrets=("cfg",), store_dir=self.mktemp())
        prepared = prepare_store(config, environ={PREVIOUS_ENV_VAR: '["from-env"]'})
        self.assertEqual(prepared.config.previous_secrets, ("from-env",))
        e = self.assertRaises(
            PrepareError, prepare_store, config, environ={PREVIOUS_ENV_VAR: "from-env"}
        )
        self.assertNotIn("from-env", str(e))


class AnnounceTests(SynchronousTestCase):
    """The start-up line says how many previous secrets there are, never what they are."""

    def test_count_announced(self) -> None:
        """Two previous secrets: the count is logged, neither value."""
        from twisted.logger import formatEvent

        from hmacd.services import Announce

        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        config = Config(secret="s" * 20, previous_secrets=("old-1", "old-2"), store_dir="/nope")
        Announce(config, "the config file", 20).startService()
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("2 previous secret(s) verify slots too (PreviousSecrets)", text)
        self.assertNotIn("old-", text)


class CheckConfigTests(SynchronousTestCase):
    """hmacfs check-config on previous secrets."""

    def setUp(self) -> None:
        self.patch(
            os,
            "environ",
            {k: v for k, v in os.environ.items() if not k.startswith("HMACFS_")},
        )

    def check(self, text: str) -> tuple[int, str, str]:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return run_cli("check-config", path)

    def test_warns_when_previous_is_current(self) -> None:
        """A previous secret equal to Secret is warned of, by position; no secret is shown."""
        code, out, err = self.check(
            'Secret = "same-one"\nPreviousSecrets = ["other", "same-one"]\n'
        )
        self.assertEqual(code, 0)
        self.assertIn("previous secret #2 equals the current secret (Secret)", err)
        self.assertIn("previous_secrets = '***'", out)
        self.assertNotIn("same-one", out + err)
        self.assertNotIn("other", out + err)

    def test_warns_of_environment(self) -> None:
        """HMACFS_SECRET and HMACFS_PREVIOUS_SECRETS are what the server would use."""
        os.environ["HMACFS_SECRET"] = "env-secret"
        os.environ[PREVIOUS_ENV_VAR] = '["env-secret"]'
        code, _, err = self.check('Secret = "cfg"\n')
        self.assertEqual(code, 0)
        self.assertIn(
            f"{PREVIOUS_ENV_VAR}: previous secret #1 equals the current secret (HMACFS_SECRET)",
            err,
        )

    def test_repeated(self) -> None:
        """A previous secret listed twice is warned of."""
        _, _, err = self.check('Secret = "s"\nPreviousSecrets = ["a", "b", "a"]\n')
        self.assertIn("previous secret #3 repeats #1", err)

    def test_quiet_when_rotated(self) -> None:
        """Distinct secrets: no warning."""
        code, _, err = self.check('Secret = "new"\nPreviousSecrets = ["old"]\n')
        self.assertEqual((code, err), (0, ""))

    def test_bad_environment(self) -> None:
        """A malformed variable is one line and a non-zero exit."""
        os.environ[PREVIOUS_ENV_VAR] = "old"
        code, _, err = self.check('Secret = "new"\n')
        self.assertNotEqual(code, 0)
        self.assertIn(PREVIOUS_ENV_VAR, err)


class HTTPRotationTests(TestCase):
    """Over a real socket: the vectors upload with their secret as a previous one."""

    @inlineCallbacks
    def test_vectors_over_http(self):
        """Every vector is 201 with the current secret another; the uses are counted and logged."""
        vectors = load_vectors()
        secret = vectors["secret"].encode("utf-8")
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        server = LoopbackServer(self, secret=NEW, previous_secrets=(OLD, secret), clock=clock)
        yield upload_vectors(self, server, clock)
        uses = server.fs.metrics.registry.get_sample_value(
            "hmac_file_server_previous_secret_uses_total", {"position": "2"}
        )
        self.assertEqual(uses, 28)
        from twisted.logger import formatEvent

        lines = [formatEvent(e) for e in events if "previous secret" in e.get("log_format", "")]
        # The vectors were issued within a minute of each other: one line says it.
        self.assertEqual(lines, ["verified with previous secret #2"])
        text = "\n".join(formatEvent(e) for e in events)
        self.assertNotIn(vectors["secret"], text)

    @inlineCallbacks
    def test_wrong_secret_refused(self):
        """A slot signed with none of the secrets is 403 and stores nothing."""
        server = LoopbackServer(self, secret=NEW, previous_secrets=(OLD,))
        mac = auth.sign_v(b"neither", "r/x.txt", 2)
        response = yield server.http.put(server.url("r/x.txt", f"v={mac}"), data=b"hi")
        self.assertEqual(response.code, 403)
        mac = auth.sign_v(OLD, "r/x.txt", 2)
        response = yield server.http.put(server.url("r/x.txt", f"v={mac}"), data=b"hi")
        self.assertEqual(response.code, 201)


class WorkersRotationTests(TwistdHarness):
    """twistd -n hmacfs with Workers = 2: the worker verifies with the previous secrets too."""

    # WorkersTests' harness, without its tests (they run in tests.test_workers).
    launch = test_workers.WorkersTests.launch
    start = test_workers.WorkersTests.start
    waitWorker = test_workers.WorkersTests.waitWorker
    log = test_workers.WorkersTests.log
    stopped = test_workers.WorkersTests.stopped
    metric = test_workers.WorkersTests.metric

    old = "an-old-secret-for-the-workers"

    def setUp(self) -> None:
        super().setUp()
        self.env["HMACFS_SECRET"] = NEW.decode()
        self.env[PREVIOUS_ENV_VAR] = json.dumps([self.old])

    def test_worker_verifies_with_previous(self) -> None:
        """
        HMACFS_PREVIOUS_SECRETS reaches the worker (on its pipe, not in its environment or
        command line): a slot signed with the old secret uploads there, one signed with
        neither is refused, and the log line comes back from the worker.
        """
        proc = self.start()
        for path in (f"/proc/{self.worker}/environ", f"/proc/{self.worker}/cmdline"):
            with open(path, "rb") as f:
                seen = f.read()
            self.assertNotIn(self.old.encode(), seen, path)
            self.assertNotIn(PREVIOUS_ENV_VAR.encode(), seen, path)
        body = b"rotated"
        mac = auth.sign_v(self.old.encode(), "rot/by-worker.txt", len(body))
        with self.stopped(proc):
            status, _ = _http(self.port, "PUT", f"/upload/rot/by-worker.txt?v={mac}", body)
        self.assertEqual(status, 201)
        status, got = _http(self.port, "GET", "/upload/rot/by-worker.txt")
        self.assertEqual((status, got), (200, body))
        mac = auth.sign_v(b"neither", "rot/no.txt", len(body))
        with self.stopped(proc):
            status, _ = _http(self.port, "PUT", f"/upload/rot/no.txt?v={mac}", body)
        self.assertEqual(status, 403)
        self.assertEqual(self.metric('previous_secret_uses_total{position="1"}'), 1)
        self.terminate(proc)
        log = self.log()
        self.assertRegex(log, r"\[worker 1\] verified with previous secret #1")
        self.assertNotIn(self.old, log)
        self.assertNotIn(NEW.decode(), log)
