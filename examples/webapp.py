"""
A twisted.web application that hosts hmacfs under /upload/ next to its own
pages, in one process and on one port.

    python examples/webapp.py [PORT] [STORE_DIR]

Then upload with a URL signed for /upload/... (for instance
`hmacfs sign --secret "$(cat STORE_DIR/.hmacfs/secret)" --base-url
http://127.0.0.1:PORT/upload/ some/file.txt 5`) and fetch it back.
"""

from __future__ import annotations

import sys

from twisted.application.service import MultiService
from twisted.internet import endpoints, task
from twisted.internet.defer import Deferred
from twisted.web import resource, server

from hmacd import Config, make_service, mount


class Home(resource.Resource):
    """The host application's own page."""

    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"the host application; files live under /upload/\n"


def build(reactor, port: int, store_dir: str, secret: bytes | None = None):
    """The whole program as one service, and the Site it serves."""
    root = resource.Resource()
    root.putChild(b"", Home())
    site = server.Site(root)
    # Our config: no port of hmacfs's own, the upload space at /upload/.
    config = Config(store_dir=store_dir, upload_subdir="upload", monitor_interval=0)
    files = make_service(config, reactor, secret=secret, listen=False)
    mount(site, root, files.fileServer)
    top = MultiService()
    files.setServiceParent(top)
    from twisted.application.internet import StreamServerEndpointService

    web = StreamServerEndpointService(
        endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1"), site
    )
    web.setServiceParent(top)
    return top, site


def main(reactor, port: str = "8081", store_dir: str = "./webapp-uploads") -> Deferred:
    top, _ = build(reactor, int(port), store_dir)
    top.startService()
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    print(f"serving http://127.0.0.1:{port}/ and /upload/ (files in {store_dir})")
    return Deferred()  # run until interrupted


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
