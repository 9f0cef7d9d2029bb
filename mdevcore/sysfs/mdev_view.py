"""The mdev layout of the sysfs tree, kept in step with the core (mdev_sysfs.c).

::

    <parent location>/mdev_supported_types/<type>/{create,name,available_instances,
                                                   device_api,description,devices/}
    <parent location>/<uuid>/{remove,mdev_type,uevent,driver,subsystem,<driver attrs>,
                              vfio_user/{socket,qemu_device,errors}}
    class/mdev_bus/<parent>   -> <parent location>
    bus/mdev/devices/<uuid>   -> <parent location>/<uuid>
    bus/mdev/drivers/<driver>/<uuid> -> the device

The view is an observer of :class:`MdevCore`: it changes inside the core's
lock, so the tree is consistent when ``create``/``remove`` return.
"""

from __future__ import annotations

import errno
import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path

from mdevcore.core import (
    DeviceAdded,
    DeviceRemoved,
    MdevCore,
    MdevDevice,
    MdevEvent,
    MdevType,
    Parent,
    ParentAdded,
    ParentRemoved,
)
from mdevcore.kernel_parse import kstrtoul, parse_uuid
from mdevcore.sysfs.tree import Dir, Node, SysfsTree

log = logging.getLogger(__name__)

SocketPath = Callable[[uuid.UUID], Path]
VfioErrors = Callable[[uuid.UUID], str]  # the vfio_user/errors text of a device

# What a write to a "uevent" attribute may say (kobject_action_type).
_UEVENT_ACTIONS = frozenset(
    {"add", "remove", "change", "move", "online", "offline", "bind", "unbind"}
)


def qemu_device_arg(socket_path: Path | str) -> str:
    """The QEMU ``-device`` argument (JSON form) that attaches a device."""
    return json.dumps(
        {"driver": "vfio-user-pci", "socket": {"path": str(socket_path), "type": "unix"}},
        separators=(",", ":"),
    )


def create_store(core: MdevCore, parent: str, type_id: str, data: bytes | str) -> MdevDevice:
    """A write to ``<type>/create``: parse (EINVAL), then create."""
    return core.create(parent, type_id, parse_uuid(data))


def remove_store(core: MdevCore, dev_uuid: uuid.UUID, data: bytes | str) -> None:
    """A write to ``<device>/remove``: non-zero removes, 0 does nothing (kstrtoul).

    Every parse failure is EINVAL, ERANGE included, as remove_store returns."""
    try:
        value = kstrtoul(data)
    except OSError:
        raise OSError(errno.EINVAL, f"remove: {data!r} is not a number") from None
    if value:
        core.remove(dev_uuid)
    else:
        core.device(dev_uuid)  # still ENODEV for a device that is gone


def relative_link(from_dir: str, to: str) -> str:
    """Relative symlink target from ``from_dir`` to ``to`` (both root-relative).

    posixpath.relpath would do, but it consults the cwd on every call.
    """
    src, dst = from_dir.split("/"), to.split("/")
    common = 0
    while common < min(len(src), len(dst)) and src[common] == dst[common]:
        common += 1
    return "/".join([".."] * (len(src) - common) + dst[common:]) or "."


def _store_uevent(data: bytes) -> None:
    action = data.decode(errors="replace").rstrip("\n").split(" ")[0]
    if action not in _UEVENT_ACTIONS:
        raise OSError(errno.EINVAL, f"uevent: unknown action {action!r}")  # EINVAL


