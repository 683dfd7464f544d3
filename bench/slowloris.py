"""
Slow and greedy clients against a real ``twistd -n hmacfs`` with the default config
(HeaderTimeout 20 s, MaxConnectionsPerClient 100), measured from outside:

1. one client dribbling a request head, one header byte every ``--every`` seconds (the
   issue's ``GET /upload/x HTTP/1.1`` / ``Host: x`` / ``X-A: `` and then a byte at a time):
   the seconds until the server closes it, and what it answered;
2. ``--sockets`` (200) such clients at once from 127.0.0.1: how many are closed at accept
   (no answer, within a second), how many get a 408 and when, and how many are still open
   after ``--hold`` seconds.

    .venv/bin/python bench/slowloris.py [--every 5] [--sockets 200] [--hold 40]

The server is started here with a config of ListenPort, StoreDir, Secret and LogFile only;
``--set KEY=VALUE`` adds a line to it (``--set HeaderTimeout=0 --set
MaxConnectionsPerClient=0``: the server as it was before these limits);
``--server HOST:PORT`` measures one already running instead.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import socket
import subprocess
import tempfile
import time

# The script's directory is on sys.path: bench.py's helpers.
from bench import TWISTD, free_port, wait_port

HEAD = b"GET /upload/x HTTP/1.1\r\nHost: x\r\nX-A: "


class Dribbler:
    """One connection sending HEAD, then a byte every `every` seconds, until it is closed."""

    def __init__(self, address: tuple[str, int], every: float) -> None:
        self.every = every
        self.started = time.monotonic()
        self.received = b""
        self.closedAt: float | None = None
        self.sock: socket.socket | None = None
        try:
            self.sock = socket.create_connection(address, timeout=5)
        except ConnectionResetError:
            self.closedAt = time.monotonic()  # reset before connect() returned
            return
        self.sock.setblocking(False)
        self.nextByte = self.started + every
        self._send(HEAD)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.send(data)
        except OSError:
            self._close()

    def _close(self) -> None:
        if self.closedAt is None:
            self.closedAt = time.monotonic()
            self.sock.close()

    @property
    def open(self) -> bool:
        return self.closedAt is None

    def readable(self) -> None:
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            self.received += data
        else:
            self._close()

    def tick(self, now: float) -> None:
        if self.open and now >= self.nextByte:
            self.nextByte += self.every
            self._send(b"a")

    @property
    def lifetime(self) -> float | None:
        return None if self.closedAt is None else self.closedAt - self.started

    @property
    def status(self) -> str:
        line = self.received.split(b"\r\n", 1)[0].decode("latin-1")
        return line or "(no answer)"


def drive(dribblers: list[Dribbler], until: float) -> None:
    """Run every dribbler until all are closed or `until` (monotonic) has come."""
    selector = selectors.DefaultSelector()
    for d in dribblers:
        if d.open:
            selector.register(d.sock, selectors.EVENT_READ, d)
    while time.monotonic() < until and any(d.open for d in dribblers):
        for key, _ in selector.select(timeout=0.1):
            d = key.data
            d.readable()
            if not d.open:
                selector.unregister(key.fileobj)
        now = time.monotonic()
        for d in dribblers:
            was = d.open
            d.tick(now)
            if was and not d.open:
                selector.unregister(d.sock)
    for d in dribblers:
        if d.open:
            d._close()
            d.closedAt = None  # still open when we stopped: not the server's doing


def start_server(workdir: str, extra: list[str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    config = os.path.join(workdir, "config.toml")
    with open(config, "w") as f:
        f.write(f'ListenPort = "127.0.0.1:{port}"\n')
        f.write(f'StoreDir = "{os.path.join(workdir, "store")}"\n')
        f.write('Secret = "slowloris-bench-secret-0123456789"\n')
        f.write(f'LogFile = "{os.path.join(workdir, "hmacfs.log")}"\n')
        for line in extra:
            f.write(line + "\n")
    proc = subprocess.Popen(
        [TWISTD, "-n", "--pidfile=", "hmacfs", "--config", config],
        cwd=workdir,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port, proc)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--every", type=float, default=5.0, help="seconds between header bytes")
    parser.add_argument("--sockets", type=int, default=200, help="dribbling clients at once")
    parser.add_argument("--hold", type=float, default=40.0, help="seconds to watch them")
    parser.add_argument("--server", help="HOST:PORT of a running hmacfs (default: start one)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TOML line for the server started here, e.g. HeaderTimeout=0",
    )
    args = parser.parse_args()

    proc = None
    if args.server:
        host, _, port = args.server.rpartition(":")
        address = (host, int(port))
    else:
        workdir = tempfile.mkdtemp(prefix="hmacfs-slowloris-")
        proc, port = start_server(workdir, args.set)
        address = ("127.0.0.1", port)
    try:
        # wait_port's probe connection may still hold a place for a moment.
        time.sleep(0.5)
        one = Dribbler(address, args.every)
        drive([one], time.monotonic() + args.hold)
        print(
            f"one dribbler (a byte every {args.every:g} s): closed after "
            f"{one.lifetime:.2f} s, answer {one.status!r}"
            if one.lifetime is not None
            else f"one dribbler: still open after {args.hold:g} s"
        )

        time.sleep(0.5)
        many = [Dribbler(address, args.every) for _ in range(args.sockets)]
        drive(many, time.monotonic() + args.hold)
        refused = [d for d in many if d.lifetime is not None and d.lifetime < 1 and not d.received]
        timed_out = [d for d in many if d.received.startswith(b"HTTP/1.1 408 ")]
        still_open = [d for d in many if d.open]
        lifetimes = sorted(d.lifetime for d in timed_out)
        result = {
            "every_s": args.every,
            "one_dribbler_closed_after_s": round(one.lifetime, 2) if one.lifetime else None,
            "one_dribbler_answer": one.status,
            "sockets": args.sockets,
            "refused_at_accept": len(refused),
            "answered_408": len(timed_out),
            "408_after_s_min_max": [round(lifetimes[0], 2), round(lifetimes[-1], 2)]
            if lifetimes
            else None,
            f"open_after_{args.hold:g}_s": len(still_open),
        }
        print(
            f"{args.sockets} dribblers from one address: {len(refused)} closed at accept, "
            f"{len(timed_out)} answered 408"
            + (f" after {lifetimes[0]:.1f} to {lifetimes[-1]:.1f} s" if lifetimes else "")
            + f", {len(still_open)} still open after {args.hold:g} s"
        )
        print(json.dumps(result))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
