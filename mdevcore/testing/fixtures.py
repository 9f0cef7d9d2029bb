"""pytest fixtures for parent authors (loaded as the ``mdevcore`` pytest plug-in)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from mdevcore.testing.served import ServedDevice, serve
from mdevcore.vfio_user.backend import DeviceBackend


@pytest.fixture
def mdev_serve() -> Iterator[Callable[[DeviceBackend], ServedDevice]]:
    """``mdev_serve(device)`` serves it for the rest of the test (and stops it after)."""
    with ExitStack() as stack:

        def start(device: DeviceBackend) -> ServedDevice:
            return stack.enter_context(serve(device))

        yield start
