"""The mdev model: parents, types and devices (the mdev_core.c analogue).

Nothing here knows about FUSE or sockets; the sysfs mirror and the
vfio-user server manager follow the model through :class:`MdevEvent`
observers.
"""

from mdevcore.core.events import (
    DeviceAdded,
    DeviceRemoved,
    MdevEvent,
    ParentAdded,
    ParentRemoved,
)
from mdevcore.core.model import MdevCore, MdevDevice, MdevType, Parent

__all__ = [
    "DeviceAdded",
    "DeviceRemoved",
    "MdevCore",
    "MdevDevice",
    "MdevEvent",
    "MdevType",
    "Parent",
    "ParentAdded",
    "ParentRemoved",
]
