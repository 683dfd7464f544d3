"""
Claims on upload paths across nodes: who may receive the body of a path, decided before it.

On one host a claim is a record lock in C{StoreDir} (L{hmacd.claims}).  Nodes that share an
object store share no directory: there the claim is taken in the shared metadata store
(L{hmacd.store.IMetadataStore.claim}: Redis C{SET NX} with an expiry, or a unique row in SQL),
atomic across every node, for a lease that this node renews while the body arrives.  A node
that dies mid-upload stops renewing, and its claim lapses after the lease.  The object
store's C{If-None-Match: *} on the final write stays the backstop (a claim renewed too late,
two sides of a store outage: README, "Several nodes").

Each claim has an owner of its own (the node's name and a random token): two requests of
one node for one path are two owners, and the second is refused like one on another node.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacd.logs import escape

__all__ = ["DEFAULT_LEASE", "NodeClaim", "NodeClaims"]

# How long a claim outlives a node that stopped renewing it (seconds).  It is renewed every
# third of that while its upload runs.
DEFAULT_LEASE = 15.0

log = Logger()


class NodeClaim:
    """One path held by this node, until L{release}."""

    def __init__(self, claims: NodeClaims, path: str, owner: str) -> None:
        self._claims = claims
        self.path = path
        self.owner = owner
        self.held = True
        # False once a renewal found another owner (our lease had lapsed).
        self.kept = True

    def release(self) -> None:
        """Let the path go (idempotent; from any thread: the store is asked from the reactor)."""
        if not self.held:
            return
        self.held = False
        if threading.get_ident() == self._claims.thread:
            self._claims._drop(self)
        else:
            self._claims.reactor.callFromThread(self._claims._drop, self)


class NodeClaims:
    """
    The claims of this node (C{node}) in the shared C{store}.

    Built in the reactor thread: a claim released in another thread is let go from there.

    @param reactor: IReactorTime (the renewals) and C{callFromThread}.
    @param lease: seconds a claim lasts unless renewed.
    """

    def __init__(self, store: Any, node: str, reactor: Any, lease: float = DEFAULT_LEASE) -> None:
        self.store = store
        self.node = node
        self.reactor = reactor
        self.lease = lease
        self._held: set[NodeClaim] = set()
        self._renewing: LoopingCall | None = None
        self.thread = threading.get_ident()

    def __len__(self) -> int:
        return len(self._held)

    def take(self, path: str) -> Deferred[NodeClaim | None]:
        """
        Claim C{path}: fires the L{NodeClaim}, or None while another upload (here or on
        another node) holds it; fails as the store does (unreachable, too slow).
        """
        owner = f"{self.node}/{secrets.token_hex(8)}"

        def answered(held: bool) -> NodeClaim | None:
            if not held:
                return None
            claim = NodeClaim(self, path, owner)
            self._held.add(claim)
            self._startRenewing()
            return claim

        d: Deferred[bool] = self.store.claim(path, owner, self.lease)
        return d.addCallback(answered)

    def _startRenewing(self) -> None:
        if self._renewing is None:
            self._renewing = LoopingCall(self._renewAll)
            self._renewing.clock = self.reactor
            self._renewing.start(self.lease / 3, now=False).addErrback(
                lambda f: log.failure("renewing claims failed", f)
            )

    def _renewAll(self) -> None:
        for claim in list(self._held):
            d = self.store.renew(claim.path, claim.owner, self.lease)
            d.addCallbacks(self._renewed, self._notRenewed, (claim,), None, (claim,))

    def _renewed(self, kept: bool, claim: NodeClaim) -> None:
        if not kept and claim.kept and claim.held:
            claim.kept = False
            # Its lease lapsed (a store too slow, a paused process): another node may take
            # the path; the object store's If-None-Match still lets only one file in.
            log.warn("the claim on {path} lapsed before its upload ended", path=escape(claim.path))

    def _notRenewed(self, failure: Failure, claim: NodeClaim) -> None:
        # The store is down or slow: logged by the store; the next round tries again.
        pass

    def _drop(self, claim: NodeClaim) -> None:
        self._held.discard(claim)
        if not self._held:
            self.stop()
        d = self.store.release(claim.path, claim.owner)
        # Not released, it lapses after the lease.
        d.addErrback(lambda f: None)

    def stop(self) -> None:
        """No more renewals (the service stops, or nothing is held)."""
        if self._renewing is not None:
            if self._renewing.running:
                self._renewing.stop()
            self._renewing = None
