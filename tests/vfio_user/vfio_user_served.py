"""What the vfio_user tests share besides fixtures (imported by name, not via conftest)."""

from __future__ import annotations

import dataclasses
import os

from vfio_user_fakedev import FakeDevice

from mdevcore.vfio_user.server import DeviceServer


@dataclasses.dataclass
class Served:
    device: FakeDevice
    server: DeviceServer
    path: str


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}
