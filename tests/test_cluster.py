"""
The cluster suite (issue 16, "How it is tested"): three hmacfs nodes, each a
C{twistd -n hmacfs} process with its own ports and StoreDir, sharing one
Redis, one PostgreSQL and one SeaweedFS, driven from outside over HTTP.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import SynchronousTestCase

from tests.cluster import Cluster, Pattern, download_digest, request
from tests.seaweed import shared_mini

MiB = 1 << 20


def mini_cluster(testCase: SynchronousTestCase, **extra: object) -> Cluster:
    """Three nodes on the SeaweedFS shared by this test process, under a prefix of their own."""
    store = shared_mini()
    return Cluster(
        testCase, [store.endpoint], store.bucket, store.access_key, store.secret_key, extra=extra
    )


class ClusterTests(SynchronousTestCase):
    """What a client sees of three nodes behind a load balancer that sends it anywhere."""

    def test_upload_anywhere_download_everywhere(self) -> None:
        """A file uploaded on one node is served by the others byte for byte, with its type."""
        cluster = mini_cluster(self)
        files = [
            # (path, size, signed type, protocol): one PutObject, one multipart upload
            # streamed to the store (above the 16 MiB threshold), one of each slot kind.
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
        """20 PUTs of one URL at once, round-robin over 3 nodes: one 201, 19 409, the winner kept."""
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
