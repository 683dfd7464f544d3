"""
Guards for hmacd.internals: each private attribute of Twisted or of a driver that hmacfs
reaches is still where hmacd.internals expects it.  A failure here means a new release
moved it: adapt hmacd.internals (and only it), then the pin in setup.py.
"""

from __future__ import annotations

# --- HTTP: channels, requests and transports ----------------------------------------------


# --- Stores: twisted.enterprise.adbapi and the database drivers -----------------------------


# --- Composition: listening ports, services, processes -------------------------------------
