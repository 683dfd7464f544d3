"""
The hmacfs command: sign, upload (whole, in pieces, resuming), check-config.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd import auth, cli
from hmacd.upload import UploadRequest
from tests.support import SECRET, LoopbackServer, store_files
from tests.test_http import body_of, raw_request


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


class SignTests(TestCase):
    @inlineCallbacks
    def test_signed_urls_upload(self):
        """For v, v2 and token, the printed URL is accepted by the server."""
        server = LoopbackServer(self)
        for protocol in ("v", "v2", "token"):
            path = f"cli/{protocol}.txt"
            code, out, _ = run_cli(
                "sign", "--secret", SECRET.decode(), "--protocol", protocol,
                "--base-url", server.base + "/upload/", path, "5", "text/plain",
            )  # fmt: skip
            self.assertEqual(code, 0)
            url = out.strip()
            target = url[len(server.base) :]
            response = yield deferToThread(
                raw_request, server, "PUT", target, b"hello", {"Content-Type": "text/plain"}
            )
            self.assertEqual(response.code, 201, protocol)

    @inlineCallbacks
    def test_jwt_prints_header(self):
        """For jwt, the URL and an Authorization header that the server accepts."""
        server = LoopbackServer(self)
        code, out, _ = run_cli(
            "sign", "--secret", SECRET.decode(), "--protocol", "jwt",
            "--base-url", server.base + "/upload/", "slot9/a.png", "4", "image/png",
        )  # fmt: skip
        self.assertEqual(code, 0)
        url, header = out.strip().splitlines()
        name, value = header.split(": ", 1)
        self.assertEqual(name, "Authorization")
        response = yield deferToThread(
            raw_request, server, "PUT", url[len(server.base) :], b"\x89PNG", {name: value}
        )
        self.assertEqual(response.code, 201)


class CommandLineErrors(SynchronousTestCase):
    def test_errors_are_one_line(self):
        """A missing secret, a bad config, a JWT path without a slot: one line, exit 1."""
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f'StoreDir = "{self.mktemp()}"\n')
        self.patch(os, "environ", {})
        for argv, expected in (
            (("sign", "--config", config, "a.txt", "1"), "no secret"),
            (("sign", "--config", "/nonexistent.toml", "a.txt", "1"), "cannot read"),
            (("sign", "--secret", "s", "--protocol", "jwt", "a.txt", "1"), "SLOT/FILENAME"),
            (("check-config", "/nonexistent.toml"), "cannot read"),
            (("upload", "/nonexistent.bin", "http://127.0.0.1:1/"), "no such file"),
        ):
            code, _, err = run_cli(*argv)
            self.assertEqual(code, 1, argv)
            self.assertIn(expected, err, argv)
            self.assertEqual(err.count("\n"), 1, err)
            self.assertNotIn("Traceback", err)

    def test_check_config_masks_secrets(self):
        """check-config prints the effective values with the secret masked."""
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(
                'Secret = "very-secret"\nUploadMaxSize = "10MB"\nRedisPassword = "redis-pw"\n'
                'ComponentJID = "upload.example.org"\nComponentSecret = "component-pw"\n'
                'ComponentServer = "localhost:5347"\nPublicURL = "https://f.example.org/u/"\n'
            )
        code, out, _ = run_cli("check-config", config)
        self.assertEqual(code, 0)
        for field in ("secret", "redis_password", "component_secret"):
            self.assertIn(f"{field} = '***'", out)
        self.assertIn("upload_max_size = 10485760", out)
        for secret in ("very-secret", "redis-pw", "component-pw"):
            self.assertNotIn(secret, out)

    def test_help_everywhere(self):
        """Every subcommand has --help."""
        for command in ("sign", "upload", "check-config"):
            with self.assertRaises(SystemExit) as caught:
                run_cli(command, "--help")
            self.assertEqual(caught.exception.code, 0)


class UploadTests(TestCase):
    timeout = 60

    def signed(self, server, name: str, size: int) -> str:
        url, _ = auth.slot_put(SECRET, server.base + "/upload/", name, size, None, "v", 0)
        return url

    def upload(self, *args, **kwargs):
        return Deferred.fromCoroutine(cli.upload_file(reactor, *args, **kwargs))

    @inlineCallbacks
    def test_whole_and_pieces(self):
        """A small file goes in one PUT, a large one in resumable pieces; both arrive whole."""
        server = LoopbackServer(self)
        for name, size, chunk in (("small.bin", 5000, 1 << 20), ("large.bin", 3_500_000, 1 << 20)):
            source = self.mktemp()
            with open(source, "wb") as f:
                f.write(body_of(size, name))
            code = yield self.upload(source, self.signed(server, name, size), {}, chunk)
            self.assertEqual(code, 0, name)
            with open(os.path.join(server.root, name), "rb") as f:
                self.assertEqual(f.read(), body_of(size, name))

    @inlineCallbacks
    def test_resumes_after_dropped_connection(self):
        """When the connection drops mid-piece, the client asks for the offset and goes on."""
        server = LoopbackServer(self)
        size = 3_000_000
        source = self.mktemp()
        with open(source, "wb") as f:
            f.write(body_of(size, "drop"))
        dropped = []
        original = UploadRequest.handleContentChunk

        def flaky(request, data):
            original(request, data)
            upload = request._upload
            if not dropped and upload is not None and upload.start + upload.received > 1_500_000:
                dropped.append(upload.start + upload.received)
                request.channel.transport.abortConnection()

        self.patch(UploadRequest, "handleContentChunk", flaky)
        code = yield self.upload(source, self.signed(server, "d.bin", size), {}, 1 << 20)
        self.assertEqual(code, 0)
        self.assertEqual(len(dropped), 1)
        with open(os.path.join(server.root, "d.bin"), "rb") as f:
            self.assertEqual(
                hashlib.sha256(f.read()).digest(), hashlib.sha256(body_of(size, "drop")).digest()
            )

    @inlineCallbacks
    def test_refusal_reported(self):
        """A refused upload exits 1 with the status and the server's reason on stderr."""
        server = LoopbackServer(self)
        source = self.mktemp()
        with open(source, "wb") as f:
            f.write(b"12345")
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = yield self.upload(source, self.signed(server, "x.bin", 6), {}, 1 << 20)
        self.assertEqual(code, 1)
        self.assertEqual(err.getvalue().strip(), "hmacfs upload: 403 Forbidden: invalid MAC")
        self.assertEqual(store_files(server.root), [])


