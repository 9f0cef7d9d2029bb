"""A real Linux guest's virtio_net driver on the IFCVF VF, through QEMU and vfio-user.

The VF is served by DeviceServer in this test's trio run; its backend's
other end is a tiny IPv4 host (net_responder.Responder) answering ARP and
ping at 10.0.0.1.  In the MSI-X boot the guest has a second VF whose wire
is a TAP in a network namespace made by the test: the guest pings the
namespace's kernel 200 times, then 16 MiB go over TCP each way (busybox
nc in the guest, a Python peer in the namespace) and both ends' sha256
must match.  The lab boots a TCG guest whose script loads virtio_net
(a module in the lab kernel; the .ko files travel in the boot's files),
checks the interface's MAC and carrier, pings, sees the host take the link
down and up, changes the MTU and pings with full-size frames, and rebinds
the driver (a guest-initiated device reset) and pings again.
"""

from __future__ import annotations

import json
import lzma
import os
import re
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator

import pytest
import trio
from net_responder import Responder

from mdevcore.testing.netns import needs_netns, netns, run_in
from mdevcore.vfio_user.server import DeviceServer
from mdevcore.virtio.net.backend import DatagramBackend
from mdevcore.virtio.net.device import NetConfig
from mdevcore.virtio.net.tap import TapBackend
from parents.ifcvf.vf import IfcvfNetVf
from tools.lab import Lab

pytestmark = pytest.mark.qemu

VF_MAC = "02:1f:c0:00:00:01"
TAP_VF_MAC = "02:1f:c0:00:00:02"
TAP, NS_IP, GUEST_IP, PORT, GUEST_PORT = "ifcg0", "10.77.0.1", "10.77.0.2", 7777, 7778
TAP_PINGS = 200
BLOB_MIB = 16
HOST_MAC = bytes.fromhex("020000000001")
HOST_IP = bytes([10, 0, 0, 1])
PINGS = 20
MODULES = (
    "kernel/net/core/failover",
    "kernel/drivers/net/net_failover",
    "kernel/drivers/net/virtio_net",
)

GUEST_SCRIPT = f"""
for m in failover net_failover virtio_net; do
  insmod /virtio-mods/$m.ko || echo "insmod $m failed"
done
find_if() {{  # the interface with MAC $1 (waiting for it to appear)
  IF=""; i=0
  while [ -z "$IF" ] && [ $i -lt 100 ]; do
    for n in /sys/class/net/*; do [ "$(cat $n/address)" = $1 ] && IF=${{n##*/}}; done
    [ -z "$IF" ] && sleep 0.1; i=$((i+1))
  done
}}
wait_carrier() {{
  i=0
  while [ "$(cat /sys/class/net/$IF/carrier 2>/dev/null)" != $1 ] && [ $i -lt 150 ]; do
    sleep 0.1; i=$((i+1))
  done
  echo "${{2:-carrier}} $(cat /sys/class/net/$IF/carrier 2>/dev/null)"
}}
pings() {{
  ping -c $2 -i 0.2 -W 3 $3 ${{4:-10.0.0.1}} | grep "packets transmitted" | sed "s/^/$1 /"
}}
find_if {VF_MAC}
echo "if $IF"
echo "mac $(cat /sys/class/net/$IF/address)"
echo "driver $(basename $(readlink /sys/class/net/$IF/device/driver))"
dev=$(basename $(readlink -f /sys/class/net/$IF/device/..))
if lspci -vv -s $dev | grep -q "MSI-X: Enable+"; then echo "irq MSI-X"; else echo "irq INTx"; fi
ip link set $IF up
ip addr add 10.0.0.2/24 dev $IF
wait_carrier 1
pings ping1 {PINGS} ""
wait_carrier 0
wait_carrier 1
ip link set $IF mtu 1400
echo "mtu $(cat /sys/class/net/$IF/mtu)"
pings ping2 5 "-s 1372"
vdev=$(basename $(readlink /sys/class/net/$IF/device))
echo $vdev > /sys/bus/virtio/drivers/virtio_net/unbind
echo $vdev > /sys/bus/virtio/drivers/virtio_net/bind
find_if {VF_MAC}
ip link set $IF up
ip addr add 10.0.0.2/24 dev $IF
wait_carrier 1
pings ping3 5 ""
grep -c virtio /proc/interrupts | sed 's/^/virtio-irq-lines /'
"""

