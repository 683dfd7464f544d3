"""
hmacfs benchmarks: the running server (twistd, as deployed) measured from outside, each figure
beside the limit or target it is judged by.  Run through ``bench/run``; see README.rst.

1. One large upload (``curl -T``), alternated with the same bytes through socat (loopback and
   disk, no HTTP): medians, the ratio, and the server's RSS before and its peak during.  Beside
   them, what curl alone sends to a server that drops the bytes: curl is not the bottleneck.
2. Small uploads: 4 KiB PUTs, each to its own pre-signed URL, wrk with 64 connections, in two
   layouts: all files in one directory (flat), and each in a new directory of its own, as XMPP
   servers hand out slots (``<uuid>/<name>``: one mkdir per upload).  Beside each, how many
   4 KiB files Python threads alone make durable here the way an upload is (create, write,
   fsync, link, directory fsync; in the slot layout a mkdir first and the parent's fsync
   after): the file system's part of the limit, and the server's rate as a share of it.  In
   the slot layout, the server's CPU per PUT too, by thread: its reactors, its pools
   (commits, SQLite) and the kernel's io_uring workers (the fsyncs handed to them).
3. Downloads: wrk GETs of a 4 KiB file and of a 64 MiB file, 64 connections.
4. Concurrency: 500 uploads paced at 64 KiB/s each while (2) runs: every one must get its 201,
   none may be refused, and the server's RSS must stay below 200 MiB.

Every figure is taken with MaxBytesPerSecond off and on (on: a per-upload cap high enough not
to bind, so the figure shows what the throttle's bookkeeping costs), with ``--workers N`` for
the server's Workers.  The table goes to stdout, everything to a JSON file so that runs can be
compared.

``--storage s3`` measures hmacfs with ``StorageBackend = "s3"`` instead, beside the bare store
(bench/s3_rows.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import tomllib
import uuid

from hmacd import auth

SECRET = b"bench-secret-0123456789abcdef"
MiB = 1024 * 1024
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")

TARGETS = {
    "upload_ratio": 0.90,  # of the socat limit
    "upload_rss_growth_mib": 32,
    "small_put_rps": 3000,
    # of the file system's own rate in the same layout, with Workers = 2 (issue 18)
    "small_put_share": 0.5,
    "small_get_rps": 6000,
    "big_get_mbps": 1000,
    "slow_rss_mib": 200,
}

WRK_SCRIPT = r"""
-- Set by bench.py: PATHS (a file of request paths), METHOD, BODY_SIZE.
local threads = 0
function setup(thread)
  thread:set("id", threads)
  threads = threads + 1
end

