import sys
from pathlib import Path

import pytest

from mdevcore.tools.lab import Lab

# The daemon runner (tests/daemon/mdevd_proc.py) and its test parent (tests/core).
_TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_TESTS / "daemon"))
sys.path.insert(0, str(_TESTS / "core"))


@pytest.fixture(scope="session")
def lab() -> Lab:
    return Lab.ensure()
