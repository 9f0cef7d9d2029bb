"""--persist of the PCI state: a card set up, torn down (or crashed), and restored."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import trio
from pds_card import PF, PF_DIR, VF1, VF2, Card, make_card

from mdevcore.daemon.pci_persist import PciPersist
from mdevcore.vfio_user.client import Client

BUS_DEV = "class/pci_bus/0000:60/device"


def vendor_id(sock: Path) -> int:
    """A vfio-user client attaches and reads the config space (from a thread)."""
    with Client(sock) as c:
        c.negotiate()
        return int.from_bytes(c.region_read(7, 0, 2), "little")


def persist_for(card: Card, path: Path) -> PciPersist:
    return PciPersist(card.host.bus, card.devlink, path)


def state_of(card: Card) -> dict[str, object]:
    """What an administrator reads back from sysfs and devlink."""
    tree = card.tree
    out: dict[str, object] = {
        "numvfs": tree.read(f"{PF_DIR}/sriov_numvfs"),
        "autoprobe": tree.read(f"{PF_DIR}/sriov_drivers_autoprobe"),
        "lm": card.devlink_cmd(f"dev param show pci/{PF} name enable_lm").out.splitlines()[-1],
        "aux": sorted(card.host.bus.aux_devices),
        "aux_drivers": sorted(str(a.driver) for a in card.host.bus.aux_devices.values()),
    }
    for vf in (VF1, VF2):
        fn = card.host.bus.functions.get(vf)
        out[vf] = None if fn is None else (fn.driver_override, fn.driver and fn.driver.name)
    return out


async def set_up(card: Card) -> None:
    """The seed's setup script, and a second VF left to the host's nvme driver."""
    tree = card.tree
    card.enable_lm()
    tree.write(f"{BUS_DEV}/{PF}/sriov_numvfs", "2")  # autoprobe on: nvme takes both
    tree.write("bus/pci/drivers/nvme/unbind", VF1)
    tree.write(f"{BUS_DEV}/{PF}/sriov_drivers_autoprobe", "0")
    tree.write(f"{BUS_DEV}/{VF1}/driver_override", "pds_vfio")
    tree.write("bus/pci/drivers/pds_vfio/bind", VF1)
    await card.servers.settle()


async def test_sriov_state_comes_back_after_a_restart(tmp_path: Path) -> None:
    record = tmp_path / "pci.json"
    async with make_card(tmp_path) as first:
        persist = persist_for(first, record)
        assert persist.restore() == 0  # nothing recorded yet
        persist.start()
        await set_up(first)
        before = state_of(first)
        assert before[VF1] == ("pds_vfio", "pds_vfio") and before[VF2] == (None, "nvme")
        assert before["autoprobe"] == "0\n" and before["aux_drivers"] == ["None", "pds_vfio.lm"]
        persist.stop()  # the daemon stops following before tearing the card down
    saved = json.loads(record.read_text())["functions"]
    assert saved[PF]["sriov"] == {"numvfs": 2, "drivers_autoprobe": False}
    assert saved[PF]["devlink"] == {"enable_lm": True}
    sock = tmp_path / "run" / f"{VF1}.sock"
    # a crash leaves the socket file with nothing listening
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))
    stale.close()
    with pytest.raises(ConnectionRefusedError):
        Client(sock).close()
    async with make_card(tmp_path) as second:
        persist = persist_for(second, record)
        assert persist.restore() == 3
        persist.start()
        await second.servers.settle()
        assert state_of(second) == before
        assert second.tree.read(f"{BUS_DEV}/{VF1}/vfio_user/socket") == f"{sock}\n"
        assert await trio.to_thread.run_sync(vendor_id, sock) == 0x1DD8  # served again
        # changes after the restore are recorded again
        second.tree.write(f"{BUS_DEV}/{PF}/sriov_drivers_autoprobe", "1")
        assert json.loads(record.read_text())["functions"][PF]["sriov"]["drivers_autoprobe"]
        persist.stop()


async def test_every_change_is_recorded_at_once(tmp_path: Path) -> None:
    """A crash can come at any time: the file follows each write, not the shutdown."""
    record = tmp_path / "pci.json"

    def saved() -> dict[str, dict[str, object]]:
        functions: dict[str, dict[str, object]] = json.loads(record.read_text())["functions"]
        return functions

    async with make_card(tmp_path) as card:
        persist = persist_for(card, record)
        persist.start()
        assert saved()[PF]["devlink"] == {"enable_lm": False}
        card.enable_lm()
        assert saved()[PF]["devlink"] == {"enable_lm": True}  # no VFs: only the parameter moved
        card.tree.write(f"{BUS_DEV}/{PF}/sriov_drivers_autoprobe", "0")
        assert saved()[PF]["sriov"] == {"numvfs": 0, "drivers_autoprobe": False}
        card.tree.write(f"{BUS_DEV}/{PF}/sriov_numvfs", "1")
        assert saved()[VF1] == {"driver": None, "driver_override": None}
        card.tree.write(f"{BUS_DEV}/{VF1}/driver_override", "pds_vfio")
        assert saved()[VF1]["driver_override"] == "pds_vfio"
        card.tree.write("bus/pci/drivers/pds_vfio/bind", VF1)
        await card.servers.settle()
        assert saved()[VF1]["driver"] == "pds_vfio"
        persist.stop()
    assert saved()[VF1]["driver"] == "pds_vfio"  # teardown did not overwrite it


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"version": 99, "functions": {}}',
        '{"version": 1, "functions": {"0000:60:00.0": {"driver": 5, "sriov": {"numvfs": "x"}}}}',
        '{"version": 1, "functions": {"0000:60:00.0": {"sriov": {"numvfs": 200}}}}',  # > total
        '{"version": 1, "functions": {"0000:61:00.0": {"driver": "pds_core"}}}',  # no such PF
    ],
)
async def test_bad_records_restore_nothing_and_break_nothing(tmp_path: Path, content: str) -> None:
    record = tmp_path / "pci.json"
    record.write_text(content)
    async with make_card(tmp_path) as card:
        persist = persist_for(card, record)
        persist.restore()
        persist.start()
        assert card.tree.read(f"{PF_DIR}/sriov_numvfs") == "0\n"
        assert card.host.bus.function(PF).driver is not None  # pds_core still has the PF
        # the card still works, and the record is rewritten from what is there
        card.tree.write(f"{BUS_DEV}/{PF}/sriov_numvfs", "1")
        assert json.loads(record.read_text())["functions"][PF]["sriov"]["numvfs"] == 1
        persist.stop()


async def test_a_refused_setting_is_skipped_and_the_rest_restored(tmp_path: Path) -> None:
    """VF1 recorded on a driver that no longer exists: VF2's binding still comes back."""
    record = tmp_path / "pci.json"
    functions = {
        PF: {"driver": "pds_core", "driver_override": None,
             "sriov": {"numvfs": 2, "drivers_autoprobe": True}, "devlink": {"enable_lm": True}},
        VF1: {"driver": "gone_driver", "driver_override": "gone_driver"},
        VF2: {"driver": "pds_vfio", "driver_override": "pds_vfio"},
    }  # fmt: skip
    record.write_text(json.dumps({"version": 1, "functions": functions}))
    async with make_card(tmp_path) as card:
        persist = persist_for(card, record)
        persist.restore()
        await card.servers.settle()
        bus = card.host.bus
        assert bus.function(VF1).driver is None  # its override keeps nvme off it
        assert bus.function(VF1).driver_override == "gone_driver"
        vf2 = bus.function(VF2)
        assert vf2.driver is not None and vf2.driver.name == "pds_vfio"
        assert (tmp_path / "run" / f"{VF2}.sock").is_socket()
        r = card.devlink_cmd(f"dev param set pci/{PF} name enable_lm value false cmode runtime")
        # enable_lm was restored before the binding (which then made it busy)
        assert (r.rc, r.err.startswith("Error: VF")) == (1, True), r.err
