"""Guest TCP throughput and ping round trip: our IFCVF VF against QEMU's own virtio-net.

Boots lab guests (mdevcore.tools.lab; TCG on these machines) whose virtio_net
driver sends ``--mib`` MiB over TCP (busybox nc) to a sink in this
process and pings it ``--pings`` times, once per variant, both on the
same persistent TAP in the host's network namespace (QEMU runs there;
the lab only gives it its own mount namespace):

  qemu-virtio-net   QEMU's built-in ``-device virtio-net-pci,netdev=...``
                    on ``-netdev tap,ifname=TAP``
  ifcvf             our VF over vfio-user, its TapBackend on the same TAP

Both have checksum and TSO offloads: QEMU's tap netdev opens the TAP with
IFF_VNET_HDR, and so does TapBackend.  Prints MB/s and the average ping
round trip per variant, and the ratios (ifcvf / QEMU), and what our VF's
offloads did.  Needs root (a TAP with an address: 10.78.0.1/24).

    .venv/bin/python benchmarks/ifcvf_guest.py [--mib 64] [--pings 50]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time

import trio

from mdevcore.parents.ifcvf.vf import IfcvfNetVf
from mdevcore.tools.lab import Lab
from mdevcore.vfio_user.server import DeviceServer
from mdevcore.virtio.net.device import NetConfig
from mdevcore.virtio.net.tap import TapBackend

TAP, HOST_IP, GUEST_IP, PORT = "ifcb0", "10.78.0.1", "10.78.0.2", 7790
GUEST_MAC = "02:1f:c0:00:0b:01"


def guest_script(mib: int, pings: int) -> str:
    return f"""
modprobe virtio_net
IF=""; i=0
while [ -z "$IF" ] && [ $i -lt 100 ]; do
  for n in /sys/class/net/*; do [ "$(cat $n/address)" = {GUEST_MAC} ] && IF=${{n##*/}}; done
  [ -z "$IF" ] && sleep 0.1; i=$((i+1))
done
ip link set $IF up
ip addr add {GUEST_IP}/24 dev $IF
i=0; while [ "$(cat /sys/class/net/$IF/carrier)" != 1 ] && [ $i -lt 100 ]; do
  sleep 0.1; i=$((i+1))
done
ping -c 3 -W 3 {HOST_IP} > /dev/null
echo "PING $(ping -c {pings} -i 0.05 -W 3 {HOST_IP} | tail -1)"
dd if=/dev/zero bs=1M count={mib} 2>/dev/null | nc {HOST_IP} {PORT}
echo "NC $?"
"""


class Sink:
    """One TCP connection on the TAP's address, read to EOF and timed."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST_IP, PORT))
        self.sock.listen(1)
        self.sock.settimeout(900)
        self.received = 0
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        start = time.monotonic()
        with conn:
            while chunk := conn.recv(1 << 16):
                self.received += len(chunk)
        self.seconds = time.monotonic() - start
        self.sock.close()

    def mb_per_s(self) -> float:
        self.thread.join(60)
        return self.received / self.seconds / 1e6 if self.seconds else 0.0


def parse_ping(output: str) -> float:
    match = re.search(r"^PING round-trip min/avg/max = [\d.]+/([\d.]+)/", output, re.M)
    if match is None:
        raise RuntimeError(f"no ping summary in the guest output:\n{output}")
    return float(match.group(1))


async def run_variant(lab: Lab, variant: str, script: str, workdir: str) -> tuple[float, float]:
    sink = Sink()
    if variant == "qemu-virtio-net":
        result = await lab.aboot(
            script,
            devices=[f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}"],
            qemu_args=["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no"],
            timeout=900,
        )
    else:
        mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
        vf = IfcvfNetVf(NetConfig(mac=mac), TapBackend(TAP), name="ifcvf-bench")
        path = os.path.join(workdir, "vf.sock")
        device = json.dumps({"driver": "vfio-user-pci", "socket": {"path": path, "type": "unix"}})
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(DeviceServer(vf, path, name="ifcvf").serve)
                result = await lab.aboot(script, devices=[device], timeout=900)
                nursery.cancel_scope.cancel()
        finally:
            vf.close()
        o = vf.offload_stats
        print(
            f"ifcvf offloads: {o.tx_gso} GSO packets out, {o.rx_gso} in, "
            f"{o.tx_csum} checksums left to the host, {o.tx_refused} headers refused",
            flush=True,
        )
    if result.rc != 0 or "NC 0" not in result.output:
        raise RuntimeError(f"{variant}: guest failed\n{result.output}\n{result.kernel_log}")
    return sink.mb_per_s(), parse_ping(result.output)


def tap(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True)


async def main_async(mib: int, pings: int) -> None:
    lab = Lab.ensure()
    script = guest_script(mib, pings)
    workdir = tempfile.mkdtemp(prefix="ifcb-")
    tap("tuntap", "add", TAP, "mode", "tap")
    try:
        tap("addr", "add", f"{HOST_IP}/24", "dev", TAP)
        tap("link", "set", TAP, "up")
        results = {}
        for variant in ("qemu-virtio-net", "ifcvf"):
            results[variant] = await run_variant(lab, variant, script, workdir)
            rate, rtt = results[variant]
            print(f"{variant:16s} {rate:8.2f} MB/s   ping avg {rtt:7.3f} ms", flush=True)
    finally:
        subprocess.run(["ip", "link", "del", TAP], check=False)
        shutil.rmtree(workdir, ignore_errors=True)
    (q_rate, q_rtt), (v_rate, v_rtt) = results["qemu-virtio-net"], results["ifcvf"]
    print(
        f"ifcvf / qemu: throughput {v_rate / q_rate:.2f}x, ping round trip {v_rtt / q_rtt:.2f}x "
        f"({mib} MiB guest -> host over TCP, {pings} pings; {lab.info().get('accel', '?')})"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64, help="MiB the guest sends (default 64)")
    p.add_argument("--pings", type=int, default=50, help="pings (default 50)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    trio.run(main_async, args.mib, args.pings)


if __name__ == "__main__":
    main()
