"""The mtty card and its parent driver, on the PciDevice API.

This is the userspace twin of Linux's samples/vfio-mdev/mtty.c: a PCI
serial card the guest's own 8250_pci driver binds to (it claims the WCH
CH352 IDs), with one or two 16550A-compatible ports (see ``uart.py``)
whose transmit line is looped back to their receive line.

Register accesses are mtty.c's: an access of several bytes is split as
mtty_read/mtty_write split it (4 bytes where 4-aligned, else 2 where
2-aligned, else 1), and each piece is one access to the register at its
first byte: a write uses the low byte, a read returns the register in the
low byte and 0 above (mtty.c leaves those bytes uninitialised).

Interrupts are events, as in mtty.c's mtty_trigger_interrupt: each time a
port raises one (see uart.py for when) the card sends one MSI message if
the client wired the MSI eventfd (mtty.c offers one vector without an MSI
capability), else one INTx signal, which auto-masks until the client
unmasks it.  There is no line level: unmasking does not signal again by
itself.  One difference, from PciDevice: an INTx raised while masked is
delivered at the unmask, where mtty.c drops it.

Reset: as with mtty.c, DEVICE_RESET returns the migration state to
RUNNING and leaves the ports as they are.

Migration: mtty.c's stream, byte for byte.  Its ``struct mtty_data`` header
(magic, version 1.0, nr_ports, flags) is the PRE_COPY data; the ports, each
a ``struct serial_port`` (uart.py), follow at STOP_COPY.  Going to
STOP_COPY straight from STOP gives header and ports there.  The resume side
checks the header, the length and every port field before changing
anything, and refuses a bad stream with EINVAL.

Where this still differs from mtty.c, outside this file's reach (PciDevice
owns them): the config region is 256 bytes, not 255, and DEVICE_INFO
offers RESET.  And the one difference in uart.py: a full FIFO reads as full.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence

from mdevcore.driver import DeviceBackend, MdevDriver, MdevTypeSpec
from mdevcore.pci import config as cfg
from mdevcore.pci.device import BarKind, Irq, PciDevice, PciIdentity
from mdevcore.pci.migration import (
    MIGRATION_P2P,
    MIGRATION_PRE_COPY,
    MIGRATION_STOP_COPY,
    SAVING_STATES,
    MigState,
)

from .uart import STATE_SIZE, Uart16550

log = logging.getLogger(__name__)

PARENT_NAME = "mtty"
SYSFS_PATH = "devices/virtual/mtty/mtty"
MAX_PORTS = 24  # ports shared by all mtty devices, as MAX_MTTYS in the kernel

IO_BAR_SIZE = 8

# Identity of the kernel sample: WCH CH352 2S, a "16550-compatible serial
# controller" (class 07/00/02); command I/O+, status DEVSEL medium.
IDENTITY = PciIdentity(
    vendor_id=0x4348,
    device_id=0x3253,
    class_code=0x070002,
    revision=0x10,
    subsystem_vendor_id=0x4348,
    subsystem_id=0x3253,
    interrupt_pin=1,
    command=0x0001,
    status=0x0200,
)
# Vendor-specific config bytes the kernel sample fills in.
VENDOR_BYTES: tuple[tuple[int, bytes], ...] = (
    (0x40, bytes([0x23, 0x00, 0x00, 0x80, 0x23, 0x00, 0x00, 0x00, 0x23, 0x00, 0x00, 0x00, 0x23])),
    (0x60, b"PCI Serial/UART"),
)

# Migration stream: the kernel sample's struct mtty_data header
# (magic, major, minor, nr_ports, flags), then each port's struct
# serial_port (Uart16550.save()).
MIG_MAGIC = 0x7E9D09898C3E2C4E
MIG_MAJOR = 1
MIG_MINOR = 0
_MIG_HEADER = struct.Struct("<QIIII")


class MttyDevice(PciDevice):
    """One mtty card with ``nr_ports`` (1 or 2) looped-back serial ports."""

    migration_flags = MIGRATION_STOP_COPY | MIGRATION_P2P | MIGRATION_PRE_COPY

    def __init__(self, nr_ports: int, *, name: str = "mtty") -> None:
        if nr_ports not in (1, 2):
            raise OSError(errno.EINVAL, f"mtty has 1 or 2 ports, not {nr_ports}")
        super().__init__(IDENTITY, name=name)
        self.nr_ports = nr_ports
        for bar in range(nr_ports):
            self.add_bar(bar, IO_BAR_SIZE, BarKind.IO)
        # Only I/O decode and INTx-disable do anything on this card: no memory
        # BARs, no DMA, no error reporting, so those command bits are
        # hardwired to 0 (the guest's lspci shows "I/O+ Mem- BusMaster-"
        # as with mtty.c, which ignores command writes altogether).
        self.config.set(
            cfg.COMMAND,
            IDENTITY.command.to_bytes(2, "little"),
            writable_mask=cfg.COMMAND_IO | cfg.COMMAND_INTX_DISABLE,
        )
        for offset, data in VENDOR_BYTES:
            self.config.set(offset, data)
        # IRQ indexes as the kernel sample reports them: one MSI vector
        # although config space has no MSI capability (a client may still
        # wire it up), and no ERR/REQ interrupts.
        self.declare_irqs(Irq.MSI, 1)
        for absent in (Irq.MSIX, Irq.ERR, Irq.REQ):
            self.declare_irqs(absent, None)  # GET_IRQ_INFO: EINVAL, as mtty.c
        self.ports = [Uart16550(self._port_interrupt) for _ in range(nr_ports)]
        self._header_sent = False  # this saving session's header went out in PRE_COPY

    # --- BAR accesses: BAR n is port n -------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        port = self._uart(bar)
        out = bytearray()
        for pos, width in _chunks(offset, size):
            # One register access per chunk, its value in the low byte; the
            # rest of the chunk is 0 (mtty.c leaves it uninitialised).
            out += port.read(pos).to_bytes(width, "little")
        return bytes(out)

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        port = self._uart(bar)
        for pos, _width in _chunks(offset, len(data)):
            # mtty.c writes only the chunk's low byte, to its first register.
            port.write(pos, data[pos - offset])

    def on_reset(self) -> None:
        # mtty.c's VFIO_DEVICE_RESET returns migration to RUNNING (PciDevice
        # does that) and leaves the ports as they are: so does this card.
        self.log_guest("ports kept", "reset: ports keep their state, as with mtty.c")

    # --- interrupts -----------------------------------------------------------

    def _port_interrupt(self) -> None:
        # mtty_trigger_interrupt: one MSI message, or one INTx signal that
        # auto-masks; nothing while no eventfd is set up.  (An INTx raised
        # while masked is delivered at unmask by PciDevice, where mtty.c drops
        # it: at worst the guest sees one interrupt more, never one less.)
        if self.irq_in_use() is not None:
            self.raise_irq(0)

    # --- migration --------------------------------------------------------------

    def on_migration_state(self, old: MigState, new: MigState) -> None:
        # Called before PciDevice fills the stream for this arc.  Reaching
        # STOP_COPY from a pre-copy state, the header is already out.
        self._header_sent = old in SAVING_STATES and new == MigState.STOP_COPY

    def save_precopy(self) -> bytes:
        """PRE_COPY data: mtty.c's header, the whole of its initial bytes."""
        return self._header()

    def save_state(self) -> bytes:
        """STOP_COPY data: the ports, preceded by the header unless PRE_COPY sent it."""
        ports = b"".join(port.save() for port in self.ports)
        if self._header_sent:
            self._header_sent = False
            return ports
        return self._header() + ports

    def migration_data_size(self) -> int:
        # mtty_get_data_size: the whole struct mtty_data, header included.
        return _MIG_HEADER.size + self.nr_ports * STATE_SIZE

    def load_state(self, data: bytes) -> None:
        expected = self.migration_data_size()
        if len(data) < _MIG_HEADER.size:
            raise OSError(errno.EINVAL, f"mtty state is {len(data)} bytes: no header")
        magic, major, minor, nr_ports, flags = _MIG_HEADER.unpack_from(data)
        if magic != MIG_MAGIC or (major, minor) != (MIG_MAJOR, MIG_MINOR) or flags:
            raise OSError(errno.EINVAL, "mtty state: bad magic, version or flags")
        if nr_ports != self.nr_ports:
            raise OSError(
                errno.EINVAL, f"mtty state is for {nr_ports} ports, device has {self.nr_ports}"
            )
        if len(data) != expected:
            raise OSError(errno.EINVAL, f"mtty state is {len(data)} bytes, expected {expected}")
        # Parse every port before touching any, so a bad stream changes nothing.
        records = [
            data[_MIG_HEADER.size + i * STATE_SIZE : _MIG_HEADER.size + (i + 1) * STATE_SIZE]
            for i in range(self.nr_ports)
        ]
        for record in records:
            Uart16550.parse(record)  # raises before any port is touched
        for port, record in zip(self.ports, records, strict=True):
            port.load(record)
        self.log.info("state of %d port(s) loaded", self.nr_ports)

    def _header(self) -> bytes:
        return _MIG_HEADER.pack(MIG_MAGIC, MIG_MAJOR, MIG_MINOR, self.nr_ports, 0)

    # --- helpers -------------------------------------------------------------

    def _uart(self, bar: int) -> Uart16550:
        if not 0 <= bar < self.nr_ports:
            raise OSError(errno.EINVAL, f"{self.name}: no port behind BAR{bar}")
        return self.ports[bar]


