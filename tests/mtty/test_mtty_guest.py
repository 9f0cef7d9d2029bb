"""A real Linux guest drives an mtty card served over vfio-user (no daemon).

The lab boots its Debian guest in QEMU with ``-device vfio-user-pci`` on a
socket a DeviceServer serves an MttyDevice on, and the guest runs
``samples/mtty/guest_loopback.sh``: lspci, the 8250_pci ports in dmesg,
loopback on every port through the kernel's tty layer, interrupts taken,
and the same again after a device reset.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio

from mdevcore.samples.mtty import MttyDevice
from mdevcore.vfio_user.server import DeviceServer

pytestmark = pytest.mark.qemu

SCRIPT = Path(__file__).parents[2] / "samples" / "mtty" / "guest_loopback.sh"


def vfio_user_device(sock: Path, **extra: str) -> str:
    return json.dumps(
        {"driver": "vfio-user-pci", "socket": {"path": str(sock), "type": "unix"}, **extra}
    )


async def boot_with(device: MttyDevice, sock_dir: Path, *, root_port: bool) -> tuple[int, str, str]:
    from mdevcore.tools.lab.lab import Lab

    lab = await trio.to_thread.run_sync(Lab.ensure)
    sock = sock_dir / "mtty.sock"
    qemu_args: list[str] = []
    extra: dict[str, str] = {}
    if root_port:
        # Behind a root port the guest can reset the slot (secondary bus
        # reset), which QEMU turns into a vfio-user DEVICE_RESET.
        qemu_args = ["-device", "pcie-root-port,id=rp0,chassis=1,slot=1"]
        extra = {"bus": "rp0"}
    async with trio.open_nursery() as nursery:
        server = DeviceServer(device, sock, name=device.name)
        await nursery.start(server.serve)
        result = await lab.aboot(
            SCRIPT.read_text(),
            devices=[vfio_user_device(sock, **extra)],
            qemu_args=qemu_args,
            timeout=240,
        )
        nursery.cancel_scope.cancel()
    print(result.output)
    return result.rc, result.output, result.console


@pytest.mark.parametrize("nr_ports", [2, 1])
async def test_guest_loopback_on_root_bus(tmp_path: Path, nr_ports: int) -> None:
    device = MttyDevice(nr_ports, name=f"mtty-{nr_ports} guest")
    rc, output, console = await boot_with(device, tmp_path, root_port=False)
    assert rc == 0, console
    assert "MTTY PASS" in output
    assert re.search(r"MTTY lspci: .*\[4348:3253\] \(rev 10\)", output)
    # The guest's own config dump: IDs, revision and class as the kernel sample.
    assert re.search(r"MTTY lspci-vv: 00: 48 43 53 32 01 00 .. 02 10 02 00 07", output)
    assert re.search(r"MTTY lspci-vv: \s*Control: I/O\+ Mem- BusMaster- .* DisINTx-", output)
    assert re.search(r"MTTY lspci-vv: 20: (00 ){12}48 43 53 32", output)
    assert re.search(r"MTTY lspci-vv: \s*Region 0: I/O ports at [0-9a-f]+ \[size=8\]", output)
    ports = re.findall(r"MTTY dmesg: .*(ttyS\d+) at I/O 0x[0-9a-f]+ .* is a 16550A", output)
    assert len(ports) == nr_ports
    for port in ports:
        assert re.search(rf"MTTY loopback /dev/{port}: \d+ bytes ok", output)
        serial = re.search(rf"MTTY serial {port}: .*uart:16550A .*tx:(\d+) rx:(\d+)", output)
        assert serial and int(serial.group(1)) == int(serial.group(2)) > 0


async def test_guest_reset_behind_root_port(tmp_path: Path) -> None:
    device = MttyDevice(2, name="mtty-2 guest (root port)")
    # For each reset: had the guest programmed the ports (divisor, LCR)?
    # QEMU also resets the device at start, before the guest touched it.
    resets: list[bool] = []
    original = device.on_reset

    def counting_reset() -> None:
        resets.append(any(p.divisor or p.lcr for p in device.ports))
        original()

    device.on_reset = counting_reset  # type: ignore[method-assign]
    rc, output, console = await boot_with(device, tmp_path, root_port=True)
    assert rc == 0, console
    assert "MTTY PASS" in output
    assert "MTTY device reset done" in output
    assert len(re.findall(r"MTTY loopback /dev/ttyS\d+: \d+ bytes ok", output)) == 4
    assert True in resets, f"the guest's reset never reached the device: {resets}"
