"""
How many body bytes the server reads before it answers 507 (issue 14 item 7).

Serves StoreDir (give it a small file system, e.g. a tmpfs of 1200k with 236k taken, so
that 964 KiB are free) on 127.0.0.1, PUTs a signed 5 MiB body over a raw socket without
``Expect``, and prints the status and the body bytes the server's channel had received when
the answer went out.  The file system is the real one: statvfs and the writes see the same
free space.  Uses only hmacd's public names, so it also runs against older checkouts
(``PYTHONPATH=old-checkout python bench/disk_full.py STORE``).

    python bench/disk_full.py /mnt/tiny [--size 5242880] [--min-free-space 0]
"""

from __future__ import annotations

import argparse
import inspect
import socket

from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from hmacd import auth
from hmacd.core import FileServer
from hmacd.store.failover import FailoverStore
from hmacd.store.memory import MemoryStore
from hmacd.web import HmacfsSite

SECRET = b"bench-secret"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store")
    parser.add_argument("--size", type=int, default=5 * 1024 * 1024)
    parser.add_argument("--min-free-space", type=int, default=0)
    args = parser.parse_args()

    store = FailoverStore(MemoryStore(), clock=reactor, healthInterval=0)
    store.start()
    kwargs = {}
    if "min_free_space" in inspect.signature(FileServer).parameters:
        kwargs["min_free_space"] = args.min_free_space
    fs = FileServer(secret=SECRET, store_dir=args.store, reactor=reactor, metadata=store, **kwargs)
    site = HmacfsSite(fs)
    received = {"total": 0, "at_answer": None, "head": 0}

    build = site.buildProtocol

    def buildProtocol(addr):
        # Count what the channel is handed, and note the count when the status line goes out.
        channel = build(addr)
        dataReceived, makeConnection = channel.dataReceived, channel.makeConnection

        def counting(data: bytes) -> None:
            received["total"] += len(data)
            dataReceived(data)

        def connected(transport) -> None:
            write, writeSequence = transport.write, transport.writeSequence

            def answered() -> None:
                if received["at_answer"] is None:
                    received["at_answer"] = received["total"]

            def answering(data: bytes) -> None:
                answered()
                write(data)

            def answeringSequence(data) -> None:
                answered()
                writeSequence(data)

            transport.write, transport.writeSequence = answering, answeringSequence
            makeConnection(transport)

        channel.dataReceived, channel.makeConnection = counting, connected
        return channel

    site.buildProtocol = buildProtocol
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    path = "bench/big.bin"
    mac = auth.sign_v(SECRET, path, args.size)
    head = (
        f"PUT /upload/{path}?v={mac} HTTP/1.1\r\nHost: x\r\nContent-Length: {args.size}\r\n\r\n"
    ).encode()
    received["head"] = len(head)

    def client() -> bytes:
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))
        answer = b""
        try:
            sock.sendall(head)
            block = b"x" * 65536
            for offset in range(0, args.size, len(block)):
                sock.sendall(block[: args.size - offset])
        except OSError:
            pass  # the server closed on us: read what it said
        try:
            # One response, then the server closes (a refusal) or keeps the connection (201).
            while b"\r\n\r\n" not in answer and (chunk := sock.recv(65536)):
                answer += chunk
        except OSError:
            pass
        sock.close()
        return answer

    def done(answer: bytes) -> None:
        status = answer.split(b"\r\n", 1)[0].decode("latin-1") or "(no answer)"
        atAnswer = received["at_answer"]
        body = None if atAnswer is None else max(0, atAnswer - received["head"])
        print(f"status: {status}")
        print(f"body bytes read from the socket before the answer: {body} of {args.size}")
        reactor.stop()

    # The client runs in the reactor's thread pool, so the reactor keeps serving meanwhile.
    deferToThread(client).addCallback(done)
    reactor.run()


if __name__ == "__main__":
    main()