class ProgressTests(TestCase):
    @inlineCallbacks
    def test_progress_bar_on_request(self):
        """With progress on (a terminal), a tqdm bar with the byte rate goes to stderr."""
        server = LoopbackServer(self)
        source = self.mktemp()
        with open(source, "wb") as f:
            f.write(b"p" * 300_000)
        url, _ = auth.slot_put(SECRET, server.base + "/upload/", "p.bin", 300_000, None, "v", 0)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = yield Deferred.fromCoroutine(
                cli.upload_file(reactor, source, url, {}, 100_000, progress=True)
            )
        self.assertEqual(code, 0)
        self.assertIn("293k/293k", err.getvalue())
        self.assertIn("B/s", err.getvalue())


class BaseUrlTests(SynchronousTestCase):
    def test_from_listen_port(self):
        """The default base URL follows ListenPort in every TCP form; others need --base-url."""
        from hmacd.config import Config

        for listen, url in (
            ("127.0.0.1:8080", "http://127.0.0.1:8080/upload/"),
            (":8080", "http://127.0.0.1:8080/upload/"),
            ("8080", "http://127.0.0.1:8080/upload/"),
            ("tcp:8080", "http://127.0.0.1:8080/upload/"),
            ("tcp:9000:interface=10.0.0.5", "http://10.0.0.5:9000/upload/"),
            ("[::]:5050", "http://[::1]:5050/upload/"),
            ("[::1]:5050", "http://[::1]:5050/upload/"),
        ):
            self.assertEqual(cli._default_base_url(Config(listen_port=listen)), url, listen)
        for config in (
            Config(listen_port="/run/hmacfs.sock", unix_socket=True),
            Config(listen_port="ssl:8443:privateKey=k.pem"),
        ):
            self.assertRaises(cli.UserError, cli._default_base_url, config)
