"""
The cluster suite (issue 16, "How it is tested"): three hmacfs nodes, each a
C{twistd -n hmacfs} process with its own ports and StoreDir, sharing one
Redis, one PostgreSQL and one SeaweedFS, driven from outside over HTTP.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import SynchronousTestCase

from tests.cluster import (
    Cluster,
    Node,
    ObjectStore,
    Pattern,
    ask,
    download_digest,
    expect_continue,
    received,
    request,
    send_piece,
    send_piece_and_kill,
)
from tests.seaweed import SeaweedCluster, SeaweedMini, shared_mini

MiB = 1 << 20


def mini_cluster(testCase: SynchronousTestCase) -> Cluster:
    """Three nodes on the SeaweedFS shared by this test process, under a prefix of their own."""
    return Cluster(testCase, ObjectStore.of(shared_mini()))


class ClusterTests(SynchronousTestCase):
    """What a client sees of three nodes behind a load balancer that sends it anywhere."""

    def test_upload_anywhere_download_everywhere(self) -> None:
        """A file uploaded on one node is served by the others byte for byte, with its type."""
        cluster = mini_cluster(self)
        files = [
            # (path, size, signed type, protocol): two bodies that go up as one PutObject,
            # one streamed to a multipart upload (above the 16 MiB threshold); three kinds
            # of slot (v2 and token in the URL, a JWT in Authorization).
            ("one/notes.txt", 1000, "text/plain; charset=utf-8", "v2"),
            ("two/photo day 1.jpg", MiB + 3, "image/jpeg", "jwt"),
            ("three/clip.mp4", 20 * MiB + 5, "video/mp4", "token"),
        ]
        for i, (path, size, content_type, protocol) in enumerate(files):
            data = Pattern(path, size)
            target, headers = cluster.slot(path, size, content_type, protocol)
            uploader = cluster[i % 3]
            answer = request(uploader, "PUT", target, data.chunks(), headers, length=size)
            self.assertEqual(answer.status, 201, (path, answer, cluster.logs()))
            seen = []
            for node in cluster:
                status, digest, length, got = download_digest(node, cluster.url(path))
                self.assertEqual(
                    (status, digest, length, got.get("content-type")),
                    (200, data.sha256(), size, content_type),
                    (path, node.name, cluster.logs()),
                )
                seen.append((got.get("etag"), got.get("last-modified")))
            self.assertEqual(len(set(seen)), 1, (path, seen))
            self.assertIsNotNone(seen[0][0])

    def test_racing_puts_one_winner(self) -> None:
        """20 PUTs of one URL at once, spread over 3 nodes: one 201, 19 409; the winner kept."""
        cluster = mini_cluster(self)
        path, size, content_type = "race/one.bin", 256 * 1024, "application/octet-stream"
        target, headers = cluster.slot(path, size, content_type)
        bodies = [Pattern(f"racer {n}", size).bytes() for n in range(20)]
        start = threading.Barrier(len(bodies))

        def put(n: int) -> int:
            start.wait(timeout=30)
            return request(cluster[n % 3], "PUT", target, bodies[n], headers).status

        with ThreadPoolExecutor(len(bodies)) as pool:
            statuses = list(pool.map(put, range(len(bodies))))
        self.assertEqual(sorted(statuses), [201] + [409] * 19, (statuses, cluster.logs()))
        winner = bodies[statuses.index(201)]
        for node in cluster:
            status, digest, length, _ = download_digest(node, cluster.url(path))
            self.assertEqual(
                (status, digest, length), (200, hashlib.sha256(winner).hexdigest(), size)
            )
        # Every loser's spooled body is gone from every node.
        for node in cluster:
            self.assertEqual(node.spool_files(), [], node.name)

    def test_resumable_across_nodes_with_a_node_killed(self) -> None:
        """200 MiB in pieces alternating A/B, A killed mid-piece, on at B and C: whole at C."""
        resumable_across_nodes(self, mini_cluster(self))

    def test_resumable_across_nodes_on_a_shared_store_dir(self) -> None:
        """The same 200 MiB journey with one local StoreDir for every node (a shared FS)."""
        resumable_across_nodes(self, Cluster(self, None))

    def test_deduplication_across_nodes(self) -> None:
        """
        Deduplication = true on two nodes: one body uploaded at four paths at once, spread
        over both nodes (a new content raced for), is stored once, each path served by
        both nodes with its own type; the content is one object under .hmacfs/cas/.
        """
        from urllib.parse import urlsplit

        from tests.cluster import _raw

        store = ObjectStore.of(shared_mini())
        cluster = Cluster(self, store, count=2, extra={"Deduplication": True})
        data = Pattern("shared body", 2 * MiB + 7)
        kinds = ["image/png", "image/jpeg", "application/pdf", "video/mp4"]
        paths = [f"dedup/{i}/file" for i in range(len(kinds))]

        def put(i: int) -> int:
            target, headers = cluster.slot(paths[i], data.size, kinds[i])
            return request(cluster[i % 2], "PUT", target, data.bytes(), headers).status

        with ThreadPoolExecutor(len(paths)) as pool:
            self.assertEqual(list(pool.map(put, range(len(paths)))), [201] * 4, cluster.logs())
        for path, kind in zip(paths, kinds, strict=True):
            for node in cluster:
                status, digest, length, got = download_digest(node, cluster.url(path))
                self.assertEqual(
                    (status, digest, length, got.get("content-type")),
                    (200, data.sha256(), data.size, kind),
                    (path, node.name),
                )
        url, headers = store.signed(
            "GET", None, {"list-type": "2", "prefix": cluster.prefix + ".hmacfs/cas/"}
        )
        parts = urlsplit(url)
        assert parts.port is not None
        answer = _raw(parts.port, "GET", f"{parts.path}?{parts.query}", b"", headers, 30)
        self.assertEqual(answer.status, 200, answer)
        self.assertEqual(answer.body.count(b"<Key>"), 1, answer.body)
        self.assertIn(f"<Size>{data.size}</Size>".encode(), answer.body)

    def test_object_store_stopped_and_back(self) -> None:
        """Store stopped: 503 before the body on every node; back: PUTs work without a restart."""
        weed = SeaweedMini(self)
        cluster = Cluster(self, ObjectStore.of(weed))
        before = Pattern("before", 3000)
        target, headers = cluster.slot("outage/before.png", before.size, "image/png")
        answer = request(cluster[0], "PUT", target, before.bytes(), headers)
        self.assertEqual(answer.status, 201, (answer, cluster.logs()))

        pids = [node.pid() for node in cluster]
        weed.stop()
        for node in cluster:
            # The first upload to meet the outage may learn of it only after its body.
            target, headers = cluster.slot(f"outage/probe-{node.name}.png", 10, "image/png")
            answer = request(node, "PUT", target, b"0123456789", headers)
            self.assertEqual(answer.status, 503, (node.name, answer, node.tail()))
            # Now known: refused from the head, before any body byte, and no 100 Continue.
            target, headers = cluster.slot(f"outage/refused-{node.name}.png", 10, "image/png")
            line, got, _ = expect_continue(node, target, 10, headers)
            self.assertTrue(line.startswith(b"HTTP/1.1 503 "), (node.name, line, got))
            retry_after = got.get("retry-after", "")
            self.assertTrue(retry_after.isdigit() and int(retry_after) > 0, got)
            # Downloads cannot be served either (but are not a 404: the file is there).
            self.assertEqual(request(node, "GET", cluster.url("outage/before.png")).status, 503)

        weed.start()
        # Each node finds the store back by its own probe (every 5 s): bounded, generous.
        waiting = {node.name: node for node in cluster}
        attempts = 0
        deadline = time.monotonic() + 60
        while waiting:
            for node in list(waiting.values()):
                after = Pattern(f"after {node.name}", 2000)
                path = f"outage/after-{node.name}.png"
                target, headers = cluster.slot(path, after.size, "image/png")
                answer = request(node, "PUT", target, after.bytes(), headers)
                attempts += 1
                if answer.status == 201:
                    del waiting[node.name]
                    continue
                self.assertEqual(answer.status, 503, (node.name, answer, node.tail()))
                self.assertLess(time.monotonic(), deadline, (list(waiting), cluster.logs()))
            time.sleep(0.5)
        self.assertEqual([node.pid() for node in cluster], pids, "no node was restarted")
        for node in cluster:
            status, digest, _, _ = download_digest(node, cluster.url("outage/before.png"))
            self.assertEqual((status, digest), (200, before.sha256()), node.name)
            for other in cluster:
                path = f"outage/after-{other.name}.png"
                status, digest, _, _ = download_digest(node, cluster.url(path))
                self.assertEqual(
                    (status, digest), (200, Pattern(f"after {other.name}", 2000).sha256())
                )

    def test_volume_server_killed_during_downloads(self) -> None:
        """A SeaweedFS volume server killed mid-download (replication 001): nothing lost."""
        weed = SeaweedCluster(self)
        store = ObjectStore.of(weed)
        store.create_bucket()
        # Nodes A and C talk to one S3 gateway, B to the other: one filer behind both.
        cluster = Cluster(self, store)
        files = [(f"volume/{n}.bin", Pattern(f"volume {n}", 6 * MiB + n)) for n in range(8)]
        for n, (path, data) in enumerate(files):
            target, headers = cluster.slot(path, data.size, "application/octet-stream")
            answer = request(
                cluster[n % 3], "PUT", target, data.chunks(), headers, length=data.size
            )
            self.assertEqual(answer.status, 201, (path, answer, cluster.logs()))
        digests = {path: data.sha256() for path, data in files}
        held = [stored_bytes(os.path.join(weed.dir, f"volume{i}")) for i in range(3)]
        # Replication 001: two copies of every byte, on two servers.
        self.assertGreaterEqual(sum(held), 2 * sum(data.size for _, data in files), held)
        index = held.index(max(held))
        victim = weed.volumes[index]

        retried: list[str] = []
        done = threading.Semaphore(0)

        def download(job: tuple[Node, str]) -> tuple[str, str, int, str]:
            node, path = job
            try:
                try:
                    status, digest, _, _ = download_digest(node, cluster.url(path))
                    if status == 200:
                        return node.name, path, status, digest
                    why = f"status {status}"
                except (http.client.HTTPException, OSError) as e:
                    why = repr(e)
                # hmacfs streams a ranged GET from the gateway, which reads each chunk from
                # a volume server: should the victim die under a chunk it is serving, the
                # gateway's stream breaks after hmacfs has sent its head, and all hmacfs can
                # do is cut the download short (or, before the head, answer 502/503); the
                # retry reads the copy on the other server.  In the runs so far (SeaweedFS
                # 4.48, the kill with 8 of 72 downloads done and 4 in flight) none broke:
                # the gateway went to the replica on its own.  A second break fails.
                retried.append(f"{node.name} {path}: {why}")
                status, digest, _, _ = download_digest(node, cluster.url(path))
                return node.name, path, status, digest
            finally:
                done.release()

        jobs = [(node, path) for _ in range(3) for node in cluster for path, _ in files]
        with ThreadPoolExecutor(4) as pool:
            results = pool.map(download, jobs)
            # Kill it with the first round under way: some downloads done, more in flight.
            for _ in range(6):
                done.acquire(timeout=120)
            victim.kill()
            outcomes = list(results)
        for name, path, status, digest in outcomes:
            self.assertEqual(
                (status, digest), (200, digests[path]), (name, path, retried, cluster.logs())
            )


def stored_bytes(directory: str) -> int:
    """What a SeaweedFS volume server holds: the size of its .dat files."""
    return sum(
        os.path.getsize(os.path.join(directory, name))
        for name in os.listdir(directory)
        if name.endswith(".dat")
    )


PIECE = 16 * MiB
TOTAL = 200 * MiB
# How long the client goes on asking while a dead node's claim lapses (its lease).
LEASE_WAIT = 180.0


def resumable_across_nodes(testCase: SynchronousTestCase, cluster: Cluster) -> None:
    """
    Pieces alternate A, B, A, B; the fifth, to A, is cut halfway by SIGKILL; the
    client asks B where the upload stands (retrying 409 while A's claim lasts) and
    goes on at B, C, B, C...; C then serves the file byte for byte.
    """
    a, b, c = cluster
    path, content_type = "big/film one.mkv", "video/x-matroska"
    data = Pattern(path, TOTAL)
    target, headers = cluster.slot(path, TOTAL, content_type)
    offset = 0
    for n in range(4):
        node = (a, b)[n % 2]
        last = offset + PIECE - 1
        answer = send_piece(node, target, headers, data, offset, last)
        testCase.assertEqual(
            (answer.status, received(answer)), (308, last + 1), (node.name, answer, cluster.logs())
        )
        offset = last + 1
    confirmed = offset
    cut = PIECE // 2 + 12345
    send_piece_and_kill(a, target, headers, data, offset, offset + PIECE - 1, cut)

    goers = itertools.cycle((b, c))
    node = next(goers)
    deadline = time.monotonic() + LEASE_WAIT
    refusals: list[str] = []
    stand: int | None = None
    first_ask = True
    while True:
        testCase.assertLess(time.monotonic(), deadline, (refusals, cluster.logs()))
        if stand is None:
            answer = ask(node, target, headers, TOTAL)
            if answer.status == 409:  # a piece in progress: A's, until its claim lapses
                refusals.append(f"{node.name} ask: 409 {answer.body!r}")
                time.sleep(1)
                continue
            testCase.assertEqual(answer.status, 308, (node.name, answer, cluster.logs()))
            stand = received(answer)
            if first_ask:
                # Nothing a 308 confirmed is lost; nothing beyond what was sent is claimed.
                testCase.assertTrue(confirmed <= stand <= confirmed + cut, (confirmed, stand))
                first_ask = False
        last = min(stand + PIECE, TOTAL) - 1
        answer = send_piece(node, target, headers, data, stand, last)
        if answer.status in (409, 416):  # busy, or not where it stands: ask again
            refusals.append(f"{node.name} {stand}-{last}: {answer.status} {answer.body!r}")
            stand = None
            time.sleep(1)
            continue
        if last == TOTAL - 1:
            testCase.assertEqual(answer.status, 201, (node.name, answer, cluster.logs()))
            break
        testCase.assertEqual(
            (answer.status, received(answer)), (308, last + 1), (node.name, answer, cluster.logs())
        )
        stand = last + 1
        node = next(goers)

    expected = data.sha256()
    status, digest, length, got = download_digest(c, cluster.url(path))
    testCase.assertEqual(
        (status, digest, length, got.get("content-type")), (200, expected, TOTAL, content_type)
    )
    # A, started again after its SIGKILL, serves it too.
    a.start()
    a.wait_ready()
    status, digest, _, _ = download_digest(a, cluster.url(path))
    testCase.assertEqual((status, digest), (200, expected), a.tail())
