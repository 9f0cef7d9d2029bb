"""A real Linux guest drives mtty served through libvfio-user (one boot).

QEMU's vfio-user-pci client talks to libvfio-user, which calls the same
MttyDevice the native engine serves: the guest's 8250_pci driver binds it,
loops bytes back through both ports with interrupts (INTx, auto-masked and
unmasked by SET_IRQS through libvfio-user), then resets the slot behind a
root port (DEVICE_RESET -> the device's reset) and loops back again.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio
from libvfio_user_pair import needs_libvfio_user

from mdevcore.samples.mtty import MttyDevice
from mdevcore.samples.mtty.uart import LCR

pytestmark = [pytest.mark.qemu, needs_libvfio_user]

SCRIPT = Path(__file__).parents[2] / "samples" / "mtty" / "guest_loopback.sh"


async def test_guest_loopback_and_reset_through_libvfio_user(tmp_path: Path) -> None:
    from mdevcore.tools.lab.lab import Lab
    from mdevcore.vfio_user.libvfio_user import LibvfioUserServer

    device = MttyDevice(2, name="mtty-2 guest (libvfio-user)")
    resets: list[bool] = []
    original = device.on_reset

    def counting_reset() -> None:
        # Had the guest programmed the ports? (QEMU also resets at start.)
        resets.append(any(p.s.divisor or p.s.uart_reg[LCR] for p in device.ports))
        original()

    device.on_reset = counting_reset  # type: ignore[method-assign]
    lab = await trio.to_thread.run_sync(Lab.ensure)
    sock = tmp_path / "mtty.sock"
    qemu_device = json.dumps(
        {"driver": "vfio-user-pci", "socket": {"path": str(sock), "type": "unix"}, "bus": "rp0"}
    )
    server = LibvfioUserServer(device, sock, name=device.name)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        result = await lab.aboot(
            SCRIPT.read_text(),
            devices=[qemu_device],
            qemu_args=["-device", "pcie-root-port,id=rp0,chassis=1,slot=1"],
            timeout=240,
        )
        nursery.cancel_scope.cancel()
    print(result.output)
    assert result.rc == 0, result.console
    output = result.output
    assert "MTTY PASS" in output
    assert re.search(r"MTTY lspci: .*\[4348:3253\] \(rev 10\)", output)
    # Config space is the device's own, not libvfio-user's emulation.
    assert re.search(r"MTTY lspci-vv: 00: 48 43 53 32 01 00 .. 02 10 02 00 07", output)
    ports = re.findall(r"MTTY dmesg: .*(ttyS\d+) at I/O 0x[0-9a-f]+ .* is a 16550A", output)
    assert len(ports) == 2
    assert "MTTY device reset done" in output
    assert len(re.findall(r"MTTY loopback /dev/ttyS\d+: \d+ bytes ok", output)) == 4
    for port in ports:
        serial = re.search(rf"MTTY serial {port}: .*uart:16550A .*tx:(\d+) rx:(\d+)", output)
        assert serial and int(serial.group(1)) == int(serial.group(2)) > 0
    assert True in resets, f"the guest's reset never reached the device: {resets}"
    assert server.requests > 100  # the guest's traffic went through libvfio-user
