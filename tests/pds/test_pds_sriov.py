"""SR-IOV, binding and live-migration rules of the pds card, through the Python tree."""

from __future__ import annotations

import errno
import struct
from pathlib import Path
from typing import Any

import pytest
import trio
from pds_card import NS_SIZE, PF, PF_DIR, VF1, VF2, Card, make_card

from mdevcore.kernel_parse import kstrtobool
from mdevcore.kernel_parse import kstrtoul as kstrtouint
from mdevcore.parents.pds.driver import parse_size
from mdevcore.parents.pds.pf import PdsConfig
from mdevcore.pci import caps
from mdevcore.pci.bus import Bdf, PciFunction
from mdevcore.pci.device import PciDevice, PciIdentity
from mdevcore.pci.migration import MIGRATION_STOP_COPY
from mdevcore.sysfs.tree import Attr
from mdevcore.vfio_user.backend import DEVICE_FEATURE_GET, DEVICE_FEATURE_MIGRATION
from mdevcore.vfio_user.client import Client, VfioUserError

BUS_DEV = "class/pci_bus/0000:60/device"


def write_err(card: Card, path: str, data: str) -> int:
    with pytest.raises(OSError) as info:
        card.tree.write(path, data)
    assert info.value.errno is not None
    return info.value.errno


def sriov_regs(card: Card) -> dict[str, int]:
    """The PF's SR-IOV capability as its config space holds it."""
    node = card.tree.lookup(f"{PF_DIR}/config")
    assert isinstance(node, Attr)
    raw = node.render()
    assert len(raw) == 4096
    offset = 0x100
    while offset:
        header = struct.unpack_from("<I", raw, offset)[0]
        if header & 0xFFFF == caps.EXT_CAP_ID_SRIOV:
            break
        offset = header >> 20
    assert offset, "no SR-IOV capability"

    def u16(reg: int) -> int:
        return int(struct.unpack_from("<H", raw, offset + reg)[0])

    return {
        "ctrl": u16(caps.SRIOV_CTRL),
        "total": u16(caps.SRIOV_TOTAL_VF),
        "num": u16(caps.SRIOV_NUM_VF),
        "offset": u16(caps.SRIOV_VF_OFFSET),
        "stride": u16(caps.SRIOV_VF_STRIDE),
        "vf_did": u16(caps.SRIOV_VF_DID),
    }


def migration_flags(card: Card, vf: str) -> int:
    device = card.host.bus.function(vf).device
    return int(struct.unpack("<Q", device.device_feature(DEVICE_FEATURE_GET | 1, b""))[0])


async def test_pf_attributes_and_paths(card: Card) -> None:
    t = card.tree
    expect = {
        "vendor": "0x1dd8\n",
        "device": "0x100c\n",
        "class": "0x120000\n",
        "sriov_totalvfs": "4\n",
        "sriov_numvfs": "0\n",
        "sriov_offset": "1\n",
        "sriov_stride": "1\n",
        "sriov_vf_device": "1006\n",
        "sriov_drivers_autoprobe": "1\n",
    }
    for name, value in expect.items():
        assert t.read(f"{PF_DIR}/{name}") == value, name
    assert t.realpath(PF_DIR) == f"devices/pci0000:60/{PF}"
    assert t.realpath(f"{BUS_DEV}/{PF}") == f"devices/pci0000:60/{PF}"
    assert t.readlink(f"{PF_DIR}/driver") == "../../../bus/pci/drivers/pds_core"
    assert t.realpath(f"bus/pci/drivers/pds_core/{PF}/sriov_numvfs") == (
        f"devices/pci0000:60/{PF}/sriov_numvfs"
    )
    assert sriov_regs(card) == {
        "ctrl": 0,
        "total": 4,
        "num": 0,
        "offset": 1,
        "stride": 1,
        "vf_did": 0x1006,
    }


async def test_numvfs_write_rules(card: Card) -> None:
    t = card.tree
    numvfs = f"{PF_DIR}/sriov_numvfs"
    assert write_err(card, numvfs, "5\n") == errno.ERANGE
    for bad in ("abc\n", "-1\n", "1 2\n", "", "70000\n", "0x\n", "08\n"):
        assert write_err(card, numvfs, bad) == errno.EINVAL, bad
    t.write(numvfs, "0x2\n")  # kstrtou16 base 0: hex is fine
    assert t.read(numvfs) == "2\n"
    assert {"virtfn0", "virtfn1"} <= set(t.listdir(PF_DIR))
    regs = sriov_regs(card)
    assert regs["num"] == 2 and regs["ctrl"] & caps.SRIOV_CTRL_VFE
    t.write(numvfs, "2")  # the same count: a no-op
    assert write_err(card, numvfs, "3\n") == errno.EBUSY
    assert write_err(card, numvfs, "1\n") == errno.EBUSY
    assert t.read(numvfs) == "2\n"  # no partial change
    t.write(numvfs, "0\n")
    assert t.read(numvfs) == "0\n"
    assert not t.exists(f"bus/pci/devices/{VF1}")
    assert not any(name.startswith("virtfn") for name in t.listdir(PF_DIR))
    assert sriov_regs(card)["ctrl"] & caps.SRIOV_CTRL_VFE == 0
    t.write(numvfs, "4\n")
    assert sorted(n for n in t.listdir("bus/pci/devices") if n != PF) == [
        "0000:60:00.1",
        "0000:60:00.2",
        "0000:60:00.3",
        "0000:60:00.4",
    ]


