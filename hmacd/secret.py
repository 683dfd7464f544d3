"""
Where the shared secret comes from.

Order: C{--secret}, then C{HMACFS_SECRET}, then C{Secret} in the config, and
with none of those a random secret generated once and kept, mode 0600, in
C{StoreDir/.hmacfs/secret}, so that the XMPP server can be given the same
value and a restart does not invalidate the slots it has handed out.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "PREVIOUS_ENV_VAR",
    "PreviousSecretUses",
    "SecretError",
    "parse_previous_secrets",
    "resolve_previous_secrets",
    "resolve_secret",
    "secret_file",
]

ENV_VAR = "HMACFS_SECRET"
# A JSON list of strings, like PreviousSecrets in the config: '["old"]'.  JSON rather than
# commas because a secret may contain any character.
PREVIOUS_ENV_VAR = "HMACFS_PREVIOUS_SECRETS"


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


def parse_previous_secrets(text: str, origin: str = PREVIOUS_ENV_VAR) -> tuple[str, ...]:
    """
    The secrets of a JSON list of non-empty strings (C{HMACFS_PREVIOUS_SECRETS}).

    @raise SecretError: not such a list; the message names C{origin} and what is wrong,
        never the text itself (it holds secrets).
    """
    expected = 'must be a JSON list of non-empty strings, like ["old-secret"]'
    try:
        value = json.loads(text)
    except ValueError:
        raise SecretError(f"{origin}: {expected}; it is not JSON") from None
    if not isinstance(value, list):
        raise SecretError(f"{origin}: {expected}; got a JSON {type(value).__name__}")
    for position, entry in enumerate(value, 1):
        if not isinstance(entry, str) or not entry:
            raise SecretError(f"{origin}: {expected}; #{position} is not")
    return tuple(value)


def resolve_previous_secrets(
    configured: tuple[str, ...], environ: Mapping[str, str] | None = None
) -> tuple[tuple[str, ...], str]:
    """
    The previous secrets, and where they came from (for the log; never the secrets):
    C{HMACFS_PREVIOUS_SECRETS} when it is set (even to C{[]}, which clears the config's), else
    C{PreviousSecrets} from the config.

    @raise SecretError: the variable is set but not a JSON list of non-empty strings.
    """
    if environ is None:
        environ = os.environ
    text = environ.get(PREVIOUS_ENV_VAR)
    if text is not None:
        return parse_previous_secrets(text), PREVIOUS_ENV_VAR
    return tuple(configured), "the config file"


class PreviousSecretUses:
    """
    Tells the operator that a slot verified with a previous secret: a counter by position
    (C{hmac_file_server_previous_secret_uses_total{position="N"}}, counting every use), and
    an info line "verified with previous secret #N", at most once a minute for each N so
    that a busy server's log is not flooded with them.

    Positions count from 1: #1 is C{PreviousSecrets[0]}.  Never the secret itself.

    @ivar interval: seconds between two log lines about the same position.
    """

    interval = 60.0

    def __init__(
        self, now: Callable[[], float], counter: Any, log: Any, interval: float | None = None
    ) -> None:
        """
        @param now: the clock, in seconds.
        @param counter: a prometheus_client Counter with the label C{position}.
        @param log: a L{twisted.logger.Logger}.
        """
        self._now = now
        self._counter = counter
        self._log = log
        if interval is not None:
            self.interval = interval
        self._logged: dict[int, tuple[float, int]] = {}

    def used(self, position: int) -> None:
        """A slot verified with previous secret #C{position} (1-based)."""
        self._counter.labels(str(position)).inc()
        now = self._now()
        last, unsaid = self._logged.get(position, (None, 0))
        if last is not None and now - last < self.interval:
            self._logged[position] = (last, unsaid + 1)
            return
        self._logged[position] = (now, 0)
        # The uses the previous lines did not mention, so that the log still adds up.
        self._log.info(
            "verified with previous secret #{position}"
            + (" ({unsaid} more uses since the last such line)" if unsaid else ""),
            position=position,
            unsaid=unsaid,
        )
