"""
Where the shared secret comes from.

Order: C{--secret}, then C{HMACFS_SECRET}, then C{Secret} in the config, and
with none of those a random secret generated once and kept, mode 0600, in
C{StoreDir/.hmacfs/secret}, so that the XMPP server can be given the same
value and a restart does not invalidate the slots it has handed out.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping

__all__ = ["SecretError", "resolve_secret", "secret_file"]

ENV_VAR = "HMACFS_SECRET"


class SecretError(Exception):
    """No usable secret; the message says where we looked."""


def secret_file(store_dir: str) -> str:
    return os.path.join(store_dir, ".hmacfs", "secret")


def resolve_secret(
    store_dir: str,
    configured: str | None,
    cli: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> tuple[bytes, str]:
    """
    The secret as bytes, and where it came from (for the log; never the
    secret itself).
    """
    if environ is None:
        environ = os.environ
    for value, origin in ((cli, "--secret"), (environ.get(ENV_VAR), ENV_VAR)):
        if value is not None:
            if not value:
                raise SecretError(f"{origin}: the secret must not be empty")
            return value.encode("utf-8"), origin
    if configured is not None:
        return configured.encode("utf-8"), "the config file"
    return _load_or_create(secret_file(store_dir))


def _load_or_create(path: str) -> tuple[bytes, str]:
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            with open(path, "rb") as f:
                value = f.read().strip()
            if not value:
                raise SecretError(f"{path}: the secret file is empty") from None
            return value, path
        value = secrets.token_urlsafe(32).encode("ascii")
        with open(fd, "wb") as f:
            f.write(value + b"\n")
            f.flush()
            os.fsync(f.fileno())
        return value, f"{path} (generated)"
    except OSError as e:
        raise SecretError(f"{path}: {e.strerror}") from None
