"""The frames the virtio_net workload sends and understands: ARP and ICMP echo over IPv4.

Builders return whole Ethernet frames; :func:`parse` turns a received
frame into an event the workload acts on (or None for anything else).
An echo request carries its 64-bit sequence number and then bytes only
that number has (:func:`payload`), so a reply proves itself intact.
"""

from __future__ import annotations

import dataclasses
import random
import struct

ETH_IPV4, ETH_ARP = b"\x08\x00", b"\x08\x06"
BROADCAST = b"\xff" * 6
ARP_REQUEST, ARP_REPLY = 1, 2
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8


def checksum(data: bytes) -> int:
    """RFC 1071 (2**16 is 1 modulo 0xFFFF: the words' sum is the number modulo 0xFFFF)."""
    if len(data) % 2:
        data += b"\0"
    total = int.from_bytes(data, "big") % 0xFFFF
    if total == 0 and any(data):
        total = 0xFFFF
    return ~total & 0xFFFF


def payload(seed: int, seq: int) -> bytes:
    """What request ``seq`` carries: its number, then 8..1399 bytes only it has."""
    rng = random.Random(seed * 1_000_003 + seq)
    return struct.pack(">Q", seq) + rng.randbytes(8 + rng.randrange(1392))


def arp(op: int, dst: bytes, mac: bytes, ip: bytes, target_mac: bytes, target_ip: bytes) -> bytes:
    body = struct.pack(">HHBBH", 1, 0x0800, 6, 4, op) + mac + ip + target_mac + target_ip
    return dst + mac + ETH_ARP + body


def echo_request(
    dst: bytes, mac: bytes, ip: bytes, peer_ip: bytes, ident: int, seq: int, data: bytes
) -> bytes:
    icmp = struct.pack(">BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq & 0xFFFF) + data
    icmp = icmp[:2] + struct.pack(">H", checksum(icmp)) + icmp[4:]
    head = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), seq & 0xFFFF, 0, 64, 1, 0, ip, peer_ip
    )
    head = head[:10] + struct.pack(">H", checksum(head)) + head[12:]
    return dst + mac + ETH_IPV4 + head + icmp


@dataclasses.dataclass(frozen=True, slots=True)
class Arp:
    op: int
    sender_mac: bytes
    sender_ip: bytes
    target_ip: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class EchoReply:
    """An ICMP echo reply with our identifier; ``icmp`` is the whole ICMP message."""

    icmp: bytes

    @property
    def seq(self) -> int:
        return int(struct.unpack(">Q", self.icmp[8:16])[0])

    @property
    def data(self) -> bytes:
        return self.icmp[8:]


def parse(frame: bytes, mac: bytes, ident: int) -> Arp | EchoReply | None:
    """What ``frame`` means to a host with ``mac`` pinging with ``ident``."""
    if len(frame) < 14 or frame[:6] not in (mac, BROADCAST):
        return None
    kind, body = frame[12:14], frame[14:]
    if kind == ETH_ARP and len(body) >= 28:
        (op,) = struct.unpack(">H", body[6:8])
        return Arp(op, body[8:14], body[14:18], body[24:28])
    if kind == ETH_IPV4 and len(body) >= 28 and body[9] == 1:
        hl = (body[0] & 15) * 4
        icmp = body[hl : struct.unpack(">H", body[2:4])[0]]
        if (
            len(icmp) >= 16
            and icmp[0] == ICMP_ECHO_REPLY
            and struct.unpack(">H", icmp[4:6])[0] == ident
        ):
            return EchoReply(icmp)
    return None
