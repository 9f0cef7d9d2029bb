"""Checksum and TSO offloads through a real TAP: the host kernel does the work.

The namespace routes between two TAPs: the VF's (``A``, 10.77.1.0/24,
opened by the card with IFF_VNET_HDR) and one this test holds (``B``,
10.77.2.0/24, IFF_VNET_HDR with no offloads, so the kernel must finish
every checksum and cut every segment before a frame reaches it).  A
driver in this process (NetGuest over vfio-user) sends through the VF:

- a UDP datagram with NEEDS_CSUM and only the pseudo-header sum in its
  checksum field comes out of B with the right checksum;
- one 8000-byte TCP segment as GSO (TCPV4, gso_size 1000) comes out of B
  as 8 segments of 1000 bytes with consecutive sequence numbers and
  right checksums;

and from B (as if a host sent a large TCP burst) one 8000-byte GSO TCP
packet reaches a driver that took GUEST_TSO4 as one frame with a GSO
header, and a driver that did not take it (or switched it off with
CTRL_GUEST_OFFLOADS) as 8 finished segments.
"""

from __future__ import annotations

import os
import select
import socket
import struct
from pathlib import Path

import trio
from ifcvf_card import make_card
from net_guest import RX0, WANTED, NetGuest

from mdevcore.testing.netns import needs_netns, netns, run_in
from mdevcore.virtio import spec
from mdevcore.virtio.net.offload import GSO_TCPV4, OFFLOAD_FEATURES, internet_checksum
from mdevcore.virtio.net.tap import open_tap

pytestmark = needs_netns

TAP_A, TAP_B = "ifco0", "ifcob"
NS_A, VF_IP, NS_B, FAR_IP = "10.77.1.1", "10.77.1.2", "10.77.2.1", "10.77.2.2"
VF_MAC = bytes.fromhex("525400770102")
FAR_MAC = bytes.fromhex("525400770202")
OFFLOADS = (
    spec.bit(spec.NET_F_CSUM)
    | spec.bit(spec.NET_F_GUEST_CSUM)
    | spec.bit(spec.NET_F_HOST_TSO4)
    | spec.bit(spec.NET_F_GUEST_TSO4)
    | spec.bit(spec.NET_F_CTRL_GUEST_OFFLOADS)
)
MSS, SEGMENTS = 1000, 8
ETH, IP4 = 14, 20


def _ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    head = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        IP4 + len(payload),
        ident,
        0x4000,  # DF
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return head[:10] + struct.pack(">H", internet_checksum(head)) + head[12:] + payload


def _pseudo(src: str, dst: str, proto: int, length: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack(">BBH", 0, proto, length)


def _partial(src: str, dst: str, proto: int, length: int) -> bytes:
    """What NEEDS_CSUM wants in the checksum field: the pseudo-header sum, not complemented."""
    return struct.pack(">H", ~internet_checksum(_pseudo(src, dst, proto, length)) & 0xFFFF)


def _tcp(src: str, dst: str, seq: int, payload: bytes, partial: bool) -> bytes:
    seg = struct.pack(">HHIIBBHHH", 40000, 80, seq, 1, 5 << 4, 0x18, 65535, 0, 0) + payload
    check = (
        _partial(src, dst, 6, len(seg))
        if partial
        else struct.pack(">H", internet_checksum(_pseudo(src, dst, 6, len(seg)) + seg))
    )
    return seg[:16] + check + seg[18:]


def _l4_ok(frame: bytes) -> bool:
    """The IPv4 header checksum and the TCP/UDP checksum of ``frame`` are right."""
    ip = frame[ETH:]
    hl = (ip[0] & 15) * 4
    total = struct.unpack(">H", ip[2:4])[0]
    src, dst, proto = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20]), ip[9]
    l4 = ip[hl:total]
    return (
        internet_checksum(ip[:hl]) == 0
        and internet_checksum(_pseudo(src, dst, proto, len(l4)) + l4) == 0
    )


def _gso_header(frame_len: int) -> bytes:
    hdr_len = ETH + IP4 + 20
    return spec.NET_HDR.pack(spec.NET_HDR_F_NEEDS_CSUM, GSO_TCPV4, hdr_len, MSS, ETH + IP4, 16, 0)


