"""The kernel doc's "Using the Sample Code" steps, with vfio-user for the kernel.

Everything a user does from a shell: ``mdevd serve``, ``echo $UUID > create``
on the mirror, the QEMU ``-device`` line the daemon gives for the device
(used verbatim), a real Linux guest whose 8250_pci driver loops bytes
through every port, then ``echo 1 > remove``; and the same through the real
mdevctl (start/stop).
"""

from __future__ import annotations

import re
import sys
import uuid
from pathlib import Path

import pytest
from mdevd_proc import Mdevd, sh

from mdevcore.tools.lab import Lab

pytestmark = pytest.mark.qemu

SCRIPT = (Path(__file__).parents[2] / "samples" / "mtty" / "guest_loopback.sh").read_text()
MDEVD = Path(sys.executable).with_name("mdevd")  # the venv's console script
TYPES = "devices/virtual/mtty/mtty/mdev_supported_types"


def run_guest(lab: Lab, device_line: str, nr_ports: int) -> str:
    result = lab.boot(SCRIPT, devices=[device_line], timeout=240)
    print(result.output)
    assert result.rc == 0, result.console[-4000:]
    assert "[4348:3253]" in result.output
    ports = re.findall(r"ttyS\d+ at I/O 0x[0-9a-f]+ .* is a 16550A", result.output)
    assert len(ports) == nr_ports
    assert len(re.findall(r"loopback /dev/ttyS\d+: \d+ bytes ok", result.output)) == nr_ports
    return result.output


def test_shell_flow_create_attach_guest_remove(lab: Lab, tmp_path: Path) -> None:
    d = Mdevd(tmp_path, builtins=True)
    try:
        sys_ = d.sysfs
        avail = sh(f"cat {sys_}/{TYPES}/mtty-2/available_instances").stdout
        u = str(uuid.uuid4())
        r = sh(f"echo {u} > {sys_}/{TYPES}/mtty-2/create")
        assert r.returncode == 0, r.stderr
        assert int(sh(f"cat {sys_}/{TYPES}/mtty-2/available_instances").stdout) == int(avail) - 1
        line = sh(f"cat {sys_}/bus/mdev/devices/{u}/vfio_user/qemu_device").stdout.strip()
        sock = d.run_dir / f"{u}.sock"
        assert line == f'{{"driver":"vfio-user-pci","socket":{{"path":"{sock}","type":"unix"}}}}'
        assert sock.is_socket()

        run_guest(lab, line, nr_ports=2)

        r = sh(f"echo 1 > {sys_}/bus/mdev/devices/{u}/remove")
        assert r.returncode == 0, r.stderr
        assert not (sys_ / "bus/mdev/devices" / u).exists()
        assert not sock.exists()
        assert sh(f"cat {sys_}/{TYPES}/mtty-2/available_instances").stdout == avail
    finally:
        assert d.stop() == 0, d.stderr


def test_mdevctl_flow_start_attach_guest_stop(lab: Lab, tmp_path: Path) -> None:
    d = Mdevd(tmp_path, builtins=True)
    mdevctl = f"{MDEVD} mdevctl --sysfs {d.sysfs} --run-dir {d.run_dir}"
    try:
        r = sh(f"{mdevctl} start -p mtty -t mtty-1")
        assert r.returncode == 0, r.stderr
        u = r.stdout.strip()
        uuid.UUID(u)
        listing = sh(f"{mdevctl} list").stdout
        assert f"{u} mtty mtty-1 manual" in listing
        line = (d.sysfs / "bus/mdev/devices" / u / "vfio_user/qemu_device").read_text().strip()

        run_guest(lab, line, nr_ports=1)

        r = sh(f"{mdevctl} stop -u {u}")
        assert r.returncode == 0, r.stderr
        assert sh(f"{mdevctl} list").stdout.strip() == ""
        assert not (d.run_dir / f"{u}.sock").exists()
    finally:
        assert d.stop() == 0, d.stderr
