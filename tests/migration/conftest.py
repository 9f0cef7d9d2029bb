"""Shared by the migration tests: paths to the helpers, and two daemons."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The daemon runner (tests/daemon/mdevd_proc.py) and its test parent (tests/core).
_TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_TESTS / "daemon"))
sys.path.insert(0, str(_TESTS / "core"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


from mig_served import MttyDaemon, short_dir  # noqa: E402  (after the path setup)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[MttyDaemon, MttyDaemon]]:
    with short_dir() as base:
        (base / "a").mkdir()
        (base / "b").mkdir()
        a = MttyDaemon(base / "a")
        try:
            b = MttyDaemon(base / "b")
            try:
                yield a, b
            finally:
                b.stop()
        finally:
            a.stop()
