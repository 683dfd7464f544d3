"""
Thread pools of hmacfs's own, for work that waits on the network (an object store).

Not the reactor's pool: an object store's blocking call waits on a request whose new
connection has its host name resolved in the reactor's pool (getaddrinfo), so a reactor
pool full of such calls would wait on itself until the store's deadline.  The threads are
daemons: a call still waiting on a reactor that a signal stopped never returns, and the
process must exit all the same.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

__all__ = ["DaemonThread", "DaemonThreadPool", "own_threads"]


class DaemonThread(threading.Thread):
    """A thread the interpreter does not wait for at exit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class DaemonThreadPool(ThreadPool):
    """A thread pool of daemons."""

    threadFactory = DaemonThread


def own_threads(
    reactor: Any, size: int, name: str
) -> tuple[Callable[[Callable[[], Any]], Deferred[Any]], Callable[[], None]]:
    """
    A started pool of up to C{size} daemon threads (none until there is work): a
    C{blocking} that runs a callable there and fires its result in the reactor thread,
    and what stops the pool.  The stop returns at once: the threads end after the work
    they hold (which may be waiting on the reactor that called it).
    """
    pool = DaemonThreadPool(0, size, name)
    pool.start()

    def blocking(work: Callable[[], Any]) -> Deferred[Any]:
        return deferToThreadPool(reactor, pool, work)

    def stop() -> None:
        threading.Thread(target=pool.stop, name=f"{name}-stop", daemon=True).start()

    return blocking, stop
