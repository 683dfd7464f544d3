"""
A slot issuer inside another Twisted program: hands out signed PUT/GET URLs
for a running hmacfs, as an XMPP server's upload module would.

    python examples/slot_issuer.py SECRET BASE_URL [PORT]

    curl 'http://127.0.0.1:8082/slot?name=photo.jpg&size=23026&type=image/jpeg'
    {"put": "http://.../upload/<uuid>/photo.jpg?v2=...", "get": "...", "headers": {}}
"""

from __future__ import annotations

import json
import sys
import uuid

from twisted.internet import endpoints, task
from twisted.internet.defer import Deferred
from twisted.web import resource, server

from hmacd import sign_jwt, sign_v2


class SlotResource(resource.Resource):
    """GET /slot?name=&size=&type=[&jwt=1] -> a JSON slot, signed v2 (or a JWT)."""

    isLeaf = True

    def __init__(self, secret: bytes, base_url: str, clock, max_size: int = 0) -> None:
        super().__init__()
        self.secret = secret
        self.base_url = base_url.rstrip("/") + "/"
        self.clock = clock
        self.max_size = max_size

    def render_GET(self, request) -> bytes:
        from urllib.parse import quote

        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        name, size, ctype = args.get("name", ""), args.get("size", ""), args.get("type")
        if not name or "/" in name or name.startswith(".") or not size.isdigit():
            request.setResponseCode(400)
            return b'{"error": "name (a file name) and size (bytes) are required"}\n'
        if self.max_size and int(size) > self.max_size:
            request.setResponseCode(413)
            return json.dumps({"error": "file-too-large", "max-size": self.max_size}).encode()
        slot = uuid.uuid4().hex
        path = f"{slot}/{name}"
        url = self.base_url + quote(path)
        if args.get("jwt"):
            now = int(self.clock.seconds())
            token = sign_jwt(
                self.secret, slot=slot, filename=name, filesize=int(size), filetype=ctype,
                exp=now + 300, iat=now,
            )  # fmt: skip
            answer = {"put": url, "get": url, "headers": {"Authorization": f"Bearer {token}"}}
        else:
            mac = sign_v2(self.secret, path, int(size), ctype)
            answer = {"put": f"{url}?v2={mac}", "get": url, "headers": {}}
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(answer).encode() + b"\n"


def issuer_site(secret: bytes, base_url: str, clock) -> server.Site:
    root = resource.Resource()
    root.putChild(b"slot", SlotResource(secret, base_url, clock))
    return server.Site(root)


def main(reactor, secret: str, base_url: str, port: str = "8082") -> Deferred:
    site = issuer_site(secret.encode("utf-8"), base_url, reactor)
    endpoints.TCP4ServerEndpoint(reactor, int(port), interface="127.0.0.1").listen(site)
    print(f"issuing slots for {base_url} at http://127.0.0.1:{port}/slot")
    return Deferred()


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
