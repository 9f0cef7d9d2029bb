"""mtty as an mdevd plug-in (entry point ``mtty`` in group ``mdevcore.parents``)."""

from __future__ import annotations

import errno

from mdevcore.plugins import Options, ParentPlugin

from .device import MAX_PORTS, SYSFS_PATH, MttyDriver


def _driver(options: Options) -> MttyDriver:
    text = options.get("ports", str(MAX_PORTS))
    try:
        ports = int(text, 0)
    except ValueError:
        raise OSError(errno.EINVAL, f"mtty.ports={text!r} is not a number") from None
    if not 1 <= ports <= 1024:
        raise OSError(errno.EINVAL, f"mtty.ports={ports}: between 1 and 1024")
    return MttyDriver(ports)


PLUGIN = ParentPlugin(
    name="mtty",
    summary="the kernel's mtty sample: serial cards with 1 or 2 16550A ports",
    options={"ports": f"ports shared by all mtty devices (default {MAX_PORTS})"},
    driver=_driver,
    location=SYSFS_PATH,
)