def set_guest_offloads(g: NetGuest, offloads: int) -> int:
    """VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET; the device's ack."""
    return g.ctrl(
        spec.NET_CTRL_GUEST_OFFLOADS, spec.NET_CTRL_GUEST_OFFLOADS_SET, struct.pack("<Q", offloads)
    )


def _read_b(fd: int, count: int, timeout: float = 5.0) -> list[tuple[bytes, bytes]]:
    """``count`` IPv4 frames from TAP B as (header, frame); other frames are skipped."""
    out: list[tuple[bytes, bytes]] = []
    while len(out) < count:
        ready, _, _ = select.select([fd], [], [], timeout)
        assert ready, f"only {len(out)} of {count} frames came out of {TAP_B}"
        packet = os.read(fd, 70000)
        header, frame = packet[: spec.NET_HDR_SIZE], packet[spec.NET_HDR_SIZE :]
        if frame[12:14] == b"\x08\x00":
            out.append((header, frame))
    return out


def _setup(ns: str) -> tuple[int, bytes]:
    """Addresses, routes, neighbours; TAP B's fd and TAP A's MAC."""
    fd_b = open_tap(TAP_B, ns)  # vnet header, no offloads
    run_in(ns, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    for tap, addr in ((TAP_A, NS_A), (TAP_B, NS_B)):
        run_in(ns, "ip", "addr", "add", f"{addr}/24", "dev", tap)
        run_in(ns, "ip", "link", "set", tap, "up")
    run_in(ns, "ip", "neigh", "add", VF_IP, "lladdr", VF_MAC.hex(":"), "dev", TAP_A)
    run_in(ns, "ip", "neigh", "add", FAR_IP, "lladdr", FAR_MAC.hex(":"), "dev", TAP_B)
    mac_a = run_in(ns, "cat", f"/sys/class/net/{TAP_A}/address").stdout.strip()
    return fd_b, bytes.fromhex(mac_a.replace(":", ""))


def _to_vf(fd_b: int, mac_b: bytes) -> None:
    """A host's large TCP send towards the VF: one GSO packet written into TAP B."""
    payload = bytes(range(256)) * (MSS * SEGMENTS // 256) + bytes(MSS * SEGMENTS % 256)
    ip = _ipv4(FAR_IP, VF_IP, 6, _tcp(FAR_IP, VF_IP, 5000, payload, partial=True), ident=9)
    frame = mac_b + FAR_MAC + b"\x08\x00" + ip
    os.write(fd_b, _gso_header(len(frame)) + frame)


async def test_the_kernel_finishes_checksums_and_segments_both_ways(tmp_path: Path) -> None:
    with netns("ifco") as ns:
        async with make_card(
            tmp_path, total_vfs=1, backend="tap", tap="ifco%d", netns=ns, macs=(VF_MAC,)
        ) as card:
            (sock,) = await card.vfs_for_vfio(1)
            fd_b, mac_a = _setup(ns)
            mac_b = bytes.fromhex(
                run_in(ns, "cat", f"/sys/class/net/{TAP_B}/address").stdout.strip().replace(":", "")
            )
            vf = card.host.pf.device.vfs[0]  # type: ignore[union-attr]
            assert vf.common.device_features & OFFLOAD_FEATURES == OFFLOAD_FEATURES

            def session() -> None:
                g = NetGuest(sock)
                try:
                    assert g.bring_up(WANTED | OFFLOADS) & OFFLOADS == OFFLOADS
                    g.post_rx(RX0, 32, 4096)

                    # 1. NEEDS_CSUM: UDP with only the pseudo-header sum.
                    data = b"finish my checksum" * 10
                    udp = struct.pack(">HHHH", 40000, 9, 8 + len(data), 0) + data
                    udp = udp[:6] + _partial(VF_IP, FAR_IP, 17, len(udp)) + udp[8:]
                    csum_hdr = spec.NET_HDR.pack(
                        spec.NET_HDR_F_NEEDS_CSUM, 0, 0, 0, ETH + IP4, 6, 0
                    )
                    g.send(
                        mac_a + VF_MAC + b"\x08\x00" + _ipv4(VF_IP, FAR_IP, 17, udp),
                        header=csum_hdr,
                    )
                    ((hdr, out),) = _read_b(fd_b, 1)
                    assert hdr[0] == 0 and out[ETH + IP4 + 8 :] == data
                    assert out[ETH + IP4 + 6 : ETH + IP4 + 8] != udp[6:8]  # finished, not as sent
                    assert _l4_ok(out)

                    # 2. GSO: one 8000-byte TCP segment, cut by the kernel.
                    payload = os.urandom(MSS * SEGMENTS)
                    ip = _ipv4(VF_IP, FAR_IP, 6, _tcp(VF_IP, FAR_IP, 1000, payload, partial=True))
                    big = mac_a + VF_MAC + b"\x08\x00" + ip
                    g.send(big, header=_gso_header(len(big)))
                    segments = _read_b(fd_b, SEGMENTS)
                    got = b""
                    for n, (hdr, seg) in enumerate(segments):
                        assert hdr[1] == spec.NET_HDR_GSO_NONE and len(seg) == ETH + IP4 + 20 + MSS
                        assert (
                            struct.unpack(">I", seg[ETH + IP4 + 4 : ETH + IP4 + 8])[0]
                            == 1000 + n * MSS
                        )
                        assert _l4_ok(seg), n
                        got += seg[ETH + IP4 + 20 :]
                    assert got == payload
                    stats = vf.offload_stats
                    assert (stats.tx_csum, stats.tx_gso, stats.tx_refused) == (2, 1, 0)

                    # 3. From the host: one GSO packet, handed over whole with its header.
                    _to_vf(fd_b, mac_b)
                    ((hdr, frame, _),) = g.receive_packets(RX0, 1)
                    flags, gso_type, _, gso_size, csum_start, csum_offset, _ = spec.NET_HDR.unpack(
                        hdr
                    )
                    assert (gso_type, gso_size) == (GSO_TCPV4, MSS)
                    assert flags & spec.NET_HDR_F_NEEDS_CSUM and (csum_start, csum_offset) == (
                        34,
                        16,
                    )
                    assert len(frame) == ETH + IP4 + 20 + MSS * SEGMENTS
                    assert vf.offload_stats.rx_gso == 1

                    # 3b. The driver switches its RX offloads off (CTRL_GUEST_OFFLOADS)...
                    assert set_guest_offloads(g, 0) == spec.NET_OK
                    _to_vf(fd_b, mac_b)
                    for hdr, seg, _ in g.receive_packets(RX0, SEGMENTS):
                        assert hdr[:2] == b"\0\0" and len(seg) == ETH + IP4 + 20 + MSS
                        assert _l4_ok(seg)
                    # ... never to an inconsistent or unnegotiated set ...
                    tso4, tso6 = spec.bit(spec.NET_F_GUEST_TSO4), spec.bit(spec.NET_F_GUEST_TSO6)
                    csum = spec.bit(spec.NET_F_GUEST_CSUM)
                    assert set_guest_offloads(g, tso4) == spec.NET_ERR  # TSO without checksum
                    assert set_guest_offloads(g, csum | tso6) == spec.NET_ERR  # TSO6 not taken
                    # ... and on again.
                    assert set_guest_offloads(g, csum | tso4) == spec.NET_OK
                    _to_vf(fd_b, mac_b)
                    ((hdr, frame, _),) = g.receive_packets(RX0, 1)
                    assert hdr[1] == GSO_TCPV4 and vf.offload_stats.rx_gso == 2

                    # 4. A driver without the offloads: the kernel segments for it.
                    g.bring_up(WANTED)
                    g.post_rx(RX0, 32, 2048)
                    _to_vf(fd_b, mac_b)
                    packets = g.receive_packets(RX0, SEGMENTS)
                    for hdr, seg, _ in packets:
                        assert hdr[:2] == b"\0\0" and len(seg) == ETH + IP4 + 20 + MSS
                        assert _l4_ok(seg)
                    assert vf.offload_stats.rx_gso == 2  # no more

                    # A TX header asking for what was not negotiated is refused.
                    g.send(big, header=_gso_header(len(big)))
                    g.reap_tx()
                    assert vf.offload_stats.tx_refused == 1
                finally:
                    g.close()

            try:
                with trio.fail_after(30):
                    await trio.to_thread.run_sync(session)
            finally:
                os.close(fd_b)
