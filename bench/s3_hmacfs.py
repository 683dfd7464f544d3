"""
hmacfs with StorageBackend = "s3" against the bare store: a SeaweedFS of its own
(tests.seaweed), one large file PUT and GET through hmacfs (curl as the client, the
server in this process) and the same object PUT and GET straight to the store (our
S3 client from a file; curl on a presigned URL), as MB/s, their ratio, and this process's
RSS growth while hmacfs moves the file.

    .venv/bin/python bench/s3_hmacfs.py [--size-mib 256] [--rounds 3]
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

from twisted.internet import task, threads
from twisted.internet.defer import inlineCallbacks
from twisted.web.client import FileBodyProducer

from hmacd import auth
from hmacd.core import FileServer
from hmacd.s3 import S3Client
from hmacd.storage.s3 import SPOOL_DIR, S3Storage
from hmacd.store.failover import FailoverStore
from hmacd.store.memory import MemoryStore
from hmacd.web import HmacfsSite
from tests.seaweed import SEAWEEDFS_VERSION, SeaweedMini

MiB = 1024 * 1024
SECRET = b"bench-secret-0123456789"


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def curl(*args: str) -> float:
    started = time.monotonic()
    subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", *args], check=True)
    return time.monotonic() - started


@inlineCallbacks
def main(reactor, options):
    size = options.size_mib * MiB
    work = tempfile.mkdtemp(prefix="hmacfs-s3-bench-")
    source = os.path.join(work, "body")
    block = os.urandom(MiB)
    with open(source, "wb") as f:
        for _ in range(options.size_mib):
            f.write(block)
    store = SeaweedMini(None, reader_cache_mb=64)
    client = S3Client(reactor, store.endpoint, store.bucket, store.access_key, store.secret_key)
    metadata = FailoverStore(MemoryStore(), clock=reactor, healthInterval=0)
    metadata.start()
    root = os.path.join(work, "store")
    os.makedirs(root)
    fs = FileServer(
        secret=SECRET,
        store_dir=root,
        reactor=reactor,
        metadata=metadata,
        make_storage=lambda fs: S3Storage(
            client, reactor, os.path.join(root, SPOOL_DIR), lambda w: fs.blocking(w)
        ),
    )
    fs.storage.stream = not options.no_stream  # type: ignore[attr-defined]
    port = reactor.listenTCP(0, HmacfsSite(fs), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}/upload/"
    rows: dict[str, list[float]] = {
        k: [] for k in ("hmacfs PUT", "bare PUT", "hmacfs GET", "bare GET")
    }
    growth = []
    try:
        for n in range(options.rounds):
            name = f"bench/{n}.bin"
            mac = auth.sign_v(SECRET, name, size)
            before = rss()
            seconds = yield threads.deferToThread(
                curl, "-T", source, "-H", "Expect:", "-H", "Content-Type: application/octet-stream",
                base + name + "?v=" + mac,
            )  # fmt: skip
            rows["hmacfs PUT"].append(size / MiB / seconds)
            seconds = yield threads.deferToThread(curl, base + name)
            rows["hmacfs GET"].append(size / MiB / seconds)
            growth.append((rss() - before) / MiB)
            with open(source, "rb") as f:
                started = time.monotonic()
                yield client.put_object(f"bare/{n}.bin", FileBodyProducer(f), size)
                rows["bare PUT"].append(size / MiB / (time.monotonic() - started))
            url = client.presign_get(f"bare/{n}.bin", 600)
            seconds = yield threads.deferToThread(curl, url)
            rows["bare GET"].append(size / MiB / seconds)
    finally:
        yield port.stopListening()
        yield client.close()
        store.cleanup()
        subprocess.run(["rm", "-rf", work])
    result = {k: round(statistics.median(v), 1) for k, v in rows.items()}
    result["PUT ratio"] = round(result["hmacfs PUT"] / result["bare PUT"], 2)
    result["GET ratio"] = round(result["hmacfs GET"] / result["bare GET"], 2)
    result["RSS growth MiB (max)"] = round(max(growth), 1)
    result["size MiB"] = options.size_mib
    result["streamed"] = not options.no_stream
    result["seaweedfs"] = SEAWEEDFS_VERSION
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-stream", action="store_true", help="large bodies go up after their last byte"
    )
    task.react(main, [parser.parse_args()])
