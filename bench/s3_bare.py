"""
The S3 client (hmacd.s3) against the bare store: a SeaweedFS of its own
(tests.seaweed, weed mini on spare 127.0.0.1 ports), the same signed PUT
and GET of one large object through our client and through curl, as MB/s,
their ratio, and our process's RSS growth while it moves the object; then
the small-object PUT rate (4 KiB objects, 32 at a time) through the client
and through curl --parallel with the same signed requests.

    .venv/bin/python bench/s3_bare.py [--size-mib 1024] [--rounds 3] [--small 2000]

Rounds alternate client and curl so that the store's warming and the page
cache favour neither.  The body is a 1 MiB random block repeated (the store
must not be able to compress it); the client is fed 64 KiB slices of it, as
an HTTP upload would arrive, and honours the BodyWriter's back-pressure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task
from twisted.internet.defer import DeferredSemaphore, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IConsumer
from zope.interface import implementer

from hmacd.s3 import BodyWriter, S3Client
from tests.seaweed import SEAWEEDFS_VERSION, SeaweedMini

MiB = 1024 * 1024
SLICE = 64 * 1024


def rss(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    """Peak RSS of this process and of the store while a transfer runs."""

    def __init__(self, reactor, store_pid: int | None) -> None:
        self.store_pid = store_pid
        self.start = rss()
        self.peak = self.start
        self.store_start = rss(store_pid) if store_pid else 0
        self.store_peak = self.store_start
        self.loop = task.LoopingCall(self.sample)
        self.loop.clock = reactor
        self.loop.start(0.05)

    def sample(self) -> None:
        self.peak = max(self.peak, rss())
        if self.store_pid:
            self.store_peak = max(self.store_peak, rss(self.store_pid))

    def stop(self) -> dict:
        self.sample()
        self.loop.stop()
        return {
            "rss_growth_mib": round((self.peak - self.start) / MiB, 1),
            "store_rss_growth_mib": round((self.store_peak - self.store_start) / MiB, 1),
        }


@implementer(IConsumer)
class Null:
    def __init__(self) -> None:
        self.received = 0

    def registerProducer(self, producer, streaming) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.received += len(data)


@inlineCallbacks
def client_put(client: S3Client, key: str, size: int, slices: list[bytes]):
    w = BodyWriter(size)
    d = client.put_object(key, w, content_type="application/octet-stream")
    sent = 0
    i = 0
    while sent < size:
        piece = slices[i % len(slices)][: size - sent]
        i += 1
        sent += len(piece)
        ready = w.write(piece)
        if ready is not True:
            yield ready
    w.finish()
    yield d


@inlineCallbacks
def client_get(client: S3Client, key: str):
    obj = yield client.get_object(key)
    sink = Null()
    n = yield obj.deliver(sink)
    return n


def curl(client: S3Client, method: str, key: str, *args: str) -> None:
    url, headers = client.sign(method, key)
    # No "Expect: 100-continue": curl would wait for a 100 our client never asks for.
    cmd = ["curl", "-sS", "-f", "-o", "/dev/null", "-X", method, "-H", "Expect:"]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    subprocess.run([*cmd, *args, url], check=True)


def curl_small(client: S3Client, n: int, path: str, concurrency: int) -> float:
    """n signed 4 KiB PUTs through one curl --parallel; seconds taken."""
    with tempfile.NamedTemporaryFile("w", suffix=".curlrc", delete=False) as f:
        for i in range(n):
            url, headers = client.sign("PUT", f"small-curl/{i:06d}")
            if i:
                f.write("next\n")
            f.write(f'url = "{url}"\nupload-file = "{path}"\noutput = "/dev/null"\n')
            f.write('silent\nfail\nheader = "Expect:"\n')
            for name, value in headers.items():
                f.write(f'header = "{name}: {value}"\n')
        config = f.name
    try:
        started = time.monotonic()
        subprocess.run(
            ["curl", "-s", "--parallel", "--parallel-max", str(concurrency), "-K", config],
            check=True,
        )
        return time.monotonic() - started
    finally:
        os.unlink(config)


@inlineCallbacks
def main(reactor, args):
    store = SeaweedMini(None, reader_cache_mb=args.reader_cache_mb)
    results: dict = {
        "seaweedfs": SEAWEEDFS_VERSION,
        "size_mib": args.size_mib,
        "store_ready_s": round(store.ready_seconds, 2),
        "reader_cache_mb": args.reader_cache_mb,
    }
    try:
        client = S3Client(
            reactor, store.endpoint, store.bucket, store.access_key, store.secret_key, timeout=60
        )
        size = args.size_mib * MiB
        block = os.urandom(MiB)
        slices = [block[i : i + SLICE] for i in range(0, MiB, SLICE)]
        body = os.path.join(store.dir, "body")
        with open(body, "wb") as f:
            for _ in range(args.size_mib):
                f.write(block)
        rows: dict[str, list[float]] = {
            k: [] for k in ("client_put", "curl_put", "client_get", "curl_get")
        }
        memory = []
        for r in range(args.rounds):
            for who in ("client", "curl") if r % 2 == 0 else ("curl", "client"):
                key = f"big-{who}"
                if who == "client":
                    peak = Peak(reactor, store.pid())
                    t = time.monotonic()
                    yield client_put(client, key, size, slices)
                    rows["client_put"].append(time.monotonic() - t)
                    put_mem = peak.stop()
                    peak = Peak(reactor, store.pid())
                    t = time.monotonic()
                    n = yield client_get(client, key)
                    rows["client_get"].append(time.monotonic() - t)
                    assert n == size, n
                    memory.append({"put": put_mem, "get": peak.stop()})
                else:
                    t = time.monotonic()
                    yield task.deferLater(reactor, 0, curl, client, "PUT", key, "-T", body)
                    rows["curl_put"].append(time.monotonic() - t)
                    t = time.monotonic()
                    yield task.deferLater(reactor, 0, curl, client, "GET", key)
                    rows["curl_get"].append(time.monotonic() - t)
                yield client.delete_object(key)
        for name, times in rows.items():
            results[name + "_mb_s"] = round(size / 1e6 / statistics.median(times), 1)
        for op in ("put", "get"):
            results[f"ratio_{op}"] = round(
                results[f"client_{op}_mb_s"] / results[f"curl_{op}_mb_s"], 2
            )
        results["client_memory"] = memory

        if args.small:
            small = os.urandom(4096)
            semaphore = DeferredSemaphore(32)
            t = time.monotonic()
            yield gatherResults(
                [
                    semaphore.run(client.put_object, f"small/{i:06d}", small)
                    for i in range(args.small)
                ]
            )
            results["client_small_put_per_s"] = round(args.small / (time.monotonic() - t))
            path = os.path.join(store.dir, "small")
            with open(path, "wb") as f:
                f.write(small)
            seconds = yield task.deferLater(reactor, 0, curl_small, client, args.small, path, 32)
            results["curl_small_put_per_s"] = round(args.small / seconds)
        yield client.close()
    finally:
        store.cleanup()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=2000, help="4 KiB PUTs (0: skip)")
    parser.add_argument(
        "--reader-cache-mb", type=int, default=16, help="the S3 gateway's -s3.readerCacheSizeMB"
    )
    task.react(main, [parser.parse_args()])
