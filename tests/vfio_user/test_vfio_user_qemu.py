"""QEMU >= 10.1 (vfio-user-pci) against DeviceServer, through the lab.

One guest boot serves the Gadget PciDevice from this process: the guest sees
its identity and capabilities, reaches BAR0 through trapped accesses and
BAR2's window through QEMU's mmap of our fd, and makes the device DMA from
the BIOS ROM (QEMU maps it without an fd: DMA_READ messages on the one
socket) into guest RAM (an fd-backed mapping).  ~10-15 s under TCG.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import pytest
import trio
from vfio_user_gadget import REG_DONE, REG_DOORBELL, REG_DST, REG_ERRORS, REG_LEN, REG_SRC, Gadget

from mdevcore.tools.lab import Lab
from mdevcore.vfio_user.server import DeviceServer

pytestmark = pytest.mark.qemu

# Guest RAM below 1 MiB: Linux reserves it (so the copy clobbers nothing),
# QEMU maps it with an fd, and STRICT_DEVMEM still lets devmem read it.
DST = 0x90000

SCRIPT = f"""
for d in /sys/bus/pci/devices/*; do
  grep -q 0x0100 $d/device && grep -q 0x1b36 $d/vendor && D=$d
done
echo "dev=$D"
lspci -nn -vv -s "${{D##*/}}" | grep -E "1b36|Capabilities"
echo 1 > $D/enable
setpci -s "${{D##*/}}" COMMAND=0x0006  # memory + bus master: QEMU DMA needs it
B0=$(sed -n 1p $D/resource | cut -d" " -f1)
B2=$(sed -n 3p $D/resource | cut -d" " -f1)
echo "bar0=$(devmem $((B0 + 0x10)) 32)"
devmem $((B0 + 0x20)) 32 0x0badcafe
devmem $((B2 + 0x1000)) 32 0x600dd00d
echo "bar2window=$(devmem $((B2 + 0x1000)) 32)"
devmem $((B0 + {REG_SRC})) 64 0xfffffff0
devmem $((B0 + {REG_DST})) 64 {DST}
devmem $((B0 + {REG_LEN})) 32 16
devmem $((B0 + {REG_DOORBELL})) 32 1
i=0
while [ "$(devmem $((B0 + {REG_DONE})) 32)" != 0x00000001 ] && [ $i -lt 1000 ]; do
  i=$((i + 1))
done
echo "done=$(devmem $((B0 + {REG_DONE})) 32) errors=$(devmem $((B0 + {REG_ERRORS})) 32)"
words() {{ for a in "$@"; do printf "%s " $(devmem $a 32); done; }}
echo "rom=$(words 0xfffffff0 0xfffffff4 0xfffffff8 0xfffffffc)"
echo "ram=$(words {DST} {DST + 4} {DST + 8} {DST + 12})"
"""


@pytest.fixture(scope="session")
def lab() -> Lab:
    return Lab.ensure()


def field(output: str, name: str) -> str:
    match = re.search(rf"^{name}=(.*)$", output, re.M)
    assert match, f"{name} missing from guest output:\n{output}"
    return match.group(1).strip()


async def test_qemu_guest_uses_the_device(lab: Lab) -> None:
    sockdir = tempfile.mkdtemp(prefix="vu-qemu-")
    path = os.path.join(sockdir, "gadget.sock")
    device = Gadget()
    spec = json.dumps({"driver": "vfio-user-pci", "socket": {"path": path, "type": "unix"}})
    try:
        async with trio.open_nursery() as nursery:
            server = DeviceServer(device, path, name="gadget")
            await nursery.start(server.serve)
            result = await lab.aboot(SCRIPT, devices=[spec], timeout=240)
            nursery.cancel_scope.cancel()
        window = bytes(device.shared[0x1000:0x1004])
    finally:
        device.close()
        shutil.rmtree(sockdir, ignore_errors=True)
    out = result.output
    assert result.rc == 0, result.console
    assert "[1b36:0100]" in out
    for cap in ("Power Management", "MSI:", "Express", "MSI-X"):
        assert cap in out, out
    assert field(out, "bar0") == "0xB5B5B5B5"  # 0xA5 ^ 0x10, from bar_read
    assert (0, 0x20, (0x0BADCAFE).to_bytes(4, "little")) in device.writes
    assert field(out, "bar2window") == "0x600DD00D"
    assert window == (0x600DD00D).to_bytes(4, "little")
    assert field(out, "done") == "0x00000001 errors=0x00000000"
    # The ROM bytes the guest reads equal what the device copied by DMA.
    assert field(out, "ram") == field(out, "rom")
    assert device.resets >= 1  # QEMU resets the device when it starts
