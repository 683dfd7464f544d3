"""
What a StoreDir needs on disk before a server can start on it: the directory, the secret,
and (for twistd --uid, and Workers) what belongs to the user the server runs as.

One function, L{prepare_store}, for both ways hmacfs starts: twistd calls it from
C{makeService} (before privileges drop, before anything listens), and L{hmacd.make_service}
calls it for an embedding program.  Its errors are one line for the admin.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

from hmacd.claims import claims_file
from hmacd.config import Config
from hmacd.secret import SecretError, resolve_previous_secrets, resolve_secret, secret_file

__all__ = ["PrepareError", "Prepared", "metrics_directory", "prepare_store"]


class PrepareError(Exception):
    """StoreDir (or the secret, or LogFile) cannot be made ready; the text is one line."""


@dataclass(frozen=True)
class Prepared:
    """
    A StoreDir ready to serve from.

    @ivar config: the config with C{store_dir} made absolute.
    @ivar secret: the shared secret, as bytes.
    @ivar origin: where the secret came from, for the log (never the secret itself).
    @ivar metrics_dir: the directory of the processes' shared metrics (Workers > 1), or None.
    @ivar created: what was created here, in order (handed to C{run_as} when given).
    """

    config: Config
    secret: bytes
    origin: str
    metrics_dir: str | None = None
    created: tuple[str, ...] = ()


def metrics_directory(store_dir: str) -> str:
    """
    Where the processes of a server with Workers keep their metrics: emptied here, since
    counters start from zero when the server does.
    """
    directory = os.path.join(store_dir, ".hmacfs", "metrics")
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory, mode=0o700)
    return directory


def prepare_store(
    config: Config,
    *,
    secret: bytes | None = None,
    origin: str = "the caller",
    cli_secret: str | None = None,
    environ: Mapping[str, str] | None = None,
    run_as: tuple[int, int] | None = None,
    shared_metrics: bool = False,
) -> Prepared:
    """
    Make StoreDir (and its parents) and find the secret: C{secret} as given (from
    C{origin}), else as L{hmacd.secret.resolve_secret} finds it from C{cli_secret},
    C{environ} and the config, generating the kept one if need be.  The previous secrets
    are C{HMACFS_PREVIOUS_SECRETS} in C{environ}, else the config's, and the returned
    config holds them.

    With C{shared_metrics}, the (emptied) metrics directory of Workers.  With C{run_as}
    (uid, gid: twistd's --uid/--gid), the claims file and LogFile are created too, what was
    created is given to that user, and files it must write but cannot are refused.

    @raise PrepareError: with one line naming the key and the path.
    """
    config = dataclasses.replace(config, store_dir=os.path.abspath(config.store_dir))
    where = config.source or "defaults"
    store = config.store_dir
    created: list[str] = []
    state = os.path.join(store, ".hmacfs")
    hadState = os.path.isdir(state)
    try:
        if not os.path.isdir(store):
            os.makedirs(store)
            created.append(store)
    except OSError as e:
        raise PrepareError(f"{where}: StoreDir: cannot create {store}: {e.strerror}") from None
    if secret is None:
        try:
            secret, origin = resolve_secret(store, config.secret, cli_secret, environ)
        except SecretError as e:
            raise PrepareError(str(e)) from None
        if not hadState and os.path.isdir(state):
            created += [state, secret_file(store)]
    try:
        previous, _ = resolve_previous_secrets(config.previous_secrets, environ)
    except SecretError as e:
        raise PrepareError(str(e)) from None
    # In the config from here on, so that Workers get them with it, on their pipe.
    config = dataclasses.replace(config, previous_secrets=previous)
    metricsDir = None
    if shared_metrics:
        # Made here so that it is handed to --uid with the rest: workers run as that user
        # and write their metrics into it.
        try:
            metricsDir = metrics_directory(store)
        except OSError as e:
            raise PrepareError(f"{where}: StoreDir: cannot create metrics: {e.strerror}") from None
        created.append(metricsDir)
    if run_as is not None:
        if config.log_file:
            created += _makeLogFile(where, config.log_file)
        if config.audit_log:
            # Like LogFile: made now and handed over, so that the server, after --uid,
            # may reopen it (SIGHUP) and the admin commands append to the same file.
            created += _makeAuditLog(where, config.audit_log)
        created += _makeClaimsFile(where, store)
        _handOver(where, created, store, run_as)
    return Prepared(config, secret, origin, metricsDir, tuple(created))


def _makeLogFile(where: str, logFile: str) -> list[str]:
    """Create LogFile now, so that --uid gets it with the rest."""
    existed = os.path.exists(logFile)
    try:
        with open(logFile, "a"):
            pass
    except OSError as e:
        raise PrepareError(f"{where}: LogFile: cannot open {logFile}: {e.strerror}") from None
    return [] if existed else [logFile]


def _makeAuditLog(where: str, auditLog: str) -> list[str]:
    """Create AuditLog now (mode 0640), so that --uid gets it with the rest."""
    existed = os.path.exists(auditLog)
    try:
        os.close(os.open(auditLog, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
    except OSError as e:
        raise PrepareError(f"{where}: AuditLog: cannot open {auditLog}: {e.strerror}") from None
    return [] if existed else [auditLog]


def _makeClaimsFile(where: str, storeDir: str) -> list[str]:
    """Create the claims file of uploads in progress now, so that --uid gets it with the rest."""
    path = claims_file(storeDir)
    if os.path.exists(path):
        return []
    made = []
    try:
        if not os.path.isdir(os.path.dirname(path)):
            os.mkdir(os.path.dirname(path), 0o700)
            made.append(os.path.dirname(path))
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
    except OSError as e:
        raise PrepareError(f"{where}: StoreDir: cannot create {path}: {e.strerror}") from None
    return [*made, path]


def _handOver(where: str, created: list[str], storeDir: str, runAs: tuple[int, int]) -> None:
    uid, gid = runAs
    if os.geteuid() == 0:
        for path in created:
            os.chown(path, uid, gid)
    state = os.path.join(storeDir, ".hmacfs")
    # The files every upload writes, too: left by an earlier run as another user (root
    # without --uid), they would fail each upload with a 500 instead of start-up once.
    for path in (storeDir, state, claims_file(storeDir), os.path.join(state, "meta.sqlite3")):
        if os.path.exists(path) and not _writableBy(path, uid, gid):
            raise PrepareError(f"{where}: StoreDir: {path} is not writable by uid {uid} (--uid)")


def _writableBy(path: str, uid: int, gid: int) -> bool:
    st = os.stat(path)
    if uid == 0 or (st.st_uid == uid and st.st_mode & 0o200):
        return True
    try:
        groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        groups = [gid]
    return bool(st.st_gid in groups and st.st_mode & 0o020) or bool(st.st_mode & 0o002)