async def test_vf_directory(card: Card) -> None:
    t = card.tree
    t.write(f"{PF_DIR}/sriov_numvfs", "2\n")
    vf = f"bus/pci/devices/{VF2}"
    assert t.realpath(vf) == f"devices/pci0000:60/{VF2}"
    assert t.readlink(f"{vf}/physfn") == f"../{PF}"
    assert t.readlink(f"{PF_DIR}/virtfn1") == f"../{VF2}"
    assert t.read(f"{vf}/vendor") == "0x1dd8\n"
    assert t.read(f"{vf}/device") == "0x1006\n"
    assert t.read(f"{vf}/class") == "0x010802\n"
    assert t.read(f"{vf}/driver_override") == "(null)\n"
    t.write(f"{vf}/driver_override", "pds_vfio\n")
    assert t.read(f"{vf}/driver_override") == "pds_vfio\n"
    t.write(f"{vf}/driver_override", "\n")  # a lone newline clears it
    assert t.read(f"{vf}/driver_override") == "(null)\n"
    assert write_err(card, f"{vf}/driver_override", "x" * 4095) == errno.EINVAL
    assert "PCI_SLOT_NAME=0000:60:00.2" in t.read(f"{vf}/uevent")


async def test_autoprobe_on_binds_the_host_nvme_driver(card: Card) -> None:
    t = card.tree
    t.write(f"{PF_DIR}/sriov_numvfs", "2\n")
    for vf in (VF1, VF2):
        assert t.readlink(f"bus/pci/devices/{vf}/driver") == "../../../bus/pci/drivers/nvme"
        assert t.exists(f"bus/pci/drivers/nvme/{vf}")
        assert not t.exists(f"bus/pci/devices/{vf}/vfio_user")
    await card.servers.settle()
    assert not any(p.suffix == ".sock" for p in card.run_dir.iterdir())


async def test_autoprobe_off_and_binding_by_hand(card: Card) -> None:
    t = card.tree
    t.write(f"{BUS_DEV}/{PF}/sriov_drivers_autoprobe", "0\n")
    assert t.read(f"{PF_DIR}/sriov_drivers_autoprobe") == "0\n"
    assert write_err(card, f"{PF_DIR}/sriov_drivers_autoprobe", "maybe") == errno.EINVAL
    t.write(f"{PF_DIR}/sriov_numvfs", "2\n")
    vf = f"bus/pci/devices/{VF1}"
    assert not t.exists(f"{vf}/driver")
    # a VF of a PF with autoprobe off probes only with a driver_override
    assert write_err(card, "bus/pci/drivers/nvme/bind", f"{VF1}\n") == errno.ENODEV
    # pds_vfio is override-only
    assert write_err(card, "bus/pci/drivers/pds_vfio/bind", f"{VF1}\n") == errno.ENODEV
    assert write_err(card, "bus/pci/drivers/nvme/bind", "0000:60:07.0\n") == errno.ENODEV
    t.write(f"{vf}/driver_override", "nvme")
    # an override for another driver keeps this one out
    assert write_err(card, "bus/pci/drivers/pds_vfio/bind", VF1) == errno.ENODEV
    t.write("bus/pci/drivers/nvme/bind", f"{VF1}\n")
    assert t.readlink(f"{vf}/driver") == "../../../bus/pci/drivers/nvme"
    assert write_err(card, "bus/pci/drivers/nvme/bind", VF1) == errno.EBUSY
    assert write_err(card, "bus/pci/drivers/pds_vfio/unbind", VF1) == errno.ENODEV
    t.write("bus/pci/drivers/nvme/unbind", f"{VF1}\n")
    assert not t.exists(f"{vf}/driver")
    assert write_err(card, "bus/pci/drivers/nvme/unbind", VF1) == errno.ENODEV
    # drivers_probe attaches the device to whichever driver matches
    t.write("bus/pci/drivers_probe", f"{VF1}\n")
    assert t.readlink(f"{vf}/driver").endswith("/nvme")
    assert not t.exists(f"bus/pci/devices/{VF2}/driver")


