"""The mtty card and its parent driver, on the PciDevice API.

This is the userspace twin of Linux's samples/vfio-mdev/mtty.c: a PCI
serial card the guest's own 8250_pci driver binds to (it claims the WCH
CH352 IDs), with one or two 16550A ports (see ``uart.py``) whose transmit
line is looped back to their receive line.

Interrupts: each port has an interrupt output; the card ORs them into one
line, like a real card's INTA#.  With INTx the line is a level
(``set_intx``): it fires when it rises, auto-masks, and when the client
unmasks it while the line is still high it fires again, as a
level-triggered PCI line would, so an event that arrived during the
guest's handler is never lost.  If the client wired up the MSI eventfd
instead (mtty.c offers one vector without an MSI capability), each rising
edge sends one message.

Where this differs from mtty.c, on purpose: the 16550A is modelled as the
chip behaves (see uart.py) rather than as mtty.c approximates it; the
config region is 256 bytes, not 255; DEVICE_INFO offers RESET so QEMU
resets the card (mtty.c ignores the UARTs on reset); the migration header
is mtty.c's, but the whole stream is produced at STOP_COPY (nothing in
PRE_COPY) and the per-port records are this model's own.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import uuid
from collections.abc import Mapping, Sequence

from mdevcore.driver import MdevDriver, MdevTypeSpec
from mdevcore.pci import config as cfg
from mdevcore.pci.device import BarKind, Irq, PciDevice, PciIdentity
from mdevcore.pci.migration import MIGRATION_P2P, MIGRATION_PRE_COPY, MIGRATION_STOP_COPY
from mdevcore.vfio_user.backend import DeviceBackend

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
# (magic, major, minor, nr_ports, flags), then each port's Uart16550.save().
MIG_MAGIC = 0x7E9D09898C3E2C4E
MIG_MAJOR = 1
MIG_MINOR = 0
_MIG_HEADER = struct.Struct("<QIIII")


class MttyDevice(PciDevice):
    """One mtty card with ``nr_ports`` (1 or 2) looped-back 16550A ports."""

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
        self._line = False
        self.ports = [Uart16550(self._port_irq) for _ in range(nr_ports)]

    # --- BAR accesses: BAR n is port n -------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> bytes:
        # A wide access to an 8-bit device is a run of byte accesses.
        port = self._uart(bar)
        return bytes(port.read(offset + i) for i in range(size))

    def bar_write(self, bar: int, offset: int, data: bytes) -> None:
        port = self._uart(bar)
        for i, byte in enumerate(data):
            port.write(offset + i, byte)

    def on_reset(self) -> None:
        self.log.info("reset: ports back to power-on state")
        for port in self.ports:
            port.reset()

    # --- interrupts -----------------------------------------------------------

    def on_irqs_changed(self, index: int) -> None:
        # The client may have switched between INTx and MSI while the line
        # was high: the INTx level must follow whichever is in use now.
        self._drive_intx()

    def _port_irq(self, level: bool) -> None:
        line = any(p.irq_level for p in self.ports)
        if line == self._line:
            return
        self._line = line
        if self._msi_in_use():
            # MSI is an edge: one message per rising edge of the line.
            if line:
                self.trigger(Irq.MSI, 0)
        self._drive_intx()

    def _msi_in_use(self) -> bool:
        return self.irq_in_use() == Irq.MSI

    def _drive_intx(self) -> None:
        # INTx is a level: PciDevice re-signals on every unmask while high.
        want = self._line and not self._msi_in_use()
        if self.intx_level != want:
            self.set_intx(want)

    @property
    def irq_line(self) -> bool:
        """The card's interrupt output (OR of the ports')."""
        return self._line

    # --- migration --------------------------------------------------------------

    def save_state(self) -> bytes:
        header = _MIG_HEADER.pack(MIG_MAGIC, MIG_MAJOR, MIG_MINOR, self.nr_ports, 0)
        return header + b"".join(port.save() for port in self.ports)

    def load_state(self, data: bytes) -> None:
        expected = _MIG_HEADER.size + self.nr_ports * STATE_SIZE
        if len(data) != expected:
            raise OSError(errno.EINVAL, f"mtty state is {len(data)} bytes, expected {expected}")
        magic, major, minor, nr_ports, flags = _MIG_HEADER.unpack_from(data)
        if magic != MIG_MAGIC or (major, minor) != (MIG_MAJOR, MIG_MINOR) or flags:
            raise OSError(errno.EINVAL, "mtty state: bad magic, version or flags")
        if nr_ports != self.nr_ports:
            raise OSError(
                errno.EINVAL, f"mtty state is for {nr_ports} ports, device has {self.nr_ports}"
            )
        # Validate every port before touching any, so a bad stream changes nothing.
        staged = [Uart16550() for _ in self.ports]
        for i, port in enumerate(staged):
            start = _MIG_HEADER.size + i * STATE_SIZE
            port.load(data[start : start + STATE_SIZE])
        for port, new in zip(self.ports, staged, strict=True):
            port.load(new.save())
        self.log.info("state of %d port(s) loaded", self.nr_ports)

    # --- helpers -------------------------------------------------------------

    def _uart(self, bar: int) -> Uart16550:
        if not 0 <= bar < self.nr_ports:
            raise OSError(errno.EINVAL, f"{self.name}: no port behind BAR{bar}")
        return self.ports[bar]


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
