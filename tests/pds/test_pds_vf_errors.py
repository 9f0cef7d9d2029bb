"""A pds VF bound to pds_vfio shows its vfio-user error counts in sysfs and status."""

from __future__ import annotations

import errno

import pytest
import trio
from pds_card import PF_DIR, VF1, Card

from mdevcore.vfio_user.client import Client, VfioUserError


def bad_reads(path: str, n: int) -> None:
    with Client(path) as client:
        client.negotiate()
        for _ in range(n):
            with pytest.raises(VfioUserError) as info:
                client.region_read(99, 0, 4)
            assert info.value.errno == errno.EINVAL


async def test_vf_errors_attribute_and_status(card: Card) -> None:
    t = card.tree
    t.write(f"{PF_DIR}/sriov_drivers_autoprobe", "0")
    t.write(f"{PF_DIR}/sriov_numvfs", "1")
    t.write(f"bus/pci/devices/{VF1}/driver_override", "pds_vfio\n")
    t.write("bus/pci/drivers/pds_vfio/bind", f"{VF1}\n")
    await card.servers.settle()
    errors = f"bus/pci/devices/{VF1}/vfio_user/errors"
    assert t.read(errors) == "total 0\n"
    sock = t.read(f"bus/pci/devices/{VF1}/vfio_user/socket").strip()
    await trio.to_thread.run_sync(bad_reads, sock, 3)
    assert t.read(errors) == "EINVAL REGION_READ 3\ntotal 3\n"  # read each time, not at bind
    (vf,) = card.servers.status()
    assert vf["name"] == VF1 and vf["socket"] == sock and vf["state"] == "serving"
    assert vf["requests"] == 4 and vf["errors"] == {"EINVAL REGION_READ": 3}
