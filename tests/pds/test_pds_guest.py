"""The seed's flow end to end: mdevd, the setup script, then a guest's nvme driver on the VF.

The VF QEMU attaches is the one the script bound to pds_vfio; its
``-device`` argument is read from the VF's sysfs directory, as a user would.
"""

from __future__ import annotations

import hashlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mdevd_proc import Mdevd, sh
from pds_card import VF1

from mdevcore.tools.lab import Lab

pytestmark = pytest.mark.qemu

SETUP = Path(__file__).with_name("pds_setup.sh")
MDEVD = str(Path(sys.executable).with_name("mdevd"))
NS_MIB = 64
PATTERN_MIB = 4
OFFSET_MIB = 17

GUEST = f"""
set -e
modprobe nvme
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "sectors $(cat /sys/block/nvme0n1/size)"
echo "vendor $(cat /sys/class/nvme/nvme0/device/vendor)"
head -c {PATTERN_MIB << 20} /dev/urandom > /tmp/pattern
echo "pattern $(sha256sum < /tmp/pattern | cut -d' ' -f1)"
dd if=/tmp/pattern of=/dev/nvme0n1 bs=1M seek={OFFSET_MIB} oflag=direct conv=fsync 2>/dev/null
sum=$(dd if=/dev/nvme0n1 bs=1M skip={OFFSET_MIB} count={PATTERN_MIB} iflag=direct 2>/dev/null \\
  | sha256sum)
echo "read ${{sum%% *}}"
"""


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Mdevd]:
    d = Mdevd(tmp_path, "--pds-ns-size", f"{NS_MIB}M", builtins=True)
    try:
        yield d
    finally:
        d.stop()


def test_guest_uses_the_vf_the_seed_script_bound(daemon: Mdevd) -> None:
    lab = Lab.ensure()
    d = daemon
    r = sh(f"SYS={d.sysfs} RUN={d.run_dir} MDEVD={MDEVD} bash {SETUP}")
    assert r.returncode == 0, r.stderr
    device = (d.sysfs / "bus/pci/devices" / VF1 / "vfio_user/qemu_device").read_text().strip()
    result = lab.boot(GUEST, devices=[device], timeout=600)
    out = result.output
    assert result.rc == 0, out + result.kernel_log
    assert f"sectors {NS_MIB << 11}" in out
    assert "vendor 0x1dd8" in out
    pattern = re.search(r"^pattern ([0-9a-f]{64})$", out, re.M)
    assert pattern is not None, out
    assert f"read {pattern.group(1)}" in out
    backing = d.run_dir / "pds" / f"{VF1}.img"
    with open(backing, "rb") as f:
        f.seek(OFFSET_MIB << 20)
        assert hashlib.sha256(f.read(PATTERN_MIB << 20)).hexdigest() == pattern.group(1)
