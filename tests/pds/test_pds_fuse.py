"""The pds card through a real FUSE mount, written by shells: the errors users see."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from pds_card import PF, VF1, Card

from mdevcore.daemon.control import ControlServer
from mdevcore.daemon.devlink import control_path
from mdevcore.sysfs.fuse import is_mounted, mounted

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")

SETUP = Path(__file__).with_name("pds_setup.sh")
MDEVD = str(Path(sys.executable).with_name("mdevd"))  # the console script


class Mounted:
    def __init__(self, card: Card, root: Path) -> None:
        self.card = card
        self.root = root

    async def sh(self, script: str, **env: str) -> subprocess.CompletedProcess[bytes]:
        return await trio.run_process(
            ["bash", "-c", script],
            cwd=self.root,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={"PATH": "/usr/bin:/bin", **env},
        )

    async def err(self, script: str) -> str:
        r = await self.sh(script)
        assert r.returncode != 0, script
        return r.stderr.decode()

    async def out(self, script: str) -> str:
        r = await self.sh(script)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout.decode()


@pytest.fixture
async def mnt(card: Card, tmp_path: Path) -> AsyncIterator[Mounted]:
    root = tmp_path / "sys"
    root.mkdir()
    async with trio.open_nursery() as nursery:
        ctl = ControlServer(control_path(card.run_dir), card.devlink, card.servers.settle)
        await nursery.start(ctl.serve)
        async with mounted(card.tree, root, settle=card.servers.settle):
            yield Mounted(card, root)
        nursery.cancel_scope.cancel()
    assert not is_mounted(root)
    assert not control_path(card.run_dir).exists()


async def test_sriov_errors_from_a_shell(mnt: Mounted) -> None:
    pf = f"bus/pci/devices/{PF}"
    assert await mnt.out(f"cat {pf}/sriov_totalvfs {pf}/sriov_vf_device {pf}/vendor") == (
        "4\n1006\n0x1dd8\n"
    )
    assert "write error: Numerical result out of range" in await mnt.err(
        f"echo 5 > {pf}/sriov_numvfs"
    )
    assert "write error: Invalid argument" in await mnt.err(f"echo abc > {pf}/sriov_numvfs")
    await mnt.out(f"echo 2 > {pf}/sriov_numvfs")
    assert "write error: Device or resource busy" in await mnt.err(f"echo 3 > {pf}/sriov_numvfs")
    await mnt.out(f"echo 2 > {pf}/sriov_numvfs")  # same value: fine
    assert await mnt.out(f"cat {pf}/sriov_numvfs; readlink {pf}/virtfn1") == "2\n../0000:60:00.2\n"
    assert (
        await mnt.out(f"readlink -f bus/pci/devices/{VF1}/physfn")
        == f"{mnt.root}/devices/pci0000:60/{PF}\n"
    )
    assert "write error: No such device" in await mnt.err(
        f"echo {VF1} > bus/pci/drivers/pds_vfio/bind"
    )
    assert "write error: Device or resource busy" in await mnt.err(
        f"echo pds_vfio > bus/pci/devices/{VF1}/driver_override; "
        f"echo {VF1} > bus/pci/drivers/pds_vfio/bind"
    )  # still bound to nvme (autoprobe was on)
    await mnt.out(
        f"echo {VF1} > bus/pci/drivers/nvme/unbind; echo {VF1} > bus/pci/drivers/pds_vfio/bind"
    )
    sock = (await mnt.out(f"cat bus/pci/devices/{VF1}/vfio_user/socket")).strip()
    assert Path(sock).is_socket()  # the write returned after the server was listening
    await mnt.out(f"echo 0 > {pf}/sriov_numvfs")
    assert not Path(sock).exists()
    assert await mnt.out("ls bus/pci/devices") == f"{PF}\n"


async def test_seed_setup_script_in_process(mnt: Mounted) -> None:
    run = str(mnt.card.run_dir)
    r = await mnt.sh(
        f"bash {SETUP}", SYS=str(mnt.root), RUN=run, MDEVD=MDEVD, PYTHONPATH=str(Path.cwd())
    )
    assert r.returncode == 0, r.stderr.decode()
    sock = mnt.card.run_dir / f"{VF1}.sock"
    assert sock.is_socket()
    assert await mnt.out("ls bus/auxiliary/devices bus/auxiliary/drivers/pds_vfio.lm") == (
        "bus/auxiliary/devices:\npds_core.LM.1\n\nbus/auxiliary/drivers/pds_vfio.lm:\npds_core.LM.1\n"
    )
    assert "value true" in await mnt.out(f"{MDEVD} devlink --run-dir {run} dev param show")
