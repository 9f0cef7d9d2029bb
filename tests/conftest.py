"""Fixtures shared by every test directory."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A short private directory (replaces pytest's deep one).

    UNIX socket paths are limited to 108 bytes, and pytest's own tmp_path
    (/tmp/pytest-of-root/pytest-NNN/<test name>/...) plus a run dir and a
    UUID socket name goes past that once NNN has three digits.
    """
    path = Path(tempfile.mkdtemp(prefix="mdt-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
