"""
How fast one expiry sweep deletes: files expired per second, to hold against the upload rate
``bench/run`` measures (issue 21: the sweep must keep up with any rate the server accepts).

    .venv/bin/python bench/expiry.py [--files 20000] [--batch 500] [--store sqlite|redis]

It makes ``--files`` 4 KiB files with their facts, in 100 slot directories as uploads leave
them, and their records (all due) in the embedded SQLite (or a Redis at 127.0.0.1:6379 under a
key prefix of its own), then runs one L{hmacd.housekeeping.ExpirySweep} sweep on the real
reactor and thread pool, as the server does.  Beside the rate: the largest reactor lag seen
meanwhile (a 10 ms timer), which is what requests would have waited for.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, react

from hmacd.core import FileServer
from hmacd.facts import write_facts
from hmacd.housekeeping import ExpirySweep
from hmacd.metadata import FileRecord
from hmacd.reindex import stored_files
from hmacd.store.failover import FailoverStore

SIZE = 4096


def make_files(root: str, count: int, now: float) -> list[FileRecord]:
    """count files with facts, as uploads leave them (fsync left out: not what is measured)."""
    records = []
    body = b"x" * SIZE
    for n in range(count):
        relpath = f"slot{n % 100:03d}/{n}.bin"
        path = os.path.join(root, relpath)
        if n < 100:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        record = FileRecord(
            path=relpath,
            size=SIZE,
            content_type="application/octet-stream",
            sha256="ab" * 32,
            created=now - 7200,
            protocol="v2",
            expires=now - 3600 + n * 1e-3,
        )
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, body)
        write_facts(fd, record)
        os.close(fd)
        records.append(record)
    return records


async def measure(reactor, args) -> dict:
    root = tempfile.mkdtemp(prefix="hmacfs-expiry-", dir=args.dir)
    prefix = None
    try:
        if args.store == "redis":
            from hmacd.store.redis import RedisStore

            prefix = f"hmacfs-bench-{uuid.uuid4().hex}:"
            backend = RedisStore("127.0.0.1", 6379, reactor=reactor, prefix=prefix)
        else:
            from hmacd.store.sql import SQLStore

            backend = SQLStore.sqlite(
                os.path.join(root, ".hmacfs", "meta.sqlite3"), reactor=reactor
            )
        store = FailoverStore(backend, clock=reactor, healthInterval=0, timeout=30)
        await store.start()
        now = time.time()
        started = time.perf_counter()
        records = make_files(root, args.files, now)
        for n in range(0, len(records), 1000):
            puts = [store.put(r) for r in records[n : n + 1000]]
            for d in puts:
                await d
        setup = time.perf_counter() - started
        del records
        # What setting up left behind is not the sweep's: keep the collector off it.
        gc.collect()
        gc.freeze()
        fs = FileServer(secret=b"bench", store_dir=root, reactor=reactor, metadata=store)
        sweep = ExpirySweep(fs, interval=3600, batch=args.batch)

        lag = [0.0]
        last = [time.perf_counter()]

        def tick() -> None:
            t = time.perf_counter()
            lag[0] = max(lag[0], t - last[0] - 0.010)
            last[0] = t

        ticker = LoopingCall(tick)
        ticker.clock = reactor
        ticker.start(0.010)
        started = time.perf_counter()
        sweep.sweep()
        await sweep.current
        elapsed = time.perf_counter() - started
        ticker.stop()
        left = sum(1 for _ in stored_files(root))
        await store.stop()
        return {
            "store": args.store,
            "files": args.files,
            "batch": args.batch,
            "setup_seconds": round(setup, 2),
            "sweep_seconds": round(elapsed, 3),
            "expired_per_second": round(sweep.removed / elapsed),
            "removed": sweep.removed,
            "files_left": left,
            "max_reactor_lag_ms": round(lag[0] * 1000, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if prefix is not None:
            from tests.servers import delete_prefix

            delete_prefix(6379, prefix)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--store", choices=["sqlite", "redis"], default="sqlite")
    parser.add_argument("--dir", help="scratch directory (default: the system's temp dir)")
    args = parser.parse_args()

    async def run(reactor):
        result = await measure(reactor, args)
        print(json.dumps(result, indent=2))

    react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


if __name__ == "__main__":
    main()
