"""The mdev sysfs layout, used unmounted from Python."""

from __future__ import annotations

import errno
import json
import uuid
from pathlib import Path

import pytest
from mdev_testdriver import PoolDriver

from mdevcore.core import MdevCore
from mdevcore.sysfs import Attr, Link, MdevSysfs, SysfsTree
from mdevcore.sysfs.mdev_view import create_store

U1 = "0e8b5e3a-6f0b-4a4e-9d2a-0c7c1d5f3b01"
P = "devices/virtual/pool/pool"
T2 = f"{P}/mdev_supported_types/pool-2"


@pytest.fixture
def view() -> MdevSysfs:
    core = MdevCore()
    core.register_parent("pool", P, PoolDriver(pool=4))
    return MdevSysfs(core, socket_path=lambda u: Path(f"/run/test/{u}.sock"))


def test_types_layout(view: MdevSysfs) -> None:
    t = view.tree
    assert sorted(t.listdir(f"{P}/mdev_supported_types")) == ["pool-1", "pool-2"]
    assert sorted(t.listdir(f"{P}/mdev_supported_types/pool-1")) == [
        "available_instances",
        "create",
        "description",
        "device_api",
        "devices",
        "name",
    ]
    assert "description" not in t.listdir(T2)
    assert t.read(f"{T2}/name") == "Two slots\n"
    assert t.read(f"{T2}/device_api") == "vfio-pci\n"
    assert t.read(f"{T2}/available_instances") == "2\n"
    assert t.read(f"{P}/mdev_supported_types/pool-1/description") == "uses 1 slot\nno irqs\n"
    assert t.readlink("class/mdev_bus/pool") == "../../devices/virtual/pool/pool"
    assert t.realpath("class/mdev_bus/pool/mdev_supported_types/pool-2") == T2
    create = t.lookup(f"{T2}/create")
    assert isinstance(create, Attr) and create.perm == 0o200 and create.size == 4096
    name = t.lookup(f"{T2}/name")
    assert isinstance(name, Attr) and name.perm == 0o444
    assert t.listdir("bus/mdev/devices") == []
    assert t.listdir("bus/mdev/drivers") == ["pool"]


def test_create_and_remove_through_the_tree(view: MdevSysfs) -> None:
    t = view.tree
    assert t.write(f"{T2}/create", U1 + "\n") == 37
    dev = f"{P}/{U1}"
    assert t.read(f"{T2}/available_instances") == "1\n"
    assert t.read("class/mdev_bus/pool/mdev_supported_types/pool-1/available_instances") == "2\n"
    assert t.readlink(f"bus/mdev/devices/{U1}") == f"../../../{dev}"
    assert t.realpath(f"bus/mdev/devices/{U1}") == dev
    assert t.readlink(f"{dev}/mdev_type") == "../mdev_supported_types/pool-2"
    assert t.realpath(f"bus/mdev/devices/{U1}/mdev_type") == T2
    assert t.realpath(f"{T2}/devices/{U1}") == dev
    assert t.realpath(f"bus/mdev/drivers/pool/{U1}") == dev
    assert t.realpath(f"{dev}/driver") == "bus/mdev/drivers/pool"
    assert t.realpath(f"{dev}/subsystem") == "bus/mdev"
    assert t.read(f"{dev}/vendor/sample_mdev_dev") == f"This is MDEV {U1}\n"
    assert t.read(f"{dev}/uevent") == "DRIVER=pool\nMDEV_TYPE=pool-2\n"
    assert t.read(f"{dev}/vfio_user/socket") == f"/run/test/{U1}.sock\n"
    qemu = json.loads(t.read(f"{dev}/vfio_user/qemu_device"))
    assert qemu == {
        "driver": "vfio-user-pci",
        "socket": {"path": f"/run/test/{U1}.sock", "type": "unix"},
    }
    remove = t.lookup(f"{dev}/remove")
    assert isinstance(remove, Attr) and remove.perm == 0o200
    t.write(f"{dev}/remove", "0")
    assert t.exists(dev)
    t.write(f"bus/mdev/devices/{U1}/remove", "1")
    for gone in [
        dev,
        f"bus/mdev/devices/{U1}",
        f"{T2}/devices/{U1}",
        f"bus/mdev/drivers/pool/{U1}",
    ]:
        assert not t.exists(gone)
    assert t.read(f"{T2}/available_instances") == "2\n"
    # the handle on the removed file fails as sysfs does
    with pytest.raises(OSError) as info:
        remove.write(b"1")
    assert info.value.errno == errno.ENODEV