def _chunks(offset: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, width) of each access mtty.c makes of a ``size``-byte one.

    Like mtty_read/mtty_write: 4 bytes where 4-aligned with 4 left, else 2
    where 2-aligned with 2 left, else 1.
    """
    end = offset + size
    while offset < end:
        left = end - offset
        width = 4 if left >= 4 and offset % 4 == 0 else 2 if left >= 2 and offset % 2 == 0 else 1
        yield offset, width
        offset += width


class MttyDriver(MdevDriver):
    """The "mtty" parent: types mtty-1 and mtty-2 over a pool of 24 ports."""

    name = PARENT_NAME
    types: Sequence[MdevTypeSpec] = (
        MdevTypeSpec("1", "Single port serial"),
        MdevTypeSpec("2", "Dual port serial"),
    )
    _PORTS_PER_TYPE = {"1": 1, "2": 2}

    def __init__(self, total_ports: int = MAX_PORTS) -> None:
        self._free = total_ports
        self._reserved: dict[uuid.UUID, int] = {}
        # The core may call from more than one thread; the pool must not tear.
        self._lock = threading.Lock()

    @property
    def free_ports(self) -> int:
        return self._free

    def available_instances(self, type_name: str) -> int:
        return self._free // self._ports(type_name)

    def probe(self, uuid: uuid.UUID, type_name: str) -> DeviceBackend:
        nr_ports = self._ports(type_name)
        with self._lock:
            if uuid in self._reserved:
                raise OSError(errno.EEXIST, f"mtty {uuid} already exists")
            if self._free < nr_ports:
                raise OSError(
                    errno.ENOSPC, f"mtty-{type_name} needs {nr_ports} ports, {self._free} free"
                )
            self._free -= nr_ports
            self._reserved[uuid] = nr_ports
        try:
            device = MttyDevice(nr_ports, name=f"mtty {uuid}")
        except BaseException:
            self._release(uuid)  # a failed create keeps no ports
            raise
        log.info("mtty %s: created with %d port(s), %d left", uuid, nr_ports, self._free)
        return device

    def remove(self, uuid: uuid.UUID, device: DeviceBackend) -> None:
        self._release(uuid)
        log.info("mtty %s: removed, %d port(s) free", uuid, self._free)

    def device_attributes(self, uuid: uuid.UUID, device: DeviceBackend) -> Mapping[str, str]:
        return {"vendor/sample_mdev_dev": f"This is MDEV {uuid}\n"}

    def _release(self, uuid: uuid.UUID) -> None:
        with self._lock:
            nr_ports = self._reserved.pop(uuid, None)
            if nr_ports is None:
                raise OSError(errno.ENODEV, f"mtty {uuid} was not created here")
            self._free += nr_ports

    def _ports(self, type_name: str) -> int:
        try:
            return self._PORTS_PER_TYPE[type_name]
        except KeyError:
            raise OSError(errno.EINVAL, f"mtty has no type {type_name!r}") from None
