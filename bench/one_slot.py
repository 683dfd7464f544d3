"""
What one signed URL uploaded many times at once costs (issue 14, item 3), measured from outside
against ``twistd -n hmacfs`` as deployed, and what claiming a path costs the small PUTs.

1. ``--clients`` curl processes PUT the same signed URL of ``--size`` bytes at once, each paced
   at ``--rate`` so that the bodies are still streaming while the store is sampled: the peak of
   the bytes in upload files (temp files and the final file, ``.hmacfs/`` not counted), the
   answers, and how many body bytes each client got to send.  Once as curl sends by default
   (``Expect: 100-continue`` for a body over 1 MiB), once without ``Expect``.
2. Small PUTs: ``--connections`` keep-alive connections each PUT 4 KiB files to URLs of their
   own for ``--seconds``; uploads per second.

Run it with the venv's python; ``PYTHONPATH=<another checkout>`` measures that one instead::

    .venv/bin/python bench/one_slot.py
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import Server

MiB = 1024 * 1024


def upload_bytes(store: str) -> int:
    """Bytes in every file under store except .hmacfs/ (temp files included), once per inode."""
    sizes = {}
    for dirpath, dirnames, filenames in os.walk(store):
        if dirpath == store and ".hmacfs" in dirnames:
            dirnames.remove(".hmacfs")
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except FileNotFoundError:
                continue  # a temp file gone meanwhile
            # A finished upload's temp file and its final name are one file for a moment.
            sizes[st.st_dev, st.st_ino] = st.st_size
    return sum(sizes.values())


def same_url(server: Server, args, expect: bool, run: str) -> dict:
    """--clients curls at once on one signed URL; the store's peak while they stream."""
    src = os.path.join(server.dir, f"body-{run}.bin")
    with open(src, "wb") as f:
        f.write(os.urandom(args.size))
    url = server.url(f"{run}/slot.bin", args.size)
    command = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_upload}",
               "--limit-rate", str(args.rate), "-T", src, url]  # fmt: skip
    if not expect:
        command[1:1] = ["-H", "Expect:"]
    # The files of earlier rounds are not this round's.
    baseline = upload_bytes(server.store)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, upload_bytes(server.store) - baseline)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(args.clients)
    ]
    answers = [p.communicate()[0].split() for p in procs]
    done.set()
    sampler.join()
    codes = sorted(a[0] for a in answers)
    sent = sorted(int(a[1]) for a in answers)
    return {"codes": codes, "sent": sent, "peak": peak}


def cpu_seconds(server: Server) -> float:
    """User and system CPU time of the server and its workers so far."""
    ticks = 0
    for pid in server.pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def small_puts(
    server: Server, connections: int, seconds: float, run: int
) -> tuple[int, float]:
    """4 KiB PUTs over keep-alive connections, each to its own URL: (uploads, seconds)."""
    body = os.urandom(4096)
    deadline = time.monotonic() + seconds
    counts = [0] * connections

    async def one(n: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        i = 0
        while time.monotonic() < deadline:
            target = server.target(f"small/{run}/{n}/{i}.bin", len(body))
            writer.write(
                f"PUT {target} HTTP/1.1\r\nHost: b\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 201"):
                raise RuntimeError(head.decode("latin-1"))
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            counts[n] += 1
            i += 1
        writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one(n) for n in range(connections)))
    return sum(counts), time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--size", type=int, default=2 * MiB)
    parser.add_argument("--rate", type=int, default=MiB, help="bytes/s of each curl")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="small-PUT runs (median)")
    parser.add_argument("--small-only", action="store_true", help="only the small PUTs")
    args = parser.parse_args()
    import hmacd

    print(f"hmacd from {os.path.dirname(hmacd.__file__)}, Workers = {args.workers}")
    with tempfile.TemporaryDirectory(prefix="one-slot-") as workdir:
        server = Server(workdir, "server", {"Workers": args.workers})
        server.start()
        try:
            for expect in () if args.small_only else (True, False):
                r = same_url(server, args, expect, "expect" if expect else "noexpect")
                print(
                    f"{args.clients} x PUT of one {args.size / MiB:g} MiB URL"
                    f" ({'Expect: 100-continue' if expect else 'no Expect'}):"
                    f" peak {r['peak'] / MiB:.1f} MiB in upload files;"
                    f" answers {' '.join(r['codes'])};"
                    f" body bytes sent per client {r['sent']}"
                )
            rates, costs = [], []
            for run in range(args.rounds):
                cpu = cpu_seconds(server)
                count, elapsed = asyncio.run(
                    small_puts(server, args.connections, args.seconds, run)
                )
                rates.append(count / elapsed)
                # Server CPU per upload: what the server spends, whatever else the machine runs.
                costs.append((cpu_seconds(server) - cpu) / count * 1e6)
            rates.sort()
            costs.sort()
            print(
                f"small PUTs (4 KiB, {args.connections} connections, {args.seconds:g} s):"
                f" {' '.join(f'{r:.0f}' for r in rates)} /s, median {rates[len(rates) // 2]:.0f};"
                f" server CPU per upload {' '.join(f'{c:.0f}' for c in costs)} us,"
                f" median {costs[len(costs) // 2]:.0f}"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