class MdevSysfs:
    """Builds and maintains the mdev part of a :class:`SysfsTree`.

    ``socket_path`` (optional) maps a device UUID to its vfio-user socket;
    with it each device dir gets ``vfio_user/{socket,qemu_device}``, and
    ``vfio_user/errors`` (error counts by kind, then ``total N``) if
    ``vfio_errors`` gives them.
    """

    def __init__(
        self,
        core: MdevCore,
        tree: SysfsTree | None = None,
        socket_path: SocketPath | None = None,
        vfio_errors: VfioErrors | None = None,
    ) -> None:
        self.core = core
        self.tree = tree or SysfsTree()
        self.socket_path = socket_path
        self.vfio_errors = vfio_errors
        for skeleton in ("devices/virtual", "class/mdev_bus", "bus/mdev/devices"):
            self.tree.mkdir(skeleton, keep=True)
        self._drivers_dir = self.tree.mkdir("bus/mdev/drivers", keep=True)
        self._driver_users: dict[str, int] = {}
        self._dir_cache: dict[str, Dir] = {}  # hot directories of _add/_remove_device
        self._link_cache: dict[tuple[str, str], str] = {}  # (from, to) -> relative_link
        core.subscribe(self._on_event, replay=True)

    def close(self) -> None:
        self.core.unsubscribe(self._on_event)

    def _dir(self, path: str) -> Dir:
        """The directory at ``path`` (no symlinks), remembered while it lives."""
        cached = self._dir_cache.get(path)
        if cached is not None and cached.alive:
            return cached
        found = self.tree.directory(path)
        self._dir_cache[path] = found
        return found

    def _on_event(self, event: MdevEvent) -> None:
        with self.tree.lock:
            if isinstance(event, ParentAdded):
                self._add_parent(event.parent)
            elif isinstance(event, ParentRemoved):
                self._remove_parent(event.parent)
            elif isinstance(event, DeviceAdded):
                self._add_device(event.device)
            elif isinstance(event, DeviceRemoved):
                self._remove_device(event.device)

    # --- parents ----------------------------------------------------------

    def _add_parent(self, parent: Parent) -> None:
        t = self.tree
        pdir = t.mkdir(parent.location)
        t.add_attr(pdir, "uevent", lambda: "", _store_uevent)
        types = t.mkdir(f"{parent.location}/mdev_supported_types")
        for mtype in parent.types.values():
            self._add_type(types, mtype)
        t.add_link(
            t.directory("class/mdev_bus"),
            parent.name,
            relative_link("class/mdev_bus", parent.location),
        )
        drv = parent.driver.name
        if self._driver_users.get(drv, 0) == 0:
            t.mkdir(f"bus/mdev/drivers/{drv}", volatile=True)
        self._driver_users[drv] = self._driver_users.get(drv, 0) + 1

    def _add_type(self, types: Dir, mtype: MdevType) -> None:
        t = self.tree
        core = self.core
        pname, tid = mtype.parent.name, mtype.id
        tdir = t.mkdir(f"{t.path_of(types)}/{tid}")

        def create(data: bytes) -> None:
            create_store(core, pname, tid, data)

        t.add_attr(tdir, "create", store=create)
        t.add_attr(tdir, "name", lambda: f"{mtype.pretty_name}\n")
        t.add_attr(tdir, "available_instances", lambda: f"{core.available_instances(pname, tid)}\n")
        t.add_attr(tdir, "device_api", lambda: f"{mtype.spec.device_api}\n")
        description = mtype.spec.description
        if description is not None:
            t.add_attr(tdir, "description", lambda: f"{description.rstrip(chr(10))}\n")
        t.mkdir(f"{t.path_of(tdir)}/devices")

    def _remove_parent(self, parent: Parent) -> None:
        t = self.tree
        mdev_bus = t.directory("class/mdev_bus")
        if parent.name in mdev_bus.children:
            t.remove(mdev_bus.children[parent.name])
        pdir = t.directory(parent.location)
        above = pdir.parent
        assert above is not None
        t.remove(pdir)
        t.prune(above)
        drv = parent.driver.name
        self._driver_users[drv] -= 1
        if self._driver_users[drv] == 0:
            del self._driver_users[drv]
            t.remove(t.child(self._drivers_dir, drv))

    # --- devices ----------------------------------------------------------

    def _link_to(self, from_dir: str, to_dir: str, name: str = "") -> str:
        """relative_link(from_dir, to_dir[/name]), the directories' part remembered.

        Links to a device differ only in its name, and ``name`` (a UUID) is
        never a component of ``from_dir``, so the directories' part holds.
        """
        key = (from_dir, to_dir)
        prefix = self._link_cache.get(key)
        if prefix is None:
            prefix = self._link_cache[key] = relative_link(from_dir, to_dir)
        if not name:
            return prefix
        return name if prefix == "." else f"{prefix}/{name}"

    def _add_device(self, device: MdevDevice) -> None:
        t = self.tree
        core = self.core
        parent = device.parent
        name = device.name
        ddir = t.add_dir(self._dir(parent.location), name, volatile=True)

        def remove(data: bytes) -> None:
            remove_store(core, device.uuid, data)

        t.add_attr(ddir, "remove", store=remove, volatile=True)
        t.add_attr(
            ddir,
            "uevent",
            lambda: f"DRIVER={parent.driver.name}\nMDEV_TYPE={device.type.id}\n",
            _store_uevent,
            volatile=True,
        )
        # A device dir sits right under its parent's: "../" and the parent's
        # relative link, the same for every device of the parent.
        type_path = f"{parent.location}/mdev_supported_types/{device.type.id}"
        up = self._link_to(parent.location, type_path)
        t.add_link(ddir, "mdev_type", f"../{up}", volatile=True)
        up = self._link_to(parent.location, "bus/mdev")
        t.add_link(ddir, "subsystem", f"../{up}", volatile=True)
        drv_path = f"bus/mdev/drivers/{parent.driver.name}"
        up = self._link_to(parent.location, drv_path)
        t.add_link(ddir, "driver", f"../{up}", volatile=True)
        self._add_driver_attrs(ddir, device)
        if self.socket_path is not None:
            sock = self.socket_path(device.uuid)
            # mkdir -p: a driver attribute "vfio_user/..." may have made it
            vdir = t.mkdir(f"{t.path_of(ddir)}/vfio_user", volatile=True)
            t.add_attr(vdir, "socket", lambda: f"{sock}\n", volatile=True)
            t.add_attr(vdir, "qemu_device", lambda: f"{qemu_device_arg(sock)}\n", volatile=True)
            errors = self.vfio_errors
            if errors is not None:
                dev_uuid = device.uuid
                t.add_attr(vdir, "errors", lambda: errors(dev_uuid), volatile=True)
        # links pointing at the device
        loc = parent.location
        tdevs_path = f"{type_path}/devices"
        tdevs = self._dir(tdevs_path)
        t.add_link(tdevs, name, self._link_to(tdevs_path, loc, name), volatile=True)
        bus = self._dir("bus/mdev/devices")
        t.add_link(bus, name, self._link_to("bus/mdev/devices", loc, name), volatile=True)
        drv_dir = self._dir(drv_path)
        t.add_link(drv_dir, name, self._link_to(drv_path, loc, name), volatile=True)

    def _add_driver_attrs(self, ddir: Dir, device: MdevDevice) -> None:
        t = self.tree
        driver = device.parent.driver
        try:
            attrs = driver.device_attributes(device.uuid, device.backend)
        except Exception:
            log.exception("mdev %s: device_attributes failed", device.uuid)
            return
        for rel in attrs:
            parts = [p for p in rel.split("/") if p]
            if not parts or any(p in (".", "..") for p in parts):
                log.warning("mdev %s: ignoring bad attribute path %r", device.uuid, rel)
                continue
            adir = ddir
            if len(parts) > 1:
                adir = t.mkdir(f"{t.path_of(ddir)}/{'/'.join(parts[:-1])}", volatile=True)

            def show(rel: str = rel) -> str:
                return driver.device_attributes(device.uuid, device.backend).get(rel, "")

            try:
                t.add_attr(adir, parts[-1], show, volatile=True)
            except OSError:
                log.warning("mdev %s: attribute %r clashes with the core's", device.uuid, rel)

    def _remove_device(self, device: MdevDevice) -> None:
        t = self.tree
        parent = device.parent
        name = device.name
        dirs = [
            f"{parent.location}/mdev_supported_types/{device.type.id}/devices",
            "bus/mdev/devices",
            f"bus/mdev/drivers/{parent.driver.name}",
            parent.location,
        ]
        for path in dirs:
            try:
                holder = self._dir(path)
            except OSError:
                continue
            node: Node | None = holder.children.get(name)
            if node is not None:
                t.remove(node)
