"""The far end of a VF's datagram backend in guest tests: a tiny IPv4 host.

It answers ARP requests and ICMP echo requests for its address, counts
what it saw, and can run a hook after the n-th echo request (the guest
test takes the VF's link down and up from there).  Frames are whole
Ethernet frames, one per datagram, as DatagramBackend carries them.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
from collections.abc import Awaitable, Callable

import trio

ETH_ARP = 0x0806
ETH_IPV4 = 0x0800


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f">{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclasses.dataclass
class Responder:
    sock: socket.socket
    mac: bytes
    ip: bytes
    echo_requests: int = 0
    arp_requests: int = 0
    largest_echo: int = 0
    guest_macs: set[bytes] = dataclasses.field(default_factory=set)
    after_echo: tuple[int, Callable[[], Awaitable[None]]] | None = None

    def answer(self, frame: bytes) -> bytes | None:
        if len(frame) < 14:
            return None
        dst, src, ethertype = frame[:6], frame[6:12], struct.unpack(">H", frame[12:14])[0]
        self.guest_macs.add(src)
        if ethertype == ETH_ARP and len(frame) >= 42:
            return self._arp(frame, src)
        if ethertype == ETH_IPV4 and dst == self.mac and len(frame) >= 34:
            return self._icmp(frame, src)
        return None

    def _arp(self, frame: bytes, src: bytes) -> bytes | None:
        op = struct.unpack(">H", frame[20:22])[0]
        sender_mac, sender_ip, target_ip = frame[22:28], frame[28:32], frame[38:42]
        if op != 1 or target_ip != self.ip:
            return None
        self.arp_requests += 1
        body = struct.pack(">HHBBH", 1, ETH_IPV4, 6, 4, 2)
        body += self.mac + self.ip + sender_mac + sender_ip
        return src + self.mac + struct.pack(">H", ETH_ARP) + body

    def _icmp(self, frame: bytes, src: bytes) -> bytes | None:
        ip = frame[14:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        if ip[9] != 1 or ip[16:20] != self.ip or total > len(ip) or ihl < 20:
            return None
        icmp = ip[ihl:total]
        if len(icmp) < 8 or icmp[0] != 8:
            return None
        self.echo_requests += 1
        self.largest_echo = max(self.largest_echo, total)
        reply = b"\0\0\0\0" + icmp[4:]
        reply = reply[:2] + struct.pack(">H", inet_checksum(reply)) + reply[4:]
        header = bytearray(ip[:ihl])
        header[12:16], header[16:20] = ip[16:20], ip[12:16]
        header[10:12] = b"\0\0"
        header[10:12] = struct.pack(">H", inet_checksum(bytes(header)))
        return src + self.mac + struct.pack(">H", ETH_IPV4) + bytes(header) + reply

    async def serve(self) -> None:
        self.sock.setblocking(False)
        async with trio.open_nursery() as nursery:
            while True:
                await trio.lowlevel.wait_readable(self.sock)
                try:
                    frame = self.sock.recv(65600)
                except BlockingIOError:
                    continue
                reply = self.answer(frame)
                if reply is not None:
                    self.sock.send(reply)
                if self.after_echo is not None and self.echo_requests == self.after_echo[0]:
                    hook = self.after_echo[1]
                    self.after_echo = None
                    nursery.start_soon(hook)
