"""The IFCVF card in the daemon's PCI bus: SR-IOV, binding, vfio-user, the plug-in."""

from __future__ import annotations

import errno
import struct
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import trio
from ifcvf_card import PF, PF_DIR, VF0, VF1, Card, make_card
from net_guest import RX0, NetGuest, frame

from mdevcore import plugins
from mdevcore.parents.ifcvf.plugin import PLUGIN
from mdevcore.vfio_user.client import Client

BUS_DEV = "class/pci_bus/0000:61/device"
ROOT = Path(__file__).resolve().parents[2]


async def test_pf_attributes_and_numvfs_rules(card: Card) -> None:
    t = card.tree
    expect = {
        "vendor": "0x1af4\n",
        "device": "0x10ff\n",
        "class": "0x020000\n",
        "subsystem_vendor": "0x8086\n",
        "subsystem_device": "0x001a\n",
        "sriov_totalvfs": "4\n",
        "sriov_numvfs": "0\n",
        "sriov_vf_device": "1041\n",
        "sriov_drivers_autoprobe": "1\n",
    }
    for name, value in expect.items():
        assert t.read(f"{PF_DIR}/{name}") == value, name
    assert t.realpath(f"{BUS_DEV}/{PF}") == f"devices/pci0000:61/{PF}"
    assert t.readlink(f"{PF_DIR}/driver") == "../../../bus/pci/drivers/ifcvf"
    numvfs = f"{PF_DIR}/sriov_numvfs"
    assert card.write_err(numvfs, "5\n") == errno.ERANGE
    for bad in ("abc\n", "-1\n", "", "0x\n"):
        assert card.write_err(numvfs, bad) == errno.EINVAL, bad
    t.write(numvfs, "2\n")
    assert card.write_err(numvfs, "3\n") == errno.EBUSY
    assert t.read(numvfs) == "2\n"
    assert t.read(f"bus/pci/devices/{VF1}/vendor") == "0x1af4\n"
    assert t.read(f"bus/pci/devices/{VF1}/device") == "0x1041\n"
    assert t.read(f"bus/pci/devices/{VF1}/subsystem_device") == "0x001a\n"
    assert t.readlink(f"bus/pci/devices/{VF1}/physfn") == f"../{PF}"
    t.write(numvfs, "0\n")
    assert not t.exists(f"bus/pci/devices/{VF0}")
    # without its PF driver, nothing can configure SR-IOV
    t.write("bus/pci/drivers/ifcvf/unbind", PF)
    assert card.write_err(numvfs, "1\n") == errno.ENOENT
    t.write("bus/pci/drivers/ifcvf/bind", PF)
    t.write(numvfs, "1\n")


async def test_autoprobe_gives_the_vfs_to_the_host_virtio_driver(card: Card) -> None:
    t = card.tree
    t.write(f"{PF_DIR}/sriov_numvfs", "2")
    for vf in (VF0, VF1):
        assert t.readlink(f"bus/pci/devices/{vf}/driver") == "../../../bus/pci/drivers/virtio-pci"
        assert not t.exists(f"bus/pci/devices/{vf}/vfio_user")
    await card.servers.settle()
    assert not any(p.suffix == ".sock" for p in card.run_dir.iterdir())
    # the PF is no virtio device: virtio-pci refuses it
    t.write("bus/pci/drivers/ifcvf/unbind", PF)  # (removes the VFs first)
    assert card.write_err("bus/pci/drivers/virtio-pci/bind", PF) == errno.ENODEV
    assert not t.exists(f"bus/pci/devices/{VF0}")


def read_identity(path: str) -> tuple[int, int, int]:
    with Client(path) as c:
        c.negotiate()
        cfg = c.region_read(7, 0, 0x30)
        vendor, device = struct.unpack_from("<HH", cfg)
        return vendor, device, struct.unpack_from("<H", cfg, 0x2E)[0]


