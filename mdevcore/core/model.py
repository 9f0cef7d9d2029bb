"""Parents, types and devices, with the kernel's create/remove semantics."""

from __future__ import annotations

import dataclasses
import errno
import logging
import posixpath
import threading
import uuid
from collections.abc import Callable, Mapping

from mdevcore.core.events import DeviceAdded, DeviceRemoved, MdevEvent, ParentAdded, ParentRemoved
from mdevcore.driver import MdevDriver, MdevTypeSpec, check_driver
from mdevcore.observers import Observers
from mdevcore.vfio_user.backend import DeviceBackend

log = logging.getLogger(__name__)

Observer = Callable[[MdevEvent], None]
CreateCheck = Callable[["MdevType", uuid.UUID], None]


@dataclasses.dataclass(eq=False)
class MdevType:
    """One supported type of a parent; ``id`` is "<driver.name>-<spec.name>"."""

    parent: Parent
    spec: MdevTypeSpec

    @property
    def id(self) -> str:
        return f"{self.parent.driver.name}-{self.spec.name}"

    @property
    def pretty_name(self) -> str:
        return self.spec.pretty_name or self.spec.name


@dataclasses.dataclass(eq=False)
class Parent:
    """A registered parent device (the mdev_parent analogue).

    ``location`` is its directory relative to the sysfs root, e.g.
    "devices/virtual/mtty/mtty"; its last component is ``name``.
    """

    name: str
    location: str
    driver: MdevDriver
    types: dict[str, MdevType] = dataclasses.field(default_factory=dict)
    registered: bool = True


@dataclasses.dataclass(eq=False)
class MdevDevice:
    uuid: uuid.UUID
    type: MdevType
    backend: DeviceBackend
    # The device name as sysfs shows it: the lower-case UUID (formatted once:
    # every view and the server manager ask for it).
    name: str = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.name = str(self.uuid)

    @property
    def parent(self) -> Parent:
        return self.type.parent


def _check_location(name: str, location: str) -> str:
    clean = location.strip("/")
    parts = clean.split("/")
    if not name or "/" in name or name in (".", ".."):
        raise OSError(errno.EINVAL, f"bad parent name {name!r}")
    if any(p in ("", ".", "..") for p in parts) or parts[-1] != name:
        raise OSError(errno.EINVAL, f"parent location {location!r} must end in {name!r}")
    if posixpath.normpath(clean) != clean:
        raise OSError(errno.EINVAL, f"parent location {location!r} is not normalised")
    return clean