# The second VF, on a TAP in the test's namespace (MSI-X boot only).
TAP_SCRIPT = f"""
find_if {TAP_VF_MAC}
echo "tap-if $IF"
ip link set $IF up
ip addr add {GUEST_IP}/24 dev $IF
wait_carrier 1 tcarrier
ping -c {TAP_PINGS} -i 0.02 -W 3 {NS_IP} | grep "packets transmitted" | sed "s/^/tping /"
dd if=/dev/urandom of=/tmp/blob bs=1M count={BLOB_MIB} 2>/dev/null
echo "blob $(sha256sum /tmp/blob | cut -d' ' -f1)"
timeout 300 nc {NS_IP} {PORT} < /tmp/blob
echo "nc rc $?"
timeout 300 nc -l -p {GUEST_PORT} > /tmp/rx < /dev/null
echo "rx $(wc -c < /tmp/rx) $(sha256sum /tmp/rx | cut -d' ' -f1)"
"""

# The guest's peer, in the namespace: take one TCP connection and read it to
# EOF (print length and sha256), then connect to the guest's listener (it
# may not listen yet: retry) and send it BLOB_MIB random MiB (print sha256).
PEER = f"""
import hashlib, os, socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{NS_IP}", {PORT}))
s.listen(1)
s.settimeout(600)
print("ready", flush=True)
c, _ = s.accept()
h, n = hashlib.sha256(), 0
while chunk := c.recv(1 << 16):
    h.update(chunk)
    n += len(chunk)
c.close()
print(n, h.hexdigest(), flush=True)
blob = os.urandom({BLOB_MIB} << 20)
deadline = time.monotonic() + 300
while True:
    try:
        out = socket.create_connection(("{GUEST_IP}", {GUEST_PORT}), timeout=5)
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.3)
out.sendall(blob)
out.close()
print(len(blob), hashlib.sha256(blob).hexdigest(), flush=True)
"""


@pytest.fixture(scope="module")
def lab() -> Lab:
    return Lab.ensure()


@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="ifcq-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def guest_modules(lab: Lab) -> dict[str, bytes]:
    """virtio_net and its dependencies, decompressed for busybox insmod."""
    base = lab.root / "usr/lib/modules" / lab.kernel_version
    return {
        f"/virtio-mods/{name.rsplit('/', 1)[1]}.ko": lzma.decompress(
            (base / f"{name}.ko.xz").read_bytes()
        )
        for name in MODULES
    }


