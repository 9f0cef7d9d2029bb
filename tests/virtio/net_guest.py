"""A virtio-net guest driver over a real vfio-user client, for the VF tests.

NetGuest connects to a served VF, maps its own memfd guest RAM, enables
MSI-X with one eventfd per vector and runs the virtio-net driver steps:
queues rx0, tx0, rx1, tx1, ctrl on vectors 0-4, config changes on 5.
Received frames are reassembled from mergeable buffers by num_buffers.
"""

from __future__ import annotations

import os
import select
import struct
import time

from virtio_driver import VirtioDriver
from virtio_guest import RW, DriverQueue, GuestRam

from mdevcore.vfio_user.backend import (
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_DATA_EVENTFD,
    PCI_MSIX_IRQ_INDEX,
)
from mdevcore.vfio_user.client import Client
from mdevcore.virtio import spec

RX0, TX0, RX1, TX1, CTRL = range(5)
CONFIG_VECTOR = 5
VECTORS = 6
QSIZE = 64
WANTED = (
    spec.bit(spec.F_VERSION_1)
    | spec.bit(spec.F_EVENT_IDX)
    | spec.bit(spec.F_INDIRECT_DESC)
    | spec.bit(spec.NET_F_MAC)
    | spec.bit(spec.NET_F_STATUS)
    | spec.bit(spec.NET_F_MRG_RXBUF)
    | spec.bit(spec.NET_F_CTRL_VQ)
    | spec.bit(spec.NET_F_CTRL_RX)
    | spec.bit(spec.NET_F_MQ)
    | spec.bit(spec.NET_F_CTRL_MAC_ADDR)
    | spec.bit(spec.NET_F_MTU)
)


def frame(dst: bytes, src: bytes, payload: bytes, ethertype: int = 0x88B5) -> bytes:
    return dst + src + struct.pack(">H", ethertype) + payload


class NetGuest:
    def __init__(self, path: str) -> None:
        self.client = Client(path)
        self.client.negotiate()
        self.ram = GuestRam(4 << 20)
        self.client.dma_map(self.ram.base, self.ram.size, RW, fd=self.ram.fd)
        self.drv = VirtioDriver(self.client)
        self.efds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(VECTORS)]
        self.drv.enable_msix()
        trigger = IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER
        self.client.set_irqs(PCI_MSIX_IRQ_INDEX, trigger, 0, VECTORS, fds=self.efds)
        self.rx_buffers: dict[int, dict[int, int]] = {}  # queue -> head -> buffer address
        self.irq_count = [0] * VECTORS  # interrupts consumed by wait()

    def close(self) -> None:
        self.client.close()
        for fd in self.efds:
            os.close(fd)
        self.ram.close()

    # --- setup -----------------------------------------------------------------------

    def bring_up(self, wanted: int = WANTED) -> int:
        features = self.drv.negotiate(wanted)
        self.drv.write(spec.COMMON_MSIX, 2, CONFIG_VECTOR)
        for index in range(5):
            self.drv.setup_queue(self.ram, index, QSIZE, vector=index)
        self.drv.driver_ok()
        self.rx_buffers = {RX0: {}, RX1: {}}
        return features

    def q(self, index: int) -> DriverQueue:
        return self.drv.queues[index]

    def post_rx(self, index: int, count: int, size: int, kick: bool = True) -> None:
        for _ in range(count):
            buf = self.ram.alloc(size)
            head = self.q(index).add([(buf, size, True)])
            self.rx_buffers[index][head] = buf
        if kick:
            self.drv.kick(index)

    def mac(self) -> bytes:
        return self.drv.device_cfg(spec.NET_CFG_MAC, 6)

    def net_status(self) -> int:
        return int.from_bytes(self.drv.device_cfg(spec.NET_CFG_STATUS, 2), "little")

    # --- traffic -----------------------------------------------------------------------

    def send(self, data: bytes, index: int = TX0, header: bytes | None = None) -> None:
        """One frame behind ``header`` (12 bytes; zeros: no offload)."""
        header = bytes(spec.NET_HDR_SIZE) if header is None else header
        assert len(header) == spec.NET_HDR_SIZE
        buf = self.ram.alloc(spec.NET_HDR_SIZE + len(data))
        self.ram.write(buf, header + data)
        self.q(index).add([(buf, spec.NET_HDR_SIZE + len(data), False)])
        self.drv.kick(index)

    def reap_tx(self, index: int = TX0) -> int:
        return len(self.q(index).reap())

    def wait(self, vector: int, timeout: float = 5.0) -> bool:
        ready, _, _ = select.select([self.efds[vector]], [], [], timeout)
        if ready:
            self.irq_count[vector] += os.eventfd_read(self.efds[vector])
        return bool(ready)

    def interrupts(self, vector: int) -> int:
        try:
            return os.eventfd_read(self.efds[vector])
        except BlockingIOError:
            return 0

    def receive(self, index: int, count: int, timeout: float = 5.0) -> list[tuple[bytes, int]]:
        """``count`` frames from RX queue ``index`` as (frame, num_buffers)."""
        return [(f, n) for _, f, n in self.receive_packets(index, count, timeout)]

    def receive_packets(
        self, index: int, count: int, timeout: float = 5.0
    ) -> list[tuple[bytes, bytes, int]]:
        """``count`` frames from RX queue ``index`` as (header, frame, num_buffers)."""
        q = self.q(index)
        entries: list[tuple[int, int]] = []
        frames: list[tuple[bytes, bytes, int]] = []
        deadline = time.monotonic() + timeout
        while len(frames) < count:
            entries += q.reap()
            q.set_used_event(q.used_seen)  # as Linux's virtqueue_enable_cb_prepare
            entries += q.reap()
            while entries:
                head, length = entries[0]
                hdr = self.ram.read(self.rx_buffers[index][head], spec.NET_HDR_SIZE)
                nbuf = spec.NET_HDR.unpack(hdr)[6]
                if len(entries) < nbuf:
                    break
                data = b"".join(
                    self.ram.read(self.rx_buffers[index].pop(h), n) for h, n in entries[:nbuf]
                )
                del entries[:nbuf]
                frames.append((data[: spec.NET_HDR_SIZE], data[spec.NET_HDR_SIZE :], nbuf))
            if len(frames) >= count:
                break
            left = deadline - time.monotonic()
            assert left > 0, f"only {len(frames)} of {count} frames arrived on queue {index}"
            self.wait(index, min(left, 0.2))
        return frames

    def ctrl(self, cls: int, cmd: int, data: bytes = b"") -> int:
        req = self.ram.alloc(2 + len(data))
        ack = self.ram.alloc(1)
        self.ram.write(req, bytes([cls, cmd]) + data)
        self.ram.write(ack, b"\xee")
        q = self.q(CTRL)
        q.add([(req, 2 + len(data), False), (ack, 1, True)])
        self.drv.kick(CTRL)
        used = q.reap()  # served inside the notify write
        assert len(used) == 1 and used[0][1] == 1, used
        return self.ram.read(ack, 1)[0]