@pytest.mark.parametrize(
    ("path", "data", "err"),
    [
        (f"{T2}/create", "not-a-uuid", errno.EINVAL),
        (f"{T2}/create", U1 + "\n\n", errno.EINVAL),
        (f"{T2}/create", U1 + "x" * 5000, errno.EINVAL),
        (f"{T2}/name", "x", errno.EACCES),
        (f"{T2}", "x", errno.EISDIR),
        (f"{T2}/nothere", "x", errno.ENOENT),
    ],
)
def test_write_errors(view: MdevSysfs, path: str, data: str, err: int) -> None:
    with pytest.raises(OSError) as info:
        view.tree.write(path, data)
    assert info.value.errno == err


def test_create_errors_match_the_kernel(view: MdevSysfs) -> None:
    t = view.tree
    t.write(f"{T2}/create", U1)
    with pytest.raises(OSError) as info:
        t.write(f"{T2}/create", U1)
    assert info.value.errno == errno.EEXIST
    t.write(f"{T2}/create", str(uuid.uuid4()))
    with pytest.raises(OSError) as info:
        t.write(f"{T2}/create", str(uuid.uuid4()))
    assert info.value.errno == errno.ENOSPC
    assert t.read(f"{T2}/available_instances") == "0\n"
    with pytest.raises(OSError) as info:
        t.write(f"{P}/{U1}/remove", "one")
    assert info.value.errno == errno.EINVAL
    with pytest.raises(OSError) as info:
        t.read(f"{T2}/create")
    assert info.value.errno == errno.EACCES


def test_unregister_parent_removes_its_tree(view: MdevSysfs) -> None:
    t = view.tree
    t.write(f"{T2}/create", U1)
    create = t.lookup(f"{T2}/create")
    view.core.unregister_parent("pool")
    assert t.listdir("class/mdev_bus") == []
    assert t.listdir("bus/mdev/devices") == []
    assert t.listdir("bus/mdev/drivers") == []
    assert t.listdir("devices/virtual") == []
    # a writer that still holds the old create file gets ENODEV
    assert isinstance(create, Attr)
    with pytest.raises(OSError) as info:
        create.write(U1.encode())
    assert info.value.errno == errno.ENODEV
    # registering again brings the tree back
    view.core.register_parent("pool", P, PoolDriver(pool=4))
    assert t.read(f"{T2}/available_instances") == "2\n"


def test_view_replays_existing_state() -> None:
    core = MdevCore()
    core.register_parent("pool", P, PoolDriver())
    create_store(core, "pool", "pool-1", U1)
    view = MdevSysfs(core)
    assert view.tree.realpath(f"bus/mdev/devices/{U1}/mdev_type") == (
        f"{P}/mdev_supported_types/pool-1"
    )
    assert not view.tree.exists(f"{P}/{U1}/vfio_user")


def test_symlink_loops_and_plain_tree() -> None:
    t = SysfsTree()
    d = t.mkdir("a/b")
    t.add_link(d, "loop", "loop")
    t.add_link(d, "up", "../..")
    with pytest.raises(OSError) as info:
        t.lookup("a/b/loop")
    assert info.value.errno == errno.ELOOP
    assert t.lookup("a/b/up") is t.root
    assert isinstance(t.lookup("a/b/loop", follow=False), Link)
    with pytest.raises(OSError) as info:
        t.readlink("a/b")
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    "location", ["pool", "devices/virtual/pool/pool", "devices/pci0000:00/0000:00:01.0/pool"]
)
def test_device_links_resolve_for_parents_at_any_depth(location: str) -> None:
    # The view reuses link prefixes per parent: every link of a device (and
    # to it) must still lead where the kernel's do, whatever the depth.
    core = MdevCore()
    core.register_parent("pool", location, PoolDriver(pool=4))
    tree = MdevSysfs(core).tree
    types = f"{location}/mdev_supported_types"
    devices = [str(uuid.uuid4()) for _ in range(2)]
    for dev, type_id in zip(devices, ("pool-1", "pool-2"), strict=True):
        create_store(core, "pool", type_id, dev)
    for dev, type_id in zip(devices, ("pool-1", "pool-2"), strict=True):
        here = f"{location}/{dev}"
        assert tree.realpath(f"{here}/mdev_type") == f"{types}/{type_id}"
        assert tree.realpath(f"{here}/subsystem") == "bus/mdev"
        assert tree.realpath(f"{here}/driver") == "bus/mdev/drivers/pool"
        for holder in ("bus/mdev/devices", f"{types}/{type_id}/devices", "bus/mdev/drivers/pool"):
            assert tree.realpath(f"{holder}/{dev}") == here
        assert tree.readlink(f"{here}/subsystem").count("..") == here.count("/") + 1  # no shortcut
