"""
One sweeper across nodes: a named lease in the shared metadata store.

Nodes that share a store (Redis, or an SQL fallback) would otherwise all run
the expiry sweep over the same records, and all abort the same abandoned
uploads in a shared object store.  Before each sweep, and before each batch
of it, a node takes the lease (its holder takes it again to renew it); a
node that cannot get it, or loses it, or cannot reach the store, skips or
stops.  A holder that dies is replaced once its lease lapses.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.logger import Logger

from hmacd.store import StoreUnavailable

__all__ = ["SweepLease", "default_node_name", "is_shared", "node_name", "sweep_lease"]

log = Logger()


def default_node_name() -> str:
    """This process's name among the nodes: host name and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


def node_name(config: Any) -> str:
    """C{NodeName}, or host name and process id: the owner of this node's claims and leases."""
    return getattr(config, "node_name", "") or default_node_name()


def is_shared(config: Any) -> bool:
    """Whether other nodes may use the same metadata store: Redis or an SQL fallback is set."""
    return bool(config.redis_addr) or bool(config.fallback_enabled)


class SweepLease:
    """
    The lease C{name} for this C{node}, taken for C{ttl} seconds at a time.

    @ivar held: whether the last attempt got it (for logs and tests).
    """

    def __init__(self, store: Any, node: str, ttl: float, name: str = "sweep") -> None:
        self.store = store
        self.node = node
        self.ttl = ttl
        self.name = name
        self.held = False

    async def take(self) -> bool:
        """Take or renew the lease; False if another node holds it or the store cannot say."""
        try:
            held = bool(await self.store.lease(self.name, self.node, self.ttl))
        except StoreUnavailable as e:
            # Sweeping blind could double another node's work; the next sweep tries again.
            log.info("{name} lease unknown, not sweeping: {why}", name=self.name, why=e)
            held = False
        if held != self.held:
            if held:
                log.info(
                    "{node} now sweeps for every node ({name} lease)",
                    node=self.node,
                    name=self.name,
                )
            else:
                log.info(
                    "{node} stops sweeping: another node holds the {name} lease",
                    node=self.node,
                    name=self.name,
                )
        self.held = held
        return held


def sweep_lease(config: Any, store: Any, interval: float, name: str = "sweep") -> SweepLease | None:
    """
    The lease a sweep run every C{interval} seconds takes under C{config}, or
    None when the store is this node's alone (nothing to share).  The lease
    outlives two missed sweeps, so a holder keeps it while it lives and a dead
    one is replaced within about three intervals.
    """
    if not is_shared(config):
        return None
    return SweepLease(store, node_name(config), ttl=max(3 * interval, 30.0), name=name)
