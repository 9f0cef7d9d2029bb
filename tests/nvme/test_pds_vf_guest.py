"""A real Linux guest's nvme driver on the pds VF, through QEMU and vfio-user.

The VF is served by DeviceServer in this test's trio run; the lab boots a
TCG guest whose script binds the driver, writes a 64 MiB pseudo-random
pattern at several offsets with O_DIRECT, reads it back, runs a fio verify
job, resets the function and reads again.  The host then checks the backing
file holds the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import trio

from mdevcore.parents.pds.vf import DoorbellMode, PdsNvmeVf, VfConfig
from mdevcore.tools.lab import Lab
from mdevcore.vfio_user.server import DeviceServer

pytestmark = pytest.mark.qemu

NS_MIB = 1024
PATTERN_MIB = 64
OFFSETS_MIB = (0, 333, NS_MIB - PATTERN_MIB)

GUEST_SCRIPT = f"""
set -e
modprobe nvme
i=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
echo "sectors $(cat /sys/block/nvme0n1/size)"
echo "model $(cat /sys/class/nvme/nvme0/model)"
head -c {PATTERN_MIB << 20} /dev/urandom > /tmp/pattern
echo "pattern $(sha256sum < /tmp/pattern | cut -d' ' -f1)"
for off in {" ".join(map(str, OFFSETS_MIB))}; do
  dd if=/tmp/pattern of=/dev/nvme0n1 bs=1M seek=$off oflag=direct conv=fsync 2>/dev/null
done
echo 3 > /proc/sys/vm/drop_caches
for off in {" ".join(map(str, OFFSETS_MIB))}; do
  sum=$(dd if=/dev/nvme0n1 bs=1M skip=$off count={PATTERN_MIB} iflag=direct 2>/dev/null | sha256sum)
  echo "read $off ${{sum%% *}}"
done
fio --name=verify --filename=/dev/nvme0n1 --rw=randwrite --bs=4k --size=4M --offset=128M \\
    --direct=1 --ioengine=psync --verify=crc32c --do_verify=1 > /tmp/fio.log 2>&1 \\
  && echo "fio ok" || {{ echo "fio failed"; cat /tmp/fio.log; }}
dev=$(basename $(readlink /sys/class/nvme/nvme0/device))
echo 1 > /sys/bus/pci/devices/$dev/reset
i=0; while [ "$(cat /sys/class/nvme/nvme0/state)" != live ] && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i+1))
done
echo "state $(cat /sys/class/nvme/nvme0/state)"
sum=$(dd if=/dev/nvme0n1 bs=1M skip={OFFSETS_MIB[1]} count={PATTERN_MIB} iflag=direct 2>/dev/null \
  | sha256sum)
echo "after-reset ${{sum%% *}}"
"""


# How the guest's driver gets its interrupts (lspci -vv shows "MSI-X: Enable+").
IRQ_REPORT = """
if lspci -vv -s $dev | grep -q "MSI-X: Enable+"; then echo "irq MSI-X"; else echo "irq INTx"; fi
grep -i nvme /proc/interrupts | head -3
"""


@pytest.fixture(scope="module")
def lab() -> Lab:
    return Lab.ensure()


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="pdsq-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def file_sha256(path: str, offset_mib: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset_mib << 20)
        digest.update(f.read(PATTERN_MIB << 20))
    return digest.hexdigest()


@pytest.mark.parametrize(
    ("mode", "kernel_args", "transport"),
    [
        (DoorbellMode.TRAPPED, (), "native"),
        (DoorbellMode.MMAP, (), "native"),
        (DoorbellMode.TRAPPED, ("pci=nomsi",), "native"),  # INTx only: the legacy path
        (DoorbellMode.MMAP, (), "libvfio-user"),  # the same VF through the C library
    ],
    ids=["trapped-msix", "mmap-msix", "trapped-intx", "libvfio-user-mmap-msix"],
)
async def test_guest_nvme_driver_reads_back_patterns(
    lab: Lab, workdir: str, mode: DoorbellMode, kernel_args: tuple[str, ...], transport: str
) -> None:
    backing = os.path.join(workdir, "vf.img")
    vf = PdsNvmeVf(VfConfig(backing=backing, size=NS_MIB << 20, doorbells=mode, io_queues=4))
    sock = os.path.join(workdir, "vf.sock")
    device = json.dumps({"driver": "vfio-user-pci", "socket": {"path": sock, "type": "unix"}})
    try:
        async with trio.open_nursery() as nursery:
            if transport == "libvfio-user":
                from mdevcore.vfio_user.libvfio_user import LibvfioUserServer

                await nursery.start(LibvfioUserServer(vf, sock, name="pds-vf").serve)
            else:
                await nursery.start(DeviceServer(vf, sock, name="pds-vf").serve)
            result = await lab.aboot(
                GUEST_SCRIPT + IRQ_REPORT,
                devices=[device],
                timeout=600,
                extra_binaries=["fio"],
                kernel_args=kernel_args,
            )
            nursery.cancel_scope.cancel()
    finally:
        vf.close()
    out = result.output
    assert result.rc == 0, out + result.kernel_log
    assert f"sectors {NS_MIB << 11}" in out
    assert "model Pensando NVMe VF (mdevcore)" in out
    pattern = re.search(r"^pattern ([0-9a-f]{64})$", out, re.M)
    assert pattern is not None, out
    expected = pattern.group(1)
    for off in OFFSETS_MIB:
        assert f"read {off} {expected}" in out
        assert file_sha256(backing, off) == expected  # the host sees the same bytes
    assert "fio ok" in out, out
    assert "state live" in out
    assert f"after-reset {expected}" in out
    irq_kind = re.search(r"^irq (\S+)$", out, re.M)
    assert irq_kind is not None, out
    assert irq_kind.group(1) == ("INTx" if kernel_args else "MSI-X"), out
