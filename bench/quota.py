"""
What quotas cost a small upload: 4 KiB PUTs (each to its own pre-signed v2 URL, wrk with 64
connections) on the embedded SQLite store, with no quota set and with GlobalQuota and
UserQuota set (every upload then takes a hold in the store before its body, and its record's
put updates the figures).  The same server and client as bench/bench.py.

    .venv/bin/python bench/quota.py [--seconds 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench import Server, small_puts

VARIANTS = {
    "no quota": {},
    "GlobalQuota + UserQuota": {"GlobalQuota": "1TB", "UserQuota": "1TB"},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=6, help="each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="wrk runs per variant")
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="hmacfs-bench-quota-")
    try:
        for name, extra in VARIANTS.items():
            tag = "q" if extra else "n"
            server = Server(workdir, tag, extra)
            server.start()
            try:
                runs = [
                    small_puts(server, workdir, f"{tag}{n}", args.seconds)
                    for n in range(args.rounds)
                ]
            finally:
                server.stop()
            rates = [run["rps"] for run in runs]
            print(
                f"{name:<25} 4 KiB PUTs/s: median {statistics.median(rates):.0f}"
                f" (runs: {', '.join(f'{r:.0f}' for r in rates)}),"
                f" p99 {max(run['p99_ms'] for run in runs)} ms,"
                f" failed {sum(run['failed'] for run in runs)}"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
