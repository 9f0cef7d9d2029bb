"""The virtio-net workload: numbered pings through a virtio-net device, migratable.

What a guest's virtio_net driver does, from the VMM side (the rings and
buffers in the tool's GuestMemory, driven by virtio_net_driver): reset,
VERSION_1 | MAC | STATUS | MRG_RXBUF | EVENT_IDX, MSI-X with one eventfd
per vector (receiveq1 0, transmitq1 1, config 2), RX buffers posted,
DRIVER_OK.  The device's wire must lead to an IPv4 host that answers
pings: the workload is ``GUEST`` (default 10.79.0.2, or
``$MDEVD_VIRTIO_NET_ADDR``) and pings ``PEER`` (10.79.0.1, or
``$MDEVD_VIRTIO_NET_PEER``), e.g. a bridge in a network namespace
holding the TAPs of both daemons' VFs (tests/migration
test_migration_virtio_net.py builds one).  It finds the peer's MAC by
ARP, answers ARP for its own address, and after a migration announces
itself with a gratuitous ARP (so the bridge learns the new port), as
QEMU's virtio-net announce does.

Load: up to ``WINDOW`` ICMP echo requests in flight, each carrying its
64-bit sequence number and a payload derived from (seed, number) of a
length that varies (16..1400 bytes).  Checks, as replies and used
entries come:

- every reply matches a request in flight, byte for byte (else
  ``corrupted``); a second reply to one number is a ``duplicate``; a
  reply to a number never sent is ``unknown``;
- every used entry names a chain the driver made available and has not
  had back (TX and RX), with a length within its buffer; the used index
  never runs ahead of the ring;
- every RX buffer is reposted once consumed.

A request in flight when the vCPUs stop may lose its reply: the switch
(the bridge) still sends it to the old port.  Such numbers are kept
aside; ``verify`` accepts them lost, but nothing else: after draining,
every other request must be answered, no TX chain may be outstanding,
and each ring's indices in guest memory must equal the driver's (all RX
buffers available again).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import select
import socket
import time
from typing import Any

from mdevcore.migration.guest_memory import GuestMemory
from mdevcore.migration.workload import WorkloadMismatch, register
from mdevcore.migration.workloads import virtio_net_frames as frames
from mdevcore.migration.workloads.virtio_net_driver import Ring, VirtioPciDriver
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.client import Client
from mdevcore.virtio import spec

NAME = "virtio_net"
GUEST, PEER = "10.79.0.2", "10.79.0.1"
WINDOW = 16
QUEUE_SIZE = 64
BUF_SIZE = 2048  # a 1514-byte frame and its 12-byte header fit one buffer
RX, TX = 0, 1  # queue indices (receiveq1, transmitq1) and their MSI-X vectors
CONFIG_VECTOR = 2
VECTORS = 3
FEATURES = (
    spec.bit(spec.F_VERSION_1)
    | spec.bit(spec.F_EVENT_IDX)
    | spec.bit(spec.NET_F_MAC)
    | spec.bit(spec.NET_F_STATUS)
    | spec.bit(spec.NET_F_MRG_RXBUF)
)
MAX_RECORDED = 50  # mismatch messages kept
# Answered numbers remembered for duplicate detection; an older number's
# reply is "unknown", a mismatch all the same.
DEDUP_SPAN = 4096
_TRIGGER = vfio.IRQ_SET_DATA_EVENTFD | vfio.IRQ_SET_ACTION_TRIGGER


@dataclasses.dataclass(slots=True)
class Addresses:
    mac: bytes
    ip: bytes
    peer_ip: bytes
    peer_mac: bytes | None = None


class VirtioNetWorkload:
    name = NAME

    def __init__(self) -> None:
        self.dev: Client | None = None
        self.mem: GuestMemory | None = None
        self.drv: VirtioPciDriver | None = None
        self.rings: dict[int, Ring] = {}
        self.seed = random.randrange(1 << 31)
        self.ident = self.seed & 0xFFFF
        self.addr = Addresses(
            b"",
            socket.inet_aton(os.environ.get("MDEVD_VIRTIO_NET_ADDR", GUEST)),
            socket.inet_aton(os.environ.get("MDEVD_VIRTIO_NET_PEER", PEER)),
        )
        self.next_seq = 0
        self.in_flight: dict[int, float] = {}  # seq -> monotonic time sent (this side)
        self.at_migration: set[int] = set()  # in flight when the vCPUs stopped
        self.answered: set[int] = set()
        self.tx_outstanding: set[int] = set()  # TX heads made available, not yet used
        self.tx_free: list[int] = list(range(QUEUE_SIZE))
        self.rx_outstanding: set[int] = set()
        self.quiesced = False
        self.mismatches: list[str] = []
        self.counters = dict.fromkeys(
            (
                "sent",
                "answered",
                "late",
                "corrupted",
                "duplicates",
                "unknown",
                "arp_replies",
                "rx_frames",
                "tx_frames",
                "interrupts",
                "in_flight_at_quiesce",
                "restores",
            ),
            0,
        )
        self._efds: list[int] = []

    # --- bring-up ---------------------------------------------------------------------

    def start(self, dev: Client, mem: GuestMemory) -> None:
        self.dev, self.mem = dev, mem
        drv = self.drv = VirtioPciDriver(dev, mem)
        features = drv.negotiate(FEATURES)
        if not features & spec.bit(spec.F_VERSION_1) or not features & spec.bit(spec.NET_F_MAC):
            raise OSError(errno.ENODEV, "virtio_net workload: device without VERSION_1 and MAC")
        drv.write(spec.COMMON_MSIX, 2, CONFIG_VECTOR)
        drv.enable_msix()
        self._wire_irqs()
        self.rings = {
            RX: drv.setup_queue(RX, QUEUE_SIZE, RX, BUF_SIZE),
            TX: drv.setup_queue(TX, QUEUE_SIZE, TX, BUF_SIZE),
        }
        rx = self.rings[RX]
        for head in range(QUEUE_SIZE):
            drv.set_desc(rx, head, BUF_SIZE, writable=True)
        drv.publish(rx, list(range(QUEUE_SIZE)))
        self.rx_outstanding = set(range(QUEUE_SIZE))
        drv.driver_ok()
        drv.kick(rx)
        self.addr.mac = drv.device_cfg(spec.NET_CFG_MAC, 6)
        self._resolve_peer()

    def _wire_irqs(self) -> None:
        for fd in self._efds:
            os.close(fd)
        self._efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(VECTORS)]
        self._client().set_irqs(vfio.PCI_MSIX_IRQ_INDEX, _TRIGGER, 0, VECTORS, b"", self._efds)

    def _resolve_peer(self, timeout: float = 10.0) -> None:
        """ARP for the peer until it answers (every half second)."""
        deadline = time.monotonic() + timeout
        while self.addr.peer_mac is None:
            if time.monotonic() >= deadline:
                raise OSError(
                    errno.EHOSTUNREACH,
                    f"virtio_net workload: no ARP reply from {socket.inet_ntoa(self.addr.peer_ip)}",
                )
            self._send_arp(frames.ARP_REQUEST, frames.BROADCAST, bytes(6), self.addr.peer_ip)
            self._poll(0.5)

    # --- frames -----------------------------------------------------------------------

    def _send_arp(self, op: int, dst: bytes, target_mac: bytes, target_ip: bytes) -> None:
        a = self.addr
        self._transmit(frames.arp(op, dst, a.mac, a.ip, target_mac, target_ip))

    def _send_echo(self, seq: int) -> None:
        a = self.addr
        assert a.peer_mac is not None
        data = frames.payload(self.seed, seq)
        self._transmit(
            frames.echo_request(a.peer_mac, a.mac, a.ip, a.peer_ip, self.ident, seq, data)
        )
        self.in_flight[seq] = time.monotonic()
        self.counters["sent"] += 1

    def _transmit(self, frame: bytes) -> None:
        drv, tx = self._driver(), self.rings[TX]
        if not self.tx_free:
            self._reap_tx()
        if not self.tx_free:
            raise WorkloadMismatch(f"virtio_net: TX ring full, {len(self.tx_outstanding)} stuck")
        head = self.tx_free.pop()
        self._memory().write(tx.buffer(head), bytes(spec.NET_HDR_SIZE) + frame)
        drv.set_desc(tx, head, spec.NET_HDR_SIZE + len(frame), writable=False)
        self.tx_outstanding.add(head)
        drv.publish(tx, [head])
        drv.kick(tx)
        self.counters["tx_frames"] += 1

    # --- completions ----------------------------------------------------------------------

    def _mismatch(self, text: str) -> None:
        if len(self.mismatches) < MAX_RECORDED:
            self.mismatches.append(text)

    def _reap_tx(self) -> None:
        try:
            used = self._driver().reap(self.rings[TX])
        except ValueError as e:
            raise WorkloadMismatch(f"virtio_net: {e}") from None
        for head, _length in used:
            if head not in self.tx_outstanding:
                self._mismatch(f"TX used id {head} was not outstanding")
                continue
            self.tx_outstanding.discard(head)
            self.tx_free.append(head)

    def _reap_rx(self) -> None:
        drv, rx, mem = self._driver(), self.rings[RX], self._memory()
        try:
            used = drv.reap(rx)
        except ValueError as e:
            raise WorkloadMismatch(f"virtio_net: {e}") from None
        repost: list[int] = []
        for head, length in used:
            if head not in self.rx_outstanding or not spec.NET_HDR_SIZE <= length <= BUF_SIZE:
                self._mismatch(f"RX used id {head} len {length}: not a buffer in the device")
                continue
            self.rx_outstanding.discard(head)
            data = mem.read(rx.buffer(head), length)
            nbuf = spec.NET_HDR.unpack_from(data)[6]
            if nbuf != 1:  # every frame here fits one buffer
                self._mismatch(f"RX buffer {head}: num_buffers {nbuf}")
            else:
                self._frame(data[spec.NET_HDR_SIZE :])
            repost.append(head)
        if repost:
            for head in repost:
                drv.set_desc(rx, head, BUF_SIZE, writable=True)
            drv.publish(rx, repost)
            self.rx_outstanding.update(repost)
            drv.kick(rx)

    def _frame(self, frame: bytes) -> None:
        self.counters["rx_frames"] += 1
        a = self.addr
        event = frames.parse(frame, a.mac, self.ident)
        if isinstance(event, frames.Arp):
            if event.sender_ip == a.peer_ip:
                a.peer_mac = event.sender_mac
            if event.op == frames.ARP_REQUEST and event.target_ip == a.ip:
                mac, ip = event.sender_mac, event.sender_ip
                self._send_arp(frames.ARP_REPLY, mac, mac, ip)
                self.counters["arp_replies"] += 1
        elif isinstance(event, frames.EchoReply):
            self._echo_reply(event)

    def _echo_reply(self, reply: frames.EchoReply) -> None:
        seq = reply.seq
        if seq in self.answered:
            self.counters["duplicates"] += 1
            self._mismatch(f"reply {seq} twice")
            return
        if seq not in self.in_flight and seq not in self.at_migration:
            # a duplicate of a number forgotten by now is caught here too
            self.counters["unknown"] += 1
            self._mismatch(f"reply to {seq}, never sent (next {self.next_seq})")
            return
        if reply.data != frames.payload(self.seed, seq) or frames.checksum(reply.icmp) != 0:
            self.counters["corrupted"] += 1
            self._mismatch(f"reply {seq} differs from its request")
            return
        if seq in self.at_migration:
            self.at_migration.discard(seq)
            self.counters["late"] += 1
        self.in_flight.pop(seq, None)
        self.answered.add(seq)
        self.counters["answered"] += 1
        if len(self.answered) > 2 * DEDUP_SPAN:
            floor = self.next_seq - DEDUP_SPAN
            self.answered = {s for s in self.answered if s >= floor}

    def _poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` for an interrupt, then reap both queues."""
        if timeout > 0:
            ready, _, _ = select.select(self._efds, [], [], timeout)
            for fd in ready:
                self.counters["interrupts"] += int.from_bytes(os.read(fd, 8), "little")
        self._reap_tx()
        self._reap_rx()

    # --- I/O ------------------------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.quiesced:
            # Refill, then look at the clock: the window is full whenever
            # this returns, as a busy guest's is at any moment a migration
            # may stop it (returning after a poll left it empty most times).
            while len(self.in_flight) < WINDOW:
                self._send_echo(self.next_seq)
                self.next_seq += 1
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._poll(min(left, 0.005))
            self._check_stuck()

    def _check_stuck(self, limit: float = 5.0) -> None:
        now = time.monotonic()
        for seq, sent in list(self.in_flight.items()):
            if now - sent > limit:
                self._mismatch(f"request {seq} unanswered for {limit} s")
                del self.in_flight[seq]

    # --- migration ------------------------------------------------------------------------

    def quiesce(self) -> None:
        self.quiesced = True
        self.counters["in_flight_at_quiesce"] += len(self.in_flight)

    def resume(self) -> None:
        self.quiesced = False

    def save(self) -> bytes:
        a = self.addr
        state: dict[str, Any] = {
            "seed": self.seed,
            "addr": [a.mac.hex(), a.ip.hex(), a.peer_ip.hex(), (a.peer_mac or b"").hex()],
            "next_seq": self.next_seq,
            # What was in flight may or may not get its reply now: set aside.
            "at_migration": sorted(self.at_migration | set(self.in_flight)),
            "answered": sorted(self.answered),
            "rings": {str(k): r.to_dict() for k, r in self.rings.items()},
            "tx_outstanding": sorted(self.tx_outstanding),
            "rx_outstanding": sorted(self.rx_outstanding),
            "mismatches": self.mismatches,
            "counters": self.counters,
        }
        return json.dumps(state).encode()

    def restore(self, data: bytes, dev: Client, mem: GuestMemory) -> None:
        try:
            state = json.loads(data)
            self.seed = int(state["seed"])
            mac, ip, peer_ip, peer_mac = (bytes.fromhex(h) for h in state["addr"])
            self.next_seq = int(state["next_seq"])
            self.at_migration = {int(s) for s in state["at_migration"]}
            self.answered = {int(s) for s in state["answered"]}
            self.rings = {int(k): Ring.from_dict(v) for k, v in state["rings"].items()}
            self.tx_outstanding = {int(h) for h in state["tx_outstanding"]}
            self.rx_outstanding = {int(h) for h in state["rx_outstanding"]}
            self.mismatches = [str(m) for m in state["mismatches"]]
            self.counters = {str(k): int(v) for k, v in state["counters"].items()}
            if set(self.rings) != {RX, TX}:
                raise ValueError("rings")
        except (ValueError, KeyError, TypeError) as e:
            raise WorkloadMismatch(f"virtio_net workload state unreadable: {e}") from None
        self.ident = self.seed & 0xFFFF
        self.addr = Addresses(mac, ip, peer_ip, peer_mac or None)
        self.tx_free = [h for h in range(QUEUE_SIZE) if h not in self.tx_outstanding]
        self.in_flight = {}
        self.dev, self.mem = dev, mem
        self.drv = VirtioPciDriver(dev, mem)  # the device came with its registers and MSI-X
        self.counters["restores"] += 1
        self.quiesced = False
        self._wire_irqs()  # the VMM re-creates its irqfds on the destination
        # Announce (a gratuitous ARP): the switch learns where the MAC went.
        self._send_arp(frames.ARP_REQUEST, frames.BROADCAST, bytes(6), self.addr.ip)
        self._poll(0)

    # --- checking -------------------------------------------------------------------------

    def _drain(self, deadline: float) -> None:
        """Poll until nothing is in flight (no need to wait once something is known wrong)."""
        while (self.in_flight or self.tx_outstanding) and not self.mismatches:
            if time.monotonic() >= deadline:
                break
            self._poll(0.05)

    def verify(self) -> None:
        deadline = time.monotonic() + 5.0
        self._drain(deadline)
        self._poll(0.05)  # late or unexpected completions
        # That poll may have answered the peer's ARP request: its TX chain
        # completes before the rings are compared, or the check races it.
        self._drain(deadline)
        drv = self._driver()
        for seq in sorted(self.in_flight)[:5]:
            self._mismatch(f"request {seq} never answered (not in flight at a migration)")
        if self.tx_outstanding:
            self._mismatch(f"TX chains {sorted(self.tx_outstanding)[:8]} never used")
        for index, ring in self.rings.items():
            used, avail = drv.used_idx(ring), drv.avail_idx_in_memory(ring)
            if used != ring.used_seen or avail != ring.avail_idx:
                self._mismatch(
                    f"queue {index}: used/avail idx {used}/{avail} in memory, "
                    f"driver's {ring.used_seen}/{ring.avail_idx}"
                )
        rx = self.rings[RX]
        if (rx.avail_idx - rx.used_seen) & 0xFFFF != QUEUE_SIZE or len(self.rx_outstanding) != (
            QUEUE_SIZE
        ):
            self._mismatch(f"RX buffers not all reposted: {len(self.rx_outstanding)}")
        accounted = self.counters["answered"] + len(self.at_migration) + len(self.in_flight)
        if accounted != self.counters["sent"]:
            self._mismatch(f"{self.counters['sent']} sent, {accounted} accounted for")
        if self.mismatches:
            raise WorkloadMismatch("; ".join(self.mismatches[:10]))

    def stats(self) -> dict[str, int]:
        return {
            **self.counters,
            "lost_at_migration": len(self.at_migration),
            "in_flight": len(self.in_flight),
            "mismatches": len(self.mismatches),
        }

    def close(self) -> None:
        for fd in self._efds:
            os.close(fd)
        self._efds = []

    def _client(self) -> Client:
        if self.dev is None:
            raise RuntimeError("virtio_net workload not started")
        return self.dev

    def _driver(self) -> VirtioPciDriver:
        if self.drv is None:
            raise RuntimeError("virtio_net workload not started")
        return self.drv

    def _memory(self) -> GuestMemory:
        if self.mem is None:
            raise RuntimeError("virtio_net workload not started")
        return self.mem


register(NAME, VirtioNetWorkload)
