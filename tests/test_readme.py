"""
README.rst promises two commands; CI must run the second one verbatim.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.join(os.path.dirname(__file__), "..")
RUN = "python3 -m venv .venv && .venv/bin/pip install -q . && .venv/bin/twistd -n hmacfs"
TEST = (
    "python3 -m venv .venv && .venv/bin/pip install -q '.[test]' && "
    ".venv/bin/python -m twisted.trial tests"
)


# A path beside the checkout, as a file would name it; built here so that this file does not
# contain what it looks for.
BESIDE = ("/".join(["..", "shared"]), ", ".join(['".."', '".."', '"shared"']))


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


class ReadmeTests(SynchronousTestCase):
    def test_commands_in_readme(self):
        """README.rst gives the run command and the test command, each on one line."""
        lines = [line.strip() for line in read("README.rst").splitlines()]
        self.assertIn(RUN, lines)
        self.assertIn(TEST, lines)

    def test_ci_runs_readme_test_command(self):
        """.ci/run ends by running exactly the README's test command."""
        lines = [line.strip() for line in read(".ci/run").splitlines() if line.strip()]
        self.assertEqual(lines[-1], TEST)

    def test_ci_runs_from_a_lone_clone(self):
        """.ci/run runs the suite in a fresh clone with nothing beside it."""
        script = read(".ci/run")
        clone = script.index("git clone -q . ")
        self.assertLess(clone, script.index(TEST))
        self.assertIn('cd "$alone/hmacfs"', script)

    def test_nothing_reads_outside_the_checkout(self):
        """No source, test or script names a path beside the checkout (see BESIDE)."""
        offenders = []
        for top in ("hmacd", "tests", "bench", "examples", ".ci", "twisted"):
            for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
                for name in files:
                    if name.endswith((".pyc", ".json")):
                        continue
                    path = os.path.join(dirpath, name)
                    with open(path, encoding="utf-8", errors="replace") as f:
                        text = f.read()
                    if any(needle in text for needle in BESIDE):
                        offenders.append(os.path.relpath(path, ROOT))
        self.assertEqual(offenders, [])
