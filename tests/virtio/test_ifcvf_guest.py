"""A real Linux guest's virtio_net driver on the IFCVF VF, through QEMU and vfio-user.

The VF is served by DeviceServer in this test's trio run; its backend's
other end is a tiny IPv4 host (net_responder.Responder) answering ARP and
ping at 10.0.0.1.  In the MSI-X boot the guest has a second VF, VF 0 of
an IFCVF card hosted as mdevd hosts it (sysfs tree, ifcvf_vfio, the
control socket), whose wire is a TAP in a network namespace made by the
test: the guest pings the namespace's kernel 200 times, asks the host
(over TCP) to take its link down and up, which the test does with
``mdevd ip link set ifcvf0 vf 0 state disable|enable`` through the
control socket while the guest watches carrier and operstate, then 16
MiB go over TCP each way (busybox nc in the guest, a Python peer in the
namespace) and both ends' sha256 must match.  That VF's TAP passes the
virtio_net_hdr through, so the guest negotiates the checksum and TSO
offloads (its virtio device's ``features`` say so) and the transfers go
as GSO packets both ways (the VF's counters say so).

The lab boots a TCG guest whose script loads virtio_net (in the lab's
initramfs), checks the interface's MAC and carrier, pings, changes the
MTU and pings with full-size frames, and rebinds the driver (a
guest-initiated device reset) and pings again.  In the INTx boot (no
namespace) the host takes the responder VF's link down and up after the
pings, and the guest sees it through the config interrupt.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from net_responder import Responder

from mdevcore.daemon.control import ControlServer
from mdevcore.daemon.devlink import DevlinkRegistry, control_path
from mdevcore.parents.ifcvf.vf import IfcvfNetVf
from mdevcore.testing.netns import needs_netns, netns, run_in
from mdevcore.tools.lab import Lab
from mdevcore.vfio_user.server import DeviceServer
from mdevcore.virtio import spec
from mdevcore.virtio.net.backend import DatagramBackend
from mdevcore.virtio.net.device import NetConfig, OffloadStats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "ifcvf"))
from ifcvf_card import Card, make_card  # noqa: E402  (the card as mdevd hosts it)

pytestmark = pytest.mark.qemu

VF_MAC = "02:1f:c0:00:00:01"
TAP_VF_MAC = "02:1f:c0:00:00:02"
TAP, NS_IP, GUEST_IP, PORT, GUEST_PORT = "ifcg0", "10.77.0.1", "10.77.0.2", 7777, 7778
FLAP_PORT = 7779
TAP_PINGS = 200
BLOB_MIB = 16
HOST_MAC = bytes.fromhex("020000000001")
HOST_IP = bytes([10, 0, 0, 1])
PINGS = 20
# What the guest must have negotiated on the TAP VF: the offloads its TAP honours.
TAP_OFFLOADS = (
    spec.NET_F_CSUM,
    spec.NET_F_GUEST_CSUM,
    spec.NET_F_GUEST_TSO4,
    spec.NET_F_GUEST_TSO6,
    spec.NET_F_HOST_TSO4,
    spec.NET_F_HOST_TSO6,
)

GUEST_SCRIPT = f"""
modprobe virtio_net || echo "modprobe virtio_net failed"
find_if() {{  # the interface with MAC $1 (waiting for it to appear)
  IF=""; i=0
  while [ -z "$IF" ] && [ $i -lt 100 ]; do
    for n in /sys/class/net/*; do [ "$(cat $n/address)" = $1 ] && IF=${{n##*/}}; done
    [ -z "$IF" ] && sleep 0.1; i=$((i+1))
  done
}}
wait_carrier() {{
  i=0
  while [ "$(cat /sys/class/net/$IF/carrier 2>/dev/null)" != $1 ] && [ $i -lt 200 ]; do
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
[ "$FLAP" = responder ] && wait_carrier 0 && wait_carrier 1
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
echo "tap-features $(cat /sys/class/net/$IF/device/features)"
ip link set $IF up
ip addr add {GUEST_IP}/24 dev $IF
wait_carrier 1 tcarrier
ping -c {TAP_PINGS} -i 0.02 -W 3 {NS_IP} | grep "packets transmitted" | sed "s/^/tping /"
echo flap | timeout 30 nc {NS_IP} {FLAP_PORT}  # the host takes the link down, then up
wait_carrier 0 tcarrier
echo "toper $(cat /sys/class/net/$IF/operstate)"
wait_carrier 1 tcarrier
echo "toper $(cat /sys/class/net/$IF/operstate)"
dd if=/dev/urandom of=/tmp/blob bs=1M count={BLOB_MIB} 2>/dev/null
echo "blob $(sha256sum /tmp/blob | cut -d' ' -f1)"
timeout 300 nc {NS_IP} {PORT} < /tmp/blob
echo "nc rc $?"
timeout 300 nc -l -p {GUEST_PORT} > /tmp/rx < /dev/null
echo "rx $(wc -c < /tmp/rx) $(sha256sum /tmp/rx | cut -d' ' -f1)"
"""

# The guest's peer, in the namespace: take the guest's link flap request
# (print "flap": the test takes the link down and up), then one TCP
# connection and read it to EOF (print length and sha256), then connect
# to the guest's listener (it may not listen yet: retry) and send it
# BLOB_MIB random MiB (print sha256).
PEER = f"""
import hashlib, os, socket, time
flap = socket.socket()
flap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
flap.bind(("{NS_IP}", {FLAP_PORT}))
flap.listen(1)
flap.settimeout(600)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{NS_IP}", {PORT}))
s.listen(1)
s.settimeout(600)
print("ready", flush=True)
f, _ = flap.accept()
f.close()
print("flap", flush=True)
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


@pytest.mark.parametrize(
    "kernel_args",
    [pytest.param((), marks=needs_netns), ("pci=nomsi",)],  # MSI-X; INTx (ISR read-to-clear)
    ids=["msix", "intx"],
)
async def test_guest_virtio_net_driver_pings_through_the_vf(
    lab: Lab, workdir: str, kernel_args: tuple[str, ...]
) -> None:
    if kernel_args:
        boot = await boot_with_vfs(lab, workdir, kernel_args, None)
        check_guest_output(boot, kernel_args)
        return
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
            boot = await boot_with_vfs(lab, workdir, kernel_args, ns, peer)
            received, _ = await trio.to_thread.run_sync(peer.communicate, None, 60)
        finally:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
    out = boot.out
    check_guest_output(boot, kernel_args)
    pings = rf"^tping {TAP_PINGS} packets transmitted, {TAP_PINGS} packets received"
    assert re.search(pings, out, re.M), out
    # the link went down and up through mdevd's control socket, and the guest saw it
    assert boot.link_events == ["down: rc 0", "up: rc 0"], boot.link_events
    assert re.findall(r"^tcarrier (\d)$", out, re.M) == ["1", "0", "1"], out
    assert re.findall(r"^toper (\w+)$", out, re.M) == ["down", "up"], out
    # the offloads: negotiated (the guest's view and the device's) and used both ways
    features = re.search(r"^tap-features ([01]{64})$", out, re.M)
    assert features is not None, out
    assert all(features.group(1)[bit] == "1" for bit in TAP_OFFLOADS), features.group(1)
    assert all(boot.tap_features & spec.bit(bit) for bit in TAP_OFFLOADS)
    stats = boot.tap_stats
    assert stats is not None
    print("TAP VF offloads:", stats)
    assert stats.tx_gso > 0 and stats.rx_gso > 0 and stats.tx_refused == 0, stats
    # 16 MiB each way, sha256 equal at both ends
    blob = re.search(r"^blob ([0-9a-f]{64})$", out, re.M)
    assert blob is not None and "nc rc 0" in out, out
    size = str(BLOB_MIB << 20)
    assert received.split()[:2] == [size, blob.group(1)], (received, out)  # guest -> ns
    sent = received.split()[2:]
    assert len(sent) == 2 and sent[0] == size, (received, out)
    assert re.search(rf"^rx {size} {sent[1]}$", out, re.M), (received, out)  # ns -> guest


@dataclasses.dataclass
class Boot:
    out: str
    vf: IfcvfNetVf
    responder: Responder
    link_events: list[str]
    tap_features: int = 0  # what the TAP VF's driver had negotiated (guest up)
    tap_stats: OffloadStats | None = None


async def mdevd_ip(run_dir: Path, *args: str) -> int:
    """``mdevd ip --run-dir RUN ...`` as an administrator runs it: a real process."""
    cmd = [sys.executable, "-m", "mdevcore.daemon.cli", "ip", "--run-dir", str(run_dir), *args]
    result = await trio.run_process(cmd, check=False, capture_stdout=True, capture_stderr=True)
    return result.returncode


async def flap_on_request(
    peer: subprocess.Popen[str], card: Card, events: list[str], features: list[int]
) -> None:
    """When the guest asks (the peer prints "flap"), VF 0's link down, then up, via mdevd ip.

    Also notes what VF 0's driver negotiated (``features``): the guest is
    up then, and its shutdown resets the device before the boot returns.
    """
    assert peer.stdout is not None
    line = await trio.to_thread.run_sync(peer.stdout.readline, abandon_on_cancel=True)
    if line != "flap\n":
        events.append(f"peer said {line!r}")
        return
    assert card.host.pf is not None
    features.append(card.host.pf.device.vfs[0].common.negotiated)  # type: ignore[attr-defined]
    for state in ("disable", "enable"):
        rc = await mdevd_ip(card.run_dir, "link", "set", "ifcvf0", "vf", "0", "state", state)
        events.append(f"{'down' if state == 'disable' else 'up'}: rc {rc}")
        if state == "disable":
            await trio.sleep(2.0)


async def boot_with_vfs(
    lab: Lab,
    workdir: str,
    kernel_args: tuple[str, ...],
    ns: str | None,
    peer: subprocess.Popen[str] | None = None,
) -> Boot:
    """Boot with the responder VF (and, given a namespace, the card's TAP VF)."""
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

    if ns is None:
        responder.after_echo = (PINGS, flap_link)
    sock = os.path.join(workdir, "vf.sock")
    tap_stats, negotiated = None, [0]
    script = f"FLAP={'responder' if ns is None else 'mdevd'}\n" + GUEST_SCRIPT
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(DeviceServer(vf, sock, name="ifcvf").serve)
            nursery.start_soon(responder.serve)
            if ns is None:
                result = await lab.aboot(
                    script, devices=[qemu_device(sock)], timeout=600, kernel_args=kernel_args
                )
            else:
                assert peer is not None
                async with make_card(
                    Path(workdir),
                    total_vfs=1,
                    backend="tap",
                    tap=TAP.replace("0", "%d"),
                    netns=ns,
                    macs=(bytes.fromhex(TAP_VF_MAC.replace(":", "")),),
                ) as card:
                    control = ControlServer(
                        control_path(card.run_dir),
                        DevlinkRegistry(),
                        card.servers.settle,
                        card.netdevs,
                    )
                    await nursery.start(control.serve)
                    (tap_sock,) = await card.vfs_for_vfio(1)
                    assert card.host.pf is not None
                    tap_vf: IfcvfNetVf = card.host.pf.device.vfs[0]  # type: ignore[attr-defined]
                    nursery.start_soon(flap_on_request, peer, card, link_events, negotiated)
                    result = await lab.aboot(
                        script + TAP_SCRIPT,
                        devices=[qemu_device(sock), qemu_device(tap_sock)],
                        timeout=600,
                        kernel_args=kernel_args,
                    )
                    tap_stats = dataclasses.replace(tap_vf.offload_stats)
            nursery.cancel_scope.cancel()
    finally:
        vf.close()
        host_end.close()
    out = result.output
    print(out)  # shown with -s: the guest's own view
    assert result.rc == 0, out + result.kernel_log
    return Boot(out, vf, responder, link_events, negotiated[-1], tap_stats)


def qemu_device(sock: str) -> str:
    return json.dumps({"driver": "vfio-user-pci", "socket": {"path": sock, "type": "unix"}})


def check_guest_output(boot: Boot, kernel_args: tuple[str, ...]) -> None:
    out, vf, responder = boot.out, boot.vf, boot.responder
    assert "modprobe" not in out, out
    assert f"mac {VF_MAC}" in out
    assert "driver virtio_net" in out
    assert ("irq INTx" if kernel_args else "irq MSI-X") in out, out
    assert re.search(rf"^ping1 {PINGS} packets transmitted, {PINGS} packets received", out, re.M), (
        out
    )
    carriers = re.findall(r"^carrier (\d)$", out, re.M)
    if kernel_args:  # the responder VF's link went down and up after the pings
        assert carriers == ["1", "0", "1", "1"], out
        assert boot.link_events == ["down", "up"]
    else:
        assert carriers == ["1", "1"], out
    assert "mtu 1400" in out
    assert re.search(r"^ping2 5 packets transmitted, 5 packets received", out, re.M), out
    assert responder.largest_echo == 1400
    assert re.search(r"^ping3 5 packets transmitted, 5 packets received", out, re.M), out
    assert responder.echo_requests == PINGS + 10
    assert vf.reset_count >= 2  # probe and rebind each reset the device
