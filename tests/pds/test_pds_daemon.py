"""The seed's setup script against a real mdevd, then the VF over vfio-user."""

from __future__ import annotations

import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mdevd_proc import Mdevd, mounted, sh
from pds_card import PF, VF1

from mdevcore.vfio_user.client import Client

pytestmark = pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse")

SETUP = Path(__file__).with_name("pds_setup.sh")
MDEVD = str(Path(sys.executable).with_name("mdevd"))


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Mdevd]:
    d = Mdevd(tmp_path, "--pds-ns-size", "16M", "--pds-total-vfs", "4", builtins=True)
    try:
        yield d
    finally:
        d.stop()


def devlink(d: Mdevd, args: str) -> subprocess.CompletedProcess[str]:
    return sh(f"{MDEVD} devlink --run-dir {d.run_dir} {args}")


def test_seed_setup_script_end_to_end(daemon: Mdevd) -> None:
    d = daemon
    assert f"mdevd: pds PF {PF}: VFs: echo N > {d.sysfs}/bus/pci/devices/{PF}/sriov_numvfs" in (
        d.banner
    )
    r = sh(f"SYS={d.sysfs} RUN={d.run_dir} MDEVD={MDEVD} bash {SETUP}")
    assert r.returncode == 0, r.stderr + d.stderr
    sock = d.run_dir / f"{VF1}.sock"
    assert sock.is_socket()
    vf = d.sysfs / "bus/pci/devices" / VF1
    assert (vf / "vfio_user/socket").read_text() == f"{sock}\n"
    assert (vf / "driver").readlink() == Path("../../../bus/pci/drivers/pds_vfio")
    assert [p.name for p in (d.sysfs / "bus/auxiliary/devices").iterdir()] == ["pds_core.LM.1"]
    with Client(sock) as c:
        c.negotiate()
        cfg = c.region_read(7, 0, 12)
    assert struct.unpack_from("<H", cfg)[0] == 0x1DD8
    assert cfg[9:12] == bytes([0x02, 0x08, 0x01])  # prog-if 02, subclass 08, class 01
    show = devlink(d, f"dev param show pci/{PF} name enable_lm")
    assert show.returncode == 0
    assert show.stdout.splitlines()[-1] == "      cmode runtime value true"
    # SIGTERM: sockets, control socket and mount all go
    assert d.stop() == 0
    assert not mounted(d.sysfs)
    assert sorted(p.name for p in d.run_dir.iterdir()) == ["pds"]


def test_devlink_cli_errors(daemon: Mdevd) -> None:
    r = devlink(daemon, f"dev param set pci/{PF} name enable_lm value yes cmode runtime")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == 'Value "yes" is not a number or not within range\n'
    r = devlink(daemon, f"dev param set pci/{PF} name lm value true cmode runtime")
    assert (r.returncode, r.stderr) == (1, "kernel answers: Invalid argument\n")
    r = devlink(daemon, f"dev param set pci/{PF} name enable_lm value true cmode permanent")
    assert (r.returncode, r.stderr) == (1, "Configuration mode not supported\n")


def test_devlink_without_a_daemon(tmp_path: Path) -> None:
    r = sh(f"{MDEVD} devlink --run-dir {tmp_path} dev param show")
    assert r.returncode == 1
    assert r.stderr.startswith(f"mdevd devlink: cannot reach mdevd at {tmp_path}/mdevd.ctl")


def test_pds_options_are_checked(tmp_path: Path) -> None:
    r = sh(f"{MDEVD} serve --run-dir {tmp_path}/run --pds-total-vfs 300")
    assert r.returncode == 1
    assert "pds: total VFs 300 is not within 1..255" in r.stderr
    assert not mounted(tmp_path / "run/sys")
