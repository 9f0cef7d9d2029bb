"""Fixtures for tests that boot guests.  Other test folders can copy these."""

from __future__ import annotations

import pytest

from mdevcore.tools.lab import Lab


@pytest.fixture(scope="session")
def lab() -> Lab:
    """The machine's lab, set up on first use (about a minute, once)."""
    return Lab.ensure()
