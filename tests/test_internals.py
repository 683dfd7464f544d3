"""
Guards for hmacd.internals: each private attribute of Twisted or of a driver that hmacfs
reaches is still where hmacd.internals expects it.  A failure here means a new release
moved it: adapt hmacd.internals (and only it), then the pin in setup.py.
"""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from hmacd import internals

# --- HTTP: channels, requests and transports ----------------------------------------------


# --- Stores: twisted.enterprise.adbapi and the database drivers -----------------------------


# --- Composition: listening ports, services, processes -------------------------------------


class MultiprocessValuesGuardTests(TestCase):
    """hmacd.internals.use_multiprocess_values: prometheus_client still picks values this way."""

    def test_metric_reads_value_class_when_created(self) -> None:
        """A metric made after ValueClass is swapped keeps its value in the swapped class."""
        from prometheus_client import CollectorRegistry, Counter, values

        made: list[tuple] = []

        class Recording(values.MutexValue):
            def __init__(self, *args, **kwargs) -> None:
                made.append(args)
                super().__init__(*args, **kwargs)

        self.patch(values, "ValueClass", Recording)
        Counter("guard_total", "guard", registry=CollectorRegistry()).inc()
        self.assertTrue(made, "prometheus_client no longer reads values.ValueClass")

    def test_multiprocess_value_is_a_factory(self) -> None:
        """values.MultiProcessValue() still returns the value class use_multiprocess_values sets."""
        from prometheus_client import values

        self.patch(values, "ValueClass", values.ValueClass)
        internals.use_multiprocess_values()
        self.assertTrue(isinstance(values.ValueClass, type), values.ValueClass)
        self.assertIn("MmapedValue", values.ValueClass.__name__)
