"""
C{hmacfs admin quota ...}: the quota figures (L{hmacd.quota}) in the configured metadata
store, shown, reset for one uploader, or rebuilt from the records.

    hmacfs admin quota show --config FILE [--uploader JID] [--json]
    hmacfs admin quota reset --config FILE --uploader JID
    hmacfs admin quota rebuild --config FILE

A store that cannot be reached is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from hmacd.config import Config, ConfigError, load_config
from hmacd.quota import Limits, Usage, describe_limit

__all__ = ["register"]

_Action = Callable[[Any, Config, argparse.Namespace, float], Awaitable[list[str]]]


def register(admin: Any) -> None:
    """Add C{quota show|reset|rebuild} to the C{hmacfs admin} subcommands C{admin}."""
    quota = admin.add_parser("quota", help="quota figures: show, reset, rebuild")
    commands = quota.add_subparsers(dest="quota_command", required=True)

    show = commands.add_parser("show", help="what each uploader (or one) uses, and the limits")
    show.add_argument("--uploader", help="one uploader's figures (JID, or ejabberd's hash)")
    show.add_argument("--json", action="store_true", help="one JSON object a line")
    reset = commands.add_parser(
        "reset", help="forget an uploader's last 24 h, and count its stored bytes again"
    )
    reset.add_argument("--uploader", required=True, help="the uploader (JID)")
    rebuild = commands.add_parser("rebuild", help="every figure again, from the records")
    for parser, action in ((show, _show), (reset, _reset), (rebuild, _rebuild)):
        parser.add_argument("--config", required=True, help="the server's TOML config")
        parser.set_defaults(run=_runner(parser.prog, action))


def _runner(prog: str, action: _Action) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            config = load_config(args.config)
        except ConfigError as e:
            print(f"{prog}: {e}", file=sys.stderr)
            return 1
        return _react(prog, config, args, action)

    return run


def _react(prog: str, config: Config, args: argparse.Namespace, action: _Action) -> int:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    result: list[int] = []

    def go(reactor: Any) -> Deferred[None]:
        return Deferred.fromCoroutine(_withStore(reactor, prog, config, args, action, result))

    try:
        react(go)
    except SystemExit as e:
        if e.code not in (0, None):
            return 1
    return result[0] if result else 1


async def _withStore(
    reactor: Any,
    prog: str,
    config: Config,
    args: argparse.Namespace,
    action: _Action,
    result: list[int],
) -> None:
    from hmacd.services import build_metadata, start_for_command
    from hmacd.store import StoreUnavailable

    store = build_metadata(config, reactor)
    try:
        why = await start_for_command(store)
        if why is not None:
            print(f"{prog}: no metadata store is reachable: {why}", file=sys.stderr)
            result.append(1)
            return
        try:
            lines = await action(store, config, args, reactor.seconds())
        except (StoreUnavailable, TimeoutError) as e:
            print(f"{prog}: the metadata store stopped answering: {e}", file=sys.stderr)
            result.append(1)
            return
        for line in lines:
            print(line)
        result.append(0)
    finally:
        await store.stop()


async def _show(store: Any, config: Config, args: argparse.Namespace, now: float) -> list[str]:
    limits = Limits.from_config(config)
    total: Usage = await store.quota_usage(None, now)
    rows: list[tuple[str, int, int, int | None]]
    if args.uploader is not None:
        usage: Usage = await store.quota_usage(args.uploader, now)
        rows = [(args.uploader, usage.stored, usage.daily, usage.held)]
    else:
        rows = [(u, s, d, None) for u, s, d in await store.quota_uploaders(now)]
    if args.json:
        lines = [
            json.dumps(
                {"uploader": u, "stored": s, "daily": d} | ({} if held is None else {"held": held}),
                ensure_ascii=False,
            )
            for u, s, d, held in rows
        ]
        lines.append(
            json.dumps(
                {
                    "total": total.total,
                    "held": total.held_total,
                    "limits": {
                        "UserQuota": limits.user,
                        "UserDailyQuota": limits.daily,
                        "GlobalQuota": limits.total,
                    },
                }
            )
        )
        return lines
    lines = [
        f"{store.name}: {total.total} bytes stored in all"
        f" ({describe_limit('GlobalQuota', limits)}), {total.held_total} held by uploads"
        " in progress",
        f"per uploader: UserQuota {describe_limit('UserQuota', limits)},"
        f" UserDailyQuota {describe_limit('UserDailyQuota', limits)}",
    ]
    if not limits:
        lines.append(
            "no quota is set in this config: the stores keep the figures only while one is"
        )
    width = max([len("uploader")] + [len(u) for u, *_ in rows])
    lines.append(f"{'uploader':<{width}}  {'stored':>15}  {'last 24 h':>15}")
    lines += [f"{u:<{width}}  {s:>15}  {d:>15}" for u, s, d, _ in rows]
    return lines


async def _reset(store: Any, config: Config, args: argparse.Namespace, now: float) -> list[str]:
    await store.quota_reset(args.uploader, now)
    usage: Usage = await store.quota_usage(args.uploader, now)
    return [
        f"{store.name}: {args.uploader}: the last 24 h forgotten;"
        f" {usage.stored} bytes stored, counted from the records"
    ]


async def _rebuild(store: Any, config: Config, args: argparse.Namespace, now: float) -> list[str]:
    await store.quota_rebuild(now)
    total: Usage = await store.quota_usage(None, now)
    uploaders = await store.quota_uploaders(now)
    return [
        f"{store.name}: figures rebuilt from the records: {total.total} bytes stored in all,"
        f" {len(uploaders)} uploaders"
    ]
