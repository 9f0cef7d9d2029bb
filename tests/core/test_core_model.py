"""The mdev model: kernel create/remove semantics and its errno table."""

from __future__ import annotations

import errno
import threading
import uuid

import pytest
from mdev_testdriver import PoolDriver, ScratchDevice

from mdevcore.core import (
    DeviceAdded,
    DeviceRemoved,
    MdevCore,
    MdevEvent,
    ParentAdded,
    ParentRemoved,
)
from mdevcore.kernel_parse import kstrtoul as parse_remove
from mdevcore.kernel_parse import parse_uuid
from mdevcore.sysfs.mdev_view import create_store, remove_store

U1 = "0e8b5e3a-6f0b-4a4e-9d2a-0c7c1d5f3b01"
U2 = "1e8b5e3a-6f0b-4a4e-9d2a-0c7c1d5f3b02"


@pytest.fixture
def core() -> MdevCore:
    c = MdevCore()
    c.register_parent("pool", "devices/virtual/pool/pool", PoolDriver(pool=4))
    return c


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno or -1


@pytest.mark.parametrize(
    "text",
    [U1, U1 + "\n", U1.upper(), (U1 + "\n").encode(), U1 + " ", U1 + "0", (U1 + "\0").encode()],
)
def test_create_accepts_a_uuid_and_any_37th_byte(text: str | bytes) -> None:
    # Like the kernel's create_store: 36 or 37 bytes, guid_parse of the first
    # 36, so any 37th byte passes (found by the sysfs fuzz target).
    assert parse_uuid(text) == uuid.UUID(U1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n",
        U1[:-1],
        U1 + "\n\n",
        " " + U1,
        U1[:-1] + "\0\n",
        "{" + U1[1:-1] + "}",
        U1.replace("-", ""),
        U1.replace("-", "_"),
        "g" + U1[1:],
        U1[:8] + "0" + U1[9:],  # dash position holds a digit
    ],
)
def test_create_rejects_everything_else_with_einval(text: str) -> None:
    assert errno_of(parse_uuid, text) == errno.EINVAL


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", 1), ("1\n", 1), ("0", 0), ("0\n", 0), ("+7", 7), ("0x10", 16), ("010", 8), ("42", 42)],
)
def test_remove_parses_like_kstrtoul(text: str, value: int) -> None:
    assert parse_remove(text) == value


@pytest.mark.parametrize("text", ["", "\n", "yes", "-1", "1 ", "0x", "09", "1\n\n", " 1"])
def test_remove_rejects_non_integers(text: str) -> None:
    assert errno_of(parse_remove, text) == errno.EINVAL


def test_remove_out_of_range() -> None:
    assert errno_of(parse_remove, str(1 << 64)) == errno.ERANGE


def test_create_remove_and_available_instances(core: MdevCore) -> None:
    assert core.available_instances("pool", "pool-1") == 4
    assert core.available_instances("pool", "pool-2") == 2
    dev = create_store(core, "pool", "pool-2", U1 + "\n")
    assert dev.name == U1 and dev.type.id == "pool-2" and dev.parent.name == "pool"
    assert isinstance(dev.backend, ScratchDevice)
    assert core.available_instances("pool", "pool-1") == 2
    assert core.available_instances("pool", "pool-2") == 1
    remove_store(core, dev.uuid, "0")  # 0 is a no-op
    assert dev.uuid in core.devices
    remove_store(core, dev.uuid, "1\n")
    assert dev.uuid not in core.devices
    assert core.available_instances("pool", "pool-2") == 2


def test_errno_table(core: MdevCore) -> None:
    create_store(core, "pool", "pool-1", U1)
    # duplicate UUID, also in another case or through another type
    assert errno_of(create_store, core, "pool", "pool-1", U1) == errno.EEXIST
    assert errno_of(create_store, core, "pool", "pool-2", U1.upper() + "\n") == errno.EEXIST
    assert errno_of(create_store, core, "pool", "pool-1", "nope") == errno.EINVAL
    assert errno_of(create_store, core, "nothere", "pool-1", U2) == errno.ENODEV
    assert errno_of(create_store, core, "pool", "pool-9", U2) == errno.ENODEV
    # the pool has 3 slots left: one more pool-2 fits, then ENOSPC from the driver
    create_store(core, "pool", "pool-2", U2)
    assert errno_of(create_store, core, "pool", "pool-2", str(uuid.uuid4())) == errno.ENOSPC
    assert errno_of(remove_store, core, uuid.UUID(U1), "x") == errno.EINVAL
    assert errno_of(remove_store, core, uuid.uuid4(), "1") == errno.ENODEV
    # a device that refuses keeps existing
    dev = core.device(uuid.UUID(U1))
    assert isinstance(dev.backend, ScratchDevice)
    dev.backend.busy = True
    assert errno_of(remove_store, core, dev.uuid, "1") == errno.EBUSY
    assert dev.uuid in core.devices
    assert core.available_instances("pool", "pool-1") == 1