async def bind_pds_vfio(card: Card, vf: str) -> str:
    t = card.tree
    t.write(f"bus/pci/devices/{vf}/driver_override", "pds_vfio\n")
    t.write("bus/pci/drivers/pds_vfio/bind", f"{vf}\n")
    await card.servers.settle()
    return t.read(f"bus/pci/devices/{vf}/vfio_user/socket").strip()


def read_identity(path: str) -> tuple[int, int]:
    with Client(path) as c:
        c.negotiate()
        cfg = c.region_read(7, 0, 12)
        return struct.unpack_from("<H", cfg)[0], int.from_bytes(cfg[9:12], "little")


async def test_pds_vfio_serves_and_unbind_stops(card: Card) -> None:
    t = card.tree
    t.write(f"{PF_DIR}/sriov_drivers_autoprobe", "0")
    t.write(f"{PF_DIR}/sriov_numvfs", "1")
    sock = await bind_pds_vfio(card, VF1)
    assert sock == str(card.run_dir / f"{VF1}.sock")
    qemu = t.read(f"bus/pci/devices/{VF1}/vfio_user/qemu_device")
    assert '"driver":"vfio-user-pci"' in qemu and sock in qemu
    assert t.readlink(f"bus/pci/devices/{VF1}/driver") == "../../../bus/pci/drivers/pds_vfio"
    assert await trio.to_thread.run_sync(read_identity, sock) == (0x1DD8, 0x010802)

    # a connected client is disconnected by unbind, and the socket goes
    client = Client(sock, timeout=10)
    try:
        await trio.to_thread.run_sync(client.negotiate)
        t.write("bus/pci/drivers/pds_vfio/unbind", VF1)
        await card.servers.settle()
        assert not (card.run_dir / f"{VF1}.sock").exists()
        assert not t.exists(f"bus/pci/devices/{VF1}/vfio_user")
        assert not t.exists(f"bus/pci/devices/{VF1}/driver")
        with pytest.raises(OSError):
            await trio.to_thread.run_sync(client.negotiate)
    finally:
        client.close()
    # bound again, served again
    t.write("bus/pci/drivers/pds_vfio/bind", VF1)
    await card.servers.settle()
    assert (card.run_dir / f"{VF1}.sock").exists()
    # SR-IOV off removes the VF and stops serving it
    t.write(f"{PF_DIR}/sriov_numvfs", "0")
    await card.servers.settle()
    assert not (card.run_dir / f"{VF1}.sock").exists()
    assert not t.exists(f"bus/pci/devices/{VF1}")


async def test_enable_lm_aux_devices_and_migration(card: Card) -> None:
    t = card.tree
    assert t.listdir("bus/auxiliary/drivers") == ["pds_vfio.lm"]
    t.write(f"{PF_DIR}/sriov_drivers_autoprobe", "0")
    t.write(f"{PF_DIR}/sriov_numvfs", "2")
    assert t.listdir("bus/auxiliary/devices") == []
    with pytest.raises(OSError) as info:  # LM off: no migration offered
        migration_flags(card, VF1)
    assert info.value.errno == errno.ENOTTY

    card.enable_lm()
    assert sorted(t.listdir("bus/auxiliary/devices")) == ["pds_core.LM.1", "pds_core.LM.2"]
    assert t.realpath("bus/auxiliary/devices/pds_core.LM.1") == (
        f"devices/pci0000:60/{VF1}/pds_core.LM.1"
    )
    assert migration_flags(card, VF1) & MIGRATION_STOP_COPY

    sock = await bind_pds_vfio(card, VF1)
    assert t.listdir("bus/auxiliary/drivers/pds_vfio.lm") == ["pds_core.LM.1"]
    assert t.readlink("bus/auxiliary/devices/pds_core.LM.1/driver") == (
        "../../../../bus/auxiliary/drivers/pds_vfio.lm"
    )

    def feature() -> bytes:
        with Client(sock) as c:
            c.negotiate()
            return c.device_feature(DEVICE_FEATURE_GET | DEVICE_FEATURE_MIGRATION)[2]

    flags = struct.unpack("<Q", (await trio.to_thread.run_sync(feature))[:8])[0]
    assert flags & MIGRATION_STOP_COPY
    # enable_lm cannot change under a bound VF
    r = card.devlink_cmd(f"dev param set pci/{PF} name enable_lm value false cmode runtime")
    assert r.rc == 1 and r.err.endswith("kernel answers: Device or resource busy\n")
    t.write("bus/pci/drivers/pds_vfio/unbind", VF1)
    await card.servers.settle()
    card.enable_lm(False)
    assert t.listdir("bus/auxiliary/devices") == []

    # LM off: bound over vfio-user, the VF offers no migration
    sock = await bind_pds_vfio(card, VF2)
    with pytest.raises(VfioUserError) as verr:
        await trio.to_thread.run_sync(feature)
    assert verr.value.errno == errno.ENOTTY


