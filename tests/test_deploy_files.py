"""
The deployment files in etc/: the systemd unit, the logrotate file and the Grafana dashboard,
each checked against the running server they are for.

C{systemd-analyze verify} and C{logrotate} run where they are installed (the tests that need
them skip without, and fail under HMACFS_REQUIRE_SERVICES=1); the unit is also parsed here and
its C{ExecStart} and C{ExecReload} run for real against C{twistd hmacfs}, so that the tests
check something real everywhere.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import urllib.request

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacd.config import Config
from tests.test_tap import DEADLINE, REPO, TWISTD, TwistdHarness, _free_port, _http, _read

ETC = os.path.join(REPO, "etc")
UNIT = os.path.join(ETC, "hmacfs.service")
LOGROTATE = os.path.join(ETC, "logrotate.d", "hmacfs")
DASHBOARD = os.path.join(ETC, "grafana-dashboard.json")

# Where the shipped files expect things (the unit's comments say so).
INSTALLED_TWISTD = "/opt/hmacfs/venv/bin/twistd"
INSTALLED_CONFIG = "/etc/hmacfs/config.toml"
INSTALLED_LOG = "/var/log/hmacfs/hmacfs.log"


def _tool(name: str) -> str:
    """The path of a system tool, or a skip (a failure where every service is required)."""
    path = shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
    if path is None:
        reason = f"{name} is not installed"
        if os.environ.get("HMACFS_REQUIRE_SERVICES") == "1":
            raise AssertionError(reason + " (HMACFS_REQUIRE_SERVICES=1)")
        raise SkipTest(reason)
    return path


def read_unit(path: str = UNIT) -> configparser.ConfigParser:
    """The unit as sections of keys (systemd's syntax is ini-like; keys keep their case)."""
    parser = configparser.ConfigParser(interpolation=None, strict=True, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    with open(path, encoding="utf-8") as f:
        parser.read_file(f)
    return parser


def unit_for_here(directory: str) -> str:
    """A copy of the unit, as hmacfs.service in C{directory}, whose ExecStart is our twistd."""
    with open(UNIT, encoding="utf-8") as f:
        text = f.read()
    path = os.path.join(directory, "hmacfs.service")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace(INSTALLED_TWISTD, TWISTD))
    return path


class UnitFileTests(SynchronousTestCase):
    """etc/hmacfs.service: what a unit for hmacfs must say."""

    def test_required_keys(self) -> None:
        """twistd -n hmacfs on /etc/hmacfs/config.toml, as a dedicated user, SIGHUP to reload."""
        unit = read_unit()
        self.assertEqual(unit.sections(), ["Unit", "Service", "Install"])
        service = unit["Service"]
        argv = shlex.split(service["ExecStart"])
        self.assertEqual(argv[0], INSTALLED_TWISTD)
        self.assertIn("-n", argv[: argv.index("hmacfs")])
        self.assertEqual(argv[argv.index("hmacfs") :], ["hmacfs", "--config", INSTALLED_CONFIG])
        self.assertNotIn(service["User"], ("", "root", "0"))
        self.assertEqual(service["Group"], service["User"])
        self.assertEqual(shlex.split(service["ExecReload"]), ["/bin/kill", "-HUP", "$MAINPID"])
        self.assertEqual(unit["Install"]["WantedBy"], "multi-user.target")
        self.assertTrue(unit["Unit"]["Description"])

    def test_hardening(self) -> None:
        """Read-only system but for StoreDir and the log directory; no new privileges."""
        service = read_unit()["Service"]
        self.assertEqual(service["ProtectSystem"], "strict")
        self.assertEqual(service["NoNewPrivileges"], "yes")
        self.assertEqual(service["ProtectHome"], "yes")
        self.assertEqual(service["PrivateTmp"], "yes")
        writable = service["ReadWritePaths"].split()
        store = "/var/lib/" + service["StateDirectory"]
        self.assertIn(store, writable)
        self.assertEqual(service["WorkingDirectory"], store)
        self.assertIn(os.path.dirname(INSTALLED_LOG), writable)
        self.assertEqual("/var/log/" + service["LogsDirectory"], os.path.dirname(INSTALLED_LOG))

    def test_stop_waits_for_uploads(self) -> None:
        """systemd waits longer than ShutdownGrace before it kills."""
        service = read_unit()["Service"]
        self.assertGreater(int(service["TimeoutStopSec"]), Config().shutdown_grace)

    def test_systemd_analyze_verify(self) -> None:
        """systemd-analyze verify accepts the unit, without a warning."""
        tool = _tool("systemd-analyze")
        path = unit_for_here(self._dir())
        result = subprocess.run(
            [tool, "verify", path], capture_output=True, text=True, timeout=60, cwd=self._dir()
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stderr.strip(), "", "systemd-analyze warned")

    def test_systemd_analyze_notices(self) -> None:
        """The verify above can fail: a unit with a bad value draws a warning."""
        tool = _tool("systemd-analyze")
        path = unit_for_here(self._dir())
        with open(path, encoding="utf-8") as f:
            text = f.read()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text.replace("ProtectSystem=strict", "ProtectSystem=sometimes"))
        result = subprocess.run(
            [tool, "verify", path], capture_output=True, text=True, timeout=60, cwd=self._dir()
        )
        self.assertIn("hmacfs.service:", result.stderr)
        self.assertIn("sometimes", result.stderr)

    def _dir(self) -> str:
        if not hasattr(self, "_tmp"):
            self._tmp = os.path.abspath(self.mktemp())
            os.makedirs(self._tmp)
        return self._tmp


