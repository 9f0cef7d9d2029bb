"""Boot a lab Linux guest attached to a served device and run a script in it.

Needs the QEMU lab (``mdevd lab setup``, root): the guest is Debian's
kernel in QEMU 11.1 with a busybox userland (lspci, setpci, devmem).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from mdevcore.sysfs.mdev_view import qemu_device_arg
from mdevcore.testing.served import serve
from mdevcore.vfio_user.backend import DeviceBackend

if TYPE_CHECKING:
    from mdevcore.tools.lab.lab import GuestResult


def boot_guest(
    device: DeviceBackend | None,
    script: str,
    *,
    socket: str | Path | None = None,
    timeout: float = 240.0,
    **boot_args: Any,
) -> GuestResult:
    """Run ``script`` in a guest that sees ``device`` (or the device already
    served at ``socket``, e.g. by ``mdevd serve``); returns the lab's
    GuestResult (``rc``, ``output``, ``console``)."""
    from mdevcore.tools.lab.lab import Lab

    lab = Lab.ensure()
    if device is None:
        if socket is None:
            raise ValueError("give a device to serve or the socket of a served one")
        return lab.boot(script, devices=[qemu_device_arg(socket)], timeout=timeout, **boot_args)
    with serve(device) as served:
        return lab.boot(
            script, devices=[qemu_device_arg(served.path)], timeout=timeout, **boot_args
        )
