"""A real ``mdevd serve`` that finds the ifcvf plug-in, with TAP VFs in a network namespace.

Until the package is reinstalled with the ifcvf entry point, the shared
venv's metadata does not list it; the test then puts a one-entry-point
distribution on the daemon's PYTHONPATH (importlib.metadata finds any
``*.dist-info`` on sys.path), so discovery is the daemon's own.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from ifcvf_card import PF, VF0, VF1
from mdevd_proc import MDEVD, Mdevd, sh
from net_guest import NetGuest

from mdevcore.plugins import ENTRY_POINT_GROUP
from mdevcore.testing.netns import needs_netns, netns, run_in

pytestmark = [
    needs_netns,
    pytest.mark.skipif(not Path("/dev/fuse").exists(), reason="needs /dev/fuse"),
]

NEW_MAC = "52:54:00:12:34:56"


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not any(ep.name == "ifcvf" for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)):
        dist = tmp_path / "site" / "mdevcore_ifcvf_test-0.dist-info"
        dist.mkdir(parents=True)
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mdevcore-ifcvf-test\n")
        (dist / "entry_points.txt").write_text(
            f"[{ENTRY_POINT_GROUP}]\nifcvf = mdevcore.parents.ifcvf.plugin:PLUGIN\n"
        )
        path = os.environ.get("PYTHONPATH", "")
        monkeypatch.setenv("PYTHONPATH", f"{dist.parent}:{path}" if path else str(dist.parent))
    yield


def mdevd_ip(d: Mdevd, line: str) -> subprocess.CompletedProcess[str]:
    argv = [*MDEVD, "ip", "--run-dir", str(d.run_dir), *line.split()]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=60)


def test_mdevd_serves_ifcvf_vfs_with_taps_and_takes_ip_link(
    tmp_path: Path, plugin_path: None
) -> None:
    listing = subprocess.run([*MDEVD, "parents"], capture_output=True, text=True, check=True)
    assert "ifcvf  (hosted parent" in listing.stdout
    assert "--parent-opt ifcvf.netns=" in listing.stdout
    with netns("ifcd") as ns:
        opts = ["total_vfs=2", "backend=tap", "tap=ifcd%d", f"netns={ns}"]
        args = [a for o in opts for a in ("--parent-opt", f"ifcvf.{o}")]
        d = Mdevd(tmp_path, "--no-parent", "pds", *args, builtins=True)
        try:
            assert f"mdevd: ifcvf PF {PF} (netdev ifcvf0)" in d.banner
            pf = f"bus/pci/devices/{PF}"
            r = sh(
                f"echo 0 > {pf}/sriov_drivers_autoprobe && echo 2 > {pf}/sriov_numvfs && "
                f"echo ifcvf_vfio > bus/pci/devices/{VF0}/driver_override && "
                f"echo {VF0} > bus/pci/drivers/ifcvf_vfio/bind && "
                f"cat bus/pci/devices/{VF0}/vfio_user/qemu_device",
                d.sysfs,
            )
            assert r.returncode == 0, r.stderr + d.stderr
            sock = d.run_dir / f"{VF0}.sock"
            assert str(sock) in r.stdout and sock.is_socket()
            assert not (d.run_dir / f"{VF1}.sock").exists()
            for tap in ("ifcd0", "ifcd1"):  # opened by the daemon, in the namespace
                assert run_in(ns, "ip", "link", "show", tap).returncode == 0
            ip = mdevd_ip(d, f"link set ifcvf0 vf 0 mac {NEW_MAC}")
            assert (ip.returncode, ip.stderr) == (0, ""), d.stderr
            guest = NetGuest(str(sock))
            try:
                assert guest.mac() == bytes.fromhex(NEW_MAC.replace(":", ""))
            finally:
                guest.close()
            show = mdevd_ip(d, f"link show {PF}")
            assert f"vf 0     link/ether {NEW_MAC} brd" in show.stdout, show.stderr
        finally:
            assert d.stop() == 0
        assert not sock.exists()
        # the daemon's TAPs went with it
        assert run_in(ns, "ip", "link", "show", "ifcd0", check=False).returncode != 0
