"""
hmacd.services as data: what the builders make of a config for several nodes (the shared
rate limit and the one-sweeper lease are wired, not only written).
"""

from __future__ import annotations

import dataclasses

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacd.config import Config
from hmacd.housekeeping import ExpirySweep, PartialSweep
from hmacd.services import build_file_server, sweeps
from hmacd.store.failover import FailoverStore
from hmacd.store.memory import MemoryStore
from hmacd.throttle import RateLimiter, SharedRateLimiter
from tests.support import SECRET


def _server(config: Config, primary=None):
    clock = Clock()
    metadata = FailoverStore(primary if primary is not None else MemoryStore(), clock=clock)
    return build_file_server(config, SECRET, clock, metadata)


class BuildersTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.config = Config(store_dir=self.mktemp())

    def test_rate_limit_per_process(self) -> None:
        """RateLimitPerMinute alone: buckets of this process."""
        fs = _server(dataclasses.replace(self.config, rate_limit_per_minute=60))
        self.assertIsInstance(fs.limiter, RateLimiter)

    def test_rate_limit_shared(self) -> None:
        """RateLimitShared: the buckets live in the primary store (Redis), shared by nodes."""
        config = dataclasses.replace(
            self.config,
            rate_limit_per_minute=60,
            rate_limit_shared=True,
            redis_addr="127.0.0.1:6379",
        )
        fs = _server(config)
        self.assertIsInstance(fs.limiter, SharedRateLimiter)

    def test_no_rate_limit(self) -> None:
        """No RateLimitPerMinute: no limiter on the hot path."""
        self.assertIsNone(_server(self.config).limiter)

    def test_sweep_lease_only_when_shared(self) -> None:
        """The expiry sweep takes a lease when other nodes may share the store, else none."""
        alone = [s for s in sweeps(self.config, _server(self.config)) if isinstance(s, ExpirySweep)]
        self.assertIsNone(alone[0].lease)
        shared = dataclasses.replace(self.config, redis_addr="127.0.0.1:6379")
        fs = _server(shared)
        [expiry] = [s for s in sweeps(shared, fs) if isinstance(s, ExpirySweep)]
        self.assertIsNotNone(expiry.lease)

    def test_partial_sweep_lease_only_for_a_shared_object_store(self) -> None:
        """Abandoned uploads are swept by one node in a shared bucket, by each in its StoreDir."""
        shared = dataclasses.replace(self.config, redis_addr="127.0.0.1:6379")
        [local] = [s for s in sweeps(shared, _server(shared)) if isinstance(s, PartialSweep)]
        self.assertIsNone(local.lease)
        s3 = dataclasses.replace(
            shared,
            storage_backend="s3",
            s3_endpoint="http://127.0.0.1:1",
            s3_bucket="b",
        )
        fs = _server(dataclasses.replace(shared))
        [bucket] = [s for s in sweeps(s3, fs) if isinstance(s, PartialSweep)]
        self.assertIsNotNone(bucket.lease)
        self.assertEqual(bucket.lease.name, "partial-sweep")
