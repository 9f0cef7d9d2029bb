"""MttyDriver: types, the shared 24-port pool, ENOSPC and the vendor attribute."""

from __future__ import annotations

import errno
import uuid

import pytest

from mdevcore.driver import MdevDriver
from mdevcore.samples.mtty import PARENT_NAME, SYSFS_PATH, MttyDevice, MttyDriver
from mdevcore.sysfs.mdev_view import create_store, remove_store


def new_uuid(n: int) -> uuid.UUID:
    return uuid.UUID(int=0x83B8F4F2_509F_382F_3C1E_E6BFE0FA0000 + n)


def test_types_and_names() -> None:
    driver: MdevDriver = MttyDriver()
    assert driver.name == "mtty" == PARENT_NAME
    assert SYSFS_PATH == "devices/virtual/mtty/mtty"
    assert [(t.name, t.pretty_name, t.device_api, t.description) for t in driver.types] == [
        ("1", "Single port serial", "vfio-pci", None),
        ("2", "Dual port serial", "vfio-pci", None),
    ]


def test_initial_availability() -> None:
    driver = MttyDriver()
    assert driver.available_instances("1") == 24
    assert driver.available_instances("2") == 12


def test_mixed_creates_share_the_pool() -> None:
    driver = MttyDriver()
    made = []
    for n in range(5):
        made.append((new_uuid(n), driver.probe(new_uuid(n), "2")))  # 10 ports
    for n in range(5, 8):
        made.append((new_uuid(n), driver.probe(new_uuid(n), "1")))  # 3 ports
    assert driver.free_ports == 11
    assert driver.available_instances("1") == 11
    assert driver.available_instances("2") == 5
    dev = made[0][1]
    assert isinstance(dev, MttyDevice) and dev.nr_ports == 2
    dev1 = made[-1][1]
    assert isinstance(dev1, MttyDevice) and dev1.nr_ports == 1


def test_enospc_when_short_and_remove_returns_ports() -> None:
    driver = MttyDriver()
    devices = [(new_uuid(n), driver.probe(new_uuid(n), "2")) for n in range(11)]
    single = driver.probe(new_uuid(100), "1")  # 23 of 24 used
    assert driver.available_instances("2") == 0
    assert driver.available_instances("1") == 1
    with pytest.raises(OSError) as e:
        driver.probe(new_uuid(200), "2")
    assert e.value.errno == errno.ENOSPC
    assert driver.free_ports == 1  # the failed create reserved nothing
    last = driver.probe(new_uuid(201), "1")
    with pytest.raises(OSError) as e:
        driver.probe(new_uuid(202), "1")
    assert e.value.errno == errno.ENOSPC

    driver.remove(new_uuid(100), single)
    driver.remove(new_uuid(201), last)
    assert driver.available_instances("2") == 1
    for u, dev in devices:
        driver.remove(u, dev)
    assert driver.free_ports == 24
    assert driver.available_instances("2") == 12


def test_bad_type_duplicate_and_unknown_remove() -> None:
    driver = MttyDriver()
    with pytest.raises(OSError) as e:
        driver.probe(new_uuid(1), "4")
    assert e.value.errno == errno.EINVAL
    dev = driver.probe(new_uuid(1), "1")
    with pytest.raises(OSError) as e:
        driver.probe(new_uuid(1), "1")
    assert e.value.errno == errno.EEXIST
    driver.remove(new_uuid(1), dev)
    with pytest.raises(OSError) as e:
        driver.remove(new_uuid(1), dev)
    assert e.value.errno == errno.ENODEV
    assert driver.free_ports == 24


def test_vendor_attribute_like_the_kernel_sample() -> None:
    driver = MttyDriver()
    u = uuid.UUID("83b8f4f2-509f-382f-3c1e-e6bfe0fa1001")
    dev = driver.probe(u, "2")
    assert driver.device_attributes(u, dev) == {
        "vendor/sample_mdev_dev": "This is MDEV 83b8f4f2-509f-382f-3c1e-e6bfe0fa1001\n"
    }


def test_through_the_mdev_core() -> None:
    """The kernel doc's create/remove steps against the real core model."""
    from mdevcore.core import MdevCore

    core = MdevCore()
    core.register_parent(PARENT_NAME, SYSFS_PATH, MttyDriver())
    assert core.available_instances("mtty", "mtty-1") == 24
    assert core.available_instances("mtty", "mtty-2") == 12
    first = create_store(core, "mtty", "mtty-2", "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001\n")
    assert isinstance(first.backend, MttyDevice) and first.backend.nr_ports == 2
    assert core.available_instances("mtty", "mtty-2") == 11
    assert core.available_instances("mtty", "mtty-1") == 22
    made = [core.create("mtty", "mtty-1", new_uuid(n)).uuid for n in range(22)]
    with pytest.raises(OSError) as e:
        core.create("mtty", "mtty-1", new_uuid(99))
    assert e.value.errno == errno.ENOSPC
    remove_store(core, first.uuid, "1\n")
    assert core.available_instances("mtty", "mtty-2") == 1
    for u in made:
        core.remove(u)
    assert core.available_instances("mtty", "mtty-1") == 24
