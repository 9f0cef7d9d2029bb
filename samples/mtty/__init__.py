"""The mtty sample: a PCI card with one or two serial ports looping back.

``uart.py`` is one port (16550A registers, mtty.c's behaviour), ``device.py``
the PCI card (MttyDevice) and the parent driver (MttyDriver) the daemon
registers as PARENT_NAME at SYSFS_PATH.
"""

from .device import MAX_PORTS, PARENT_NAME, SYSFS_PATH, MttyDevice, MttyDriver
from .uart import Uart16550

__all__ = ["MAX_PORTS", "PARENT_NAME", "SYSFS_PATH", "MttyDevice", "MttyDriver", "Uart16550"]