class MdevCore:
    """The model all views follow.

    Every mutation runs under one lock and emits its events under it, so
    ``available_instances``, the device list and any observer-built view
    agree at every moment, also when several threads create at once.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._parents: dict[str, Parent] = {}
        self._devices: dict[uuid.UUID, MdevDevice] = {}
        self._observers: Observers[MdevEvent] = Observers()
        self._create_checks: list[CreateCheck] = []

    # --- observation ------------------------------------------------------

    def subscribe(self, observer: Observer, *, replay: bool = False) -> None:
        """Call ``observer`` for every later event.

        With ``replay`` it first receives ParentAdded/DeviceAdded for what
        already exists, atomically with the subscription.
        """
        with self._lock:
            existing: list[MdevEvent] = []
            if replay:
                existing += [ParentAdded(p) for p in self._parents.values()]
                existing += [DeviceAdded(d) for d in self._devices.values()]
            self._observers.subscribe(observer, existing)

    def unsubscribe(self, observer: Observer) -> None:
        with self._lock:
            self._observers.unsubscribe(observer)

    def add_create_check(self, check: CreateCheck) -> None:
        """Run ``check(type, uuid)`` before each probe; its OSError fails the create.

        For views that cannot follow a new device (e.g. no room for its
        socket): refusing up front keeps the model and the views in step.
        """
        with self._lock:
            self._create_checks.append(check)

    def remove_create_check(self, check: CreateCheck) -> None:
        with self._lock:
            self._create_checks.remove(check)

    def _emit(self, event: MdevEvent) -> None:
        self._observers.emit(event)  # under self._lock (mdevcore.observers)

    # --- queries ----------------------------------------------------------

    @property
    def parents(self) -> Mapping[str, Parent]:
        with self._lock:
            return dict(self._parents)

    @property
    def devices(self) -> Mapping[uuid.UUID, MdevDevice]:
        with self._lock:
            return dict(self._devices)

    def device(self, dev_uuid: uuid.UUID) -> MdevDevice:
        with self._lock:
            try:
                return self._devices[dev_uuid]
            except KeyError:
                raise OSError(errno.ENODEV, f"no mdev {dev_uuid}") from None

    def parent(self, name: str) -> Parent:
        with self._lock:
            parent = self._parents.get(name)
            if parent is None or not parent.registered:
                raise OSError(errno.ENODEV, f"no parent {name!r}")
            return parent

    def mdev_type(self, parent_name: str, type_id: str) -> MdevType:
        parent = self.parent(parent_name)
        try:
            return parent.types[type_id]
        except KeyError:
            raise OSError(errno.ENODEV, f"parent {parent_name!r} has no type {type_id!r}") from None

    def available_instances(self, parent_name: str, type_id: str) -> int:
        with self._lock:
            mtype = self.mdev_type(parent_name, type_id)
            return mtype.parent.driver.available_instances(mtype.spec.name)

    # --- parents ----------------------------------------------------------

    def register_parent(self, name: str, location: str, driver: MdevDriver) -> Parent:
        """mdev_register_parent: make ``driver``'s types creatable under ``name``."""
        clean = _check_location(name, location)
        check_driver(driver)
        with self._lock:
            if name in self._parents:
                raise OSError(errno.EEXIST, f"parent {name!r} already registered")
            parent = Parent(name=name, location=clean, driver=driver)
            for spec in driver.types:
                mtype = MdevType(parent=parent, spec=spec)
                if mtype.id in parent.types:
                    raise OSError(errno.EEXIST, f"parent {name!r}: duplicate type {mtype.id}")
                parent.types[mtype.id] = mtype
            self._parents[name] = parent
            log.info("parent %s registered at %s with types %s", name, clean, list(parent.types))
            self._emit(ParentAdded(parent))
            return parent

    def unregister_parent(self, name: str) -> None:
        """mdev_unregister_parent: remove every device of the parent, then it.

        Devices are removed even if their driver refuses (as the kernel
        does when a parent goes away); refusals are logged.
        """
        with self._lock:
            parent = self.parent(name)
            parent.registered = False
            for device in [d for d in self._devices.values() if d.parent is parent]:
                try:
                    parent.driver.remove(device.uuid, device.backend)
                except Exception:
                    log.exception("mdev %s: driver remove failed during unregister", device.uuid)
                _close(device)
                del self._devices[device.uuid]
                self._emit(DeviceRemoved(device))
            del self._parents[name]
            log.info("parent %s unregistered", name)
            self._emit(ParentRemoved(parent))

    # --- devices ----------------------------------------------------------

    def create(self, parent_name: str, type_id: str, dev_uuid: uuid.UUID) -> MdevDevice:
        """mdev_device_create: probe a new device of ``type_id``.

        ENODEV if the parent (or type) is gone, EEXIST if the UUID is in use
        on any parent, otherwise whatever the driver's probe raises.
        """
        with self._lock:
            mtype = self.mdev_type(parent_name, type_id)
            if dev_uuid in self._devices:
                raise OSError(errno.EEXIST, f"mdev {dev_uuid} already exists")
            for check in self._create_checks:
                check(mtype, dev_uuid)
            driver = mtype.parent.driver
            try:
                backend = driver.probe(dev_uuid, mtype.spec.name)
            except OSError as e:
                log.info("mdev %s (%s): probe refused: %s", dev_uuid, mtype.id, e)
                raise
            except Exception as e:
                log.exception("mdev %s (%s): probe crashed", dev_uuid, mtype.id)
                raise OSError(errno.EIO, f"probe of {mtype.id} failed") from e
            device = MdevDevice(uuid=dev_uuid, type=mtype, backend=backend)
            self._devices[dev_uuid] = device
            log.info("mdev %s created: parent %s type %s", dev_uuid, parent_name, mtype.id)
            self._emit(DeviceAdded(device))
            return device

    def remove(self, dev_uuid: uuid.UUID) -> None:
        """mdev_device_remove: the driver may refuse with EBUSY/EAGAIN."""
        with self._lock:
            device = self.device(dev_uuid)
            try:
                device.parent.driver.remove(dev_uuid, device.backend)
            except OSError as e:
                log.info("mdev %s: remove refused: %s", dev_uuid, e)
                raise
            except Exception as e:
                log.exception("mdev %s: driver remove crashed", dev_uuid)
                raise OSError(errno.EIO, "driver remove failed") from e
            _close(device)
            del self._devices[dev_uuid]
            log.info("mdev %s removed", dev_uuid)
            self._emit(DeviceRemoved(device))


def _close(device: MdevDevice) -> None:
    """Release the removed device's resources (eventfds, memfds, files)."""
    close = getattr(device.backend, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:
        log.exception("mdev %s: closing the removed device failed", device.uuid)
