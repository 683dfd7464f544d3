"""
Every use of a private attribute of Twisted or of a database driver, in one place.

hmacfs needs a few things that Twisted and the drivers have no public API for (the request
line before C{gotLength} returns, the bytes a transport has not sent yet, ...).  Each one
is reached only through a function here, which names the release it was checked on; and
each has a test in C{tests/test_internals.py} that fails loudly when a new release moves
it, instead of hmacfs misbehaving quietly.  Elsewhere, public API only.

Checked on: Twisted 26.10, pymysql 1.1, psycopg2 2.9, prometheus_client 0.26.
"""

from __future__ import annotations

# --- HTTP: channels, requests and transports (twisted.web.http, twisted.internet) --------


# --- Stores: twisted.enterprise.adbapi and the database drivers -----------------------------


# --- Composition: listening ports, services, processes -------------------------------------
# Public API where it exists: a listener whose port cannot be bound stops start-up through
# twisted.application.strports.service (not StreamServerEndpointService._raiseSynchronously),
# and a worker learns its socket's family from port.getHost() (not port.socket).


def use_multiprocess_values() -> None:
    """
    Make every prometheus_client metric created from now on in this process keep its value
    in the multiprocess files (Workers > 1).

    prometheus_client picks its value class once, at import, from PROMETHEUS_MULTIPROC_DIR:
    hmacfs learns that it has workers later, from its config.  Checked on prometheus_client
    0.26: each metric reads C{prometheus_client.values.ValueClass} when it is created.
    """
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()
