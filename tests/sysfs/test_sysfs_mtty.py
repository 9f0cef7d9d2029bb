"""The mirror with the real mtty sample parent (unmounted)."""

from __future__ import annotations

import errno
import uuid

import pytest

from mdevcore.core import MdevCore
from mdevcore.samples.mtty import PARENT_NAME, SYSFS_PATH, MttyDriver
from mdevcore.sysfs import MdevSysfs

TYPES = f"{SYSFS_PATH}/mdev_supported_types"


@pytest.fixture
def view() -> MdevSysfs:
    core = MdevCore()
    core.register_parent(PARENT_NAME, SYSFS_PATH, MttyDriver())
    return MdevSysfs(core)


def test_mtty_types_as_the_kernel_shows_them(view: MdevSysfs) -> None:
    t = view.tree
    assert SYSFS_PATH == "devices/virtual/mtty/mtty"
    assert t.realpath("class/mdev_bus/mtty") == SYSFS_PATH
    assert sorted(t.listdir(TYPES)) == ["mtty-1", "mtty-2"]
    assert t.read(f"{TYPES}/mtty-1/available_instances") == "24\n"
    assert t.read(f"{TYPES}/mtty-2/available_instances") == "12\n"
    assert t.read(f"{TYPES}/mtty-2/device_api") == "vfio-pci\n"
    assert t.read(f"{TYPES}/mtty-1/name") == "Single port serial\n"
    assert t.read(f"{TYPES}/mtty-2/name") == "Dual port serial\n"


def test_mtty_ports_run_out_with_enospc(view: MdevSysfs) -> None:
    t = view.tree
    first = str(uuid.uuid4())
    t.write(f"{TYPES}/mtty-2/create", first + "\n")
    assert t.read(f"bus/mdev/devices/{first}/vendor/sample_mdev_dev") == f"This is MDEV {first}\n"
    assert t.read(f"{TYPES}/mtty-1/available_instances") == "22\n"
    for _ in range(11):
        t.write(f"{TYPES}/mtty-2/create", str(uuid.uuid4()))
    with pytest.raises(OSError) as info:
        t.write(f"{TYPES}/mtty-1/create", str(uuid.uuid4()))
    assert info.value.errno == errno.ENOSPC
    assert t.read(f"{TYPES}/mtty-1/available_instances") == "0\n"
    t.write(f"bus/mdev/devices/{first}/remove", "1")
    assert t.read(f"{TYPES}/mtty-1/available_instances") == "2\n"
    assert len(t.listdir("bus/mdev/devices")) == 11
