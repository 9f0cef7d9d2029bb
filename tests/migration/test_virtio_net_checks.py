"""The virtio_net workload's reply checks, without a device: each kind of bad reply is caught."""

from __future__ import annotations

import struct
import time

from mdevcore.migration.workloads import virtio_net_frames as frames
from mdevcore.migration.workloads.virtio_net import VirtioNetWorkload

MAC, PEER_MAC = bytes.fromhex("02aa00000001"), bytes.fromhex("02aa00000002")


def reply(wl: VirtioNetWorkload, seq: int, data: bytes | None = None) -> bytes:
    """The peer's answer to request ``seq`` (``data``: what it echoes instead)."""
    a = wl.addr
    body = frames.payload(wl.seed, seq) if data is None else data
    req = frames.echo_request(MAC, PEER_MAC, a.peer_ip, a.ip, wl.ident, seq, body)
    icmp = bytearray(req[34:])
    icmp[0], icmp[2:4] = frames.ICMP_ECHO_REPLY, b"\0\0"
    icmp[2:4] = struct.pack(">H", frames.checksum(bytes(icmp)))
    return req[:34] + bytes(icmp)


def test_replies_are_matched_checked_and_counted() -> None:
    wl = VirtioNetWorkload()
    wl.addr.mac = MAC
    wl.next_seq = 4
    wl.in_flight = dict.fromkeys(range(4), time.monotonic())
    wl._frame(reply(wl, 0))
    assert wl.counters["answered"] == 1 and 0 not in wl.in_flight
    wl._frame(reply(wl, 0))  # twice
    flipped = bytearray(frames.payload(wl.seed, 1))
    flipped[-1] ^= 1
    wl._frame(reply(wl, 1, bytes(flipped)))  # one bit off
    wl._frame(reply(wl, 9))  # never sent
    c = wl.counters
    assert (c["duplicates"], c["corrupted"], c["unknown"], c["answered"]) == (1, 1, 1, 1)
    assert len(wl.mismatches) == 3
    # A reply for another pinger (other identifier) is not ours to judge.
    wl.ident ^= 1
    wl._frame(reply(wl, 3))
    assert wl.counters["rx_frames"] == 5 and len(wl.mismatches) == 3


def test_arp_for_us_is_answered_and_teaches_the_peer_mac() -> None:
    wl = VirtioNetWorkload()
    wl.addr.mac = MAC
    sent: list[bytes] = []  # what it transmits (no device here)
    wl._transmit = sent.append  # type: ignore[method-assign,assignment]
    a = wl.addr
    wl._frame(frames.arp(frames.ARP_REQUEST, frames.BROADCAST, PEER_MAC, a.peer_ip, bytes(6), a.ip))
    assert a.peer_mac == PEER_MAC
    (answer,) = sent
    event = frames.parse(answer, PEER_MAC, 0)  # as the peer sees it
    assert isinstance(event, frames.Arp) and event.op == frames.ARP_REPLY
    assert answer[:6] == PEER_MAC and event.sender_ip == a.ip
