"""The fuzz targets quieten the project's loggers while they run; put them back after."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

_QUIETED = ("mdevcore",)


@pytest.fixture(autouse=True)
def _restore_log_levels() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in _QUIETED}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
