"""Shared helpers for the PCI model tests: real eventfds and small devices."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from mdevcore.pci.device import BarKind, PciDevice, PciIdentity
from mdevcore.vfio_user import backend as vfio
from mdevcore.vfio_user.validate import check_device_feature, check_set_irqs

CFG = vfio.PCI_CONFIG_REGION_INDEX


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def drain(fd: int) -> int:
    """How many times ``fd`` was signalled since the last drain (0 if never)."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@contextmanager
def eventfds(n: int) -> Iterator[list[int]]:
    fds = [new_eventfd() for _ in range(n)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def cfg_read(dev: PciDevice, off: int, size: int) -> int:
    return int.from_bytes(dev.region_read(CFG, off, size), "little")


def cfg_write(dev: PciDevice, off: int, value: int, size: int) -> None:
    dev.region_write(CFG, off, value.to_bytes(size, "little"))


class PlainDevice(PciDevice):
    """A device with one of everything, BAR handlers backed by memory."""

    def __init__(self, *, express: bool = False, pin: int = 1) -> None:
        super().__init__(
            PciIdentity(
                vendor_id=0x1234,
                device_id=0x5678,
                class_code=0xFF0000,
                revision=3,
                subsystem_vendor_id=0x1AF4,
                subsystem_id=0x1100,
                interrupt_pin=pin,
            )
        )
        self.add_bar(0, 0x1000, BarKind.MEM32)
        self.add_bar(1, 8, BarKind.IO)
        self.add_bar(2, 0x4000, BarKind.MEM64, prefetchable=True)
        self.add_bar(4, 0x2000, BarKind.MEM32)
        self.pm = self.add_pm()
        self.msi_off = self.add_msi(4, per_vector_mask=True)
        self.msix_off = self.add_msix(8, table_bar=4, table_offset=0, pba_bar=4, pba_offset=0x1000)
        if express:
            self.exp = self.add_express()
        self.resets = 0

    def on_reset(self) -> None:
        self.resets += 1


def checked_set_irqs(
    dev: PciDevice, index: int, flags: int, start: int, count: int, data: bytes, fds: list[int]
) -> None:
    """SET_IRQS as the engine delivers it: structure checked once, then the device."""
    vectors = dev.irq_info(index).count
    check_set_irqs(flags, start, count, len(data), len(fds), vectors)
    dev.set_irqs(index, flags, start, count, data, fds)


def checked_device_feature(dev: PciDevice, flags: int, data: bytes) -> bytes:
    """DEVICE_FEATURE as the engine delivers it."""
    check_device_feature(flags)
    return dev.device_feature(flags, data)