function init(args)
  paths = {}
  local n, i = tonumber(args[1]), 0
  local all = {}
  for line in io.lines(args[2]) do
    all[#all + 1] = line
    if i % n == id then paths[#paths + 1] = line end
    i = i + 1
  end
  if #paths == 0 then paths = all end  -- fewer paths than threads: share them
  next_path = 1
  local size = tonumber(args[3])
  -- METHOD is PUT or GET; bench/dedup.py's "PUT:<tag>:distinct" gives every request a
  -- body of its own (the tag, the thread and a counter, then filler), "PUT:<tag>:same"
  -- one body (the tag, then filler) for every request.
  local _, _, tag, mode = string.find(args[4], "^PUT:([^:]*):(%a+)$")
  if tag then
    method = "PUT"
    distinct = mode == "distinct"
    prefix = string.format("%-16s", tag)
    tail = string.rep("x", size - 32)
    body = prefix .. string.rep(" ", 16) .. tail
  else
    method = args[4]
    body = string.rep("x", size)
  end
  count = 0
end

function request()
  local path = paths[next_path]
  next_path = next_path + 1
  if next_path > #paths then next_path = 1 end
  if method == "PUT" then
    local data = body
    if distinct then
      count = count + 1
      data = prefix .. string.format("%08x%08x", id, count) .. tail
    end
    return wrk.format("PUT", path, {["Content-Type"] = "application/octet-stream"}, data)
  end
  return wrk.format("GET", path)
end

function done(summary, latency, requests)
  -- No response() hook: wrk would then buffer every body for Lua, and a 64 MiB GET
  -- would measure wrk's copying.  Its own count of non-2xx/3xx answers is enough.
  io.write(string.format(
    'WRK-JSON {"requests": %d, "duration_us": %d, "bytes": %d, "p50_us": %d, "p99_us": %d,'
    .. ' "errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99),
    summary.errors.connect, summary.errors.read, summary.errors.write,
    summary.errors.status, summary.errors.timeout))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process exited with {proc.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of pid, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def thread_cpu(pids: list[int]) -> dict[str, float]:
    """
    CPU seconds so far of the threads of C{pids}, in three heaps: each process's main thread
    (the reactor), its io_uring workers (the kernel's, running the fsyncs handed to it), and
    the rest (the thread pools: commits, SQLite).
    """
    tick = os.sysconf("SC_CLK_TCK")
    heaps = {"reactor": 0.0, "pool": 0.0, "io_uring": 0.0}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # gone meanwhile
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            seconds = (int(fields[11]) + int(fields[12])) / tick
            heap = (
                "reactor" if tid == str(pid) else "io_uring" if name.startswith("iou-") else "pool"
            )
            heaps[heap] += seconds
    return heaps


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class Server:
    """twistd -n hmacfs with a config of its own, as an admin runs it."""

    def __init__(self, workdir: str, name: str, extra: dict[str, object]) -> None:
        self.dir = os.path.join(workdir, name)
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        self.port = free_port()
        self.store = os.path.join(self.dir, "store")
        settings = {
            "ListenPort": f"127.0.0.1:{self.port}",
            "Secret": SECRET.decode(),
            "StoreDir": self.store,
            "LogLevel": "warn",
            "LogFile": os.path.join(self.dir, "hmacfs.log"),
            # Every client here is 127.0.0.1, standing for many: the per-client cap would
            # refuse 400 of the 500 slow uploads.
            "MaxConnectionsPerClient": 0,
            **extra,
        }
        self.config = os.path.join(self.dir, "config.toml")
        with open(self.config, "w") as f:
            for key, value in settings.items():
                f.write(f"{key} = {json.dumps(value)}\n")
        self.settings = settings
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        # This checkout's code, and its plugin: twistd finds plugins only in real
        # twisted/plugins directories on sys.path, which an editable install does not add.
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        stderr = os.path.join(self.dir, "stderr")
        with open(stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [TWISTD, "-n", "--pidfile=", "hmacfs", "--config", self.config],
                cwd=self.dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            wait_port(self.port, self.proc)
        except RuntimeError as e:
            with open(stderr, errors="replace") as f:
                raise RuntimeError(f"hmacfs {e}: {f.read()[-2000:]}") from None

    @property
    def pids(self) -> list[int]:
        """The server process and any worker processes it started."""
        pids = [self.proc.pid]
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            pass
        return pids

    def rss(self) -> int:
        return sum(proc_status(pid)["VmRSS"] for pid in self.pids)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def url(self, path: str, size: int, content_type: str | None = None) -> str:
        put, _ = auth.slot_put(SECRET, self.base + "/upload/", path, size, content_type, "v", 0)
        return put

    def target(self, path: str, size: int) -> str:
        """The signed request target (path and query) of a slot, for raw HTTP clients."""
        return self.url(path, size)[len(self.base) :]

    def put_file(self, path: str, src: str) -> None:
        """One upload of the file src through curl -T, asserting its 201."""
        code = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", src,
             self.url(path, os.path.getsize(src))],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        if code != "201":
            raise RuntimeError(f"PUT {path}: HTTP {code}")

    def put(self, path: str, data: bytes) -> None:
        """One upload of data (through a file, for curl)."""
        src = os.path.join(self.dir, "put.tmp")
        with open(src, "wb") as f:
            f.write(data)
        try:
            self.put_file(path, src)
        finally:
            os.unlink(src)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, without connecting to it."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    return True
    return False


def socat_once(src: str, dst: str) -> float:
    """Seconds for src's bytes through loopback into dst (fsynced, as hmacfs does)."""
    port = free_port()
    receiver = subprocess.Popen(
        ["socat", "-u", "-b", str(MiB), f"TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1",
         f"OPEN:{dst},creat,trunc"],
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not listening(port):
        if receiver.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("socat did not listen")
        time.sleep(0.01)
    start = time.perf_counter()
    subprocess.run(
        ["socat", "-u", "-b", str(MiB), f"OPEN:{src}", f"TCP:127.0.0.1:{port}"], check=True
    )
    receiver.wait()
    fsync_path(dst)
    elapsed = time.perf_counter() - start
    if os.path.getsize(dst) != os.path.getsize(src):
        raise RuntimeError("socat lost bytes")
    os.unlink(dst)
    return elapsed


def curl_once(server: Server, src: str, name: str) -> tuple[float, int, int]:
    """
    Seconds for one curl -T of src to hmacfs; the server's RSS before (all its processes),
    and the growth to the peak (VmHWM) of the process that grew most: the one receiving.
    """
    pids = server.pids
    before = {pid: proc_status(pid)["VmRSS"] for pid in pids}
    for pid in pids:
        reset_peak(pid)
    size = os.path.getsize(src)
    start = time.perf_counter()
    server.put_file(f"big/{name}", src)
    elapsed = time.perf_counter() - start
    growth = max(proc_status(pid)["VmHWM"] - before[pid] for pid in pids)
    stored = os.path.join(server.store, "big", name)
    if os.path.getsize(stored) != size:
        raise RuntimeError("large upload: wrong size stored")
    os.unlink(stored)
    return elapsed, sum(before.values()), growth


def curl_ceiling(src: str) -> float:
    """
    Seconds for curl -T of src to a server that reads and drops the body: what curl alone
    can send here, whatever the server.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def sink():
        conn, _ = listener.accept()
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            lines, _, body = head.partition(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in lines.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            if b"100-continue" in lines.lower():
                conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            left, buffer = length - len(body), bytearray(MiB)
            while left > 0:
                left -= conn.recv_into(buffer)
            conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=sink)
    thread.start()
    start = time.perf_counter()
    subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-T", src, f"http://127.0.0.1:{port}/x"], check=True
    )
    elapsed = time.perf_counter() - start
    thread.join()
    listener.close()
    return elapsed


def random_file(workdir: str, size: int) -> str:
    """A file of size random bytes in workdir (made once, kept for the run)."""
    src = os.path.join(workdir, f"random-{size}.bin")
    if not os.path.exists(src) or os.path.getsize(src) != size:
        with open(src + ".tmp", "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 16 * MiB))
                f.write(chunk)
                left -= len(chunk)
        os.replace(src + ".tmp", src)
    return src


def large_upload(server: Server, workdir: str, size: int, rounds: int) -> dict:
    src = random_file(workdir, size)
    limits, ours, ceilings, befores, growths = [], [], [], [], []
    for i in range(rounds):
        limits.append(socat_once(src, os.path.join(workdir, "socat.out")))
        elapsed, before, growth = curl_once(server, src, f"{i}.bin")
        ours.append(elapsed)
        befores.append(before)
        growths.append(growth)
        ceilings.append(curl_ceiling(src))
    mb = size / 1e6
    limit = mb / statistics.median(limits)
    hmacfs = mb / statistics.median(ours)
    return {
        "bytes": size,
        "rounds": rounds,
        "socat_MBps": [round(mb / t, 1) for t in limits],
        "hmacfs_MBps": [round(mb / t, 1) for t in ours],
        "socat_median_MBps": round(limit, 1),
        "hmacfs_median_MBps": round(hmacfs, 1),
        "ratio": round(hmacfs / limit, 3),
        "curl_ceiling_MBps": [round(mb / t, 1) for t in ceilings],
        "curl_ceiling_median_MBps": round(mb / statistics.median(ceilings), 1),
        "rss_before_MiB": round(max(befores) / MiB, 1),
        "rss_growth_MiB": round(max(growths) / MiB, 1),
    }


def run_wrk(
    url: str, paths_file: str, method: str, body: int, seconds: float, workdir: str,
    threads: int = 2, connections: int = 64,
) -> dict:  # fmt: skip
    script = os.path.join(workdir, "bench.lua")
    with open(script, "w") as f:
        f.write(WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "30s",
         "-s", script, url, "--", str(threads), paths_file, str(body), method],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return parse_wrk(out)


def parse_wrk(out: str) -> dict:
    """The figures of one wrk run from its output (WRK_SCRIPT's done())."""
    line = next(x for x in out.splitlines() if x.startswith("WRK-JSON "))
    result = json.loads(line[len("WRK-JSON ") :])
    seconds_taken = result["duration_us"] / 1e6
    result["rps"] = round(result["requests"] / seconds_taken, 1)
    result["MBps"] = round(result["bytes"] / seconds_taken / 1e6, 1)
    result["p50_ms"] = round(result.pop("p50_us") / 1000, 2)
    result["p99_ms"] = round(result.pop("p99_us") / 1000, 2)
    errors = result["errors"]
    result["failed"] = errors["status"] + errors["connect"] + errors["read"] + errors["timeout"]
    return result


def presign(
    server: Server, workdir: str, run: str, count: int, size: int, layout: str = "flat"
) -> str:
    """
    A file of count signed request targets: C{small/<run>/<i>.bin} (flat), or
    C{<uuid>/s<i>.bin} (slot: a new directory for each, as Prosody and ejabberd hand out).
    """
    path = os.path.join(workdir, f"paths-{run}.txt")
    with open(path, "w") as f:
        for i in range(count):
            name = f"{uuid.uuid4()}/s{i}.bin" if layout == "slot" else f"small/{run}/{i:07d}.bin"
            f.write(server.target(name, size) + "\n")
    return path


def durable_files(
    directory: str, count: int = 4000, threads: int = 10, layout: str = "flat"
) -> float:
    """
    Files per second that threads make durable in one directory, each as an upload is committed
    (a dot temp file created, 4 KiB written, fsync, link to its name, unlink, directory fsync),
    with no HTTP.  In the slot layout each file goes into a new directory of its own (mkdir
    first), and the parent of that directory is fsynced after it, so that its entry is durable
    too.  Nothing is removed: on ext4 without a journal, inodes freed in the last minutes make
    every creation scan past them (the kernel's recently_deleted()).
    """
    os.makedirs(directory)
    slots = layout == "slot"
    data = b"x" * 4096
    names = iter(range(count))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                i = next(names, None)
            if i is None:
                return
            where = directory
            if slots:
                where = os.path.join(directory, f"{i:07d}")
                os.mkdir(where)
            temp = os.path.join(where, f".{i}.part")
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            os.link(temp, os.path.join(where, f"{i}.bin"))
            os.unlink(temp)
            fsync_path(where)
            if slots:
                fsync_path(directory)

    start = time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return round(count / (time.perf_counter() - start), 1)


def small_puts(
    server: Server, workdir: str, run: str, seconds: float, layout: str = "flat"
) -> dict:
    paths = presign(server, workdir, run, 250_000, 4096, layout)
    return run_wrk(server.base, paths, "PUT", 4096, seconds, workdir)


def gets(server: Server, workdir: str, size: int, seconds: float) -> dict:
    name = f"get/{size}.bin"
    server.put(name, os.urandom(size))
    paths = os.path.join(workdir, "get-paths.txt")
    with open(paths, "w") as f:
        f.write(f"/upload/{name}\n")
    return run_wrk(server.base, paths, "GET", 0, seconds, workdir)


async def _slow_upload(port: int, target: str, size: int, rate: int, results: dict) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        results["refused"] += 1
        results["errors"].append(str(e))
        return
    results["connected"] += 1
    head = (
        f"PUT {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    writer.write(head.encode())
    piece = rate // 8
    sent = 0
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        while sent < size:
            n = min(piece, size - sent)
            writer.write(b"s" * n)
            await writer.drain()
            sent += n
            await asyncio.sleep(max(0.0, start + sent / rate - loop.time()))
        status = await reader.readline()
    except OSError as e:
        results["broken"] += 1
        results["errors"].append(f"after {sent} bytes: {e}")
        return
    finally:
        writer.close()
    if b" 201 " in status:
        results["created"] += 1
    else:
        results["errors"].append(status.decode(errors="replace").strip())


def slow_uploads_with_puts(
    server: Server, workdir: str, run: str, count: int, rate: int, seconds: float
) -> dict:
    """count uploads paced at rate B/s, started together, while small_puts runs."""
    size = int(rate * (seconds + 4))  # they outlast the small PUTs by a few seconds
    targets = [server.target(f"slow/{run}/{i}.bin", size) for i in range(count)]
    results = {"connected": 0, "refused": 0, "broken": 0, "created": 0, "errors": []}
    peak = [server.rss()]

    async def main():
        sampling = True

        async def sample():
            while sampling:
                peak.append(server.rss())
                await asyncio.sleep(0.1)

        sampler = asyncio.ensure_future(sample())
        uploads = [
            asyncio.ensure_future(_slow_upload(server.port, t, size, rate, results))
            for t in targets
        ]
        await asyncio.sleep(1)  # all connected and streaming before the load starts
        loop = asyncio.get_running_loop()
        puts = await loop.run_in_executor(None, small_puts, server, workdir, run, seconds)
        await asyncio.gather(*uploads)
        sampling = False
        await sampler
        return puts

    puts = asyncio.run(main())
    results["errors"] = results["errors"][:5]
    return {
        "uploads": count,
        "rate_Bps": rate,
        "bytes_each": size,
        **results,
        "rss_max_MiB": round(max(peak) / MiB, 1),
        "small_puts": puts,
    }


def variant(args, workdir: str, name: str, extra: dict) -> dict:
    server = Server(workdir, name, extra)
    server.start()
    try:
        print(f"[{name}] large upload x{args.rounds} ...", file=sys.stderr, flush=True)
        result = {"config": extra}
        result["large_upload"] = large_upload(server, workdir, args.size, args.rounds)
        print(f"[{name}] small PUTs ...", file=sys.stderr, flush=True)
        result["small_puts"] = small_puts(server, workdir, "a", args.seconds)
        result["durable_files_per_s"] = durable_files(os.path.join(workdir, f"files-{name}"))
        print(f"[{name}] small PUTs, a new directory each ...", file=sys.stderr, flush=True)
        before = thread_cpu(server.pids)
        result["slot_puts"] = small_puts(server, workdir, "s", args.seconds, "slot")
        after = thread_cpu(server.pids)
        requests = max(result["slot_puts"]["requests"], 1)
        result["slot_cpu_us"] = {
            heap: round(1e6 * (after[heap] - before[heap]) / requests) for heap in after
        }
        result["durable_slot_files_per_s"] = durable_files(
            os.path.join(workdir, f"slots-{name}"), layout="slot"
        )
        print(f"[{name}] GETs ...", file=sys.stderr, flush=True)
        result["get_4k"] = gets(server, workdir, 4096, args.seconds)
        result["get_64m"] = gets(server, workdir, 64 * MiB, args.seconds)
        print(f"[{name}] {args.slow} slow uploads + small PUTs ...", file=sys.stderr, flush=True)
        result["slow"] = slow_uploads_with_puts(
            server, workdir, "b", args.slow, 64 * 1024, args.seconds
        )
        result["server_log"] = _problems(os.path.join(server.dir, "hmacfs.log"))
        return result
    finally:
        server.stop()


def _problems(path: str, n: int = 40) -> list[str]:
    """The server log's first lines at warn level or worse (LogLevel is warn)."""
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[:n]
    except OSError:
        return []


def table(results: dict) -> str:
    names = list(results["variants"])
    rows = [("", "target", *names)]

    def row(label, target, get):
        rows.append((label, target, *(get(results["variants"][n]) for n in names)))

    t = results["targets"]
    first = results["variants"][names[0]]
    big = first["large_upload"]["bytes"]
    big_label = f"{big / 2**30:g} GiB" if big >= 2**30 else f"{big / 2**20:g} MiB"
    slow = first["slow"]["uploads"]
    row(
        f"{big_label} PUT by curl -T, MB/s (median)",
        "",
        lambda v: f"{v['large_upload']['hmacfs_median_MBps']}",
    )
    row(
        "  curl alone, to a sink",
        "",
        lambda v: f"{v['large_upload']['curl_ceiling_median_MBps']}",
    )
    row("socat limit, MB/s (median)", "", lambda v: f"{v['large_upload']['socat_median_MBps']}")
    row(
        "  hmacfs / limit",
        f">= {t['upload_ratio']:.2f}",
        lambda v: f"{v['large_upload']['ratio']:.2f}",
    )
    row("  RSS before, MiB", "", lambda v: f"{v['large_upload']['rss_before_MiB']}")
    row(
        "  RSS growth (peak), MiB",
        f"<= {t['upload_rss_growth_mib']}",
        lambda v: f"{v['large_upload']['rss_growth_MiB']}",
    )
    for key, label, target, alone in (
        ("small_puts", "4 KiB PUTs, req/s", f">= {t['small_put_rps']}", "durable_files_per_s"),
        (
            "slot_puts",
            "4 KiB PUTs, new directory each, req/s",
            "",
            "durable_slot_files_per_s",
        ),
        ("get_4k", "4 KiB GETs, req/s", f">= {t['small_get_rps']}", None),
    ):
        if key not in first:
            continue  # a JSON of a run from before the row existed
        row(label, target, lambda v, k=key: f"{v[k]['rps']:.0f}")
        row("  p50 / p99 ms", "", lambda v, k=key: f"{v[k]['p50_ms']} / {v[k]['p99_ms']}")
        row(
            "  requests (errors)",
            "",
            lambda v, k=key: f"{v[k]['requests']} ({v[k]['failed']})",
        )
        if alone is not None:
            row("  files made durable, no HTTP, /s", "", lambda v, a=alone: f"{v[a]:.0f}")
            row(
                "  hmacfs / file system",
                f">= {t['small_put_share']:.2f}" if key == "slot_puts" else "",
                lambda v, k=key, a=alone: f"{v[k]['rps'] / v[a]:.2f}",
            )
        if key == "slot_puts" and "slot_cpu_us" in first:
            row(
                "  CPU/PUT us: reactor/pools/io_uring",
                "",
                lambda v: "{reactor} / {pool} / {io_uring}".format(**v["slot_cpu_us"]),
            )
    row("64 MiB GETs, MB/s", f">= {t['big_get_mbps']}", lambda v: f"{v['get_64m']['MBps']:.0f}")
    row(
        f"{slow} slow PUTs: 201 / refused",
        f"{slow} / 0",
        lambda v: f"{v['slow']['created']} / {v['slow']['refused']}",
    )
    row("  server RSS max, MiB", f"< {t['slow_rss_mib']}", lambda v: f"{v['slow']['rss_max_MiB']}")
    row(
        "  4 KiB PUTs meanwhile, req/s",
        "",
        lambda v: f"{v['slow']['small_puts']['rps']:.0f}",
    )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024 * MiB, help="large upload bytes")
    parser.add_argument("--rounds", type=int, default=3, help="large upload rounds (odd)")
    parser.add_argument("--seconds", type=int, default=6, help="each wrk run")
    parser.add_argument("--slow", type=int, default=500, help="slow uploads")
    parser.add_argument("--cap", default="8GB", help="MaxBytesPerSecond when on")
    parser.add_argument(
        "--workers", type=int, default=1, help="the server's Workers (processes serving)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config key of the servers measured, e.g. SyncUploads=false (a TOML value)",
    )
    parser.add_argument("--dir", default=None, help="scratch directory (needs ~3x --size)")
    parser.add_argument(
        "--json",
        default=None,
        help="JSON output (default bench/results/latest.json, s3-latest.json with s3)",
    )
    parser.add_argument(
        "--storage",
        choices=("local", "s3"),
        default="local",
        help="s3: hmacfs on a SeaweedFS of its own beside the bare store (bench/s3_rows.py)",
    )
    parser.add_argument(
        "--reader-cache-mb", type=int, default=64, help="s3: the gateway's -s3.readerCacheSizeMB"
    )
    parser.add_argument("--redis", default="127.0.0.1:6379", help="s3: the nodes' RedisAddr")
    parser.add_argument(
        "--redis-db", type=int, default=11, help="s3: the nodes' RedisDB (flushed before, after)"
    )
    args = parser.parse_args(argv)
    if args.json is None:
        latest = "s3-latest.json" if args.storage == "s3" else "latest.json"
        args.json = os.path.join(HERE, "results", latest)
    for tool in ("curl", "socat", "wrk"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} is not installed (bench/run installs it)")
    workdir = args.dir or tempfile.mkdtemp(prefix="hmacfs-bench-")
    os.makedirs(workdir, exist_ok=True)
    common: dict[str, object] = {"Workers": args.workers} if args.workers > 1 else {}
    for setting in args.set:
        key, _, value = setting.partition("=")
        try:
            common[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            common[key] = value  # a bare string
    started = time.time()
    results = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "memory_GiB": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
        },
        "targets": TARGETS,
        "workers": args.workers,
        "settings": args.set,
        "variants": {},
    }
    try:
        if args.storage == "s3":
            import s3_rows

            results["targets"] = s3_rows.TARGETS
            results["s3"] = s3_rows.run(args, workdir, common)
        else:
            results["variants"]["MaxBytesPerSecond off"] = variant(args, workdir, "off", {**common})
            results["variants"][f"MaxBytesPerSecond {args.cap}"] = variant(
                args, workdir, "on", {**common, "MaxBytesPerSecond": args.cap}
            )
    finally:
        if args.dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = round(time.time() - started, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    if args.storage == "s3":
        del results["variants"]
        print(s3_rows.header(results, args.json))
        print(s3_rows.table(results))
        return 0
    m = results["machine"]
    print(
        textwrap.dedent(f"""\
        hmacfs benchmark, {results["date"]}: {m["cpus"]} CPUs, {m["memory_GiB"]} GiB,
        Python {m["python"]}, Linux {m["kernel"]}; Workers = {results["workers"]};{
            "".join(f" {setting};" for setting in args.set)
        }
        {results["seconds"]} s; JSON: {args.json}
        """)
    )
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
