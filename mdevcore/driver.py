"""What a parent driver gives the mdev core (the mdev_parent/mdev_driver analogue).

A parent registers with the core under a parent name (e.g. "mtty") and a
sysfs location (e.g. "devices/virtual/mtty/mtty"); its driver lists the
supported types.  Type ids shown in sysfs are "<driver.name>-<spec.name>".
The core calls ``probe`` on create and ``remove`` on remove; errors are
``OSError(errno)`` and reach the writer of ``create``/``remove`` unchanged.
"""

from __future__ import annotations

import dataclasses
import errno
import uuid
from collections.abc import Mapping, Sequence

from mdevcore.vfio_user.backend import DeviceBackend


@dataclasses.dataclass(frozen=True, slots=True)
class MdevTypeSpec:
    name: str  # the sysfs_name part, e.g. "2" -> type id "mtty-2"
    pretty_name: str  # shown in the type's "name" attribute
    device_api: str = "vfio-pci"
    description: str | None = None  # None: no "description" attribute


class MdevDriver:
    """Base class of a parent's driver; override what differs from the defaults.

    Required: ``name`` (the prefix of type ids), ``types`` and ``probe``.
    The core closes a removed device itself (``close()`` on the backend, as
    PciDevice has), so ``remove`` only releases what ``probe`` reserved.
    Errors are OSError(errno); they reach the writer of create/remove.
    """

    name: str = ""  # driver string, prefix of type ids ("mtty" -> "mtty-1")
    types: Sequence[MdevTypeSpec] = ()
    # available_instances when a parent does not count its own resources.
    max_instances: int = 1024

    def available_instances(self, type_name: str) -> int:
        """How many more devices of this type can be created now.

        ``type_name`` is the short name (``MdevTypeSpec.name``, e.g. "2").
        """
        return self.max_instances

    def probe(self, uuid: uuid.UUID, type_name: str) -> DeviceBackend:
        """Create the device of type ``type_name`` (the short name); ENOSPC when full."""
        raise OSError(errno.ENODEV, f"{type(self).__name__} has no probe")

    def remove(self, uuid: uuid.UUID, device: DeviceBackend) -> None:
        """Release what probe reserved; raise OSError(EBUSY) to refuse."""

    def device_attributes(self, uuid: uuid.UUID, device: DeviceBackend) -> Mapping[str, str]:
        """Extra read-only per-device attributes, path relative to the device dir.

        e.g. {"vendor/sample_mdev_dev": "This is MDEV <uuid>\\n"}.
        """
        return {}


def check_driver(driver: object) -> None:
    """Refuse, with a message that says what is missing, a driver the core cannot use."""
    name = getattr(driver, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"parent driver {driver!r} has no name (a non-empty str)")
    types = getattr(driver, "types", None)
    if not types or not all(isinstance(t, MdevTypeSpec) for t in types):
        raise ValueError(f"parent driver {name!r}: types must be a non-empty list of MdevTypeSpec")
    for member in ("available_instances", "probe", "remove", "device_attributes"):
        if not callable(getattr(driver, member, None)):
            raise ValueError(
                f"parent driver {name!r} lacks {member}(); subclass mdevcore.driver.MdevDriver"
            )
