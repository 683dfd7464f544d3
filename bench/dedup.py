"""
What Deduplication costs the upload path: two ``twistd -n hmacfs`` servers, one with
``Deduplication = false`` and one with ``true``, measured in alternation (so that a noisy
machine slows both alike), with bench.py's server, curl and wrk helpers.

1. 1 GiB PUT by ``curl -T``: new bytes (never stored before: the common path), then the same
   bytes again under another name (deduplicated: linked to the first, the temp dropped).
2. 4 KiB PUTs by wrk, 64 connections, each to its own pre-signed URL: every body distinct
   (no sharing: the common path), then one body for all (every upload after the first shared).

3. Beside them, 4 KiB files published by hmacfs's LocalStorage in this process, one after
   another (no HTTP, no threads): the storage's own part, away from wrk and the reactor.

Each row gives every round's figure (the range is what a shared, noisy machine allows one to
say) and the median.  After the small PUTs, the store's bytes on disk and what sharing saved
(``LocalStorage.dedup_census``).  Everything goes to a JSON file as well::

    .venv/bin/python bench/dedup.py [--rounds 3] [--seconds 6] [--size BYTES] [--workers N]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(1, os.path.dirname(HERE))

from bench import MiB, Server, presign, random_file, run_wrk  # noqa: E402
from hmacd.storage.local import CAS_DIR, LocalStorage  # noqa: E402


def small_puts(server: Server, workdir: str, run: str, mode: str, seconds: float) -> dict:
    """wrk PUTs of 4 KiB bodies, C{mode} "distinct" or "same", to URLs of their own."""
    paths = presign(server, workdir, run, 250_000, 4096)
    try:
        # bench.py's script: "PUT:<tag>:<mode>" picks the bodies.
        return run_wrk(server.base, paths, f"PUT:{run}:{mode}", 4096, seconds, workdir)
    finally:
        os.unlink(paths)


def published_files(directory: str, dedup: bool, same: bool, count: int = 1000) -> float:
    """
    4 KiB files per second that hmacfs's own LocalStorage publishes and settles, one after
    another in this process (no HTTP, no threads): the storage's part of a small PUT, with
    bodies all distinct or all the same.
    """
    from twisted.internet.defer import maybeDeferred

    from hmacd.metadata import FileRecord

    os.makedirs(directory, exist_ok=True)
    storage = LocalStorage(directory, maybeDeferred, dedup=dedup)
    run = os.path.basename(directory)
    start = time.perf_counter()
    for i in range(count):
        relpath = f"{run}/{i:06d}/f.bin"
        writer = storage.writer(relpath)
        head = b"same" if same else f"{run}-{i}".encode()
        writer.write(head.ljust(32) + b"x" * 4064)
        digest = writer.seal()
        record = FileRecord(relpath, 4096, "application/octet-stream", digest, 0.0, "v2")
        writer.publish(record)
        storage.settle([relpath])
    return count / (time.perf_counter() - start)


def timed_put(server: Server, name: str, src: str) -> float:
    start = time.perf_counter()
    server.put_file(name, src)
    return time.perf_counter() - start


def large_round(server: Server, src: str, tag: str) -> tuple[float, float]:
    """Seconds for one PUT of new bytes and one of the same bytes again; both removed after."""
    with open(src, "r+b") as f:
        f.write(f"{tag:<32}".encode()[:32])  # new bytes: a SHA-256 never stored here
    new = timed_put(server, f"big/{tag}-new.bin", src)
    again = timed_put(server, f"big/{tag}-again.bin", src)
    size = os.path.getsize(src)
    for name in ("new", "again"):
        stored = os.path.join(server.store, "big", f"{tag}-{name}.bin")
        if os.path.getsize(stored) != size:
            raise RuntimeError(f"{stored}: wrong size")
        os.unlink(stored)
    # Removed by hand, as the server would with the last path: the next round starts empty.
    shutil.rmtree(os.path.join(server.store, CAS_DIR), ignore_errors=True)
    return new, again


def disk_use(store: str) -> int:
    """Bytes the store's files take on disk (du: a shared inode counts once)."""
    out = subprocess.run(["du", "-s", "-B1", store], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def figures(values: list[float], digits: int = 1) -> dict:
    return {
        "each": [round(v, digits) for v in values],
        "median": round(statistics.median(values), digits),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024 * MiB, help="large upload bytes")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of everything")
    parser.add_argument("--seconds", type=int, default=6, help="each wrk run")
    parser.add_argument("--workers", type=int, default=1, help="the servers' Workers")
    parser.add_argument("--dir", default=None, help="scratch directory (needs ~3x --size)")
    parser.add_argument(
        "--json", default=os.path.join(HERE, "results", "dedup.json"), help="JSON output"
    )
    args = parser.parse_args(argv)
    for tool in ("curl", "wrk", "du"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (bench/run installs curl and wrk)")
    workdir = args.dir or tempfile.mkdtemp(prefix="hmacfs-dedup-")
    os.makedirs(workdir, exist_ok=True)
    common: dict[str, object] = {"Workers": args.workers} if args.workers > 1 else {}
    servers = {
        "off": Server(workdir, "dedup-off", {**common, "Deduplication": False}),
        "on": Server(workdir, "dedup-on", {**common, "Deduplication": True}),
    }
    started = time.time()
    raw: dict[str, dict[str, list]] = {
        name: {
            kind: []
            for kind in ("new", "again", "distinct", "same", "published_distinct", "published_same")
        }
        for name in servers
    }
    try:
        for server in servers.values():
            server.start()
        src = random_file(workdir, args.size)
        mb = args.size / 1e6
        for r in range(args.rounds):
            for name, server in servers.items():
                print(f"[{name}] round {r + 1}: large PUTs ...", file=sys.stderr, flush=True)
                new, again = large_round(server, src, f"{name}{r}")
                raw[name]["new"].append(mb / new)
                raw[name]["again"].append(mb / again)
        for r in range(args.rounds):
            for name in servers:
                for mode in ("distinct", "same"):
                    where = os.path.join(workdir, "published", f"{name}{r}{mode[0]}")
                    rate = published_files(where, name == "on", mode == "same")
                    raw[name][f"published_{mode}"].append(rate)
        for r in range(args.rounds):
            for name, server in servers.items():
                for mode in ("distinct", "same"):
                    print(
                        f"[{name}] round {r + 1}: 4 KiB PUTs, {mode} bodies ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    result = small_puts(server, workdir, f"{name}{r}{mode[0]}", mode, args.seconds)
                    if result["failed"]:
                        raise RuntimeError(f"{name} {mode}: {result['failed']} requests failed")
                    raw[name][mode].append(result["rps"])
        disk = {
            name: {
                "files": sum(1 for _ in LocalStorage(server.store, lambda f: f()).files()),
                "disk_bytes": disk_use(server.store),
                "census": asdict(LocalStorage(server.store, lambda f: f()).dedup_census()),
            }
            for name, server in servers.items()
        }
    finally:
        for server in servers.values():
            if getattr(server, "proc", None) is not None:
                server.stop()
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "bytes": args.size,
        "seconds": round(time.time() - started, 1),
        "large_MBps": {
            name: {kind: figures(raw[name][kind]) for kind in ("new", "again")} for name in raw
        },
        "small_rps": {
            name: {
                kind: figures(raw[name][kind], 0)
                for kind in ("distinct", "same", "published_distinct", "published_same")
            }
            for name in raw
        },
        "store": disk,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(table(results))
    return 0


def table(results: dict) -> str:
    big = results["bytes"]
    label = f"{big / 2**30:g} GiB" if big >= 2**30 else f"{big / 2**20:g} MiB"

    def cell(figure: dict) -> str:
        low, high = min(figure["each"]), max(figure["each"])
        return f"{low:g}-{high:g} ({figure['median']:g})"

    rows = [("", "Deduplication = false", "Deduplication = true")]
    for kind, text in (("new", "new bytes"), ("again", "the same bytes again")):
        rows.append(
            (
                f"{label} PUT, {text}, MB/s",
                *(cell(results["large_MBps"][n][kind]) for n in ("off", "on")),
            )
        )
    for kind, text in (("distinct", "every body distinct"), ("same", "one body for all")):
        rows.append(
            (
                f"4 KiB PUTs, {text}, req/s",
                *(cell(results["small_rps"][n][kind]) for n in ("off", "on")),
            )
        )
    for kind, text in (("distinct", "distinct"), ("same", "the same")):
        rows.append(
            (
                f"  4 KiB files published, {text}, no HTTP, /s",
                *(cell(results["small_rps"][n][f"published_{kind}"]) for n in ("off", "on")),
            )
        )
    store = results["store"]
    rows.append(
        (
            "store after: files / MiB on disk",
            *(f"{store[n]['files']} / {store[n]['disk_bytes'] / MiB:.0f}" for n in ("off", "on")),
        )
    )
    rows.append(
        (
            "  saved by sharing, MiB",
            *(f"{store[n]['census']['saved_bytes'] / MiB:.0f}" for n in ("off", "on")),
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [
        f"hmacfs Deduplication, {results['date']}, {results['cpus']} CPUs, "
        f"Workers = {results['workers']}, {results['seconds']} s; "
        "each round's figure, low-high (median)",
        "",
    ]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
