"""The mtty workload: a byte stream looped through every 16550A port.

What the guest's 8250 driver would do, from the VMM side: 8N1, FIFOs on
(FCR), the RX interrupt enabled and an MSI eventfd wired (counted, not
relied on: the stream is polled through LSR).  Each port gets its own
byte sequence; bytes are written to THR in bursts (one WRITE_MULTI) and
read back from RBR while LSR.DR says data is ready, each checked against
the sequence.  Received bytes are also stored in a log in guest memory,
as a tty layer would buffer them, so the migrated guest pages are checked
too.

At most ``MAX_IN_FLIGHT`` bytes are ever unread (the RX FIFO holds 16;
overfilling it would lose bytes by design), and every iteration leaves at
least one byte in the FIFO, so a migration always catches bytes in flight:
they travel in the device state and are read back on the destination.
With FIFOs that do not enable, one byte at a time.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import time
from typing import Any

from mdevcore.migration.guest_memory import GuestMemory
from mdevcore.migration.workload import WorkloadMismatch, register
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.client import Client

NAME = "mtty"
MAX_IN_FLIGHT = 12
LOG_SIZE = 16 << 10  # per port, in guest memory

RBR_THR, IER, IIR_FCR, LCR, MCR, LSR = 0, 1, 2, 3, 4, 5
LSR_DR, LSR_OE = 0x01, 0x02
IIR_FIFOS = 0xC0
_MSI_TRIGGER = vfio.IRQ_SET_DATA_EVENTFD | vfio.IRQ_SET_ACTION_TRIGGER


def expected(seed: int, port: int, i: int) -> int:
    """Byte ``i`` of port ``port``'s stream; neighbours always differ."""
    return (seed * 131 + port * 0x5B + i * 167 + (i >> 8) * 29) & 0xFF


@dataclasses.dataclass(slots=True)
class _Port:
    region: int
    log_iova: int
    written: int = 0
    read: int = 0

    @property
    def in_flight(self) -> int:
        return self.written - self.read


