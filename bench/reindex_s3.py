"""
hmacfs reindex with StorageBackend = "s3": a SeaweedFS of its own (tests.seaweed), a
prefix filled with small objects (every other one with hmacfs's facts, the rest without
facts nor a stated SHA-256, so that reindex hashes them from a GET) and optionally one
large object without facts; then the command as an operator runs it, against the embedded
SQLite: once with every record missing, once with every record there.  Prints the wall
time, objects per second and the command's peak RSS of each run.

    .venv/bin/python bench/reindex_s3.py [--objects 2000] [--size 4096] [--large-mib 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from twisted.internet import task  # noqa: E402
from twisted.internet.defer import DeferredSemaphore, gatherResults, inlineCallbacks  # noqa: E402
from twisted.web.client import FileBodyProducer  # noqa: E402

from hmacd.metadata import FileRecord  # noqa: E402
from hmacd.s3 import S3Client  # noqa: E402
from hmacd.storage.s3_writer import _metadata  # noqa: E402
from tests.seaweed import SEAWEEDFS_VERSION, SeaweedMini  # noqa: E402

MiB = 1024 * 1024
PREFIX = "bench/"
_MAIN = "import sys, hmacd.cli; sys.exit(hmacd.cli.main(sys.argv[1:]))"


@inlineCallbacks
def fill(reactor, store: SeaweedMini, options, work: str):
    client = S3Client(
        reactor,
        store.endpoint,
        store.bucket,
        store.access_key,
        store.secret_key,
        prefix=PREFIX,
        timeout=120,
    )
    body = os.urandom(options.size)
    sha = hashlib.sha256(body).hexdigest()
    limit = DeferredSemaphore(16)
    puts = []
    for i in range(options.objects):
        key = f"slot{i % 100}/file{i}.bin"
        facts = FileRecord(key, len(body), "application/octet-stream", sha, 1.8e9, "v2")
        metadata = _metadata(facts) if i % 2 else None
        puts.append(limit.run(client.put_object, key, body, metadata=metadata))
    yield gatherResults(puts)
    if options.large_mib:
        path = os.path.join(work, "large")
        with open(path, "wb") as f:
            for _ in range(options.large_mib):
                f.write(os.urandom(MiB))
        with open(path, "rb") as f:
            yield client.put_object("large/blob.bin", FileBodyProducer(f), options.large_mib * MiB)
        os.unlink(path)
    yield client.close()


def run_reindex(config: str) -> tuple[float, str]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", _MAIN, "reindex", "--config", config],
        env=dict(os.environ, PYTHONPATH=ROOT),
        capture_output=True,
        text=True,
        check=True,
    )
    return time.monotonic() - started, done.stdout.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096, help="bytes of each small object")
    parser.add_argument("--large-mib", type=int, default=0, help="one large object, MiB")
    options = parser.parse_args()
    work = tempfile.mkdtemp(prefix="hmacfs-reindex-bench-")
    store = SeaweedMini(None)
    try:
        try:
            task.react(lambda reactor: fill(reactor, store, options, work))
        except SystemExit as e:  # react always ends in it
            if e.code:
                raise
        root = os.path.join(work, "store")
        os.mkdir(root)
        config = os.path.join(work, "config.toml")
        with open(config, "w") as f:
            f.write(
                f'StoreDir = "{root}"\nStorageBackend = "s3"\n'
                f'S3Endpoint = "{store.endpoint}"\nS3Bucket = "{store.bucket}"\n'
                f'S3Prefix = "{PREFIX}"\nS3AccessKey = "{store.access_key}"\n'
                f'S3SecretKey = "{store.secret_key}"\nFileTTL = "1h"\n'
            )
        total = options.objects + (1 if options.large_mib else 0)
        for run in ("all missing", "all recorded"):
            seconds, said = run_reindex(config)
            # The largest of the children waited for so far: the reindex commands only
            # (SeaweedFS is waited for at its cleanup).
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB
            print(
                json.dumps(
                    {
                        "run": run,
                        "objects": total,
                        "size": options.size,
                        "large_mib": options.large_mib,
                        "seconds": round(seconds, 2),
                        "objects_per_second": round(total / seconds, 1),
                        "peak_rss_mib_so_far": round(peak / 1024, 1),
                        "seaweedfs": SEAWEEDFS_VERSION,
                        "said": said,
                    }
                ),
                flush=True,
            )
    finally:
        store.cleanup()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