async def test_ifcvf_vfio_serves_a_bound_vf_and_unbind_stops(card: Card) -> None:
    t = card.tree
    t.write(f"{PF_DIR}/sriov_drivers_autoprobe", "0")
    t.write(f"{PF_DIR}/sriov_numvfs", "2")
    vf = f"bus/pci/devices/{VF0}"
    assert not t.exists(f"{vf}/driver")
    # override-only: no bind without driver_override
    assert card.write_err("bus/pci/drivers/ifcvf_vfio/bind", VF0) == errno.ENODEV
    sock = await card.bind_vfio(VF0)
    assert sock == str(card.run_dir / f"{VF0}.sock")
    qemu = t.read(f"{vf}/vfio_user/qemu_device")
    assert '"driver":"vfio-user-pci"' in qemu and sock in qemu
    assert t.readlink(f"{vf}/driver") == "../../../bus/pci/drivers/ifcvf_vfio"
    assert await trio.to_thread.run_sync(read_identity, sock) == (0x1AF4, 0x1041, 0x001A)
    assert card.write_err("bus/pci/drivers/ifcvf_vfio/bind", VF0) == errno.EBUSY

    client = Client(sock, timeout=10)
    try:
        await trio.to_thread.run_sync(client.negotiate)
        t.write("bus/pci/drivers/ifcvf_vfio/unbind", VF0)
        await card.servers.settle()
        assert not (card.run_dir / f"{VF0}.sock").exists()
        assert not t.exists(f"{vf}/vfio_user")
        with pytest.raises(OSError):
            await trio.to_thread.run_sync(client.negotiate)
    finally:
        client.close()
    # another VF, served beside; SR-IOV off stops serving it
    t.write(f"bus/pci/devices/{VF1}/driver_override", "ifcvf_vfio")
    t.write("bus/pci/drivers/ifcvf_vfio/bind", VF1)
    await card.servers.settle()
    assert (card.run_dir / f"{VF1}.sock").exists()
    t.write(f"{PF_DIR}/sriov_numvfs", "0")  # SR-IOV off stops serving
    await card.servers.settle()
    assert not any(p.suffix == ".sock" for p in card.run_dir.iterdir())


async def test_loopback_backend_cables_vf_pairs(tmp_path: Path) -> None:
    async with make_card(tmp_path, total_vfs=3) as card:
        socks = await card.vfs_for_vfio(3)
        pf = card.host.pf
        assert pf is not None
        vfs = [fn.device for fn in pf.sriov.vfs] if pf.sriov else []
        macs = [vf.net.mac for vf in vfs]  # type: ignore[attr-defined]
        assert macs == [bytes.fromhex(f"021fc0610{n}") for n in ("001", "002", "003")]

        def session() -> tuple[list[tuple[bytes, int]], int]:
            guests = [NetGuest(s) for s in socks]
            try:
                for g in guests:
                    g.bring_up()
                    g.post_rx(RX0, 4, 2048)
                hello = frame(macs[1], macs[0], b"VF 0 to VF 1")
                guests[0].send(hello)
                got = guests[1].receive(RX0, 1)
                guests[2].send(frame(macs[0], macs[2], b"to nobody"))  # VF 2 has no partner
                return got, guests[2].reap_tx()
            finally:
                for g in guests:
                    g.close()

        with trio.fail_after(30):
            got, reaped = await trio.to_thread.run_sync(session)
        assert got == [(frame(macs[1], macs[0], b"VF 0 to VF 1"), 1)]
        assert reaped == 1  # the frame was taken (and dropped by the wire)
        assert vfs[2].backend.stats.tx_dropped == 1  # type: ignore[attr-defined]


def test_plugin_is_discovered_and_takes_its_options(tmp_path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    value = project["entry-points"][plugins.ENTRY_POINT_GROUP]["ifcvf"]
    assert value == "mdevcore.parents.ifcvf.plugin:PLUGIN"
    ep = metadata.EntryPoint(name="ifcvf", value=value, group=plugins.ENTRY_POINT_GROUP)
    (found,) = plugins.discover([ep])
    assert found.plugin is PLUGIN and found.plugin.kind == "hosted"
    opts = plugins.parse_options(
        [
            "ifcvf.pf=0000:62:00.0",
            "ifcvf.total_vfs=2",
            "ifcvf.macs=52:54:00:12:34:56",
            "ifcvf.netdev=ifc9",
            "ifcvf.backend=tap",
            "ifcvf.tap=vf%d",
            "ifcvf.netns=lab",
        ],
        [PLUGIN],
    )
    assert PLUGIN.host is not None
    host = PLUGIN.host(opts["ifcvf"], tmp_path)
    c = host.config  # type: ignore[attr-defined]
    assert (c.pf, c.total_vfs, c.netdev, c.backend, c.netns) == (
        "0000:62:00.0",
        2,
        "ifc9",
        "tap",
        "lab",
    )
    assert c.macs == (bytes.fromhex("525400123456"),) and c.tap_name(1) == "vf1"
    assert c.default_mac(1) == bytes.fromhex("021fc0620002")
    with pytest.raises(OSError) as info:
        plugins.parse_options(["ifcvf.colour=blue"], [PLUGIN])
    assert info.value.errno == errno.EINVAL
    for bad in (
        {"backend": "carrier-pigeon"},
        {"total_vfs": "0"},
        {"macs": "01:00:5e:00:00:01"},  # multicast
        {"macs": "52:54:00:12:34"},
        {"macs": ",".join(["52:54:00:12:34:56"] * 5)},  # more MACs than VFs
        {"pf": "61:00.0"},
        {"backend": "tap", "tap": "a-name-far-too-long%d"},
        {"backend": "tap", "netns": "../etc"},
        {"netdev": "bad/name"},
    ):
        with pytest.raises(OSError) as info:
            PLUGIN.host(bad, tmp_path)
        assert info.value.errno == errno.EINVAL, bad