class MttyWorkload:
    name = NAME

    def __init__(self) -> None:
        self.dev: Client | None = None
        self.mem: GuestMemory | None = None
        self.seed = random.randrange(1 << 16)
        self.ports: list[_Port] = []
        self.depth = MAX_IN_FLIGHT
        self.quiesced = False
        self.mismatches: list[str] = []
        self.counters = {"interrupts": 0, "in_flight_at_quiesce": 0, "restores": 0}
        self._efd: int | None = None
        self._rng = random.Random(self.seed)

    # --- bring-up -------------------------------------------------------------

    def start(self, dev: Client, mem: GuestMemory) -> None:
        self.dev, self.mem = dev, mem
        regions = [i for i in (0, 1) if _region_size(dev, i) > 0]
        if not regions:
            raise OSError(errno.ENODEV, "mtty: no UART BARs")
        for region in regions:
            self.ports.append(_Port(region, mem.alloc(LOG_SIZE)))
            dev.region_write(region, LCR, b"\x03")  # 8N1, DLAB off
            dev.region_write(region, IIR_FCR, b"\x07")  # FIFOs on, both cleared
            dev.region_write(region, MCR, b"\x0b")  # DTR RTS OUT2
            dev.region_write(region, IER, b"\x01")  # RX data interrupt
            if not dev.region_read(region, IIR_FCR, 1)[0] & IIR_FIFOS:
                self.depth = 1  # a UART without FIFOs holds one byte
            dev.region_read(region, LSR, 1)
            while dev.region_read(region, LSR, 1)[0] & LSR_DR:  # stale bytes
                dev.region_read(region, RBR_THR, 1)
        self._wire_irq()

    def _wire_irq(self) -> None:
        assert self.dev is not None
        if self._efd is not None:
            os.close(self._efd)
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.dev.set_irqs(vfio.PCI_MSI_IRQ_INDEX, _MSI_TRIGGER, 0, 1, b"", [self._efd])

    # --- I/O -----------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.quiesced:
            for port in self.ports:
                self._step(port)
            self._count_irqs()
            if time.monotonic() >= deadline:
                return

    def _step(self, port: _Port) -> None:
        dev = self._device()
        target = self._rng.randint(1, self.depth)
        burst = [
            expected(self.seed, port.region, port.written + k)
            for k in range(max(0, target - port.in_flight))
        ]
        if burst:
            dev.region_write_multi((port.region, RBR_THR, bytes([b])) for b in burst)
            port.written += len(burst)
        # Read some back but leave at least one byte in the FIFO (unless it
        # holds only one: then nothing could be written next).
        keep = 1 if self.depth > 1 else 0
        self._drain(port, self._rng.randint(0, port.in_flight - keep))

    def _drain(self, port: _Port, count: int) -> None:
        dev = self._device()
        got = bytearray()
        for _ in range(count):
            lsr = dev.region_read(port.region, LSR, 1)[0]
            if lsr & LSR_OE:
                self.mismatches.append(f"port {port.region}: overrun after byte {port.read}")
            if not lsr & LSR_DR:
                self.mismatches.append(
                    f"port {port.region}: byte {port.read} missing ({port.in_flight} in flight)"
                )
                break
            byte = dev.region_read(port.region, RBR_THR, 1)[0]
            want = expected(self.seed, port.region, port.read)
            if byte != want and len(self.mismatches) < 100:
                self.mismatches.append(
                    f"port {port.region}: byte {port.read} is {byte:#04x}, expected {want:#04x}"
                )
            got.append(byte)
            port.read += 1
        self._log(port, port.read - len(got), bytes(got))

    def _log(self, port: _Port, first: int, data: bytes) -> None:
        """Store received bytes in the port's guest-memory ring (vCPU writes)."""
        mem = self._memory()
        pos = 0
        while pos < len(data):
            at = (first + pos) % LOG_SIZE
            n = min(len(data) - pos, LOG_SIZE - at)
            mem.write(port.log_iova + at, data[pos : pos + n])
            pos += n

    def _count_irqs(self) -> None:
        if self._efd is None:
            return
        try:
            self.counters["interrupts"] += int.from_bytes(os.read(self._efd, 8), "little")
        except BlockingIOError:
            pass

    # --- migration -------------------------------------------------------------

    def quiesce(self) -> None:
        self.quiesced = True
        self.counters["in_flight_at_quiesce"] = sum(p.in_flight for p in self.ports)

    def resume(self) -> None:
        self.quiesced = False

    def save(self) -> bytes:
        state: dict[str, Any] = {
            "seed": self.seed,
            "depth": self.depth,
            "ports": [[p.region, p.log_iova, p.written, p.read] for p in self.ports],
            "mismatches": self.mismatches[:100],
            "counters": self.counters,
        }
        return json.dumps(state).encode()

    def restore(self, data: bytes, dev: Client, mem: GuestMemory) -> None:
        try:
            state = json.loads(data)
            self.seed = int(state["seed"])
            self.depth = int(state["depth"])
            self.ports = [_Port(int(r), int(i), int(w), int(n)) for r, i, w, n in state["ports"]]
            self.mismatches = [str(m) for m in state["mismatches"]]
            self.counters = {k: int(v) for k, v in state["counters"].items()}
        except (ValueError, KeyError, TypeError) as e:
            raise WorkloadMismatch(f"mtty workload state unreadable: {e}") from None
        self.dev, self.mem = dev, mem
        self.counters["restores"] = self.counters.get("restores", 0) + 1
        self._rng = random.Random(self.seed + sum(p.written for p in self.ports))
        self.quiesced = False
        self._wire_irq()  # the VMM re-creates its irqfd on the destination

    # --- checking -------------------------------------------------------------

    def verify(self) -> None:
        dev = self._device()
        for port in self.ports:
            self._drain(port, port.in_flight)
            if dev.region_read(port.region, LSR, 1)[0] & LSR_DR:
                self.mismatches.append(f"port {port.region}: bytes beyond the {port.written} sent")
            self._check_log(port)
        if self.mismatches:
            raise WorkloadMismatch("; ".join(self.mismatches[:10]))

    def _check_log(self, port: _Port) -> None:
        mem = self._memory()
        first = max(0, port.read - LOG_SIZE)
        for i in range(first, port.read):
            byte = mem.mem[port.log_iova - mem.base + i % LOG_SIZE]
            if byte != expected(self.seed, port.region, i):
                self.mismatches.append(f"port {port.region}: guest log byte {i} is {byte:#04x}")
                return

    def stats(self) -> dict[str, int]:
        return {
            "ports": len(self.ports),
            "writes": sum(p.written for p in self.ports),
            "verified_bytes": sum(p.read for p in self.ports),
            "in_flight": sum(p.in_flight for p in self.ports),
            "mismatches": len(self.mismatches),
            **self.counters,
        }

    def close(self) -> None:
        if self._efd is not None:
            os.close(self._efd)
            self._efd = None

    def _device(self) -> Client:
        if self.dev is None:
            raise RuntimeError("mtty workload not started")
        return self.dev

    def _memory(self) -> GuestMemory:
        if self.mem is None:
            raise RuntimeError("mtty workload not started")
        return self.mem


def _region_size(dev: Client, index: int) -> int:
    info = dev.region_info(index)
    if info.fd is not None:
        os.close(info.fd)
    return info.size


register(NAME, MttyWorkload)