@pytest.mark.parametrize(
    "kernel_args",
    [pytest.param((), marks=needs_netns), ("pci=nomsi",)],  # MSI-X; INTx (ISR read-to-clear)
    ids=["msix", "intx"],
)
async def test_guest_virtio_net_driver_pings_through_the_vf(
    lab: Lab, workdir: str, kernel_args: tuple[str, ...]
) -> None:
    if kernel_args:
        out, vf, responder, link_events = await boot_with_vfs(lab, workdir, kernel_args, None)
    else:
        with netns("ifcg") as ns:
            run_in(ns, "ip", "tuntap", "add", TAP, "mode", "tap")  # persistent: addressable now
            run_in(ns, "ip", "addr", "add", f"{NS_IP}/24", "dev", TAP)
            run_in(ns, "ip", "link", "set", TAP, "up")
            peer = subprocess.Popen(
                ["ip", "netns", "exec", ns, "python3", "-c", PEER],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert peer.stdout is not None
                assert peer.stdout.readline() == "ready\n"
                out, vf, responder, link_events = await boot_with_vfs(lab, workdir, kernel_args, ns)
                received, _ = await trio.to_thread.run_sync(peer.communicate, None, 60)
            finally:
                if peer.poll() is None:
                    peer.kill()
                    peer.wait()
        pings = rf"^tping {TAP_PINGS} packets transmitted, {TAP_PINGS} packets received"
        assert re.search(pings, out, re.M), out
        blob = re.search(r"^blob ([0-9a-f]{64})$", out, re.M)
        assert blob is not None and "nc rc 0" in out, out
        size = str(BLOB_MIB << 20)
        assert received.split()[:2] == [size, blob.group(1)], (received, out)  # guest -> ns
        sent = received.split()[2:]
        assert len(sent) == 2 and sent[0] == size, (received, out)
        assert re.search(rf"^rx {size} {sent[1]}$", out, re.M), (received, out)  # ns -> guest
    check_guest_output(out, kernel_args, vf, responder, link_events)


async def boot_with_vfs(
    lab: Lab, workdir: str, kernel_args: tuple[str, ...], ns: str | None
) -> tuple[str, IfcvfNetVf, Responder, list[str]]:
    """Boot with the responder VF (and, given a namespace, the TAP VF); the guest's output."""
    vf_end, host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    vf = IfcvfNetVf(NetConfig(mac=bytes.fromhex(VF_MAC.replace(":", ""))), DatagramBackend(vf_end))
    responder = Responder(host_end, HOST_MAC, HOST_IP)
    link_events: list[str] = []

    async def flap_link() -> None:
        await trio.sleep(0.5)  # let the last reply reach the guest
        vf.set_link(False)
        link_events.append("down")
        await trio.sleep(2.0)
        vf.set_link(True)
        link_events.append("up")

    responder.after_echo = (PINGS, flap_link)
    sock = os.path.join(workdir, "vf.sock")
    devices = [qemu_device(sock)]
    tap_vf = None
    if ns is not None:
        tap_mac = bytes.fromhex(TAP_VF_MAC.replace(":", ""))
        tap_vf = IfcvfNetVf(NetConfig(mac=tap_mac), TapBackend(TAP, ns), name="ifcvf-tap")
        devices.append(qemu_device(os.path.join(workdir, "tap-vf.sock")))
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(DeviceServer(vf, sock, name="ifcvf").serve)
            if tap_vf is not None:
                tap_sock = os.path.join(workdir, "tap-vf.sock")
                await nursery.start(DeviceServer(tap_vf, tap_sock, name="ifcvf-tap").serve)
            nursery.start_soon(responder.serve)
            result = await lab.aboot(
                GUEST_SCRIPT + (TAP_SCRIPT if tap_vf is not None else ""),
                devices=devices,
                timeout=600,
                files=guest_modules(lab),
                kernel_args=kernel_args,
            )
            nursery.cancel_scope.cancel()
    finally:
        vf.close()
        host_end.close()
        if tap_vf is not None:
            tap_vf.close()
    out = result.output
    print(out)  # shown with -s: the guest's own view
    assert result.rc == 0, out + result.kernel_log
    return out, vf, responder, link_events


def qemu_device(sock: str) -> str:
    return json.dumps({"driver": "vfio-user-pci", "socket": {"path": sock, "type": "unix"}})


def check_guest_output(
    out: str,
    kernel_args: tuple[str, ...],
    vf: IfcvfNetVf,
    responder: Responder,
    link_events: list[str],
) -> None:
    assert "insmod" not in out, out
    assert f"mac {VF_MAC}" in out
    assert "driver virtio_net" in out
    assert ("irq INTx" if kernel_args else "irq MSI-X") in out, out
    assert re.search(rf"^ping1 {PINGS} packets transmitted, {PINGS} packets received", out, re.M), (
        out
    )
    carriers = re.findall(r"^carrier (\d)$", out, re.M)
    assert carriers == ["1", "0", "1", "1"], out
    assert link_events == ["down", "up"]
    assert "mtu 1400" in out
    assert re.search(r"^ping2 5 packets transmitted, 5 packets received", out, re.M), out
    assert responder.largest_echo == 1400
    assert re.search(r"^ping3 5 packets transmitted, 5 packets received", out, re.M), out
    assert responder.echo_requests == PINGS + 10
    assert vf.reset_count >= 2  # probe and rebind each reset the device
