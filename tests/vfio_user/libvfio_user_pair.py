"""Helpers for the libvfio-user transport tests: one device class served twice.

``serve_pair`` serves two instances of the same device class, one by the
native engine and one through libvfio-user, each on its own socket in the
test's trio run; the blocking Client runs in worker threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
import trio

from mdevcore.vfio_user.backend import DeviceBackend
from mdevcore.vfio_user.libvfio_user_ffi import available
from mdevcore.vfio_user.server import DeviceServer

T = TypeVar("T")

MISSING = available()
needs_libvfio_user = pytest.mark.skipif(
    MISSING is not None, reason=f"libvfio-user transport unavailable: {MISSING}"
)


@dataclasses.dataclass
class Served:
    transport: str
    device: Any
    path: str
    server: Any


@contextlib.asynccontextmanager
async def serve_pair(
    make: Callable[[], DeviceBackend], sockdir: str
) -> AsyncIterator[tuple[Served, Served]]:
    """(native, libvfio-user) servers of two fresh devices from ``make``."""
    from mdevcore.vfio_user.libvfio_user import LibvfioUserServer

    pair: list[Served] = []
    async with trio.open_nursery() as nursery:
        for transport in ("native", "libvfio-user"):
            device = make()
            path = os.path.join(sockdir, f"{transport}.sock")
            cls = DeviceServer if transport == "native" else LibvfioUserServer
            server = cls(device, path, name=transport)
            await nursery.start(server.serve)
            pair.append(Served(transport, device, path, server))
        try:
            yield pair[0], pair[1]
        finally:
            nursery.cancel_scope.cancel()
    for served in pair:
        close = getattr(served.device, "close", None)
        if close is not None:
            close()
        assert not os.path.exists(served.path), f"{served.transport} left its socket"


async def in_thread(fn: Callable[[], T]) -> T:
    return await trio.to_thread.run_sync(fn)


def errno_of(fn: Callable[[], Any]) -> Any:
    """fn()'s value, or ("errno", n) when the server answered with an error."""
    try:
        return fn()
    except OSError as e:
        return ("errno", e.errno)
