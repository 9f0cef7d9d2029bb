"""The TAP backend: a VF served over vfio-user, its wire a TAP in a network namespace.

The test makes a namespace; the card opens the VF's TAP inside it (the
root namespace never sees it).  A driver in this process (NetGuest, over
a real vfio-user client) sends an ICMP echo request and UDP datagrams to
the namespace's address on the TAP; the namespace's kernel answers the
echo and a UDP socket there receives the datagrams.
"""

from __future__ import annotations

import errno
import socket
import struct
import subprocess
from pathlib import Path

import pytest
import trio
from ifcvf_card import PF_DIR, VF0, make_card
from net_guest import RX0, NetGuest

from mdevcore.testing.netns import needs_netns, netns, run_in
from mdevcore.virtio.net.tap import TapBackend

pytestmark = needs_netns

TAP = "ifct0"
NS_IP, VF_IP = "10.77.0.1", "10.77.0.2"
VF_MAC = bytes.fromhex("525400773402")
UDP_PORT = 7777


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4(dst_mac: bytes, proto: int, payload: bytes, ident: int) -> bytes:
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        ident,
        0,
        64,
        proto,
        0,
        socket.inet_aton(VF_IP),
        socket.inet_aton(NS_IP),
    )
    header = header[:10] + struct.pack(">H", checksum(header)) + header[12:]
    return dst_mac + VF_MAC + b"\x08\x00" + header + payload


def echo_request(dst_mac: bytes, seq: int, data: bytes) -> bytes:
    icmp = struct.pack(">BBHHH", 8, 0, 0, 0x1234, seq) + data
    icmp = icmp[:2] + struct.pack(">H", checksum(icmp)) + icmp[4:]
    return ipv4(dst_mac, 1, icmp, seq)


def udp(dst_mac: bytes, data: bytes, ident: int) -> bytes:
    # checksum 0: none (allowed for UDP over IPv4)
    return ipv4(dst_mac, 17, struct.pack(">HHHH", 40000, UDP_PORT, 8 + len(data), 0) + data, ident)


def find_echo_reply(frames: list[bytes], seq: int) -> bytes | None:
    for f in frames:
        if f[12:14] == b"\x08\x00" and f[23] == 1 and f[26:30] == socket.inet_aton(NS_IP):
            icmp = f[14 + (f[14] & 0x0F) * 4 :]
            if icmp[0] == 0 and struct.unpack(">H", icmp[6:8])[0] == seq:
                return icmp[8:]
    return None


RECEIVER = f"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{NS_IP}", {UDP_PORT}))
s.settimeout(20)
print("ready", flush=True)
for _ in range(int(sys.argv[1])):
    print(s.recv(2048).hex(), flush=True)
"""


async def test_vf_talks_to_a_namespace_through_its_tap(tmp_path: Path) -> None:
    with netns("ifct") as ns:
        async with make_card(
            tmp_path, total_vfs=1, backend="tap", tap="ifct%d", netns=ns, macs=(VF_MAC,)
        ) as card:
            (sock,) = await card.vfs_for_vfio(1)
            # the TAP is in the namespace, not here
            assert subprocess.run(["ip", "link", "show", TAP], capture_output=True).returncode
            run_in(ns, "ip", "addr", "add", f"{NS_IP}/24", "dev", TAP)
            run_in(ns, "ip", "link", "set", TAP, "up")
            run_in(ns, "ip", "neigh", "add", VF_IP, "lladdr", "52:54:00:77:34:02", "dev", TAP)
            tap_mac = bytes.fromhex(
                run_in(ns, "cat", f"/sys/class/net/{TAP}/address").stdout.strip().replace(":", "")
            )
            receiver = subprocess.Popen(
                ["ip", "netns", "exec", ns, "python3", "-c", RECEIVER, "3"],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert receiver.stdout is not None
                assert receiver.stdout.readline() == "ready\n"
                datagrams = [f"datagram {n}".encode() * 20 for n in range(3)]

                def session() -> bytes | None:
                    g = NetGuest(sock)
                    try:
                        g.bring_up()
                        g.post_rx(RX0, 16, 2048)
                        g.send(echo_request(tap_mac, 1, b"through the TAP" * 4))
                        for n, data in enumerate(datagrams):
                            g.send(udp(tap_mac, data, 100 + n))
                        frames: list[bytes] = []
                        for _ in range(8):  # the reply, maybe behind a stray frame or two
                            frames += [f for f, _ in g.receive(RX0, 1)]
                            if (reply := find_echo_reply(frames, 1)) is not None:
                                return reply
                        return None
                    finally:
                        g.close()

                with trio.fail_after(30):
                    reply = await trio.to_thread.run_sync(session)
                out, _ = await trio.to_thread.run_sync(receiver.communicate, None, 30)
            finally:
                if receiver.poll() is None:
                    receiver.kill()
                    receiver.wait()
            assert reply == b"through the TAP" * 4
            assert [bytes.fromhex(line) for line in out.split()] == datagrams
            assert receiver.returncode == 0
            assert run_in(ns, "ip", "link", "show", TAP).returncode == 0
            card.tree.write(f"{PF_DIR}/sriov_numvfs", "0")
            await card.servers.settle()
            # the VF went, and its (non-persistent) TAP with it
            assert run_in(ns, "ip", "link", "show", TAP, check=False).returncode != 0
            assert not (card.run_dir / f"{VF0}.sock").exists()


async def test_tap_errors_reach_the_sysfs_writer(tmp_path: Path) -> None:
    async with make_card(
        tmp_path, total_vfs=1, backend="tap", tap="ifcx%d", netns="ifcvf-no-such-ns"
    ) as card:
        assert card.write_err(f"{PF_DIR}/sriov_numvfs", "1") == errno.ENOENT
        assert card.tree.read(f"{PF_DIR}/sriov_numvfs") == "0\n"  # no half-enabled VFs
    with pytest.raises(OSError) as info:
        TapBackend("bad name")
    assert info.value.errno == errno.EINVAL


async def test_a_tap_deleted_under_the_backend_is_a_dead_wire() -> None:
    with netns("ifcz") as ns:
        backend = TapBackend("ifcz0", ns)
        try:
            run_in(ns, "ip", "link", "del", "ifcz0")
            backend.send(bytes(60))
            assert (backend.stats.tx_frames, backend.stats.tx_dropped) == (0, 1)
            with trio.move_on_after(0.2) as scope:
                await backend.receive()  # neither a frame nor an exception
            assert scope.cancelled_caught
        finally:
            backend.close()