async def test_lm_devices_follow_new_vfs(card: Card) -> None:
    card.enable_lm()
    card.tree.write(f"{PF_DIR}/sriov_numvfs", "3")
    assert len(card.tree.listdir("bus/auxiliary/devices")) == 3
    card.tree.write(f"{PF_DIR}/sriov_numvfs", "0")
    assert card.tree.listdir("bus/auxiliary/devices") == []


async def test_pf_unbound_from_pds_core(card: Card) -> None:
    t = card.tree
    t.write(f"{PF_DIR}/sriov_numvfs", "2")
    card.enable_lm()
    t.write("bus/pci/drivers/pds_core/unbind", PF)
    assert not t.exists(f"bus/pci/devices/{VF1}")
    assert t.listdir("bus/auxiliary/devices") == []
    assert write_err(card, f"{PF_DIR}/sriov_numvfs", "1") == errno.ENOENT
    assert card.devlink_cmd("dev param show").out == ""
    t.write("bus/pci/drivers/pds_core/bind", PF)
    assert "value false" in card.devlink_cmd("dev param show").out  # driver state is new
    t.write(f"{PF_DIR}/sriov_numvfs", "1")
    assert t.exists(f"bus/pci/devices/{VF1}")


async def test_vf_namespace_backing(card: Card) -> None:
    card.tree.write(f"{PF_DIR}/sriov_numvfs", "1")
    backing = card.host.config.backing_dir / f"{VF1}.img"
    assert backing.stat().st_size == NS_SIZE
    assert backing.stat().st_blocks * 512 < NS_SIZE  # sparse


async def test_configurable_pf_address_offset_and_stride(tmp_path: Path) -> None:
    async with make_card(tmp_path, pf="0000:3b:00.0", vf_offset=8, vf_stride=2) as card:
        t = card.tree
        pf = "bus/pci/devices/0000:3b:00.0"
        assert (t.read(f"{pf}/sriov_offset"), t.read(f"{pf}/sriov_stride")) == ("8\n", "2\n")
        t.write(f"{pf}/sriov_numvfs", "3")
        # VF n = PF routing id + offset + n * stride
        assert [t.readlink(f"{pf}/virtfn{n}") for n in range(3)] == [
            "../0000:3b:01.0",
            "../0000:3b:01.2",
            "../0000:3b:01.4",
        ]
        assert t.realpath("class/pci_bus/0000:3b/device/0000:3b:01.2") == (
            "devices/pci0000:3b/0000:3b:01.2"
        )
        assert card.devlink_cmd("dev param show pci/0000:3b:00.0").rc == 0


@pytest.mark.parametrize(
    "config",
    [
        {"pf": "0000:60:1f.0", "total_vfs": 8},  # VFs would leave the bus
        {"pf": "60:00.0"},
        {"total_vfs": 0},
        {"ns_size": 1000},
        {"vf_stride": 0},
        {"doorbells": "polled"},
    ],
)
def test_bad_card_configs(tmp_path: Path, config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        PdsConfig(backing_dir=tmp_path, **config)


def test_size_and_number_parsing() -> None:
    assert [parse_size(s) for s in ("4096", "16M", "2g", "1GiB")] == [
        4096,
        16 << 20,
        2 << 30,
        1 << 30,
    ]
    with pytest.raises(ValueError):
        parse_size("lots")
    assert kstrtouint(b"+010\n", 16) == 8
    with pytest.raises(OSError) as info:
        kstrtouint(b"65536", 16)
    assert info.value.errno == errno.ERANGE
    assert [kstrtobool(s) for s in (b"1", b"Y", b"on", b"0", b"n", b"off")] == [True] * 3 + [
        False
    ] * 3


async def test_vf_address_taken_fails_cleanly(card: Card) -> None:
    # Another function already sits where VF 2 would go: enabling fails
    # with EEXIST, the VF made so far goes, and the other function stays.
    bus = card.host.bus
    other = PciFunction(Bdf.parse(VF2), PciDevice(PciIdentity(0x1AF4, 0x1000, class_code=0x020000)))
    bus.add_function(other)
    assert write_err(card, f"{PF_DIR}/sriov_numvfs", "2") == errno.EEXIST
    assert bus.functions.get(VF2) is other
    assert VF1 not in bus.functions
    assert card.tree.read(f"{PF_DIR}/sriov_numvfs") == "0\n"
    bus.remove_function(other)
    card.tree.write(f"{PF_DIR}/sriov_numvfs", "2")
    assert bus.function(VF2).physfn is bus.function(PF)
