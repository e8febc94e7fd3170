"""Fixtures and settings shared by the whole test suite.

Keep this file small: a fixture used by one directory belongs in that
directory's own conftest.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
from hypothesis import settings

# CI runs are reproducible: Hypothesis derives its examples from each test
# instead of a random seed, keeps no example database and does not time
# examples (shared machines are slow). Locally, the default profile explores.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# 2026-01-01T00:00:00Z: a realistic wall-clock value in ms, as in envelope ``ts_ms``.
START_MS = 1_767_225_600_000


@dataclass
class FakeClock:
    """A clock that moves only when a test moves it. Integer milliseconds.

    Sans-I/O code takes the time as an argument: pass ``clock.now_ms``, or the
    clock itself where a ``Callable[[], int]`` is expected.
    """

    now_ms: int = START_MS

    def __call__(self) -> int:
        return self.now_ms

    def advance(self, ms: int) -> int:
        """Move forward by ``ms`` and return the new time."""
        if ms < 0:
            raise ValueError(f"advance() goes forward only, got {ms} ms; use set() to jump back")
        self.now_ms += ms
        return self.now_ms

    def set(self, ms: int) -> None:
        """Jump to ``ms``, backwards allowed (to test clock skew and stale messages)."""
        self.now_ms = ms


@pytest.fixture
def fixed_clock() -> FakeClock:
    """A fresh :class:`FakeClock` at :data:`START_MS` for each test."""
    return FakeClock()
