"""
The in-memory store passes the store contract.
"""

from __future__ import annotations

from twisted.internet.defer import succeed
from twisted.trial.unittest import TestCase

from hmacd.store.memory import MemoryStore
from tests.store_contract import AdminContract, QuotaContract, SharedContract, StoreContract


class MemoryStoreContractTests(
    StoreContract, AdminContract, SharedContract, QuotaContract, TestCase
):
    def makeStore(self, fresh=True):
        if fresh:
            self._shared = MemoryStore()
            return succeed(self._shared)
        # A second view of the same records, as a second process would have.
        other = MemoryStore()
        other._records = self._shared._records
        other._shared = self._shared._shared
        other._quota = self._shared._quota
        return succeed(other)