class LogrotateSyntaxTests(SynchronousTestCase):
    """etc/logrotate.d/hmacfs as logrotate reads it."""

    def test_debug_run_accepts(self) -> None:
        """logrotate -d reads the shipped file without an error."""
        tool = _tool("logrotate")
        state = os.path.abspath(self.mktemp())
        result = subprocess.run(
            [tool, "-d", "-s", state, LOGROTATE], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertNotIn("error", (result.stdout + result.stderr).lower())
        self.assertIn(f"considering log {INSTALLED_LOG}", result.stdout + result.stderr)

    def test_postrotate_reloads_the_unit(self) -> None:
        """The postrotate script is the unit's reload (SIGHUP), nothing else."""
        with open(LOGROTATE, encoding="utf-8") as f:
            text = f.read()
        script = re.search(r"postrotate\n(.*?)\n\s*endscript", text, re.S)
        assert script is not None
        self.assertEqual(
            script.group(1).split(">")[0].split(), ["systemctl", "reload", "hmacfs.service"]
        )


class RunningServerTests(TwistdHarness):
    """The unit's command line, its reload and the logrotate file against a real twistd."""

    def startAsUnit(self, **keys: str | int | bool) -> tuple[subprocess.Popen, int]:
        """The unit's ExecStart, with our twistd and a config of ours; it listens."""
        port = _free_port()
        cfg = self.config(port, **keys)  # type: ignore[arg-type]
        argv = shlex.split(read_unit()["Service"]["ExecStart"])
        argv = [cfg if a == INSTALLED_CONFIG else a for a in argv[1:]]
        proc = self.spawn(*argv)
        self.waitListening(port, proc)
        return proc, port

    def reload(self, proc: subprocess.Popen) -> list[str]:
        """The unit's ExecReload, with $MAINPID as systemd fills it in."""
        argv = shlex.split(read_unit()["Service"]["ExecReload"])
        return [str(proc.pid) if a == "$MAINPID" else a for a in argv]

    def waitFor(self, path: str, text: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while not (os.path.exists(path) and text in _read(path)):
            if time.monotonic() > deadline:
                self.fail(f"{text!r} not in {path} after {DEADLINE}s")
            time.sleep(0.05)

    def test_exec_start_serves_and_writes_no_pid_file(self) -> None:
        """ExecStart as written serves uploads, and leaves no pid file in its directory."""
        proc, port = self.startAsUnit()
        self.putAndGet(port, self.secret())
        self.assertFalse(os.path.exists(os.path.join(self.cwd, "twistd.pid")))
        self.terminate(proc)

    def test_logrotate_with_reload(self) -> None:
        """
        A real rotation with the shipped logrotate file (its path ours, its reload the unit's
        ExecReload): the lines before it are in the rotated file, the lines after it in the new
        one, and the server keeps serving.
        """
        tool = _tool("logrotate")
        log = os.path.join(self.cwd, "hmacfs.log")
        proc, port = self.startAsUnit(LogFile=log)
        self.putAndGet(port, self.secret(), "before.txt")
        self.waitFor(log, "/upload/tapdir/before.txt")

        with open(LOGROTATE, encoding="utf-8") as f:
            text = f.read()
        self.assertIn(INSTALLED_LOG, text)
        self.assertIn("systemctl reload hmacfs.service", text)
        text = text.replace(INSTALLED_LOG, log).replace(
            "systemctl reload hmacfs.service", shlex.join(self.reload(proc))
        )
        conf = os.path.join(self.cwd, "logrotate.conf")
        with open(conf, "w", encoding="utf-8") as f:
            f.write(text)
        state = os.path.join(self.cwd, "logrotate.state")
        result = subprocess.run(
            [tool, "-f", "-s", state, conf], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

        # The SIGHUP is handled on the reactor: a request after it logs to the new file.
        self.waitFor(log, "")  # reopened: the name exists again
        self.putAndGet(port, self.secret(), "after.txt")
        self.waitFor(log, "/upload/tapdir/after.txt")
        rotated = _read(log + ".1")
        self.assertIn("/upload/tapdir/before.txt", rotated)
        self.assertNotIn("/upload/tapdir/after.txt", rotated)
        self.assertNotIn("/upload/tapdir/before.txt", _read(log))
        self.assertIsNone(proc.poll(), "SIGHUP stopped the server")
        self.terminate(proc)
        self.assertNotIn("Traceback", _read(log) + rotated + _read(self.output))

    def test_dashboard_names_only_exported_metrics(self) -> None:
        """Every PromQL expression of the dashboard names metrics a real /metrics exports."""
        metricsPort = _free_port()
        proc, port = self.startAsUnit(MetricsEnabled=True, MetricsPort=f"127.0.0.1:{metricsPort}")
        status, _ = _http(port, "GET", "/upload/nothing/here.txt")
        self.assertEqual(status, 404)
        with urllib.request.urlopen(
            f"http://127.0.0.1:{metricsPort}/metrics", timeout=DEADLINE
        ) as response:
            exported = exported_names(response.read().decode("utf-8"))
        self.terminate(proc)
        expressions = dashboard_expressions()
        self.assertGreaterEqual(len(expressions), 20)
        named: set[str] = set()
        for expression in expressions:
            metrics = metric_names(expression)
            self.assertTrue(metrics, expression)
            self.assertEqual(metrics - exported, set(), expression)
            named |= metrics
        # What the dashboard is for: each of these has a graph.
        for wanted in (
            "uploads_total",
            "upload_errors_total",
            "upload_bytes_total",
            "upload_duration_seconds_bucket",
            "store_up",
            "store_failovers_total",
            "previous_secret_uses_total",
            "process_resident_memory_bytes",
            "process_cpu_percent",
        ):
            self.assertIn("hmac_file_server_" + wanted, named)
        self.assertTrue(any('reason="quota"' in e for e in expressions))


# --- reading PromQL and the exposition format ------------------------------------------------

_SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum")}


def exported_names(exposition: str) -> set[str]:
    """The series names a scrape can have: each TYPE's name, with a histogram's suffixes."""
    names = set()
    for kind_line in re.finditer(r"^# TYPE (\S+) (\S+)$", exposition, re.M):
        name, kind = kind_line.groups()
        names.add(name)
        names.update(name + suffix for suffix in _SUFFIXES.get(kind, ()))
    names.update(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", exposition, re.M))
    return names


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
_PROMQL_WORDS |= {"and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expression: str) -> set[str]:
    """
    The metric names in a PromQL expression: what is left of its identifiers once label
    matchers, ranges, grouping clauses, function names, numbers and keywords are taken out.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)  # strings (label values)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges
    text = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", text)  # grouping
    text = re.sub(r"[a-zA-Z_][a-zA-Z0-9_]*\s*\(", "(", text)  # function calls
    text = re.sub(r"\b[0-9][0-9.]*[a-zA-Z]*\b", " ", text)  # numbers and durations (1h)
    words = re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text)
    return {w for w in words if w.lower() not in _PROMQL_WORDS}


def dashboard_expressions() -> list[str]:
    """Every query of the dashboard: its panels' targets and its variables."""
    with open(DASHBOARD, encoding="utf-8") as f:
        dashboard = json.load(f)
    found = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert match is not None, query
            found.append(match.group(1))
    return found


class PromQLReadingTests(SynchronousTestCase):
    """The reading of PromQL above, which the dashboard test relies on."""

    def test_metric_names(self) -> None:
        """Functions, matchers, ranges, grouping and numbers are no metric names."""
        self.assertEqual(
            metric_names(
                'histogram_quantile(0.9, sum(rate(a_bucket{job=~"x", le!="y"}[5m])) by (le))'
                " / sum(b_total offset 1h) * 100 + on(instance) c"
            ),
            {"a_bucket", "b_total", "c"},
        )

    def test_dashboard_is_checked(self) -> None:
        """A dashboard naming a metric the server lacks would be caught."""
        exported = exported_names(
            "# TYPE hmac_file_server_uploads_total counter\n"
            "hmac_file_server_uploads_total 1.0\n"
            "# TYPE hmac_file_server_upload_duration_seconds histogram\n"
        )
        self.assertIn("hmac_file_server_upload_duration_seconds_bucket", exported)
        missing = {m for e in dashboard_expressions() for m in metric_names(e) if m not in exported}
        self.assertIn("hmac_file_server_store_up", missing)

    def test_dashboard_panels(self) -> None:
        """Panels have distinct ids and places, and every target a refId and a data source."""
        with open(DASHBOARD, encoding="utf-8") as f:
            dashboard = json.load(f)
        panels = dashboard["panels"]
        self.assertEqual(len({p["id"] for p in panels}), len(panels))
        places = {(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels}
        self.assertEqual(len(places), len(panels))
        for panel in panels:
            for target in panel["targets"]:
                self.assertTrue(target["refId"])
                self.assertEqual(target["datasource"]["uid"], "${datasource}")