def test_parent_going_away(core: MdevCore) -> None:
    events: list[MdevEvent] = []
    core.subscribe(events.append)
    dev = create_store(core, "pool", "pool-1", U1)
    parent = core.parent("pool")
    core.unregister_parent("pool")
    assert not parent.registered
    assert core.devices == {}
    assert errno_of(create_store, core, "pool", "pool-1", U2) == errno.ENODEV
    assert errno_of(core.unregister_parent, "pool") == errno.ENODEV
    assert events == [DeviceAdded(dev), DeviceRemoved(dev), ParentRemoved(parent)]


def test_register_checks(core: MdevCore) -> None:
    assert errno_of(core.register_parent, "pool", "devices/virtual/pool/pool", PoolDriver()) == (
        errno.EEXIST
    )
    for loc in ["devices/x/other", "devices/../pool2", "", "devices//pool2"]:
        assert errno_of(core.register_parent, "pool2", loc, PoolDriver()) == errno.EINVAL


def test_subscribe_replay(core: MdevCore) -> None:
    dev = create_store(core, "pool", "pool-1", U1)
    events: list[MdevEvent] = []
    core.subscribe(events.append, replay=True)
    assert events == [ParentAdded(core.parent("pool")), DeviceAdded(dev)]
    core.unsubscribe(events.append)
    core.remove(dev.uuid)
    assert len(events) == 2


def test_broken_observer_does_not_undo_create(core: MdevCore) -> None:
    def broken(event: MdevEvent) -> None:
        raise RuntimeError("view bug")

    core.subscribe(broken)
    dev = create_store(core, "pool", "pool-1", U1)
    assert core.device(dev.uuid) is dev


def test_parallel_creates_keep_counts_consistent() -> None:
    core = MdevCore()
    driver = PoolDriver(pool=150)
    core.register_parent("pool", "devices/virtual/pool/pool", driver)
    uuids = [uuid.uuid4() for _ in range(200)]
    results: dict[uuid.UUID, int] = {}
    seen_counts: list[int] = []
    barrier = threading.Barrier(8)

    def worker(chunk: list[uuid.UUID]) -> None:
        barrier.wait()
        for u in chunk:
            try:
                core.create("pool", "pool-1", u)
                results[u] = 0
            except OSError as e:
                results[u] = e.errno or -1
            seen_counts.append(core.available_instances("pool", "pool-1"))

    threads = [threading.Thread(target=worker, args=(uuids[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [u for u, e in results.items() if e == 0]
    assert len(created) == 150
    assert sorted(set(results.values())) == [0, errno.ENOSPC]
    assert core.available_instances("pool", "pool-1") == 0
    assert all(0 <= c <= 150 for c in seen_counts)
    assert set(core.devices) == set(created)

    def remover(chunk: list[uuid.UUID]) -> None:
        for u in chunk:
            core.remove(u)

    threads = [threading.Thread(target=remover, args=(created[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert core.devices == {}
    assert driver.free == 150


def test_create_checks_refuse_before_probe(core: MdevCore) -> None:
    refused = uuid.UUID(U2)

    def check(mtype: object, dev_uuid: uuid.UUID) -> None:
        if dev_uuid == refused:
            raise OSError(errno.ENAMETOOLONG, "no room for its socket")

    core.add_create_check(check)
    assert errno_of(create_store, core, "pool", "pool-2", U2) == errno.ENAMETOOLONG
    assert core.devices == {}
    assert core.available_instances("pool", "pool-2") == 2  # probe never ran
    create_store(core, "pool", "pool-2", U1)
    core.remove_create_check(check)
    create_store(core, "pool", "pool-1", U2)


def test_core_closes_removed_devices(core: MdevCore) -> None:
    dev = core.create("pool", "pool-1", uuid.UUID(U1))
    assert not dev.backend.closed  # type: ignore[attr-defined]
    core.remove(uuid.UUID(U1))
    assert dev.backend.closed  # type: ignore[attr-defined]


def test_core_keeps_a_device_whose_remove_was_refused(core: MdevCore) -> None:
    dev = core.create("pool", "pool-1", uuid.UUID(U1))
    dev.backend.busy = True  # type: ignore[attr-defined]
    assert errno_of(core.remove, uuid.UUID(U1)) == errno.EBUSY
    assert not dev.backend.closed  # type: ignore[attr-defined]


@pytest.mark.parametrize("missing", ["name", "types", "probe"])
def test_register_refuses_an_incomplete_driver(missing: str) -> None:
    from mdevcore.driver import MdevDriver, MdevTypeSpec

    attrs: dict[str, object] = {
        "name": "half",
        "types": (MdevTypeSpec("1", "one"),),
        "probe": lambda self, u, t: None,
    }
    attrs[missing] = "" if missing == "name" else () if missing == "types" else None
    driver = type("Half", (MdevDriver,), attrs)()
    with pytest.raises(ValueError) as info:
        MdevCore().register_parent("half", "devices/virtual/half/half", driver)  # type: ignore[arg-type]
    assert missing in str(info.value)
    assert MdevDriver().device_attributes(uuid.UUID(U1), None) == {}  # type: ignore[arg-type]
