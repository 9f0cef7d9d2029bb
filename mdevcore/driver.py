"""What a parent driver gives the mdev core (the mdev_parent/mdev_driver analogue).

A parent registers with the core under a parent name (e.g. "mtty") and a
sysfs location (e.g. "devices/virtual/mtty/mtty"); its driver lists the
supported types.  Type ids shown in sysfs are "<driver.name>-<spec.name>".
The core calls ``probe`` on create and ``remove`` on remove; errors are
``OSError(errno)`` and reach the writer of ``create``/``remove`` unchanged.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

from mdevcore.vfio_user.backend import DeviceBackend


@dataclasses.dataclass(frozen=True, slots=True)
class MdevTypeSpec:
    name: str  # the sysfs_name part, e.g. "2" -> type id "mtty-2"
    pretty_name: str  # shown in the type's "name" attribute
    device_api: str = "vfio-pci"
    description: str | None = None  # None: no "description" attribute


class MdevDriver(Protocol):
    name: str  # driver string, prefix of type ids
    types: Sequence[MdevTypeSpec]

    def available_instances(self, type_name: str) -> int:
        """How many more devices of this type can be created now."""
        ...

    def probe(self, uuid: uuid.UUID, type_name: str) -> DeviceBackend:
        """Create the device (reserve resources); raise OSError(ENOSPC) when full."""
        ...

    def remove(self, uuid: uuid.UUID, device: DeviceBackend) -> None:
        """Release what probe reserved; raise OSError(EBUSY) to refuse."""
        ...

    def device_attributes(self, uuid: uuid.UUID, device: DeviceBackend) -> Mapping[str, str]:
        """Extra read-only per-device attributes, path relative to the device dir.

        e.g. {"vendor/sample_mdev_dev": "This is MDEV <uuid>\\n"}.
        """
        ...
